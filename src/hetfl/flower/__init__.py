"""The Flower backend: the same round loop and method hooks, with clients on Flower SuperNodes.

`FlowerBackend` (backend.py) stands in for the simulator inside a Flower ServerApp; the ClientApp
(apps.py) rebuilds the scenario from the run's config and runs `client_update` for the client a
message names; launch.py starts a local SuperLink and SuperNodes (or uses a running SuperLink)
and submits the run. Only this package imports `flwr`, and only once a Flower run is asked for.
"""

from __future__ import annotations

from hetfl.errors import ConfigError

FLWR_PIN = "1.41.0"  # the version pyproject's dev extra installs and the tests run against


def require_flwr():
    """The `flwr` module, or a one-line ConfigError saying how to install it."""
    try:
        import flwr
    except ImportError:
        raise ConfigError(f"--backend flower needs the Flower package: pip install 'flwr=={FLWR_PIN}' "
                          "(`make setup` installs it)") from None
    return flwr


def check_supported(cfg, method) -> None:
    """Refuse what plain Flower rounds (one message down, one reply up per client) cannot carry.

    Raises:
        ConfigError: naming the key, for split methods (per-batch server calls), lockstep methods,
            a data-selection stage, per-client evaluation, or sequential client orders.
    """
    name = cfg.method.name
    if method.calls_server:
        raise ConfigError(f"method.name: {name} makes per-batch server calls (split learning), which plain Flower "
                          "rounds cannot carry; run it with --backend sim")
    if method.schedule != "parallel":
        raise ConfigError(f"method.name: {name} needs clients to step together or in a fixed order within a round, "
                          "which plain Flower rounds cannot carry; run it with --backend sim")
    if cfg.selection.name != "none":
        raise ConfigError(f"selection.name: {cfg.selection.name}: data selection (two extra exchanges per round) is "
                          "not supported on Flower yet; run it with --backend sim or set selection.name=none")
    if cfg.data.client_test_fraction > 0:
        raise ConfigError("data.client_test_fraction: per-client evaluation reads each client's test split and "
                          "private state, which stay on the SuperNodes; run it with --backend sim or set it to 0")
