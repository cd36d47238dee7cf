"""Vanilla (sequential) split learning (Gupta & Raskar 2018; the "SL" baseline of SplitFed): one
server-side body + tail trained by the clients in turn, as in SplitFed V2, and no averaging of
the client parts either: each client starts from the part the previous client finished with,
relayed through the server.

Messages of a client's turn (B samples per step, E activation elements per sample at the cut):
    down turn            (empty: the round's first message only says "wait for your turn")
    up   fetch, down model      its start: the part the previous client handed off (fp32)
    per step: up activations B*E*4 + B*8 (int64 labels) [+ B*4 text lengths], down grad_cut B*E*4 + 4
    up   handoff, down ack      the part it finished with (fp32), for the next client
    up   update             metadata only (sample count, loss): nothing is averaged
The server serves clients in a seeded order per round (`client_order`, the same draw as V2's).
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
class VanillaSLConfig(SplitConfig):
    name: str = "sl-vanilla"


@register_method("sl-vanilla", VanillaSLConfig, "Vanilla split learning: clients in turn, the client part relayed")
class VanillaSL(Method):
    calls_server = True
    schedule = "sequential"  # the server serves clients one after another: a round is their sum

    def __init__(self, cfg: Config, mcfg: VanillaSLConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.split = SplitExchange(cfg, mcfg.name, tail_on_client=False)  # the server runs body and tail

    def setup(self, scenario) -> ServerState:
        state = self.split.setup(scenario)
        self.cuts = CutPoints(self.mcfg, self.split.layout.num_blocks, self.split.client_memory)
        return state

    def plan(self, cid: int, device) -> tuple[dict, int]:
        return self.cuts.knobs(cid, device)

    # -- server: one body + tail, and the relayed client part -----------------------------------
    def client_order(self, rnd: int, cids: list[int]) -> list[int]:
        return turn_order(self.cfg.seed, rnd, cids)

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        lay = self.split.layout
        self.split.begin_round(state, cids, train=True)
        names = set().union(*(self.split.server_names(self.cuts.of(c)) for c in cids))
        self.opt = make_optimizer(list(trainable(self.split.server_model, names).values()), self.cfg)  # one per round
        self.order: list[int] = []  # clients in the order the server served them
        # the global client part is the last handoff of the previous round (see aggregate)
        self.relay = {n: state["global"][n].clone() for n in lay.head(lay.num_blocks - 1)}
        return {cid: Message(kind="turn") for cid in cids}  # the client part comes at its turn

    def server_call(self, rnd: int):
        return self.split.handler(self.serve)

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        names = self.split.client_names(self.cuts.of(cid))
        if kind == "fetch":
            return Message({n: self.relay[n] for n in names}, kind="model")
        if kind == "handoff":
            self.relay.update({n: msg.tensors[n].clone() for n in names})
            return Message(kind="ack")
        if kind != "activations":
            raise ValueError(f"{self.mcfg.name} server: unknown message kind {kind!r}")
        if not self.order or self.order[-1] != cid:
            self.order.append(cid)
        return splitfed_step(self.split, self.cuts.of(cid), msg, self.opt)

    # -- client: fetch the part, train it as SplitFed does, hand it on ----------------------------
    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        start = ctx.server.call("fetch", Message(kind="fetch"))
        reply = splitfed_client_update(self.split, self.cuts, self.cfg, start, ctx)
        ctx.server.call("handoff", Message({n: start.tensors[n] + d for n, d in reply.tensors.items()}, kind="handoff"))
        return Message({}, reply.meta)

    # -- aggregation: the server part as trained, the client part as last handed off -------------
    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        server = dict(self.split.server_model.named_parameters())
        served = {cid: set(self.split.server_names(self.cuts.of(cid))) for cid in replies}
        state = self.split.aggregate(state, replies, self.mcfg.weighting,
                                     lambda cid, n: server[n].detach() if n in served[cid] else None)
        state["global"].update({n: t.clone() for n, t in self.relay.items()})
        return state

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        return self.split.report(self.cuts)

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        return self.split.eval_model(state)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """SplitFed's bytes: the part comes down at the client's turn (fetch; turn, fetch and ack
        are empty) instead of with the round's first message, and goes up as the handoff; the
        update carries the metadata only."""
        return splitfed_payload(self.split, self.cuts, self.cfg, cid, num_examples)
