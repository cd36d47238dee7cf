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


def check_supported(cfg, method=None) -> None:
    """Refuse what plain Flower rounds (one message down, one reply up per client) cannot carry.

    The rules are `hetfl.validation.backend_rules`, read from the config and the method's declared
    capabilities (`calls_server`, `schedule`), so `hetfl validate --backend flower` and `hetfl run
    --backend flower` refuse the same things before any model loads.

    Args:
        cfg: the run's config.
        method: the run's method object; None: one is made from its factory (cheap, no scenario).

    Raises:
        ConfigError: naming the key, for split methods (per-batch server calls), lockstep methods,
            a data-selection stage, per-client evaluation, or sequential client orders.
    """
    from hetfl.validation import backend_rules, build_method

    for key, msg in backend_rules(cfg, build_method(cfg) if method is None else method, "flower"):
        raise ConfigError(f"{key}: {msg}")
