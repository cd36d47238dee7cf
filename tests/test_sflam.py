"""SFLAM and vanilla split learning against hand computations: edge servers only see their own
devices and are averaged across servers, server-side LoRA leaves the base frozen, per-device
bit-widths set the activation bytes on the ledger, and vanilla SL relays the client part."""

import math

import pytest
import torch
from test_split import B, split_cfg
from test_split import one_round as split_one_round

from hetfl.config import load_config
from hetfl.engine.link import UP
from hetfl.runner import build_method
from hetfl.scenario import build_scenario

torch.set_num_threads(1)


def sflam_cfg(method=None, clients=4, model="mlp", **extra):
    from hetfl.config import to_dict

    cfg = split_cfg(model, {"name": "sflam", "server_tune": "full", **(method or {})})
    over = [f"population.num_clients={clients}", f"population.clients_per_round={clients}"]
    return load_config(to_dict(cfg), over + [f"{k}={v}" for k, v in extra.items()])


def one_round(cfg):
    """Round 1 on every client; (ledger, method, global before the round, state, replies, ctxs)."""
    init = {n: t.clone() for n, t in build_method(cfg).setup(build_scenario(cfg)).get("global", {}).items()}
    ledger, method, state, replies, ctxs, _ = split_one_round(cfg)
    return ledger, method, init, state, replies, ctxs


def test_two_edge_servers_serve_their_own_devices_and_are_averaged_across_servers():
    ledger, m, init, state, replies, ctxs = one_round(sflam_cfg(clients=4, **{"wireless.num_servers": 2}))
    assert m.served == {0: [0, 2], 1: [1, 3]}  # device k -> server k mod 2, nobody else's traffic
    w = {c: replies[c].meta["num_examples"] for c in replies}
    for n in m.trained_names(0):  # server parts: per-server data-weighted means, then across servers
        srv = [(sum(m.copies.trained[c][n] * w[c] for c in cs) / sum(w[c] for c in cs), sum(w[c] for c in cs))
               for cs in ([0, 2], [1, 3])]
        expected = sum(a * d for a, d in srv) / sum(d for _, d in srv)
        assert torch.allclose(state["global"][n], expected, atol=1e-6), n
    for n in m.split.client_names(0):  # device parts: FedAvg of the uploads
        expected = sum((init[n] + replies[c].tensors[n]) * w[c] for c in replies) / sum(w.values())
        assert torch.allclose(state["global"][n], expected, atol=1e-6), n
    assert m.report(state, 1, []).stats["servers_used"] == 2


def test_server_side_lora_trains_adapters_and_tail_only():
    cfg = sflam_cfg({"server_tune": "lora"}, **{"lora.targets": "[fc]", "lora.rank": 2})
    _, m, init, state, _, _ = one_round(cfg)
    trained = set(m.trained_names(0))
    assert trained and all("lora_" in n or n in m.split.layout.tail for n in trained)
    for n, t in state["global"].items():
        moved = not torch.equal(t, init[n])
        if n in trained or n in m.split.client_names(0):
            assert moved, n  # adapters, tail and the device's embedding all train
        else:
            assert not moved, n  # the server's base weights stay bit-identical


def test_per_device_bits_set_the_activation_bytes_on_the_ledger():
    cfg = sflam_cfg({"bits": 4}, clients=2)
    ledger, m, *_ = one_round(cfg)
    e = m.split.cut_elems[0]  # activation elements per sample at the cut
    steps = cfg.train.local_steps
    per_step = math.ceil(B * e * 4 / 8) + 8 + B * 8  # q-bit payload + min/max header + int64 labels
    for cid in (0, 1):
        assert ledger.bytes(cid=cid, direction=UP, kind="activations") == steps * per_step
    full, *_ = one_round(sflam_cfg({"bits": 32}, clients=2))
    assert full.bytes(cid=0, direction=UP, kind="activations") == steps * (B * e * 4 + B * 8)


def test_bad_bits_name_the_key():
    from hetfl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method\.bits"):
        sflam_cfg({"bits": 20})


def test_vanilla_sl_relays_the_client_part_from_client_to_client():
    cfg = split_cfg("mlp", {"name": "sl-vanilla"})
    ledger, m, init, state, replies, ctxs = one_round(cfg)
    first, second = m.order
    head = m.split.client_names(0)
    assert all(not r.tensors for r in replies.values())  # nothing averaged: the part is handed on
    # the global client part is what the last client handed off, and differs from the start
    assert all(torch.equal(state["global"][n], m.relay[n]) for n in head)
    assert any(not torch.equal(state["global"][n], init[n]) for n in head)
    size = sum(init[n].numel() * 4 for n in head)
    assert ledger.bytes(cid=first, kind="model") == size and ledger.bytes(cid=second, kind="handoff") == size


def test_wireless_cost_of_a_client_by_hand():
    """Channel gain chosen so that p h / (N0 b) = 1: the uplink rate is exactly b bit/s."""
    import numpy as np

    from hetfl.system.wireless import WirelessConfig
    from hetfl.system.cost import WirelessCost
    from hetfl.system.devices import DeviceProfile
    from hetfl.system.wireless import Channels, noise_psd_w

    w = WirelessConfig(enabled=True, num_servers=1, down_rate_bps=1e6, server_flops_per_s=1e9)
    b, p = 1e6, 0.1
    wc = WirelessCost(w, Channels(np.array([[100.0]]), np.array([[noise_psd_w(w) * b / p]])))
    dev = DeviceProfile(name="d", flops_per_s=1e9, mem_mb=1024, up_mbps=1, down_mbps=1, tx_power_w=0.2,
                        cpu_hz=1e9, kappa=1e-28)
    c = wc.costs([0], {0: dev}, {0: 2e9}, {0: 500_000}, {0: 250_000}, {0: 3e9}, {0: (b, p, 0)})[0]
    assert c.t_comp == pytest.approx(2.0)  # 2e9 FLOPs at 1e9 FLOP/s
    assert c.t_up == pytest.approx(4.0)  # 4e6 bits at 1e6 bit/s
    assert c.t_down == pytest.approx(2.0)  # 2e6 bits at the fixed 1e6 bit/s
    assert c.t_server == pytest.approx(3.0)  # 3e9 server FLOPs, the server's 1e9 FLOP/s for one client
    assert c.energy_j == pytest.approx(1e-28 * 1e18 * 2e9 + 0.1 * 4.0)  # kappa f^2 cycles + p t_up
    assert c.time_s == pytest.approx(11.0)


def test_sflam_run_with_the_wireless_model_writes_the_allocation_and_the_tradeoff(tmp_path):
    import csv

    from hetfl.engine.loop import run_rounds
    from hetfl.track.report import write_report
    from hetfl.track.rundir import RunDir

    cfg = sflam_cfg({"bits": 8}, clients=4, **{"wireless.enabled": "true", "wireless.num_servers": 2,
                                               "wireless.allocate_every": "round", "wireless.epsilon": 1e3})
    rd = RunDir(tmp_path / "run")
    run_rounds(build_scenario(cfg), build_method(cfg), rd)
    rows = list(csv.DictReader(open(tmp_path / "run" / "clients.csv")))
    assert {r["server"] for r in rows} <= {"0", "1"} and all(float(r["bandwidth_hz"]) > 0 for r in rows)
    for s in ("0", "1"):  # each server's band is shared, never exceeded
        assert sum(float(r["bandwidth_hz"]) for r in rows if r["server"] == s) <= cfg.wireless.bandwidth_hz * (1 + 1e-9)
    assert all(0 < float(r["power_w"]) <= cfg.wireless.p_max_w * (1 + 1e-9) for r in rows)
    curve = [line.split(",") for line in (tmp_path / "run" / "tradeoff.csv").read_text().splitlines()[1:]]
    t = [float(x[1]) for x in curve]
    e = [float(x[2]) for x in curve]
    assert t[-1] <= min(t) * (1 + 1e-6) and e[0] <= min(e) * (1 + 1e-6)  # lambda=1: fastest, lambda=0: leanest
    assert "tradeoff.png" in write_report(tmp_path / "run").read_text()


def test_allocation_enumerates_cut_layers_and_the_clients_use_the_chosen_one():
    """wireless.cuts: the allocation is solved per candidate cut and the lowest objective wins;
    the cut travels down with the model and sets what crosses the link."""
    from hetfl.system.allocate import allocate

    cfg = sflam_cfg({"bits": 8}, clients=2, model="tiny-vit-random",
                    **{"wireless.enabled": "true", "wireless.allocate_every": "round", "wireless.cuts": "[0, 1]",
                       "wireless.lam": 1.0, "wireless.server_flops_per_s": 1e6})  # a slow server: keep a block home
    ledger, m, _, _, replies, ctxs = one_round(cfg)
    objective = {}
    for cut in (0, 1):
        objective[cut] = allocate(cfg.wireless, m.channels.subset([0, 1]), m.loads([0, 1], cut), seed=cfg.seed).objective
    chosen = min(objective, key=objective.get)
    assert chosen == 1
    assert m.last_allocation.objective == pytest.approx(objective[chosen])
    assert all(ctx.knobs["cut"] == chosen for ctx in ctxs.values())
    assert set(replies[0].tensors) == set(m.split.layout.head(chosen))  # the device trained and sent that part
    steps, e = cfg.train.local_steps, m.split.cut_elems[chosen]
    bits = m.bits[0]
    per_step = (math.ceil(B * e * bits / 8) + 8 if bits < 32 else B * e * 4) + B * 8
    assert ledger.bytes(cid=0, direction=UP, kind="activations") == steps * per_step


def test_fixed_mode_gives_equal_bands_full_power_and_fixed_bits():
    cfg = sflam_cfg({}, clients=4, **{"wireless.enabled": "true", "wireless.allocate_every": "round",
                                      "wireless.mode": "fixed", "wireless.fixed_bits": 4, "wireless.num_servers": 2})
    _, m, *_ = one_round(cfg)
    radio = m.report({}, 1, [0, 1, 2, 3]).radio
    for c, (band, power, server) in radio.items():
        peers = sum(1 for s in m.server_of.values() if s == server)
        assert band == pytest.approx(cfg.wireless.bandwidth_hz / peers) and power == cfg.wireless.p_max_w
        assert server == m.server_of[c] and m.bits[c] == 4


def test_payload_with_moving_cuts_counts_the_cut_in_the_model_message():
    """wireless.cuts with 32-bit activations only: the allocation moves the cohort's cut, which
    travels in the model message's metadata; the payload counts it (and the reply's loss at
    TYPICAL_LOSS's JSON length: no shape gives it)."""
    import json

    from hetfl.engine.link import DOWN
    from hetfl.methods.common import TYPICAL_LOSS

    cfg = sflam_cfg({"bits": 32}, clients=2, model="tiny-vit-random",
                    **{"wireless.enabled": "true", "wireless.allocate_every": "round", "wireless.cuts": "[0, 1]",
                       "wireless.bits": "[32]", "wireless.lam": 1.0, "wireless.server_flops_per_s": 1e6})
    ledger, m, _, state, replies, ctxs = one_round(cfg)
    assert m.cuts.of(0) == 1 and m.cuts.meta(0) == {"cut": 1}
    for cid, reply in replies.items():
        loss_chars = len(json.dumps(reply.meta["train_loss"])) - len(json.dumps(TYPICAL_LOSS))
        measured = (ledger.bytes(cid=cid, direction=DOWN), ledger.bytes(cid=cid, direction=UP) - loss_chars)
        assert m.payload(state, 1, cid, reply.meta["num_examples"]) == measured


def test_a_candidate_cut_the_model_cannot_take_names_wireless_cuts():
    from hetfl.errors import ConfigError

    cfg = sflam_cfg({}, clients=2, **{"wireless.enabled": "true", "wireless.cuts": "[0, 1]"})  # mlp: one block
    with pytest.raises(ConfigError, match=r"wireless\.cuts: cut 1 is outside 0\.\.0"):
        one_round(cfg)


def test_the_channel_is_drawn_once_in_the_scenario_and_shared():
    """The scenario draws the wireless channel once; SFLAM's allocation and the loop's cost model
    use that one draw (the same gains as `draw_channels` from the run's seed)."""
    import numpy as np

    from hetfl.system.wireless import draw_channels

    cfg = sflam_cfg(clients=4, **{"wireless.enabled": "true"})
    sc = build_scenario(cfg)
    m = build_method(cfg)
    m.setup(sc)
    assert m.channels is sc.channels
    again = draw_channels(cfg.wireless, 4, seed=cfg.seed)
    assert np.array_equal(sc.channels.gain, again.gain)
    off = build_scenario(sflam_cfg(clients=4))
    assert off.channels is None
