"""SplitFed V1 (Thapa et al., "SplitFed: When Federated Learning Meets Split Learning", AAAI
2022): each client trains against its own server-side copy of body + tail (deep-copied from the
global one at the start of the round, run in parallel in deployment); at round end the copies
are averaged weighted by the clients' data sizes, and the client heads are FedAvg'd.

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
from hetfl.methods.split_common import (CutPoints, ServerCopies, SplitConfig, SplitExchange, splitfed_client_update,
                                        splitfed_payload, splitfed_step)
from hetfl.registry import register_method


@dataclass(frozen=True)
class SplitFedV1Config(SplitConfig):
    name: str = "splitfed-v1"


@register_method("splitfed-v1", SplitFedV1Config, "SplitFed V1: one server-side copy per client, averaged per round")
class SplitFedV1(Method):
    calls_server = True

    def __init__(self, cfg: Config, mcfg: SplitFedV1Config):
        self.cfg, self.mcfg = cfg, mcfg
        self.split = SplitExchange(cfg, mcfg.name, tail_on_client=False)  # the server runs body and tail
        self.copies = ServerCopies(self.split, cfg)

    def setup(self, scenario) -> ServerState:
        state = self.split.setup(scenario)
        self.cuts = CutPoints(self.mcfg, self.split.layout.num_blocks, self.split.client_memory)
        return state

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.cuts.knobs(cid, device)

    # -- server: one copy of body + tail per client ----------------------------------------------
    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        self.split.begin_round(state, cids, train=True)
        self.copies.begin_round(state)
        return self.split.model_messages(state, cids, self.cuts)

    def server_call(self, rnd: int):
        return self.split.handler(self.serve)

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        if kind != "activations":
            raise ValueError(f"{self.mcfg.name} server: unknown message kind {kind!r}")
        cut = self.cuts.of(cid)
        return splitfed_step(self.split, cut, msg, self.copies.serving(cid, self.split.server_names(cut)))

    # -- client: the head ----------------------------------------------------------------------
    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        return splitfed_client_update(self.split, self.cuts, self.cfg, msg, ctx)

    # -- aggregation: heads by FedAvg, server copies by their clients' data ---------------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        self.copies.park()
        served = {cid: set(self.split.server_names(self.cuts.of(cid))) for cid in replies}
        return self.split.aggregate(state, replies, self.mcfg.weighting,
                                    lambda cid, n: self.copies.version(cid, n) if n in served[cid] else None)

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return self.split.report(self.cuts)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.split.eval_model(state)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        return splitfed_payload(self.split, self.cuts, self.cfg, cid, num_examples)
