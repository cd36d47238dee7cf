"""Instruction-tuning data: synth-instruct task families and local Alpaca/Dolly-style files.

synth-instruct is a procedurally generated instruction dataset. Each *family* is one small skill
(uppercase a word, add two numbers, take the max of a list, ...) with several instruction phrasings.
Answers are a few tokens long so that a ~4M-parameter model can learn them in minutes on a CPU.
``HELDOUT_FAMILIES`` are compositions or near relatives of training skills, used only to measure
generalisation to unseen tasks; ``TRAIN_FAMILIES`` are the rest.

Everything is seeded through a local ``random.Random``; the global RNG is never touched.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from hetfl.errors import DataError

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
CHAT_PROMPTS = "hetfl_chat_prompts"  # tokenizer attribute set by loaders of chat models (smollm2-135m)


@dataclass(frozen=True)
class Example:
    """One instruction example. ``category`` is the task family (or the file's category field)."""

    instruction: str
    input: str
    output: str
    category: str


def prompt_of(ex: Example, tokenizer=None) -> str:
    """Render the prompt of an example: Alpaca-style (the Input block is omitted when empty), or,
    for a tokenizer its loader marked with `CHAT_PROMPTS` (an instruct model such as
    smollm2-135m), one user turn (instruction, blank line, input) in the model's own chat
    template, ending where the assistant's answer starts."""
    if tokenizer is not None and getattr(tokenizer, CHAT_PROMPTS, False):
        user = f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    if ex.input:
        return PROMPT_TEMPLATE.format(instruction=ex.instruction, input=ex.input)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=ex.instruction)


# --- vocabularies (also used by scripts/pretrain_lm.py for its generated pretraining text) -------

WORDS = (
    "cat", "dog", "sun", "tree", "book", "road", "lamp", "rain", "fish", "bird", "door", "milk",
    "star", "ship", "hand", "king", "moon", "wind", "fire", "bell", "cake", "desk", "hill", "ring",
    "song", "boat", "coin", "leaf", "rock", "snow", "gold", "salt", "horse", "river", "stone",
    "house", "light", "water", "bread", "music", "paper", "table", "chair", "cloud", "grass",
    "heart", "night", "queen", "sword", "tower", "garden", "window", "forest", "market", "silver",
)
SHORT_WORDS = tuple(w for w in WORDS if len(w) <= 4)
NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Leo", "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tom", "Vera",
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "orange")
FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon")
ANIMALS = ("cat", "dog", "horse", "tiger", "mouse", "sheep", "wolf", "bear", "lion", "goat")
POSITIVE = ("good", "great", "happy", "lovely", "wonderful", "nice", "excellent", "fun")
NEGATIVE = ("bad", "awful", "sad", "terrible", "boring", "poor", "horrible", "ugly")
KEYS = ("name", "color", "city", "size", "age", "day")
VALUES = ("Paris", "red", "small", "Monday", "Rome", "large", "Tom", "blue", "ten", "Friday")
OBJECTS = ("book", "lamp", "ball", "cup", "box", "hat", "key", "pen", "bag", "coat")

# A family draws (input, output) and then one of its phrasings.
_Gen = Callable[[random.Random], tuple[str, str]]


def _nums(rng: random.Random, lo: int, hi: int, k: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(k)]


def _list_str(xs: Sequence[object]) -> str:
    return " ".join(str(x) for x in xs)


def _pair(rng: random.Random) -> tuple[int, int]:
    a, b = rng.sample(range(0, 50), 2)  # distinct so "larger" / "smaller" is well defined
    return a, b


def _sentence_with_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 99)
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    templates = (
        f"{name} has {n} {obj}s.",
        f"There are {n} {obj}s on the table.",
        f"{name} bought {n} {obj}s today.",
        f"We counted {n} {obj}s in the room.",
    )
    return rng.choice(templates), str(n)


def _sentence_with_name(rng: random.Random) -> tuple[str, str]:
    name, obj, color = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(COLORS)
    templates = (
        f"Yesterday {name} found a {obj}.",
        f"The {color} {obj} belongs to {name}.",
        f"{name} went to the market.",
        f"I gave the {obj} to {name}.",
    )
    return rng.choice(templates), name


def _sentence_with_color(rng: random.Random) -> tuple[str, str]:
    name, obj, color = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(COLORS)
    templates = (
        f"{name} painted the {obj} {color}.",
        f"The {obj} on the desk is {color}.",
        f"She wore a {color} hat.",
        f"{name} likes the {color} {obj}.",
    )
    return rng.choice(templates), color


def _sentiment_sentence(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    thing = rng.choice(("movie", "day", "meal", "book", "song", "trip"))
    templates = (f"The {thing} was {word}.", f"What a {word} {thing}.", f"This {thing} is {word}.")
    return rng.choice(templates), "positive" if positive else "negative"


def _fruit_or_animal(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        return rng.choice(FRUITS), "fruit"
    return rng.choice(ANIMALS), "animal"


def _words(rng: random.Random, k_lo: int, k_hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(k_lo, k_hi))


def _repeat(rng: random.Random) -> tuple[str, str]:
    w, n = rng.choice(SHORT_WORDS), rng.randint(2, 3)
    return f"{w} {n}", " ".join([w] * n)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted(_nums(rng, 0, 20, 2), reverse=True)
    return f"{a} - {b}", str(a - b)


def _is_color(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:  # balanced classes: a constant answer scores only 50%
        return rng.choice(COLORS), "yes"
    return rng.choice(WORDS), "no"


def _lowercase(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w.upper(), w


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = _nums(rng, 0, 20, 2)
    return f"{a} + {b}", str(a + b)


def _key_value(rng: random.Random) -> tuple[str, str]:
    k, v = rng.choice(KEYS), rng.choice(VALUES)
    return f"{k} {v}", f"{k}: {v}"


def _is_animal(rng: random.Random) -> tuple[str, str]:
    # Relative of fruit_or_animal (knowledge) and is_color (yes/no format); half are fruits.
    if rng.random() < 0.5:
        return rng.choice(ANIMALS), "yes"
    return rng.choice(FRUITS), "no"


def _is_positive(rng: random.Random) -> tuple[str, str]:
    sentence, label = _sentiment_sentence(rng)  # sentiment skill, yes/no answer format
    return sentence, "yes" if label == "positive" else "no"


def _length_parity(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)  # composition of word_length and parity
    return w, "even" if len(w) % 2 == 0 else "odd"


def _count_words(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 2, 6)
    return " ".join(ws), str(len(ws))


# name -> (generator, phrasings). Generators return (input, output).
_FAMILIES: dict[str, tuple[_Gen, tuple[str, ...]]] = {
    # string transforms
    "uppercase": (lambda r: (w := r.choice(WORDS), w.upper()),
                  ("Write the word in uppercase.", "Convert the word to capital letters.",
                   "Rewrite this word using only uppercase letters.")),
    "lowercase": (_lowercase,
                  ("Write the word in lowercase.", "Convert the word to small letters.",
                   "Rewrite this word using only lowercase letters.")),
    "capitalize": (lambda r: (w := r.choice(WORDS), w.capitalize()),
                   ("Capitalize the first letter of the word.", "Start the word with a capital letter.",
                    "Write the word with an initial capital.")),
    "first_letter": (lambda r: (w := r.choice(WORDS), w[0]),
                     ("What is the first letter of the word?", "Give the first letter of the word.",
                      "Which letter does the word start with?")),
    "last_letter": (lambda r: (w := r.choice(WORDS), w[-1]),
                    ("What is the last letter of the word?", "Give the last letter of the word.",
                     "Which letter does the word end with?")),
    "reverse_word": (lambda r: (w := r.choice(SHORT_WORDS), w[::-1]),
                     ("Reverse the word.", "Write the word backwards.",
                      "Spell the word in reverse order.")),
    "repeat_word": (_repeat,
                    ("Repeat the word the given number of times.", "Write the word n times.",
                     "Say the word as many times as the number says.")),
    "word_length": (lambda r: (w := r.choice(WORDS), str(len(w))),
                    ("How many letters are in the word?", "Count the letters of the word.",
                     "Give the length of the word.")),
    # arithmetic
    "add": (_add,
            ("Add the two numbers.", "What is the sum?", "Compute the result of the addition.")),
    "subtract": (_subtract,
                 ("Subtract the second number from the first.", "What is the difference?",
                  "Compute the result of the subtraction.")),
    "larger": (lambda r: ((ab := _pair(r)) and f"{ab[0]} {ab[1]}", str(max(ab))),
               ("Which number is larger?", "Give the bigger of the two numbers.",
                "Pick the greater number.")),
    "parity": (lambda r: (str(n := r.randint(0, 99)), "even" if n % 2 == 0 else "odd"),
               ("Is the number even or odd?", "Say whether the number is odd or even.",
                "Tell me if this number is even or odd.")),
    "successor": (lambda r: (str(n := r.randint(0, 98)), str(n + 1)),
                  ("What number comes after this one?", "Add one to the number.",
                   "Give the next number.")),
    "predecessor": (lambda r: (str(n := r.randint(1, 99)), str(n - 1)),
                    ("What number comes before this one?", "Subtract one from the number.",
                     "Give the previous number.")),
    "double": (lambda r: (str(n := r.randint(0, 20)), str(2 * n)),
               ("Double the number.", "Multiply the number by two.", "What is twice this number?")),
    # list operations
    "list_max": (lambda r: (_list_str(xs := _nums(r, 0, 99, r.randint(3, 5))), str(max(xs))),
                 ("What is the largest number in the list?", "Find the maximum of the list.",
                  "Give the biggest number in the list.")),
    "list_min": (lambda r: (_list_str(xs := _nums(r, 0, 99, r.randint(3, 5))), str(min(xs))),
                 ("What is the smallest number in the list?", "Find the minimum of the list.",
                  "Give the lowest number in the list.")),
    "list_sort": (lambda r: (_list_str(xs := _nums(r, 0, 9, r.randint(3, 5))), _list_str(sorted(xs))),
                  ("Sort the list in increasing order.", "Put the numbers in ascending order.",
                   "Arrange the list from smallest to largest.")),
    "list_length": (lambda r: (_list_str(xs := _nums(r, 0, 99, r.randint(2, 7))), str(len(xs))),
                    ("How many numbers are in the list?", "Count the items in the list.",
                     "Give the length of the list.")),
    "list_first": (lambda r: (_list_str(xs := _nums(r, 0, 99, r.randint(3, 5))), str(xs[0])),
                   ("What is the first item of the list?", "Give the first number in the list.",
                    "Return the first element.")),
    "list_last": (lambda r: (_list_str(xs := _nums(r, 0, 99, r.randint(3, 5))), str(xs[-1])),
                  ("What is the last item of the list?", "Give the last number in the list.",
                   "Return the final element.")),
    "list_sum": (lambda r: (_list_str(xs := _nums(r, 0, 9, 3)), str(sum(xs))),
                 ("Add up the numbers in the list.", "What is the sum of the list?",
                  "Compute the total of the numbers.")),
    "list_reverse": (lambda r: (_list_str(xs := _nums(r, 0, 99, r.randint(3, 4))), _list_str(xs[::-1])),
                     ("Reverse the list.", "Write the list in reverse order.",
                      "List the numbers from last to first.")),
    "list_second": (lambda r: (_list_str(xs := _nums(r, 0, 99, r.randint(3, 5))), str(xs[1])),
                    ("What is the second item of the list?", "Give the second number in the list.",
                     "Return the second element.")),
    # formatting
    "wrap_brackets": (lambda r: (w := r.choice(WORDS), f"[{w}]"),
                      ("Put the word in square brackets.", "Wrap the word in brackets.",
                       "Surround the word with [ and ].")),
    "wrap_quotes": (lambda r: (w := r.choice(WORDS), f'"{w}"'),
                    ("Put the word in double quotes.", "Wrap the word in quotation marks.",
                     "Quote the word.")),
    "join_commas": (lambda r: (" ".join(ws := _words(r, 2, 4)), ", ".join(ws)),
                    ("Join the words with commas.", "Separate the words with commas.",
                     "Write the words as a comma-separated list.")),
    "key_value": (_key_value,
                  ("Format the pair as key: value.", "Write the key, a colon, then the value.",
                   "Turn the two words into a key: value line.")),
    # extraction
    "extract_number": (_sentence_with_number,
                       ("What number appears in the sentence?", "Extract the number from the text.",
                        "Find the number in the sentence.")),
    "extract_name": (_sentence_with_name,
                     ("Who is mentioned in the sentence?", "Extract the person's name.",
                      "Find the name in the text.")),
    "extract_color": (_sentence_with_color,
                      ("What color is mentioned?", "Extract the color word from the sentence.",
                       "Find the color in the text.")),
    "count_words": (_count_words,
                    ("How many words are there?", "Count the words in the text.",
                     "Give the number of words.")),
    # classification
    "fruit_or_animal": (_fruit_or_animal,
                        ("Is this a fruit or an animal?", "Classify the word as fruit or animal.",
                         "Answer fruit or animal.")),
    "sentiment": (_sentiment_sentence,
                  ("Is the sentiment positive or negative?", "Classify the sentiment of the sentence.",
                   "Does the text sound positive or negative?")),
    "is_color": (_is_color,
                 ("Is this word a color? Answer yes or no.", "Does the word name a color?",
                  "Answer yes if the word is a color, otherwise no.")),
    # held-out: compositions / near relatives of the skills above
    "upper_first_letter": (lambda r: (w := r.choice(WORDS), w[0].upper()),
                           ("Give the first letter of the word in uppercase.",
                            "What is the first letter, as a capital?",
                            "Write the word's first letter as a capital letter.")),
    "wrap_upper": (lambda r: (w := r.choice(WORDS), f"[{w.upper()}]"),
                   ("Write the word in uppercase inside square brackets.",
                    "Put the capitalised word in brackets.",
                    "Convert the word to capitals and wrap it in [ and ].")),
    "smaller": (lambda r: ((ab := _pair(r)) and f"{ab[0]} {ab[1]}", str(min(ab))),
                ("Which number is smaller?", "Give the smaller of the two numbers.",
                 "Pick the lesser number.")),
    "is_animal": (_is_animal,
                  ("Is this word an animal? Answer yes or no.", "Does the word name an animal?",
                   "Answer yes if the word is an animal, otherwise no.")),
    "is_positive": (_is_positive,
                    ("Is the sentence positive? Answer yes or no.", "Does the text sound happy?",
                     "Answer yes if the sentiment is positive, otherwise no.")),
    "length_parity": (_length_parity,
                      ("Does the word have an even or odd number of letters?",
                       "Is the length of the word even or odd?",
                       "Count the letters and say whether the count is even or odd.")),
}

ALL_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
HELDOUT_FAMILIES: tuple[str, ...] = (
    "upper_first_letter", "wrap_upper", "smaller", "is_animal", "is_positive", "length_parity",
)
TRAIN_FAMILIES: tuple[str, ...] = tuple(f for f in ALL_FAMILIES if f not in HELDOUT_FAMILIES)


def family_phrasings(family: str) -> tuple[str, ...]:
    """The instruction phrasings of one family (raises DataError for an unknown family)."""
    if family not in _FAMILIES:
        raise DataError(f"synth-instruct: unknown task family '{family}' (known: {', '.join(ALL_FAMILIES)})")
    return _FAMILIES[family][1]


def make_synth_instruct(
    n_per_family: int, seed: int, families: Sequence[str] | None = None
) -> list[Example]:
    """Generate synth-instruct examples, ``n_per_family`` per family, in family order.

    Args:
        n_per_family: examples per family.
        seed: the only source of randomness; equal seeds give equal lists.
        families: family names to draw from (default: all, train and held-out).

    Returns:
        A list of ``Example`` whose ``category`` is the family name.
    """
    names = ALL_FAMILIES if families is None else tuple(families)
    out: list[Example] = []
    for fam in names:
        phrasings = family_phrasings(fam)
        gen = _FAMILIES[fam][0]
        # One stream per family so adding a family does not change the others' examples.
        rng = random.Random(f"{seed}:{fam}")
        for _ in range(n_per_family):
            inp, ans = gen(rng)
            out.append(Example(rng.choice(phrasings), inp, ans, fam))
    return out


# --- local instruction files ----------------------------------------------------------------------

def _row_to_example(obj: object, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    fields: dict[str, str] = {}
    for key, alts, required in (("instruction", ("instruction",), True),
                                ("input", ("input", "context"), False),
                                ("output", ("output", "response"), True),
                                ("category", ("category",), False)):
        found = next((a for a in alts if a in obj), None)
        if found is None:
            if required:
                raise DataError(f"{where}: missing key '{key}'")
            fields[key] = "default" if key == "category" else ""
            continue
        val = obj[found]
        if not isinstance(val, str):
            raise DataError(f"{where}: key '{found}' must be a string, got {type(val).__name__}")
        fields[key] = val
    if not fields["instruction"].strip():
        raise DataError(f"{where}: empty 'instruction'")
    return Example(fields["instruction"], fields["input"], fields["output"], fields["category"])


def load_instruction_file(path: str | Path) -> list[Example]:
    """Load an Alpaca/Dolly-style ``.json`` (list of objects) or ``.jsonl`` file.

    Keys: ``instruction``; ``input`` or ``context``; ``output`` or ``response``; optional
    ``category`` (default ``"default"``).

    Raises:
        DataError: missing file, bad JSON, missing keys or non-string values; the message names
            the file and the line (JSONL) or item index (JSON).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: instruction file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p.name}:{lineno}: invalid JSON ({e.msg})") from None
            out.append(_row_to_example(obj, f"{p.name}:{lineno}"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p.name}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{p.name}: expected a JSON list of objects")
    return [_row_to_example(obj, f"{p.name}[{i}]") for i, obj in enumerate(data)]


# --- tokenisation ----------------------------------------------------------------------------------

def _ids(tokenizer, text: str, specials: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=specials)["input_ids"])
    eos = tokenizer.eos_token_id
    if specials and eos is not None and ids and ids[-1] == eos:
        ids = ids[:-1]  # some tokenizers append eos to every text; the prompt must not end one
    return ids


def encode_examples(tokenizer, examples: Sequence[Example], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Tokenise examples for causal-LM fine-tuning with the loss on the answer only.

    input_ids = [bos] + prompt + output + [eos]; labels are ``IGNORE_INDEX`` on the prompt (bos
    included) and the real ids on output + eos. If too long, the prompt is cut from the left
    (the answer is never dropped; an answer longer than ``max_len`` keeps its first tokens).

    Returns:
        One ``(input_ids, labels)`` pair of equal length (<= max_len) per example.
    """
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        prompt = _ids(tokenizer, prompt_of(ex, tokenizer), specials=True)  # adds bos where the tokenizer does
        answer = _ids(tokenizer, ex.output, specials=False) + ([eos] if eos is not None else [])
        answer = answer[:max_len]
        keep = max_len - len(answer)
        prompt = prompt[max(0, len(prompt) - keep):] if keep > 0 else []  # max: a short prompt stays whole
        out.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of ``(input_ids, labels)`` pairs into tensors of shape (B, T_max)."""
    t_max = max(len(ids) for ids, _ in batch)
    b = len(batch)
    input_ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    labels = torch.full((b, t_max), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, t_max), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
