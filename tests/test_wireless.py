"""Wireless system model: channels, Shannon rates, and a round's latency/energy against hand numbers."""

import math

import numpy as np
import pytest

from hetfl.config import load_config
from hetfl.errors import ConfigError
from hetfl.system.devices import DeviceProfile
from hetfl.system.wireless import (Channels, WirelessConfig, draw_channels, make_loads, noise_psd_w, path_loss_db,
                                   round_cost, shannon_rate)


def dev(flops_per_s, cpu_hz, kappa):
    return DeviceProfile("t", flops_per_s=flops_per_s, mem_mb=1024, up_mbps=1, down_mbps=1, tx_power_w=0.2,
                         cpu_hz=cpu_hz, kappa=kappa)


# ----------------------------------------------------------------------------- channel


def test_path_loss_and_noise_constants():
    cfg = WirelessConfig()
    # 3GPP TR 36.814 macro: 128.1 dB at 1 km, +37.6 dB per decade
    assert path_loss_db(np.array([1000.0, 100.0]), cfg) == pytest.approx([128.1, 128.1 - 37.6])
    assert noise_psd_w(cfg) == pytest.approx(3.981e-21, rel=1e-3)  # -174 dBm/Hz
    assert noise_psd_w(WirelessConfig(noise_dbm_hz=-170.0, noise_figure_db=5.0)) == pytest.approx(10**-19.5)


def test_draw_channels_is_seeded_and_follows_the_path_loss():
    cfg = WirelessConfig(shadowing_db=0.0, distance_m=(1000.0, 1000.0))
    ch = draw_channels(cfg, 3, 2, seed=0)
    assert ch.gain.shape == (3, 2) and np.allclose(ch.gain, 10**-12.81)
    cfg = WirelessConfig()
    a, b = draw_channels(cfg, 400, 2, seed=1), draw_channels(cfg, 400, 2, seed=1)
    assert np.array_equal(a.gain, b.gain)
    assert ((a.distance_m >= 35.0) & (a.distance_m <= 250.0)).all()
    shadow = -10 * np.log10(a.gain) - path_loss_db(a.distance_m, cfg)
    assert shadow.std() == pytest.approx(8.0, rel=0.1) and abs(shadow.mean()) < 1.0
    later = draw_channels(cfg, 400, 2, seed=1, rnd=5)  # a new round's shadowing, same positions
    assert np.array_equal(later.distance_m, a.distance_m) and not np.array_equal(later.gain, a.gain)
    assert not np.array_equal(draw_channels(cfg, 400, 2, seed=2).distance_m, a.distance_m)
    sub = a.subset([3, 0])
    assert np.array_equal(sub.gain, a.gain[[3, 0]]) and sub.num_servers == 2


def test_shannon_rate():
    # SNR = 0.1 * 3e-13 / (1e-20 * 1e6) = 3  ->  1 MHz * log2(4) = 2 Mbit/s
    assert shannon_rate(1e6, 0.1, 3e-13, 1e-20) == pytest.approx(2e6)
    assert shannon_rate(np.array([0.0, 2e6]), 0.2, 1.5e-12, 1e-20) == pytest.approx([0.0, 8e6])


# ----------------------------------------------------------------------------- a round by hand


def hand_setup(**cfg_over):
    # N0 = 1e-20 W/Hz; one server with 1e13 FLOP/s shared by both devices; 10 Mbit/s downlink.
    cfg = WirelessConfig(**{"noise_dbm_hz": -170.0, "server_flops_per_s": 1e13, "down_rate_bps": 1e7, **cfg_over})
    ch = Channels(distance_m=np.array([[100.0], [200.0]]), gain=np.array([[3e-13], [1.5e-12]]))
    loads = make_loads([dev(1e9, 1e9, 1e-28), dev(2e9, 2e9, 1e-27)], batches=[2, 3], device_flops=[1e9, 2e9],
                       server_flops=1e12, act_elems=[1000, 2000], up_extra_bytes=[0, 17], grad_bytes=[4000, 8000],
                       model_bytes=[1e5, 2e5])
    return cfg, ch, loads


def test_round_latency_and_energy_match_hand_computation():
    cfg, ch, loads = hand_setup()
    c = round_cost(cfg, ch, loads, bandwidth=[1e6, 2e6], power=[0.1, 0.2], bits=[8, 4], server=[0, 0])
    assert c.rate_up == pytest.approx([2e6, 8e6])  # SNR 3 and 15
    assert c.t_cmp == pytest.approx([1.0, 1.0])  # 1e9 / 1e9, 2e9 / 2e9
    # up per batch: 8*ceil(1000*8/8) + 64 = 8064 bits; 8*ceil(2000*4/8) + 64 + 8*17 = 8200 bits
    assert c.t_up == pytest.approx([8064 / 2e6, 8200 / 8e6])  # 0.004032, 0.001025 s
    assert c.t_server == pytest.approx([0.2, 0.2])  # 2 devices * 1e12 / 1e13
    assert c.t_down == pytest.approx([0.0032, 0.0064])  # 32000 and 64000 bits at 1e7
    assert c.t_model_up == pytest.approx([0.4, 0.2]) and c.t_model_down == pytest.approx([0.08, 0.16])
    # L1 = 2 (1 + 0.004032 + 0.2 + 0.0032) + 0.4 + 0.08;  L2 = 3 (1 + 0.001025 + 0.2 + 0.0064) + 0.2 + 0.16
    assert c.latency == pytest.approx([2.894464, 3.982275])
    assert c.T == pytest.approx(3.982275)
    # compute: kappa f^3 t_cmp per batch = 0.1 J and 8 J; uplink: p (I t_up + t_model_up)
    assert c.e_cmp == pytest.approx([0.2, 24.0])
    assert c.e_up == pytest.approx([0.1 * 0.408064, 0.2 * 0.203075])
    assert c.energy == pytest.approx([0.2408064, 24.040615])
    assert c.E == pytest.approx(24.2814214)
    assert c.objective(0.5) == pytest.approx(0.5 * 3.982275 + 0.5 * 24.2814214)


def test_32_bits_sends_plain_fp32_and_shannon_downlink():
    cfg, ch, loads = hand_setup(down_rate_bps=0.0, down_bandwidth_hz=2e6, server_power_w=1.0)
    c = round_cost(cfg, ch, loads, bandwidth=[1e6, 2e6], power=[0.1, 0.2], bits=[32, 32], server=[0, 0])
    assert c.t_up == pytest.approx([32000 / 2e6, (64000 + 136) / 8e6])  # no range headers at 32 bits
    # 1 MHz each; SNR = 1 W * h / (1e-20 * 1e6) = 30 and 150
    assert c.rate_down == pytest.approx([1e6 * math.log2(31), 1e6 * math.log2(151)])


def test_wireless_config_section_is_checked():
    cfg = load_config({"wireless": {"num_servers": 2, "bits": [4, 8], "epsilon": 0.5, "mode": "max-power"}})
    assert cfg.wireless.num_servers == 2 and cfg.wireless.bits == (4, 8) and cfg.wireless.epsilon == 0.5
    for raw, msg in [({"lam": 1.5}, "wireless.lam: must be in [0, 1]"),
                     ({"bits": [4, 20]}, "wireless.bits: must be"),
                     ({"distance_m": [300, 100]}, "wireless.distance_m: must be [min, max]"),
                     ({"mode": "greedy"}, "wireless.mode: 'greedy' is not one of"),
                     ({"bandwidth_hz": 0}, "wireless.bandwidth_hz: must be > 0"),
                     ({"epsilon": -1}, "wireless.epsilon: must be > 0")]:
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            load_config({"wireless": raw})
