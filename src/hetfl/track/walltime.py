"""Names of the per-round wall-clock timings the round loop writes into metrics.jsonl.

They end in `_wall_s` so that comparisons of two runs (resume, client order, Flower vs simulator)
can drop them: they are measured on this machine, not computed, and differ between reruns. They
are not the simulated times (`round_time_s`, `sim_time_s`), which come from the cost model.
"""

ROUND_WALL = "round_wall_s"  # the whole round: sampling to the end of its evaluation (not the checkpoint write)
COMPUTE_WALL = "compute_wall_s"  # the backend's run_round: the clients' work (and their messages)
AGGREGATE_WALL = "aggregate_wall_s"  # the server after the replies: checks, costs, aggregate, report
EVALUATE_WALL = "evaluate_wall_s"  # evaluation (0 in rounds that do not evaluate); not `eval_*`: no quality metric


def without_walls(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock timings: what two runs of one config must share."""
    return [{k: v for k, v in r.items() if not k.endswith("_wall_s")} for r in rows]
