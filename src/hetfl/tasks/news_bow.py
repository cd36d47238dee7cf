"""BBC News with a small bag-of-words classifier (``data.name: bbc-news-bow``, ``model.name: bow-mlp``).

MiniLM (22.7M parameters) is slow on two CPU cores and, trained from scratch per client with K
copies (the Ensemble baseline), far too big for a quick clustered benchmark. This dataset reads
the same articles and held-out split as ``bbc-news`` but encodes each article as hashed lowercase
words: token id = 1 + crc32(word) mod (buckets - 1), id 0 is padding. The model is an
EmbeddingBag mean over the ids (not adapted by FLoRAL, like the code's embeddings), then
Linear(dim, hidden)-ReLU-Linear(hidden, classes). No tokenizer or network is involved, and crc32
(unlike Python's salted `hash`) makes the ids the same on every machine.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import torch
from torch import Tensor, nn

BOW_BUCKETS = 4096  # hashed vocabulary size (id 0 is padding)
BOW_DIM = 64  # embedding size
BOW_HIDDEN = 64
_WORD = re.compile(r"[a-z0-9']+")


def hash_words(text: str, max_len: int, buckets: int = BOW_BUCKETS) -> list[int]:
    """The first `max_len` lowercase words of `text` as ids in 1..buckets-1."""
    words = _WORD.findall(text.lower())[:max_len]
    return [1 + zlib.crc32(w.encode()) % (buckets - 1) for w in words] or [0]


class BowClassifier(nn.Module):
    """Mean of hashed word embeddings -> `hidden` (ReLU) -> `classifier`."""

    def __init__(self, num_labels: int, buckets: int = BOW_BUCKETS, dim: int = BOW_DIM, hidden: int = BOW_HIDDEN):
        super().__init__()
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean", padding_idx=0)
        self.hidden = nn.Linear(dim, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # {"input_ids": (B, T)} -> (B, C)
        return self.classifier(torch.relu(self.hidden(self.embed(batch["input_ids"]))))

    def head_param_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith("classifier.")]


def build_bbc_news_bow(cfg):
    """TaskData for BBC News topics with `BowClassifier` (the first ``data.max_len`` words)."""
    from hetfl.data.text import load_bbc_news
    from hetfl.seeding import derive_seed
    from hetfl.errors import ConfigError
    from hetfl.scenario import TaskData
    from hetfl.tasks.classify import ClassifyTask, _split

    if cfg.model.name != "bow-mlp":
        raise ConfigError(f"model.name: bbc-news-bow trains 'bow-mlp', not '{cfg.model.name}'")
    texts, labels, topics = load_bbc_news()
    train, test = _split(cfg, labels, "articles")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "model-init") % 2**31)
        model = BowClassifier(len(topics))
    model.eval()
    samples = [(hash_words(texts[i], cfg.data.max_len), labels[i]) for i in np.concatenate([train, test])]
    task = ClassifyTask(samples[len(train):], pad_id=0, eval_batch_size=cfg.eval.batch_size, num_classes=len(topics))
    return TaskData(model, None, task, samples[:len(train)], np.array([labels[i] for i in train]), topics)


def _register() -> None:
    from hetfl.registry import DATASETS

    DATASETS.add("bbc-news-bow", build_bbc_news_bow)


_register()
