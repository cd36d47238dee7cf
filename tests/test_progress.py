"""Progress that tells the truth: each round's wall-clock split, the clients done within a round,
the bar's pace, and the summary's split of a round's wall time."""

from __future__ import annotations

import pytest
from test_method_table import measured, table_config

from hetfl.engine.loop import run_rounds
from hetfl.runner import build_run
from hetfl.track.progress import RoundBar, pace
from hetfl.track.summary import format_wall_split, wall_split
from hetfl.track.walltime import AGGREGATE_WALL, COMPUTE_WALL, EVALUATE_WALL, ROUND_WALL

PARTS = (COMPUTE_WALL, AGGREGATE_WALL, EVALUATE_WALL)
EPS = 1e-6  # perf_counter readings taken one after another


def _run(cfg):
    calls: list[tuple[int, int, int]] = []
    sc, method = build_run(cfg)
    history = run_rounds(sc, method, on_client=lambda *a: calls.append(a))
    return history, calls


# ----------------------------------------------------------------------------- the loop's numbers


@pytest.mark.parametrize("name,more", [("fedit", ()),  # parallel clients, one after another
                                       ("fedv", ()),  # lockstep (FedV's shared body step)
                                       ("fedit", ("server.mode=async", "server.concurrency=3", "server.buffer=2"))])
def test_every_round_carries_its_wall_split(name, more):
    history, _ = _run(table_config(name, "eval.at_start=true", "eval.every=2", "rounds=2", *more))
    base, *trained = history
    assert base["round"] == 0 and base[EVALUATE_WALL] > 0 and ROUND_WALL not in base
    for m in trained:
        assert all(m[k] >= 0 for k in (ROUND_WALL, *PARTS)), m
        assert sum(m[k] for k in PARTS) <= m[ROUND_WALL] + EPS
        assert m[COMPUTE_WALL] > 0
    assert trained[0][EVALUATE_WALL] < trained[1][EVALUATE_WALL]  # eval.every 2: round 1 does not evaluate
    # the timings are what reruns and snapshot comparisons drop, and none reads as a quality metric
    assert all(k.endswith("_wall_s") and not k.startswith("eval_") for k in (ROUND_WALL, *PARTS))
    assert not set(measured(trained)[0]) & {ROUND_WALL, *PARTS}


@pytest.mark.parametrize("name", ["fedit", "fedv"])
def test_the_backend_reports_each_client_of_a_round(name):
    history, calls = _run(table_config(name))
    k = 2  # the table's clients per round
    assert calls == [(r, done, k) for r in (1, 2) for done in range(k + 1)]
    assert [m["round"] for m in history] == [1, 2]


def test_async_launches_report_the_clients_they_start():
    history, calls = _run(table_config("fedit", "server.mode=async", "server.concurrency=3", "server.buffer=2",
                                       "rounds=3"))
    for m in history:
        mine = [c for c in calls if c[0] == m["round"]]
        started = [total for _, done, total in mine if done == 0]  # one report per launch, then one per client
        assert sum(started) == m["clients_sampled"] and len(mine) == len(started) + m["clients_sampled"]


# ----------------------------------------------------------------------------- the bar


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pace_is_rounds_per_minute_and_eta_from_the_wall_time_so_far():
    assert pace(0, 10.0, 5) == ""  # nothing measured yet
    assert pace(1.5, 90.0, 8.5) == "1 rounds/min · ETA 0:08:30"  # 1/60 round per second
    assert pace(3, 20.0, 1) == "9 rounds/min · ETA 0:00:07"  # 20/3 s per round, rounded


def test_round_bar_counts_clients_and_only_this_process_rounds():
    clock = Clock()
    bar = RoundBar("run", rounds=4, clock=clock)
    bar({"round": 2, "train_loss": 0.5})  # a resumed run: its rounds 1-2 ran before this process
    assert bar.where() == "round 2/4" and bar.pace() == ""
    clock.t += 30.0
    bar.on_client(3, 1, 2)
    assert bar.where() == "round 3/4 · clients 1/2" and bar.completed() == 2.5
    assert bar.pace() == "1 rounds/min · ETA 0:01:30"  # half a round in 30 s, 1.5 rounds to go
    clock.t += 30.0
    bar({"round": 3, "train_loss": 0.4})
    assert bar.where() == "round 3/4" and bar.pace() == "1 rounds/min · ETA 0:01:00"
    assert bar.line().startswith("run round 3/4: loss 0.400") and bar.line().endswith("(1 rounds/min · ETA 0:01:00)")
    clock.t += 60.0
    bar({"round": 4})
    clock.t += 600.0  # the summary and report after the last round are no round
    assert bar.where() == "round 4/4" and bar.pace() == "1 rounds/min · ETA 0:00:00"


def test_round_bar_starts_its_clock_at_the_first_round():
    clock = Clock()
    bar = RoundBar("run", rounds=2, clock=clock)
    clock.t += 500.0  # loading the model and evaluating the base model are not a round
    bar({"round": 0})
    clock.t += 60.0
    bar({"round": 1})
    assert bar.pace() == "1 rounds/min · ETA 0:01:00"


# ----------------------------------------------------------------------------- the summary


def test_summary_splits_the_mean_round_into_compute_aggregation_evaluation():
    history = [
        {"round": 0, EVALUATE_WALL: 9.0},  # the base model's evaluation is no round
        {"round": 1, ROUND_WALL: 3.0, COMPUTE_WALL: 2.0, AGGREGATE_WALL: 0.5, EVALUATE_WALL: 0.0},
        {"round": 2, ROUND_WALL: 5.0, COMPUTE_WALL: 2.0, AGGREGATE_WALL: 0.5, EVALUATE_WALL: 2.0},
    ]
    split = wall_split(history)
    # means: round 4, compute 2, aggregation 0.5, evaluation 1, other 4 - 3.5 = 0.5
    assert split == pytest.approx({"rounds": 2, "round_s": 4.0, "compute_s": 2.0, "aggregate_s": 0.5,
                                   "evaluate_s": 1.0, "other_s": 0.5})
    assert format_wall_split(split) == ("wall time per round (mean of 2 rounds): 4 s = compute 2 s (50%) + "
                                        "aggregation 0.5 s (12%) + evaluation 1 s (25%) + other 0.5 s (12%)")
    assert wall_split(history[:1]) is None  # nothing trained (or a run from before the timings)
