"""SFLAM (Qiang et al., "Deploying Large AI Models on Resource-Limited Devices with Split
Federated Learning", arXiv 2504.09114; spec/sflam.md): SplitFed V1 where the device runs only the
embedding (or the first `cut` blocks), its activations go up quantized at the device's own
bit-width, part of the server side is fine-tuned, and M parallel edge servers each serve a
subset of the devices.

- Quantization: before each round the method sets, per device, the link codec of its
  `activations` (and, with `grad_bits < 32`, of the `grad_cut` coming down), so bytes and
  distortion are measured on the link like any other message. Bits come from the allocation
  (system/allocate.py, when `wireless` is configured) or from `bits`.
- Server-side fine-tuning (`server_tune`): `lora` (LoRA on the body's attention/MLP linears,
  `lora.*` options, plus the classifier tail), `last-k` (the last `last_k` blocks + tail) or
  `full` (the whole server part, as in the official code). The device part always trains.
- Edge servers: device k is served by server `server_of[k]` (allocation, else `k mod M`) and only
  that server sees its traffic (`served`); each server keeps one copy per device it serves (V1).
  Averaging each server's copies by data and then the servers' averages by the data behind them
  is the data-weighted mean over all devices, so SplitFed V1's aggregation serves as is.
- Cut layers: with `wireless.cuts` the allocation also picks the cohort's cut (`best_cut`, asking
  the cut owner `cuts`), which then travels down with the model.

Per local step (B samples, E activation elements per sample at the cut, q bits):
    up   activations: ceil(B*E*q/8) + 8 per quantization group, + B*8 (int64 labels)
    down grad_cut:    B*E*4 (fp32; or quantized with grad_bits) + 4 (the batch loss)
`payload` counts lossless codecs (q = 32: B*E*4); a table checking it against the ledger sets
method.bits=32 (grad_bits stays 32) with wireless.enabled=false, since the allocation picks bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hetfl.comm.codecs import Quant
from hetfl.config import Config
from hetfl.engine.api import ClientContext, Message, Method, RoundReport, ServerState
from hetfl.errors import ConfigError
from hetfl.methods.split_common import (CutPoints, ServerCopies, SplitConfig, SplitExchange, per_sample_ce,
                                        splitfed_client_update, splitfed_payload, splitfed_step)
from hetfl.models.split import body_forward, head_forward
from hetfl.registry import register_method
from hetfl.seeding import derive_seed


@dataclass(frozen=True)
class SFLAMConfig(SplitConfig):
    name: str = "sflam"
    server_tune: Literal["lora", "last-k", "full"] = "lora"
    last_k: int = 1  # server_tune last-k: blocks fine-tuned at the end of the body
    bits: int = 8  # activation bit-width when no allocation chooses it (32: unquantized fp32)
    grad_bits: int = 32  # bit-width of the gradient sent down (32: fp32)
    group: int = 0  # quantization group size in elements (0: one min/max per tensor)
    rounding: Literal["stochastic", "nearest"] = "stochastic"  # unbiased, or deterministic

    def check(self):
        yield from super().check()
        for key in ("bits", "grad_bits"):
            b = getattr(self, key)
            if not (1 <= b <= 16 or b == 32):
                yield key, f"must be in 1..16 or 32, got {b}"
        if self.last_k < 1:
            yield "last_k", "must be >= 1"
        if self.group < 0:
            yield "group", "must be >= 0"


@register_method("sflam", SFLAMConfig, "SFLAM: quantized SplitFed with partial server fine-tuning, M edge servers")
class SFLAM(Method):
    calls_server = True

    def __init__(self, cfg: Config, mcfg: SFLAMConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.split = SplitExchange(cfg, mcfg.name, tail_on_client=False)  # the servers run body and tail
        self.copies = ServerCopies(self.split, cfg)  # V1: one server copy per device

    def setup(self, scenario) -> ServerState:
        if self.mcfg.server_tune == "lora":  # adapters live in the body; the device's blocks train in full
            from hetfl.models.lora import inject_lora

            lc = self.cfg.lora
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "lora-init"))
            inject_lora(scenario.model, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, regex=lc.regex,
                        exclude=lc.exclude, dropout=lc.dropout, generator=g)
            for p in scenario.model.parameters():
                p.requires_grad_(False)
        state = self.split.setup(scenario)
        self.scenario, blocks = scenario, self.split.layout.num_blocks
        if self.mcfg.server_tune == "last-k" and self.mcfg.last_k >= blocks:
            raise ConfigError(f"method.last_k: {self.mcfg.last_k} must be below the model's {blocks} blocks")
        w = self.cfg.wireless
        self.cuts = CutPoints(self.mcfg, blocks, self.split.client_memory, travels=w.enabled and bool(w.cuts))
        self.num_servers = w.num_servers
        self.server_of = {cid: cid % self.num_servers for cid in range(scenario.num_clients)}
        self.bits = {cid: self.mcfg.bits for cid in range(scenario.num_clients)}
        self.radio_of: dict[int, tuple[float, float, int]] = {}
        self.probes: dict[int, dict[str, float]] = {}
        if w.enabled:  # the scenario's one channel draw, which the loop's cost model uses too
            from hetfl.system.allocate import initial_servers

            self.channels = scenario.channels
            self.server_of = {c: int(s) for c, s in enumerate(initial_servers(w, self.channels, self.cfg.seed))}
        return state

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.cuts.knobs(cid, device)

    def trained_names(self, cut: int) -> tuple[str, ...]:
        """The server-side parameters that train (the rest of the server part stays frozen)."""
        lay, m = self.split.layout, self.mcfg
        if m.server_tune == "full":
            return lay.body(cut) + lay.tail
        if m.server_tune == "last-k":
            first = max(cut, lay.num_blocks - m.last_k)
            return lay.body(first) + lay.tail
        return tuple(n for n in lay.body(cut) if "lora_" in n) + lay.tail

    # -- round: allocation, codecs, the edge servers ---------------------------------------------
    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        w = self.cfg.wireless
        self.split.begin_round(state, cids, train=True)
        self.copies.begin_round(state)
        if w.enabled and (w.allocate_every == "round" or not self.radio_of):
            self.allocate(rnd, cids if w.allocate_every == "round" else list(range(len(self.bits))))
        self.served: dict[int, list[int]] = {m: [] for m in range(self.num_servers)}
        return self.split.model_messages(state, cids, self.cuts)  # with the allocated cut, if cuts move

    def codecs(self, rnd: int, cids: list[int]) -> dict[int, dict[str, Quant]]:
        """Each device's activations at its own bit-width (and the gradient at `grad_bits`)."""
        m, out = self.mcfg, {}
        stochastic = m.rounding == "stochastic"
        for cid in cids:
            out[cid] = {"activations": Quant(self.bits[cid], m.group, stochastic)}
            if m.grad_bits != 32:
                out[cid]["grad_cut"] = Quant(m.grad_bits, m.group, stochastic)
        return out

    def server_call(self, rnd: int):
        return self.split.handler(self.serve)

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        if kind != "activations":
            raise ValueError(f"{self.mcfg.name} server: unknown message kind {kind!r}")
        server = self.server_of[cid]  # only this device's edge server sees its traffic
        if cid not in self.served[server]:
            self.served[server].append(cid)
        cut = self.cuts.of(cid)
        return splitfed_step(self.split, cut, msg, self.copies.serving(cid, self.trained_names(cut)))

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        return splitfed_client_update(self.split, self.cuts, self.cfg, msg, ctx)

    # -- aggregation: device parts by FedAvg, server copies by their devices' data ------------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        self.copies.park()
        trained = {cid: set(self.trained_names(self.cuts.of(cid))) for cid in replies}
        return self.split.aggregate(state, replies, self.mcfg.weighting,
                                    lambda cid, n: self.copies.version(cid, n) if n in trained[cid] else None)

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        rep = self.split.report(self.cuts)
        round_cids = self.split.round_cids
        rep.stats["bits_mean"] = sum(self.bits[c] for c in round_cids) / len(round_cids)
        rep.stats["servers_used"] = sum(1 for c in self.served.values() if c)
        rep.client_rows = {c: self.client_row(c) for c in cids}
        rep.server_of = dict(self.server_of)
        if self.cfg.wireless.enabled:  # bandwidth, power and server per client for the wireless cost model
            rep.radio = {c: self.radio_of[c] for c in cids}
        return rep

    def client_row(self, cid: int) -> dict:
        out = {"server": self.server_of[cid], "bits": self.bits[cid]}
        if cid in self.radio_of:
            out["bandwidth_hz"], out["power_w"] = self.radio_of[cid][0], self.radio_of[cid][1]
        return out

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.split.eval_model(state)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """SplitFed's bytes at fp32 (method.bits=32; module docstring), the cut in the model
        message's metadata when the allocation moves cuts."""
        return splitfed_payload(self.split, self.cuts, self.cfg, cid, num_examples)

    # -- the wireless system: probes, allocation, radio ------------------------------------------
    def probe(self, cut: int) -> dict[str, float]:
        """FLOPs per batch of the device part and of the server part at `cut`, and the range of
        the cut activations, measured once on a batch of the server's own evaluation samples."""
        from hetfl.engine.flops import count_flops

        if cut in self.probes:
            return self.probes[cut]
        task, b = self.scenario.task, self.cfg.train.batch_size
        samples = list(task.eval_samples)
        batch = task.collate([samples[i % len(samples)] for i in range(b)])
        model = self.split.server_model
        dev, srv = set(self.split.client_names(cut)), set(self.trained_names(cut))
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            for n, p in model.named_parameters():
                p.requires_grad_(n in dev)
            def device_part():
                h, mask = head_forward(model, batch, cut)
                h.backward(torch.ones_like(h))
                return h, mask

            (h, mask), device_flops = count_flops(device_part)
            for n, p in model.named_parameters():
                p.requires_grad_(n in srv)
            z = h.detach().requires_grad_(True)
            _, server_flops = count_flops(lambda: per_sample_ce(
                model.tail(body_forward(model, z, mask, cut), mask), batch["labels"]).mean().backward())
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
        self.probes[cut] = {"device_flops": device_flops, "server_flops": server_flops,
                            "range": float(h.detach().max() - h.detach().min())}
        return self.probes[cut]

    def loads(self, cids: list[int], cut: int | None = None):
        """Per-device work of a round (system/wireless.py `Loads`) for the allocation, at each
        device's own cut or, given `cut`, at that cut for all of them."""
        from hetfl.system.wireless import make_loads

        b, m = self.cfg.train.batch_size, self.mcfg
        cut_of = {c: self.cuts.of(c) if cut is None else cut for c in cids}
        pr = [self.probe(cut_of[c]) for c in cids]
        elems = [b * self.split.cut_elems[cut_of[c]] for c in cids]
        grad = [4 * e + 4 if m.grad_bits == 32 else math.ceil(e * m.grad_bits / 8) + 8 * self._groups(e) + 4
                for e in elems]
        return make_loads([self.scenario.population.device(c) for c in cids], batches=self.cfg.train.local_steps,
                          device_flops=[p["device_flops"] for p in pr], server_flops=[p["server_flops"] for p in pr],
                          act_elems=elems, act_groups=[self._groups(e) for e in elems], up_extra_bytes=8 * b,
                          grad_bytes=grad, act_range=[p["range"] for p in pr],
                          model_bytes=[self.split.params_bytes(self.split.client_names(cut_of[c])) for c in cids])

    def _groups(self, elems: int) -> int:
        g = self.mcfg.group
        return -(-elems // g) if g else 1

    def allocate(self, rnd: int, cids: list[int]) -> None:
        """Choose bits, server, bandwidth and power (and, with `wireless.cuts`, the cut) for `cids`."""
        from hetfl.system.allocate import allocate

        w = self.cfg.wireless
        if w.mode == "fixed":  # no optimisation: equal shares of each server's band, full power, fixed bits
            from hetfl.system.cost import equal_radio

            self.radio_of.update(equal_radio(w, {c: self.server_of[c] for c in cids}))
            self.bits.update({c: w.fixed_bits for c in cids})
            return
        alloc = self.best_cut(cids) if w.cuts else allocate(w, self.channels.subset(cids), self.loads(cids),
                                                             seed=self.cfg.seed)
        self.last_allocation = alloc
        for i, c in enumerate(cids):
            self.bits[c] = int(alloc.bits[i])
            self.server_of[c] = int(alloc.server[i])
            self.radio_of[c] = (float(alloc.bandwidth_hz[i]), float(alloc.power_w[i]), int(alloc.server[i]))

    def best_cut(self, cids: list[int]):
        """Enumerate `wireless.cuts` (one cut for the cohort; a cut must be valid for the cut owner
        and fit every device's memory), keep the allocation with the lowest objective, and move
        the cohort to its cut."""
        from hetfl.system.allocate import allocate
        from hetfl.system.memory import fits

        w, best, best_cut = self.cfg.wireless, None, None
        devices = [self.scenario.population.device(c) for c in cids]
        for cut in w.cuts:
            self.cuts.check(cut, "wireless.cuts")
            if not all(fits(self.split.client_memory(cut), d) for d in devices):
                continue
            a = allocate(w, self.channels.subset(cids), self.loads(cids, cut), seed=self.cfg.seed)
            if best is None or a.objective < best.objective:
                best, best_cut = a, cut
        if best is None:
            raise ConfigError(f"wireless.cuts: no cut in {list(w.cuts)} fits the memory of every device of the round")
        self.cuts.assign(cids, best_cut)
        return best

    LAMBDAS = (0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)

    def tradeoff(self, cids: list[int], lams=LAMBDAS) -> list[tuple[float, float, float]]:
        """(lambda, T, E) of the optimised allocation for `cids` at each latency weight."""
        from hetfl.system.allocate import allocate

        ch, loads = self.channels.subset(cids), self.loads(cids)
        out = []
        for lam in lams:
            a = allocate(self.cfg.wireless, ch, loads, lam=lam, mode="optimize", seed=self.cfg.seed)
            out.append((lam, a.T, a.E))
        return out

    def export(self, state: ServerState, out_dir) -> None:
        """With the wireless model on: OUT/tradeoff.csv, the lambda sweep for the last round's
        devices (the run report plots it)."""
        if not self.cfg.wireless.enabled:
            return
        from pathlib import Path

        rows = ["lambda,latency_s,energy_j"] + [f"{lam},{t},{e}" for lam, t, e in self.tradeoff(self.split.round_cids)]
        Path(out_dir, "tradeoff.csv").write_text("\n".join(rows) + "\n")
