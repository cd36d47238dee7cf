"""The method contract, messages and client contexts: everything the round loop, the simulator
and the backends may call on a method is declared here, with its default.

A method subclasses `Method` (and nothing else) and fills in the hooks; the round loop
(engine/loop.py) calls them and never knows which method runs. Everything a client sends or
receives is a `Message` that crosses a `Link`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Iterator, Literal, Protocol

import torch

from hetfl.seeding import generator

if TYPE_CHECKING:
    from hetfl.comm.codecs import Quant
    from hetfl.scenario import Scenario
    from hetfl.system.devices import DeviceProfile


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

        FLOPs are measured (engine/flops.py) the first time a `key` (which must capture everything
        the FLOPs depend on: shapes, ranks, ...) is seen, then cached, so counting costs one
        instrumented step per shape rather than a slowdown of every step. A counted step gives the
        same numbers as a plain one, so which step is counted (which worker saw a shape first)
        never changes a result.
        """
        cached = self._flop_cache.get(key)
        if cached is not None:
            self.flops += cached
            return fn()
        from hetfl.engine.flops import count_flops

        out, self._flop_cache[key] = count_flops(fn)
        self.flops += self._flop_cache[key]
        return out


ServerState = dict[str, Any]

Schedule = Literal["parallel", "lockstep", "sequential"]
ServerCall = Callable[[int, str, Message], Message]  # (cid, kind, message) -> reply, on the server


@dataclass
class RoundReport:
    """What a method reports about a finished round (`Method.report`), in one place.

    Attributes:
        stats: method-specific numbers for metrics.jsonl (server FLOPs, chosen ranks, bits, ...).
        client_rows: per client, extra columns for clients.csv (the allocation, the edge server).
        server_flops: per client, the FLOPs the server spent serving it (split methods); the cost
            model turns them into the client's waiting time for the server.
        server_of: per client, which edge server served it (several servers); None: one server.
        radio: per client (bandwidth Hz, transmit power W, server) chosen by the method's
            allocation, for the wireless cost model; None: equal shares at full power.
    """

    stats: dict[str, float] = field(default_factory=dict)
    client_rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    server_flops: dict[int, float] = field(default_factory=dict)
    server_of: dict[int, int] | None = None
    radio: dict[int, tuple[float, float, int]] | None = None


class Method:
    """The contract of a federated method. Subclass it and override the hooks you need.

    Hooks marked *required* raise NotImplementedError here. The others have defaults that fit a
    plain parameter-averaging method. In the order the loop calls them:

    ========================  ================================================================
    setup                     once per process (server and every worker), on the built scenario
    plan                      once per client after setup: its knobs and memory estimate
    configure                 each round on the server: one message down per sampled client
    codecs                    each round, after configure: per-client codec choices
    client_order              each round, `schedule = "sequential"` only: who is served when
    server_call               each round, `calls_server` only: the server's per-batch handler
    load                      on a client before data selection (`supports_selection` only)
    client_update             on a client: local training, returns the upload
    client_steps / barrier    instead of client_update under `schedule = "lockstep"`
    expected_reply            on the server, per reply: the tensors it must carry (reply checks)
    aggregate                 on the server, on every reply of the round
    report                    after aggregate: the round's method numbers and per-client rows
    observe                   after costing: each sampled client's measured cost
    eval_model                at evaluation: the global model
    client_eval_model         at per-client evaluation: client `cid`'s model
    payload                   never in a run: the bytes a round's messages should take (tests)
    export                    at the end of a run: write the method's artifacts
    ========================  ================================================================

    Capabilities (class attributes) tell the backends how to run a method, instead of probes:

    - `schedule`: how a round's clients run. ``parallel``: independently (any order, any worker);
      ``lockstep``: every client takes local step k, then the server's `barrier(rnd, k)`;
      ``sequential``: one after another in `client_order`, alone on the server, so the round's
      time is the sum of the clients' times.
    - `calls_server`: the client calls the server once per batch (`ctx.server.call`, split learning).
    - `supports_selection`: `load` puts the client's starting model in place, so a data-selection
      stage (`selection.name`) can run on it.
    - `robust_aggregation`: `aggregate` averages updates through the helpers that honour
      `server.aggregator` (median, trimmed mean, norm clipping; engine/robust.py).
    """

    schedule: ClassVar[Schedule] = "parallel"
    calls_server: ClassVar[bool] = False
    supports_selection: ClassVar[bool] = False
    robust_aggregation: ClassVar[bool] = False

    def setup(self, scenario: "Scenario") -> ServerState:
        """Required. Prepare the scenario's model and return the initial server state."""
        raise NotImplementedError

    def plan(self, cid: int, device: "DeviceProfile") -> tuple[dict[str, Any], int]:
        """Required. Client `cid`'s knobs (e.g. {"rank": 8}) and its estimated training memory
        in bytes; the loop refuses a client whose estimate does not fit its device."""
        raise NotImplementedError

    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        """Required. The message each sampled client downloads this round."""
        raise NotImplementedError

    def codecs(self, rnd: int, cids: list[int]) -> dict[int, dict[str, "str | Quant"]]:
        """Per client, message kind -> codec for this round (e.g. each device's activation bits).
        The loop applies them to the link; clients and kinds left out use `comm.*`."""
        return {}

    def client_order(self, rnd: int, cids: list[int]) -> list[int]:
        """`schedule = "sequential"`: the order the server serves this round's clients in."""
        return list(cids)

    def server_call(self, rnd: int) -> ServerCall | None:
        """`calls_server`: the server's handler of per-batch calls this round (each call and its
        reply cross the link); None for methods without a server in the loop."""
        return None

    def load(self, msg: Message, ctx: ClientContext) -> None:
        """`supports_selection`: put the downloaded model into `ctx.model` (data selection runs on it)."""
        raise NotImplementedError(f"{type(self).__name__} does not support data selection")

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        """Required (unless lockstep). Train locally on `ctx.data`; return the upload."""
        raise NotImplementedError

    def client_steps(self, msg: Message, ctx: ClientContext) -> Generator[int, None, Message]:
        """`schedule = "lockstep"`: local training as a generator that yields after every step and
        returns the upload."""
        raise NotImplementedError

    def barrier(self, rnd: int, k: int) -> None:
        """`schedule = "lockstep"`: every client of the round has finished local step `k`."""

    def expected_reply(self, down: Message, knobs: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
        """The names and shapes of the tensors a client's reply must carry, known from the message
        it downloaded and its knobs; the server rejects a reply that differs (engine/robust.py
        `check_reply`; finiteness is checked whatever this returns). None: no key or shape check.

        Split methods keep None: what a client holds follows its cut (which `CutPoints` may move),
        and most of what it sends crosses in per-batch server calls, which no reply check sees.
        """
        return None

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        """Required. Fold the round's replies (client-id order) into the server state."""
        raise NotImplementedError

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        """The round's method numbers, per-client rows, server work and radio (see RoundReport)."""
        return RoundReport()

    def observe(self, state: ServerState, rnd: int, costs: dict[int, Any]) -> None:
        """Each sampled client's simulated cost this round (system/cost.py `Cost`), e.g. for
        budgets that adapt to what a client could afford."""

    def eval_model(self, state: ServerState) -> torch.nn.Module:
        """Required. The global model to evaluate (the scenario's model, loaded from `state`)."""
        raise NotImplementedError

    def client_eval_model(self, state: ServerState, cid: int, client_state: dict) -> torch.nn.Module:
        """Client `cid`'s model for per-client evaluation (personalised methods); default global."""
        return self.eval_model(state)

    def payload(self, state: ServerState, rnd: int, cid: int, num_examples: int) -> tuple[int, int]:
        """Required for the method table's test. The analytic (down, up) bytes that client `cid`'s
        messages of round `rnd` take with lossless fp32 codecs when it trains on `num_examples`
        samples: from the model's shapes and the method's rules, not from the messages. The
        ledger must measure exactly this."""
        raise NotImplementedError

    def export(self, state: ServerState, out_dir) -> None:
        """At the end of a run: write artifacts (a PEFT adapter, a trade-off table) to `out_dir`."""


def weighted_mean(values: dict[int, float], weights: dict[int, float]) -> float:
    total = sum(weights.values())
    return sum(values[c] * weights[c] for c in sorted(values)) / total if total else float("nan")


def iter_sorted(replies: dict[int, Message]) -> Iterator[tuple[int, Message]]:
    """Replies in client-id order, so sums are bitwise independent of execution order."""
    for cid in sorted(replies):
        yield cid, replies[cid]
