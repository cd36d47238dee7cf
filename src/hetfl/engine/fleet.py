"""How a round goes on a real fleet: who can be sampled, who reports, and when the server closes it.

The loop (engine/loop.py) runs every sampled client's work in simulation, then `settle` decides
from the simulated clock what the server would have seen:

- a client drops out at `fate.drop_at` of its work (fault injection) or when the availability
  model takes it offline, whichever comes first; its reply never arrives;
- a client that reports after `population.deadline_s`, or after the first `clients_per_round`
  valid reports when the server over-selected, is `late`: it spent its work for nothing;
- a reply that fails `engine/robust.check_reply` (non-finite, wrong keys or shapes) is `rejected`
  and does not count towards the cohort.

The round ends when the cohort's last needed report arrives (the K-th valid one), at the deadline
if fewer arrive by then, or, with neither deadline nor enough reports, when every sampled client
has reported or dropped. Sequential methods (SplitFed V2, vanilla SL) serve clients one after
another, so client j's work starts when client j-1's ends.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, Message, weighted_mean
from hetfl.engine.states import MIB
from hetfl.errors import ConfigError, HetflWarning
from hetfl.seeding import generator

OK, DROPPED, LATE, REJECTED = "ok", "dropped", "late", "rejected"


def fleet_active(cfg) -> bool:
    """Whether any real-fleet feature is on (else the loop keeps its plain synchronous path)."""
    p = cfg.population
    return (p.availability != "always" or p.deadline_s is not None or p.over_select > 1.0 or cfg.faults.any
            or cfg.server.mode == "async")


def cohort_size(cfg) -> int:
    """How many clients the server samples per round: ceil(over_select * clients_per_round)."""
    p = cfg.population
    return min(p.num_clients, math.ceil(p.over_select * p.clients_per_round - 1e-9))


def sample_from(seed: int, rnd: int, eligible: list[int], k: int) -> list[int]:
    """`k` of the `eligible` clients, uniformly without replacement, seeded by (seed, round) only.

    With every client eligible this is exactly `loop.sample_clients`."""
    perm = torch.randperm(len(eligible), generator=generator(seed, rnd, "sample"))
    return sorted(eligible[i] for i in perm[:k].tolist())


@dataclass
class Settlement:
    """What the server saw of a round's sampled clients."""

    status: dict[int, str]  # ok | dropped | late | rejected
    finish_s: dict[int, float]  # seconds after the round's start at which the client reported or dropped
    share: dict[int, float]  # share of its round work the client did (1.0 unless it dropped)
    t_round: float  # when the server closed the round, seconds after its start


def settle(order: list[int], times: dict[int, float], *, k: int, drop_at: dict[int, float | None],
           offline_in: dict[int, float], rejected: set[int], deadline_s: float | None,
           sequential: bool = False) -> Settlement:
    """Decide each sampled client's status and the round's duration.

    Args:
        order: the sampled clients, in the order a sequential server serves them.
        times: seconds each client's round work takes (compute, transfers, server waits; stragglers
            already slowed down).
        k: the cohort the server aggregates (clients_per_round).
        drop_at: per client, the share of its work at which it drops out (None: it does not).
        offline_in: per client, seconds after the round's start at which it goes offline (inf: never).
        rejected: clients whose reply fails the server's checks.
        deadline_s: the round's deadline (None: none).
        sequential: clients are served one after another.

    Returns:
        The settlement; a client is `ok` iff its valid reply is among the first k before the deadline.
    """
    status, finish, share = {}, {}, {}
    start = 0.0
    for c in order:
        t0 = start if sequential else 0.0
        end = t0 + times[c]
        cut = math.inf
        if drop_at.get(c) is not None:
            cut = t0 + drop_at[c] * times[c]
        cut = min(cut, max(offline_in.get(c, math.inf), t0))
        if cut < end:
            status[c], finish[c] = DROPPED, cut
            share[c] = (cut - t0) / times[c] if times[c] > 0 else 0.0
        else:
            status[c], finish[c], share[c] = (REJECTED if c in rejected else OK), end, 1.0
        start = finish[c]
    valid = sorted((finish[c], c) for c in order if status[c] == OK)
    taken = 0
    for f, c in valid:
        if (deadline_s is not None and f > deadline_s) or taken >= k:
            status[c] = LATE
        else:
            taken += 1
    oks = [finish[c] for c in order if status[c] == OK]
    if taken >= k and oks:
        t_round = max(oks)  # the k-th valid report closes the round
    elif deadline_s is not None:
        t_round = deadline_s if any(finish[c] > deadline_s for c in order) else max(finish.values(), default=0.0)
    else:
        t_round = max(finish.values(), default=0.0)
    return Settlement(status, finish, share, t_round)


def check_replies(rnd: int, method, replies: dict[int, Message], down: dict[int, Message],
                  knobs: dict[int, dict]) -> dict[int, str]:
    """Every reply is checked before aggregation (engine/robust.py): client -> why it is rejected.
    Rejected replies are counted (`clients_rejected`), named in one warning line per round and in
    clients.csv's `reason`, and never aggregated."""
    from hetfl.engine.robust import check_reply

    rejected = {}
    for cid, reply in sorted(replies.items()):
        why = check_reply(reply, method.expected_reply(down[cid], knobs[cid]))
        if why is not None:
            rejected[cid] = why
    if rejected:
        warnings.warn(f"round {rnd}: rejected {len(rejected)} of {len(replies)} replies ("
                      + "; ".join(f"client {c}: {w}" for c, w in rejected.items()) + ")", HetflWarning, stacklevel=2)
    return rejected


def fleet_stats(cids, status, ups, downs, spent, totals) -> dict[str, Any]:
    """The round's participation and the work spent for nothing (dropped, late, rejected clients)."""
    lost = [c for c in cids if status[c] != OK]
    count = {s: sum(1 for c in cids if status[c] == s) for s in (OK, DROPPED, LATE, REJECTED)}
    return {
        "clients_sampled": len(cids), "clients_reported": len(cids) - count[DROPPED],
        "clients_aggregated": count[OK], "clients_dropped": count[DROPPED], "clients_late": count[LATE],
        "clients_rejected": count[REJECTED],
        "wasted_bytes": sum(ups[c] + downs[c] for c in lost), "wasted_energy_j": sum(spent[c][0] for c in lost),
        "wasted_flops": sum(spent[c][1] for c in lost), "sim_clock_s": totals.clock_s,
    }


class Fleet:
    """The real-fleet parts of a synchronous round (engine/fleet.py): availability-aware sampling
    with over-selection, fault draws, deadlines, and keeping a failed client's private state."""

    def __init__(self, cfg: Config, scenario, backend):
        from hetfl.fleet.availability import build_availability

        self.cfg, self.backend, self.n = cfg, backend, scenario.num_clients
        self.avail = None if cfg.population.availability == "always" else \
            build_availability(cfg, scenario.population)
        self.byzantine = frozenset()
        if cfg.faults.byzantine:
            from hetfl.fleet.faults import byzantine_clients

            self.byzantine = byzantine_clients(cfg.faults, cfg.seed, self.n)
        self.saved: dict[int, Any] = {}
        self.fates: dict[int, Any] = {}

    def sample(self, rnd: int, totals) -> list[int]:
        """The round's cohort among the clients online at its start (the clock waits for one)."""
        everyone = list(range(self.n))
        eligible = everyone
        if self.avail is not None:
            eligible = [c for c in everyone if self.avail.online(c, totals.clock_s)]
            if not eligible:
                t = self.avail.next_online(totals.clock_s, everyone)
                if t == float("inf"):
                    raise ConfigError(f"population.availability: round {rnd}: no client comes online after "
                                      f"t={totals.clock_s:.0f} s of simulated time")
                totals.clock_s = t
                eligible = [c for c in everyone if self.avail.online(c, t)]
        return sample_from(self.cfg.seed, rnd, eligible, min(len(eligible), cohort_size(self.cfg)))

    def keep_states(self, cids: list[int]) -> None:
        """Copy the cohort's private states, so a client that fails keeps its state unchanged."""
        states = self.backend.client_states
        self.saved = {c: copy.deepcopy(states[c]) for c in cids if c in states}

    def restore_states(self, cids: list[int]) -> None:
        states = self.backend.client_states
        for c in cids:
            if c in self.saved:
                states[c] = self.saved[c]
            else:
                states.pop(c, None)
        self.saved = {}

    def tamper(self, rnd: int, replies: dict[int, Message]) -> dict[int, Message]:
        """Draw each client's fate for the round and corrupt the replies it says to."""
        fc = self.cfg.faults
        if not fc.any:
            self.fates = {}
            return replies
        from hetfl.fleet.faults import fate, tamper

        self.fates = {c: fate(fc, self.cfg.seed, rnd, c, self.byzantine) for c in replies}
        return {c: (tamper(r, self.fates[c], fc, self.cfg.seed, rnd, c)
                    if self.fates[c].corrupt or self.fates[c].byzantine else r) for c, r in replies.items()}

    def settle(self, rnd: int, order: list[int], costs: dict, rejected: set[int], totals,
               sequential: bool) -> Settlement:
        times, drop_at, offline_in = {}, {}, {}
        for c in order:
            f = self.fates.get(c)
            times[c] = costs[c].time_s * (f.slowdown if f is not None else 1.0)
            drop_at[c] = f.drop_at if f is not None else None
            if self.avail is not None:
                offline_in[c] = self.avail.offline_at(c, totals.clock_s) - totals.clock_s
        return settle(order, times, k=self.cfg.population.clients_per_round, drop_at=drop_at,
                      offline_in=offline_in, rejected=rejected, deadline_s=self.cfg.population.deadline_s,
                      sequential=sequential)


def round_costs(scenario, wireless, cids: list[int], ctxs: dict, ups: dict[int, int], downs: dict[int, int], report,
                sequential: bool) -> dict:
    """Each client's seconds and joules for its round work (system/cost.py): Shannon rates from its
    bandwidth, power and channel with `wireless`, else the tiers' fixed link rates and the server of
    devices.yaml (or population.devices_file)."""
    from hetfl.system.cost import fixed_costs

    devices, flops = {c: ctxs[c].device for c in cids}, {c: ctxs[c].flops for c in cids}
    if wireless is not None:
        return wireless.costs(cids, devices, flops, ups, downs, report.server_flops, report.radio,
                              sequential=sequential)
    return fixed_costs(cids, devices, flops, ups, downs, report.server_flops, scenario.population.server,
                       sequential=sequential, server_of=report.server_of)


def dropped_bytes(ledger, rnd: int, cid: int, share: float, reply_kind: str | None,
                  down_kind: str) -> tuple[int, int, dict[tuple[str, str], int]]:
    """(up, down, by (direction, kind)) bytes a client that dropped at `share` of its work moved: all
    of its download (`down_kind`), `share` of every other message kind (per-batch traffic), and not
    its reply (`reply_kind`; None: it had none)."""
    by: dict[tuple[str, str], int] = {}
    for e in ledger.entries:
        if e.rnd != rnd or e.cid != cid:
            continue
        key = (e.direction, e.kind)
        if e.direction == "down" and e.kind == down_kind:
            by[key] = by.get(key, 0) + e.nbytes
        elif not (e.direction == "up" and e.kind == reply_kind):
            by[key] = by.get(key, 0) + e.nbytes
    by = {k: (b if k == ("down", down_kind) else int(share * b)) for k, b in by.items()}
    up = sum(b for (d, _), b in by.items() if d == "up")
    down = sum(b for (d, _), b in by.items() if d == "down")
    return up, down, by


def client_by_kind(ledger, rnd: int, cid: int) -> dict[tuple[str, str], int]:
    """Bytes per (direction, kind) one client moved in a round, as the ledger measured them."""
    by: dict[tuple[str, str], int] = {}
    for e in ledger.entries:
        if e.rnd == rnd and e.cid == cid:
            by[(e.direction, e.kind)] = by.get((e.direction, e.kind), 0) + e.nbytes
    return by


def merge_by_kind(parts) -> dict[str, int]:
    """Per-client (direction, kind) byte counts summed into the metrics' `bytes_by_kind`."""
    total: dict[tuple[str, str], int] = {}
    for by in parts:
        for k, b in by.items():
            total[k] = total.get(k, 0) + b
    return {f"{d}:{k}": b for (d, k), b in sorted(total.items())}


def account_round(totals, rnd: int, replies: dict[int, Message], up: int, down: int, t_round: float,
                  energy: float, flops: float, mem_peak_bytes: int, by_kind: dict[str, int]) -> dict[str, Any]:
    """Add a round's bytes, simulated time, energy and FLOPs to `totals` (the loop's `Totals`; the
    simulated clock is the caller's) and return the metrics every round logs, synchronous or not.

    Args:
        totals: the run's cumulative counters, updated in place.
        rnd: the round (or asynchronous server step).
        replies: the aggregated replies, by client; their train losses, weighted by examples.
        up, down: the round's bytes each way.
        t_round: the round's simulated duration.
        energy, flops: what the round's clients spent.
        mem_peak_bytes: the largest client memory estimate of the round.
        by_kind: bytes per "direction:kind".
    """
    totals.bytes_up += up
    totals.bytes_down += down
    totals.sim_time_s += t_round
    totals.energy_j += energy
    totals.flops += flops
    cids = sorted(replies)
    losses = {c: float(replies[c].meta.get(TRAIN_LOSS, float("nan"))) for c in cids}
    weights = {c: float(replies[c].meta.get(NUM_EXAMPLES, 1)) for c in cids}
    return {
        "round": rnd, "train_loss": weighted_mean(losses, weights),
        "bytes_up": up, "bytes_down": down,
        "bytes_up_total": totals.bytes_up, "bytes_down_total": totals.bytes_down,
        "round_time_s": t_round, "sim_time_s": totals.sim_time_s,
        "round_energy_j": energy, "energy_j": totals.energy_j,
        "client_flops": flops, "flops_total": totals.flops,
        "client_mem_peak_mb": mem_peak_bytes / MIB,
        "bytes_by_kind": by_kind,
    }
