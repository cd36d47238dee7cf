"""The round loop, written once: sample -> configure -> client_update -> aggregate -> evaluate
-> checkpoint. It never knows which method runs; methods fill in the hooks of engine/api.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hetfl.config import Config, dump_config
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS
from hetfl.engine.fleet import (DROPPED, OK, REJECTED, Fleet, account_round, check_replies, client_by_kind,
                                dropped_bytes, fleet_active, fleet_stats, merge_by_kind, round_costs)
from hetfl.seeding import generator
from hetfl.engine.link import DOWN, UP, Ledger, Link
from hetfl.engine.sim import SimulatedBackend
from hetfl.errors import ConfigError
from hetfl.eval.metrics import EVAL_CLIENT_N, EVAL_N
from hetfl.system.memory import fits
from hetfl.track.walltime import AGGREGATE_WALL, COMPUTE_WALL, EVALUATE_WALL, ROUND_WALL

MIB = 2**20  # memory is reported in MiB, like the device profiles


def sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    """Uniform sampling without replacement, seeded by (seed, round) only."""
    perm = torch.randperm(num_clients, generator=generator(seed, rnd, "sample"))
    return sorted(perm[:per_round].tolist())


@dataclass
class Totals:
    """Cumulative counters carried across rounds (and checkpoints)."""

    bytes_up: int = 0
    bytes_down: int = 0
    sim_time_s: float = 0.0  # the rounds' durations, summed
    energy_j: float = 0.0
    flops: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    clock_s: float = 0.0  # the simulated clock: round durations plus waits for clients to come online


def build_selector(cfg: Config):
    """The configured data-selection stage, or None for `selection.name: none`."""
    from hetfl.registry import SELECTORS

    return SELECTORS.get(cfg.selection.name, "selection.name").factory(cfg, cfg.selection)


def plan_population(method, scenario) -> tuple[dict[int, dict], dict[int, int]]:
    """Ask the method for each client's knobs and memory need; refuse clients that do not fit."""
    knobs, mem = {}, {}
    pop = scenario.population
    for cid in range(len(pop)):
        dev = pop.device(cid)
        knobs[cid], mem[cid] = method.plan(cid, dev)
        if not fits(mem[cid], dev):
            raise ConfigError(
                f"population.tiers: client {cid} (tier {pop.tiers[cid]}, {dev.mem_mb:g} MiB) needs an estimated "
                f"{mem[cid] / MIB:.1f} MiB to train; use a smaller model, rank or batch size, or remove the tier"
            )
    return knobs, mem


def run_rounds(scenario, method, rundir=None, *, on_round: Callable[[dict], None] | None = None,
               resume: bool = False, order: str = "sorted", backend: Callable | None = None,
               on_client: Callable[[int, int, int], None] | None = None, workers: int = 1,
               build: Callable | None = None, pool: Callable | None = None) -> list[dict[str, Any]]:
    """Run a whole federated training and return the per-round metrics.

    Args:
        scenario: the built scenario.
        method: a Method instance for `scenario.cfg.method`.
        rundir: a RunDir to write outputs and checkpoints to, or None (in-memory).
        on_round: callback receiving each round's metrics (progress display).
        resume: continue from `rundir`'s last checkpoint.
        order: client execution order in the simulator (results do not depend on it).
        backend: `backend(scenario, method, link, selector)` -> the object that runs each round's
            clients (`run_round(rnd, down, knobs, mem) -> (replies, contexts)`, plus the dicts
            `client_states` and `flop_cache` that checkpoints keep); None: the in-process
            SimulatedBackend. hetfl.flower.backend.FlowerBackend runs the same round on Flower.
        on_client: `on_client(rnd, done, total)`, called by the simulator as a round starts (done 0)
            and after each client's update (progress display); a backend without an `on_client`
            attribute reports no clients.
        workers: the simulator's worker processes for a round's clients (engine/workers.py);
            results do not depend on it. 1: every client in this process.
        build: with `workers` > 1, how each worker builds the run (`hetfl.runner.build_run`).
        pool: `pool(cfg, workers, build)` -> workers elsewhere (a `RayPool`); see SimulatedBackend.

    Each round's metrics carry its wall-clock split (track/walltime.py): the whole round, the
    backend's client work, the server's work on the replies and the evaluation.
    """
    from hetfl.system.cost import round_time

    cfg: Config = scenario.cfg
    ledger = Ledger()
    link = Link(cfg.comm.up, cfg.comm.down, ledger, cfg.seed, by_kind=cfg.comm.by_kind)
    selector = build_selector(cfg)
    wireless = None
    if cfg.wireless.enabled:
        from hetfl.system.cost import WirelessCost

        wireless = WirelessCost(cfg.wireless, scenario.channels)
    if backend is None:
        backend = SimulatedBackend(scenario, method, link, order=order, selector=selector, on_client=on_client,
                                   workers=workers, build=build, pool=pool)
    else:
        backend = backend(scenario, method, link, selector)
        if on_client is not None and hasattr(backend, "on_client"):
            backend.on_client = on_client
    try:
        state = method.setup(scenario)
        knobs, mem = plan_population(method, scenario)
        totals, history, start = Totals(), [], 1

        if resume:
            ck = rundir.load_checkpoint()
            state, backend.client_states, totals = ck["state"], ck["client_states"], ck["totals"]
            start = ck["round"] + 1
            # The cache of already-counted shapes only saves time (a counted step gives the same
            # numbers, engine/flops.py); it is checkpointed so a resumed run counts no shape twice.
            backend.flop_cache.update(ck.get("flop_cache", {}))
            history = [r for r in _read_history(rundir)]
        else:
            if rundir is not None:
                rundir.open()
                rundir.write_config(dump_config(cfg))
            if cfg.eval.at_start:
                t_eval = time.perf_counter()
                m = {"round": 0, **_zero_round(totals), **evaluate(scenario, method, state, backend.client_states)}
                m[EVALUATE_WALL] = time.perf_counter() - t_eval
                _emit(m, [], rundir, history, on_round)

        fleet = Fleet(cfg, scenario, backend) if fleet_active(cfg) else None
        buffered = None
        if cfg.server.mode == "async":  # FedBuff: one loop round is one server step (engine/asyncfl.py)
            from hetfl.engine.asyncfl import Buffered

            buffered = Buffered(cfg, scenario, method, link, ledger, backend, wireless, knobs, mem, fleet)
            if resume:
                buffered.inflight = ck.get("inflight", [])

        def close_round(rnd: int, state, m: dict[str, Any], rows: list[dict[str, Any]], t0: float) -> None:
            """Evaluate, log and checkpoint the round (which started at perf_counter `t0`)."""
            t_eval = time.perf_counter()
            if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
                m.update(evaluate(scenario, method, state, backend.client_states))
            m[EVALUATE_WALL] = time.perf_counter() - t_eval
            ledger.drop_round(rnd)
            link.reset_round(rnd)
            m[ROUND_WALL] = time.perf_counter() - t0  # the checkpoint written after the log is not counted
            _emit(m, rows, rundir, history, on_round)
            if rundir is not None and (rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds):
                ck = {"round": rnd, "state": state, "client_states": backend.client_states, "totals": totals,
                      "flop_cache": backend.flop_cache}
                if buffered is not None:
                    ck["inflight"] = buffered.inflight
                rundir.save_checkpoint(ck)

        for rnd in range(start, cfg.rounds + 1):
            t0 = time.perf_counter()
            if buffered is not None:
                state, m, rows = buffered.step(rnd, state, totals)  # it measures its own compute / aggregate split
                close_round(rnd, state, m, rows, t0)
                continue
            if fleet is None:
                cids = sample_clients(cfg.seed, rnd, scenario.num_clients, cfg.population.clients_per_round)
            else:
                cids = fleet.sample(rnd, totals)
            down = method.configure(state, rnd, cids)
            link.clear_codecs()  # per-client codec choices (e.g. each device's activation bits) hold for one round
            for cid, kinds in method.codecs(rnd, cids).items():
                for kind, codec in kinds.items():
                    link.set_codec(cid, kind, codec)
            if fleet is not None:
                fleet.keep_states(cids)
            t_compute = time.perf_counter()
            replies, ctxs = backend.run_round(rnd, down, knobs, mem)
            t_replies = time.perf_counter()
            if fleet is not None:
                replies = fleet.tamper(rnd, replies)
            rejected = check_replies(rnd, method, replies, down, knobs)
            # The server's view of the round's timing comes first (the server FLOPs and radio of a split
            # method come from the round's client work); what it aggregates depends on it.
            pre = method.report(state, rnd, cids)
            ups = {c: ledger.bytes(rnd=rnd, cid=c, direction=UP) for c in cids}
            downs = {c: ledger.bytes(rnd=rnd, cid=c, direction=DOWN) for c in cids}
            # A sequential method (SplitFed V2, vanilla SL) serves clients one at a time: each waits for
            # the previous ones, alone on the server.
            sequential = method.schedule == "sequential"
            costs = round_costs(scenario, wireless, cids, ctxs, ups, downs, pre, sequential)
            if fleet is None:
                status = {c: REJECTED if c in rejected else OK for c in cids}
                t_round, share, finish = round_time(costs.values(), sequential=sequential), {}, {}
            else:
                order = method.client_order(rnd, sorted(cids)) if sequential else sorted(cids)
                st = fleet.settle(rnd, order, costs, set(rejected), totals, sequential)
                status, t_round, share, finish = st.status, st.t_round, st.share, st.finish_s
            accepted = {c: r for c, r in replies.items() if status[c] == OK}
            if accepted:  # else every sampled client dropped, was late or was rejected: the model stays
                state = method.aggregate(state, rnd, accepted)
            report = method.report(state, rnd, cids)
            if fleet is not None:
                fleet.restore_states([c for c in cids if status[c] != OK])
                # a dropped client sent its download and `share` of its per-batch traffic, not its reply
                by_client = {c: client_by_kind(ledger, rnd, c) for c in cids}
                for c in cids:
                    if status[c] == DROPPED:
                        ups[c], downs[c], by_client[c] = dropped_bytes(
                            ledger, rnd, c, share[c], (replies[c].kind or "update") if c in replies else None,
                            down[c].kind or "model")

            rows, spent = [], {}
            for cid in cids:
                ctx, up, dn, c = ctxs[cid], ups[cid], downs[cid], costs[cid]
                part = share.get(cid, 1.0)  # a dropped client spent this share of its work
                spent[cid] = (c.energy_j, ctx.flops) if part == 1.0 else (part * c.energy_j, part * ctx.flops)
                meta = replies[cid].meta if cid in replies else {}  # absent: skipped (empty coreset)
                rows.append({
                    "round": rnd, "client": cid, "tier": scenario.population.tiers[cid],
                    "rank": meta.get("rank", ctx.knobs.get("rank", "")),
                    "num_examples": meta.get(NUM_EXAMPLES, 0),
                    "train_loss": round(float(meta.get(TRAIN_LOSS, float("nan"))), 6),
                    "bytes_up": up, "bytes_down": dn, "flops": int(spent[cid][1]), "t_comp_s": c.t_comp,
                    "t_up_s": c.t_up, "t_down_s": c.t_down, "t_server_s": c.t_server,
                    "sim_time_s": finish.get(cid, c.time_s), "energy_j": spent[cid][0],
                    "mem_mb": round(ctx.mem_bytes / MIB, 3), "status": status[cid], "reason": rejected.get(cid, ""),
                    **report.client_rows.get(cid, {}),  # e.g. the allocation
                })
            method.observe(state, rnd, costs)  # e.g. adaptive per-client budgets from observed cost
            up_r, dn_r = sum(ups.values()), sum(downs.values())
            energy_r = sum(e for e, _ in spent.values())
            flops_r = sum(f for _, f in spent.values())
            totals.clock_s += t_round
            by_kind = ({f"{d}:{k}": b for (d, k), b in sorted(ledger.by_kind(rnd).items())}
                       if fleet is None else merge_by_kind(by_client.values()))
            m = account_round(totals, rnd, accepted, up_r, dn_r, t_round, energy_r, flops_r,
                              max(ctxs[c].mem_bytes for c in cids), by_kind)
            if fleet is not None or rejected:
                m.update(fleet_stats(cids, status, ups, downs, spent, totals))
            if selector is not None:
                local = sum(ctxs[c].local_total for c in cids)
                m["data_fraction"] = sum(len(ctxs[c].data) for c in cids) / local if local else 0.0
                m["coreset_size"] = sum(len(ctxs[c].data) for c in cids)
                m["selection_flops"] = sum(ctxs[c].selection_flops for c in cids)
                # Clients select in parallel: the stage's simulated compute time is the slowest client's.
                m["selection_time_s"] = max(ctxs[c].selection_flops / ctxs[c].device.flops_per_s for c in cids)
                m["clients_trained"] = len(accepted)
            m.update(report.stats)  # method-specific numbers (server FLOPs, chosen ranks, ...)
            m[COMPUTE_WALL], m[AGGREGATE_WALL] = t_replies - t_compute, time.perf_counter() - t_replies
            # Aggregated: free the replies (a full-model delta each with Ditto or FedAvg) now, not when the
            # next round's have all arrived, so a round's peak holds one cohort of replies, not two.
            del replies, accepted
            close_round(rnd, state, m, rows, t0)
        if rundir is not None:
            method.export(state, rundir.path)
        return history
    finally:
        if hasattr(backend, "close"):
            backend.close()  # its worker processes, if any


def evaluate(scenario, method, state, client_states: dict[int, dict]) -> dict[str, float]:
    """Global evaluation on the server's held-out set, plus per-client evaluation on each
    client's own test split when the scenario has them (run on the client; only the numbers
    travel). Personalised methods override `client_eval_model(state, cid, client_state)`."""
    if scenario.validation is not None:  # tuning: the validation share of the clients' data, never the test set
        out = scenario.task.evaluate(method.eval_model(state), scenario.validation)
    else:
        out = scenario.task.evaluate(method.eval_model(state))
    tests = scenario.client_test
    if not tests or not any(tests):
        return out
    per: dict[str, list[float]] = {}
    for cid, samples in enumerate(tests):
        if not samples:
            continue
        model = method.client_eval_model(state, cid, client_states.get(cid, {}))
        for k, v in scenario.task.evaluate(model, samples).items():
            if isinstance(v, (int, float)):  # per-family dicts stay a global-evaluation detail
                per.setdefault(k, []).append(v)
    if EVAL_N in per:  # items scored over all clients' test splits: a total, not a mean
        out[EVAL_CLIENT_N] = int(sum(per.pop(EVAL_N)))
    for k, vs in per.items():
        t = torch.tensor(vs, dtype=torch.float64)
        name = k.removeprefix("eval_")
        out[f"eval_client_{name}_mean"] = float(t.mean())
        out[f"eval_client_{name}_std"] = float(t.std(unbiased=False))
    return out


def _zero_round(t: Totals) -> dict[str, Any]:
    return {"bytes_up": 0, "bytes_down": 0, "bytes_up_total": t.bytes_up, "bytes_down_total": t.bytes_down,
            "sim_time_s": t.sim_time_s, "energy_j": t.energy_j, "flops_total": t.flops}


def _emit(m, rows, rundir, history, on_round) -> None:
    history.append(m)
    if rundir is not None:
        rundir.log_round(m, rows)
    if on_round is not None:
        on_round(m)


def _read_history(rundir) -> list[dict]:
    from hetfl.track.rundir import read_metrics

    return read_metrics(rundir.metrics_path)
