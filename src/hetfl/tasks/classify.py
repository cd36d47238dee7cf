"""Classification as a task (text or images): batching, cross-entropy, accuracy.

A sample is ``(x, y)``: ``x`` is a token-id list (text) or a (C, H, W) float tensor (image),
``y`` the class index. Batches are dicts: text ``{"input_ids", "attention_mask", "labels"}``
(right-padded to a multiple of 16 tokens so few distinct shapes, hence few FLOP counts, occur),
images ``{"pixel_values", "labels"}``. Models (see models/classifiers.py) take the batch dict and
return logits (B, C).

Datasets (``data.name``; hetfl.builtins registers them):
- ``bbc-news``: 2,225 BBC articles, 5 topics (models: ``minilm`` or a local BERT folder).
- ``bbc-news-bow``: the same articles and held-out split, each encoded as its first
  ``data.max_len`` hashed lowercase words (data/text.py `hash_words`), for ``bow-mlp``: a small
  bag-of-words classifier that trains from scratch in seconds on two CPU cores (MiniLM, 22.7M
  parameters, is too slow there for clustered benchmarks that train K copies per client).
- ``digits``: scikit-learn's 1,797 8x8 digits upscaled to 32x32 (models: ``tiny-vit``,
  ``tiny-vit-random``, ``mlp``, ``cnn``).

For all, ``data.eval_samples`` is the size of a stratified held-out test set (the server's
global evaluation), and ``data.samples_per_family`` caps the training samples kept *per class*
(set it above the class sizes to keep everything).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hetfl.data.text import BOW_BUCKETS, encode_texts, hash_words, load_bbc_news
from hetfl.data.vision import load_digits_images
from hetfl.errors import ConfigError
from hetfl.eval.metrics import EVAL_N
from hetfl.models.classifiers import (IMAGE_MODELS, TEXT_MODELS, build_bow_classifier, build_image_classifier,
                                      load_text_classifier)
from hetfl.seeding import derive_seed
from hetfl.tasks.base import TaskData, batch_indices

PAD_MULTIPLE = 16  # pad text batches to a multiple of this many tokens: few shapes -> few FLOP counts

Sample = tuple  # (token ids: list[int] | image: Tensor (C, H, W), label: int)


@dataclass
class ClassifyTask:
    """Single-label classification scored by accuracy.

    Args:
        eval_samples: the server's held-out test samples, scored by `evaluate()`.
        pad_id: padding token id for text (unused for images).
        eval_batch_size: samples per forward pass during evaluation.
    """

    eval_samples: Sequence[Sample]
    pad_id: int | None = 0
    eval_batch_size: int = 64
    primary_metric: str = "eval_accuracy"
    num_classes: int | None = field(default=None)

    def batches(self, samples: Sequence[Sample], steps: int, batch_size: int,
                gen: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """`steps` collated batches in a seeded epoch-wise order."""
        for idx in batch_indices(len(samples), steps, batch_size, gen):
            yield self.collate([samples[i] for i in idx])

    def collate(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Stack images, or right-pad token ids (length rounded up to a multiple of 16)."""
        labels = torch.tensor([int(y) for _, y in samples], dtype=torch.long)  # (B,)
        if isinstance(samples[0][0], torch.Tensor):
            return {"pixel_values": torch.stack([x for x, _ in samples]), "labels": labels}  # (B, C, H, W)
        t = max(len(x) for x, _ in samples)
        t += (-t) % PAD_MULTIPLE
        ids = torch.full((len(samples), t), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(samples), t), dtype=torch.long)  # (B, T): 1 on real tokens
        for i, (x, _) in enumerate(samples):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the model's logits against ``batch["labels"]``."""
        return F.cross_entropy(model(batch).float(), batch["labels"])

    def flop_key(self, batch: dict[str, torch.Tensor]) -> tuple:
        x = batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]
        return tuple(x.shape)

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["labels"].numel())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, samples: Sequence[Sample] | None = None) -> dict[str, float]:
        """Accuracy (percent), mean cross-entropy and item count `eval_n` on the held-out set,
        or on `samples` (a client's own test split)."""
        samples = list(self.eval_samples if samples is None else samples)
        if not samples:
            return {}
        if not isinstance(samples[0][0], torch.Tensor):  # similar lengths together: less padding
            samples = sorted(samples, key=lambda s: len(s[0]))
        was_training = model.training
        model.eval()
        correct, nll = 0, 0.0
        for i in range(0, len(samples), self.eval_batch_size):
            batch = self.collate(samples[i:i + self.eval_batch_size])
            logits = model(batch).float()  # (B, C)
            nll += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        model.train(was_training)
        n = len(samples)
        return {"eval_accuracy": 100.0 * correct / n, "eval_loss": nll / n, EVAL_N: n}


# ----------------------------------------------------------------------------- splits


def stratified_split(labels: Sequence[int], n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `n_test` samples with the label mix of the whole set.

    Each class gets ``floor(n_test * n_k / N)`` test samples, and the remaining slots go to the
    classes with the largest fractional parts (ties: lower class index). Within a class the test
    samples are a uniform draw from `rng`.

    Args:
        labels: class index per sample.
        n_test: test-set size, ``0 < n_test < N``.
        rng: source of randomness (consumed class by class, in class order).

    Returns:
        ``(train_idx, test_idx)``, each sorted, disjoint, covering all samples.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_test * counts / len(labels)
    quota = np.floor(exact).astype(int)
    order = sorted(range(len(classes)), key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[: n_test - int(quota.sum())]:
        quota[k] += 1
    test = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def cap_per_class(idx: np.ndarray, labels: Sequence[int], cap: int, rng: np.random.Generator) -> np.ndarray:
    """Keep at most `cap` randomly chosen indices of `idx` per class; returns them sorted."""
    labels = np.asarray(labels)
    keep = [rng.permutation(idx[labels[idx] == c])[:cap] for c in np.unique(labels[idx])]
    return np.sort(np.concatenate(keep))


def _split(cfg, labels: Sequence[int], what: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)
    if cfg.data.eval_samples > n // 2:
        raise ConfigError(f"data.eval_samples: {cfg.data.eval_samples} held-out {what} leave too few for "
                          f"training ({cfg.data.name} has {n}); use at most {n // 2}")
    train, test = stratified_split(labels, cfg.data.eval_samples, np.random.default_rng(
        derive_seed(cfg.seed, "data", "test-split")))
    train = cap_per_class(train, labels, cfg.data.samples_per_family,
                          np.random.default_rng(derive_seed(cfg.seed, "data", "class-cap")))
    return train, test


# ----------------------------------------------------------------------------- dataset builders


def build_bbc_news(cfg):
    """TaskData for topic classification of BBC News with a BERT encoder (`minilm`).

    Articles are tokenized and truncated to ``data.max_len`` tokens (title and lead survive).
    """
    if cfg.model.name in IMAGE_MODELS:
        raise ConfigError(f"model.name: '{cfg.model.name}' is an image model; bbc-news needs a text model "
                          f"({', '.join(TEXT_MODELS)} or a local BERT folder)")
    texts, labels, topics = load_bbc_news()
    train, test = _split(cfg, labels, "articles")
    model, tok = load_text_classifier(cfg.model.name, len(topics), derive_seed(cfg.seed, "model-init") % 2**31)
    ids = encode_texts(tok, [texts[i] for i in np.concatenate([train, test])], cfg.data.max_len)
    samples = list(zip(ids, [labels[i] for i in np.concatenate([train, test])]))
    task = ClassifyTask(samples[len(train):], pad_id=tok.pad_token_id, eval_batch_size=cfg.eval.batch_size,
                        num_classes=len(topics))
    return TaskData(model, tok, task, samples[:len(train)], np.array([labels[i] for i in train]), topics)


def build_bbc_news_bow(cfg):
    """TaskData for BBC News topics with `bow-mlp` over the first ``data.max_len`` hashed words."""
    if cfg.model.name != "bow-mlp":
        raise ConfigError(f"model.name: bbc-news-bow trains 'bow-mlp', not '{cfg.model.name}'")
    texts, labels, topics = load_bbc_news()
    train, test = _split(cfg, labels, "articles")
    model = build_bow_classifier(len(topics), BOW_BUCKETS, derive_seed(cfg.seed, "model-init") % 2**31)
    samples = [(hash_words(texts[i], cfg.data.max_len), labels[i]) for i in np.concatenate([train, test])]
    task = ClassifyTask(samples[len(train):], pad_id=0, eval_batch_size=cfg.eval.batch_size, num_classes=len(topics))
    return TaskData(model, None, task, samples[:len(train)], np.array([labels[i] for i in train]), topics)


def build_digits(cfg):
    """TaskData for scikit-learn digits (32x32, 10 classes) with an image classifier."""
    if cfg.model.name in TEXT_MODELS:
        raise ConfigError(f"model.name: '{cfg.model.name}' is a text model; digits needs an image model "
                          f"({', '.join(IMAGE_MODELS)})")
    x, y = load_digits_images()
    train, test = _split(cfg, y, "images")
    model = build_image_classifier(cfg.model.name, 10, derive_seed(cfg.seed, "model-init") % 2**31)
    task = ClassifyTask([(x[i], int(y[i])) for i in test], pad_id=None, eval_batch_size=cfg.eval.batch_size,
                        num_classes=10)
    return TaskData(model, None, task, [(x[i], int(y[i])) for i in train], y[train].copy(), [str(d) for d in range(10)])

