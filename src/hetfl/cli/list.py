"""hetfl list: methods, presets, codecs and device tiers."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list methods, presets, codecs and device tiers")
    p.add_argument("--devices-file", help="a device-tier YAML to list instead of the shipped one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hetfl.config import preset_names, read_yaml, resolve_preset
    from hetfl.registry import CODECS, METHODS
    from hetfl.system.devices import load_server, load_tiers

    con = Console(width=max(120, Console().width))  # wide enough that names are never elided
    t = Table(title="methods")
    t.add_column("name")
    t.add_column("what it does")
    for n in METHODS.names():
        t.add_row(n, METHODS.get(n).summary)
    con.print(t)
    t = Table(title="presets")
    t.add_column("name")
    t.add_column("method")
    t.add_column("what it runs")
    for n in preset_names():
        raw = read_yaml(resolve_preset(n))
        t.add_row(n, str(raw.get("method", {}).get("name", "fedit")), str(raw.get("description", "")))
    con.print(t)
    from hetfl.comm.codecs import QUANT_NAMES

    con.print("codecs: " + ", ".join(CODECS.names()) + ", " + QUANT_NAMES)
    t = Table(title="device tiers")
    for col in ("tier", "GFLOP/s", "memory MB", "up Mbit/s", "down Mbit/s", "tx W", "CPU GHz", "kappa"):
        t.add_column(col)
    for name, d in load_tiers(args.devices_file).items():
        t.add_row(name, f"{d.flops_per_s / 1e9:g}", f"{d.mem_mb:g}", f"{d.up_mbps:g}", f"{d.down_mbps:g}",
                  f"{d.tx_power_w:g}", f"{d.cpu_hz / 1e9:g}", f"{d.kappa:g}")
    con.print(t)
    con.print(f"server (split methods): {load_server(args.devices_file).flops_per_s / 1e9:g} GFLOP/s")
    return 0
