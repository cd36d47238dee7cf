"""What the split-learning methods (fedv, fedvz, splitfed-v1/v2) share.

- `SplitConfig`: where to cut, per client (`cut`, `cut_by_tier`, or `cut: auto` from the device).
- `SplitMethod`: the method contract around a head | body | tail split (models/split.py). The
  client holds `client_names(cut)` (stem + first `cut` blocks, plus the tail when the split is
  U-shaped); the server holds the rest in its own copy of the model, `server_model`, and
  answers per-batch calls through `ctx.server` (each crosses the link). A subclass writes the
  client's step (`client_step`) and the server's answer (`serve`).
- Aggregation: for every parameter, the data-weighted mean over the round's clients of the
  version each client's training produced: the client's upload when it held the parameter,
  otherwise the server-side version that served it (`server_version`). With one cut for
  everyone this is FedAvg of heads and tails plus the method's own server-body rule; with
  per-client cuts a block is averaged over client copies and the server copy alike.

Message kinds (per batch): up `activations` (cut activations, plus (B,) int32 `lengths` for
text; SplitFed adds the labels), `grad_outputs` (FedV); down `outputs`, `grad_cut`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from hetfl.config import Config, MethodConfig
from hetfl.engine.api import NUM_EXAMPLES, TRAIN_LOSS, ClientContext, Message, Method, RoundReport, ServerState
from hetfl.engine.split import ServerMeter
from hetfl.errors import ConfigError
from hetfl.methods.common import make_optimizer, optimizer_state_factor
from hetfl.models.split import SplitLayout, body_forward, count, head_forward, lengths_to_mask, split_layout


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


class SplitMethod(Method):
    """Base of the split methods; see the module docstring."""

    calls_server = True

    tail_on_client = True  # U-shaped (labels stay home); False: the server runs the tail (SplitFed)

    def __init__(self, cfg: Config, mcfg: SplitConfig):
        self.cfg, self.mcfg = cfg, mcfg
        self.cuts: dict[int, int] = {}
        self.meter = ServerMeter()

    # -- layout -----------------------------------------------------------------------
    def setup(self, scenario) -> ServerState:
        self.scenario = scenario
        task, model = scenario.task, scenario.model
        if not hasattr(model, "blocks") or not hasattr(model, "stem"):
            raise ConfigError(f"method.name: {self.mcfg.name} needs a staged classifier (tiny-vit, minilm, mlp, cnn)")
        probe = task.collate(list(task.eval_samples[:2]))  # the server's own samples, for shapes only
        self.layout: SplitLayout = split_layout(model, probe)
        self.cut_elems = self._cut_elems(model, probe)
        self.server_model = copy.deepcopy(model)  # the server's copy: never shares tensors with clients
        for p in self.server_model.parameters():
            p.requires_grad_(False)
        return {"global": {n: p.detach().clone() for n, p in model.named_parameters()}}

    def _cut_elems(self, model, probe) -> list[int]:
        """Elements per sample of the activations at each cut (text: at `data.max_len` tokens)."""
        out = []
        with torch.no_grad():
            for c in range(self.layout.num_blocks):
                h, mask = head_forward(model, probe, c)
                n = h[0].numel()
                if mask is not None:  # (T, D) at the probe's length -> at the longest padded length
                    t_max = self.cfg.data.max_len + (-self.cfg.data.max_len) % 16
                    n = n // h.shape[1] * t_max
                out.append(n)
        return out

    def client_names(self, cut: int) -> tuple[str, ...]:
        return self.layout.head(cut) + (self.layout.tail if self.tail_on_client else ())

    def server_names(self, cut: int) -> tuple[str, ...]:
        return self.layout.body(cut) + (() if self.tail_on_client else self.layout.tail)

    # -- per-client knobs ---------------------------------------------------------------
    def cut_for(self, device) -> int:
        """The cut for a device: `cut_by_tier`, else `cut`, else (auto) speed and memory."""
        L, m = self.layout.num_blocks, self.mcfg
        if device.name in m.cut_by_tier:
            c = m.cut_by_tier[device.name]
            self.layout.check_cut(c, f"method.cut_by_tier.{device.name}")
            return c
        if m.cut != "auto":
            self.layout.check_cut(m.cut, "method.cut")
            return m.cut
        c = min(L - 1, int((L - 1) * min(1.0, device.flops_per_s / m.auto_ref_flops)))
        while c > 0 and self.client_memory(c) > m.auto_mem_fraction * device.mem_mb * 2**20:
            c -= 1
        return c

    def plan(self, cid: int, device) -> tuple[dict, int]:
        c = self.cuts[cid] = self.cut_for(device)
        return {"cut": c}, self.client_memory(c)

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

    # -- round ---------------------------------------------------------------------------
    def configure(self, state: ServerState, rnd: int, cids: list[int]) -> dict[int, Message]:
        self.meter.flops = 0.0
        self.server_flops_by_client: dict[int, float] = {}
        self.round_cids = list(cids)
        with torch.no_grad():  # the server copy starts every round at the global model
            for n, p in self.server_model.named_parameters():
                p.copy_(state["global"][n])
        self.server_model.train(self.server_trains())  # dropout etc. as in full fine-tuning
        self.begin_round(state, rnd, cids)
        return {cid: Message({n: state["global"][n] for n in self.client_names(self.cuts[cid])}) for cid in cids}

    def begin_round(self, state: ServerState, rnd: int, cids: list[int]) -> None:
        """Subclass hook: set up the round's server-side state."""

    def server_trains(self) -> bool:
        """Whether the server part runs in training mode (False: a frozen, deterministic body)."""
        return True

    def server_call(self, rnd: int):
        def handle(cid: int, kind: str, msg: Message) -> Message:
            before = self.meter.flops  # server FLOPs per client: its share of the server's time
            reply = self.serve(cid, kind, msg)
            self.server_flops_by_client[cid] = self.server_flops_by_client.get(cid, 0.0) + self.meter.flops - before
            return reply

        return handle

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        raise NotImplementedError

    def load(self, msg: Message, ctx: ClientContext) -> None:
        params = dict(ctx.model.named_parameters())
        with torch.no_grad():
            for n, t in msg.tensors.items():
                params[n].copy_(t)

    def client_update(self, msg: Message, ctx: ClientContext) -> Message:
        steps = self.client_steps(msg, ctx)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def client_steps(self, msg: Message, ctx: ClientContext):
        """Local training as a generator that yields after every step and returns the upload.

        Under lockstep the shared worker model serves other clients between two steps, so the
        client's part (values; its optimiser state lives in its own optimiser) is parked here
        across the yield and put back before the next step.
        """
        self.load(msg, ctx)
        if "cut" in msg.meta:  # a cut chosen for this round (e.g. by sflam's allocation)
            ctx.knobs["cut"] = msg.meta["cut"]
            ctx.mem_bytes = self.client_memory(ctx.knobs["cut"])
        cut = ctx.knobs["cut"]
        params = self.client_params(ctx)
        opt = make_optimizer(list(params.values()), self.cfg)
        losses = []
        t = self.cfg.train
        for k, batch in enumerate(ctx.task.batches(ctx.data, t.steps_for(len(ctx.data)), t.batch_size, ctx.generator("batches"))):
            ctx.model.train()
            opt.zero_grad(set_to_none=True)
            losses.append(self.client_step(ctx, cut, k, batch))
            opt.step()
            if self.schedule == "lockstep":
                parked = {n: p.detach().clone() for n, p in params.items()}
            yield k
            if self.schedule == "lockstep":
                self.client_params(ctx, reload=False)  # this client's trainable set (cuts differ)
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(parked[n])
        opt.zero_grad(set_to_none=True)
        self.finish_client(ctx, params)
        up = {n: p.detach() - msg.tensors[n] for n, p in params.items() if n in self.uploaded(cut)}
        return Message(up, {NUM_EXAMPLES: len(ctx.data), TRAIN_LOSS: sum(losses) / len(losses)})

    def client_params(self, ctx: ClientContext, reload: bool = True) -> dict[str, torch.nn.Parameter]:
        """The client's trainable tensors (requires_grad on exactly these). `reload=False`:
        only set the flags (subclasses that restore private parts skip that)."""
        names = set(self.client_names(ctx.knobs["cut"]))
        out = {}
        for n, p in ctx.model.named_parameters():
            p.requires_grad_(n in names)
            if n in names:
                out[n] = p
        return out

    def uploaded(self, cut: int) -> tuple[str, ...]:
        return self.client_names(cut)

    def barrier(self, rnd: int, k: int) -> None:
        """Lockstep only: every client of the round has finished local step `k`."""

    def finish_client(self, ctx: ClientContext, params: dict) -> None:
        """Subclass hook: keep personal parts in `ctx.state` after local training."""

    def client_step(self, ctx: ClientContext, cut: int, k: int, batch: dict) -> float:
        raise NotImplementedError

    def send_activations(self, h: torch.Tensor, mask, extra: dict | None = None) -> Message:
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

    # -- aggregation ---------------------------------------------------------------------
    def server_version(self, cid: int, name: str) -> torch.Tensor:
        """The server-side value of `name` that served client `cid` this round."""
        return dict(self.server_model.named_parameters())[name].detach()

    def aggregate(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> ServerState:
        if not replies:
            return state
        self.end_round(state, rnd, replies)
        w = {c: (float(m.meta[NUM_EXAMPLES]) if self.mcfg.weighting == "examples" else 1.0) for c, m in replies.items()}
        total = sum(w.values())
        g, server = state["global"], {n: p for n, p in self.server_model.named_parameters()}
        new = {}
        for n in g:
            versions = []
            for cid in sorted(replies):
                m = replies[cid]
                if n in m.tensors:
                    versions.append(g[n] + m.tensors[n])
                elif n in self.server_names(self.cuts[cid]):
                    versions.append(self.server_version(cid, n) if n in server else g[n])
                else:
                    versions.append(g[n])  # a personal part kept on the client: the global copy stays
            if all(v is g[n] or torch.equal(v, g[n]) for v in versions):
                new[n] = g[n]  # untouched (frozen, personal): stays bit-identical, no rounding drift
            else:
                new[n] = sum(v * (w[cid] / total) for cid, v in zip(sorted(replies), versions))
        state["global"] = new
        return state

    def end_round(self, state: ServerState, rnd: int, replies: dict[int, Message]) -> None:
        """Subclass hook: finish the server side (e.g. apply accumulated body steps)."""

    # -- evaluation and stats -------------------------------------------------------------
    def eval_model(self, state: ServerState) -> torch.nn.Module:
        model = self.scenario.model
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["global"].items():
                params[n].copy_(t)
        return model

    def report(self, state: ServerState, rnd: int, cids: list[int]) -> RoundReport:
        held = [count(self.scenario.model, self.client_names(self.cuts[c])) for c in self.round_cids]
        return RoundReport(stats={"server_flops": self.meter.flops, "client_params_max": max(held),
                                  "client_params_mean": sum(held) / len(held),
                                  "cut_mean": sum(self.cuts[c] for c in self.round_cids) / len(self.round_cids)},
                           server_flops=dict(self.server_flops_by_client))


class SplitFedBase(SplitMethod):
    """Vanilla SplitFed (Thapa et al., AAAI 2022; spec/sflam.md section 9): the client holds
    the head only and sends its activations with the labels; the server runs body and tail,
    computes the loss, steps its own optimiser and returns the gradient at the cut.

    Per local step (B samples, E activation elements per sample at the cut):
        up   activations: B*E*4 bytes (fp32) + B*8 (int64 labels) [+ B*4 int32 text lengths]
        down grad_cut:    B*E*4 bytes + 4 (the fp32 batch loss, for the client's log)
    Subclasses choose which server model copy serves a client (`server_model_for`).
    """

    tail_on_client = False

    def server_model_for(self, cid: int) -> torch.optim.Optimizer:
        """Make `server_model` hold the copy serving `cid`; return that copy's optimiser."""
        raise NotImplementedError

    def serve(self, cid: int, kind: str, msg: Message) -> Message:
        if kind != "activations":
            raise ValueError(f"{self.mcfg.name} server: unknown message kind {kind!r}")
        cut = self.cuts[cid]
        opt = self.server_model_for(cid)
        z, mask = self.received(msg)
        z.requires_grad_(True)
        labels, model = msg.tensors["labels"], self.server_model

        def step():
            loss = per_sample_ce(model.tail(body_forward(model, z, mask, cut), mask), labels).mean()
            loss.backward()
            return loss

        loss = self.meter.compute(("splitfed", cut, tuple(z.shape)), step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return Message({"g": z.grad, "loss": loss.detach().reshape(1)}, kind="grad_cut")

    def client_step(self, ctx: ClientContext, cut: int, k: int, batch: dict) -> float:
        model, key = ctx.model, ctx.task.flop_key(batch)
        h, mask = ctx.compute(("splitfed-head-fwd", cut, key), lambda: head_forward(model, batch, cut))
        reply = ctx.server.call("activations", self.send_activations(h, mask, {"labels": batch["labels"]}))
        ctx.compute(("splitfed-head-bwd", cut, key), lambda: h.backward(reply.tensors["g"]))
        return float(reply.tensors["loss"])

    def train_server_part(self, names) -> list[torch.nn.Parameter]:
        """Set requires_grad on exactly `names` of the server copy; return those parameters."""
        names, out = set(names), []
        for n, p in self.server_model.named_parameters():
            p.requires_grad_(n in names)
            if n in names:
                out.append(p)
        return out
