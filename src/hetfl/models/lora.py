"""LoRA adapters injected by target-module name, saved and loaded in PEFT's adapter format.

A LoRA layer adds a low-rank update to a frozen linear map:

    y = base(x) + scaling * B (A dropout(x)),   A: (r, in), B: (out, r), scaling = alpha / r

Adapters go in by module name (exact, suffix or regex, with an exclude list) and may use a
different rank per module. Every adapter parameter is named ``lora_A`` / ``lora_B``, so "adapter
only" is the name filter ``"lora_" in name``; only those tensors cross the network.

The on-disk format is PEFT's (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_{A,B}.weight``), so an adapter trained here loads with
``peft.PeftModel.from_pretrained`` and vice versa. The code is ours; only the format is shared.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from hetfl.errors import ConfigError, DataError

__all__ = [
    "LoRALinear",
    "count_trainable",
    "find_target_modules",
    "inject_lora",
    "load_lora_state_dict",
    "load_peft_adapter",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "merged",
    "save_peft_adapter",
    "unmerge_lora",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
_DEFAULT_SEED = 0  # used when no generator is given, so init never reads torch's global RNG


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: The linear layer to adapt. It is kept (not copied) and its parameters are frozen.
        rank: LoRA rank r, 1 <= r <= min(in_features, out_features).
        alpha: LoRA alpha; ``scaling`` starts at ``alpha / rank``.
        dropout: Dropout probability on the LoRA input path only (the base path sees clean x).
        generator: RNG for initialising ``lora_A``; a fresh one seeded 0 when None.
        name: Module name used in error messages.

    Raises:
        ConfigError: If the rank is out of range for this layer.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.base = base
        self.name = name or "<unnamed>"
        self.alpha = float(alpha)
        self.merged = False
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)
        self.set_rank(rank, generator)

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    # Some model code reads `layer.weight` (dtype/device probes); point it at the frozen base.
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    @property
    def rank(self) -> int:
        """Current LoRA rank r."""
        return self.lora_A.shape[0]

    def set_rank(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Re-allocates ``lora_A`` (r, in) and ``lora_B`` (out, r) at a new rank, freshly set up.

        A is Kaiming-uniform (a=sqrt(5), PEFT's default), B is zero, so the layer starts equal to
        its base. ``scaling`` is reset to ``alpha / rank``; callers that use another scaling
        (e.g. FSLoRA's s*r/k) set it again afterwards.

        Args:
            rank: New rank, 1 <= rank <= min(in_features, out_features).
            generator: RNG for A; a fresh one seeded 0 when None.

        Raises:
            ConfigError: If the rank is out of range.
            RuntimeError: If the layer is merged (unmerge would then subtract the wrong update).
        """
        n_in, n_out = self.base.in_features, self.base.out_features
        if rank < 1:
            raise ConfigError(f"lora.rank: rank {rank} must be at least 1 (layer {self.name})")
        if rank > min(n_in, n_out):
            raise ConfigError(
                f"lora.rank: rank {rank} is larger than layer {self.name} ({n_in} x {n_out})"
            )
        if self.merged:
            raise RuntimeError(f"set_rank on merged LoRA layer {self.name}; unmerge first")
        if generator is None:
            generator = torch.Generator().manual_seed(_DEFAULT_SEED)
        # Initialise on CPU in fp32 with the caller's generator, then move: the values then do
        # not depend on the device or dtype the model lives on.
        a = torch.empty(rank, n_in)  # (r, in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        w = self.base.weight
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, device=w.device, dtype=w.dtype))
        self.scaling = self.alpha / rank

    def delta_weight(self) -> Tensor:
        """The dense update scaling * B @ A, shape (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return y
        h = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.T  # (..., r)
        return y + (self.scaling * (h @ self.lora_B.T)).to(y.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Adds scaling * B @ A into ``base.weight`` in place; forward then skips the LoRA path."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the update merged by :meth:`merge` (exact up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def _name_matches(name: str, pattern: str) -> bool:
    # PEFT's list semantics: exact module name, or a suffix on a "." boundary.
    return name == pattern or name.endswith("." + pattern)


def find_target_modules(
    model: nn.Module,
    targets: Sequence[str] = (),
    regex: str | None = None,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Names of the ``nn.Linear`` modules to adapt, in ``named_modules`` order.

    A module matches if its full name equals a target or ends with ``"." + target``, or if
    ``regex`` fullmatches its name; it is dropped if its name equals or ends with an ``exclude``
    entry. Linear layers inside an existing :class:`LoRALinear` are never matched.

    Args:
        model: The model to search.
        targets: Exact names or name suffixes, e.g. ``("q_proj", "v_proj")``.
        regex: A pattern that must match the whole module name.
        exclude: Exact names or suffixes to leave out.

    Returns:
        The matching module names.

    Raises:
        ConfigError: If no module matches.
    """
    if isinstance(targets, str):  # a bare string would otherwise be iterated per character
        targets = (targets,)
    if isinstance(exclude, str):
        exclude = (exclude,)
    inside_lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rpartition(".")[0] in inside_lora:
            continue
        hit = any(_name_matches(name, t) for t in targets) or (
            regex is not None and re.fullmatch(regex, name) is not None
        )
        if hit and not any(_name_matches(name, e) for e in exclude):
            found.append(name)
    if not found:
        raise ConfigError(
            f"lora.targets: no module matches targets={list(targets)} regex={regex!r} "
            f"exclude={list(exclude)} (only nn.Linear modules can be adapted)"
        )
    return found


def _rank_for(name: str, rank: int, overrides: Mapping[str, int]) -> int:
    # The longest (most specific) matching pattern wins, so "layers.0.q_proj" beats "q_proj".
    hits = [p for p in overrides if _name_matches(name, p)]
    return overrides[max(hits, key=len)] if hits else rank


def inject_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = (),
    regex: str | None = None,
    exclude: Sequence[str] = (),
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    rank_overrides: Mapping[str, int] | None = None,
) -> list[str]:
    """Replaces matching ``nn.Linear`` modules by :class:`LoRALinear` in place and freezes the rest.

    Afterwards only parameters whose name contains ``lora_`` require grad.

    Args:
        model: The model to adapt (modified in place).
        rank: Default LoRA rank.
        alpha: LoRA alpha; each layer's scaling is alpha / its rank.
        targets, regex, exclude: See :func:`find_target_modules`.
        dropout: Dropout probability on the LoRA input path.
        generator: RNG for the A matrices, consumed in module order; seeded 0 when None.
        rank_overrides: Module name (exact or suffix) -> rank, for per-module ranks. The longest
            matching pattern wins.

    Returns:
        The adapted module names.

    Raises:
        ConfigError: If nothing matches, an override matches no adapted module, or a rank does not
            fit its layer.
    """
    names = find_target_modules(model, targets, regex, exclude)
    overrides = dict(rank_overrides or {})
    for pattern in overrides:
        if not any(_name_matches(n, pattern) for n in names):
            raise ConfigError(f"lora.rank_overrides: {pattern!r} matches no adapted module")
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(
            getattr(parent, child),
            _rank_for(name, rank, overrides),
            alpha,
            dropout=dropout,
            generator=generator,
            name=name,
        )
        setattr(parent, child, layer)
    for pname, p in model.named_parameters():
        p.requires_grad_("lora_" in pname)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` modules of ``model`` by name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_trainable(model: nn.Module) -> int:
    """Number of scalar parameters with ``requires_grad`` (r * (in + out) per LoRA layer)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors, keyed ``"<module>.lora_A"`` and ``"<module>.lora_B"``.

    The tensors are detached views that share memory with the parameters (no copy): they change
    when the model trains. Clone them to keep a snapshot.
    """
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A"] = m.lora_A.detach()  # (r, in)
        state[f"{name}.lora_B"] = m.lora_B.detach()  # (out, r)
    return state


def load_lora_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], strict: bool = True
) -> None:
    """Copies adapter tensors into the model's LoRA layers.

    If a layer's stored rank differs from its current one (consistently in A and B), the layer
    is re-allocated with :meth:`LoRALinear.set_rank` first, which resets its scaling to
    alpha / new rank.

    Args:
        model: A model with LoRA layers.
        state: Tensors keyed as :func:`lora_state_dict` returns them.
        strict: If True, every LoRA layer must get both tensors and no key may be left over.

    Raises:
        ConfigError: On missing or unexpected keys (strict), or shapes that do not fit; the
            message names the key.
    """
    modules = lora_modules(model)
    expected = {f"{n}.{k}" for n in modules for k in ("lora_A", "lora_B")}
    if strict:
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ConfigError(f"lora state: missing keys {missing}, unexpected keys {unexpected}")
    for name, m in modules.items():
        a, b = state.get(f"{name}.lora_A"), state.get(f"{name}.lora_B")
        if a is None and b is None:
            continue
        if a is None or b is None:
            raise ConfigError(f"lora state: {name} needs both lora_A and lora_B")
        if a.shape[1:] != (m.in_features,) or b.shape[:1] != (m.out_features,) or (
            a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]
        ):
            raise ConfigError(
                f"lora state: {name}.lora_A {tuple(a.shape)} / {name}.lora_B {tuple(b.shape)} do "
                f"not fit layer ({m.in_features} x {m.out_features}), rank {m.rank}"
            )
        if a.shape[0] != m.rank:
            m.set_rank(a.shape[0])
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)


def merge_lora(model: nn.Module) -> None:
    """Merges every LoRA layer into its base weight (see :meth:`LoRALinear.merge`)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undoes :func:`merge_lora`."""
    for m in lora_modules(model).values():
        m.unmerge()


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: LoRA merged into the base weights inside, unmerged on exit."""
    merge_lora(model)
    try:
        yield model
    finally:
        unmerge_lora(model)


def _condense_targets(model: nn.Module, names: list[str]) -> list[str]:
    # Prefer short suffixes ("q_proj") when they pick out exactly the adapted set; fall back to
    # full names so that PEFT, which matches by suffix, adapts no extra module.
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    picked = {
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoRALinear)) and any(_name_matches(n, s) for s in suffixes)
    }
    return suffixes if picked == set(names) else sorted(names)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written adapter behind


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str,
    alpha: float,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Writes the model's LoRA layers as a PEFT adapter folder.

    The most common rank becomes ``r``; other ranks go in ``rank_pattern``. A layer whose
    effective alpha (scaling * rank) differs from ``alpha`` (e.g. a changed ``scaling``) gets an
    ``alpha_pattern`` entry, so PEFT reproduces the same forward. Pattern keys are full module
    names, which PEFT matches as ``(.*\\.)?name$``.

    Args:
        model: A model with LoRA layers.
        out_dir: Folder to write (created if needed).
        base_model_name_or_path: Recorded in the config for PEFT to find the base model.
        alpha: ``lora_alpha`` to record.
        task_type: PEFT task type, e.g. ``"CAUSAL_LM"`` or ``"SEQ_CLS"``.

    Returns:
        The output folder.

    Raises:
        ConfigError: If the model has no LoRA layers.
    """
    from safetensors.torch import save_file  # lazy: only needed when saving

    modules = lora_modules(model)
    if not modules:
        raise ConfigError("lora: the model has no LoRA layers to save")
    # Most common rank is r; ties go to the smaller rank so the result is deterministic.
    r = min(Counter(m.rank for m in modules.values()).most_common(), key=lambda t: (-t[1], t[0]))[0]
    rank_pattern = {n: m.rank for n, m in modules.items() if m.rank != r}
    alpha_pattern = {}
    for n, m in modules.items():
        eff = m.scaling * m.rank
        if not math.isclose(eff, alpha, rel_tol=1e-6, abs_tol=1e-9):
            alpha_pattern[n] = eff
    drop = next(iter(modules.values())).lora_dropout
    config = {
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": drop.p if isinstance(drop, nn.Dropout) else 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "target_modules": _condense_targets(model, list(modules)),
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": False,
    }
    tensors = {}
    for n, m in modules.items():
        # PEFT's key layout; contiguous CPU copies because safetensors writes raw buffers.
        tensors[f"{_PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / ADAPTER_CONFIG, lambda p: p.write_text(text))
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), {"format": "pt"}))
    return out


def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    # Same rule as PEFT: the first key k with re.match(rf"(.*\.)?({k})$", name) wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft_adapter(model: nn.Module, in_dir: str | os.PathLike) -> list[str]:
    """Loads a PEFT LoRA adapter folder into ``model``, injecting LoRA layers where missing.

    Supports plain LoRA: list or regex ``target_modules``, ``exclude_modules``, ``rank_pattern``,
    ``alpha_pattern`` and ``use_rslora``. Existing :class:`LoRALinear` layers are re-sized to the
    stored rank. All parameters other than ``lora_`` ones end up frozen.

    Args:
        model: The base model (plain or already LoRA-injected); modified in place.
        in_dir: Folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The adapted module names.

    Raises:
        DataError: If a file is missing or unreadable.
        ConfigError: If the adapter uses a feature this loader does not implement, or does not
            fit the model.
    """
    from safetensors.torch import load_file  # lazy: only needed when loading

    folder = Path(in_dir)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise DataError(f"{p}: file not found")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("bias", "none"), ("fan_in_fan_out", False), ("use_dora", False)):
        if cfg.get(key, ok) != ok:
            raise ConfigError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (need {ok!r})")
    for key in ("layers_to_transform", "modules_to_save", "target_parameters"):
        if cfg.get(key):
            raise ConfigError(f"{cfg_path}: {key} is not supported")
    targets = cfg.get("target_modules")
    exclude = cfg.get("exclude_modules") or ()
    if isinstance(exclude, str):  # PEFT allows a regex here; resolve it to names
        exclude = [n for n, _ in model.named_modules() if re.fullmatch(exclude, n)]
    existing = lora_modules(model)
    if isinstance(targets, str):
        regex, targets = targets, ()
    else:
        regex, targets = None, tuple(targets or ())
    try:
        to_inject = find_target_modules(model, targets, regex, exclude)
    except ConfigError:
        if not existing:
            raise
        to_inject = []
    alpha, r = float(cfg["lora_alpha"]), int(cfg["r"])
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name in to_inject:  # generator choice is irrelevant: the stored values overwrite A and B
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        rank = int(_pattern_value(rank_pattern, name, r))
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, name=name))
    modules = lora_modules(model)
    state = {}
    for key, t in load_file(str(w_path)).items():
        is_lora = key.endswith((".lora_A.weight", ".lora_B.weight"))
        if not (key.startswith(_PEFT_PREFIX) and is_lora):
            raise ConfigError(f"{w_path}: unexpected tensor {key!r}")
        state[key[len(_PEFT_PREFIX) : -len(".weight")]] = t
    stored = {k.rpartition(".")[0] for k in state}
    missing, unknown = sorted(set(modules) - stored), sorted(stored - set(modules))
    if missing or unknown:
        raise ConfigError(f"{w_path}: no tensors for {missing}; tensors for unknown {unknown}")
    load_lora_state_dict(model, state, strict=True)
    for name, m in modules.items():
        a = float(_pattern_value(alpha_pattern, name, alpha))
        m.alpha = a
        m.scaling = a / math.sqrt(m.rank) if cfg.get("use_rslora") else a / m.rank
        p_drop = float(cfg.get("lora_dropout") or 0.0)
        m.lora_dropout = nn.Dropout(p_drop) if p_drop > 0 else nn.Identity()
    for pname, p in model.named_parameters():
        p.requires_grad_("lora_" in pname)
    return list(modules)
