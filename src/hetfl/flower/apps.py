"""The Flower ServerApp and ClientApp over hetfl's method hooks.

ServerApp: builds the run from the config in the run's `run_config` and runs the one round loop
(`hetfl.runner.run_experiment`) with `FlowerBackend`, writing the usual run directory.

ClientApp: for each "train" message, rebuilds the scenario and method from the same config and
seed (in simulation every node can build every client's data; a client's data never leaves its
node), builds the named client's `ClientContext` exactly as the simulator does, runs
`client_update` with the same per-(seed, round, client) seeding, and replies with the update and
the numbers the loop accounts. The node's private state (each of its clients' state, its FLOP
cache) persists in Flower's `Context.state` between rounds.

Flower loads these objects by reference (`hetfl.flower.apps:server_app`, `...:client_app`).
"""

from __future__ import annotations

import json
import time
import traceback
from functools import partial
from pathlib import Path

import yaml
from flwr.app import Context
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import hetfl.builtins  # noqa: F401  (Flower loads these apps by name: register what ships first)
from hetfl.config import load_config
from hetfl.errors import HetflError
from hetfl.flower.wire import (
    CID,
    FLOPS,
    KNOBS,
    LOCAL_TOTAL,
    MEM,
    RC_CONFIG,
    RC_FORCE,
    RC_NODES,
    RC_OUT,
    RC_REPORT,
    RC_STATUS,
    RND,
    SELECTION_FLOPS,
    decode,
    dump_node_state,
    encode,
    load_node_state,
)

NODE_STATE = "hetfl-node"  # key of the node's private state in Context.state
NODES_TIMEOUT_S = 600.0  # how long the ServerApp waits for the expected SuperNodes to connect

server_app = ServerApp()
client_app = ClientApp()


def config_of(context: Context):
    return load_config(yaml.safe_load(context.run_config[RC_CONFIG]))


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from hetfl.flower.backend import FlowerBackend
    from hetfl.runner import run_experiment

    rc = context.run_config
    status = Path(str(rc[RC_STATUS])) if rc.get(RC_STATUS) else None
    try:
        cfg = config_of(context)
        nodes = wait_for_nodes(grid, int(rc[RC_NODES]))
        run_experiment(cfg, str(rc[RC_OUT]), force=bool(rc[RC_FORCE]), report=bool(rc[RC_REPORT]),
                       backend=partial(FlowerBackend, grid=grid, nodes=nodes))
    except Exception as e:
        write_status(status, {"ok": False, "user_error": isinstance(e, HetflError), "error": str(e),
                              "traceback": traceback.format_exc()})  # the launcher turns this into one line
        raise
    write_status(status, {"ok": True})


def write_status(path: Path | None, result: dict) -> None:
    """Tell a local launcher (which waits for this file) how the run ended; atomic, so never read half-written."""
    from hetfl.track.rundir import atomic_write_text

    if path is not None and path.parent.is_dir():  # absent when hetfl was started on another host
        atomic_write_text(path, json.dumps(result))


def wait_for_nodes(grid: Grid, n: int) -> list[int]:
    """The ids of the first `n` connected SuperNodes (sorted), waiting for them to connect."""
    deadline = time.monotonic() + NODES_TIMEOUT_S
    while len(ids := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise HetflError(f"--supernodes {n}: only {len(ids)} SuperNode(s) connected within {NODES_TIMEOUT_S:g} s")
        time.sleep(0.2)
    return ids[:n]


@client_app.train()
def client_train(msg: FlowerMessage, context: Context) -> FlowerMessage:
    from hetfl.engine.client import client_context, train_client
    from hetfl.runner import build_run

    cfg = config_of(context)
    down, nums = decode(msg.content)
    cid, rnd = int(nums[CID]), int(nums[RND])
    node = load_node_state(context.state.get(NODE_STATE))
    scenario, method = build_run(cfg)  # as the simulator builds it: same seed, same model, same data
    method.setup(scenario)
    ctx = client_context(scenario, rnd, cid, nums[KNOBS], int(nums[MEM]), node["clients"].setdefault(cid, {}),
                         node["flop_cache"])
    reply = train_client(method, down, ctx)
    context.state[NODE_STATE] = dump_node_state(node)
    up = encode(reply, {FLOPS: float(ctx.flops), MEM: int(ctx.mem_bytes), LOCAL_TOTAL: int(ctx.local_total),
                        SELECTION_FLOPS: float(ctx.selection_flops)})
    return FlowerMessage(up, reply_to=msg)
