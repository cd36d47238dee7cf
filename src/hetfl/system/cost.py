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

Link rates are fixed per device here; a Shannon-rate model (B log2(1 + p h / N0)) belongs in
the allocation code that chooses bandwidth and power.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hetfl.system.devices import DeviceProfile


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

    @property
    def time_s(self) -> float:
        """Wall time, computing and communicating one after the other (no overlap)."""
        return self.t_comp + self.t_up + self.t_down

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


def round_time(costs: Iterable[Cost]) -> float:
    """Duration of a synchronous round: the server waits for the slowest client.

    Args:
        costs: One cost per participating client.

    Returns:
        ``max(c.time_s)``, or 0.0 when no client took part.
    """
    return max((c.time_s for c in costs), default=0.0)
