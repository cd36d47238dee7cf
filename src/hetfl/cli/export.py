"""hetfl export DIR --peft OUT: write a run's final adapter in PEFT's format."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's trained adapter (PEFT format)")
    p.add_argument("run_dir")
    p.add_argument("--peft", required=True, metavar="OUT", help="folder for adapter_config.json + adapter_model.safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetfl.config import load_config
    from hetfl.errors import ConfigError
    from hetfl.models.lora import lora_modules
    from hetfl.runner import build_method
    from hetfl.scenario import build_scenario
    from hetfl.track.rundir import RunDir

    d = Path(args.run_dir)
    if not (d / "config.yaml").is_file():
        raise ConfigError(f"{d}: not a run directory (no config.yaml)")
    cfg = load_config(d / "config.yaml")
    ckpt = RunDir(d, mode="resume").checkpoint_payload()
    scenario = build_scenario(cfg)
    method = build_method(cfg)
    method.setup(scenario)  # builds the adapter structure; the weights come from the checkpoint
    model = method.eval_model(ckpt["state"])
    if not lora_modules(model):
        raise ConfigError(f"{d}: method {cfg.method.name!r} trains no LoRA adapter; nothing to export in PEFT format")
    from hetfl.models.lora import save_peft_adapter

    save_peft_adapter(model, args.peft, base_model_name_or_path=cfg.model.name, alpha=cfg.lora.alpha)
    print(f"wrote {args.peft}/adapter_config.json and adapter_model.safetensors (round {ckpt['round']})")
    return 0
