"""Super-NaturalInstructions task files (one JSON object per task) as instruction `Example`s.

A task file holds a ``Definition`` (a string or a list of strings) and ``Instances``, each with an
``input`` string and an ``output`` list of reference strings. Each instance becomes
``Example(instruction=definition, input=input, output=first reference, category=task name)``, so
the Alpaca-style prompt of `hetfl.data.instruct.prompt_of` renders it like FedHDS's NI prompt
(definition under "### Instruction:", instance under "### Input:").

`load_ni_tasks` applies the FedHDS/FedKSeed preprocessing (spec section 5): keep instances whose
input is shorter than 1024 characters, drop tasks left with fewer than 20, then sample 20% of
each remaining task's instances, seeded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from hetfl.data.instruct import Example
from hetfl.errors import DataError


def _text(value: object, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value[0] if key == "output" else "\n".join(value)
    raise DataError(f"{where}: '{key}' must be a string or a non-empty list of strings, got {value!r:.60}")


def load_ni_task(path: str | Path) -> list[Example]:
    """Load one NI task file.

    Args:
        path: a ``taskNNN_name.json`` file.

    Returns:
        One Example per instance, in file order; ``category`` is the file's stem (the task name).

    Raises:
        DataError: missing file, invalid JSON, or a malformed Definition/Instances entry; the
            message names the file (and the instance index).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: Natural Instructions task file not found")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p.name}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{p.name}: expected a JSON object with 'Definition' and 'Instances'")
    for key in ("Definition", "Instances"):
        if key not in obj:
            raise DataError(f"{p.name}: missing key '{key}'")
    definition = _text(obj["Definition"], p.name, "Definition").strip()
    if not definition:
        raise DataError(f"{p.name}: empty 'Definition'")
    if not isinstance(obj["Instances"], list):
        raise DataError(f"{p.name}: 'Instances' must be a list")
    out = []
    for i, inst in enumerate(obj["Instances"]):
        where = f"{p.name}: Instances[{i}]"
        if not isinstance(inst, dict):
            raise DataError(f"{where}: expected an object with 'input' and 'output'")
        for key in ("input", "output"):
            if key not in inst:
                raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(inst["input"], str):
            raise DataError(f"{where}: 'input' must be a string")
        out.append(Example(definition, inst["input"], _text(inst["output"], where, "output"), p.stem))
    return out


def load_ni_tasks(paths: Sequence[str | Path], *, seed: int, max_input_chars: int = 1024, min_instances: int = 20,
                  sample_fraction: float = 0.2) -> list[Example]:
    """Load and preprocess several NI task files as FedHDS does (one task per client downstream).

    Args:
        paths: task files, e.g. the entries of ``splits/default/train_tasks.txt``.
        seed: seeds the per-task instance sampling.
        max_input_chars: instances with an input of this many characters or more are dropped.
        min_instances: tasks with fewer remaining instances are dropped.
        sample_fraction: share of each remaining task's instances kept (at least one).

    Returns:
        The kept examples, task by task in the given order, instances in file order.
    """
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    for path in paths:
        rows = [r for r in load_ni_task(path) if len(r.input) < max_input_chars]
        if len(rows) < min_instances:
            continue
        k = max(1, int(len(rows) * sample_fraction))
        out += [rows[i] for i in sorted(rng.choice(len(rows), k, replace=False))]
    return out
