"""The clients' private states: in memory up to a byte budget, on disk beyond it, with identical results.

A stateful method keeps a dict per client between rounds (Ditto's personal model, FLoRAL's router
logits, FedV's personal tail, a local adaptor). With 10,000 clients these outgrow memory (Ditto's
personal copy of tiny-llama is ~15 MB per client), so `ClientStates`, a `MutableMapping[int, dict]`,
holds them for the simulator (`SimulatedBackend.client_states`):

- Budget. The resident states' tensor bytes (`state_nbytes`: tensors and numpy arrays inside nested
  dicts, lists and tuples) stay within `budget_bytes` (`population.state_memory_mb`; 0: unlimited).
  A state is measured when it enters the store and again when its client's round work is released.
- Spilling. Over budget, the least recently used resident state is written to `<dir>/<cid>.pt`
  (torch.save of the client's dict) and dropped from memory; reading it loads it back and deletes
  the file, so at any time a state has exactly one copy, in memory or on disk. The in-memory dict
  is that copy: it is written when spilled (write-back), so in-place changes made while it was
  resident are kept. torch.save/torch.load restore tensors bit for bit (dtype, shape, strides), so
  a spilled state reads back equal and results do not depend on the budget. States without tensor
  bytes are never spilled (nothing to gain).
- Held during a round. The backend `hold`s each client it runs: `ClientContext.state` is then a
  `StateView`, which reaches the client's dict through the store at every access. The first access
  loads the dict; from then until the backend `release`s the client (after its update; after the
  round's last step in lockstep) it is never spilled, so whatever a method keeps a reference to
  during its update (a nested dict, a tensor it changes in place, FedHDS's stash between
  `summarize` and `apply`) is the live copy. No context holds the dict itself, so once released
  a state that spills frees its memory at once, although the loop keeps the round's contexts.
  Peak memory is the budget plus the states of the clients at work: one at a time for `parallel`
  and `sequential` methods, the cohort for `lockstep` ones or with a selection stage.
- Outside a round (the loop's per-client evaluation, `Fleet.keep_states` / `restore_states`, the
  asynchronous server) the store is a plain mapping: an access loads the state and makes it the
  most recent, and the trim that follows never spills the state just accessed, so
  `states[c]["x"] = y` is kept.
- Checkpoints. A store pickles (and deep-copies) as a plain dict of every state, spilled ones read
  back from disk, so a checkpoint is complete and loads without this module; on resume
  `SimulatedBackend` moves that dict into a new store with the run's budget. While torch.save
  writes a checkpoint every state is in memory once (torch keeps a file's tensors until it closes
  it), so a run whose states far exceed memory should checkpoint rarely (`checkpoint_every`).
- The spill folder is scratch (the checkpoint is the durable copy): a temporary folder (under
  $TMPDIR), made at the first spill and removed when the store is garbage-collected or the
  process exits, unless a `directory` is given.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

MIB = 2**20


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensors and numpy arrays in `obj`, walking dicts, lists and tuples.

    A tensor counts `numel * element_size` (its own elements, not a larger storage it may view);
    other leaves (numbers, strings) count 0."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


class ClientStates(MutableMapping):
    """Client id -> private state dict, resident up to `budget_bytes`, spilled to disk beyond it.

    Args:
        budget_bytes: most tensor bytes kept in memory (held states and the one just accessed
            excepted); 0: no limit, nothing is ever spilled.
        directory: where spilled states go; None: a temporary folder, removed with the store.
    """

    def __init__(self, budget_bytes: int = 0, directory: str | Path | None = None):
        self.budget = int(budget_bytes)
        self._mem: OrderedDict[int, dict] = OrderedDict()  # resident states, least recently used first
        self._size: dict[int, int] = {}  # tensor bytes of each resident state, as last measured
        self._disk: set[int] = set()  # spilled clients, one file each
        self._held: set[int] = set()  # clients at work this round: never spilled
        self._root = Path(directory) if directory is not None else None
        self._dir: Path | None = None
        self.resident_bytes = 0
        self.spills = 0  # states written to disk so far
        self.loads = 0  # states read back so far

    @classmethod
    def moved_from(cls, states, budget_bytes: int) -> ClientStates:
        """A store with `budget_bytes` holding `states` (a checkpoint's dict, or another store).

        The states are moved, not copied: `states` is left empty, so a checkpoint's dict does not
        keep every state in memory beside the store."""
        out = cls(budget_bytes)
        for cid in sorted(states):
            out[cid] = states.pop(cid)
        return out

    # -- the mapping -------------------------------------------------------------------------
    def __getitem__(self, cid: int) -> dict:
        state = self._fetch(cid)
        self._trim(keep=cid)
        return state

    def __setitem__(self, cid: int, state: dict) -> None:
        self._discard(cid)
        self._mem[cid] = state
        self._size[cid] = state_nbytes(state)
        self.resident_bytes += self._size[cid]
        self._trim(keep=cid)

    def __delitem__(self, cid: int) -> None:
        if cid not in self:
            raise KeyError(cid)
        self._discard(cid)

    def __contains__(self, cid: object) -> bool:
        return cid in self._mem or cid in self._disk

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._mem.keys() | self._disk))

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def __repr__(self) -> str:
        return (f"ClientStates({len(self)} states, {len(self._mem)} in memory ({self.resident_bytes / MIB:.1f} MiB), "
                f"{len(self._disk)} on disk, budget {self.budget / MIB:.1f} MiB)")

    def __reduce__(self):
        """Pickle and deep-copy as a plain dict of every state (spilled ones read from disk)."""
        return dict, (), None, None, ((cid, self._peek(cid)) for cid in self)

    # -- rounds --------------------------------------------------------------------------------
    def hold(self, cid: int) -> StateView:
        """Client `cid` is at work: its state (an empty one if it has none) is never spilled until
        `release`; returns the view its `ClientContext.state` is."""
        if cid not in self:
            self[cid] = {}  # every sampled client has an entry, as with dict.setdefault
        self._held.add(cid)
        return StateView(self, cid)

    def release(self, *cids: int) -> None:
        """The clients' work is done: re-measure their states, make them the most recent, and
        spill down to the budget."""
        for cid in cids:
            self._held.discard(cid)
            if cid in self._mem:
                self._mem.move_to_end(cid)
                self.resident_bytes += state_nbytes(self._mem[cid]) - self._size[cid]
                self._size[cid] = state_nbytes(self._mem[cid])
        self._trim()

    def open(self, cid: int, create: bool) -> dict:
        """Client `cid`'s dict, resident; a missing one is created (`create`) or read as empty."""
        if cid in self:
            return self[cid]
        if not create:
            return {}
        self[cid] = {}
        return self._mem[cid]

    # -- memory and disk -----------------------------------------------------------------------
    def _fetch(self, cid: int) -> dict:
        if cid in self._mem:
            self._mem.move_to_end(cid)
            return self._mem[cid]
        if cid not in self._disk:
            raise KeyError(cid)
        state = self._peek(cid)
        self._path(cid).unlink()
        self._disk.discard(cid)
        self._mem[cid] = state
        self._size[cid] = state_nbytes(state)
        self.resident_bytes += self._size[cid]
        self.loads += 1
        return state

    def _peek(self, cid: int) -> dict:
        """The state, from memory or read from its file (without making it resident)."""
        if cid in self._mem:
            return self._mem[cid]
        return torch.load(self._path(cid), weights_only=False)  # our own file: any picklable state

    def _discard(self, cid: int) -> None:
        if cid in self._mem:
            del self._mem[cid]
            self.resident_bytes -= self._size.pop(cid)
        elif cid in self._disk:
            self._path(cid).unlink()
            self._disk.discard(cid)

    def _trim(self, keep: int | None = None) -> None:
        """Spill the least recently used states (not held, not `keep`, not empty) down to the budget."""
        if self.budget <= 0 or self.resident_bytes <= self.budget:
            return
        for cid in list(self._mem):
            if self.resident_bytes <= self.budget:
                break
            if cid == keep or cid in self._held or self._size[cid] == 0:
                continue
            state = self._mem.pop(cid)
            self.resident_bytes -= self._size.pop(cid)
            torch.save(state, self._path(cid))
            self._disk.add(cid)
            self.spills += 1

    def _path(self, cid: int) -> Path:
        if self._dir is None:
            if self._root is not None:
                self._root.mkdir(parents=True, exist_ok=True)
                self._dir = self._root
            else:
                self._dir = Path(tempfile.mkdtemp(prefix="hetfl-states-"))
                weakref.finalize(self, shutil.rmtree, self._dir, True)  # also runs at interpreter exit
        return self._dir / f"{cid}.pt"


class StateView(MutableMapping):
    """`ClientContext.state` in the simulator: client `cid`'s dict, reached through the store at
    every access (reading a missing state gives an empty one; writing creates it)."""

    __slots__ = ("_store", "_cid")

    def __init__(self, store: ClientStates, cid: int):
        self._store, self._cid = store, cid

    def __getitem__(self, key: str) -> Any:
        return self._store.open(self._cid, create=False)[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._store.open(self._cid, create=True)[key] = value

    def __delitem__(self, key: str) -> None:
        del self._store.open(self._cid, create=True)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._store.open(self._cid, create=False)))

    def __len__(self) -> int:
        return len(self._store.open(self._cid, create=False))

    def __repr__(self) -> str:
        return f"StateView(client {self._cid}: {sorted(self)})"

    def __reduce__(self):
        """Pickle and deep-copy as the plain dict it shows."""
        return dict, (), None, None, iter(list(self._store.open(self._cid, create=False).items()))
