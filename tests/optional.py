"""Shipped presets for parametrized tests: those whose model needs an optional package that is
not installed here (`smollm2-135m`: make setup-smollm2) are skipped with the install command."""

import pytest

from hetfl.config import preset_names, read_yaml, resolve_preset
from hetfl.models import smollm2


def shipped_presets() -> list:
    out = []
    for name in preset_names():
        model = (read_yaml(resolve_preset(name)).get("model") or {}).get("name")
        reason = smollm2.missing() if model == smollm2.NAME else None
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out
