"""FLoRAL scenarios: per-cluster concept shifts (rotation, label shift, synthetic teachers), the
reduced-data fraction, and one short run of every shipped floral preset."""

import pytest
import torch

from hetfl.config import load_config, preset_names
from hetfl.data.clusters import cluster_of, keep_fraction, label_shift_cluster, rotate_cluster
from hetfl.engine.loop import run_rounds
from hetfl.errors import ConfigError
from hetfl.runner import build_method
from hetfl.scenario import build_scenario

SMALL = ["population.num_clients=8", "population.clients_per_round=4"]


def test_cluster_transforms_by_hand():
    x = torch.arange(4.0).view(1, 2, 2)
    assert rotate_cluster([(x, 3)], 1)[0][0].tolist() == [[[1.0, 3.0], [0.0, 2.0]]]
    assert [y for _, y in label_shift_cluster([(x, 0), (x, 7), (x, 9)], 3, 10)] == [3, 0, 2]
    assert [cluster_of(i, 4) for i in range(6)] == [0, 1, 2, 3, 0, 1]


@pytest.fixture(scope="module")
def digits():
    plain = build_scenario(load_config("floral-digits-rotate", [*SMALL, "data.cluster_shift=none"]))
    rot = build_scenario(load_config("floral-digits-rotate", SMALL))
    shift = build_scenario(load_config("floral-digits-labelshift", SMALL))
    return plain, rot, shift


def test_rotated_digits_are_rot90_of_the_originals_by_cluster(digits):
    plain, rot, _ = digits
    assert rot.client_clusters == [0, 1, 2, 3, 0, 1, 2, 3]
    for cid in range(8):
        for split in ("client_data", "client_test"):
            a, b = getattr(plain, split)[cid], getattr(rot, split)[cid]
            assert len(a) == len(b) > 0
            for (x0, y0), (x1, y1) in zip(a, b):
                assert torch.equal(x1, torch.rot90(x0, k=cid % 4, dims=(-2, -1))) and y1 == y0
    assert not torch.equal(rot.client_data[1][0][0], plain.client_data[1][0][0])


def test_label_shift_maps_y_to_y_plus_c_mod_10(digits):
    plain, _, shift = digits
    for cid in range(8):
        for (x0, y0), (x1, y1) in zip(plain.client_data[cid] + plain.client_test[cid],
                                      shift.client_data[cid] + shift.client_test[cid]):
            assert torch.equal(x0, x1) and y1 == (y0 + cid % 4) % 10


def test_data_fraction_keeps_five_percent_but_at_least_ten():
    import numpy as np

    rng = np.random.default_rng(0)
    assert len(keep_fraction(np.arange(400), 0.05, rng)) == 20
    assert len(keep_fraction(np.arange(60), 0.05, rng)) == 10
    assert len(keep_fraction(np.arange(6), 0.05, rng)) == 6
    full = build_scenario(load_config("floral-synth-mlp", SMALL))
    small = build_scenario(load_config("floral-synth-mlp", [*SMALL, "data.fraction=0.05"]))
    assert [len(d) for d in full.client_data] == [96] * 8 and [len(d) for d in small.client_data] == [10] * 8
    assert [len(d) for d in small.client_test] == [24] * 8  # the test split is not reduced


@pytest.mark.parametrize("preset", ["floral-synth-linear", "floral-synth-mlp"])
def test_synthetic_targets_come_from_the_clusters_teacher(preset):
    cfg = load_config(preset)
    sc = build_scenario(cfg)
    from hetfl.tasks.regression import draw_teachers

    from hetfl.seeding import derive_seed
    teachers = draw_teachers(cfg.data.name, cfg.data.clusters,
                             torch.Generator().manual_seed(derive_seed(cfg.seed, "data", cfg.data.name)))
    assert [len(d) + len(t) for d, t in zip(sc.client_data, sc.client_test)] == [cfg.data.samples_per_family] * len(sc.client_data)
    for cid in (0, 1, cfg.data.clusters):
        x = torch.stack([s[0] for s in sc.client_data[cid]])
        y = torch.stack([s[1] for s in sc.client_data[cid]])
        assert torch.equal(y, teachers.targets(x, cid % cfg.data.clusters))
    # the clusters really differ: cluster 1's teacher is not cluster 0's
    assert not torch.allclose(teachers.targets(x, 0), teachers.targets(x, 1))


def test_news_labels_are_permuted_per_cluster():
    plain = build_scenario(load_config("floral-news-labelshift", [*SMALL, "data.cluster_shift=none"]))
    shift = build_scenario(load_config("floral-news-labelshift", SMALL))
    for cid in range(8):
        assert [(y + cid % 4) % 5 for _, y in plain.client_data[cid]] == [y for _, y in shift.client_data[cid]]


def test_cluster_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^data.cluster_shift:"):
        build_scenario(load_config("floral-synth-linear", ["data.cluster_shift=rotate"]))
    with pytest.raises(ConfigError, match=r"^data.clusters:"):
        build_scenario(load_config("floral-synth-linear", ["data.clusters=0"]))
    with pytest.raises(ConfigError, match=r"^model.name:"):
        build_scenario(load_config("floral-synth-linear", ["model.name=mlp"]))


FLORAL_PRESETS = [p for p in preset_names() if p.startswith("floral-")]


def test_every_floral_preset_has_a_full_and_a_5pct_data_variant():
    full = {p for p in FLORAL_PRESETS if not p.endswith("-5pct")}
    assert full == {"floral-digits-rotate", "floral-digits-labelshift", "floral-news-labelshift",
                    "floral-synth-linear", "floral-synth-mlp"}
    for p in FLORAL_PRESETS:
        cfg = load_config(p)
        assert cfg.data.fraction == (0.05 if p.endswith("-5pct") else 1.0) and cfg.data.clusters in (2, 4)
        if not p.endswith("-5pct") and p != "floral-synth-linear":  # its clients hold < 10 samples anyway
            assert f"{p}-5pct" in FLORAL_PRESETS


@pytest.mark.parametrize("preset", [p for p in FLORAL_PRESETS if not p.endswith("-5pct")])
def test_every_floral_preset_runs_a_round(preset):
    cfg = load_config(preset, ["rounds=1", *SMALL, "eval.every=1"])
    hist = run_rounds(build_scenario(cfg), build_method(cfg))
    metric = "eval_client_mse_mean" if "synth" in preset else "eval_client_accuracy_mean"
    assert metric in hist[-1] and hist[-1]["param_overhead_pct"] > 0
