"""Honest costs, each rule against a hand-computed value: the server's compute in split methods'
client time (server FLOPs * n / server FLOP/s, n = clients served at once), sequential methods
timed as the sum of their clients, the `server:` entry of the device file, and memory estimates
at each model's real token count."""

import csv
from types import SimpleNamespace

import pytest
import torch

from hetfl.config import load_config
from hetfl.engine.loop import run_rounds
from hetfl.errors import ConfigError
from hetfl.runner import build_method
from hetfl.scenario import build_scenario
from hetfl.system.cost import Cost, WirelessCost, fixed_costs, round_time, served_at_once, server_time
from hetfl.system.devices import DeviceProfile, ServerProfile, load_server
from hetfl.system.wireless import WirelessConfig, draw_channels
from hetfl.track.rundir import RunDir

torch.set_num_threads(1)

DEV = DeviceProfile("box", flops_per_s=1e9, mem_mb=1024, up_mbps=1, down_mbps=1, tx_power_w=0.1, cpu_hz=1e9,
                    kappa=1e-28)
BOX = ("tiers:\n  box:\n    flops_per_s: 1.0e+9\n    mem_mb: 1024\n    up_mbps: 1\n    down_mbps: 1\n"
       "    tx_power_w: 0.1\n    cpu_hz: 1.0e+9\n    kappa: 1.0e-28\n")

# ----------------------------------------------------------------------------- pure functions


def test_server_time_and_sharing_by_hand():
    assert server_time(3e9, 1e9) == pytest.approx(3.0)
    assert server_time(3e9, 1e9, sharing=4) == pytest.approx(12.0)  # 4 clients share the server
    assert served_at_once([3, 5, 7]) == {3: 3, 5: 3, 7: 3}  # one server for all
    assert served_at_once([3, 5, 7], sequential=True) == {3: 1, 5: 1, 7: 1}
    assert served_at_once([3, 5, 7], server_of={3: 0, 5: 1, 7: 0}) == {3: 2, 5: 1, 7: 2}


def test_fixed_costs_add_the_shared_server_wait_by_hand():
    """2e9 local FLOPs at 1e9 FLOP/s = 2 s; 125,000 bytes up at 1 Mbit/s = 1 s; 250,000 down = 2 s.
    Server 1e10 FLOP/s, server FLOPs 2e9 and 4e9, both clients at once: 2e9*2/1e10 = 0.4 s,
    4e9*2/1e10 = 0.8 s; in sequence each is alone: 0.2 s and 0.4 s."""
    server = ServerProfile("server", 1e10)
    args = ([0, 1], {0: DEV, 1: DEV}, {0: 2e9, 1: 2e9}, {0: 125_000, 1: 125_000}, {0: 250_000, 1: 250_000},
            {0: 2e9, 1: 4e9}, server)
    par = fixed_costs(*args)
    assert [par[c].t_server for c in (0, 1)] == pytest.approx([0.4, 0.8])
    assert [par[c].time_s for c in (0, 1)] == pytest.approx([5.4, 5.8])
    assert par[0].energy_j == pytest.approx(1e-28 * 1e18 * 2e9 + 0.1 * 1.0)  # no idle power: unchanged
    seq = fixed_costs(*args, sequential=True)
    assert [seq[c].t_server for c in (0, 1)] == pytest.approx([0.2, 0.4])
    assert round_time(par.values()) == pytest.approx(5.8)  # the slowest client
    assert round_time(seq.values(), sequential=True) == pytest.approx(5.2 + 5.4)  # one after the other
    none = fixed_costs([0], {0: DEV}, {0: 2e9}, {0: 0}, {0: 0}, {}, server)  # no server work (FedAvg)
    assert none[0].t_server == 0.0 and none[0].time_s == pytest.approx(2.0)


def test_round_time_sequential_is_the_sum():
    costs = [Cost(t_comp=2.0, t_server=1.0), Cost(t_up=4.0), Cost(t_down=0.5)]
    assert round_time(costs) == pytest.approx(4.0)
    assert round_time(costs, sequential=True) == pytest.approx(7.5)
    assert round_time([], sequential=True) == 0.0


def test_wireless_cost_serves_sequential_clients_alone():
    """Two clients on one 1e9 FLOP/s server, 1e9 server FLOPs each: 2 s when served at once, 1 s in turn."""
    w = WirelessConfig(enabled=True, num_servers=1, down_rate_bps=1e6, server_flops_per_s=1e9)
    wc = WirelessCost(w, draw_channels(w, 2, seed=0))
    args = ([0, 1], {0: DEV, 1: DEV}, {0: 0.0, 1: 0.0}, {0: 0, 1: 0}, {0: 0, 1: 0}, {0: 1e9, 1: 1e9},
            {0: (1e6, 0.1, 0), 1: (1e6, 0.1, 0)})
    assert [c.t_server for c in wc.costs(*args).values()] == pytest.approx([2.0, 2.0])
    assert [c.t_server for c in wc.costs(*args, sequential=True).values()] == pytest.approx([1.0, 1.0])


# ----------------------------------------------------------------------------- the server entry


def test_server_entry_is_shipped_and_a_user_file_overrides_it(tmp_path):
    assert load_server() == ServerProfile("server", 2.5e12)  # devices.yaml: one NVIDIA T4, ~30% of fp32 peak
    own = tmp_path / "own.yaml"
    own.write_text(BOX + "server:\n  flops_per_s: 4.0e+11\n")
    assert load_server(str(own)).flops_per_s == 4e11
    bare = tmp_path / "bare.yaml"
    bare.write_text(BOX)
    assert load_server(str(bare)).flops_per_s == 2.5e12  # no server entry: the shipped one
    for body, msg in [("server:\n  flops_per_s: 0\n", "server.flops_per_s: must be > 0"),
                      ("server:\n  gflops: 1\n", "server.gflops: unknown field"),
                      ("server:\n  {}\n", "server.flops_per_s: missing field"),
                      ("servers:\n  flops_per_s: 1\n", "top-level 'tiers:'")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(BOX + body)
        with pytest.raises(ConfigError, match=msg):
            load_server(str(bad))


# ----------------------------------------------------------------------------- split methods in the loop

B, K = 4, 2  # batch size, local steps
F = 2 * B * 128 * 128  # mlp body (128 -> 128) forward FLOPs per step
T = 2 * B * 128 * 10  # mlp tail (128 -> 10 classifier) forward FLOPs per step


def split_run(tmp_path, method, *sets):
    """One round of `method` on the mlp, 2 clients of the `box` tier, a 1e9 FLOP/s server."""
    dev = tmp_path / "dev.yaml"
    dev.write_text(BOX + "server:\n  flops_per_s: 1.0e+9\n")
    cfg = load_config({
        "seed": 2, "rounds": 1, "model": {"name": "mlp"},
        "data": {"name": "digits", "samples_per_family": 6, "eval_samples": 20, "partition": "iid"},
        "train": {"optimizer": "sgd", "lr": 0.05, "local_steps": K, "batch_size": B},
        "method": method, "comm": {"up": "fp32", "down": "fp32"},
        "population": {"num_clients": 2, "clients_per_round": 2, "tiers": {"box": 1}, "devices_file": str(dev)},
        "eval": {"at_start": False},
    }, list(sets))
    rd = RunDir(tmp_path / "r")
    hist = run_rounds(build_scenario(cfg), build_method(cfg), rd)
    return hist[-1], list(csv.DictReader(open(tmp_path / "r" / "clients.csv")))


# Server FLOPs per client and round (K steps), as in test_split's hand count: a trained body costs
# forward + weight grad + input grad = 3F, a frozen/forward-only one 2F (FedVZ, q=1: 2B samples
# forward); SplitFed also runs the tail (3T). n: clients the server serves at once.
SPLIT_CASES = [
    ({"name": "fedv"}, (), K * 3 * F, 2),
    ({"name": "fedvz"}, (), K * 2 * F, 2),
    ({"name": "splitfed-v1"}, (), K * (3 * F + 3 * T), 2),
    ({"name": "sflam", "server_tune": "full", "bits": 32}, (), K * (3 * F + 3 * T), 2),
    ({"name": "sflam", "server_tune": "full", "bits": 32}, ("wireless.num_servers=2",), K * (3 * F + 3 * T), 1),
    ({"name": "splitfed-v2"}, (), K * (3 * F + 3 * T), 1),  # in sequence: each alone
    ({"name": "sl-vanilla"}, (), K * (3 * F + 3 * T), 1),
]


@pytest.mark.parametrize("method, sets, server_flops, n", SPLIT_CASES,
                         ids=["fedv", "fedvz", "splitfed-v1", "sflam", "sflam-2-servers", "splitfed-v2", "sl-vanilla"])
def test_split_client_time_includes_the_server_wait(tmp_path, method, sets, server_flops, n):
    m, rows = split_run(tmp_path, method, *sets)
    assert len(rows) == 2
    for r in rows:
        assert float(r["t_server_s"]) == pytest.approx(server_flops * n / 1e9)  # server FLOPs * n / 1e9 FLOP/s
        parts = sum(float(r[k]) for k in ("t_comp_s", "t_up_s", "t_down_s", "t_server_s"))
        assert float(r["sim_time_s"]) == pytest.approx(parts)
    times = [float(r["sim_time_s"]) for r in rows]
    sequential = method["name"] in ("splitfed-v2", "sl-vanilla")
    assert m["round_time_s"] == pytest.approx(sum(times) if sequential else max(times))
    assert m["round_energy_j"] == pytest.approx(sum(float(r["energy_j"]) for r in rows))


# ----------------------------------------------------------------------------- memory: real token counts


def test_tiny_vit_memory_uses_its_patch_count_not_max_len():
    """tiny-vit: 32x32 images, 4x4 patches -> (32/4)^2 = 64 tokens, no CLS (the head mean-pools);
    data.max_len (96 by default) is for text only. Activations at 64 tokens, batch 4, 6 layers,
    h 128, f 256: 6 * 64 * 4 * (8*128 + 2*256) * 4 bytes; plain SGD: weights + gradients."""
    from hetfl.methods.common import estimate_memory, tokens_per_sample
    from hetfl.models.classifiers import build_image_classifier

    model = build_image_classifier("tiny-vit-random", 10, seed=0)
    cfg = load_config({"train": {"batch_size": 4, "optimizer": "sgd", "momentum": 0.0}})
    assert cfg.data.max_len == 96
    assert tokens_per_sample(model, cfg) == (32 // 4) ** 2 == 64
    with torch.no_grad():  # the model really runs 64 tokens through its blocks
        assert model.stem({"pixel_values": torch.zeros(1, 1, 32, 32)})[0].shape[1] == 64
    total = sum(p.numel() for p in model.parameters())
    act = 6 * 64 * 4 * (8 * 128 + 2 * 256) * 4
    assert estimate_memory(model, 1000, cfg) == 4 * total + 4 * 1000 + act


def test_text_memory_uses_max_len():
    """A transformer config without `num_tokens` (a text model): data.max_len tokens.
    1 layer, h 8, f 32, batch 2, max_len 40: 40 * 2 * (64 + 64) * 4 bytes of activations."""
    from hetfl.methods.common import estimate_memory, tokens_per_sample

    model = torch.nn.Linear(3, 2)  # 8 parameters
    model.config = SimpleNamespace(hidden_size=8, num_hidden_layers=1, intermediate_size=32)
    cfg = load_config({"data": {"max_len": 40}, "train": {"batch_size": 2, "optimizer": "sgd", "momentum": 0.0}})
    assert tokens_per_sample(model, cfg) == 40
    assert estimate_memory(model, 0, cfg) == 4 * 8 + 40 * 2 * (8 * 8 + 2 * 32) * 4
