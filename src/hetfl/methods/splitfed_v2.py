"""SplitFed V2 (Thapa et al., AAAI 2022): one server-side body + tail, updated batch by batch
as clients' activations arrive, one client after another; no server-side averaging. The client
heads are FedAvg'd at round end.

Order: the server serves clients one after another in a seeded random order per round
(`client_order`, drawn from (seed, round) only), so a V2 result depends on that order, as a
deployment depends on arrival order, but never on the simulator's execution order.

Per local step (B samples, E activation elements per sample at the cut), fp32:
    up   activations: B*E*4 bytes + B*8 (int64 labels) [+ B*4 int32 text lengths]
    down grad_cut:    B*E*4 bytes + 4 (the fp32 batch loss, for the client's log)
Per round the head goes down as values and comes up as deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.config import Config
from hetfl.engine.api import ClientContext, Message, Method, RoundReport, ServerState
from hetfl.methods.common import make_optimizer
from hetfl.methods.split_common import (CutPoints, SplitConfig, SplitExchange, splitfed_client_update,
                                        splitfed_payload, splitfed_step, trainable, turn_order)
from hetfl.registry import register_method


@dataclass(frozen=True)
class SplitFedV2Config(SplitConfig):
    name: str = "splitfed-v2"


@register_method("splitfed-v2", SplitFedV2Config, "SplitFed V2: one server-side model trained by clients in turn")
class SplitFedV2(Method):
    calls_server = True
    schedule = "sequential"  # the server serves clients one after another: a round is their sum

    def __init__(self, cfg: Config, mcfg: SplitFedV2Config):
        self.cfg, self.mcfg = cfg, mcfg
        self.split = SplitExchange(cfg, mcfg.name, tail_on_client=False)  # the server runs body and tail

    def setup(self, scenario) -> ServerState:
        state = self.split.setup(scenario)
        self.cuts = CutPoints(self.mcfg, self.split.layout.num_blocks, self.split.client_memory)
        return state

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.cuts.knobs(cid, device)

    # -- server: one body + tail, clients in turn -------------------------------------------------
    def client_order(self, rnd: int, cids: list[int]) -> list[int]:
        return turn_order(self.cfg.seed, rnd, cids)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        self.split.begin_round(state, cids, train=True)
        names = set().union(*(self.split.server_names(self.cuts.of(c)) for c in cids))
        self.opt = make_optimizer(list(trainable(self.split.server_model, names).values()), self.cfg)  # one per round
        self.order: list[int] = []  # clients in the order the server served them
        return self.split.model_messages(state, cids, self.cuts)

    def server_call(self, rnd: int):
        return self.split.handler(self.serve)

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        if kind != "activations":
            raise ValueError(f"{self.mcfg.name} server: unknown message kind {kind!r}")
        if not self.order or self.order[-1] != cid:
            self.order.append(cid)
        return splitfed_step(self.split, self.cuts.of(cid), msg, self.opt)

    # -- client: the head ----------------------------------------------------------------------
    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        return splitfed_client_update(self.split, self.cuts, self.cfg, msg, ctx)

    # -- aggregation: heads by FedAvg, the server part as the server trained it -------------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        server = dict(self.split.server_model.named_parameters())
        served = {cid: set(self.split.server_names(self.cuts.of(cid))) for cid in replies}
        return self.split.aggregate(state, replies, self.mcfg.weighting,
                                    lambda cid, n: server[n].detach() if n in served[cid] else None)

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return self.split.report(self.cuts)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.split.eval_model(state)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        return splitfed_payload(self.split, self.cuts, self.cfg, cid, num_examples)
