"""SplitFed V2 (Thapa et al., AAAI 2022): one server-side body + tail, updated batch by batch
as clients' activations arrive, one client after another; no server-side averaging. The client
heads are FedAvg'd at round end.

Order: the server serves clients one after another in a seeded random order per round
(`client_order`, drawn from (seed, round) only), so a V2 result depends on that order, as a
deployment depends on arrival order, but never on the simulator's execution order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import Message, ServerState
from hetfl.seeding import generator
from hetfl.methods.common import make_optimizer
from hetfl.methods.split_common import SplitConfig, SplitFedBase
from hetfl.registry import register_method


@dataclass(frozen=True)
class SplitFedV2Config(SplitConfig):
    name: str = "splitfed-v2"


@register_method("splitfed-v2", SplitFedV2Config, "SplitFed V2: one server-side model trained by clients in turn")
class SplitFedV2(SplitFedBase):
    schedule = "sequential"  # the server serves clients one after another: a round is their sum

    def client_order(self, rnd: int, cids: list[int]) -> list[int]:
        """The order the server serves this round's clients in: a seeded permutation."""
        perm = torch.randperm(len(cids), generator=generator(self.cfg.seed, rnd, "splitfed-v2-order"))
        return [cids[i] for i in perm.tolist()]

    def begin_round(self, state: ServerState, rnd: int, cids: list[int]) -> None:
        names = set().union(*(self.server_names(self.cuts[c]) for c in cids))
        self.opt = make_optimizer(self.train_server_part(names), self.cfg)  # one optimiser for the round
        self.order: list[int] = []  # clients in the order the server served them

    def server_model_for(self, cid: int) -> torch.optim.Optimizer:
        if not self.order or self.order[-1] != cid:
            self.order.append(cid)
        return self.opt


@dataclass(frozen=True)
class VanillaSLConfig(SplitConfig):
    name: str = "sl-vanilla"


@register_method("sl-vanilla", VanillaSLConfig, "Vanilla split learning: clients in turn, the client part relayed")
class VanillaSL(SplitFedV2):
    """Vanilla (sequential) split learning (Gupta & Raskar 2018; the "SL" baseline of SplitFed):
    one server model as in V2, and no averaging of client parts either: each client starts from
    the part the previous client finished with, relayed through the server (a `model` message
    down when its turn comes, a `handoff` up when it is done, both on the ledger)."""

    def begin_round(self, state: ServerState, rnd: int, cids: list[int]) -> None:
        super().begin_round(state, rnd, cids)
        # the global client part is the last handoff of the previous round (see aggregate)
        self.relay = {n: state["global"][n].clone() for n in self.layout.head(self.layout.num_blocks - 1)}

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        super().configure(state, rnd, cids)
        return {cid: Message(kind="turn") for cid in cids}  # the client part comes at its turn

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        names = self.client_names(self.cuts[cid])
        if kind == "fetch":
            return Message({n: self.relay[n] for n in names}, kind="model")
        if kind == "handoff":
            self.relay.update({n: msg.tensors[n].clone() for n in names})
            return Message(kind="ack")
        return super().serve(cid, kind, msg)

    def client_update(self, msg: Message, ctx) -> Message:
        start = ctx.server.call("fetch", Message(kind="fetch"))
        reply = super().client_update(start, ctx)
        ctx.server.call("handoff", Message({n: start.tensors[n] + d for n, d in reply.tensors.items()}, kind="handoff"))
        return Message({}, reply.meta)

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        state = super().aggregate(state, rnd, replies)
        state["global"].update({n: t.clone() for n, t in self.relay.items()})
        return state
