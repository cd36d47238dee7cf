"""Wireless edge model for split federated learning: channels, rates, round latency and energy.

Pure functions over frozen dataclasses of numpy arrays, one entry per device (K devices,
M edge servers). The model is the generic one of spec/sflam.md section 4 [G]; the constants
live in `WirelessConfig` below (the config's `wireless:` section), each with its source.

Channel (3GPP TR 36.814 v9.0.0 Annex A.2.1.1.2, macro cell at 2 GHz):
    PL(d) = 128.1 + 37.6 log10(d / 1 km) dB, plus N(0, 8 dB) log-normal shadowing,
    h = 10^(-(PL + shadowing) / 10)                                  (linear power gain)
    N0 = -174 dBm/Hz (thermal noise k*290 K) + receiver noise figure
Uplink (FDMA/OFDMA, Shannon):  r_k = b_k log2(1 + p_k h_k / (N0 b_k)).
Per batch of device k (I_k batches per round), served by server s(k) with n_s devices:
    t_cmp  = device FLOPs / device FLOP/s;      e_cmp = kappa f^2 (t_cmp f)   (system/cost.py's model)
    t_up   = (bits(q_k) + 8 * extra bytes) / r_k,    bits(q) = 8 ceil(d q / 8) + 64 * groups (q < 32)
    t_srv  = n_s * server FLOPs / F_s   (the server's FLOP/s is shared equally by its devices: the
                                          parallel per-client server copies of SplitFed V1 run
                                          side by side, so each gets 1/n_s of the processor)
    t_down = 8 * gradient bytes / r_down
Per round (the device model goes up and the new one comes down once):
    L_k = I_k (t_cmp + t_up + t_srv + t_down) + 8 * model bytes / r_k + 8 * model bytes / r_down
    E_k = I_k e_cmp + p_k (I_k t_up + 8 * model bytes / r_k)
    T   = max_k L_k  (synchronous round: the server aggregates when the last device is done)
Downlink: a fixed rate per device, or the Shannon rate over an equal share of the server's
downlink band at the server's power, on the same (reciprocal) channel gain. Receiving costs the
device no energy, as in system/cost.py. Aggregation compute on the server is neglected.
Each server has its own uplink band of `bandwidth_hz` (no interference between servers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hetfl.seeding import derive_seed
from hetfl.system.devices import DeviceProfile


@dataclass(frozen=True)
class WirelessConfig:
    """The config's `wireless:` section: the edge system of this module's cost model and of
    system/allocate.py (split learning).

    Sources: [TR36.814] 3GPP TR 36.814 v9.0.0 Annex A.2.1 (evaluation assumptions: macro-cell
    path loss 128.1 + 37.6 log10(R km) at 2 GHz, 8 dB log-normal shadowing, 35 m minimum
    distance, 500 m inter-site distance, 46 dBm BS power per 10 MHz, UE noise figure 9 dB, BS
    5 dB); [TS36.101] 3GPP TS 36.101 UE power class 3 (23 dBm); [kT] thermal noise density
    k*290 K = 4.0e-21 W/Hz = -174 dBm/Hz; [Est] order-of-magnitude choice.
    """

    enabled: bool = False  # cost every method's rounds with this model (Shannon rates) instead of fixed link rates
    bandwidth_hz: float = 10e6  # uplink band of EACH edge server, shared by its devices; LTE carrier [TS36.101]
    down_bandwidth_hz: float = 10e6  # downlink band of each server, split equally among its devices
    down_rate_bps: float = 0.0  # > 0: a fixed downlink rate per device instead of the Shannon rate
    server_power_w: float = 40.0  # server (base station) transmit power: 46 dBm per 10 MHz [TR36.814]
    noise_dbm_hz: float = -174.0  # noise power spectral density N0 [kT]
    noise_figure_db: float = 0.0  # receiver noise figure added to N0 (5 dB at a BS [TR36.814]; 0 as in most FL papers)
    p_max_w: float = 0.2  # device transmit power limit, 23 dBm [TS36.101]
    path_loss_db_1km: float = 128.1  # path loss at 1 km, dB [TR36.814]
    path_loss_slope_db: float = 37.6  # dB per decade of distance [TR36.814]
    shadowing_db: float = 8.0  # std of log-normal shadowing, dB [TR36.814]
    # device-server distance range, uniform: [TR36.814] 35 m minimum, half the 500 m inter-site distance
    distance_m: tuple[float, ...] = (35.0, 250.0)
    num_servers: int = 1  # edge servers M, each with its own band and compute
    assignment: Literal["nearest", "random", "optimize"] = "nearest"  # device -> server
    server_flops_per_s: float = 1e13  # per server, shared equally by its devices [Est] ~half an A100's fp32 peak
    lam: float = 0.5  # objective lam*T + (1 - lam)*sum_k E_k (seconds and joules)
    bits: tuple[int, ...] = (2, 4, 8, 16, 32)  # candidate activation bit-widths (32 = lossless fp32)
    epsilon: float | None = None  # bound on d (M-m)^2 / (4 (2^q-1)^2) per device and batch; None: no bound
    mode: Literal["optimize", "equal-bandwidth", "max-power", "fixed-bits", "fixed"] = "optimize"
    fixed_bits: int = 8  # bit-width for every device in modes fixed-bits and fixed (fixed: equal bands, full power too)
    allocate_every: Literal["once", "round"] = "once"  # solve once, or for every round's cohort
    cuts: tuple[int, ...] = ()  # sflam: candidate cut layers, enumerated per allocation (); (): the method's cut
    max_latency_factor: float = 10.0  # the optimiser considers round latencies up to this x the fastest feasible
    max_iters: int = 20  # block-coordinate-descent iterations
    tol: float = 1e-6  # stop when the objective improves by less than this fraction

    def check(self) -> Iterator[tuple[str, str]]:
        if any(c < 0 for c in self.cuts):
            yield "cuts", "cut layers must be >= 0"
        for key in ("bandwidth_hz", "down_bandwidth_hz", "server_power_w", "p_max_w", "server_flops_per_s", "tol"):
            if not getattr(self, key) > 0:
                yield key, "must be > 0"
        if self.down_rate_bps < 0:
            yield "down_rate_bps", "must be >= 0"
        if self.shadowing_db < 0:
            yield "shadowing_db", "must be >= 0"
        if len(self.distance_m) != 2 or not 0 < self.distance_m[0] <= self.distance_m[1]:
            yield "distance_m", "must be [min, max] with 0 < min <= max"
        if self.num_servers < 1:
            yield "num_servers", "must be >= 1"
        if not 0.0 <= self.lam <= 1.0:
            yield "lam", "must be in [0, 1]"
        valid_bits = set(range(1, 17)) | {32}
        if not self.bits or any(b not in valid_bits for b in self.bits):
            yield "bits", "must be a non-empty list of bit-widths in 1..16 or 32"
        if self.fixed_bits not in valid_bits:
            yield "fixed_bits", "must be in 1..16 or 32"
        if self.epsilon is not None and not self.epsilon > 0:
            yield "epsilon", "must be > 0 (or null for no bound)"
        if self.max_latency_factor < 1:
            yield "max_latency_factor", "must be >= 1"
        if self.max_iters < 1:
            yield "max_iters", "must be >= 1"


def _frozen(a, dtype=float) -> np.ndarray:
    out = np.array(a, dtype=dtype)
    out.setflags(write=False)
    return out


# ----------------------------------------------------------------------------- channels


def path_loss_db(distance_m: np.ndarray, cfg: WirelessConfig) -> np.ndarray:
    """Mean path loss in dB, `path_loss_db_1km + path_loss_slope_db * log10(d / 1 km)` (TR 36.814)."""
    return cfg.path_loss_db_1km + cfg.path_loss_slope_db * np.log10(np.asarray(distance_m, dtype=float) / 1000.0)


def noise_psd_w(cfg: WirelessConfig) -> float:
    """Noise power spectral density N0 in W/Hz, including the receiver noise figure."""
    return 10.0 ** ((cfg.noise_dbm_hz + cfg.noise_figure_db - 30.0) / 10.0)


@dataclass(frozen=True, eq=False)
class Channels:
    """Large-scale channel between K devices and M servers.

    Attributes:
        distance_m: (K, M) device-server distances.
        gain: (K, M) linear power gains h (path loss and shadowing, no small-scale fading).
    """

    distance_m: np.ndarray
    gain: np.ndarray

    @property
    def num_devices(self) -> int:
        return self.gain.shape[0]

    @property
    def num_servers(self) -> int:
        return self.gain.shape[1]

    def subset(self, idx: Sequence[int]) -> Channels:
        """The channels of devices `idx` (e.g. one round's cohort), in that order."""
        idx = np.asarray(idx, dtype=int)
        return Channels(_frozen(self.distance_m[idx]), _frozen(self.gain[idx]))


def draw_channels(cfg: WirelessConfig, num_devices: int, num_servers: int | None = None, seed: int = 0,
                  rnd: int = 0) -> Channels:
    """Draw device-server distances and gains.

    Distances are i.i.d. uniform in `cfg.distance_m` per (device, server) pair: an abstract
    multi-server layout, not a geometry. Shadowing is i.i.d. N(0, shadowing_db) per pair. Both
    are seeded by `derive_seed(seed, "wireless", ...)`; the distances do not depend on `rnd`, the
    shadowing does, so `rnd > 0` redraws shadowing for a round while devices stay put.

    Args:
        cfg: the wireless section.
        num_devices: K.
        num_servers: M; None uses `cfg.num_servers`.
        seed: root seed of the run.
        rnd: round whose shadowing to draw (0: the static draw).

    Returns:
        Channels with (K, M) arrays.
    """
    m = cfg.num_servers if num_servers is None else num_servers
    lo, hi = cfg.distance_m
    dist = np.random.default_rng(derive_seed(seed, "wireless", "distance")).uniform(lo, hi, size=(num_devices, m))
    shadow = np.random.default_rng(derive_seed(seed, "wireless", "shadowing", rnd)).normal(
        0.0, cfg.shadowing_db, size=(num_devices, m))
    gain = 10.0 ** (-(path_loss_db(dist, cfg) + shadow) / 10.0)
    return Channels(_frozen(dist), _frozen(gain))


def shannon_rate(bandwidth_hz, power_w, gain, n0: float) -> np.ndarray:
    """Shannon rate b log2(1 + p h / (N0 b)) in bit/s, elementwise; 0 where b = 0."""
    b, p, h = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (bandwidth_hz, power_w, gain)))
    snr = np.divide(p * h, n0 * b, out=np.zeros(b.shape), where=b > 0)
    return b * np.log2(1.0 + snr)


# ----------------------------------------------------------------------------- loads


@dataclass(frozen=True, eq=False)
class Loads:
    """Per-device work of one round, all (K,) arrays.

    Attributes:
        batches: I_k, batches (local steps) per round.
        device_flops: device FLOPs per batch (forward + backward of the device part).
        server_flops: server FLOPs per batch for this device's activations.
        act_elems: d_k, activation elements quantized and uploaded per batch.
        act_groups: quantization groups per batch (8 header bytes each; 1 = per-tensor range).
        up_extra_bytes: unquantized uplink bytes per batch (labels, lengths, metadata).
        grad_bytes: downlink bytes per batch (the gradient at the cut, as its codec sends it).
        model_bytes: device-model bytes uploaded, and downloaded, once per round.
        act_range: M - m of the activations, for the quantization-error bound.
        flops_per_s, cpu_hz, kappa: the device profile (system/devices.yaml).
    """

    batches: np.ndarray
    device_flops: np.ndarray
    server_flops: np.ndarray
    act_elems: np.ndarray
    act_groups: np.ndarray
    up_extra_bytes: np.ndarray
    grad_bytes: np.ndarray
    model_bytes: np.ndarray
    act_range: np.ndarray
    flops_per_s: np.ndarray
    cpu_hz: np.ndarray
    kappa: np.ndarray

    def __len__(self) -> int:
        return len(self.batches)

    def subset(self, idx: Sequence[int]) -> Loads:
        idx = np.asarray(idx, dtype=int)
        return Loads(**{f: _frozen(getattr(self, f)[idx]) for f in self.__dataclass_fields__})


def make_loads(devices: Sequence[DeviceProfile], *, batches, device_flops, server_flops, act_elems, grad_bytes,
               model_bytes, up_extra_bytes=0.0, act_groups=1, act_range=1.0) -> Loads:
    """Build `Loads` for `devices`; every other argument is a scalar or one value per device.

    Args:
        devices: the K device profiles (compute speed, clock and kappa).
        batches, device_flops, server_flops, act_elems, grad_bytes, model_bytes, up_extra_bytes,
            act_groups, act_range: see `Loads`.

    Raises:
        ValueError: if an array's length is not K or a value is negative.
    """
    k = len(devices)
    given = dict(batches=batches, device_flops=device_flops, server_flops=server_flops, act_elems=act_elems,
                 act_groups=act_groups, up_extra_bytes=up_extra_bytes, grad_bytes=grad_bytes,
                 model_bytes=model_bytes, act_range=act_range)
    arrays = {}
    for name, v in given.items():
        a = np.broadcast_to(np.asarray(v, dtype=float), (k,))
        if (a < 0).any():
            raise ValueError(f"{name} must be >= 0, got {v!r}")
        arrays[name] = _frozen(a)
    for name in ("flops_per_s", "cpu_hz", "kappa"):
        arrays[name] = _frozen([getattr(d, name) for d in devices])
    return Loads(**arrays)


def batch_upload_bits(loads: Loads, bits: np.ndarray) -> np.ndarray:
    """Uplink bits per batch: quantized activations (as codecs.quant_nbytes counts them) + extras."""
    q = np.asarray(bits, dtype=float)
    packed = 8.0 * np.ceil(loads.act_elems * q / 8.0) + 64.0 * loads.act_groups * (loads.act_elems > 0)
    act = np.where(q >= 32, 32.0 * loads.act_elems, packed)  # 32 bits: plain fp32, no range headers
    return act + 8.0 * loads.up_extra_bytes


def round_upload_bits(loads: Loads, bits: np.ndarray) -> np.ndarray:
    """U_k: all uplink bits of a round, I_k batches plus the device model."""
    return loads.batches * batch_upload_bits(loads, bits) + 8.0 * loads.model_bytes


def server_counts(server: np.ndarray, num_servers: int) -> np.ndarray:
    """n_s(k): how many devices share device k's server."""
    server = np.asarray(server, dtype=int)
    return np.bincount(server, minlength=num_servers)[server]


def down_rate(cfg: WirelessConfig, channels: Channels, server: np.ndarray) -> np.ndarray:
    """Downlink rate per device: `down_rate_bps`, or Shannon over an equal share of the server's band."""
    server = np.asarray(server, dtype=int)
    if cfg.down_rate_bps > 0:
        return np.full(len(server), cfg.down_rate_bps)
    share = cfg.down_bandwidth_hz / server_counts(server, channels.num_servers)
    return shannon_rate(share, cfg.server_power_w, channels.gain[np.arange(len(server)), server], noise_psd_w(cfg))


def fixed_latency(cfg: WirelessConfig, channels: Channels, loads: Loads, server: np.ndarray) -> np.ndarray:
    """A_k: the part of L_k that uplink bandwidth and power do not change (compute, server, downlink)."""
    t_cmp = loads.device_flops / loads.flops_per_s
    t_srv = server_counts(server, channels.num_servers) * loads.server_flops / cfg.server_flops_per_s
    r_dn = down_rate(cfg, channels, server)
    return loads.batches * (t_cmp + t_srv + 8.0 * loads.grad_bytes / r_dn) + 8.0 * loads.model_bytes / r_dn


def compute_energy(loads: Loads) -> np.ndarray:
    """I_k e_cmp: computing energy of a round, kappa f^2 per cycle with cycles = t_cmp f."""
    return loads.batches * loads.kappa * loads.cpu_hz**3 * loads.device_flops / loads.flops_per_s


# ----------------------------------------------------------------------------- a round's cost


@dataclass(frozen=True, eq=False)
class RoundCost:
    """Latency and energy of one round under an allocation; per-device (K,) arrays.

    Per batch: t_cmp, t_up, t_server, t_down (s). Per round: t_model_up, t_model_down (s),
    latency L_k (s), e_cmp and e_up (J, whole round), energy E_k (J). Totals: T = max L_k and
    E = sum E_k.
    """

    t_cmp: np.ndarray
    t_up: np.ndarray
    t_server: np.ndarray
    t_down: np.ndarray
    t_model_up: np.ndarray
    t_model_down: np.ndarray
    rate_up: np.ndarray
    rate_down: np.ndarray
    latency: np.ndarray
    e_cmp: np.ndarray
    e_up: np.ndarray
    energy: np.ndarray

    @property
    def T(self) -> float:
        return float(self.latency.max()) if len(self.latency) else 0.0

    @property
    def E(self) -> float:
        return float(self.energy.sum())

    def objective(self, lam: float) -> float:
        """lam * T + (1 - lam) * sum_k E_k."""
        return lam * self.T + (1.0 - lam) * self.E


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # Nothing to send takes no time even at rate 0; something to send at rate 0 takes forever.
    num, den = np.broadcast_arrays(num, den)
    return np.where(num > 0, np.divide(num, den, out=np.full(num.shape, math.inf), where=den > 0), 0.0)


def round_cost(cfg: WirelessConfig, channels: Channels, loads: Loads, *, bandwidth, power, bits,
               server) -> RoundCost:
    """Latency and energy of each device for one round (formulas in the module docstring).

    Args:
        cfg: the wireless section.
        channels: (K, M) gains.
        loads: per-device work.
        bandwidth: (K,) uplink bandwidth b_k in Hz.
        power: (K,) transmit power p_k in W.
        bits: (K,) activation bit-width q_k (32: fp32).
        server: (K,) server index of each device.

    Returns:
        The per-device breakdown and totals. bandwidth, power and bits may carry leading grid
        dimensions, (..., K), to evaluate many allocations at once; T and E assume one (K,).
    """
    server = np.asarray(server, dtype=int)
    power = np.asarray(power, dtype=float)
    h = channels.gain[np.arange(len(server)), server]
    r_up = shannon_rate(bandwidth, power, h, noise_psd_w(cfg))
    r_dn = down_rate(cfg, channels, server)
    t_cmp = loads.device_flops / loads.flops_per_s
    t_up = _div(batch_upload_bits(loads, bits), r_up)
    t_srv = server_counts(server, channels.num_servers) * loads.server_flops / cfg.server_flops_per_s
    t_down = _div(8.0 * loads.grad_bytes, r_dn)
    t_mup = _div(8.0 * loads.model_bytes, r_up)
    t_mdn = _div(8.0 * loads.model_bytes, r_dn)
    latency = loads.batches * (t_cmp + t_up + t_srv + t_down) + t_mup + t_mdn
    e_cmp = compute_energy(loads)
    up_time = loads.batches * t_up + t_mup
    e_up = np.where(up_time > 0, power * up_time, 0.0)
    return RoundCost(t_cmp=t_cmp, t_up=t_up, t_server=t_srv, t_down=t_down, t_model_up=t_mup, t_model_down=t_mdn,
                     rate_up=r_up, rate_down=r_dn, latency=latency, e_cmp=e_cmp, e_up=e_up, energy=e_cmp + e_up)
