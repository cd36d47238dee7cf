"""The client state store (engine/states.py): byte counting, the budget, spilling and reading back,
held states, pickling; and whole runs that spill (Ditto, FLoRAL) equal to runs that never do,
resumed or not."""

from __future__ import annotations

import copy
import gc
import pickle

import numpy as np
import pytest
import torch
from test_method_table import assert_identical, measured, table_config

from hetfl.engine.loop import run_rounds
from hetfl.engine.sim import SimulatedBackend
from hetfl.engine.states import ClientStates, state_nbytes
from hetfl.runner import build_run
from hetfl.track.rundir import RunDir, read_metrics

TINY = "population.state_memory_mb=0.000001"  # 1 byte: every state not at work is spilled


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g)}  # 12 float32: 48 bytes


# ----------------------------------------------------------------------------- the store


def test_state_bytes_by_hand():
    s = {"a": torch.zeros(3, 4), "b": {"c": torch.zeros(5, dtype=torch.float16)},
         "t": (np.zeros(2, dtype=np.int64), 3, "x"), "l": [torch.zeros(2, dtype=torch.int8)]}
    assert state_nbytes(s) == 3 * 4 * 4 + 5 * 2 + 2 * 8 + 2 * 1  # = 76; numbers and strings count 0
    assert state_nbytes(torch.zeros(10, 10)[:, 0]) == 10 * 4  # a view counts its own elements


def test_budget_spills_the_least_recently_used_and_reads_back_equal(tmp_path):
    st = ClientStates(budget_bytes=100, directory=tmp_path)  # room for two 48-byte states
    for c in range(5):
        st[c] = state(c)
        assert st.resident_bytes <= 100
    assert st.resident_bytes == 96 and st.spills == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.pt", "1.pt", "2.pt"]  # the oldest three
    assert len(st) == 5 and list(st) == [0, 1, 2, 3, 4] and all(c in st for c in range(5))
    assert torch.equal(st[0]["w"], state(0)["w"])  # read back (its file goes), 3 spilled to make room
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.pt", "2.pt", "3.pt"]
    st[1]["w"].add_(1.0)  # changed in place while resident ...
    st[2]  # ... then spilled again by later reads
    st[3]
    assert not st._mem.get(1)
    assert torch.equal(st[1]["w"], state(1)["w"] + 1.0)  # ... the change was written with it
    del st[4]
    assert 4 not in st and len(st) == 4
    assert st.pop(2)["w"].shape == (3, 4) and 2 not in st


def test_unlimited_budget_never_spills():
    st = ClientStates(budget_bytes=0)
    for c in range(50):
        st[c] = state(c)
    assert st.spills == 0 and st.resident_bytes == 50 * 48 and st._dir is None


def test_held_states_stay_in_memory_until_released(tmp_path):
    st = ClientStates(budget_bytes=1, directory=tmp_path)
    st[0] = state(0)
    view = st.hold(0)
    nested = view["w"]  # a reference a method keeps during its update
    st[1], st[2] = state(1), state(2)  # other clients come and go
    nested.mul_(2.0)
    view["extra"] = torch.ones(2)
    assert 0 in st._mem and not (tmp_path / "0.pt").exists()
    st.release(0)  # work done: re-measured (48 + 8 bytes) and spilled
    assert (tmp_path / "0.pt").exists()
    assert torch.equal(view["w"], 2.0 * state(0)["w"]) and torch.equal(view["extra"], torch.ones(2))
    fresh = st.hold(7)  # a client without a state gets an empty one, as with setdefault
    assert 7 in st and len(fresh) == 0 and dict(st[7]) == {}
    st.release(7)


def test_a_view_reads_a_missing_state_as_empty_and_creates_it_on_write():
    st = ClientStates()
    view = st.hold(3)
    del st[3]  # e.g. a failed client's state removed
    assert view.get("logits") is None and 3 not in st
    view["logits"] = torch.zeros(2)
    assert 3 in st and torch.equal(st[3]["logits"], torch.zeros(2))


def test_pickles_and_deep_copies_as_a_plain_dict_of_every_state(tmp_path):
    st = ClientStates(budget_bytes=50, directory=tmp_path)
    for c in range(4):
        st[c] = state(c)
    assert st.spills == 3
    for out in (pickle.loads(pickle.dumps(st)), copy.deepcopy(st)):
        assert type(out) is dict and sorted(out) == [0, 1, 2, 3]
        assert all(torch.equal(out[c]["w"], state(c)["w"]) for c in range(4))
    assert st.spills == 3 and st.loads == 0  # pickling read the files without making them resident
    moved = ClientStates.moved_from(pickle.loads(pickle.dumps(st)), budget_bytes=0)
    assert moved.spills == 0 and all(torch.equal(moved[c]["w"], state(c)["w"]) for c in range(4))


def test_the_temporary_spill_folder_goes_with_the_store():
    st = ClientStates(budget_bytes=1)
    st[0], st[1] = state(0), state(1)
    folder = st._dir
    assert folder is not None and (folder / "0.pt").exists()
    del st
    gc.collect()
    assert not folder.exists()


# ----------------------------------------------------------------------------- whole runs


class Killed(Exception):
    """The crash of a run between two rounds."""


def run(cfg, path, *, crash_in: int | None = None, resume: bool = False):
    """A run into `path`, keeping its backend; `crash_in`: killed as that round starts."""
    sc, method = build_run(cfg)
    held = {}

    def backend(scenario, m, link, selector):
        held["sim"] = SimulatedBackend(scenario, m, link, selector=selector)
        return held["sim"]

    if crash_in is not None:
        configure = method.configure

        def crash(state, rnd, cids):
            if rnd == crash_in:
                raise Killed
            return configure(state, rnd, cids)

        method.configure = crash
        with pytest.raises(Killed):
            run_rounds(sc, method, RunDir(path), backend=backend)
        return held["sim"]
    run_rounds(sc, method, RunDir(path, mode="resume") if resume else RunDir(path), backend=backend,
               resume=resume)
    return held["sim"]


@pytest.mark.parametrize("name", ["ditto", "floral"])
def test_spilling_every_state_changes_no_result(name, tmp_path):
    more = ("rounds=3", "population.num_clients=3", "population.clients_per_round=2")
    ref = run(table_config(name, *more, "population.state_memory_mb=0"), tmp_path / "ram")
    low = run(table_config(name, *more, TINY), tmp_path / "disk")
    assert ref.client_states.spills == 0 and low.client_states.spills > 0
    assert low.client_states._dir is not None and any(low.client_states._dir.iterdir())
    assert measured(read_metrics(tmp_path / "disk" / "metrics.jsonl")) == \
           measured(read_metrics(tmp_path / "ram" / "metrics.jsonl"))
    assert (tmp_path / "disk" / "clients.csv").read_text() == (tmp_path / "ram" / "clients.csv").read_text()
    ck_ram = RunDir(tmp_path / "ram", mode="resume").checkpoint_payload()
    ck_disk = RunDir(tmp_path / "disk", mode="resume").checkpoint_payload()
    assert type(ck_disk["client_states"]) is dict and ck_disk["client_states"]  # complete, spilled ones included
    assert_identical(ck_disk, ck_ram)


def test_resume_with_spilled_states_equals_the_uninterrupted_run(tmp_path):
    more = ("rounds=3", "population.num_clients=3", "population.clients_per_round=2")
    run(table_config("ditto", *more, "population.state_memory_mb=0"), tmp_path / "whole")
    killed = run(table_config("ditto", *more, TINY), tmp_path / "cut", crash_in=3)
    assert killed.client_states.spills > 0
    resumed = run(table_config("ditto", *more, TINY), tmp_path / "cut", resume=True)
    assert resumed.client_states.budget == 1 and resumed.client_states.spills > 0  # the checkpoint's states moved in
    assert measured(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == \
           measured(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    assert_identical(RunDir(tmp_path / "cut", mode="resume").checkpoint_payload(),
                     RunDir(tmp_path / "whole", mode="resume").checkpoint_payload())
