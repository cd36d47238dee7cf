"""The registry is a leaf: names in, entries out. hetfl.builtins registers what ships; reading a
table before it is imported is a clear error, never a wrong "unknown method"."""

import os
import subprocess
import sys

import pytest

from hetfl.errors import ConfigError
from hetfl.registry import CODECS, DATASETS, METHODS, SELECTORS


def run_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, where nothing (not even tests/conftest.py) imported hetfl.builtins."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_builtins_fill_every_table():
    assert {"fedit", "fslora", "heterolora", "fedv", "sflam", "floral", "ditto", "sl-vanilla"} <= set(METHODS.names())
    assert {"none", "random", "fedhds", "perplexity"} <= set(SELECTORS.names())
    assert CODECS.names() == ["bf16", "fp16", "fp32"]
    assert DATASETS.names() == ["bbc-news", "bbc-news-bow", "digits", "instruct-file", "synth-instruct",
                                "synth-linear", "synth-mlp"]


def test_unknown_name_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^method.name: unknown method 'fedfoo' \(choose from: .*fedit"):
        METHODS.get("fedfoo", "method.name")


def test_lower_floors_import_no_implementation():
    # the registry, the config and the scenario stand below the engine, the methods and the built-ins
    r = run_python("import sys, hetfl.registry, hetfl.config, hetfl.scenario; "
                   "print(sorted(m for m in sys.modules if m.split('.')[1:2] in (['methods'], ['engine'], "
                   "['selection'], ['builtins'])))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_reading_a_table_before_the_builtins_says_so():
    r = run_python("from hetfl.config import load_config; load_config('fedit-instruct')")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: the method table was read before the built-ins were registered: "
                           "import hetfl.builtins first"), last


def test_entry_points_register_the_builtins():
    r = run_python("from hetfl.config import load_config; import hetfl.runner; "
                   "print(load_config('fedit-instruct').method.name)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fedit"
