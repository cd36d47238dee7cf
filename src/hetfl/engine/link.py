"""The Link every client<->server message crosses, and the Ledger that counts it.

Communication figures are measured here, from the encoded tensors, never estimated by a method.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from hetfl.comm.codecs import make_codec
from hetfl.engine.api import Message, generator

UP, DOWN = "up", "down"


@dataclass
class Entry:
    rnd: int
    cid: int
    direction: str
    kind: str
    nbytes: int
    sq_error: float


class Ledger:
    """Bytes per (round, client, direction, message kind)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def record(self, e: Entry) -> None:
        self.entries.append(e)

    def bytes(self, *, rnd: int | None = None, cid: int | None = None, direction: str | None = None,
              kind: str | None = None) -> int:
        return sum(
            e.nbytes for e in self.entries
            if (rnd is None or e.rnd == rnd) and (cid is None or e.cid == cid)
            and (direction is None or e.direction == direction) and (kind is None or e.kind == kind)
        )

    def by_kind(self, rnd: int | None = None) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = defaultdict(int)
        for e in self.entries:
            if rnd is None or e.rnd == rnd:
                out[(e.direction, e.kind)] += e.nbytes
        return dict(out)

    def drop_round(self, rnd: int) -> None:
        """Forget a round's entries (the loop keeps only the current round in memory)."""
        self.entries = [e for e in self.entries if e.rnd != rnd]


class Link:
    """Applies the configured codec per direction and records every message's bytes.

    Args:
        up: codec name for client -> server.
        down: codec name for server -> client.
        ledger: where byte counts go.
        seed: root seed; stochastic codecs draw from (seed, round, client, direction, kind).
    """

    def __init__(self, up: str, down: str, ledger: Ledger, seed: int):
        self.codecs = {UP: make_codec(up, "comm.up"), DOWN: make_codec(down, "comm.down")}
        self.ledger = ledger
        self.seed = seed
        self._calls: dict[tuple, int] = defaultdict(int)

    def send(self, direction: str, rnd: int, cid: int, kind: str, msg: Message) -> Message:
        """Encode, count and decode `msg`; returns what the receiver sees."""
        n = self._calls[(rnd, cid, direction, kind)]
        self._calls[(rnd, cid, direction, kind)] = n + 1
        gen = generator(self.seed, rnd, cid, direction, kind, n)
        codec = self.codecs[direction]
        tensors, nbytes, err = {}, msg.meta_nbytes(), 0.0
        for name, t in msg.tensors.items():
            enc = codec.roundtrip(t, gen)
            tensors[name] = enc.tensor
            nbytes += enc.nbytes
            err += enc.sq_error
        self.ledger.record(Entry(rnd, cid, direction, kind, nbytes, err))
        return Message(tensors, dict(msg.meta), kind)

    def reset_round(self, rnd: int) -> None:
        for k in [k for k in self._calls if k[0] == rnd]:
            del self._calls[k]
