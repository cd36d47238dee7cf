"""hetfl Messages <-> Flower records, and the run-config keys both Flower apps read.

A hetfl `Message` travels as a Flower RecordDict with two records:

    "tensors": ArrayRecord   one Array per tensor: raw bytes, torch dtype and shape (bit-exact,
                             any dtype, bfloat16 included)
    "hetfl":   ConfigRecord  "kind", "meta" (JSON), "names" (tensor order), and per direction
                             the numbers the round loop needs (down: CID, RND, KNOBS, MEM;
                             up: FLOPS, MEM, LOCAL_TOTAL, SELECTION_FLOPS)

Tensors are sent as the link decoded them: the Link has already applied the codec and counted
its bytes on the server, so the ledger is the same as in the simulator.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from hetfl.engine.api import Message

TENSORS, HEADER = "tensors", "hetfl"
KIND, META, NAMES = "kind", "meta", "names"
CID, RND, KNOBS, MEM = "cid", "rnd", "knobs", "mem_bytes"  # down: who trains, and with what settings
FLOPS, LOCAL_TOTAL, SELECTION_FLOPS = "flops", "local_total", "selection_flops"  # up, with MEM
TRAIN = "train"  # Flower message type of a round's client update

# run_config keys (the Flower app's [tool.flwr.app.config]); one source of truth: the YAML config
RC_CONFIG, RC_OUT, RC_FORCE, RC_REPORT = "hetfl-config", "hetfl-out", "hetfl-force", "hetfl-report"
RC_NODES, RC_STATUS = "hetfl-supernodes", "hetfl-status"
RAW = "torch.raw"  # Array.stype of our tensors: little-endian bytes of a contiguous torch tensor


def tensor_to_array(t: torch.Tensor) -> Array:
    t = t.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # (numel * itemsize,) bytes, bit-exact
    return Array(dtype=str(t.dtype).removeprefix("torch."), shape=tuple(t.shape), stype=RAW, data=data)


def array_to_tensor(a: Array) -> torch.Tensor:
    dtype = getattr(torch, a.dtype)
    if not a.data:  # frombuffer refuses an empty buffer
        return torch.empty(a.shape, dtype=dtype)
    return torch.frombuffer(bytearray(a.data), dtype=torch.uint8).view(dtype).reshape(a.shape)


def encode(msg: Message, fields: dict[str, Any]) -> RecordDict:
    """A RecordDict carrying `msg` plus `fields` (ints, floats, strings; dicts go as JSON)."""
    header = {KIND: msg.kind, META: json.dumps(msg.meta), NAMES: list(msg.tensors)}
    header.update({k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()})
    arrays = ArrayRecord({name: tensor_to_array(t) for name, t in msg.tensors.items()})
    return RecordDict({TENSORS: arrays, HEADER: ConfigRecord(header)})


def decode(content: RecordDict) -> tuple[Message, dict[str, Any]]:
    """(the Message, the extra fields) from a RecordDict made by `encode`."""
    header = dict(content[HEADER])
    arrays = content[TENSORS]
    tensors = {name: array_to_tensor(arrays[name]) for name in header.pop(NAMES, [])}  # in the sender's order
    msg = Message(tensors, json.loads(header.pop(META)), header.pop(KIND))
    if KNOBS in header:
        header[KNOBS] = json.loads(header[KNOBS])
    return msg, header


def dump_node_state(state: dict[str, Any]) -> ConfigRecord:
    """A SuperNode's private state (its clients' states, its FLOP cache) as one Flower record."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return ConfigRecord({"blob": buf.getvalue()})


def load_node_state(record: ConfigRecord | None) -> dict[str, Any]:
    if record is None:
        return {"clients": {}, "flop_cache": {}}
    return torch.load(io.BytesIO(record["blob"]), weights_only=True)  # tensors, containers and numbers only
