"""Per-batch client -> server calls for split learning, through the measured link.

A split method registers a server-side callable; the backend gives each client a
`LinkedServer` whose `call(kind, msg)` sends `msg` up the link, runs the callable on what the
server received, and sends the reply down. Activations, outputs and gradients therefore appear
in the ledger under their own message kinds, every codec applies to them, and their bytes land
on the client's cost like any other traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetfl.engine.api import ClientContext, Message, ServerCall
from hetfl.engine.link import DOWN, UP, Link


class LinkedServer:
    """`ServerHandle` for one client in one round.

    Args:
        link: the run's link.
        rnd: current round.
        cid: the calling client.
        handler: the method's server-side callable for this round.
    """

    def __init__(self, link: Link, rnd: int, cid: int, handler: ServerCall):
        self.link, self.rnd, self.cid, self.handler = link, rnd, cid, handler

    def call(self, kind: str, msg: Message) -> Message:
        """Send `msg` up as `kind`, run the server, return the reply as the client receives it."""
        received = self.link.send(UP, self.rnd, self.cid, kind, msg)
        reply = self.handler(self.cid, kind, received)
        return self.link.send(DOWN, self.rnd, self.cid, reply.kind or f"{kind}_reply", reply)


@dataclass
class ServerMeter:
    """FLOPs spent by the server, measured exactly like a client's (`ClientContext.compute`:
    engine/flops.py on the first call per key, cached afterwards)."""

    flops: float = 0.0
    _flop_cache: dict = field(default_factory=dict, repr=False)

    compute = ClientContext.compute  # the same counting code, applied to this meter's fields
