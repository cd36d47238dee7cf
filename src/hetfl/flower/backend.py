"""FlowerBackend: the simulator's `run_round` contract, with each client's update run on a SuperNode.

Runs inside the Flower ServerApp. Per round: every down message crosses the Link here (codec and
bytes exactly as in the simulator), goes to the SuperNode that hosts the client as Flower records,
the node's ClientApp runs `client_update` and replies, and the reply crosses the Link up here.
Client `cid` always lives on node `cid % N` (nodes sorted by id), so its private state stays on
one node for the whole run. Client data never reaches this process: the loop gets back only
messages and the numbers it accounts (FLOPs, memory estimate).
"""

from __future__ import annotations

import time

from flwr.app import Message as FlowerMessage

from hetfl.engine.api import ClientContext, Message
from hetfl.engine.link import DOWN, UP, Link
from hetfl.flower import check_supported
from hetfl.flower.wire import CID, FLOPS, KNOBS, LOCAL_TOTAL, MEM, RND, SELECTION_FLOPS, TRAIN, decode, encode

POLL_S = 0.05  # how often the server asks the SuperLink for replies (Flower's own send_and_receive sleeps 3 s)


class FlowerRunError(RuntimeError):
    """A ClientApp failed or a SuperNode did not answer; the message says which client and why."""


class FlowerBackend:
    """Runs a round's client updates on Flower SuperNodes through a ServerApp's Grid.

    Args:
        scenario: the server's scenario (its client data is dropped here: it stays on the nodes).
        method: the method whose hooks run (server side here, client side in the ClientApp).
        link: the measured link.
        selector: must be None (data selection is refused on Flower).
        grid: the ServerApp's Grid.
        nodes: the SuperNode ids to use; client `cid` goes to `nodes[cid % len(nodes)]`.
        timeout_s: how long to wait for one round's replies.

    Raises:
        ConfigError: for what plain Flower rounds cannot carry (see `check_supported`).
    """

    def __init__(self, scenario, method, link: Link, selector=None, *, grid, nodes: list[int],
                 timeout_s: float = 3600.0):
        check_supported(scenario.cfg, method)
        self.scenario, self.method, self.link, self.grid = scenario, method, link, grid
        self.nodes, self.timeout_s = sorted(nodes), timeout_s
        self.client_states: dict = {}  # private client state lives on the nodes, never here
        self.flop_cache: dict = {}  # so does each node's FLOP cache
        scenario.client_data = [[] for _ in scenario.client_data]  # built locally, never used server-side
        scenario.client_test = None

    def node_of(self, cid: int) -> int:
        return self.nodes[cid % len(self.nodes)]

    def run_round(self, rnd: int, down: dict[int, Message], knobs: dict[int, dict],
                  mem: dict[int, int]) -> tuple[dict[int, Message], dict[int, ClientContext]]:
        cids = sorted(down)
        out = []
        for cid in cids:
            msg = self.link.send(DOWN, rnd, cid, down[cid].kind or "model", down[cid])
            content = encode(msg, {CID: cid, RND: rnd, KNOBS: knobs[cid], MEM: mem[cid]})
            out.append(FlowerMessage(content, dst_node_id=self.node_of(cid), message_type=TRAIN, group_id=str(rnd)))
        received = self.exchange(out, cids)
        replies, ctxs = {}, {}
        for cid in cids:
            reply, nums = decode(received[cid].content)
            replies[cid] = self.link.send(UP, rnd, cid, reply.kind or "update", reply)
            ctxs[cid] = self.report(rnd, cid, knobs[cid], nums)
        return replies, ctxs

    def exchange(self, messages: list[FlowerMessage], cids: list[int]) -> dict[int, FlowerMessage]:
        """Push the round's messages, then pull until every client has answered; replies by client id."""
        ids = list(self.grid.push_messages(messages))
        waiting = dict(zip(ids, cids))
        got: dict[int, FlowerMessage] = {}
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                cid = waiting.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    raise FlowerRunError(f"client {cid} failed on SuperNode {self.node_of(cid)}: "
                                         f"{reply.error.reason}")
                got[cid] = reply
            if waiting and time.monotonic() > deadline:
                raise FlowerRunError(f"no reply from clients {sorted(waiting.values())} within {self.timeout_s:g} s")
            if waiting:
                time.sleep(POLL_S)
        return got

    def report(self, rnd: int, cid: int, knobs: dict, nums: dict) -> ClientContext:
        """The server's view of a client's round: a context holding the numbers only (no data, no model)."""
        sc = self.scenario
        return ClientContext(cid=cid, rnd=rnd, data=None, device=sc.population.device(cid), knobs=dict(knobs),
                             state={}, seed=sc.cfg.seed, model=None, task=None, flops=float(nums[FLOPS]),
                             mem_bytes=int(nums[MEM]), local_total=int(nums[LOCAL_TOTAL]),
                             selection_flops=float(nums[SELECTION_FLOPS]))
