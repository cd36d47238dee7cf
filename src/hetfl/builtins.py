"""Everything hetfl ships, registered by name in one place: importing this module registers it.

The registry (hetfl/registry.py) is a leaf that holds names; this module, on the top floor,
imports the shipped implementations and fills its tables. Method and selection files register
themselves with `@register_method` / `@register_selector` as they are imported here; codecs and
datasets are added below. The entry points import this module: `hetfl.cli`, `hetfl.runner`,
`hetfl.sweep`, the Flower apps (and so the benchmarks), and tests/conftest.py. Library code
below them never does; reading a table before this module is imported raises RuntimeError.

A new method or selection file is shipped by adding it to the imports below.
"""

from functools import partial

import torch

from hetfl.comm.codecs import CastCodec
from hetfl.config import SelectionConfig
from hetfl.methods import (  # noqa: F401  (each file registers its methods with @register_method)
    ditto,
    ensemble,
    fedavg_full,
    fedit,
    fedv,
    fedvz,
    flexlora,
    flora_stack,
    floral,
    fslora,
    heterolora,
    local_adaptor,
    sflam,
    sl_vanilla,
    splitfed_v1,
    splitfed_v2,
)
from hetfl.registry import CODECS, DATASETS, register_selector
from hetfl.selection import coreset_central, fedhds, perplexity, random  # noqa: F401  (@register_selector)
from hetfl.tasks.classify import build_bbc_news, build_bbc_news_bow, build_digits
from hetfl.tasks.instruct import build_instruct
from hetfl.tasks.regression import build_synth

CODECS.add("fp32", partial(CastCodec, torch.float32))
CODECS.add("fp16", partial(CastCodec, torch.float16))
CODECS.add("bf16", partial(CastCodec, torch.bfloat16))

register_selector("none", SelectionConfig, "no selection: train on all local data")(lambda cfg, scfg: None)

DATASETS.add("synth-instruct", build_instruct)
DATASETS.add("instruct-file", build_instruct)  # a local Alpaca/Dolly file or Natural Instructions folder
DATASETS.add("bbc-news", build_bbc_news)
DATASETS.add("bbc-news-bow", build_bbc_news_bow)
DATASETS.add("digits", build_digits)
DATASETS.add("synth-linear", build_synth)
DATASETS.add("synth-mlp", build_synth)
