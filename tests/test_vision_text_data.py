"""Digits and BBC News loaders, held-out splits, concept shifts and procedural shapes."""

import numpy as np
import pytest
import torch

from hetfl.config import load_config
from hetfl.data.text import BBC_TOPICS, encode_texts, load_bbc_news
from hetfl.data.vision import SHAPE_CLASSES, load_digits_images, make_shapes, rotate_images, shift_labels
from hetfl.errors import ConfigError, DataError
from hetfl.tasks.classify import _split, build_digits

# ----------------------------------------------------------------------------- concept shifts


def test_rotate_images_quarter_turns_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    assert rotate_images(x, 1).tolist() == [[[2.0, 4.0], [1.0, 3.0]]]  # counter-clockwise
    assert rotate_images(x, 2).tolist() == [[[4.0, 3.0], [2.0, 1.0]]]
    assert torch.equal(rotate_images(x, -1), rotate_images(x, 3))
    assert torch.equal(rotate_images(x, 4), x)
    batch = torch.arange(12.0).view(3, 1, 2, 2)
    assert torch.equal(rotate_images(batch, 1)[2], rotate_images(batch[2], 1))


def test_shift_labels_by_hand():
    assert shift_labels(np.array([0, 5, 9]), 3, 10).tolist() == [3, 8, 2]
    assert shift_labels(torch.tensor([4, 1]), 7, 5).tolist() == [1, 3]
    assert shift_labels(9, 1, 10) == 0
    assert shift_labels(np.arange(10), 0, 10).tolist() == list(range(10))


# ----------------------------------------------------------------------------- digits


def test_digits_images_shapes_and_scaling():
    x, y = load_digits_images()
    assert x.shape == (1797, 1, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    x8, _ = load_digits_images(size=8)
    from sklearn.datasets import load_digits

    assert torch.equal(x8[0, 0], torch.from_numpy(load_digits().images[0].astype(np.float32) / 16))
    # Bilinear upscaling keeps the mean brightness closely.
    assert float(x.mean()) == pytest.approx(float(x8.mean()), abs=0.01)


def _digits_cfg(**data):
    return load_config({"seed": 0, "model": {"name": "mlp"},
                        "data": {"name": "digits", "eval_samples": 300, "samples_per_family": 1000, **data}})


def test_digits_builder_held_out_split_is_stratified_and_deterministic():
    td = build_digits(_digits_cfg())
    test_y = [y for _, y in td.task.eval_samples]
    assert len(td.task.eval_samples) == 300 and len(td.samples) == 1497
    # 300 * n_k / 1797 rounded by largest remainder: 29 or 30 per class.
    assert sum(np.bincount(test_y)) == 300 and set(np.bincount(test_y).tolist()) <= {29, 30, 31}
    again = build_digits(_digits_cfg())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(td.task.eval_samples, again.task.eval_samples))
    other = build_digits(load_config({"seed": 1, "model": {"name": "mlp"},
                                      "data": {"name": "digits", "eval_samples": 300}}))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(td.task.eval_samples, other.task.eval_samples))
    assert td.labels.tolist() == [y for _, y in td.samples]
    assert td.categories == [str(d) for d in range(10)]


def test_samples_per_family_caps_training_per_class():
    td = build_digits(_digits_cfg(samples_per_family=20, eval_samples=100))
    assert np.bincount(td.labels).tolist() == [20] * 10
    assert len(td.task.eval_samples) == 100


def test_digits_rejects_text_model_and_huge_test_set():
    with pytest.raises(ConfigError, match="model.name: 'minilm' is a text model"):
        build_digits(load_config({"model": {"name": "minilm"}, "data": {"name": "digits"}}))
    with pytest.raises(ConfigError, match="data.eval_samples"):
        build_digits(_digits_cfg(eval_samples=1000))


# ----------------------------------------------------------------------------- shapes


def test_make_shapes_seeded_and_labelled():
    x, y = make_shapes(40, seed=5)
    assert x.shape == (40, 1, 32, 32) and y.shape == (40,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert int(y.max()) < len(SHAPE_CLASSES) == 16
    x2, y2 = make_shapes(40, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(make_shapes(40, seed=6)[0], x)
    assert (x.flatten(1).max(1).values > 0.3).all()  # every image shows a shape


# ----------------------------------------------------------------------------- BBC News


def test_bbc_news_corpus_order_and_labels():
    texts, labels, topics = load_bbc_news()
    assert topics == list(BBC_TOPICS)
    assert len(texts) == 2225 and np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert texts[0].startswith("Ad sales boost Time Warner profit")  # business/001.txt
    assert labels == sorted(labels)


def test_bbc_news_split_stratified_and_deterministic():
    _, labels, _ = load_bbc_news()
    cfg = load_config({"seed": 0, "model": {"name": "minilm"},
                       "data": {"name": "bbc-news", "eval_samples": 200, "samples_per_family": 1000}})
    train, test = _split(cfg, labels, "articles")
    # 200 * (510, 386, 417, 511, 401) / 2225 = 45.84, 34.70, 37.48, 45.93, 36.04 -> largest remainders
    assert np.bincount(np.asarray(labels)[test]).tolist() == [46, 35, 37, 46, 36]
    assert len(train) == 2025 and not set(train) & set(test)
    assert _split(cfg, labels, "articles")[1].tolist() == test.tolist()
    capped, _ = _split(load_config({"seed": 0, "data": {"name": "bbc-news", "samples_per_family": 50}}),
                       labels, "articles")
    assert np.bincount(np.asarray(labels)[capped]).tolist() == [50] * 5


def test_encode_texts_truncates_with_special_tokens():
    from hetfl.models.classifiers import minilm_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    ids = encode_texts(tok, ["Ad sales boost Time Warner profit " * 10, "Short."], 16)
    assert [len(i) for i in ids] == [16, 4]
    assert ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    assert tok.decode(ids[1][1:-1]) == "short."


def test_load_bbc_news_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="no topic folders"):
        load_bbc_news(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no .txt articles"):
        load_bbc_news(tmp_path)
    (tmp_path / "a" / "1.txt").write_text("Title\n\nBody")
    assert load_bbc_news(tmp_path) == (["Title\n\nBody"], [0], ["a"])
