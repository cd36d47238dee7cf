"""Device tiers (YAML), tier assignment, cost model and memory estimates, on hand examples."""

import re
from collections import Counter
from importlib import resources

import numpy as np
import pytest

from hetfl.errors import ConfigError
from hetfl.system.cost import Cost, client_cost, round_time
from hetfl.system.devices import DeviceProfile, assign_tiers, load_tiers
from hetfl.system.memory import estimate_training_memory, fits, transformer_activation_bytes

FIELDS = ["flops_per_s", "mem_mb", "up_mbps", "down_mbps", "tx_power_w", "cpu_hz", "kappa"]

# 1 GFLOP/s at 1 GHz, kappa 1e-28; 8 Mbit/s up at 0.2 W, 16 Mbit/s down; 1 MiB memory.
TOY = DeviceProfile(
    name="toy",
    flops_per_s=1e9,
    mem_mb=1,
    up_mbps=8,
    down_mbps=16,
    tx_power_w=0.2,
    cpu_hz=1e9,
    kappa=1e-28,
)

GOOD_TIER = {
    "flops_per_s": "1.0e+9",
    "mem_mb": "512",
    "up_mbps": "2",
    "down_mbps": "10",
    "tx_power_w": "0.2",
    "cpu_hz": "1e9",  # PyYAML reads this as a string; the loader accepts it
    "kappa": "1e-28",
}


def _write_tier(tmp_path, name="board", **override):
    fields = {**GOOD_TIER, **override}
    body = "".join(f"    {k}: {v}\n" for k, v in fields.items() if v is not None)
    path = tmp_path / "my_devices.yaml"
    path.write_text(f"tiers:\n  {name}:\n{body}")
    return path


# ---- tiers -------------------------------------------------------------------------------


def test_packaged_tiers_load_and_are_ordered_by_speed():
    tiers = load_tiers()
    names = ["phone-low", "phone-mid", "phone-high", "jetson-nano", "laptop"]
    assert list(tiers) == names
    assert all(t.name == n for n, t in tiers.items())
    speeds = [tiers[n].flops_per_s for n in names]
    assert speeds == sorted(speeds)
    assert tiers["phone-mid"].tx_power_w == 0.2  # 3GPP class 3, 23 dBm
    assert tiers["phone-low"].kappa == 1e-28  # Mao et al. 2017
    assert tiers["jetson-nano"].cpu_hz == 1.43e9


def test_every_packaged_number_cites_a_source():
    text = resources.files("hetfl.system").joinpath("devices.yaml").read_text()
    field_lines = [ln for ln in text.splitlines() if re.match(rf"\s+({'|'.join(FIELDS)}):", ln)]
    assert len(field_lines) == 5 * len(FIELDS) + 1  # 5 tiers, plus the server's flops_per_s
    uncited = [ln for ln in field_lines if not re.search(r"#\s*\[", ln)]
    assert uncited == [], "each number needs a [source] comment"


def test_user_yaml_defines_its_own_tiers(tmp_path):
    tiers = load_tiers(str(_write_tier(tmp_path)))
    assert tiers == {
        "board": DeviceProfile("board", 1e9, 512.0, 2.0, 10.0, 0.2, 1e9, 1e-28),
    }


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ({"up_mbps": "-3"}, "up_mbps", "must be > 0"),
        ({"flops_per_s": "0"}, "flops_per_s", "must be > 0"),
        ({"kappa": "-1.0e-28"}, "kappa", "must be >= 0"),
        ({"mem_mb": None}, "mem_mb", "missing field"),
        ({"flops": "1"}, "flops", "unknown field"),
        ({"cpu_hz": "fast"}, "cpu_hz", "expected a number"),
        ({"cpu_hz": "true"}, "cpu_hz", "expected a number"),
        ({"down_mbps": ".inf"}, "down_mbps", "must be finite"),
    ],
)
def test_bad_user_yaml_names_file_and_field(tmp_path, override, field, why):
    path = _write_tier(tmp_path, **override)
    with pytest.raises(ConfigError) as err:
        load_tiers(str(path))
    assert str(err.value).startswith(f"{path}: board.{field}: {why}")


def test_zero_energy_coefficients_are_allowed(tmp_path):
    tiers = load_tiers(str(_write_tier(tmp_path, tx_power_w="0", kappa="0")))
    assert tiers["board"].kappa == 0.0


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read device file"):
        load_tiers(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  a:\n    mem_mb: [1\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}:\d+: invalid YAML"):
        load_tiers(str(bad))
    flat = tmp_path / "flat.yaml"
    flat.write_text("phone:\n  mem_mb: 1\n")
    with pytest.raises(ConfigError, match="top-level 'tiers:'"):
        load_tiers(str(flat))


# ---- tier assignment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "mix", "expected"),
    [
        (20, {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 10, "b": 6, "c": 4}),
        (20, {"a": 5, "b": 3, "c": 2}, {"a": 10, "b": 6, "c": 4}),  # unnormalised weights
        # quotas 4.5/3.5/2: floors 4/3/2, one left over, tie -> first listed.
        (10, {"a": 0.45, "b": 0.35, "c": 0.2}, {"a": 5, "b": 3, "c": 2}),
        # quotas 2.33 each: one left over, tie -> first listed.
        (7, {"a": 1, "b": 1, "c": 1}, {"a": 3, "b": 2, "c": 2}),
        # quotas 0.6/2.4: floors 0/2, remainders .6 > .4 -> a.
        (3, {"a": 0.2, "b": 0.8}, {"a": 1, "b": 2}),
        (4, {"a": 0.0, "b": 1.0}, {"b": 4}),
    ],
)
def test_assign_tiers_exact_counts(n, mix, expected):
    tiers = {k: TOY for k in "abc"}
    got = assign_tiers(n, mix, tiers, np.random.default_rng(0))
    assert len(got) == n
    assert dict(Counter(got)) == expected


def test_assign_tiers_shuffles_deterministically():
    tiers = {k: TOY for k in "abc"}
    mix = {"a": 0.5, "b": 0.3, "c": 0.2}
    first = assign_tiers(20, mix, tiers, np.random.default_rng(7))
    assert first == assign_tiers(20, mix, tiers, np.random.default_rng(7))
    assert first != sorted(first)  # shuffled, not grouped


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        (
            {"phone-low": 1, "tablet": 1},
            "population.tiers: unknown device tier 'tablet' (known: phone-low, phone-mid,",
        ),
        ({"phone-low": -0.1, "laptop": 1}, "population.tiers.phone-low: proportion must be >= 0"),
        ({"phone-low": 0, "laptop": 0.0}, "population.tiers: all proportions are zero"),
        ({}, "population.tiers: empty tier mix"),
    ],
)
def test_assign_tiers_errors(mix, message):
    with pytest.raises(ConfigError) as err:
        assign_tiers(10, mix, load_tiers(), np.random.default_rng(0))
    assert str(err.value).startswith(message)


# ---- cost --------------------------------------------------------------------------------


def test_client_cost_hand_example():
    # 1e9 FLOPs at 1e9 FLOP/s -> 1 s; 1e9 cycles; e_comp = 1e-28 * (1e9)^2 * 1e9 = 0.1 J.
    # 1e6 B up = 8e6 bit at 8 Mbit/s -> 1 s, 0.2 W * 1 s = 0.2 J; 1e6 B down at 16 Mbit/s -> 0.5 s.
    c = client_cost(TOY, flops=1e9, bytes_up=1_000_000, bytes_down=1_000_000)
    assert c.t_comp == pytest.approx(1.0)
    assert c.t_up == pytest.approx(1.0)
    assert c.t_down == pytest.approx(0.5)
    assert c.e_comp == pytest.approx(0.1)
    assert c.e_tx == pytest.approx(0.2)
    assert c.time_s == pytest.approx(2.5)
    assert c.energy_j == pytest.approx(0.3)


def test_cost_energy_scales_with_frequency_squared():
    # Twice the clock and FLOP/s: half the time, same cycles, 4x energy per cycle (f^2).
    fast = DeviceProfile("fast", 2e9, 1, 8, 16, 0.2, 2e9, 1e-28)
    c = client_cost(fast, 1e9, 0, 0)
    assert c.t_comp == pytest.approx(0.5)
    assert c.e_comp == pytest.approx(0.4)


def test_cost_addition_and_round_time():
    a = Cost(t_comp=1, t_up=2, t_down=3, e_comp=4, e_tx=5)
    b = Cost(t_comp=10, t_up=20, t_down=30, e_comp=40, e_tx=50)
    assert a + b == Cost(11, 22, 33, 44, 55)
    assert sum([a, b]) == Cost(11, 22, 33, 44, 55)
    assert (a + b).time_s == 66 and (a + b).energy_j == 99
    assert round_time([a, b, Cost(t_comp=7)]) == 60
    assert round_time([]) == 0.0
    with pytest.raises(ValueError):
        client_cost(TOY, -1, 0, 0)


# ---- memory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "bpp", "expected"),
    [
        # weights (1e6 + 1e4) * 4 = 4,040,000; grads 40,000; activations 1,000,000.
        ("adamw", 4, 4_040_000 + 40_000 + 80_000 + 1_000_000),  # state 2 * 1e4 * 4
        ("adam", 4, 5_160_000),
        ("sgd", 4, 4_040_000 + 40_000 + 0 + 1_000_000),
        ("sgd_momentum", 4, 4_040_000 + 40_000 + 40_000 + 1_000_000),
        # bf16 weights and grads, fp32 state: 2,020,000 + 20,000 + 80,000 + 1,000,000.
        ("adamw", 2, 3_120_000),
    ],
)
def test_training_memory_breakdown(optimizer, bpp, expected):
    got = estimate_training_memory(
        1_000_000, 10_000, optimizer=optimizer, activation_bytes=1_000_000, bytes_per_param=bpp
    )
    assert got == expected


def test_training_memory_unknown_optimizer():
    with pytest.raises(ConfigError, match="train.optimizer: unknown optimizer 'lion'"):
        estimate_training_memory(1, 1, optimizer="lion", activation_bytes=0)


def test_transformer_activation_bytes_hand_counts():
    # s=3, b=2, h=4, f=16: per layer 3*2*(8*4 + 2*16) = 384 elements; 5 layers, fp32 -> 7680 B.
    assert transformer_activation_bytes(2, 3, 4, 5) == 7680
    # f=8: 6 * (32 + 16) = 288 -> 288 * 5 * 4 = 5760.
    assert transformer_activation_bytes(2, 3, 4, 5, intermediate=8) == 5760
    # eager attention, a=2: + b*a*s^2 = 2*2*9 = 36 per layer -> 420 * 5 * 4 = 8400.
    assert transformer_activation_bytes(2, 3, 4, 5, n_heads=2) == 8400
    # fp16: half of 7680.
    assert transformer_activation_bytes(2, 3, 4, 5, bytes_per_el=2) == 3840


def test_fits_uses_mebibytes():
    assert fits(2**20, TOY)
    assert not fits(2**20 + 1, TOY)


def test_run_summary_reports_latency_and_energy_per_round():
    from hetfl.track.summary import summarize

    history = [{"round": 0, "eval_accuracy": 10.0},
               {"round": 1, "round_time_s": 1.0, "round_energy_j": 4.0},
               {"round": 2, "round_time_s": 3.0, "round_energy_j": 2.0, "eval_accuracy": 50.0,
                "sim_time_s": 4.0, "energy_j": 6.0}]
    s = summarize(history)
    assert (s["latency_s_per_round"], s["energy_j_per_round"]) == (2.0, 3.0)  # round 0 (evaluation only) excluded
    assert (s["sim_time_s"], s["energy_j"], s["final_quality"], s["base_quality"]) == (4.0, 6.0, 50.0, 10.0)
