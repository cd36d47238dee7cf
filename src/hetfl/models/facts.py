"""What the config checks need to know about a model, without building it.

`model_facts(model_name, data_name)` says which model a dataset's builder would make of
`model.name`: its kind, width (`hidden`), depth (blocks a split method can cut between) and the
shape of every ``nn.Linear`` by module name (names as ``model.named_modules()`` gives them, so
LoRA targets match them the same way). The numbers come from the shipped ``config.json``
(``assets/<name>/``, a local folder's, or the installed MiniLM package's) or, for models built
in code (``mlp``, ``cnn``, ``tiny-vit-random``, ``bow-mlp``, the regressors), from the sizes
their builders declare. No weights are read and no model object is created.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

ASSET_DIR = Path(__file__).resolve().parent / "assets"

CAUSAL_LMS: tuple[str, ...] = ("tiny-llama", "tiny-llama-large", "tiny-llama-random", "smollm2-135m")
_ASSET_OF = {"tiny-llama": "tiny-llama", "tiny-llama-large": "tiny-llama-large", "tiny-llama-random": "tiny-llama",
             "tiny-vit": "tiny-vit"}
# SmolLM2-135M-Instruct ships as one GGUF file (models/smollm2.py), so its sizes are declared here:
# the model card's config.json (LlamaForCausalLM, tied embeddings).
SMOLLM2_CONFIG: dict[str, Any] = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                                  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                  "head_dim": 64, "vocab_size": 49152}
# Classes per built-in classification dataset (the size of each model's `classifier` head).
NUM_LABELS: dict[str, int] = {"digits": 10, "bbc-news": 5, "bbc-news-bow": 5}
IMAGE_SIZE, IMAGE_CHANNELS = 32, 1  # what `build_digits` feeds `build_image_classifier`
# Llama-style causal LMs whose module names are `model.layers.{i}.self_attn.q_proj` etc.
_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnknownModel(LookupError):
    """`model.name` is nothing the dataset can build; the message says what it takes."""


@dataclass(frozen=True)
class ModelFacts:
    """The sizes of a model that configs refer to.

    Attributes:
        name: `model.name` as given.
        kind: what it is, in words ("causal LM", "BERT encoder", "image classifier", ...).
        hidden: width of the hidden states (the residual stream of a transformer).
        depth: number of blocks; a split cut `c` keeps blocks `0..c-1` on the client.
        linears: every ``nn.Linear`` by module name -> (in_features, out_features); None when
            the module names of this architecture are not known here.
        staged: whether it is a staged classifier (stem, blocks, tail) that split methods can cut.
    """

    name: str
    kind: str
    hidden: int
    depth: int
    linears: Mapping[str, tuple[int, int]] | None
    staged: bool

    def targeted(self, targets: Sequence[str], regex: str | None = None,
                 exclude: Sequence[str] = ()) -> dict[str, tuple[int, int]]:
        """The linears LoRA would adapt, by the rule of `hetfl.models.lora.find_target_modules`:
        the exact name or a suffix on a "." boundary, or a full match of `regex`, minus `exclude`."""

        def hit(name: str, pattern: str) -> bool:
            return name == pattern or name.endswith("." + pattern)

        return {n: shape for n, shape in (self.linears or {}).items()
                if (any(hit(n, t) for t in targets) or (regex is not None and re.fullmatch(regex, n) is not None))
                and not any(hit(n, e) for e in exclude)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnknownModel(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UnknownModel(f"{path}: expected a JSON object")
    return raw


def _causal_lm(name: str, c: Mapping[str, Any]) -> ModelFacts:
    """A Hugging Face causal LM from its config.json (names known for Llama-style models)."""
    try:
        h, n_layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise UnknownModel(f"'{name}': its config.json has no hidden_size / num_hidden_layers "
                           "(not a Hugging Face causal LM folder)") from None
    linears = None
    if c.get("model_type") in _LLAMA_TYPES:
        heads = int(c["num_attention_heads"])
        kv, hd = int(c.get("num_key_value_heads") or heads), int(c.get("head_dim") or h // heads)
        inter = int(c["intermediate_size"])
        linears = {}
        for i in range(n_layers):
            p = f"model.layers.{i}."
            linears |= {p + "self_attn.q_proj": (h, heads * hd), p + "self_attn.k_proj": (h, kv * hd),
                        p + "self_attn.v_proj": (h, kv * hd), p + "self_attn.o_proj": (heads * hd, h),
                        p + "mlp.gate_proj": (h, inter), p + "mlp.up_proj": (h, inter),
                        p + "mlp.down_proj": (inter, h)}
        linears["lm_head"] = (h, int(c["vocab_size"]))
    return ModelFacts(name, "causal LM", h, n_layers, linears, staged=False)


def _bert(name: str, c: Mapping[str, Any], num_labels: int) -> ModelFacts:
    """`TextClassifier`: a BertModel (no pooler) under `bert.` plus a linear `classifier`."""
    try:
        h, n_layers, inter = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise UnknownModel(f"'{name}': its config.json is not a BERT encoder's") from None
    linears = {}
    for i in range(n_layers):
        p = f"bert.encoder.layer.{i}."
        linears |= {p + "attention.self.query": (h, h), p + "attention.self.key": (h, h),
                    p + "attention.self.value": (h, h), p + "attention.output.dense": (h, h),
                    p + "intermediate.dense": (h, inter), p + "output.dense": (inter, h)}
    linears["classifier"] = (h, num_labels)
    return ModelFacts(name, "BERT encoder", h, n_layers, linears, staged=True)


def _tiny_vit(name: str, c: Mapping[str, Any], num_labels: int) -> ModelFacts:
    """`TinyViT`: blocks.{i}.attn.{q,k,v,o}_proj, blocks.{i}.mlp.fc1/fc2 and `classifier`."""
    from hetfl.models.classifiers import TinyViTConfig

    try:
        v = TinyViTConfig(**c)
    except TypeError as e:
        raise UnknownModel(f"'{name}': its config.json is not a tiny-vit checkpoint's ({e})") from None
    h, inter = v.hidden_size, v.intermediate_size
    linears = {}
    for i in range(v.num_hidden_layers):
        p = f"blocks.{i}."
        linears |= {p + f"attn.{x}_proj": (h, h) for x in "qkvo"}
        linears |= {p + "mlp.fc1": (h, inter), p + "mlp.fc2": (inter, h)}
    linears["classifier"] = (h, num_labels)
    return ModelFacts(name, "image classifier", h, v.num_hidden_layers, linears, staged=True)


def _default(fn, arg: str) -> Any:
    """The declared default of `fn`'s argument `arg` (a builder's size)."""
    return inspect.signature(fn).parameters[arg].default


def _mlp_image(num_labels: int) -> ModelFacts:
    from hetfl.models.classifiers import MLPClassifier

    hidden, depth = _default(MLPClassifier.__init__, "hidden"), _default(MLPClassifier.__init__, "depth")
    linears = {"embed.fc": (IMAGE_CHANNELS * IMAGE_SIZE ** 2, hidden)}
    linears |= {f"blocks.{i}.fc": (hidden, hidden) for i in range(depth)}
    linears["classifier"] = (hidden, num_labels)
    return ModelFacts("mlp", "image classifier", hidden, depth, linears, staged=True)


def _cnn(num_labels: int) -> ModelFacts:
    from hetfl.models.classifiers import CNNClassifier

    widths = _default(CNNClassifier.__init__, "widths")
    side = IMAGE_SIZE // 2 ** len(widths)
    return ModelFacts("cnn", "image classifier", widths[-1], len(widths) - 1,
                      {"classifier": (widths[-1] * side * side, num_labels)}, staged=True)


def _bow_mlp(num_labels: int) -> ModelFacts:
    from hetfl.models.classifiers import BOW_DIM, BOW_HIDDEN

    return ModelFacts("bow-mlp", "bag-of-words classifier", BOW_HIDDEN, 0,
                      {"hidden": (BOW_DIM, BOW_HIDDEN), "classifier": (BOW_HIDDEN, num_labels)}, staged=False)


# `build_synth`'s regressors (tasks/regression.py; tests/test_validate_upfront.py builds them and compares):
# synth-linear: Linear(10, 3); synth-mlp: Linear(10, 20)-ReLU-Linear(20, 1).
REGRESSORS: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {
    "synth-linear": ("linear", {"fc1": (10, 3)}),
    "synth-mlp": ("mlp", {"fc1": (10, 20), "fc2": (20, 1)}),
}


def _regressor(data_name: str) -> ModelFacts:
    name, linears = REGRESSORS[data_name]
    return ModelFacts(name, "regressor", linears["fc1"][1], len(linears) - 1, linears, staged=False)


def _minilm_dir() -> Path:
    from hetfl.models.classifiers import minilm_path  # a one-line error naming the package when it is missing

    return minilm_path()


def _folder(name: str) -> Path | None:
    p = Path(name).expanduser()
    return p if p.is_dir() else None


def _folder_config(name: str, what: str) -> dict[str, Any]:
    cfg = Path(name).expanduser() / "config.json"
    if not cfg.is_file():
        raise UnknownModel(f"'{name}' has no config.json (not {what})")
    return _read_json(cfg)


# data.name (registry key) -> (the names its builder takes, what else it takes, in words)
DATA_MODELS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "synth-instruct": (CAUSAL_LMS, "a path to a local Hugging Face folder"),
    "instruct-file": (CAUSAL_LMS, "a path to a local Hugging Face folder"),
    "bbc-news": (("minilm",), "a path to a local BERT folder"),
    "bbc-news-bow": (("bow-mlp",), None),
    "digits": (("tiny-vit", "tiny-vit-random", "mlp", "cnn"), "a folder saved by save_tiny_vit"),
    **{data: ((model,), None) for data, (model, _) in REGRESSORS.items()},
}


def known_models(data_kind: str) -> str:
    """The model names a dataset takes, in words (for messages)."""
    names, other = DATA_MODELS[data_kind]
    return ", ".join(names) + (f"; or {other}" if other else "")


def model_facts(name: str, data_kind: str, data_label: str | None = None) -> ModelFacts | None:
    """The facts of the model that dataset `data_kind` builds for `model.name` `name`.

    Args:
        name: `model.name`.
        data_kind: the dataset's registry key (`hetfl.scenario.dataset_kind(data.name)`).
        data_label: how messages name the dataset (`data.name`); default `data_kind`.

    Returns:
        The facts, or None for a dataset whose builder is not one of hetfl's own (it decides).

    Raises:
        UnknownModel: the dataset cannot build a model of that name (the message says what it takes).
    """
    if data_kind not in DATA_MODELS:
        return None
    names, _ = DATA_MODELS[data_kind]
    labels = NUM_LABELS.get(data_kind, 0)
    if name in names:
        if name == "smollm2-135m":
            return _causal_lm(name, SMOLLM2_CONFIG)
        if name in CAUSAL_LMS:
            return _causal_lm(name, _read_json(ASSET_DIR / _ASSET_OF[name] / "config.json"))
        if name == "minilm":
            return _bert(name, _read_json(_minilm_dir() / "config.json"), labels)
        if name == "tiny-vit":
            return _tiny_vit(name, _read_json(ASSET_DIR / "tiny-vit" / "config.json"), labels)
        if name == "tiny-vit-random":
            return _tiny_vit(name, {}, labels)  # TinyViTConfig's declared defaults
        if name == "mlp" and data_kind == "digits":
            return _mlp_image(labels)
        if name == "cnn":
            return _cnn(labels)
        if name == "bow-mlp":
            return _bow_mlp(labels)
        return _regressor(data_kind)
    folder = _folder(name) if DATA_MODELS[data_kind][1] else None
    if folder is not None:
        if data_kind == "bbc-news":
            return _bert(name, _folder_config(name, "a BERT folder"), labels)
        if data_kind == "digits":
            return _tiny_vit(name, _folder_config(name, "a tiny-vit checkpoint"), labels)
        return _causal_lm(name, _folder_config(name, "a Hugging Face model folder"))
    data = data_label or data_kind
    other = [k for k, (ns, _) in DATA_MODELS.items() if name in ns and k != "instruct-file"]
    if other:
        raise UnknownModel(f"'{name}' is not a model {data} trains (it goes with data.name "
                           f"{' or '.join(other)}); {data} takes: {known_models(data_kind)}")
    if DATA_MODELS[data_kind][1] and ("/" in name or name.startswith("~")):
        raise UnknownModel(f"'{name}': no such folder ({data} takes: {known_models(data_kind)})")
    raise UnknownModel(f"unknown model '{name}' for data.name {data} (choose from: {known_models(data_kind)})")
