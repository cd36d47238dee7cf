"""Joint bandwidth, power, bit-width and server assignment for split learning over wireless.

Problem (spec/sflam.md section 4 [G]; cost model in system/wireless.py):

    minimise   lam * T + (1 - lam) * sum_k E_k
    over       bandwidth b_k >= 0, power 0 <= p_k <= p_max, bits q_k in cfg.bits, server s(k)
    subject to sum_{k: s(k) = s} b_k <= B for every server s (each server has its own band)
               d_k R_k^2 / (4 (2^q_k - 1)^2) <= epsilon  (quantization-error bound; R_k = M - m)

Block coordinate descent; each block never increases the objective:

(i) b and p, with q and s fixed: solved exactly. With U_k the round's uplink bits and
    tau_k = U_k / r_k the uplink time, latency is L_k = A_k + tau_k (A_k: compute, server and
    downlink time) and uplink energy is p_k tau_k = (N0/h_k) tau_k b_k (2^(U_k / (tau_k b_k)) - 1),
    which is jointly convex in (tau_k, b_k) (a perspective-type function; its Hessian determinant
    is e^y (2y^2 - y + 1) - 1 >= 0 with y = U ln2 / (tau b)). The power limit is the convex
    constraint U_k / tau_k <= b_k log2(1 + p_max h_k / (N0 b_k)). With the epigraph variable
    T >= L_k the problem is convex, so its value V(T) after minimising out (b, tau) is convex in
    T. For a fixed T, energy falls with both tau_k and b_k, so tau_k = T - A_k and each band is
    used in full; the bandwidth split is a water-filling: every device's marginal energy
    -dE_k/db_k equals one price mu per server (closed form through the Lambert W function),
    except devices held at the least bandwidth b_k^min(T) that p_max allows (also closed form).
    mu is found by a bracketed root search (scipy brentq), T by a bounded scalar search of the
    convex lam T + (1 - lam) V(T) (scipy minimize_scalar) between the least feasible T (Newton
    from the left on the total least bandwidth, which is convex and falling in T) and
    `max_latency_factor` times it (with lam = 0 the energy keeps falling as T grows, so this
    bound is where the search stops).
(ii) bits, with b, p and s fixed: 1-D search per device over the bit-widths that meet the
    error bound. Fewer bits never cost more time or energy, so after (i) re-optimises b and p
    this lands on the fewest admissible bits; ties therefore go to fewer bits.
(iii) assignment, with q fixed: swap matching. Move one device to another server, or swap two
    devices' servers; a candidate is screened by an upper bound on its objective (block (i) at
    three fixed round latencies, no T search), then re-solved exactly and kept if the objective
    falls; stop when no move or swap passes (exchange-stable up to the screen). Only with
    `assignment: optimize`; it costs O(K M + K^2) screens per pass (K = 10, M = 3: a few seconds).

Baselines are modes of the same solver: `equal-bandwidth` (b_k = B / n_s, p and q optimised),
`max-power` (p_k = p_max, b and q optimised), `fixed-bits` (q_k = cfg.fixed_bits, b and p
optimised, the error bound not applied).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import lambertw

from hetfl.seeding import derive_seed
from hetfl.errors import ConfigError
from hetfl.system.wireless import (Channels, Loads, RoundCost, WirelessConfig, compute_energy, fixed_latency,
                                   noise_psd_w, round_cost, round_upload_bits)

LN2 = math.log(2.0)
MODES = ("optimize", "equal-bandwidth", "max-power", "fixed-bits")


@dataclass(frozen=True, eq=False)
class Allocation:
    """A solved allocation for K devices; arrays are (K,).

    Attributes:
        bandwidth_hz: uplink bandwidth b_k.
        power_w: transmit power p_k.
        bits: activation bit-width q_k (32 = fp32).
        server: server index s(k).
        objective: lam * T + (1 - lam) * E.
        T: round latency max_k L_k (s).
        E: total device energy sum_k E_k (J).
        lam: the weight used.
        mode: the allocation mode.
        iterations: block-coordinate-descent iterations run.
        cost: the per-device latency/energy breakdown (`RoundCost`).
    """

    bandwidth_hz: np.ndarray
    power_w: np.ndarray
    bits: np.ndarray
    server: np.ndarray
    objective: float
    T: float
    E: float
    lam: float
    mode: str
    iterations: int
    cost: RoundCost

    @property
    def latency_s(self) -> np.ndarray:
        return self.cost.latency

    @property
    def energy_j(self) -> np.ndarray:
        return self.cost.energy

    def rows(self, cids: Sequence[int] | None = None) -> list[dict]:
        """One dict per device for clients.csv: client, server, bits, bandwidth, power, rates, latency, energy."""
        cids = range(len(self.bits)) if cids is None else cids
        c = self.cost
        return [{"client": int(cid), "server": int(self.server[i]), "bits": int(self.bits[i]),
                 "bandwidth_hz": float(self.bandwidth_hz[i]), "power_w": float(self.power_w[i]),
                 "rate_up_bps": float(c.rate_up[i]), "rate_down_bps": float(c.rate_down[i]),
                 "latency_s": float(c.latency[i]), "energy_j": float(c.energy[i])}
                for i, cid in enumerate(cids)]


# ----------------------------------------------------------------------------- closed forms


def min_bandwidth(rate, a) -> np.ndarray:
    """Least b with b log2(1 + a / b) >= rate, where a = p_max h / N0 (the rate at full power).

    The rate grows with b towards a / ln2, so the answer is inf at or above that limit and 0 for
    rate 0. Closed form: with x = a / b and rho = rate ln2 / a, ln(1 + x) = rho x, whose nonzero
    root is x = -W_{-1}(-rho e^-rho) / rho - 1; a few Newton steps (monotone here, the rate is
    concave in b) polish it where W loses digits near rho -> 1.
    """
    rate, a = np.broadcast_arrays(np.asarray(rate, dtype=float), np.asarray(a, dtype=float))
    rho = np.divide(rate * LN2, a, out=np.full(rate.shape, math.inf), where=a > 0)
    out = np.zeros(rate.shape)
    out[rho >= 1.0] = math.inf
    mid = (rate > 0) & (rho < 1.0)
    if not mid.any():
        return out
    r, aa, rh = rate[mid], a[mid], rho[mid]
    x = -lambertw(-rh * np.exp(-rh), -1).real / rh - 1.0
    b = np.divide(aa, x, out=np.copy(r), where=np.isfinite(x) & (x > 0))  # fallback b = r: Newton converges from it
    for _ in range(3):
        f = b * np.log2(1.0 + aa / b) - r
        df = np.log2(1.0 + aa / b) - aa / ((aa + b) * LN2)
        b = np.maximum(b - f / df, b * 1e-3)
    out[mid] = b
    return out


def _z_of_c(c: np.ndarray) -> np.ndarray:
    """The z > 0 with 1 - e^z (1 - z) = c, for c > 0: z = 1 + W0((c - 1) / e).

    Near the branch point (c -> 0) 1 + W cancels, so small c uses the series inversion
    z = s - s^2/3 + 11 s^3/72 with s = sqrt(2c) (from c = z^2/2 + z^3/3 + z^4/8 + ...).
    """
    z = 1.0 + lambertw((c - 1.0) / math.e, 0).real
    small = c < 1e-6
    if small.any():
        s = np.sqrt(2.0 * c[small])
        z[small] = s * (1.0 - s / 3.0 + 11.0 * s * s / 72.0)
    return z


def _power(b, tau, U, h, n0) -> np.ndarray:
    # p such that b log2(1 + p h / (N0 b)) = U / tau
    return n0 * b / h * np.expm1(U * LN2 / (tau * b))


# ----------------------------------------------------------------------------- block (i)


@dataclass(frozen=True, eq=False)
class _Fixed:
    """What block (i) holds fixed: for each device, with q and s given."""

    U: np.ndarray  # round uplink bits
    A: np.ndarray  # latency that b and p do not change
    h: np.ndarray  # gain to its server
    a: np.ndarray  # p_max h / N0
    server: np.ndarray
    active: np.ndarray  # U > 0


def _fixed(cfg, ch: Channels, loads: Loads, bits, server) -> _Fixed:
    h = ch.gain[np.arange(len(server)), server]
    U = round_upload_bits(loads, bits)
    return _Fixed(U, fixed_latency(cfg, ch, loads, server), h, cfg.p_max_w * h / noise_psd_w(cfg), server, U > 0)


def _groups(fx: _Fixed, num_servers: int) -> list[np.ndarray]:
    """Indices of the active devices of each non-empty server."""
    return [idx for s in range(num_servers) if len(idx := np.flatnonzero(fx.active & (fx.server == s)))]


def _bmin(fx: _Fixed, idx: np.ndarray, T: float) -> np.ndarray:
    slack = T - fx.A[idx]
    rate = np.divide(fx.U[idx], slack, out=np.full(len(idx), math.inf), where=slack > 0)
    return min_bandwidth(rate, fx.a[idx])


def _least_T(cfg, fx: _Fixed, groups, mode: str) -> float:
    """The smallest round latency any (b, p) achieves (all devices at p_max)."""
    T = float(fx.A.max()) if len(fx.A) else 0.0
    for idx in groups:
        if mode == "equal-bandwidth":
            b = np.full(len(idx), cfg.bandwidth_hz / len(idx))
            r = b * np.log2(1.0 + fx.a[idx] / b)
            T = max(T, float((fx.A[idx] + fx.U[idx] / r).max()))
            continue
        # Below lo some device could not send its bits even with infinite bandwidth.
        U, A, a, B = fx.U[idx], fx.A[idx], fx.a[idx], cfg.bandwidth_hz
        lo = float((A + U * LN2 / a).max())
        excess = lambda T: float(_bmin(fx, idx, T).sum()) - B  # noqa: E731  (convex, falling in T)
        gap = max(lo, 1e-9)
        while excess(lo + gap) > 0:
            gap *= 2.0
        hi = lo + gap
        t = 0.5 * (lo + hi)
        while excess(t) <= 0 and t - lo > 1e-12 * t:  # a start left of the root
            hi, t = t, 0.5 * (lo + t)
        for _ in range(100):
            # Newton from the left on a convex falling function never overshoots the root.
            slack = t - A
            b = min_bandwidth(U / slack, a)
            f = float(b.sum()) - B
            if f <= 0:
                hi = min(hi, t)
                break
            dr = np.log2(1.0 + a / b) - a / ((a + b) * LN2)  # r'(b_min)
            step = f / float((U / (slack * slack * dr)).sum())
            t += step
            if step <= 1e-13 * t:
                t_ok = t * (1.0 + 1e-12)
                if excess(t_ok) <= 0:
                    hi = min(hi, t_ok)
                break
        else:
            raise RuntimeError("least-latency search did not converge")  # a bug, not user input
        T = max(T, hi)
    return T


def _water_fill(bmin: np.ndarray, budget: float, bandwidth_of, xtol: float) -> np.ndarray:
    """b_k = max(bmin_k, bandwidth_of(log mu)_k) with sum b = budget; bandwidth_of falls with mu."""
    if bmin.sum() >= budget * (1.0 - 1e-12):
        return bmin * min(1.0, budget / bmin.sum())  # at the least latency: the band is exactly used
    seen: dict[float, float] = {}

    def total(x: float) -> float:
        if x not in seen:
            seen[x] = float(np.maximum(bmin, bandwidth_of(x)).sum()) - budget
        return seen[x]

    lo = hi = 0.0
    for _ in range(400):  # widen until the bracket holds the price
        if total(hi) <= 0:
            break
        hi += 4.0
    for _ in range(400):
        if total(lo) >= 0:
            break
        lo -= 4.0
    x = brentq(total, lo, hi, xtol=xtol, maxiter=500) if total(lo) * total(hi) < 0 else (lo if total(lo) == 0 else hi)
    b = np.maximum(bmin, bandwidth_of(x))
    extra = b - bmin  # spread brentq's last rounding over the part above bmin: the band is used exactly
    return bmin + extra * ((budget - bmin.sum()) / extra.sum()) if extra.sum() > 0 else b


def _at_T(cfg, fx: _Fixed, groups, mode: str, T: float, n0: float, xtol: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-energy (b, p) with every latency <= T; returns b, p and the uplink energy."""
    K = len(fx.U)
    b, p = np.zeros(K), np.zeros(K)
    for idx in groups:
        U, A, h, a = fx.U[idx], fx.A[idx], fx.h[idx], fx.a[idx]
        tau = T - A
        if mode == "equal-bandwidth":
            b[idx] = cfg.bandwidth_hz / len(idx)
            p[idx] = _power(b[idx], tau, U, h, n0)
            continue
        bmin = _bmin(fx, idx, T)
        if mode == "max-power":
            b[idx] = _water_fill(bmin, cfg.bandwidth_hz, _maxpower_bandwidth(U, a, bmin, cfg.bandwidth_hz), xtol)
            p[idx] = cfg.p_max_w
            continue
        # Marginal energy -dE/db = mu  <=>  1 - e^z (1 - z) = mu h / (N0 tau), with z = U ln2 / (tau b).
        base = np.log(h / (n0 * tau))

        def bandwidth_of(x):
            c = np.exp(np.clip(x + base, -700.0, 700.0))
            return U * LN2 / (tau * _z_of_c(c))

        b[idx] = _water_fill(bmin, cfg.bandwidth_hz, _shift(bandwidth_of, float(np.median(-base))), xtol)
        p[idx] = _power(b[idx], tau, U, h, n0)
    p = np.minimum(p, cfg.p_max_w)  # b = bmin gives p_max up to rounding
    energy = np.zeros(K)
    act = fx.active
    r = b[act] * np.log2(1.0 + p[act] * fx.h[act] / (n0 * b[act]))
    energy[act] = p[act] * fx.U[act] / r
    return b, p, float(energy.sum())


def _shift(fn, x0: float):
    # Start the price search at mu = median N0 tau / h (where c = 1): brackets then widen from there.
    return lambda x: fn(x + x0)


def _maxpower_bandwidth(U, a, bmin, band):
    """At p = p_max, energy p_max U / r(b) per device; b where its marginal energy equals mu."""

    def log_marginal(t):
        # ln of -dE/db / p_max = U r'(b) / r^2 at b = e^t, and its slope in t (x = a/b is the SNR)
        b = np.exp(t)
        x = a / b
        L = np.log2(1.0 + x)
        r, d = b * L, L - x / ((1.0 + x) * LN2)  # rate and r'(b)
        dd = -x * x / (b * LN2 * (1.0 + x) ** 2)  # r''(b)
        m = U * d / (r * r)
        return np.log(m), b * (dd / d - 2.0 * d / r)  # d ln m / d ln b = b (r''/r' - 2 r'/r) < 0

    t_lo, t_hi = np.log(np.maximum(bmin, band * 1e-12)), np.full_like(U, math.log(band))
    y_lo, y_hi = log_marginal(t_lo)[0], log_marginal(t_hi)[0]

    def bandwidth_of(x):
        # Safeguarded Newton in (ln b, ln m): ln m is nearly linear in ln b, so a few steps suffice;
        # a step leaving the bracket is replaced by bisection.
        y = min(x, 700.0)
        lo, hi = t_lo.copy(), t_hi.copy()
        t = 0.5 * (lo + hi)
        clamped = (y_hi >= y) | (y_lo <= y)  # the answer is a bracket end: nothing to solve
        for _ in range(0 if clamped.all() else 60):
            ym, slope = log_marginal(t)
            above = ym > y  # marginal too high: more bandwidth
            lo, hi = np.where(above, t, lo), np.where(above, hi, t)
            step = t - (ym - y) / slope
            inside = (step > lo) & (step < hi)
            new = np.where(inside, step, 0.5 * (lo + hi))
            done = clamped | (np.abs(new - t) < 1e-13 * np.maximum(1.0, np.abs(t)))
            t = new
            if done.all():
                break
        return np.where(y_hi >= y, band, np.where(y_lo <= y, np.exp(t_lo), np.exp(t)))

    return _shift(bandwidth_of, float(np.median(y_hi)))


PRECISE = (1e-6, 1e-8)  # tolerances on (log T, log mu): objective error ~ tol^2, far below 1e-9
SCREEN_XTOL = 1e-5  # log-mu tolerance when screening matching candidates (re-solved precisely if kept)


def solve_bandwidth_power(cfg: WirelessConfig, channels: Channels, loads: Loads, bits, server, *,
                          lam: float, mode: str = "optimize") -> tuple[np.ndarray, np.ndarray, RoundCost]:
    """Block (i): the optimal bandwidths and powers for fixed bits and assignment.

    Args:
        cfg: the wireless section.
        channels, loads: the K devices.
        bits: (K,) bit-widths.
        server: (K,) server per device.
        lam: latency weight.
        mode: "optimize"/"fixed-bits" (b and p free), "equal-bandwidth" or "max-power".

    Returns:
        (bandwidth, power, cost) with the cost of the result per `wireless.round_cost`.
    """
    return _solve(cfg, channels, loads, bits, server, lam, mode, PRECISE)


def _solve(cfg, channels, loads, bits, server, lam, mode, tols) -> tuple[np.ndarray, np.ndarray, RoundCost]:
    server = np.asarray(server, dtype=int)
    fx = _fixed(cfg, channels, loads, np.asarray(bits), server)
    groups = _groups(fx, channels.num_servers)
    n0 = noise_psd_w(cfg)
    t_lo = _least_T(cfg, fx, groups, mode)
    t_hi = t_lo * cfg.max_latency_factor
    cache: dict[float, tuple] = {}

    def value(logT: float) -> float:
        T = math.exp(logT)
        if logT not in cache:
            cache[logT] = _at_T(cfg, fx, groups, mode, T, n0, tols[1])
        return lam * T + (1.0 - lam) * cache[logT][2]

    candidates = [math.log(t_lo), math.log(t_hi)]
    if lam < 1.0 and t_hi > t_lo and groups:
        res = minimize_scalar(value, bounds=(candidates[0], candidates[1]), method="bounded",
                              options={"xatol": tols[0]})
        candidates.append(float(res.x))
    best = min(candidates, key=value)
    b, p, _ = cache[best]
    cost = round_cost(cfg, channels, loads, bandwidth=b, power=p, bits=bits, server=server)
    return b, p, cost


# ----------------------------------------------------------------------------- blocks (ii), (iii)


def admissible_bits(cfg: WirelessConfig, loads: Loads) -> list[list[int]]:
    """Per device, the bit-widths of `cfg.bits` meeting the error bound, fewest first.

    Raises:
        ConfigError: naming `wireless.epsilon` if no bit-width meets it for some device.
    """
    out = []
    for k in range(len(loads)):
        d, R = float(loads.act_elems[k]), float(loads.act_range[k])
        ok = sorted(q for q in set(cfg.bits)
                    if cfg.epsilon is None or q >= 32 or d * R * R / (4.0 * (2**q - 1) ** 2) <= cfg.epsilon)
        if not ok:
            raise ConfigError(f"wireless.epsilon: no bit-width in wireless.bits meets the error bound "
                              f"{cfg.epsilon:g} for device {k} ({d:g} activations of range {R:g}); add 32 or "
                              f"more bits, or raise epsilon")
        out.append(ok)
    return out


def _bits_step(cfg, channels, loads, b, p, bits, server, admissible, lam) -> np.ndarray:
    q = np.array(bits)
    for k in range(len(q)):
        best_q, best = q[k], math.inf
        for cand in admissible[k]:  # fewest first; only a strict gain moves to more bits
            q[k] = cand
            obj = round_cost(cfg, channels, loads, bandwidth=b, power=p, bits=q, server=server).objective(lam)
            if obj < best:
                best_q, best = cand, obj
        q[k] = best_q
    return q


def _screen(cfg, channels, loads, bits, trial, lam, mode, T_now) -> float:
    """An upper bound on the objective of assignment `trial`: its block-(i) value at three round
    latencies (the current one, its own least one and that times max_latency_factor) instead of
    the full search over T. Cheap enough to try every move and swap."""
    fx = _fixed(cfg, channels, loads, np.asarray(bits), trial)
    groups = _groups(fx, channels.num_servers)
    n0 = noise_psd_w(cfg)
    t_lo = _least_T(cfg, fx, groups, mode)
    e_cmp = float(compute_energy(loads).sum())
    best = math.inf
    for T in {t_lo, t_lo * cfg.max_latency_factor, T_now}:
        if T >= t_lo:
            best = min(best, lam * T + (1.0 - lam) * (e_cmp + _at_T(cfg, fx, groups, mode, T, n0, SCREEN_XTOL)[2]))
    return best


def _match_step(cfg, channels, loads, bits, server, best, lam, mode):
    """Exchange-stable matching: apply improving moves/swaps until none is left (or max_iters passes).

    A candidate is screened with `_screen` (an upper bound, so a screened gain is a real gain)
    and kept if the exact block-(i) solve improves the objective.
    """
    server = np.array(server)
    M = channels.num_servers
    for _ in range(cfg.max_iters):
        improved = False
        candidates = [(k, s) for k in range(len(server)) for s in range(M)]  # moves
        candidates += [(j, k) for j in range(len(server)) for k in range(j + 1, len(server))]  # swaps
        for i, (x, y) in enumerate(candidates):
            trial = server.copy()
            if i < len(server) * M:
                if trial[x] == y:
                    continue
                trial[x] = y
            else:
                if trial[x] == trial[y]:
                    continue
                trial[x], trial[y] = trial[y], trial[x]
            current = best[2].objective(lam)
            if _screen(cfg, channels, loads, bits, trial, lam, mode, best[2].T) >= current * (1.0 - 1e-9):
                continue
            sol = solve_bandwidth_power(cfg, channels, loads, bits, trial, lam=lam, mode=mode)
            if sol[2].objective(lam) < current * (1.0 - 1e-12):
                server, best, improved = trial, sol, True
        if not improved:
            break
    return server, best


def initial_servers(cfg: WirelessConfig, channels: Channels, seed: int = 0) -> np.ndarray:
    """Starting assignment: nearest server (`nearest`, also the start of `optimize`) or seeded random."""
    if cfg.assignment == "random":
        rng = np.random.default_rng(derive_seed(seed, "wireless", "assignment"))
        return rng.integers(channels.num_servers, size=channels.num_devices)
    return np.argmin(channels.distance_m, axis=1)


def allocate(cfg: WirelessConfig, channels: Channels, loads: Loads, *, lam: float | None = None,
             mode: str | None = None, seed: int = 0, server: Sequence[int] | None = None) -> Allocation:
    """Choose bandwidth, power, bits and server per device (block coordinate descent, see module doc).

    Args:
        cfg: the wireless section.
        channels: gains of the K devices to the M servers (`wireless.draw_channels`, `.subset`).
        loads: the K devices' work (`wireless.make_loads`).
        lam: latency weight; None uses `cfg.lam`.
        mode: one of MODES; None uses `cfg.mode`.
        seed: root seed (random assignment).
        server: a starting assignment; None uses `initial_servers`.

    Returns:
        The allocation with its per-device cost.

    Raises:
        ConfigError: if no bit-width meets the error bound for some device.
        ValueError: on an unknown mode or mismatched sizes.
    """
    lam = cfg.lam if lam is None else float(lam)
    mode = cfg.mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"unknown allocation mode {mode!r} (choose from: {', '.join(MODES)})")
    if channels.num_devices != len(loads):
        raise ValueError(f"{channels.num_devices} devices in channels but {len(loads)} in loads")
    server = initial_servers(cfg, channels, seed) if server is None else np.array(server, dtype=int)
    if mode == "fixed-bits":
        admissible = [[cfg.fixed_bits]] * len(loads)
    else:
        admissible = admissible_bits(cfg, loads)
    bits = np.array([adm[-1] for adm in admissible])  # start from the most accurate admissible bits
    best = solve_bandwidth_power(cfg, channels, loads, bits, server, lam=lam, mode=mode)
    matching = cfg.assignment == "optimize" and channels.num_servers > 1
    it = 0
    for it in range(1, cfg.max_iters + 1):
        before = best[2].objective(lam)
        new_bits = _bits_step(cfg, channels, loads, best[0], best[1], bits, server, admissible, lam)
        if np.array_equal(new_bits, bits) and not matching:
            break  # block (i) would return the same (b, p): converged
        bits = new_bits
        best = solve_bandwidth_power(cfg, channels, loads, bits, server, lam=lam, mode=mode)
        if matching:
            server, best = _match_step(cfg, channels, loads, bits, server, best, lam, mode)
        if before - best[2].objective(lam) <= cfg.tol * abs(before):
            break
    b, p, cost = best
    for ro in (b, p, bits, server):
        ro.setflags(write=False)
    return Allocation(bandwidth_hz=b, power_w=p, bits=bits, server=server, objective=cost.objective(lam),
                      T=cost.T, E=cost.E, lam=lam, mode=mode, iterations=it, cost=cost)

