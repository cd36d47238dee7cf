"""Data selection combined with every parameter-averaging method: the method x selector table on a
tiny tiny-llama scenario, `load` giving the model client_update trains from, the refusal of the
methods selection cannot combine with, and the drop rule for empty coresets."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from test_fedhds import point_scenario
from toy import toy_config

from hetfl.config import load_config
from hetfl.engine.loop import run_rounds
from hetfl.errors import ConfigError, HetflWarning
from hetfl.runner import build_method, run_on_copy

METHODS = ("fedit", "fedavg-full", "fslora", "heterolora", "flexlora", "flora-stack", "floral")
SELECTORS = ("random", "perplexity", "fedhds", "fedhds-turbo", "coreset-central")
SELECTOR_SETS = {  # small scenarios: 2-D points from ~12 samples per client
    "random": ["selection.ratio=0.5"], "perplexity": ["selection.ratio=0.5"],
    "coreset-central": ["selection.ratio=0.5"],
    "fedhds": ["selection.min_cluster_size=2", "selection.client_noise=singleton", "selection.server_noise=keep"],
    "fedhds-turbo": ["selection.min_cluster_size=2", "selection.client_noise=singleton",
                     "selection.server_noise=keep"],
}
METHOD_SETS = {"floral": ["method.num_adaptors=2"]}
TINY = {  # three clients of ~12 samples, one round, a 2-prompt evaluation of one token
    "seed": 1, "rounds": 1,
    "model": {"name": "tiny-llama"},
    "data": {"name": "synth-instruct", "samples_per_family": 1, "eval_samples": 2, "partition": "iid", "max_len": 48},
    "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    "train": {"local_steps": 1, "batch_size": 4},
    "population": {"num_clients": 3, "clients_per_round": 3, "tiers": {"laptop": 1}},
    "eval": {"every": 1000, "at_start": False, "max_new_tokens": 1, "batch_size": 8},
}


@pytest.fixture(scope="module")
def tiny():
    from hetfl.scenario import build_scenario

    torch.manual_seed(0)
    return build_scenario(load_config(TINY))


def tiny_config(method: str, selector: str, *more: str):
    return load_config(TINY, [f"method.name={method}", f"selection.name={selector}", *METHOD_SETS.get(method, []),
                              *SELECTOR_SETS.get(selector, []), *more])


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("method", METHODS)
def test_every_averaging_method_trains_on_every_selection(tiny, method, selector):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # coreset-central's non-private notice
        history, _ = run_on_copy(tiny, tiny_config(method, selector))
    m = history[-1]
    assert m["clients_trained"] > 0
    assert 0 < m["data_fraction"] < 1  # each selector here keeps a strict subset
    assert m["coreset_size"] == round(m["data_fraction"] * sum(len(d) for d in tiny.client_data))
    assert m["bytes_up"] > 0 and m["train_loss"] == m["train_loss"]  # a real update went up, loss not NaN
    assert m["selection_flops"] > 0 or selector == "random"  # model-based selectors counted their forwards


def _jiggle(tensors, gen):
    """Add small noise to every tensor in a (nested) dict, in place."""
    for k, v in tensors.items():
        if isinstance(v, dict):
            _jiggle(v, gen)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            tensors[k] = v + 0.05 * torch.randn(v.shape, generator=gen)


@pytest.mark.parametrize("method", METHODS)
def test_load_gives_the_model_client_update_starts_from(tiny, method):
    """Selection reads ctx.model after `load`: it must be the model the client then trains from,
    whatever another client left in the shared worker model. With lr 1e-12 local training changes
    nothing visible, so after client_update the worker must give the same outputs as right after `load`."""
    import copy

    from hetfl.engine.sim import client_context, train_client

    cfg = tiny_config(method, "random", "train.optimizer=sgd", "train.lr=1.0e-12",
                      *(["method.router_lr=0.0"] if method == "floral" else []))
    sc = copy.deepcopy(tiny)
    sc.cfg = cfg
    m = build_method(cfg)
    state = m.setup(sc)
    gen = torch.Generator().manual_seed(0)
    _jiggle(state, gen)  # a global model that is not the initial one
    knobs = {c: m.plan(c, sc.population.device(c))[0] for c in range(3)}
    msg = m.configure(state, 2, [0])[0]
    x = torch.tensor([sc.client_data[0][0][0]])

    def scramble():  # what another client's training leaves in the worker model
        with torch.no_grad():
            for n, p in sc.model.named_parameters():
                if p.requires_grad or "lora_" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))

    def out():
        sc.model.eval()
        with torch.no_grad():
            return sc.model(input_ids=x).logits.clone()

    scramble()
    before = out()
    m.load(msg, client_context(sc, 2, 0, knobs[0], 0, {}, {}))
    loaded = out()
    assert not torch.allclose(before, loaded)
    scramble()
    train_client(m, msg, client_context(sc, 2, 0, knobs[0], 0, {}, {}))
    torch.testing.assert_close(out(), loaded, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- refusal


@pytest.mark.parametrize("method", ["sflam", "splitfed-v1", "fedv"])
def test_selection_is_refused_for_methods_that_cannot_load_a_whole_model(method):
    with pytest.raises(ConfigError, match=r"^selection\.name: random cannot combine with method") as e:
        toy_config(f"method.name={method}", "selection.name=random")
    assert "\n" not in str(e.value) and "fedit" in str(e.value)


def test_cli_refuses_selection_with_a_split_method_before_building_anything(tmp_path, capsys):
    from hetfl.cli.main import main

    assert main(["validate", "split-text", "--set", "selection.name=random"]) == 2
    out = tmp_path / "run"
    assert main(["run", "split-text", "--set", "selection.name=fedhds", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("hetfl: error: selection.name: ") for e in err)
    assert not out.exists()
    for method in METHODS:  # every averaging method passes
        assert load_config("fslora-instruct", [f"method.name={method}", "selection.name=random"]).selection.ratio


# ----------------------------------------------------------------------------- empty coresets


def test_empty_coresets_drop_the_client_with_a_warning_and_count_in_clients_trained():
    cfg, sc = point_scenario("rounds=2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = run_rounds(sc, build_method(cfg))
    dropped = {}
    for w in caught:
        if issubclass(w.category, HetflWarning):
            msg = str(w.message)
            assert "\n" not in msg
            r, n, of = map(int, re.match(r"selection: round (\d+): (\d+) of (\d+) sampled", msg).groups())
            dropped[r] = (n, of)
    assert dropped  # some sampled client is left without a group in this scenario
    for m in history[1:]:
        n, of = dropped.get(m["round"], (0, cfg.population.clients_per_round))
        assert m["clients_trained"] == of - n > 0


def test_a_round_where_no_client_trains_is_a_config_error_naming_the_selection():
    cfg, sc = point_scenario("selection.server_min_cluster_size=50")  # every centroid is server noise
    with pytest.raises(ConfigError, match=r"^selection: round 1 trained no client .*selection\.name=fedhds.*"
                                          r"population\.clients_per_round") as e:
        run_rounds(sc, build_method(cfg))
    assert "\n" not in str(e.value)


def test_cli_prints_hetfl_warnings_on_one_line():
    from hetfl.cli.main import _format_warning

    assert _format_warning("round 2: x", HetflWarning, "f.py", 3) == "hetfl: warning: round 2: x\n"
    assert "UserWarning" in _format_warning("other", UserWarning, "f.py", 3)
