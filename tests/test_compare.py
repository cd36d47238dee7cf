"""Repeated runs: interval and paired-test arithmetic, `hetfl compare --seeds`, resume, `hetfl tune`."""

import csv
import math

import pytest

from hetfl.cli.main import main
from hetfl.config import load_config
from hetfl.scenario import build_scenario
from hetfl.track.rundir import read_metrics
from hetfl.track.stats import higher_is_better, mean_ci, paired_test
from hetfl.track.walltime import without_walls
from hetfl.track.summary import aggregate

# FedIT / FedAvg-full on the shipped synthetic MLP regression (MSE, lower is better): seconds per run.
MLP = ["rounds=2", "population.num_clients=6", "population.clients_per_round=3", "data.client_test_fraction=0",
       "data.clusters=1", "lora.targets=[fc1]", "lora.rank=2", "data.samples_per_family=24", "eval.every=1"]
T975_2 = 4.302652729749464  # Student t, 2 degrees of freedom, 0.975 quantile (tables)
T975_1 = 12.706204736174698


def sets(*items):
    return [a for it in items for a in ("--set", it)]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_mean_ci_is_the_t_interval():
    m, h = mean_ci([1.0, 2.0, 3.0])  # s = 1, n = 3
    assert m == 2.0 and h == pytest.approx(T975_2 / math.sqrt(3), rel=1e-9)
    m, h = mean_ci([4.0, 6.0])  # s = sqrt(2), n = 2
    assert m == 5.0 and h == pytest.approx(T975_1 * math.sqrt(2) / math.sqrt(2), rel=1e-9)
    assert mean_ci([7.5]) == (7.5, 0.0)
    assert mean_ci([3.0, 3.0, 3.0]) == (3.0, 0.0)


def test_paired_test_decides_by_the_interval_of_differences():
    # d = [2, 2, 2.5]: mean 13/6, s = sqrt(1/12), half = t * s / sqrt(3) = 0.7171 < 2.1667 -> decided
    t = paired_test([3.0, 4.0, 5.0], [1.0, 2.0, 2.5])
    assert t.diff_mean == pytest.approx(13 / 6)
    assert t.diff_ci95 == pytest.approx(T975_2 * math.sqrt(1 / 12) / math.sqrt(3))
    assert t.verdict == "better"
    assert paired_test([3.0, 4.0, 5.0], [1.0, 2.0, 2.5], higher_better=False).verdict == "worse"
    # d = [1, -1, 0.5]: the interval straddles 0
    assert paired_test([2.0, 1.0, 1.5], [1.0, 2.0, 1.0]).verdict == "tie"
    assert paired_test([9.0], [1.0]).verdict == "tie"  # one seed never decides
    # Unpaired, the same numbers would overlap: pairing removes the seed's own variance.
    a, b = [10.0, 20.0, 30.0], [9.0, 19.2, 29.1]
    (ma, ha), (mb, hb) = mean_ci(a), mean_ci(b)
    assert ma - ha < mb + hb and paired_test(a, b).verdict == "better"


def test_metric_direction():
    assert higher_is_better("eval_rougeL") and higher_is_better("eval_accuracy")
    assert higher_is_better("eval_client_accuracy_mean")
    for m in ("eval_ppl", "eval_mse", "eval_loss", "eval_client_mse_mean"):
        assert not higher_is_better(m), m


def test_aggregate_pins_means_intervals_and_verdicts():
    def row(method, seed, q, mb):
        return {"run": method, "method": method, "seed": seed, "final_quality_metric": "eval_accuracy",
                "final_quality": q, "mb_up": mb, "rounds": 5}

    groups = {"a": [row("a", s, q, 1.0) for s, q in zip((0, 1, 2), (50.0, 52.0, 54.0))],
              "b": [row("b", s, q, 2.0) for s, q in zip((0, 1, 2), (40.0, 43.0, 44.0))],
              "c": [row("c", s, q, 2.0) for s, q in zip((0, 1, 2), (49.0, 55.0, 51.0))]}
    rows = {r["run"]: r for r in aggregate(groups, baseline="a")}
    assert rows["a"]["seeds"] == 3 and rows["a"]["final_quality_mean"] == 52.0
    assert rows["a"]["final_quality_ci95"] == pytest.approx(round(T975_2 * 2 / math.sqrt(3), 6))
    assert rows["a"]["mb_up_ci95"] == 0.0 and rows["a"]["vs_a"] == "-"
    assert rows["b"]["vs_a"] == "worse" and rows["b"]["diff"] == pytest.approx(-29 / 3, abs=1e-4)
    assert rows["c"]["vs_a"] == "tie"  # d = [-1, 3, -3]
    assert "seed_mean" not in rows["a"] and "rounds_mean" not in rows["a"]


def test_same_seed_same_scenario_draws_for_every_method():
    a = build_scenario(load_config("floral-synth-mlp", [*MLP, "method.name=fedit", "seed=3"]))
    b = build_scenario(load_config("floral-synth-mlp", [*MLP, "method.name=fedavg-full", "seed=3"]))
    c = build_scenario(load_config("floral-synth-mlp", [*MLP, "method.name=fedit", "seed=4"]))
    assert a.population.tiers == b.population.tiers
    assert [[float(x[0].sum()) for x in d] for d in a.client_data] == [[float(x[0].sum()) for x in d] for d in b.client_data]
    assert [[float(x[0].sum()) for x in d] for d in a.client_data] != [[float(x[0].sum()) for x in d] for d in c.client_data]


def test_compare_over_seeds_writes_intervals_verdicts_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "floral-synth-mlp", "--methods", "fedit,fedavg-full", *sets(*MLP), "--seeds", "0,1",
            "--baseline", "fedit", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert max(len(line) for line in printed.splitlines()) <= 100
    assert "fedavg-full" in printed and "vs fedit" in printed
    rows = {r["run"]: r for r in read_csv(out / "summary.csv")}
    assert set(rows) == {"fedit", "fedavg-full"} and rows["fedit"]["seeds"] == "2"
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 4
    for label in rows:  # the summary's mean and interval are those of the per-seed runs
        mse = [float(r["eval_mse"]) for r in runs if r["run"] == label]
        m, h = mean_ci(mse)
        assert float(rows[label]["eval_mse_mean"]) == pytest.approx(m, abs=1e-6)
        assert float(rows[label]["eval_mse_ci95"]) == pytest.approx(h, abs=1e-6)
    assert rows["fedavg-full"]["vs_fedit"] in ("better", "worse", "tie") and rows["fedit"]["vs_fedit"] == "-"
    assert (out / "compare.png").stat().st_size > 0
    # same seed: both methods sampled the same clients on the same tiers
    for s in (0, 1):
        pick = [[(r["round"], r["client"], r["tier"]) for r in read_csv(out / m / f"seed-{s}" / "clients.csv")]
                for m in ("fedit", "fedavg-full")]
        assert pick[0] == pick[1]

    # Without --resume the folder is protected; with it, finished runs are kept and a new seed runs.
    assert main(args) == 2
    kept = (out / "fedit" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns
    assert main([*args[:-6], "--seeds", "0,1,2", "--baseline", "fedit", "--out", str(out), "--resume"]) == 0
    assert (out / "fedit" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns == kept
    assert read_csv(out / "summary.csv")[0]["seeds"] == "3"


def test_compare_resume_continues_a_killed_run(tmp_path, capsys):
    from hetfl.runner import run_experiment

    out = tmp_path / "cmp"
    cfg = load_config("floral-synth-mlp", [*MLP, "method.name=fedit", "seed=0", "rounds=3"])

    def kill_after_round_1(m):
        if m["round"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out / "fedit" / "seed-0", on_round=kill_after_round_1)
    assert len(read_metrics(out / "fedit" / "seed-0" / "metrics.jsonl")) == 1
    assert main(["compare", "floral-synth-mlp", "--methods", "fedit", *sets(*MLP, "rounds=3"),
                 "--out", str(out), "--resume"]) == 0
    resumed = without_walls(read_metrics(out / "fedit" / "seed-0" / "metrics.jsonl"))
    fresh = without_walls(run_experiment(cfg, None))
    assert [r["round"] for r in resumed] == [1, 2, 3] and resumed == fresh


def test_validation_split_is_disjoint_from_training_and_eval(tmp_path):
    cfg = load_config("fedit-instruct", ["population.num_clients=4", "population.clients_per_round=2", "data.samples_per_family=4",
                                         "data.eval_samples=6", "eval.split=validation", "eval.val_fraction=0.25"])
    plain = build_scenario(load_config("fedit-instruct", ["population.num_clients=4", "population.clients_per_round=2", "data.samples_per_family=4",
                                                          "data.eval_samples=6"]))
    sc = build_scenario(cfg)

    def key(sample):
        return tuple(sample[0].tolist()) if hasattr(sample[0], "tolist") else repr(sample)

    train = {key(s) for d in sc.client_data for s in d}
    val = [key(s) for s in sc.validation]
    before = sum(len(d) for d in plain.client_data)
    assert len(val) + len(train) == before  # every held-out sample came out of some client's training data
    assert not set(val) & train
    evals = {key(s) for s in sc.task._eval_encoded}
    assert not set(val) & evals
    for d_plain, d in zip(plain.client_data, sc.client_data):
        assert len(d_plain) - len(d) == min(max(1, round(len(d_plain) * 0.25)), len(d_plain) - 1)


def test_validation_split_of_a_personalised_scenario_replaces_the_client_test_splits():
    over = ["data.samples_per_family=20", "population.num_clients=4", "population.clients_per_round=2"]
    test = build_scenario(load_config("floral-synth-mlp", over))
    val = build_scenario(load_config("floral-synth-mlp", [*over, "eval.split=validation", "eval.val_fraction=0.25"]))

    def keys(samples):
        return {tuple(s[0].tolist()) for s in samples}

    for c in range(4):  # each client evaluates its own validation share, carved from its training data only
        assert keys(val.client_test[c]) <= keys(test.client_data[c])
        assert not keys(val.client_test[c]) & keys(test.client_test[c])
        assert not keys(val.client_test[c]) & keys(val.client_data[c])
        assert len(val.client_test[c]) == round(len(test.client_data[c]) * 0.25)
    assert len(val.validation) == sum(len(v) for v in val.client_test)


def test_tune_selects_on_validation_and_run_uses_the_choice(tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["tune", "floral-synth-mlp", "--method", "fedit", *sets(*MLP), "--grid", "train.lr=[0.0001,0.3]",
            "--seeds", "0,1", "--out", str(out)]
    assert main(args) == 0
    table = read_csv(out / "tune.csv")
    assert [float(r["train.lr"]) for r in table] == [0.0001, 0.3]
    means = [float(r["val_mse_mean"]) for r in table]
    best = [0.0001, 0.3][means.index(min(means))]  # lower validation MSE wins
    import yaml

    assert yaml.safe_load((out / "tuned.yaml").read_text()) == {"fedit": {"train.lr": best}}
    # the validation runs never evaluated the test set: their config says so and has no round-0 eval
    run_cfg = yaml.safe_load((out / "train.lr=0.0001" / "seed-0" / "config.yaml").read_text())
    assert run_cfg["eval"]["split"] == "validation"
    assert [r["round"] for r in read_metrics(out / "train.lr=0.0001" / "seed-0" / "metrics.jsonl")] == [1, 2]
    capsys.readouterr()
    assert main(["validate", "floral-synth-mlp", *sets(*MLP), "--print"]) == 0
    code = main(["run", "floral-synth-mlp", *sets(*MLP, "method.name=fedit"), "--set-file", str(out / "tuned.yaml"),
                 "--out", str(tmp_path / "r")])
    assert code == 0
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["lr"] == best
    capsys.readouterr()
    code = main(["run", "floral-synth-mlp", *sets(*MLP, "method.name=ditto"), "--set-file", str(out / "tuned.yaml"),
                 "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert code == 2 and "no values for method 'ditto'" in err and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("args,msg", [
    (["--seeds", "0,0"], "--seeds 0,0: seeds must be distinct"),
    (["--seeds", "x"], "--seeds x: expected a count"),
    (["--baseline", "nope"], "--baseline: 'nope' is not one of the compared runs"),
    (["--tune", "train.lr=0.1"], "--tune train.lr=0.1: expected key.path=[v1, v2, ...]"),
])
def test_compare_bad_arguments_are_one_line(args, msg, tmp_path, capsys):
    code = main(["compare", "floral-synth-mlp", "--methods", "fedit", *sets(*MLP), *args, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0]
    assert not (tmp_path / "c").exists()


def test_jobs_run_the_same_runs_in_worker_processes(tmp_path, capsys):
    args = ["compare", "floral-synth-mlp", "--methods", "fedit,fedavg-full", *sets(*MLP), "--seeds", "0,1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = read_csv(tmp_path / "one" / "runs.csv"), read_csv(tmp_path / "two" / "runs.csv")
    assert len(one) == 4
    for a, b in zip(one, two):
        assert a["run"] == b["run"] and a["seed"] == b["seed"]
        for k in ("eval_mse", "mb_up", "sim_time_s", "energy_j"):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6), k


def test_per_method_values_apply_to_their_method_only():
    raw = {"lora": {"rank": 16}, "method": {"name": "fslora"}, "per_method": {"fedit": {"lora.rank": 4}}}
    assert load_config(raw).lora.rank == 16
    assert load_config(raw, ["method.name=fedit"]).lora.rank == 4
    assert load_config(raw, ["method.name=fedit", "lora.rank=8"]).lora.rank == 8  # an explicit --set wins
    from hetfl.errors import ConfigError

    with pytest.raises(ConfigError, match="per_method.fedfoo: unknown method"):
        load_config({"per_method": {"fedfoo": {"lora.rank": 4}}})
