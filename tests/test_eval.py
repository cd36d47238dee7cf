"""Evaluations that resolve: shipped eval sizes, item counts (`eval_n`), per-family scores, and
batched greedy decoding that shares its prompt pass with the perplexity pass."""

import math

import pytest
import torch

from hetfl.config import load_config
from hetfl.data.instruct import HELDOUT_FAMILIES, Example, encode_examples, prompt_of
from hetfl.engine.loop import run_rounds
from hetfl.eval.decode import greedy_with_nll
from hetfl.models.builders import generate_greedy, load_causal_lm
from hetfl.runner import build_method
from hetfl.scenario import build_scenario
from hetfl.tasks.instruct import InstructTask, _instruction_examples
from optional import shipped_presets

DATASET_SIZES = {"digits": 1797, "bbc-news": 2225, "bbc-news-bow": 2225}  # classify.py's _split keeps <= n // 2


@pytest.mark.parametrize("name", shipped_presets())  # optional-package presets skip when absent
def test_every_shipped_preset_evaluates_on_at_least_200_items(name):
    cfg = load_config(name)
    d = cfg.data
    assert d.eval_samples >= 200  # one item moves a percentage by at most 0.5 points
    if d.name == "synth-instruct":  # the held-out set the preset really builds, family by family
        _, held = _instruction_examples(cfg)
        counts = {f: sum(e.category == f for e in held) for f in HELDOUT_FAMILIES}
        assert len(held) == d.eval_samples and set(counts.values()) == {d.eval_samples // len(HELDOUT_FAMILIES)}
    elif d.name in DATASET_SIZES:
        assert d.eval_samples <= DATASET_SIZES[d.name] // 2  # the split accepts it without starving training


class CharTokenizer:
    """One id per character (ord + 10); bos=1 added like Llama's tokenizer, eos=2, pad=0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) + 10 for c in text]}


def _task(outputs_by_family, cap=12):
    held = [Example("Say it.", f"x{i}", out, fam) for fam, outs in outputs_by_family.items()
            for i, out in enumerate(outs)]
    return InstructTask(CharTokenizer(), 64, held, max_new_tokens=cap, eval_batch_size=4)


def test_decoding_budget_is_the_longest_answer_plus_eos_capped():
    # Longest answer "abcde": 5 character ids + eos = 6 tokens.
    assert _task({"f": ["ab", "abcde", "a"]}).gen_tokens == 6
    assert _task({"f": ["ab", "abcde", "a"]}, cap=4).gen_tokens == 4


def test_instruct_evaluate_counts_items_and_scores_each_family(monkeypatch):
    task = _task({"f1": ["yes", "no", "red blue"], "f2": ["cat", "dog"]})
    preds = ["yes", "yes", "red", "cat", "cat dog"]
    seen = {}

    def fake(model, tok, prompts, answers, max_new_tokens, batch_size):
        seen.update(prompts=prompts, answers=answers, budget=max_new_tokens)
        return preds, 10 * math.log(2.0), 10  # mean NLL ln 2 -> perplexity 2

    monkeypatch.setattr("hetfl.eval.decode.greedy_with_nll", fake)
    out = task.evaluate(torch.nn.Linear(1, 1))
    # Rouge-L F1 per item: 1, 0, 2/3 (p 1, r 1/2) | 1, 2/3 (p 1/2, r 1); exact: items 1 and 4.
    assert out["eval_n"] == 5 and out["eval_n_by_family"] == {"f1": 3, "f2": 2}
    assert out["eval_rougeL_by_family"] == pytest.approx({"f1": 100 * (5 / 3) / 3, "f2": 100 * (5 / 3) / 2})
    assert out["eval_rougeL"] == pytest.approx(100 * (10 / 3) / 5)
    assert out["eval_exact_match"] == pytest.approx(40.0) and out["eval_ppl"] == pytest.approx(2.0)
    # The answers scored are the encoded references (characters + eos); the budget is "red blue" + eos.
    assert seen["answers"][2] == [ord(c) + 10 for c in "red blue"] + [2] and seen["budget"] == 9
    assert seen["prompts"][0] == prompt_of(task.eval_examples[0])
    # A client's own split: perplexity (uniform over 256 ids: 256) and the count only.
    assert task.evaluate(_ppl_model(), task.encode(task.eval_examples[:2])) == {"eval_ppl": pytest.approx(256.0),
                                                                                 "eval_n": 2}


def _ppl_model():
    class M(torch.nn.Module):  # uniform next-token distribution over 256 ids
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 256)})()

    return M()


PROMPTS = ["ROMEO:\n", "The numbers were 3, 8, 1. The largest was", "Spelled backwards, cat becomes", "A",
           "### Instruction:\nSay yes.\n\n### Response:\n", "First Citizen:\nBefore we proceed any further, hear me."]


@pytest.fixture(scope="module")
def eos_prone():
    """tiny-llama with its (tied) eos embedding scaled up 8x: some rows stop at once, others
    after a few tokens, others run the whole budget, so early stopping within a batch is exercised."""
    model, tok = load_causal_lm("tiny-llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id] *= 8.0
    return model, tok


def test_batched_greedy_equals_generate_one_prompt_at_a_time(eos_prone):
    model, tok = eos_prone
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in
               ("yes", "the 8", "tac", "B c", "yes", "Speak, speak.")]
    texts, _, _ = greedy_with_nll(model, tok, PROMPTS, answers, max_new_tokens=8, batch_size=4)
    single = [generate_greedy(model, tok, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert texts == single
    assert "" in texts and any(len(tok(t, add_special_tokens=False)["input_ids"]) >= 6 for t in texts)


def test_shared_prompt_pass_gives_the_teacher_forced_nll(eos_prone):
    model, tok = eos_prone
    examples = [Example("Reverse the word.", w, w[::-1], "rev") for w in ("cat", "stone", "garden")]
    encoded = encode_examples(tok, examples, max_len=96)
    answers = [[t for t in lab if t != -100] for _, lab in encoded]
    _, nll, n = greedy_with_nll(model, tok, [prompt_of(e) for e in examples], answers, 2, batch_size=2)
    want = 0.0
    for ids, lab in encoded:  # one unpadded forward per example: -log p(answer token | everything before)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
        k = len(ids) - sum(t != -100 for t in lab)  # first answer position
        want += float(torch.nn.functional.cross_entropy(logits[k - 1:-1], torch.tensor(ids[k:]), reduction="sum"))
    assert n == sum(len(a) for a in answers)
    assert nll == pytest.approx(want, rel=1e-4)


def _run(preset, *sets):
    cfg = load_config(preset, ["rounds=1", "population.num_clients=8", "population.clients_per_round=4", *sets])
    sc = build_scenario(cfg)
    return sc, run_rounds(sc, build_method(cfg))


def test_classification_rounds_record_global_and_client_item_counts():
    sc, hist = _run("floral-news-labelshift", "data.eval_samples=100", "eval.every=1", "eval.at_start=true")
    n_client = sum(len(t) for t in sc.client_test)
    assert n_client > 0
    for m in hist:  # round 0 (the base model) and round 1
        assert m["eval_n"] == 100 and m["eval_client_n"] == n_client
        assert "eval_client_n_mean" not in m and "eval_client_accuracy_mean" in m


def test_regression_rounds_record_item_counts():
    sc, hist = _run("floral-synth-linear", "eval.every=1")
    assert hist[-1]["eval_n"] == 256  # the preset's held-out set
    assert hist[-1]["eval_client_n"] == sum(len(t) for t in sc.client_test) > 0
