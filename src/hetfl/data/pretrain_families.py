"""Instruction families used only to pretrain the embedded language models.

scripts/pretrain_lm.py mixes examples of these families, rendered in hetfl's own instruction
prompt (`hetfl.data.instruct.prompt_of`), into the text it pretrains `tiny-llama` and
`tiny-llama-large` on, so that the base models start fine-tuning already following the prompt
format, as the papers' instruction-tuned base models do. No preset trains or evaluates on these
families: every one is a different task from all of ``hetfl.data.instruct.ALL_FAMILIES`` (the
synth-instruct training *and* held-out families), and none is a near relative of a held-out
family (no yes/no or even/odd answers, no capital letters in answers, no "which is smaller").
tests/test_pretrain_families.py checks that no name or phrasing is synth-instruct's and that no
(input, output) pair of a held-out family occurs here.

The families here are independent of synth-instruct: adding or reordering them changes no preset's
data. Everything is seeded through a local ``random.Random``; the global RNG is never touched.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from hetfl.data import instruct as V
from hetfl.data.instruct import Example, prompt_of

_Gen = Callable[[random.Random], tuple[str, str]]

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
VOWELS = "aeiou"


def _nums(rng: random.Random, lo: int, hi: int, k: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(k)]


def _list_str(xs: Sequence[object]) -> str:
    return " ".join(str(x) for x in xs)


def _two_words(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(V.WORDS, 2)
    return a, b


def _spell(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(V.WORDS)
    return w, " ".join(w)


def _swap(rng: random.Random) -> tuple[str, str]:
    a, b = _two_words(rng)
    return f"{a} {b}", f"{b} {a}"


def _concat(rng: random.Random) -> tuple[str, str]:
    a, b = _two_words(rng)
    return f"{a} {b}", a + b


def _plural(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(V.OBJECTS + V.FRUITS)
    return w, ("boxes" if w == "box" else w + "s")


def _vowels(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(V.WORDS)
    return w, str(sum(c in VOWELS for c in w))


def _count_letter(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(V.WORDS)
    c = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"{c} {w}", str(w.count(c))


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = _nums(rng, 0, 9, 2)
    return f"{a} * {b}", str(a * b)


def _halve(rng: random.Random) -> tuple[str, str]:
    n = 2 * rng.randint(0, 30)
    return str(n), str(n // 2)


def _digit_sum(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 99)
    return str(n), str(sum(int(d) for d in str(n)))


def _to_word(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 20)
    return str(n), NUMBER_WORDS[n]


def _from_word(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 20)
    return NUMBER_WORDS[n], str(n)


def _list_drop_first(rng: random.Random) -> tuple[str, str]:
    xs = _nums(rng, 0, 99, rng.randint(3, 5))
    return _list_str(xs), _list_str(xs[1:])


def _list_add_one(rng: random.Random) -> tuple[str, str]:
    xs = _nums(rng, 0, 20, rng.randint(2, 4))
    return _list_str(xs), _list_str(x + 1 for x in xs)


def _list_range(rng: random.Random) -> tuple[str, str]:
    xs = _nums(rng, 0, 50, rng.randint(3, 5))
    return _list_str(xs), str(max(xs) - min(xs))


def _list_count_of(rng: random.Random) -> tuple[str, str]:
    xs = _nums(rng, 0, 5, rng.randint(4, 7))
    t = rng.choice(xs) if rng.random() < 0.8 else rng.randint(0, 5)
    return f"{t} in {_list_str(xs)}", str(xs.count(t))


def _sentence_object(rng: random.Random) -> tuple[str, str]:
    name, obj, color = rng.choice(V.NAMES), rng.choice(V.OBJECTS), rng.choice(V.COLORS)
    templates = (f"{name} lost a {obj} yesterday.", f"The {color} {obj} fell off the shelf.",
                 f"{name} put the {obj} on the chair.", f"Please bring me the {obj}.")
    return rng.choice(templates), obj


def _fill_template(rng: random.Random) -> tuple[str, str]:
    name, obj = rng.choice(V.NAMES), rng.choice(V.OBJECTS)
    return f"{name} {obj}", f"{name} has a {obj}."


def _repeat_list(rng: random.Random) -> tuple[str, str]:
    xs = _nums(rng, 0, 9, rng.randint(2, 3))
    return _list_str(xs), _list_str(xs + xs)


# name -> (generator, phrasings). Generators return (input, output).
_FAMILIES: dict[str, tuple[_Gen, tuple[str, ...]]] = {
    "spell_letters": (_spell, ("Spell the word with a space between the letters.",
                               "Write each letter of the word separated by spaces.",
                               "Split the word into its letters.")),
    "swap_words": (_swap, ("Swap the two words.", "Write the two words in the other order.",
                           "Put the second word first.")),
    "concat_words": (_concat, ("Join the two words into one without a space.",
                               "Glue the words together.", "Remove the space between the words.")),
    "plural": (_plural, ("Write the plural of the word.", "Give the plural form.",
                         "What is the word for more than one?")),
    "count_vowels": (_vowels, ("How many vowels are in the word?", "Count the vowels of the word.",
                               "Give the number of vowels.")),
    "count_letter": (_count_letter, ("How many times does the letter appear in the word?",
                                     "Count how often the given letter occurs in the word.",
                                     "Give the number of times the letter is in the word.")),
    "multiply": (_multiply, ("Multiply the two numbers.", "What is the product?",
                             "Compute the result of the multiplication.")),
    "halve": (_halve, ("Halve the number.", "Divide the number by two.", "What is half of this number?")),
    "digit_sum": (_digit_sum, ("Add up the digits of the number.", "What is the sum of the digits?",
                               "Give the total of the two digits.")),
    "number_to_word": (_to_word, ("Write the number as a word.", "Spell out the number.",
                                  "How is this number written in letters?")),
    "word_to_number": (_from_word, ("Write the word as a number.", "Give the digits for this number word.",
                                    "Turn the number word into digits.")),
    "list_drop_first": (_list_drop_first, ("Remove the first number from the list.",
                                           "Drop the first item of the list.",
                                           "Write the list without its first element.")),
    "list_add_one": (_list_add_one, ("Add one to every number in the list.",
                                     "Increase each number by one.", "Write the list with each item plus one.")),
    "list_range": (_list_range, ("What is the largest number minus the smallest?",
                                 "Give the range of the list.", "Subtract the minimum from the maximum.")),
    "list_count_of": (_list_count_of, ("How many times does the first number appear in the list?",
                                       "Count the occurrences of the number in the list.",
                                       "Give how often the number occurs after 'in'.")),
    "extract_object": (_sentence_object, ("What object is mentioned in the sentence?",
                                          "Extract the thing from the sentence.",
                                          "Find the object in the text.")),
    "fill_template": (_fill_template, ("Write a sentence saying the person has the thing.",
                                       "Make a sentence: name has a thing.",
                                       "Turn the name and the object into a sentence.")),
    "repeat_list": (_repeat_list, ("Write the list twice.", "Repeat the list one more time.",
                                   "Say the numbers, then say them again.")),
}

PRETRAIN_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def make_pretrain_instruct(n: int, seed: int, families: Sequence[str] | None = None) -> list[Example]:
    """Generate ``n`` examples, each of a family drawn uniformly, in draw order.

    Args:
        n: number of examples.
        seed: the only source of randomness; equal seeds give equal lists.
        families: family names to draw from (default: all of ``PRETRAIN_FAMILIES``).

    Returns:
        A list of ``Example`` whose ``category`` is the family name.
    """
    names = PRETRAIN_FAMILIES if families is None else tuple(families)
    unknown = [f for f in names if f not in _FAMILIES]
    if unknown:
        raise ValueError(f"unknown pretraining families: {unknown} (known: {', '.join(PRETRAIN_FAMILIES)})")
    rng = random.Random(f"pretrain-instruct:{seed}")
    out = []
    for _ in range(n):
        fam = rng.choice(names)
        gen, phrasings = _FAMILIES[fam]
        inp, ans = gen(rng)
        out.append(Example(rng.choice(phrasings), inp, ans, fam))
    return out


def render(ex: Example) -> str:
    """Prompt and answer as one text, exactly as fine-tuning sees it (the tokenizer adds bos/eos)."""
    return prompt_of(ex) + ex.output
