"""One FedAvg-over-LoRA workload through hetfl, a bare PyTorch loop and Flower's simulation engine.

The workload: tiny-llama with FedIT's rank-8 LoRA, 20 clients, 5 rounds x 10 clients x 5 local
steps (batch 8, AdamW at the preset's rate), no evaluation. Every system builds the same model and
client data with hetfl's scenario builder and trains a client with the same function
(`methods/common.py` `local_train`, the same seeded batches), so what differs is the
orchestration: hetfl's round loop, link, ledger and workers; a plain loop over the sampled
clients in one process (`bare`: torch's default threads; `bare-1t`: one thread, as hetfl runs a
client update); Flower's simulation engine (`flwr[simulation]`,
Ray, one-CPU ClientApps on `--flower-cpus` CPUs) with its FedAvg strategy (it samples its own 10
clients each round; the amount of work is the same).

Each system runs in a fresh subprocess, and the repetitions are interleaved. The benchmark
reports the median over repetitions of:
- per-round wall time (median over rounds 2..R; round 1 includes warm-up);
- whole-run wall time, from the subprocess's start (imports included) to its exit;
- time from the subprocess's start to the first client's first local step.

pfl-research (`pfl==0.6.0`) installs next to torch 2.13.0 (`make setup-bench`), but no pfl
adapter is written yet, so it is not measured.

    python benchmarks/vs_peers.py [--reps 3] [--workers 2] [--clients 20]

Last line: `hetfl_over_flower_round=<ratio> hetfl_over_bare_round=<ratio>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS, PER_ROUND_SHARE, STEPS = 5, 0.5, 5


def overrides(clients: int) -> list[str]:
    return [f"population.num_clients={clients}", f"population.clients_per_round={max(1, int(clients * PER_ROUND_SHARE))}",
            f"rounds={ROUNDS}", f"train.local_steps={STEPS}", "eval.at_start=false", f"eval.every={10 * ROUNDS}",
            "data.eval_samples=8", "eval.max_new_tokens=1", "population.tiers={laptop: 1}"]


def since_start() -> float:
    return time.time() - float(os.environ["VS_T0"])


def report(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


# ----------------------------------------------------------------------------- the systems (children)


def build(clients: int):
    from hetfl.config import load_config
    from hetfl.runner import build_run

    cfg = load_config("fedit-instruct", overrides(clients))
    scenario, method = build_run(cfg)
    method.setup(scenario)
    return cfg, scenario, method


def train_one(cfg, scenario, method, rnd: int, cid: int, tensors: dict) -> tuple[dict, int]:
    """One client's local steps from `tensors`: its new adapter and sample count."""
    from hetfl.engine.client import client_context
    from hetfl.methods.common import copy_into, local_train

    params = method.trainable(scenario.model)
    copy_into(params, tensors)
    ctx = client_context(scenario, rnd, cid, {}, 0, {}, {})
    local_train(ctx, list(params.values()), cfg)
    return {k: p.detach().clone() for k, p in params.items()}, len(ctx.data)


def child_bare(clients: int, threads: int | None) -> None:
    import torch

    from hetfl.engine.loop import sample_clients

    if threads:
        torch.set_num_threads(threads)

    cfg, scenario, method = build(clients)
    glob = {k: p.detach().clone() for k, p in method.trainable(scenario.model).items()}
    first, walls = None, []
    for rnd in range(1, ROUNDS + 1):
        t = time.perf_counter()
        total, acc = 0, {k: 0.0 * v for k, v in glob.items()}
        for cid in sample_clients(cfg.seed, rnd, clients, cfg.population.clients_per_round):
            first = first if first is not None else since_start()
            new, n = train_one(cfg, scenario, method, rnd, cid, glob)
            total += n
            for k in acc:
                acc[k] += n * new[k]
        glob = {k: v / total for k, v in acc.items()}
        walls.append(time.perf_counter() - t)
    report(round_walls=walls, first_step_s=first)


def child_hetfl(clients: int, workers: int) -> None:
    from hetfl.config import load_config
    from hetfl.runner import run_experiment

    first = []

    def on_client(rnd, done, total):
        if not first:
            first.append(since_start())

    hist = run_experiment(load_config("fedit-instruct", overrides(clients)), None, report=False, workers=workers,
                          on_client=on_client)
    report(round_walls=[m["round_wall_s"] for m in hist], first_step_s=first[0])


def child_flower(clients: int, cpus: int) -> None:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    mark = Path(os.environ["VS_FIRST"])
    built: dict = {}  # one build per Ray actor (the actors live for the whole simulation)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if "run" not in built:
            built["run"] = build(clients)
        cfg, scenario, method = built["run"]
        if not mark.exists():
            mark.write_text(str(since_start()))
        tensors = {k: v for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        rnd = int(msg.content["config"]["server-round"])
        new, n = train_one(cfg, scenario, method, rnd, int(context.node_config["partition-id"]), tensors)
        content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": n})})
        return Message(content=content, reply_to=msg)

    stamps: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _, scenario, method = build(clients)
        init = {k: p.detach().clone() for k, p in method.trainable(scenario.model).items()}
        strategy = FedAvg(fraction_train=PER_ROUND_SHARE, fraction_evaluate=0.0, min_available_nodes=clients)

        def stamp(rnd, arrays):  # called before round 1 and after every round
            stamps.append(time.perf_counter())
            return None

        strategy.start(grid=grid, initial_arrays=ArrayRecord(init), num_rounds=ROUNDS, evaluate_fn=stamp)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})
    report(round_walls=[b - a for a, b in zip(stamps, stamps[1:])], first_step_s=float(mark.read_text()))


# ----------------------------------------------------------------------------- the parent


def run_child(system: str, args, tmp: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VS_T0": repr(time.time()),
           "VS_FIRST": str(tmp / f"first-{system}-{time.time_ns()}")}
    if system == "flower":
        env["OMP_NUM_THREADS"] = "1"  # the ClientApps run one thread each, like hetfl's workers
    t0 = time.time()
    env["VS_T0"] = repr(t0)
    out = subprocess.run([sys.executable, __file__, "--child", system, str(args.clients), str(args.workers),
                          str(args.flower_cpus)], env=env, capture_output=True, text=True)
    run_s = time.time() - t0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{system}: the run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    walls = r["round_walls"]
    return {"round_s": statistics.median(walls[1:]), "run_s": run_s, "first_s": r["first_step_s"]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        system, clients, workers, cpus = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        if system in ("bare", "bare-1t"):
            child_bare(clients, 1 if system == "bare-1t" else None)
        elif system == "flower":
            child_flower(clients, cpus)
        else:
            child_hetfl(clients, 1 if system == "hetfl-1" else workers)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="hetfl's worker processes (the hetfl-N row)")
    ap.add_argument("--flower-cpus", type=int, default=2, help="CPUs Flower's simulation engine may use")
    ap.add_argument("--clients", type=int, default=20, help="population; half of it is sampled per round")
    ap.add_argument("--systems", default="bare,bare-1t,hetfl-1,hetfl-N,flower")
    args = ap.parse_args()
    systems = args.systems.split(",")
    res: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):  # interleaved: every system once per repetition
            for s in systems:
                res[s].append(run_child(s, args, Path(tmp)))
                print(f"rep {rep + 1}/{args.reps} {s}: {res[s][-1]}", file=sys.stderr, flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("round_s", "run_s", "first_s")} for s, rs in res.items()}
    print(f"{args.clients} clients, {int(args.clients * PER_ROUND_SHARE)} per round, {ROUNDS} rounds x {STEPS} steps; "
          f"medians of {args.reps} interleaved repetitions (hetfl-N: {args.workers} workers)")
    print(f"{'system':<9} {'round_s':>8} {'run_s':>7} {'first_step_s':>12} {'round/hetfl-N':>13} {'run/hetfl-N':>11}")
    ref = med.get("hetfl-N") or med[systems[0]]
    for s in systems:
        m = med[s]
        print(f"{s:<9} {m['round_s']:>8.2f} {m['run_s']:>7.1f} {m['first_s']:>12.1f} "
              f"{m['round_s'] / ref['round_s']:>13.2f} {m['run_s'] / ref['run_s']:>11.2f}")
    if "hetfl-N" in med and "flower" in med and "bare" in med:
        print(f"hetfl_over_flower_round={med['hetfl-N']['round_s'] / med['flower']['round_s']:.3f} "
              f"hetfl_over_bare_round={med['hetfl-1']['round_s'] / med['bare']['round_s']:.3f}"
              + (f" hetfl_over_bare_1t_round={med['hetfl-1']['round_s'] / med['bare-1t']['round_s']:.3f}"
                 if "bare-1t" in med else ""))


if __name__ == "__main__":
    main()
