"""Buffered asynchronous aggregation (`server.mode: async`) on the simulated clock.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"): up to
`server.concurrency` (C) clients train at once, each from the model version current when it
started; the server applies an update as soon as `server.buffer` (K) replies have arrived, each
reply's update weighted by 1 / sqrt(1 + s) for its staleness s (server steps since its client
started). One loop "round" is one server step. At the start of every step the server tops the
clients in flight up to C, sampling among the online clients not already training, seeded by
(seed, step) like a synchronous round. Client work runs in simulation when a client starts; its
reply waits, in flight, until its simulated finish time.

With C = K = clients_per_round and no stragglers every started client arrives within its own
step, every staleness is 0, and a step is exactly a synchronous FedAvg round (tested).

Only methods whose replies are updates (deltas) that `aggregate` averages can run this way
(`Method.robust_aggregation`); config.py's rules say so up front.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, Message
from hetfl.engine.fleet import (DROPPED, OK, REJECTED, account_round, check_replies, client_by_kind, dropped_bytes,
                                merge_by_kind, round_costs, sample_from)
from hetfl.engine.link import DOWN, UP
from hetfl.track.walltime import AGGREGATE_WALL, COMPUTE_WALL

MIB = 2**20


def staleness_weight(s: int) -> float:
    """FedBuff's weight of an update `s` server steps old."""
    return 1.0 / math.sqrt(1.0 + s)


def scaled(reply: Message, w: float) -> Message:
    """The reply with its floating tensors (the update) multiplied by `w`; index tensors untouched."""
    return replace(reply, tensors={k: (t * w if t.is_floating_point() else t) for k, t in reply.tensors.items()})


@dataclass
class Job:
    """One client's work in flight: started at step `launched`, done (or dropped) at `end_s`."""

    cid: int
    launched: int
    end_s: float
    status: str  # ok (pending aggregation) | dropped | rejected
    reply: Message | None
    row: dict[str, Any]  # its clients.csv fields, known when it started
    up: int
    down: int
    energy_j: float
    flops: float
    saved: Any = None  # its private state before it started (restored if it fails)
    had_state: bool = False
    mem_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Buffered:
    """The asynchronous server: `step(rnd, state, totals)` runs one server step."""

    def __init__(self, cfg, scenario, method, link, ledger, backend, wireless, knobs, mem, fleet):
        self.cfg, self.scenario, self.method, self.link, self.ledger = cfg, scenario, method, link, ledger
        self.backend, self.wireless, self.knobs, self.mem, self.fleet = backend, wireless, knobs, mem, fleet
        k = cfg.population.clients_per_round
        self.concurrency = cfg.server.concurrency or k
        self.buffer = cfg.server.buffer or k
        self.inflight: list[Job] = []  # checkpointed with the run
        self.compute_wall_s = 0.0  # this step's wall seconds inside the backend's run_round

    def launch(self, rnd: int, state, clock: float, exclude: set[int]) -> list[int]:
        """Start clients until C are in flight: their work runs now, their replies wait."""
        n = self.scenario.num_clients
        busy = {j.cid for j in self.inflight} | exclude
        avail = self.fleet.avail
        eligible = [c for c in range(n) if c not in busy and (avail is None or avail.online(c, clock))]
        free = self.concurrency - len(self.inflight)
        cids = sample_from(self.cfg.seed, rnd, eligible, max(0, min(free, len(eligible))))
        if not cids:
            return []
        method, link, ledger = self.method, self.link, self.ledger
        down = method.configure(state, rnd, cids)
        link.clear_codecs()
        for cid, kinds in method.codecs(rnd, cids).items():
            for kind, codec in kinds.items():
                link.set_codec(cid, kind, codec)
        states = self.backend.client_states
        saved = {c: copy.deepcopy(states[c]) for c in cids if c in states}
        t_run = time.perf_counter()
        replies, ctxs = self.backend.run_round(rnd, down, self.knobs, self.mem)
        self.compute_wall_s += time.perf_counter() - t_run
        replies = self.fleet.tamper(rnd, replies)
        rejected = check_replies(rnd, method, replies, down, self.knobs)
        pre = method.report(state, rnd, cids)
        ups = {c: ledger.bytes(rnd=rnd, cid=c, direction=UP) for c in cids}
        downs = {c: ledger.bytes(rnd=rnd, cid=c, direction=DOWN) for c in cids}
        costs = round_costs(self.scenario, self.wireless, cids, ctxs, ups, downs, pre, False)
        for c in cids:
            fate, ctx, cost = self.fleet.fates.get(c), ctxs[c], costs[c]
            t = cost.time_s * (fate.slowdown if fate is not None else 1.0)
            cut = math.inf
            if fate is not None and fate.drop_at is not None:
                cut = fate.drop_at * t
            if avail is not None:
                cut = min(cut, avail.offline_at(c, clock) - clock)
            up, dn, share, status = ups[c], downs[c], 1.0, (REJECTED if c in rejected else OK)
            by = client_by_kind(ledger, rnd, c)
            if c not in replies:  # no data to train on (empty coreset): it sends nothing
                status = DROPPED
                cut = 0.0
            if cut < t:  # it sent its download and `share` of its per-batch traffic, not its reply
                status, share = DROPPED, (max(cut, 0.0) / t if t > 0 else 0.0)
                up, dn, by = dropped_bytes(ledger, rnd, c, share, (replies[c].kind or "update") if c in replies
                                           else None, down[c].kind or "model")
                t = max(cut, 0.0)
            meta = replies[c].meta if c in replies else {}
            row = {
                "client": c, "tier": self.scenario.population.tiers[c],
                "rank": meta.get("rank", ctx.knobs.get("rank", "")), "num_examples": meta.get(NUM_EXAMPLES, 0),
                "train_loss": round(float(meta.get(TRAIN_LOSS, float("nan"))), 6),
                "bytes_up": up, "bytes_down": dn, "t_comp_s": cost.t_comp, "t_up_s": cost.t_up,
                "t_down_s": cost.t_down, "t_server_s": cost.t_server, "sim_time_s": t,
                "mem_mb": round(ctx.mem_bytes / MIB, 3), "reason": rejected.get(c, ""),
            }
            energy, flops = (cost.energy_j, ctx.flops) if share == 1.0 else (share * cost.energy_j, share * ctx.flops)
            self.inflight.append(Job(c, rnd, clock + t, status, replies.get(c), row, up, dn, energy, flops,
                                     saved.get(c), c in saved, ctx.mem_bytes, {"by_kind": by}))
        ledger.drop_round(rnd)  # each job keeps its own bytes; the next launch of this step starts clean
        link.reset_round(rnd)
        return cids

    def step(self, rnd: int, state, totals) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
        """One server step: top up, wait for K valid replies, apply their staleness-weighted mean."""
        t0, wall0, self.compute_wall_s = totals.clock_s, time.perf_counter(), 0.0
        started = self.launch(rnd, state, totals.clock_s, set())
        tried = set(started)
        buffer: dict[int, Job] = {}
        settled: list[Job] = []
        while len(buffer) < self.buffer:
            if not self.inflight:  # everyone in flight failed: start more at the current clock
                more = self.launch(rnd, state, totals.clock_s, tried)
                if not more and self.fleet.avail is not None:
                    everyone = [c for c in range(self.scenario.num_clients) if c not in tried]
                    t = self.fleet.avail.next_online(totals.clock_s, everyone)
                    if math.isfinite(t):
                        totals.clock_s = t
                        more = self.launch(rnd, state, totals.clock_s, tried)
                if not more:
                    break  # nobody left to try this step: apply what arrived
                tried |= set(more)
                started += more
                continue
            j = min(self.inflight, key=lambda j: (j.end_s, j.cid))
            self.inflight.remove(j)
            totals.clock_s = max(totals.clock_s, j.end_s)
            settled.append(j)
            if j.status == OK:
                buffer[j.cid] = j
        replies = {}
        for c in sorted(buffer):
            j = buffer[c]
            s = rnd - j.launched
            replies[c] = j.reply if s == 0 else scaled(j.reply, staleness_weight(s))
        if replies:  # else nothing valid arrived this step: the model stays
            state = self.method.aggregate(state, rnd, replies)
        report = self.method.report(state, rnd, sorted(buffer))
        states = self.backend.client_states
        for j in settled:
            if j.status != OK:  # a failed client keeps its private state unchanged
                if j.had_state:
                    states[j.cid] = j.saved
                else:
                    states.pop(j.cid, None)
        rows = [{"round": rnd, **j.row, "sim_time_s": j.end_s - t0,  # its arrival, from the step's start
                 "flops": int(j.flops), "energy_j": j.energy_j, "status": j.status,
                 "staleness": rnd - j.launched, **report.client_rows.get(j.cid, {})}
                for j in sorted(settled, key=lambda j: (j.end_s, j.cid))]
        t_round = totals.clock_s - t0
        up_r, dn_r = sum(j.up for j in settled), sum(j.down for j in settled)
        energy_r, flops_r = sum(j.energy_j for j in settled), sum(j.flops for j in settled)
        m = account_round(totals, rnd, {c: j.reply for c, j in buffer.items()}, up_r, dn_r, t_round, energy_r,
                          flops_r, max((j.mem_bytes for j in settled), default=0),
                          merge_by_kind(j.extra["by_kind"] for j in settled))
        lost = [j for j in settled if j.status != OK]
        stale = [rnd - j.launched for j in buffer.values()]
        m.update({
            "clients_sampled": len(started), "clients_reported": sum(1 for j in settled if j.status != DROPPED),
            "clients_aggregated": len(buffer), "clients_dropped": sum(1 for j in settled if j.status == DROPPED),
            "clients_late": 0, "clients_rejected": sum(1 for j in settled if j.status == REJECTED),
            "wasted_bytes": sum(j.up + j.down for j in lost), "wasted_energy_j": sum(j.energy_j for j in lost),
            "wasted_flops": sum(j.flops for j in lost), "sim_clock_s": totals.clock_s,
            "staleness_mean": sum(stale) / len(stale) if stale else 0.0, "staleness_max": max(stale, default=0),
            "clients_in_flight": len(self.inflight),
        })
        m.update(report.stats)
        m[COMPUTE_WALL] = self.compute_wall_s  # the launches' client work; the rest of the step is the server's
        m[AGGREGATE_WALL] = time.perf_counter() - wall0 - self.compute_wall_s
        return state, m, rows
