"""`Method.payload` of the parameter-averaging methods: the analytic bytes of each client's
messages equal what the link measured, over two rounds, on the wide toy (LoRA only) and on a
digits classifier (LoRA plus a dense head)."""

import csv
import json

import pytest
from wide_toy import wide_config, wide_scenario

from hetfl.config import load_config
from hetfl.engine.api import TRAIN_LOSS
from hetfl.engine.loop import run_rounds
from hetfl.methods.common import TYPICAL_LOSS
from hetfl.runner import build_method
from hetfl.scenario import build_scenario
from hetfl.track.rundir import RunDir

METHODS = ["fedit", "fedavg-full", "ditto", "fslora", "heterolora", "flexlora", "flora-stack"]


def wide(name):
    cfg = wide_config(f"method.name={name}", "rounds=2")
    return cfg, wide_scenario(cfg)


def digits(name):
    method = {"name": name, "ratios": [0.25, 0.5]} if name in ("fslora", "heterolora", "flexlora", "flora-stack") \
        else {"name": name}
    cfg = load_config({
        "seed": 2, "rounds": 2, "model": {"name": "mlp"},
        "data": {"name": "digits", "samples_per_family": 8, "eval_samples": 50, "partition": "iid"},
        "lora": {"rank": 4, "alpha": 4, "targets": ["fc"]},
        "train": {"optimizer": "sgd", "lr": 0.1, "local_steps": 2, "batch_size": 4},
        "method": method,
        "population": {"num_clients": 4, "clients_per_round": 2, "tiers": {"laptop": 1}},
        "eval": {"at_start": False},
    })
    return cfg, build_scenario(cfg)


@pytest.mark.parametrize("build", [wide, digits])
@pytest.mark.parametrize("name", METHODS)
def test_payload_is_what_the_link_measures(name, build, tmp_path):
    cfg, sc = build(name)
    method = build_method(cfg)
    expected, losses = {}, {}
    configure, client_update = method.configure, method.client_update

    def record_payload(state, rnd, cids):  # from the state the round's messages are built from
        for cid in cids:
            expected[rnd, cid] = method.payload(state, rnd, cid, len(sc.client_data[cid]))
        return configure(state, rnd, cids)

    def record_loss(msg, ctx):
        reply = client_update(msg, ctx)
        losses[ctx.rnd, ctx.cid] = reply.meta[TRAIN_LOSS]
        return reply

    method.configure, method.client_update = record_payload, record_loss
    run_rounds(sc, method, RunDir(tmp_path / "r"))
    rows = list(csv.DictReader(open(tmp_path / "r" / "clients.csv")))
    assert len(rows) == 2 * cfg.population.clients_per_round
    for r in rows:
        key = int(r["round"]), int(r["client"])
        down, up = expected[key]
        # payload counts the loss as an 18-character float; the real one may print longer or shorter
        up += len(json.dumps(losses[key])) - len(json.dumps(TYPICAL_LOSS))
        assert (int(r["bytes_down"]), int(r["bytes_up"])) == (down, up), key
