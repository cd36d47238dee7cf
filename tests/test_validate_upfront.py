"""`hetfl validate` and `hetfl run` check every cross-section rule before a model loads: each bad
config is one line naming the key, exit code 2; model sizes come from config.json or declared
sizes (models/facts.py), and they match the models the builders make."""

from types import SimpleNamespace

import pytest
from torch import nn

from hetfl.cli.main import main
from hetfl.config import load_config
from hetfl.validation import backend_rules
from optional import shipped_presets


def sets(*items):
    return [a for it in items for a in ("--set", it)]


def one_line(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hetfl: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("hetfl: error: ")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every way a run builds its model or data raises, so a check that passes ran before them."""
    import hetfl.models.builders as builders
    import hetfl.models.classifiers as classifiers
    import hetfl.scenario as scenario

    def refuse(*args, **kwargs):
        raise AssertionError("a model or scenario was built before validation refused the config")

    monkeypatch.setattr(scenario, "build_scenario", refuse)
    for mod, name in ((builders, "load_causal_lm"), (classifiers, "build_image_classifier"),
                      (classifiers, "load_text_classifier"), (classifiers, "load_tiny_vit")):
        monkeypatch.setattr(mod, name, refuse)


BAD = [
    # unknown names
    ("fedit-instruct", ["model.name=gpt-17"], [], "model.name: unknown model 'gpt-17' for data.name synth-instruct"),
    ("fedit-instruct", ["model.name=tiny-vit"], [], "model.name: 'tiny-vit' is not a model synth-instruct trains"),
    ("split-vision", ["model.name=/no/such/vit"], [], "model.name: '/no/such/vit': no such folder"),
    ("fedit-instruct", ["data.name=no-such-data"], [], "data.name: unknown dataset 'no-such-data'"),
    ("fedit-instruct", ["data.name=/no/such/rows.jsonl"], [], "data.name: /no/such/rows.jsonl: no such file"),
    ("floral-synth-mlp", ["data.clusters=0"], [], "data.clusters: synth-mlp needs data.clusters >= 1"),
    # LoRA ranks against the targeted layers (from config.json / declared sizes)
    ("fedit-instruct", ["lora.rank=1000000"], [],
     "lora.rank: rank 1000000 is larger than layer model.layers.0.self_attn.q_proj (256 x 256) of model tiny-llama "
     "(hidden 256); use <= 256"),
    ("fedhds-dolly05-large", ["lora.rank=500"], [],
     "lora.rank: rank 500 is larger than layer model.layers.0.self_attn.q_proj (384 x 384) of model tiny-llama-large "
     "(hidden 384); use <= 384"),
    ("digits-fedit", ["lora.rank=129"], [],
     "lora.rank: rank 129 is larger than layer blocks.0.attn.q_proj (128 x 128) of model tiny-vit (hidden 128); "
     "use <= 128"),
    ("fslora-news", ["lora.rank=400"], [],
     "lora.rank: rank 400 is larger than layer bert.encoder.layer.0.attention.self.query (384 x 384) of model "
     "minilm (hidden 384); use <= 384"),
    ("floral-synth-mlp", ["method.name=fedit", "lora.targets=[fc2]", "lora.rank=2"], [],
     "lora.rank: rank 2 is larger than layer fc2 (20 x 1) of model mlp"),
    ("fslora-instruct", ["method.rank_dist=uniform", "method.rank_low=20"], [],
     "method.rank_low: 20 exceeds the global rank lora.rank=16"),
    ("fslora-instruct", ["method.rank_dist=uniform", "method.rank_low=9"], [],
     "method.rank_low: 9 exceeds the default rank_high (half of lora.rank=16: 8)"),
    ("fslora-instruct", ["method.rank_high=32"], [], "method.rank_high: 32 exceeds the global rank lora.rank=16"),
    # method x selection, method x data
    ("split-text", ["selection.name=random"], [], "selection.name: random cannot combine with method fedv"),
    ("digits-fedit", ["method.name=floral"], [], "method.num_adaptors: 0 means data.clusters"),
    # split cut points against the model's depth
    ("fedit-instruct", ["method.name=fedv"], [], "method.name: fedv splits the model between client and server"),
    ("sflam-vision", ["method.cut=4"], [],
     "method.cut: cut 4 is outside 0..3 (model tiny-vit has 4 blocks and the server keeps at least one)"),
    ("split-vision", ["method.cut_by_tier.laptop=9"], [], "method.cut_by_tier.laptop: cut 9 is outside 0..3"),
    ("split-vision", ["model.name=mlp"], [],
     "method.cut_by_tier.phone-high: cut 1 is outside 0..0 (model mlp has 1 block and"),
    ("split-vision", ["model.name=tiny-vit-random", "method.cut_by_tier.laptop=6"], [],
     "method.cut_by_tier.laptop: cut 6 is outside 0..5 (model tiny-vit-random has 6 blocks"),
    ("split-text", ["method.cut_by_tier={toaster: 0}"], [], "method.cut_by_tier.toaster: no device tier 'toaster'"),
    ("split-text", ["method.cut_by_tier.laptop=6"], [],
     "method.cut_by_tier.laptop: cut 6 is outside 0..5 (model minilm has 6 blocks"),
    ("sflam-vision", ["wireless.cuts=[0, 7]"], [], "wireless.cuts: cut 7 is outside 0..3"),
    ("sflam-vision", ["method.server_tune=last-k", "method.last_k=4"], [],
     "method.last_k: 4 must be below the 4 blocks of model tiny-vit"),
    # method x backend
    ("split-vision", [], ["--backend", "flower"], "method.name: fedv makes per-batch server calls"),
    ("split-vision", ["method.body_schedule=round"], ["--backend", "flower"], "method.name: fedv makes per-batch"),
    ("split-vision", ["method.name=splitfed-v2"], ["--backend", "flower"], "method.name: splitfed-v2 makes per-batch"),
    ("fedhds-dolly05", [], ["--backend", "flower"], "selection.name: fedhds: data selection"),
    ("floral-digits-rotate", [], ["--backend", "flower"], "data.client_test_fraction: per-client evaluation"),
]


@pytest.mark.parametrize("preset,overrides,flags,msg", BAD, ids=[f"{b[0]}:{','.join(b[1] + b[2])}" for b in BAD])
def test_bad_config_is_one_line_naming_the_key(preset, overrides, flags, msg, capsys, no_model_loads):
    line = one_line(["validate", preset, *sets(*overrides), *flags], capsys)
    assert line.startswith(msg), line  # the key first, then what is wrong and what to use


@pytest.mark.parametrize("preset,overrides,flags,msg", [
    ("fedit-instruct", ["lora.rank=1000000"], [], "lora.rank: rank 1000000 is larger than layer"),
    ("sflam-vision", ["method.cut=4"], [], "method.cut: cut 4 is outside 0..3"),
    ("split-vision", [], ["--backend", "flower"], "method.name: fedv makes per-batch server calls"),
])
def test_run_refuses_before_building_anything(preset, overrides, flags, msg, capsys, no_model_loads, tmp_path):
    out = tmp_path / "r"
    assert msg in one_line(["run", preset, *sets(*overrides), *flags, "--out", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("preset,overrides,flags", [
    ("sflam-vision", ["method.cut=auto"], []),
    ("sflam-vision", ["method.cut=3", "wireless.cuts=[0, 3]"], []),
    ("split-vision", ["model.name=tiny-vit-random", "method.cut_by_tier.laptop=5"], []),
    ("fedit-instruct", ["lora.rank=256"], []),
    ("fedit-instruct", ["method.name=fedavg-full", "lora.targets=[no_such_layer]"], []),  # nothing to fit
    ("floral-synth-mlp", [], []),  # the default q_proj/v_proj targets match nothing in the regressor
    ("split-vision", ["method.body_schedule=round"], []),
    ("fedit-instruct", [], ["--backend", "flower"]),
])
def test_good_edge_cases_pass(preset, overrides, flags, capsys, no_model_loads):
    assert main(["validate", preset, *sets(*overrides), *flags]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", shipped_presets())
def test_every_shipped_preset_passes_validate(name, capsys, no_model_loads):
    assert main(["validate", name]) == 0, capsys.readouterr().err


def test_flower_rules_read_declared_capabilities():
    """A method that steps clients together (but calls no server) is refused on Flower by its `schedule`."""
    cfg = load_config("fedit-instruct")
    lockstep = SimpleNamespace(calls_server=False, schedule="lockstep", supports_selection=True)
    assert [k for k, _ in backend_rules(cfg, lockstep, "flower")] == ["method.name"]
    assert list(backend_rules(cfg, lockstep, "sim")) == []
    from hetfl.flower import check_supported
    from hetfl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^method\.name: fedv makes per-batch server calls"):
        check_supported(load_config("split-vision"))  # no method object needed: built from its factory
    check_supported(cfg)


# ----------------------------------------------------------------------------- facts match the real models


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("model_name,data_name", [
    ("tiny-llama", "synth-instruct"), ("tiny-llama-large", "synth-instruct"), ("tiny-vit", "digits"),
    ("tiny-vit-random", "digits"), ("mlp", "digits"), ("cnn", "digits"), ("linear", "synth-linear"),
    ("mlp", "synth-mlp"), ("bow-mlp", "bbc-news-bow"),
])
def test_facts_match_the_built_model(model_name, data_name):
    from hetfl.errors import ConfigError
    from hetfl.models.facts import model_facts
    from hetfl.models.lora import find_target_modules
    from hetfl.registry import DATASETS

    facts = model_facts(model_name, data_name)
    over = [f"model.name={model_name}", f"data.name={data_name}", "population.num_clients=2",
            "population.clients_per_round=1", "data.clusters=1", "data.samples_per_family=2", "data.eval_samples=4"]
    model = DATASETS.get(data_name)(load_config({}, over)).model
    assert dict(facts.linears) == linear_shapes(model)
    for targets, regex, exclude in [(("q_proj", "v_proj"), None, ()), (("fc1", "classifier"), None, ("blocks.0.fc",)),
                                    ((), r".*\.mlp\..*", ()), (("fc", "hidden"), None, ())]:
        try:  # LoRA's own rule picks the same layers as the facts do
            found = find_target_modules(model, targets, regex, exclude)
        except ConfigError:
            found = []
        assert sorted(facts.targeted(targets, regex, exclude)) == sorted(found)
    if facts.staged:
        assert facts.depth == len(model.blocks)
    elif facts.kind == "causal LM":
        assert facts.depth == model.config.num_hidden_layers and facts.hidden == model.config.hidden_size


def test_local_folders_are_read_from_their_config_json(tmp_path, capsys, no_model_loads):
    """Only config.json is read: a folder without weights is enough to check ranks and cuts."""
    import json

    lm = tmp_path / "my-llama"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100}))
    line = one_line(["validate", "fedit-instruct", *sets(f"model.name={lm}", "lora.rank=20",
                                                         "lora.targets=[k_proj]")], capsys)
    assert line == (f"lora.rank: rank 20 is larger than layer model.layers.0.self_attn.k_proj (32 x 16) of model "
                    f"{lm} (hidden 32); use <= 16")
    vit = tmp_path / "my-vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    line = one_line(["validate", "sflam-vision", *sets(f"model.name={vit}", "method.cut=2")], capsys)
    assert line.startswith(f"method.cut: cut 2 is outside 0..1 (model {vit} has 2 blocks")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line(["validate", "fedit-instruct", *sets(f"model.name={empty}")], capsys)
    assert line == f"model.name: '{empty}' has no config.json (not a Hugging Face model folder)"


def test_smollm2_sizes_are_declared():
    """The optional real model ships as GGUF only: its sizes are declared, checked without the package."""
    from hetfl.models.facts import model_facts

    f = model_facts("smollm2-135m", "synth-instruct")
    assert (f.hidden, f.depth, f.linears["model.layers.29.self_attn.k_proj"]) == (576, 30, (576, 192))


def _methods() -> list[str]:
    from hetfl.registry import METHODS

    return METHODS.names()


@pytest.mark.parametrize("method", _methods())
def test_every_method_x_selection_is_decided_before_a_model_loads(method, no_model_loads):
    """Each method refuses every selection stage or takes all of them, as its object declares."""
    from hetfl.errors import ConfigError
    from hetfl.registry import SELECTORS
    from hetfl.validation import build_method, problems

    for selection in SELECTORS.names():
        try:
            cfg = load_config("split-vision", [f"method.name={method}", f"selection.name={selection}"])
            keys = [key for key, _ in problems(cfg)]
        except ConfigError as e:
            keys = [str(e).split(":")[0]]
        supports = build_method(load_config("split-vision", [f"method.name={method}"])).supports_selection
        assert ("selection.name" in keys) == (selection != "none" and not supports), (method, selection, keys)
