"""Bandwidth/power/bits/server allocation: brute-force agreement, constraints, lambda sweep, baselines."""

import itertools
import math

import numpy as np
import pytest

from hetfl.system.wireless import WirelessConfig
from hetfl.errors import ConfigError
from hetfl.system.allocate import admissible_bits, allocate, min_bandwidth, solve_bandwidth_power
from hetfl.system.devices import DeviceProfile
from hetfl.system.wireless import Channels, draw_channels, make_loads, noise_psd_w, round_cost, shannon_rate

DEV = DeviceProfile("t", flops_per_s=1e9, mem_mb=1024, up_mbps=1, down_mbps=1, tx_power_w=0.2, cpu_hz=1e9,
                    kappa=1e-28)


def two_devices(**cfg_over):
    """1 MHz band, p_max 0.2 W; full-band SNR at p_max of ~500 and ~150. Per batch: 0.1 s and 0.01 J of
    compute, 1e5 activations. Bound eps = 1: device 0 (range 1) needs >= 8 bits, device 1 (range 0.05) 4."""
    cfg = WirelessConfig(**{"bandwidth_hz": 1e6, "down_rate_bps": 1e8, "bits": (4, 8, 16), "epsilon": 1.0,
                            "server_flops_per_s": 1e12, **cfg_over})
    ch = Channels(distance_m=np.array([[100.0], [150.0]]), gain=np.array([[1e-11], [3e-12]]))
    loads = make_loads([DEV, DEV], batches=2, device_flops=1e8, server_flops=1e10, act_elems=1e5,
                       grad_bytes=4e5, model_bytes=1e4, up_extra_bytes=16, act_range=[1.0, 0.05])
    return cfg, ch, loads


def grid_objective(cfg, ch, loads, lam, b, p, q):
    # b, p: (G, K) grids; returns the objective per grid point (G,)
    c = round_cost(cfg, ch, loads, bandwidth=b, power=p, bits=np.asarray(q), server=np.zeros(b.shape[1], int))
    return lam * c.latency.max(1) + (1 - lam) * c.energy.sum(1)


def brute_force(cfg, ch, loads, lam):
    """Grid over (b1 share, p1, p2, q1, q2) with b2 = B - b1, then three zoomed grids around the best."""
    B, pm = cfg.bandwidth_hz, cfg.p_max_w
    best = (math.inf, None)
    for q in itertools.product(*admissible_bits(cfg, loads)):
        lo, hi = np.array([0.0, 0.0, 0.0]), np.array([1.0, pm, pm])
        centre = None
        for _ in range(4):
            axes = [np.linspace(max(l, 1e-6), h, 41) for l, h in zip(lo, hi)]
            f, p1, p2 = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
            b = np.stack([f * B, (1 - f) * B], 1)
            obj = grid_objective(cfg, ch, loads, lam, b, np.stack([p1, p2], 1), q)
            i = int(np.argmin(obj))
            centre = np.array([f[i], p1[i], p2[i]])
            width = (hi - lo) / 10
            lo, hi = np.maximum(centre - width, 0), np.minimum(centre + width, [1.0, pm, pm])
            if obj[i] < best[0]:
                best = (float(obj[i]), (centre, q))
    return best


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_allocation_matches_brute_force_grid(lam):
    cfg, ch, loads = two_devices()
    a = allocate(cfg, ch, loads, lam=lam)
    grid, (centre, q) = brute_force(cfg, ch, loads, lam)
    assert a.objective <= grid * (1 + 1e-9)  # a grid point cannot beat the optimum...
    assert a.objective >= grid * (1 - 1e-3)  # ...and the zoomed grid gets within 0.1% of it
    assert tuple(a.bits) == q == (8, 4)  # the fewest bits meeting the bound
    assert a.bandwidth_hz[0] / cfg.bandwidth_hz == pytest.approx(centre[0], abs=0.01)
    assert a.power_w == pytest.approx(centre[1:], abs=0.03 * cfg.p_max_w)  # the objective is flat in p near lam = 1


def test_constraints_hold_on_a_random_population():
    cfg = WirelessConfig(bits=(2, 4, 8, 16, 32), epsilon=5.0)
    ch = draw_channels(cfg, 6, seed=3)
    loads = make_loads([DEV] * 6, batches=[1, 2, 3, 1, 2, 3], device_flops=5e8, server_flops=1e11,
                       act_elems=[2e4, 4e4, 8e4, 2e4, 4e4, 8e4], grad_bytes=1e5, model_bytes=4e4,
                       act_range=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    a = allocate(cfg, ch, loads)
    assert a.bandwidth_hz.sum() <= cfg.bandwidth_hz * (1 + 1e-12) and (a.bandwidth_hz > 0).all()
    assert ((a.power_w >= 0) & (a.power_w <= cfg.p_max_w)).all()
    bound = loads.act_elems * loads.act_range**2 / (4 * (2.0**a.bits - 1) ** 2)
    assert (np.where(a.bits >= 32, 0, bound) <= cfg.epsilon).all()
    assert [int(q) for q in a.bits] == [adm[0] for adm in admissible_bits(cfg, loads)]
    # the optimum of block (i) leaves no idle device: every device ends exactly at T
    assert a.latency_s == pytest.approx(np.full(6, a.T), rel=1e-6)
    rows = a.rows(cids=[10, 11, 12, 13, 14, 15])
    assert rows[2]["client"] == 12 and rows[2]["bits"] == a.bits[2] and rows[2]["energy_j"] == a.energy_j[2]


def test_lambda_sweep_trades_latency_for_energy():
    cfg, ch, loads = two_devices()
    sweep = {lam: allocate(cfg, ch, loads, lam=lam) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert sweep[1.0].T == pytest.approx(min(a.T for a in sweep.values()), rel=1e-9)
    assert sweep[0.0].E == pytest.approx(min(a.E for a in sweep.values()), rel=1e-9)
    Ts = [sweep[lam].T for lam in sorted(sweep)]
    assert all(x >= y * (1 - 1e-9) for x, y in zip(Ts, Ts[1:]))  # latency falls as its weight grows
    # lam = 1: both devices at p_max finish together, splitting the band at the fastest possible point
    assert sweep[1.0].power_w == pytest.approx([0.2, 0.2], rel=1e-6)


def test_min_bandwidth_inverts_the_full_power_rate():
    a = np.array([5e6, 5e6, 5e6, 2e4])  # p_max h / N0
    rate = np.array([1e5, 2e6, 7.2e6, 1e3])  # the last is close to the infinite-band limit a / ln2 ~ 2.9e4
    b = min_bandwidth(rate, a)
    assert b * np.log2(1 + a / b) == pytest.approx(rate, rel=1e-9)
    assert min_bandwidth(np.array([0.0, 7.3e6]), np.array([5e6, 5e6])).tolist() == [0.0, math.inf]


def test_baselines_fix_their_block_and_never_beat_the_joint_optimum():
    cfg, ch, loads = two_devices()
    opt = allocate(cfg, ch, loads, lam=0.5)
    eq = allocate(cfg, ch, loads, lam=0.5, mode="equal-bandwidth")
    mp = allocate(cfg, ch, loads, lam=0.5, mode="max-power")
    fb = allocate(cfg, ch, loads, lam=0.5, mode="fixed-bits")
    assert eq.bandwidth_hz == pytest.approx([5e5, 5e5])
    assert mp.power_w.tolist() == [0.2, 0.2] and mp.bandwidth_hz.sum() == pytest.approx(1e6)
    assert fb.bits.tolist() == [8, 8]
    for base in (eq, mp, fb):
        assert opt.objective <= base.objective * (1 + 1e-9)
    # max power: the band split equalises nothing in particular, but no other split at p_max does better
    f = np.linspace(0.01, 0.99, 981)
    b = np.stack([f * 1e6, (1 - f) * 1e6], 1)
    grid = grid_objective(cfg, ch, loads, 0.5, b, np.full_like(b, 0.2), mp.bits).min()
    assert grid * (1 - 1e-3) <= mp.objective <= grid * (1 + 1e-9)


def test_bits_follow_the_error_bound():
    cfg, ch, loads = two_devices(epsilon=1e-3)  # device 0 now needs 16 bits, device 1 8 bits
    assert allocate(cfg, ch, loads).bits.tolist() == [16, 8]
    cfg, ch, loads = two_devices(epsilon=1e-12)
    with pytest.raises(ConfigError, match="wireless.epsilon: no bit-width"):
        allocate(cfg, ch, loads)
    cfg, ch, loads = two_devices(epsilon=None)
    assert allocate(cfg, ch, loads).bits.tolist() == [4, 4]


def three_devices_two_servers():
    # All three are nearest to server 0; server 1 is a little farther (half the gain) but has its own band.
    ch = Channels(distance_m=np.array([[100.0, 120.0]] * 3), gain=np.array([[1e-11, 5e-12]] * 3))
    loads = make_loads([DEV] * 3, batches=2, device_flops=1e8, server_flops=1e10, act_elems=1e5,
                       grad_bytes=4e5, model_bytes=1e4)
    return ch, loads


def test_two_servers_each_with_its_own_band():
    ch, loads = three_devices_two_servers()
    base = dict(bandwidth_hz=1e6, down_rate_bps=1e8, bits=(8,), num_servers=2, server_flops_per_s=1e12)
    near = allocate(WirelessConfig(**base, assignment="nearest"), ch, loads, lam=0.5)
    assert near.server.tolist() == [0, 0, 0] and near.bandwidth_hz.sum() == pytest.approx(1e6)
    cfg = WirelessConfig(**base, assignment="optimize")
    opt = allocate(cfg, ch, loads, lam=0.5)
    assert sorted(opt.server.tolist()) == [0, 0, 1]  # identical devices: two on the stronger server
    for s in (0, 1):
        assert opt.bandwidth_hz[opt.server == s].sum() == pytest.approx(1e6, rel=1e-9)  # each band in full
    assert opt.objective < near.objective
    # no assignment of the 2^3 does better (block (i) solved exactly for each)
    best = min(solve_bandwidth_power(cfg, ch, loads, opt.bits, np.array(s), lam=0.5)[2].objective(0.5)
               for s in itertools.product((0, 1), repeat=3))
    assert opt.objective == pytest.approx(best, rel=1e-9)


def test_round_cost_of_an_allocation_is_consistent():
    cfg, ch, loads = two_devices()
    a = allocate(cfg, ch, loads, lam=0.5)
    c = round_cost(cfg, ch, loads, bandwidth=a.bandwidth_hz, power=a.power_w, bits=a.bits, server=a.server)
    assert c.objective(0.5) == pytest.approx(a.objective) and c.T == pytest.approx(a.T)
    r = shannon_rate(a.bandwidth_hz, a.power_w, ch.gain[:, 0], noise_psd_w(cfg))
    assert a.cost.rate_up == pytest.approx(r)
