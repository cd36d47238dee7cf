"""Config parsing: every shipped preset loads; bad keys, types and values name the key."""

import pytest

from hetfl.config import Config, dump_config, load_config, parse_override
from hetfl.errors import ConfigError
from hetfl.scenario import build_population
from optional import shipped_presets


@pytest.mark.parametrize("name", shipped_presets())  # optional-package presets skip when absent
def test_every_shipped_preset_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.name == name
    build_population(cfg)
    # the dumped resolved config loads back to the same thing
    import yaml

    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_defaults_and_overrides():
    cfg = load_config({}, ["rounds=3", "train.lr=0.01", "lora.targets=[q_proj]", "population.tiers={laptop: 1}"])
    assert cfg.rounds == 3 and cfg.train.lr == 0.01 and cfg.lora.targets == ("q_proj",)
    assert cfg.population.tiers == {"laptop": 1.0}
    assert cfg.method.name == "fedit" and cfg.method.server_opt == "avg"


def test_float_written_without_a_dot_is_a_number():
    # YAML 1.1 reads `1e-05` as a string; a tuning grid of small rates writes exactly that
    assert load_config({}, ["train.lr=1e-05"]).train.lr == 1e-05


def test_method_swap_drops_options_the_new_method_lacks():
    raw = {"method": {"name": "fedit", "server_opt": "fedadam"}}
    cfg = load_config(raw, ["method.name=fedavg-full"])
    assert cfg.method.name == "fedavg-full" and cfg.method.server_opt == "fedadam"  # shared option kept


BAD = [
    ({"trian": {}}, "trian: unknown key"),
    ({"train": {"lrr": 1}}, "train.lrr: unknown key"),
    ({"train": {"lr": -0.1}}, "train.lr: must be > 0"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
    ({"train": {"lr": "nan"}}, "train.lr: expected a finite number"),
    ({"population": {"availability": "sometimes"}}, "population.availability: 'sometimes' is not one of"),
    ({"population": {"deadline_s": 0}}, "population.deadline_s: must be a positive number"),
    ({"population": {"over_select": 0.5}}, "population.over_select: must be in [1, 10]"),
    ({"server": {"aggregator": "max"}}, "server.aggregator: 'max' is not one of"),
    ({"faults": {"dropout": 1.5}}, "faults.dropout: must be a probability"),
    ({"rounds": 2.5}, "rounds: expected an integer"),
    ({"rounds": True}, "rounds: expected an integer"),
    ({"train": {"optimizer": "adam9"}}, "train.optimizer: 'adam9' is not one of"),
    ({"population": {"num_clients": 4, "clients_per_round": 5}}, "population.clients_per_round: 5 sampled"),
    ({"method": {"name": "fedsomething"}}, "method.name: unknown method 'fedsomething'"),
    ({"method": {"name": "fedit", "bogus": 1}}, "method.bogus: unknown key"),
    ({"lora": {"rank": 0}}, "lora.rank: must be >= 1"),
    ({"data": {"partition": "zipf"}}, "data.partition: 'zipf' is not one of"),
    ({"eval": "often"}, "eval: expected a mapping"),
]


@pytest.mark.parametrize("raw,msg", BAD)
def test_bad_config_names_the_key(raw, msg):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_device_tier_is_an_error():
    cfg = load_config({"population": {"tiers": {"toaster": 1.0}}})
    with pytest.raises(ConfigError, match="population.tiers: unknown device tier 'toaster'"):
        build_population(cfg)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="not a config file or a shipped preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("missing.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rounds: 3\ntrain:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(p)


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=fp16") == ("a", "fp16")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("rounds")


def test_epochs_set_local_steps_from_the_clients_data():
    from hetfl.config import TrainConfig

    t = TrainConfig(local_steps=7, batch_size=4)
    assert [t.steps_for(n) for n in (1, 10, 100)] == [7, 7, 7]  # epochs 0: fixed local_steps
    t = TrainConfig(local_steps=7, batch_size=4, epochs=1)
    assert [t.steps_for(n) for n in (1, 4, 5, 23)] == [1, 1, 2, 6]  # ceil(n / 4)
    assert TrainConfig(batch_size=4, epochs=2.5).steps_for(8) == 5
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config({"train": {"epochs": -1}})


def test_rank_high_above_the_global_rank_fails_validation():
    with pytest.raises(ConfigError, match=r"method.rank_high: 32 exceeds the global rank lora.rank=16"):
        load_config("fslora-instruct", ["method.rank_dist=uniform", "method.rank_high=32"])
    assert load_config("fslora-instruct", ["method.rank_dist=uniform", "method.rank_high=16"]).method.rank_high == 16
