"""Data-selection stages; importing this package registers them (`selection.name`)."""

from hetfl.config import SelectionConfig
from hetfl.registry import register_selector
from hetfl.selection import random  # noqa: F401

register_selector("none", SelectionConfig, "no selection: train on all local data")(lambda cfg, scfg: None)
from hetfl.selection import coreset_central, fedhds, perplexity  # noqa: E402,F401
