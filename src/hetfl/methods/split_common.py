"""What the split-learning methods share, as components a method holds and functions it calls.

Each split method (fedv, fedvz, splitfed-v1, splitfed-v2, sl-vanilla, sflam) is one file that
subclasses `Method` only and reads top to bottom; the mechanics they have in common live here:

- `SplitConfig`: where to cut, per client (`cut`, `cut_by_tier`, or `cut: auto` from the device).
- `CutPoints`: the one owner of "which cut does client c use this round" and of what a valid
  cut is; the resource policy (`plan`), an allocation (sflam over `wireless.cuts`) and the
  client all ask it.
- `SplitExchange`: the head | body | tail split (models/split.py) as server and clients run it:
  the layout, the server's own copy of the model, the activation sizes at each cut, the
  activation messages, per-client server FLOPs, and the version-wise aggregation: for every
  parameter, the data-weighted mean over the round's clients of the version each client's
  training produced (the client's upload when it held the parameter, else the server-side
  version that served it). With one cut for everyone this is FedAvg of the client parts plus
  the method's own server rule; with per-client cuts a block is averaged over client copies and
  server copies alike.
- `local_steps`: a client's local training loop over its part.
- SplitFed's per-batch steps (`splitfed_client_update`, `splitfed_step`), its round's bytes
  (`splitfed_payload`), the sequential servers' order (`turn_order`) and SplitFed V1's one
  server copy per client (`ServerCopies`), for splitfed-v1/v2, sl-vanilla and sflam.
- Payload arithmetic (`step_sizes`, `SplitExchange.model_bytes`, `.act_bytes`, `.update_bytes`):
  the bytes a method's messages take with lossless fp32 codecs, for `Method.payload`.

Message kinds (per batch): up `activations` (cut activations, plus (B,) int32 `lengths` for
text; SplitFed adds the labels), `grad_outputs` (FedV); down `outputs`, `grad_cut`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Generator, Literal, TypeVar

import torch
import torch.nn.functional as F

from hetfl.config import Config, MethodConfig
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, RoundReport, ServerCall, ServerState
from hetfl.engine.split import ServerMeter
from hetfl.errors import ConfigError
from hetfl.methods.common import make_optimizer, optimizer_state_factor, reply_meta_nbytes
from hetfl.models.split import (SplitLayout, body_forward, count, cut_problem, head_forward, lengths_to_mask,
                               split_layout)
from hetfl.seeding import generator

T = TypeVar("T")

FP32 = 4  # bytes per element of an fp32 tensor (activations, gradients, parameters)
LABEL_BYTES = 8  # per sample: an int64 label (SplitFed sends them up)
LENGTH_BYTES = 4  # per sample: an int32 length (text: rebuilds the padding mask)
LOSS_BYTES = 4  # the fp32 batch loss SplitFed's server returns with the gradient


@dataclass(frozen=True)
class SplitConfig(MethodConfig):
    """Cut options shared by the split methods.

    `cut` is the number of transformer blocks a client keeps (0: stem only, the FedV paper's
    minimal head) or "auto": the largest cut that the device's speed allows (`auto_ref_flops`
    FLOP/s keeps all but one block, slower devices proportionally fewer) and whose client part
    fits in `auto_mem_fraction` of the device memory. `cut_by_tier` overrides per device tier.
    """

    cut: int | str = 0
    cut_by_tier: dict[str, int] = field(default_factory=dict)
    auto_ref_flops: float = 1.5e11  # FLOP/s of the shipped `laptop` tier
    auto_mem_fraction: float = 0.5
    weighting: Literal["examples", "uniform"] = "examples"

    def check(self):
        if isinstance(self.cut, str) and self.cut != "auto":
            yield "cut", f"expected a block count or 'auto', got {self.cut!r}"
        if isinstance(self.cut, int) and self.cut < 0:
            yield "cut", "must be >= 0"
        for tier, c in self.cut_by_tier.items():
            if c < 0:
                yield f"cut_by_tier.{tier}", "must be >= 0"
        if self.auto_ref_flops <= 0:
            yield "auto_ref_flops", "must be > 0"
        if not 0 < self.auto_mem_fraction <= 1:
            yield "auto_mem_fraction", "must be in (0, 1]"


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)


class CutPoints:
    """Which cut each client uses: the one owner of that choice and of its validity.

    `plan` (the resource policy, once per client) picks a client's cut from `cut_by_tier`, else
    `cut`, else (auto) from the device's speed and memory. An allocation may move clients to
    another cut (`assign`, sflam over `wireless.cuts`); since a client's knobs were fixed by
    `plan`, its cut then travels down in the model message's metadata (`meta`) and the client
    takes it from there (`on_client`).

    Args:
        mcfg: the method's cut options.
        num_blocks: blocks of the model; a cut must leave the server at least one.
        memory: a client's training bytes at a cut (for `auto`, and for a moved client).
        travels: whether an allocation may move clients after `plan`.
    """

    def __init__(self, mcfg: SplitConfig, num_blocks: int, memory: Callable[[int], int], travels: bool = False):
        self.mcfg, self.num_blocks, self.memory, self.travels = mcfg, num_blocks, memory, travels
        self._cut: dict[int, int] = {}

    def knobs(self, cid: int, device) -> tuple[dict, int]:
        """`Method.plan` of a split method: client `cid`'s knobs {"cut": c} and its training bytes."""
        cut = self.plan(cid, device)
        return {"cut": cut}, self.memory(cut)

    def check(self, cut: int, key: str) -> int:
        """`cut` if the server keeps at least one block, else ConfigError naming `key`."""
        problem = cut_problem(cut, self.num_blocks)
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")
        return cut

    def plan(self, cid: int, device) -> int:
        """Client `cid`'s cut on `device`: `cut_by_tier`, else `cut`, else (auto) speed and memory."""
        m, L = self.mcfg, self.num_blocks
        if device.name in m.cut_by_tier:
            c = self.check(m.cut_by_tier[device.name], f"method.cut_by_tier.{device.name}")
        elif m.cut != "auto":
            c = self.check(m.cut, "method.cut")
        else:
            c = min(L - 1, int((L - 1) * min(1.0, device.flops_per_s / m.auto_ref_flops)))
            while c > 0 and self.memory(c) > m.auto_mem_fraction * device.mem_mb * 2**20:
                c -= 1
        self._cut[cid] = c
        return c

    def of(self, cid: int) -> int:
        """The cut client `cid` uses now."""
        return self._cut[cid]

    def assign(self, cids: list[int], cut: int) -> None:
        """Move `cids` to `cut` (an allocation's choice) from this round on."""
        for c in cids:
            self._cut[c] = cut

    def meta(self, cid: int) -> dict[str, int]:
        """What the model message down tells the client about its cut (nothing if cuts never move)."""
        return {"cut": self._cut[cid]} if self.travels else {}

    def on_client(self, msg: Message, ctx: ClientContext) -> int:
        """On the client: the cut to train at, from the message (a moved cut) or the planned knobs;
        a moved cut also moves the client's memory estimate."""
        if "cut" in msg.meta:
            ctx.knobs["cut"] = msg.meta["cut"]
            ctx.mem_bytes = self.memory(ctx.knobs["cut"])
        return ctx.knobs["cut"]


class SplitExchange:
    """The head | body | tail split as the server and the clients run it.

    The client holds `client_names(cut)`: stem + first `cut` blocks, plus the tail when the split
    is U-shaped (`tail_on_client`, labels stay home); the server holds the rest in its own copy
    of the model, `server_model` (it never shares tensors with the clients' model), and answers
    per-batch calls through `ctx.server` (each crosses the link).

    Args:
        cfg: the run's config.
        name: the method's name (for messages).
        tail_on_client: U-shaped split (FedV); False: the server runs the tail (SplitFed).
    """

    def __init__(self, cfg: Config, name: str, tail_on_client: bool):
        self.cfg, self.name, self.tail_on_client = cfg, name, tail_on_client
        self.meter = ServerMeter()
        self.flops_by_client: dict[int, float] = {}
        self.round_cids: list[int] = []

    # -- layout ---------------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        """Lay out `scenario.model`, copy it for the server; the initial state is the whole model."""
        self.scenario = scenario
        task, model = scenario.task, scenario.model
        if not hasattr(model, "blocks") or not hasattr(model, "stem"):
            raise ConfigError(f"method.name: {self.name} needs a staged classifier (tiny-vit, minilm, mlp, cnn)")
        probe = task.collate(list(task.eval_samples[:2]))  # the server's own samples, for shapes only
        self.layout: SplitLayout = split_layout(model, probe)
        self.cut_elems, self.masked = self._probe_cuts(model, probe)
        self.server_model = copy.deepcopy(model)  # the server's copy: never shares tensors with clients
        for p in self.server_model.parameters():
            p.requires_grad_(False)
        return {"global": {n: p.detach().clone() for n, p in model.named_parameters()}}

    def _probe_cuts(self, model, probe) -> tuple[list[int], bool]:
        """Elements per sample of the activations at each cut (text: at `data.max_len` tokens),
        and whether a padding mask goes with them (text: it travels as lengths)."""
        out, masked = [], False
        with torch.no_grad():
            for c in range(self.layout.num_blocks):
                h, mask = head_forward(model, probe, c)
                n = h[0].numel()
                masked = mask is not None
                if masked:  # (T, D) at the probe's length -> at the longest padded length
                    t_max = self.cfg.data.max_len + (-self.cfg.data.max_len) % 16
                    n = n // h.shape[1] * t_max
                out.append(n)
        return out, masked

    def client_names(self, cut: int) -> tuple[str, ...]:
        return self.layout.head(cut) + (self.layout.tail if self.tail_on_client else ())

    def server_names(self, cut: int) -> tuple[str, ...]:
        return self.layout.body(cut) + (() if self.tail_on_client else self.layout.tail)

    def client_memory(self, cut: int) -> int:
        """Peak training bytes of the client part only: weights, grads and optimiser state of
        the client's parameters, plus activations of the stem, `cut` blocks and the tail."""
        from hetfl.system.memory import transformer_activation_bytes

        model, b = self.scenario.model, self.cfg.train.batch_size
        n = count(model, self.client_names(cut))
        elems = self.cut_elems[cut]  # per sample at the cut
        act = 3 * b * elems * 4  # stem output, cut tensor and its gradient (fp32)
        c = getattr(model, "config", None)
        if cut and c is not None and hasattr(c, "hidden_size"):
            act += transformer_activation_bytes(b, elems // c.hidden_size, c.hidden_size, cut,
                                                intermediate=getattr(c, "intermediate_size", None))
        elif cut:
            act += 2 * cut * b * max(self.cut_elems[: cut + 1]) * 4  # conv/MLP blocks: input + pre-activation
        return int(n * 4 * (2 + optimizer_state_factor(self.cfg)) + act)

    # -- round ----------------------------------------------------------------------------
    def begin_round(self, state: ServerState, cids: list[int], train: bool) -> None:
        """The server copy starts every round at the global model, in training mode if `train`
        (dropout etc. as in full fine-tuning; False: a frozen, deterministic body)."""
        self.meter.flops = 0.0
        self.flops_by_client = {}
        self.round_cids = list(cids)
        with torch.no_grad():
            for n, p in self.server_model.named_parameters():
                p.copy_(state["global"][n])
        self.server_model.train(train)

    def model_messages(self, state: ServerState, cids: list[int], cuts: CutPoints) -> dict[int, Message]:
        """Each client's part of the global model (and, if cuts move, its cut) down."""
        return {cid: Message({n: state["global"][n] for n in self.client_names(cuts.of(cid))}, cuts.meta(cid))
                for cid in cids}

    def handler(self, serve: ServerCall) -> ServerCall:
        """`serve` with the server FLOPs it spends per client metered (its share of the server's time)."""
        def handle(cid: int, kind: str, msg: Message) -> Message:
            before = self.meter.flops
            reply = serve(cid, kind, msg)
            self.flops_by_client[cid] = self.flops_by_client.get(cid, 0.0) + self.meter.flops - before
            return reply

        return handle

    @staticmethod
    def send_activations(h: torch.Tensor, mask, extra: dict | None = None) -> Message:
        """The up message for activations `h` at the cut (plus (B,) lengths for text)."""
        t = {"h": h.detach()}
        if mask is not None:
            t["lengths"] = mask.sum(1).to(torch.int32)  # right padding: lengths rebuild the mask
        return Message({**t, **(extra or {})}, kind="activations")

    @staticmethod
    def received(msg: Message) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Server side: the activations (a fresh leaf) and the rebuilt padding mask."""
        z = msg.tensors["h"].detach()
        return z, lengths_to_mask(msg.tensors.get("lengths"), z.shape[1] if z.dim() > 2 else 0)

    # -- aggregation ------------------------------------------------------------------------
    def aggregate(self, state: ServerState, replies: dict[int, Message], weighting: str,
                  server_version: Callable[[int, str], torch.Tensor | None]) -> ServerState:
        """The version-wise mean (module docstring) into `state["global"]`.

        Args:
            state: the server state; its "global" is replaced.
            replies: the round's uploads (deltas of the parameters each client sends up).
            weighting: "examples" (data-weighted) or "uniform".
            server_version: (cid, name) -> the server-side value of `name` that served client
                `cid`, or None where no server-side version of it trained for that client
                (frozen, or a personal part kept on the client): the global value stays.
        """
        w = {c: (float(m.meta[NUM_EXAMPLES]) if weighting == "examples" else 1.0) for c, m in replies.items()}
        total = sum(w.values())
        g, new = state["global"], {}
        for n in g:
            versions = []
            for cid in sorted(replies):
                m = replies[cid]
                if n in m.tensors:
                    versions.append(g[n] + m.tensors[n])
                else:
                    v = server_version(cid, n)
                    versions.append(g[n] if v is None else v)
            if all(v is g[n] or torch.equal(v, g[n]) for v in versions):
                new[n] = g[n]  # untouched (frozen, personal): stays bit-identical, no rounding drift
            else:
                new[n] = sum(v * (w[cid] / total) for cid, v in zip(sorted(replies), versions))
        state["global"] = new
        return state

    # -- evaluation, report, payload ----------------------------------------------------------
    def eval_model(self, state: ServerState) -> torch.nn.Module:
        model = self.scenario.model
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["global"].items():
                params[n].copy_(t)
        return model

    def report(self, cuts: CutPoints) -> RoundReport:
        """Server FLOPs, client part sizes and cuts of the round, and each client's server work."""
        held = [count(self.scenario.model, self.client_names(cuts.of(c))) for c in self.round_cids]
        return RoundReport(stats={"server_flops": self.meter.flops, "client_params_max": max(held),
                                  "client_params_mean": sum(held) / len(held),
                                  "cut_mean": sum(cuts.of(c) for c in self.round_cids) / len(self.round_cids)},
                           server_flops=dict(self.flops_by_client))

    def model_bytes(self, cuts: CutPoints, cid: int) -> int:
        """The model message down (`model_messages`): the client part in fp32 and its metadata."""
        return self.params_bytes(self.client_names(cuts.of(cid))) + Message(meta=cuts.meta(cid)).meta_nbytes()

    def params_bytes(self, names) -> int:
        """fp32 bytes of the named parameters."""
        return FP32 * count(self.scenario.model, tuple(names))

    def act_bytes(self, cut: int, samples: int) -> int:
        """fp32 bytes of the activations of `samples` samples at `cut`, with their int32 lengths
        for text. Text batches pad to their longest sample, so this is the bound at `data.max_len`;
        images are exact."""
        return samples * (FP32 * self.cut_elems[cut] + (LENGTH_BYTES if self.masked else 0))

    def update_bytes(self, cid: int, names, num_examples: int) -> int:
        """The upload: fp32 deltas of `names` plus its metadata, the sample count and the training
        loss. No shape gives the loss's JSON length: it is counted at `TYPICAL_LOSS`'s (common.py),
        as every method's payload counts it."""
        return self.params_bytes(names) + reply_meta_nbytes(num_examples)


def step_sizes(cfg: Config, num_examples: int) -> list[int]:
    """Samples in each local step of a client with `num_examples` samples: `task.batches` draws
    `train.steps_for(n)` batches of min(batch_size, n) samples each (tasks/base.py `batch_indices`)."""
    return [min(cfg.train.batch_size, num_examples)] * cfg.train.steps_for(num_examples)


def trainable(model: torch.nn.Module, names) -> dict[str, torch.nn.Parameter]:
    """Set requires_grad on exactly `names` of `model`; return those parameters in model order."""
    names, out = set(names), {}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            out[n] = p
    return out


def load_part(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the downloaded part into the client's model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def local_steps(ctx: ClientContext, cfg: Config, params: dict[str, torch.nn.Parameter],
                step: Callable[[int, dict], float], lockstep: bool = False) -> Generator[int, None, float]:
    """A client's local training of `params` as a generator that yields after every step and
    returns the mean loss; `step(k, batch)` runs step k's forward and backward (with its server
    calls) and returns its loss. A fresh optimiser per round (no optimiser state persists).

    `lockstep`: the shared worker model serves other clients between two steps, so the client's
    part (values; its optimiser state lives in its own optimiser) is parked across the yield
    and put back, with its trainable flags, before the next step.
    """
    opt = make_optimizer(list(params.values()), cfg)
    losses = []
    t = cfg.train
    batches = ctx.task.batches(ctx.data, t.steps_for(len(ctx.data)), t.batch_size, ctx.generator("batches"))
    for k, batch in enumerate(batches):
        ctx.model.train()
        opt.zero_grad(set_to_none=True)
        losses.append(step(k, batch))
        opt.step()
        if lockstep:
            parked = {n: p.detach().clone() for n, p in params.items()}
        yield k
        if lockstep:
            trainable(ctx.model, params)  # this client's trainable set (cuts differ between clients)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(parked[n])
    opt.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


def run_to_end(steps: Generator[int, None, T]) -> T:
    """Drive a `local_steps`-style generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


# -- SplitFed (Thapa et al., AAAI 2022; spec/sflam.md section 9) --------------------------------
# The client holds the head only and sends its activations with the labels; the server runs body
# and tail, computes the loss, steps its own optimiser and returns the gradient at the cut.
# Per local step (B samples, E activation elements per sample at the cut):
#     up   activations: B*E*4 bytes (fp32) + B*8 (int64 labels) [+ B*4 int32 text lengths]
#     down grad_cut:    B*E*4 bytes + 4 (the fp32 batch loss, for the client's log)

def splitfed_client_update(split: SplitExchange, cuts: CutPoints, cfg: Config, msg: Message,
                           ctx: ClientContext) -> Message:
    """A SplitFed client's round: train the head against the server, send the head's deltas up."""
    load_part(ctx.model, msg.tensors)
    cut = cuts.on_client(msg, ctx)
    params = trainable(ctx.model, split.client_names(cut))
    model = ctx.model

    def step(k: int, batch: dict) -> float:
        key = ctx.task.flop_key(batch)
        h, mask = ctx.compute(("splitfed-head-fwd", cut, key), lambda: head_forward(model, batch, cut))
        reply = ctx.server.call("activations", split.send_activations(h, mask, {"labels": batch["labels"]}))
        ctx.compute(("splitfed-head-bwd", cut, key), lambda: h.backward(reply.tensors["g"]))
        return float(reply.tensors["loss"])

    loss = run_to_end(local_steps(ctx, cfg, params, step))
    up = {n: p.detach() - msg.tensors[n] for n, p in params.items()}
    return Message(up, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: loss})


def splitfed_step(split: SplitExchange, cut: int, msg: Message, opt: torch.optim.Optimizer) -> Message:
    """The server's answer to one batch of activations: body + tail forward, loss, backward, one
    step of `opt` (over the server copy's trained part); the gradient at the cut and the loss down."""
    z, mask = split.received(msg)
    z.requires_grad_(True)
    labels, model = msg.tensors["labels"], split.server_model

    def step():
        loss = per_sample_ce(model.tail(body_forward(model, z, mask, cut), mask), labels).mean()
        loss.backward()
        return loss

    loss = split.meter.compute(("splitfed", cut, tuple(z.shape)), step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return Message({"g": z.grad, "loss": loss.detach().reshape(1)}, kind="grad_cut")


def splitfed_payload(split: SplitExchange, cuts: CutPoints, cfg: Config, cid: int,
                     num_examples: int) -> tuple[int, int]:
    """(down, up) fp32 bytes of a SplitFed client's round: its head down, the head's deltas up,
    and per step the activations with the labels up and the cut gradient with the loss down."""
    cut = cuts.of(cid)
    down = split.model_bytes(cuts, cid)
    up = split.update_bytes(cid, split.client_names(cut), num_examples)
    for b in step_sizes(cfg, num_examples):
        down += FP32 * split.cut_elems[cut] * b + LOSS_BYTES
        up += split.act_bytes(cut, b) + LABEL_BYTES * b
    return down, up


def turn_order(seed: int, rnd: int, cids: list[int]) -> list[int]:
    """The order a sequential server (SplitFed V2, vanilla SL) serves a round's clients in: a
    permutation seeded by (seed, round) only, never by the simulator's execution order."""
    perm = torch.randperm(len(cids), generator=generator(seed, rnd, "splitfed-v2-order"))
    return [cids[i] for i in perm.tolist()]


class ServerCopies:
    """SplitFed V1's server side: one copy of the trained server part per client, each starting
    from the global model (run in parallel in deployment). The server model holds the copy of
    the client being served; the others are parked here, and averaged at round end through
    `version`.

    Args:
        split: the exchange whose `server_model` serves.
        cfg: the run's config (the server copies' optimiser is the clients' one).
    """

    def __init__(self, split: SplitExchange, cfg: Config):
        self.split, self.cfg = split, cfg

    def begin_round(self, state: ServerState) -> None:
        self.global_ = state["global"]
        self.trained: dict[int, dict[str, torch.Tensor]] = {}  # cid -> its trained server copy
        self.current, self.names, self.opt = None, (), None

    def serving(self, cid: int, names) -> torch.optim.Optimizer:
        """Make the server model hold `cid`'s copy of `names`; that copy's optimiser."""
        if self.current != cid:  # a new client: park the previous copy, start from the global one
            self.park()
            params = dict(self.split.server_model.named_parameters())
            with torch.no_grad():
                for n in names:
                    params[n].copy_(self.global_[n])
            self.current, self.names = cid, tuple(names)
            self.opt = make_optimizer(list(trainable(self.split.server_model, names).values()), self.cfg)
        return self.opt

    def park(self) -> None:
        """Keep the served client's copy (at round end: the last one)."""
        if self.current is not None:
            params = dict(self.split.server_model.named_parameters())
            self.trained[self.current] = {n: params[n].detach().clone() for n in self.names}
            self.current = None

    def version(self, cid: int, name: str) -> torch.Tensor:
        """Client `cid`'s trained copy of `name` (the global value if the server never served it)."""
        return self.trained[cid][name] if cid in self.trained else self.global_[name]
