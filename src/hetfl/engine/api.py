"""The method contract, messages, client contexts and seed derivation.

A method fills in four hooks; the round loop (engine/loop.py) calls them and never knows
which method runs. Everything a client sends or receives is a `Message` that crosses a `Link`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import torch

if TYPE_CHECKING:
    from hetfl.scenario import Scenario
    from hetfl.system.devices import DeviceProfile


def derive_seed(root: int, *parts: Any) -> int:
    """A 63-bit seed for (root, parts...), e.g. (seed, round, client, "batches").

    Hash-derived, so a client's randomness depends only on who/when/what it is for, never
    on the order clients run in, the backend, the worker count or the resume point.
    """
    h = hashlib.blake2b(repr((root, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def generator(root: int, *parts: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(root, *parts))
    return g


@dataclass
class Message:
    """Named tensors plus small JSON-able metadata; the unit that crosses a Link."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = ""  # ledger label ("model", "update", "activations", ...); not sent

    def meta_nbytes(self) -> int:
        return len(json.dumps(self.meta, sort_keys=True, default=str).encode()) if self.meta else 0


# Metadata keys that travel up with every client reply.
NUM_EXAMPLES = "num_examples"
TRAIN_LOSS = "train_loss"


class ServerHandle(Protocol):
    """Per-batch calls from a client to the server (split learning); each call crosses the link."""

    def call(self, kind: str, msg: Message) -> Message: ...


@dataclass
class ClientContext:
    """Everything a client may touch during `client_update`. Lives on the client only.

    Attributes:
        cid: client id.
        rnd: the current round (1-based).
        data: the client's local training samples (never leaves the client).
        device: the client's device profile.
        knobs: per-client settings chosen by the resource policy (e.g. {"rank": 8}).
        state: persistent private state for stateful methods (kept by the client between rounds).
        seed: root seed of the run.
        model: the model object this worker trains in place (one shared object in simulation).
        task: the scenario's task (batching, loss, evaluation).
        server: handle for per-batch server calls (split methods), else None.
    """

    cid: int
    rnd: int
    data: Any
    device: "DeviceProfile"
    knobs: dict[str, Any]
    state: dict[str, Any]
    seed: int
    model: torch.nn.Module
    task: Any
    server: ServerHandle | None = None
    flops: float = 0.0  # FLOPs this client spent this round (filled by `compute`)
    mem_bytes: int = 0  # the method's estimate of this client's peak training memory
    local_total: int = 0  # local samples before data selection (0: no selection ran)
    selection_flops: float = 0.0  # part of `flops` spent by the selection stage
    _flop_cache: dict = field(default_factory=dict, repr=False)

    def generator(self, purpose: str) -> torch.Generator:
        return generator(self.seed, self.rnd, self.cid, purpose)

    def compute(self, key: Any, fn: Callable[[], Any]) -> Any:
        """Run `fn` (one forward+backward step) and add its FLOPs to this client's count.

        FLOPs are measured with torch's FlopCounterMode the first time a `key` (which must
        capture everything the FLOPs depend on: shapes, ranks, ...) is seen, then cached, so
        counting costs one instrumented step per shape rather than a slowdown of every step.
        """
        cached = self._flop_cache.get(key)
        if cached is not None:
            self.flops += cached
            return fn()
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = fn()
        self._flop_cache[key] = float(counter.get_total_flops())
        self.flops += self._flop_cache[key]
        return out


ServerState = dict[str, Any]


class Method(Protocol):
    """The hooks a federated method implements.

    `setup` runs once on the scenario (server and workers alike) and returns the initial
    server state; the other hooks are called by the round loop. A method that sets the class
    attribute `supports_selection = True` implements `load`, and config validation lets it
    combine with a data-selection stage (`selection.name`).
    """

    def setup(self, scenario: "Scenario") -> ServerState: ...

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]: ...

    def client_update(self, msg: Message, ctx: ClientContext) -> Message: ...

    def load(self, msg: Message, ctx: ClientContext) -> None:
        """Put the downloaded global model into `ctx.model` (used before data selection)."""

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState: ...

    def eval_model(self, state: ServerState) -> torch.nn.Module: ...


def weighted_mean(values: dict[int, float], weights: dict[int, float]) -> float:
    total = sum(weights.values())
    return sum(values[c] * weights[c] for c in sorted(values)) / total if total else float("nan")


def iter_sorted(replies: dict[int, Message]) -> Iterator[tuple[int, Message]]:
    """Replies in client-id order, so sums are bitwise independent of execution order."""
    for cid in sorted(replies):
        yield cid, replies[cid]
