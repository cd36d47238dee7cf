"""ClassifyTask (batching, padding, loss, accuracy), stratified splits, and the classifiers'
staged forward / head naming / LoRA targets, plus one FedIT round with the head trained."""

import math

import numpy as np
import pytest
import torch

from hetfl.models.classifiers import (
    SplitClassifier, TinyViT, TinyViTConfig, build_image_classifier, load_text_classifier,
)
from hetfl.models.lora import find_target_modules
from hetfl.tasks.classify import ClassifyTask, cap_per_class, stratified_split

# ----------------------------------------------------------------------------- task


def test_text_collate_right_pads_to_multiple_of_16():
    task = ClassifyTask([], pad_id=7)
    b = task.collate([([1, 2, 3], 0), ([4] * 17, 1)])
    assert b["input_ids"].shape == (2, 32)  # longest 17 -> 32
    assert b["input_ids"][0, :3].tolist() == [1, 2, 3] and set(b["input_ids"][0, 3:].tolist()) == {7}
    assert b["attention_mask"].sum(1).tolist() == [3, 17]
    assert b["attention_mask"][1, 16:].tolist() == [1] + [0] * 15
    assert b["labels"].tolist() == [0, 1]
    assert task.collate([([1] * 16, 0)])["input_ids"].shape == (1, 16)  # already a multiple
    assert task.flop_key(b) == (2, 32) and task.num_tokens(b) == 20


def test_image_collate_stacks():
    task = ClassifyTask([], pad_id=None)
    b = task.collate([(torch.zeros(1, 4, 4), 3), (torch.ones(1, 4, 4), 5)])
    assert b["pixel_values"].shape == (2, 1, 4, 4) and b["labels"].tolist() == [3, 5]
    assert task.flop_key(b) == (2, 1, 4, 4)


class LookupModel(torch.nn.Module):
    """Returns a fixed logit row per image; the image's first pixel holds the row index."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, batch):
        return self.table[batch["pixel_values"][:, 0, 0, 0].long()]


def test_evaluate_accuracy_and_loss_on_hand_logits():
    samples = [(torch.full((1, 2, 2), float(i)), y) for i, y in enumerate([0, 1, 0])]
    model = LookupModel([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])  # predictions 0, 1, 1
    task = ClassifyTask(samples, pad_id=None, eval_batch_size=2)  # two batches: 2 + 1
    out = task.evaluate(model)
    assert out["eval_accuracy"] == pytest.approx(200 / 3)
    # CE: log(1+e^-2), log(1+e^-1), 2+log(1+e^-2)
    ce = [math.log1p(math.exp(-2)), math.log1p(math.exp(-1)), 2 + math.log1p(math.exp(-2))]
    assert out["eval_loss"] == pytest.approx(sum(ce) / 3, abs=1e-6) and out["eval_n"] == 3
    assert task.evaluate(model, samples[1:2]) == pytest.approx({"eval_accuracy": 100.0,
                                                                "eval_loss": math.log1p(math.exp(-1)), "eval_n": 1})
    batch = task.collate(samples)
    assert float(task.loss(model, batch)) == pytest.approx(sum(ce) / 3, abs=1e-6)


def test_batches_are_seeded_and_sized():
    task = ClassifyTask([], pad_id=0)
    data = [([i] * (i + 1), i % 3) for i in range(10)]
    a = [b["labels"].tolist() for b in task.batches(data, 4, 4, torch.Generator().manual_seed(1))]
    b = [b["labels"].tolist() for b in task.batches(data, 4, 4, torch.Generator().manual_seed(1))]
    assert a == b and [len(x) for x in a] == [4, 4, 4, 4]


# ----------------------------------------------------------------------------- splits


def test_stratified_split_largest_remainder_and_determinism():
    labels = [0] * 5 + [1] * 3 + [2] * 2
    # exact quotas 1.5, 0.9, 0.6 -> floors 1, 0, 0 -> two extra slots to classes 1 and 2
    tr, te = stratified_split(labels, 3, np.random.default_rng(0))
    assert sorted(np.asarray(labels)[te].tolist()) == [0, 1, 2]
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    tr2, te2 = stratified_split(labels, 3, np.random.default_rng(0))
    assert te.tolist() == te2.tolist()
    big = [0] * 60 + [1] * 30 + [2] * 10
    _, te = stratified_split(big, 10, np.random.default_rng(5))
    assert np.bincount(np.asarray(big)[te]).tolist() == [6, 3, 1]


def test_cap_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    kept = cap_per_class(np.arange(6), labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[kept]).tolist() == [2, 2, 1]
    assert kept.tolist() == sorted(kept.tolist())


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["tiny-vit-random", "mlp", "cnn"])
def test_image_models_stage_forward_and_head(name):
    model = build_image_classifier(name, 10, seed=3)
    batch = {"pixel_values": torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))}
    logits = model(batch)
    assert logits.shape == (3, 10)
    h, mask = model.stem(batch)
    for i in range(len(model.blocks)):
        h = model.run_block(i, h, mask)
    assert torch.equal(model.tail(h, mask), logits)
    assert isinstance(model, SplitClassifier)
    assert model.head_param_names() == ["classifier.weight", "classifier.bias"]
    same = build_image_classifier(name, 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_tiny_vit_lora_targets_and_size():
    model = TinyViT(TinyViTConfig())
    found = find_target_modules(model, ("q_proj", "v_proj"))
    assert found == [f"blocks.{i}.attn.{p}" for i in range(6) for p in ("q_proj", "v_proj")]
    assert found == [n for n in found if "classifier" not in n]


def test_minilm_forward_staged_pooling_and_targets():
    model, tok = load_text_classifier("minilm", 5, seed=0)
    task = ClassifyTask([], pad_id=tok.pad_token_id)
    enc = tok(["the match ended in a draw", "shares fell"])["input_ids"]
    batch = task.collate([(enc[0], 3), (enc[1], 0)])
    with torch.no_grad():
        logits = model(batch)
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        w = batch["attention_mask"].unsqueeze(-1).float()
        ref = model.classifier((hidden * w).sum(1) / w.sum(1))
    assert logits.shape == (2, 5)
    assert torch.allclose(logits, ref, atol=1e-5)
    # Padding does not change a sample's logits (masked attention and masked mean).
    alone = model(task.collate([(enc[1], 0)]))
    assert torch.allclose(alone, logits[1:], atol=1e-5)
    targets = find_target_modules(model, ("query", "value"))
    assert len(targets) == 12 and targets[0] == "bert.encoder.layer.0.attention.self.query"
    assert model.head_param_names() == ["classifier.weight", "classifier.bias"]
    assert "blocks.0.attention.self.query.weight" not in dict(model.named_parameters())  # no alias names


# ----------------------------------------------------------------------------- with FedIT


def test_fedit_round_trains_head_with_the_adapter():
    """FedIT on a classifier: the head trains in full and travels with the LoRA factors."""
    from hetfl.config import load_config
    from hetfl.engine.loop import run_rounds
    from hetfl.runner import build_method
    from hetfl.scenario import build_scenario

    cfg = load_config({
        "seed": 1, "rounds": 1, "model": {"name": "mlp"},
        "data": {"name": "digits", "samples_per_family": 8, "eval_samples": 100, "partition": "iid"},
        "lora": {"rank": 2, "alpha": 4, "targets": ["fc"]},
        "train": {"optimizer": "sgd", "lr": 0.1, "local_steps": 2, "batch_size": 4},
        "method": {"name": "fedit"}, "population": {"num_clients": 4, "clients_per_round": 2, "tiers": {"laptop": 1}},
        "eval": {"at_start": True},
    })
    sc = build_scenario(cfg)
    head0 = sc.model.classifier.weight.detach().clone()
    method = build_method(cfg)
    hist = run_rounds(sc, method)
    assert not torch.equal(sc.model.classifier.weight, head0)
    trained = method.trainable(sc.model)
    assert set(trained) >= {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in trained.values())
    n = sum(p.numel() for p in trained.values())
    assert hist[1]["bytes_down"] == 2 * 4 * n  # two clients, fp32: exactly the adapter + head
    assert 0.0 <= hist[-1]["eval_accuracy"] <= 100.0 and hist[0]["eval_accuracy"] != hist[-1]["eval_accuracy"]
