"""The Link every client<->server message crosses, and the Ledger that counts it.

Communication figures are measured here, from the encoded tensors, never estimated by a method.
Which codec a message gets is resolved per message, most specific first:

    per-client override (`link.set_codec(cid, kind, name)`, set by a method at run time)
    > `comm.by_kind[kind]`
    > the direction default (`comm.up` / `comm.down`)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from hetfl.comm.codecs import Quant, make_codec
from hetfl.engine.api import Message
from hetfl.seeding import generator

UP, DOWN = "up", "down"


@dataclass
class Entry:
    rnd: int
    cid: int
    direction: str
    kind: str
    nbytes: int
    sq_error: float
    codec: str = ""  # name of the codec the message was sent with


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
    """Applies the resolved codec to every message and records its bytes.

    Args:
        up: default codec name for client -> server.
        down: default codec name for server -> client.
        ledger: where byte counts go.
        seed: root seed; stochastic codecs draw from (seed, round, client, direction, kind, call).
        by_kind: message kind -> codec name, overriding the direction default for that kind
            (`comm.by_kind`, e.g. {"activations": "sq8", "grad_cut": "fp16"}).

    Raises:
        ConfigError: naming `comm.up`, `comm.down` or `comm.by_kind.<kind>` for an unknown codec.
    """

    def __init__(self, up: str, down: str, ledger: Ledger, seed: int, *, by_kind: Mapping[str, str] | None = None):
        self.defaults = {UP: up, DOWN: down}
        self.by_kind = dict(by_kind or {})
        self.ledger = ledger
        self.seed = seed
        self._calls: dict[tuple, int] = defaultdict(int)
        self._overrides: dict[tuple[int, str], str | Quant] = {}  # (cid, kind) -> codec choice
        self._codecs: dict[str | Quant, object] = {}  # codec instances by choice (codecs are stateless)
        self._codec(up, "comm.up")  # fail at construction, naming the key, not at the first message
        self._codec(down, "comm.down")
        for kind, name in self.by_kind.items():
            self._codec(name, f"comm.by_kind.{kind}")

    @property
    def codecs(self) -> dict[str, object]:
        """The direction defaults' codec instances (kept for callers of the old attribute)."""
        return {d: self._codecs[n] for d, n in self.defaults.items()}

    def _codec(self, name: "str | Quant", key: str):
        if name not in self._codecs:
            self._codecs[name] = make_codec(name, key)
        return self._codecs[name]

    def set_codec(self, cid: int, kind: str, name: "str | Quant") -> None:
        """Send client `cid`'s messages of `kind` (both directions) with codec `name` (a codec name or
        a typed `Quant` choice) from now on.

        Raises:
            ConfigError: if `name` is not a codec (the message names the client and kind).
        """
        self._codec(name, f"codec for client {cid}, message kind {kind!r}")
        self._overrides[(cid, kind)] = name

    def clear_codecs(self, cid: int | None = None) -> None:
        """Drop the per-client overrides of one client, or of all clients (`cid=None`)."""
        if cid is None:
            self._overrides.clear()
        else:
            for k in [k for k in self._overrides if k[0] == cid]:
                del self._overrides[k]

    def codec_name(self, direction: str, cid: int, kind: str) -> str:
        """The name of the codec a message of `kind` from/to `cid` in `direction` is sent with."""
        choice = self._choice(direction, cid, kind)
        return choice.name if isinstance(choice, Quant) else choice

    def _choice(self, direction: str, cid: int, kind: str) -> "str | Quant":
        choice = self._overrides.get((cid, kind))
        return self.by_kind.get(kind, self.defaults[direction]) if choice is None else choice

    def send(self, direction: str, rnd: int, cid: int, kind: str, msg: Message) -> Message:
        """Encode, count and decode `msg`; returns what the receiver sees."""
        n = self._calls[(rnd, cid, direction, kind)]
        self._calls[(rnd, cid, direction, kind)] = n + 1
        gen = generator(self.seed, rnd, cid, direction, kind, n)
        choice = self._choice(direction, cid, kind)
        codec = self._codecs[choice]
        name = choice.name if isinstance(choice, Quant) else choice
        tensors, nbytes, err = {}, msg.meta_nbytes(), 0.0
        for tname, t in msg.tensors.items():
            enc = codec.roundtrip(t, gen)
            tensors[tname] = enc.tensor
            nbytes += enc.nbytes
            err += enc.sq_error
        self.ledger.record(Entry(rnd, cid, direction, kind, nbytes, err, name))
        return Message(tensors, dict(msg.meta), kind)

    def reset_round(self, rnd: int) -> None:
        for k in [k for k in self._calls if k[0] == rnd]:
            del self._calls[k]
