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

from hetfl.engine.api import ServerState, generator
from hetfl.methods.common import make_optimizer
from hetfl.methods.split_common import SplitConfig, SplitFedBase
from hetfl.registry import register_method


@dataclass(frozen=True)
class SplitFedV2Config(SplitConfig):
    name: str = "splitfed-v2"


@register_method("splitfed-v2", SplitFedV2Config, "SplitFed V2: one server-side model trained by clients in turn")
class SplitFedV2(SplitFedBase):
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
