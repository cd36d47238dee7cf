"""Pretraining-only instruction families (hetfl.data.pretrain_families): separate from every preset's."""

import re

import pytest

from hetfl.data.instruct import (
    ALL_FAMILIES, HELDOUT_FAMILIES, encode_examples, family_phrasings, make_synth_instruct, prompt_of,
)
from hetfl.data.pretrain_families import NUMBER_WORDS, PRETRAIN_FAMILIES, make_pretrain_instruct, render


def test_deterministic_given_seed():
    a = make_pretrain_instruct(200, seed=0)
    assert a == make_pretrain_instruct(200, seed=0)
    assert a != make_pretrain_instruct(200, seed=1)
    assert {e.category for e in a} == set(PRETRAIN_FAMILIES)
    assert all(e.instruction.strip() and e.input.strip() and e.output.strip() for e in a)


def test_no_family_or_phrasing_shared_with_synth_instruct():
    assert len(PRETRAIN_FAMILIES) >= 15
    assert set(PRETRAIN_FAMILIES).isdisjoint(ALL_FAMILIES)
    synth = {p for f in ALL_FAMILIES for p in family_phrasings(f)}
    assert synth.isdisjoint({e.instruction for e in make_pretrain_instruct(2000, seed=0)})


def test_never_an_example_of_a_heldout_family():
    # The held-out families are what every instruct preset evaluates on: pretraining must not
    # contain their (input, output) pairs, nor their answer formats (yes/no, even/odd, capitals).
    held = {(e.input, e.output) for e in make_synth_instruct(500, seed=0, families=HELDOUT_FAMILIES)}
    pre = make_pretrain_instruct(5000, seed=0)
    assert held.isdisjoint({(e.input, e.output) for e in pre})
    outputs = {e.output for e in pre}
    assert outputs.isdisjoint({"yes", "no", "even", "odd"})
    assert not any(re.fullmatch(r"\[?[A-Z]+\]?", o) for o in outputs)


def test_hand_checked_answers():
    seen = set()
    for e in make_pretrain_instruct(3000, seed=2):
        seen.add(e.category)
        i, o = e.input, e.output
        if e.category == "spell_letters":
            assert o == " ".join(i)
        elif e.category == "swap_words":
            assert o.split() == i.split()[::-1]
        elif e.category == "multiply":
            a, b = map(int, i.split(" * "))
            assert int(o) == a * b
        elif e.category == "list_range":
            xs = [int(x) for x in i.split()]
            assert int(o) == max(xs) - min(xs)
        elif e.category == "list_count_of":
            t, xs = i.split(" in ")
            assert int(o) == xs.split().count(t)
        elif e.category == "number_to_word":
            assert o == NUMBER_WORDS[int(i)] and NUMBER_WORDS[7] == "seven"
        elif e.category == "plural":
            assert o == ("boxes" if i == "box" else i + "s")
    assert seen == set(PRETRAIN_FAMILIES)


def test_render_is_the_fine_tuning_text():
    ex = make_pretrain_instruct(1, seed=0)[0]
    assert render(ex) == prompt_of(ex) + ex.output
    assert render(ex).startswith("### Instruction:\n") and "\n\n### Response:\n" in render(ex)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown pretraining families"):
        make_pretrain_instruct(1, 0, families=["uppercase"])


def test_pretraining_stream_is_encode_examples(tmp_path):
    # scripts/pretrain_lm.py packs exactly fine-tuning's token sequences, bos to eos.
    import importlib.util
    from pathlib import Path

    from hetfl.models.builders import load_causal_lm

    spec = importlib.util.spec_from_file_location(
        "pretrain_lm", Path(__file__).resolve().parents[1] / "scripts" / "pretrain_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, tok = load_causal_lm("tiny-llama")
    stream = mod.instruct_stream(tok, seed=0, n=5).tolist()
    want = [t for x, _ in encode_examples(tok, make_pretrain_instruct(5, 0), max_len=10**6) for t in x]
    assert stream == want
    assert stream[0] == tok.bos_token_id and stream[-1] == tok.eos_token_id
    assert stream.count(tok.bos_token_id) == 5 == stream.count(tok.eos_token_id)
