"""SplitFed V1 (Thapa et al., "SplitFed: When Federated Learning Meets Split Learning", AAAI
2022): each client trains against its own server-side copy of body + tail (deep-copied from the
global one at the start of the round, run in parallel in deployment); at round end the copies
are averaged weighted by the clients' data sizes, and the client heads are FedAvg'd."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetfl.engine.api import Message, ServerState
from hetfl.methods.common import make_optimizer
from hetfl.methods.split_common import SplitConfig, SplitFedBase
from hetfl.registry import register_method


@dataclass(frozen=True)
class SplitFedV1Config(SplitConfig):
    name: str = "splitfed-v1"


@register_method("splitfed-v1", SplitFedV1Config, "SplitFed V1: one server-side copy per client, averaged per round")
class SplitFedV1(SplitFedBase):
    def begin_round(self, state: ServerState, rnd: int, cids: list[int]) -> None:
        self.global_ = state["global"]
        self.copies: dict[int, dict[str, torch.Tensor]] = {}  # cid -> its trained server copy
        self.current, self.opt = None, None

    def server_model_for(self, cid: int) -> torch.optim.Optimizer:
        if self.current != cid:  # a new client: park the previous copy, start from the global one
            self._park()
            names = self.server_names(self.cuts[cid])
            params = dict(self.server_model.named_parameters())
            with torch.no_grad():
                for n in names:
                    params[n].copy_(self.global_[n])
            self.current, self.opt = cid, make_optimizer(self.train_server_part(names), self.cfg)
        return self.opt

    def _park(self) -> None:
        if self.current is not None:
            params = dict(self.server_model.named_parameters())
            self.copies[self.current] = {n: params[n].detach().clone()
                                         for n in self.server_names(self.cuts[self.current])}
            self.current = None

    def end_round(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> None:
        self._park()

    def server_version(self, cid: int, name: str) -> torch.Tensor:
        return self.copies[cid][name] if cid in self.copies else self.global_[name]
