"""Device traces (FedScale layouts), availability models and capacity overrides, on hand examples."""

import importlib.util
import json
import math
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from hetfl.config import load_config
from hetfl.errors import ConfigError
from hetfl.fleet.availability import Availability, Diurnal, TraceAvailability, build_availability
from hetfl.fleet.traces import (BehaveTrace, Capacity, capacity_profile, load_behave_trace, load_capacity_trace,
                                load_trace, map_clients)
from hetfl.scenario import build_population
from hetfl.seeding import derive_seed
from hetfl.system.devices import DeviceProfile, load_diurnal

ROOT = Path(__file__).resolve().parents[1]
TIER = {"flops_per_s": "1.0e+9", "mem_mb": 512, "up_mbps": 2, "down_mbps": 10, "tx_power_w": 0.2,
        "cpu_hz": "1.0e+9", "kappa": "1.0e-28"}


def _json(tmp_path, doc, name="trace.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def _cycle(active, inactive, finish=100.0):
    return BehaveTrace(tuple(map(float, active)), tuple(map(float, inactive)), float(finish), 0.0)


# ----------------------------------------------------------------------------- behave traces

# Cycle of 100 s. 0: [0, 20) and [70, 100), online across the wrap; 1: [10, 40) + [40, 60), one
# window; 2: [20, 100), offline at every cycle's start; 3: never online; 4: always online.
HAND = [_cycle([0, 70], [20, 100]), _cycle([10, 40], [40, 60]), _cycle([20], [100]), _cycle([], []),
        _cycle([0], [100])]


@pytest.mark.parametrize("cid, t, online", [
    (0, 0, True), (0, 19.9, True), (0, 20, False), (0, 69.9, False), (0, 70, True), (0, 99.9, True),
    (0, 100, True), (0, 250, False), (1, 40, True), (1, 60, False), (2, 100, False), (2, 120, True),
    (3, 50, False), (4, 1e6 + 0.5, True),
])
def test_trace_online(cid, t, online):
    assert TraceAvailability(HAND).online(cid, t) is online


@pytest.mark.parametrize("cid, t, expected", [
    (0, 5, 20), (0, 30, 30),  # offline already: t itself
    (0, 75, 120), (0, 175, 220), (0, 105, 120),  # [70, 100) runs on into the next cycle's [0, 20)
    (1, 15, 60),  # adjacent windows merged
    (2, 50, 100),  # ends at finish_time, but the next cycle starts offline
    (3, 7, 7), (4, 12345, math.inf),
])
def test_trace_offline_at(cid, t, expected):
    assert TraceAvailability(HAND).offline_at(cid, t) == expected


@pytest.mark.parametrize("t, cids, expected", [
    (30, [0], 70), (25, [0], 70), (130, [0], 170), (20, [0], 70), (10, [0], 10),
    (60, [1], 110), (5, [1], 10), (100, [2], 120),
    (30, [1, 0, 2], 30), (65, [0, 1, 3], 70), (0, [3], math.inf), (12345, [4], 12345), (5, [], math.inf),
])
def test_trace_next_online(t, cids, expected):
    assert TraceAvailability(HAND).next_online(t, cids) == expected


def test_always_online():
    a = Availability()
    assert a.online(3, 1e9) and a.offline_at(3, 5.0) == math.inf
    assert a.next_online(7.0, [1, 2]) == 7.0 and a.next_online(7.0, []) == math.inf


def test_load_behave_trace_json_and_build_availability(tmp_path):
    doc = {"7": {"active": [0, 70], "inactive": [20, 100], "finish_time": 100, "duration": 50, "model": "Pixel"}}
    path = _json(tmp_path, doc)
    got = load_behave_trace(path)["7"]
    assert (got.active, got.inactive, got.finish_time, got.duration) == ((0.0, 70.0), (20.0, 100.0), 100.0, 50.0)
    cfg = load_config({"seed": 3, "population": {"num_clients": 4, "clients_per_round": 2,
                                                 "availability": {"trace": path}}})
    avail = build_availability(cfg, build_population(cfg))
    assert isinstance(avail, TraceAvailability)
    assert [avail.offline_at(c, 75) for c in range(4)] == [120] * 4  # one trace client: all follow it


def test_packaged_traces_load():
    behave = load_behave_trace("packaged:behave_trace.json")
    caps = load_capacity_trace("packaged:capacity_trace.json")
    assert len(behave) == len(caps) == 100
    assert all(t.finish_time == 86400 and 1 <= len(t.active) <= 5 for t in behave.values())
    assert all(10 <= c.computation_ms <= 400 and 200 <= c.communication_kbps <= 1e5 for c in caps.values())
    asset = resources.files("hetfl.fleet") / "assets" / "behave_trace.json"
    assert json.loads(asset.read_text())["1"]["finish_time"] == 86400.0


def test_make_traces_reproduces_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_traces", ROOT / "scripts" / "make_traces.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path)])
    for name in ("behave_trace.json", "capacity_trace.json"):
        shipped = (resources.files("hetfl.fleet") / "assets" / name).read_bytes()
        assert (tmp_path / name).read_bytes() == shipped, name


# ----------------------------------------------------------------------------- file reading


def test_pickle_plain_dict_loads_at_every_protocol(tmp_path):
    doc = {432802: {"computation": 162.0, "communication": 5648.1}, "x": {"computation": 1, "communication": 2}}
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"cap{proto}.pkl"
        path.write_bytes(pickle.dumps(doc, protocol=proto))
        assert load_trace(path) == doc
        assert load_capacity_trace(path)["432802"] == Capacity(162.0, 5648.1)  # ids become strings


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")  # would create the file if the global were resolved


@pytest.mark.parametrize("payload, refused", [
    (lambda tmp: {"1": _Evil(str(tmp / "pwned"))}, "io.open"),  # builtins.open pickles by its home module
    (lambda tmp: {"1": Capacity(1.0, 2.0)}, "hetfl.fleet.traces.Capacity"),
    (lambda tmp: {"1": np.float64(3.0)}, "numpy."),
])
def test_pickle_with_a_global_is_refused(tmp_path, payload, refused):
    path = tmp_path / "trace.pkl"
    path.write_bytes(pickle.dumps(payload(tmp_path)))
    with pytest.raises(ConfigError) as e:
        load_trace(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: pickle refers to {refused}") and "\n" not in msg
    assert msg.endswith("only plain containers and numbers are allowed")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name, content, expected", [
    ("bad.json", '{"1": {\n"active": [1,\n}', "bad.json:3: invalid JSON"),
    ("list.json", "[1, 2]", "list.json: top level must be a mapping"),
    ("empty.json", "{}", "empty.json: no clients"),
    ("junk.pkl", b"\x80\x05junk", "junk.pkl: not a valid pickle"),
    ("list.pkl", pickle.dumps([1, 2]), "list.pkl: top level must be a mapping"),
])
def test_unreadable_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as e:
        load_trace(path)
    assert str(e.value).startswith(str(tmp_path / expected)) and "\n" not in str(e.value)


def test_missing_file_and_packaged_name():
    with pytest.raises(ConfigError, match=r"^nowhere\.pkl: cannot read trace file"):
        load_trace("nowhere.pkl")
    with pytest.raises(ConfigError, match=r"^packaged:nope\.json: no such packaged trace"):
        load_trace("packaged:nope.json")


GOOD = {"active": [0, 30], "inactive": [10, 40], "finish_time": 50, "duration": 20}


@pytest.mark.parametrize("change, expected", [
    ({"duration": None}, "client 1: missing key 'duration'"),
    ({"active": ["x", 30]}, "client 1: active[0]: expected a number, got 'x'"),
    ({"finish_time": True}, "client 1: finish_time: expected a number, got True"),
    ({"active": "0"}, "client 1: active: expected a list of times in s, got str"),
    ({"active": [-1, 30]}, "client 1: active[0]: must be >= 0 s, got -1"),
    ({"active": [0, 30, 45]}, "client 1: 3 active times but 2 inactive times"),
    ({"inactive": [0, 40]}, "client 1: interval 0 [0, 0) is empty (inactive must be > active)"),
    ({"active": [0, 5], "inactive": [10, 40]}, "client 1: interval 1 [5, 40) starts before interval 0 ends (10); "
     "intervals must be increasing and not overlap"),
    ({"inactive": [10, 60]}, "client 1: interval 1 [30, 60) runs past finish_time 50"),
    ({"finish_time": 0, "active": [], "inactive": []}, "client 1: finish_time must be > 0 s, got 0"),
    ({"duration": -5}, "client 1: duration must be >= 0 s, got -5"),
])
def test_malformed_behave_trace(tmp_path, change, expected):
    entry = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = _json(tmp_path, {"0": GOOD, "1": entry})
    with pytest.raises(ConfigError) as e:
        load_behave_trace(path)
    assert str(e.value) == f"{path}: {expected}"


def test_behave_entry_not_a_mapping(tmp_path):
    path = _json(tmp_path, {"1": [1, 2]})
    with pytest.raises(ConfigError, match=r": client 1: expected a mapping with active, inactive, finish_time"):
        load_behave_trace(path)


@pytest.mark.parametrize("entry, expected", [
    ({"computation": 50, "communication": 0}, "client 7: communication must be > 0 kbit/s, got 0"),
    ({"computation": -3, "communication": 10}, "client 7: computation must be > 0 ms/sample, got -3"),
    ({"computation": float("nan"), "communication": 10}, "client 7: computation: must be finite, got nan"),
    ({"computation": 50, "communication": float("inf")}, "client 7: communication: must be finite, got inf"),
    ({"computation": "fast", "communication": 10}, "client 7: computation: expected a number, got 'fast'"),
    ({"computation": 50}, "client 7: missing key 'communication'"),
])
def test_malformed_capacity_trace(tmp_path, entry, expected):
    path = _json(tmp_path, {"7": entry})
    with pytest.raises(ConfigError) as e:
        load_capacity_trace(path)
    assert str(e.value) == f"{path}: {expected}"


# ----------------------------------------------------------------------------- client mapping


def test_map_clients_deterministic_and_order_free():
    ids = [str(i) for i in range(1, 51)]
    a = map_clients(ids, 20, seed=4)
    assert a == map_clients(list(reversed(ids)), 20, seed=4)  # file order does not matter
    assert len(set(a)) == 20 and set(a) <= set(ids)  # enough trace clients: no repeats
    assert a != map_clients(ids, 20, seed=5)
    b = map_clients(["a", "b", "c"], 7, seed=0)
    assert len(b) == 7 and set(b) <= {"a", "b", "c"}  # too few: with replacement
    assert map_clients(["a", "b", "c"], 3, seed=0) == ["c", "b", "a"]  # pinned draw


def test_map_clients_sorts_integer_ids_numerically():
    picks = np.random.default_rng(derive_seed(1, "trace-map")).choice(3, size=3, replace=False)
    assert map_clients(["10", "9", "1"], 3, seed=1) == [["1", "9", "10"][int(i)] for i in picks]


# ----------------------------------------------------------------------------- capacity


def test_capacity_profile_conversion():
    tier = DeviceProfile("phone-low", 2e9, 1024, 5, 15, 0.2, 1.8e9, 1e-28)
    got = capacity_profile(tier, Capacity(computation_ms=50.0, communication_kbps=2000.0), ref_flops=6e8)
    assert got.flops_per_s == pytest.approx(1.2e10)  # 6e8 FLOPs per forward * 1000 / 50 ms
    assert got.up_mbps == got.down_mbps == 2.0
    assert (got.name, got.mem_mb, got.tx_power_w, got.cpu_hz, got.kappa) == ("phone-low", 1024, 0.2, 1.8e9, 1e-28)


def test_build_population_applies_capacity_trace(tmp_path):
    caps = {"1": {"computation": 50, "communication": 2000}, "2": {"computation": 100, "communication": 500},
            "3": {"computation": 25, "communication": 10000}}
    path = _json(tmp_path, caps, "cap.json")
    cfg = load_config({"seed": 2, "population": {"num_clients": 8, "capacity_trace": path,
                                                 "capacity_ref_flops": 1e9}})
    pop = build_population(cfg)
    ids = map_clients(list(caps), 8, 2)
    assert sorted(pop.overrides) == list(range(8))
    for cid in range(8):
        dev, tier = pop.device(cid), pop.profiles[pop.tiers[cid]]
        c = caps[ids[cid]]
        assert dev.flops_per_s == pytest.approx(1e9 * 1000 / c["computation"])
        assert dev.up_mbps == dev.down_mbps == c["communication"] / 1000
        assert (dev.name, dev.mem_mb) == (tier.name, tier.mem_mb)
    plain = build_population(load_config({"seed": 2, "population": {"num_clients": 8}}))
    assert plain.overrides == {} and plain.tiers == pop.tiers  # the trace changes speeds, not tiers


def test_build_population_packaged_capacity_trace():
    cfg = load_config({"population": {"num_clients": 30, "capacity_trace": "packaged:capacity_trace.json"}})
    pop = build_population(cfg)
    speeds = {pop.device(c).flops_per_s for c in range(30)}
    assert len(speeds) > 20 and all(6e8 * 1000 / 400 <= s <= 6e8 * 1000 / 10 for s in speeds)


# ----------------------------------------------------------------------------- diurnal

CURVES = {"a": [0.3] * 24, "never": [0.0] * 24, "always": [1.0] * 24,
          "half": [1.0] * 12 + [0.0] * 12}


def test_diurnal_does_not_depend_on_query_order():
    tiers = ["a"] * 40
    queries = [(c, h * 3600.0 + 17) for c in range(40) for h in range(48)]
    first = Diurnal(tiers, CURVES, seed=9)
    forward = {q: first.online(*q) for q in queries}
    second = Diurnal(tiers, CURVES, seed=9)
    backward = {q: second.online(*q) for q in reversed(queries)}
    assert forward == backward
    assert any(forward.values()) and not all(forward.values())
    other = Diurnal(tiers, CURVES, seed=10)
    assert {q: other.online(*q) for q in queries} != forward


def test_diurnal_fraction_online_matches_probability():
    n, p = 4000, 0.3
    curve = [0.9] * 24
    curve[5] = p
    d = Diurnal(["t"] * n, {"t": curve}, seed=0)
    frac = np.mean([d.online(c, 5 * 3600 + 1800) for c in range(n)])
    sd = math.sqrt(p * (1 - p) / n)  # binomial: 0.0072
    assert abs(frac - p) < 4 * sd
    frac_next_day = np.mean([d.online(c, 29 * 3600.0) for c in range(n)])  # same hour, next day: fresh draws
    assert abs(frac_next_day - p) < 4 * sd


def test_diurnal_offline_at_and_next_online():
    d = Diurnal(["a", "never", "always", "half"], CURVES, seed=1)
    assert d.offline_at(2, 10.0) == math.inf and d.next_online(10.0, [2]) == 10.0
    assert d.offline_at(1, 10.0) == 10.0 and d.next_online(10.0, [1]) == math.inf
    assert d.offline_at(3, 3600.0 * 24 * 5 + 100) == 3600.0 * (24 * 5 + 12)  # online 00-12, off 12-24
    assert d.next_online(3600.0 * 13.5, [3, 1]) == 86400.0
    for t in (0.0, 5000.0, 77777.0):  # the first slot whose draw differs, brute force
        slot = math.floor(t / 3600)
        if d.online(0, t):
            s = next(s for s in range(slot, slot + 720) if not d.online(0, s * 3600.0))
            assert d.offline_at(0, t) == s * 3600.0
        else:
            s = next(s for s in range(slot, slot + 720) if d.online(0, s * 3600.0))
            assert d.next_online(t, [0]) == s * 3600.0


def test_build_availability_diurnal_packaged_and_fallback(tmp_path):
    cfg = load_config({"population": {"num_clients": 10, "availability": "diurnal"}})
    assert isinstance(build_availability(cfg, build_population(cfg)), Diurnal)
    dev = tmp_path / "dev.yaml"
    dev.write_text(json.dumps({"tiers": {"laptop": TIER, "tiny": TIER}}))  # JSON is YAML
    assert load_diurnal(str(dev)) == {"laptop": load_diurnal()["laptop"]}  # packaged curve by name
    user = {"num_clients": 4, "clients_per_round": 2, "availability": "diurnal", "devices_file": str(dev)}
    cfg = load_config({"population": {**user, "tiers": {"laptop": 1}}})
    assert isinstance(build_availability(cfg, build_population(cfg)), Diurnal)
    cfg = load_config({"population": {**user, "tiers": {"laptop": 1, "tiny": 1}}})
    with pytest.raises(ConfigError, match=r"^population\.availability: diurnal: tier 'tiny' has no diurnal curve"):
        build_availability(cfg, build_population(cfg))


def test_packaged_diurnal_curves():
    curves = load_diurnal()
    assert set(curves) == {"phone-low", "phone-mid", "phone-high", "jetson-nano", "laptop"}
    assert all(len(c) == 24 and all(0 <= p <= 1 for p in c) for c in curves.values())
    assert int(np.argmax(curves["phone-mid"])) == 3 and max(curves["phone-mid"]) / min(curves["phone-mid"]) == 5
    assert int(np.argmax(curves["laptop"])) == 14  # a daytime curve


@pytest.mark.parametrize("diurnal, expected", [
    ({"tiny": [0.5] * 23}, "diurnal.tiny: expected a list of 24 probabilities (hour 0..23), got 23 values"),
    ({"tiny": [0.5] * 3 + [1.5] + [0.5] * 20}, "diurnal.tiny: hour 3: expected a probability in [0, 1], got 1.5"),
    ({"tiny": [0.5] * 23 + ["x"]}, "diurnal.tiny: hour 23: expected a probability in [0, 1], got 'x'"),
    ({"tiny": 0.5}, "diurnal.tiny: expected a list of 24 probabilities (hour 0..23), got 0.5"),
    ({"ghost": [0.5] * 24}, "diurnal.ghost: unknown tier (known: tiny)"),
    ([0.5], "diurnal: expected a mapping of tier -> 24 probabilities (hour 0..23)"),
])
def test_load_diurnal_errors(tmp_path, diurnal, expected):
    dev = tmp_path / "dev.yaml"
    dev.write_text(json.dumps({"tiers": {"tiny": TIER}, "diurnal": diurnal}))
    with pytest.raises(ConfigError) as e:
        load_diurnal(str(dev))
    assert str(e.value) == f"{dev}: {expected}"
