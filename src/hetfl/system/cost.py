"""Time and energy of one client's work, from FLOPs and bytes. Pure functions, no state.

Model (the standard one in the mobile-edge-computing and wireless-FL literature, e.g. Mao et
al. 2017, "A Survey on Mobile Edge Computing: The Communication Perspective", IEEE COMST,
computation and communication models; Tran et al. 2019, "Federated Learning over Wireless
Networks", INFOCOM):

    t_comp = flops / flops_per_s
    t_up   = 8 * bytes_up   / (up_mbps   * 1e6)
    t_down = 8 * bytes_down / (down_mbps * 1e6)
    e_comp = kappa * f**2 * cycles,   cycles = t_comp * f      (dynamic CMOS power)
    e_tx   = tx_power_w * t_up
    t_server = server_flops * n / server_flops_per_s   (split methods: waiting for the server)

`n` is the number of clients the server serves at once: the round's clients that use it, or 1
for a method that serves them one after another (`client_order`), whose round then lasts the
sum of its clients' times instead of the slowest one's.

Link rates are fixed per device here; a Shannon-rate model (B log2(1 + p h / N0)) belongs in
the allocation code that chooses bandwidth and power.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from hetfl.system.devices import DeviceProfile, ServerProfile


@dataclass(frozen=True)
class Cost:
    """Seconds and joules one client spends in a round, by component.

    Instances add component-wise, and ``sum(costs)`` works (``0 + cost`` is ``cost``).
    """

    t_comp: float = 0.0
    t_up: float = 0.0
    t_down: float = 0.0
    e_comp: float = 0.0
    e_tx: float = 0.0
    t_server: float = 0.0  # time the client waits for server compute (split learning)

    @property
    def time_s(self) -> float:
        """Wall time, computing, waiting and communicating one after the other (no overlap)."""
        return self.t_comp + self.t_up + self.t_down + self.t_server

    @property
    def energy_j(self) -> float:
        """Computing plus transmit energy."""
        return self.e_comp + self.e_tx

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(
            t_comp=self.t_comp + other.t_comp,
            t_up=self.t_up + other.t_up,
            t_down=self.t_down + other.t_down,
            e_comp=self.e_comp + other.e_comp,
            e_tx=self.e_tx + other.e_tx,
            t_server=self.t_server + other.t_server,
        )

    def __radd__(self, other: object) -> Cost:
        # Lets the builtin sum() start from its integer 0.
        if other == 0:
            return self
        return NotImplemented


def client_cost(dev: DeviceProfile, flops: float, bytes_up: int, bytes_down: int) -> Cost:
    """Time and energy for ``flops`` of local compute plus one upload and one download.

    Formulas (Mao et al. 2017, local-computing and communication models):
    ``t_comp = flops / flops_per_s``; ``t_up = 8 bytes_up / (up_mbps 1e6)`` and likewise
    ``t_down``; ``cycles = t_comp * cpu_hz``; ``e_comp = kappa * cpu_hz**2 * cycles``;
    ``e_tx = tx_power_w * t_up``. The energy of receiving the download is ignored, as in that
    literature (the base station's transmit power is not the device's cost), and so is idle
    power while waiting.

    Args:
        dev: The client's device profile.
        flops: Floating-point operations of local work, >= 0.
        bytes_up: Bytes sent to the server, >= 0.
        bytes_down: Bytes received from the server, >= 0.

    Returns:
        The cost by component.

    Raises:
        ValueError: If any amount is negative.
    """
    if flops < 0 or bytes_up < 0 or bytes_down < 0:
        raise ValueError(
            f"amounts must be >= 0, got flops={flops}, bytes_up={bytes_up}, bytes_down={bytes_down}"
        )
    t_comp = flops / dev.flops_per_s
    t_up = 8.0 * bytes_up / (dev.up_mbps * 1e6)
    t_down = 8.0 * bytes_down / (dev.down_mbps * 1e6)
    cycles = t_comp * dev.cpu_hz
    return Cost(
        t_comp=t_comp,
        t_up=t_up,
        t_down=t_down,
        e_comp=dev.kappa * dev.cpu_hz**2 * cycles,
        e_tx=dev.tx_power_w * t_up,
    )


def server_time(server_flops: float, server_flops_per_s: float, sharing: int = 1) -> float:
    """Seconds a client waits for its server work when ``sharing`` clients split the server's
    FLOP/s equally: ``server_flops * sharing / server_flops_per_s``.

    Args:
        server_flops: FLOPs the server spends on this client in the round, >= 0.
        server_flops_per_s: The server's sustained FLOP/s, > 0.
        sharing: Clients the server serves at once, >= 1.

    Returns:
        The waiting time in seconds.
    """
    return server_flops * sharing / server_flops_per_s


def served_at_once(cids: Iterable[int], *, sequential: bool = False,
                   server_of: dict[int, int] | None = None) -> dict[int, int]:
    """How many clients share each client's server: those of ``cids`` on the same server
    (``server_of``; absent: one server for all), or 1 for a method serving them in sequence."""
    cids = list(cids)
    if sequential:
        return {c: 1 for c in cids}
    group = server_of or {}
    counts = Counter(group.get(c, 0) for c in cids)
    return {c: counts[group.get(c, 0)] for c in cids}


def fixed_costs(cids: list[int], devices: dict[int, DeviceProfile], flops: dict, up: dict, down: dict,
                server_flops: dict[int, float], server: ServerProfile, *, sequential: bool = False,
                server_of: dict[int, int] | None = None) -> dict[int, Cost]:
    """One `Cost` per client of the round on the devices' fixed link rates (the default costing).

    Each client's cost is `client_cost` plus ``t_server = server_time(server_flops[c],
    server.flops_per_s, n)``, ``n`` from `served_at_once` over the clients with server work.

    Args:
        cids: The round's clients.
        devices, flops, up, down: Per client: profile, local FLOPs, bytes up and down.
        server_flops: Per client: server FLOPs spent on it (split methods; absent: 0).
        server: The server's profile (`devices.yaml` `server:`).
        sequential: The server serves the clients one after another.
        server_of: Per client: which server serves it (several edge servers); absent: one.

    Returns:
        Client id -> cost.
    """
    n = served_at_once([c for c in cids if server_flops.get(c, 0.0) > 0], sequential=sequential,
                       server_of=server_of)
    return {c: replace(client_cost(devices[c], flops[c], up[c], down[c]),
                       t_server=server_time(server_flops.get(c, 0.0), server.flops_per_s, n.get(c, 1)))
            for c in cids}


def round_time(costs: Iterable[Cost], sequential: bool = False) -> float:
    """Duration of a synchronous round.

    Args:
        costs: One cost per participating client.
        sequential: The clients are served one after another (each waits for the previous
            one), as in SplitFed V2 and vanilla split learning.

    Returns:
        ``sum(c.time_s)`` when sequential, else ``max(c.time_s)`` (the server waits for the
        slowest client); 0.0 when no client took part.
    """
    times = [c.time_s for c in costs]
    if sequential:
        return float(sum(times))
    return max(times, default=0.0)


def equal_radio(wcfg, server_of: dict[int, int]) -> dict[int, tuple[float, float, int]]:
    """(bandwidth_hz, power_w, server) per client: its server's band split equally among the
    clients given for that server, at the power limit (the unoptimised allocation)."""
    counts: dict[int, int] = {}
    for s in server_of.values():
        counts[s] = counts.get(s, 0) + 1
    return {c: (wcfg.bandwidth_hz / counts[s], wcfg.p_max_w, s) for c, s in server_of.items()}


class WirelessCost:
    """Client costs under the wireless model of system/wireless.py (`wireless.enabled: true`).

    Uplink rates follow Shannon's formula from each client's bandwidth, power and channel gain
    (path loss + shadowing, drawn once per run from the seed); the downlink is an equal share
    of its server's band (or `down_rate_bps`); server compute is the server's FLOP/s shared
    equally by the clients it serves this round. Bytes and FLOPs are the measured ones (ledger,
    FlopCounterMode). A method that allocates radio resources reports
    `{cid: (bandwidth_hz, power_w, server)}` (`RoundReport.radio`); any other method gets an equal
    share of its nearest server's band at full power, so every method is costed alike.

        t_comp = flops / flops_per_s          e_comp = kappa f^2 (t_comp f)
        t_up   = 8 bytes_up / r_up            e_tx   = p t_up
        t_down = 8 bytes_down / r_down        t_server = server_flops * n_s / server_flops_per_s
    """

    def __init__(self, wcfg, channels):
        self.cfg = wcfg
        self.channels = channels  # the scenario's one draw (`Scenario.channels`)

    def default_radio(self, cids: list[int]) -> dict[int, tuple[float, float, int]]:
        """Nearest server, an equal share of its band, full power."""
        import numpy as np

        nearest = np.argmin(self.channels.distance_m[cids], axis=1)
        return equal_radio(self.cfg, {c: int(s) for c, s in zip(cids, nearest)})

    def costs(self, cids: list[int], devices: dict, flops: dict, up: dict, down: dict,
              server_flops: dict, radio: dict[int, tuple[float, float, int]] | None = None,
              sequential: bool = False) -> dict[int, Cost]:
        """One `Cost` per client of the round (all dicts keyed by client id); `sequential`: the
        server serves the clients one after another, each alone (n_s = 1)."""
        import numpy as np

        from hetfl.system.wireless import down_rate, noise_psd_w, server_counts, shannon_rate

        if not cids:
            return {}
        radio = radio or self.default_radio(cids)
        band, power, server = (np.array([radio[c][i] for c in cids]) for i in range(3))
        server = server.astype(int)
        ch = self.channels.subset(cids)
        h = ch.gain[np.arange(len(cids)), server]
        r_up = shannon_rate(band, power, h, noise_psd_w(self.cfg))
        r_dn = down_rate(self.cfg, ch, server)
        n_s = np.ones(len(cids), dtype=int) if sequential else server_counts(server, ch.num_servers)
        out = {}
        for i, c in enumerate(cids):
            local = client_cost(devices[c], flops[c], 0, 0)  # computing time and energy: the same model
            t_up = 8.0 * up[c] / r_up[i] if up[c] else 0.0
            out[c] = Cost(t_comp=local.t_comp, t_up=t_up, t_down=8.0 * down[c] / r_dn[i] if down[c] else 0.0,
                          e_comp=local.e_comp, e_tx=float(power[i]) * t_up,
                          t_server=server_time(server_flops.get(c, 0.0), self.cfg.server_flops_per_s, int(n_s[i])))
        return out
