"""The Flower backend: a real Flower run (SuperLink + 2 SuperNodes) equals the simulator, what it
refuses is refused in one line, and the core never imports flwr."""

import subprocess
import sys
import time

import pytest
import torch
from test_method_table import measured

from hetfl.cli.main import main
from hetfl.config import load_config
from hetfl.engine.api import Message
from hetfl.track.rundir import read_metrics

# FedIT (rank-2 LoRA on fc1) on the shipped synthetic MLP regression: 4 clients, 2 per round, 2
# rounds; stochastic 8-bit uplink and fp16 downlink, so the link's codecs are exercised too.
TINY = ["method.name=fedit", "rounds=2", "population.num_clients=4", "population.clients_per_round=2",
        "data.client_test_fraction=0", "data.clusters=1", "lora.targets=[fc1]", "lora.rank=2", "comm.up=sq8",
        "comm.down=fp16"]


def one_line_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_core_does_not_import_flwr():
    code = ("import sys; import hetfl.engine.loop, hetfl.runner, hetfl.cli.main, hetfl.cli.run, hetfl.flower, "
            "hetfl.flower.launch; print('flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_split_method_is_refused_in_one_line(capsys, tmp_path):
    code, err = one_line_error(["run", "split-vision", "--backend", "flower", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert "method.name: fedv makes per-batch server calls" in err and "--backend sim" in err
    assert not (tmp_path / "r").exists()


def test_missing_flwr_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` now raises ImportError
    sets = [arg for s in TINY for arg in ("--set", s)]
    args = ["run", "floral-synth-mlp", *sets, "--backend", "flower", "--out", str(tmp_path / "r")]
    code, err = one_line_error(args, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--backend flower needs the Flower package: pip install 'flwr==1.41.0'" in err


def test_resume_is_refused_on_flower(capsys, tmp_path):
    code, err = one_line_error(["run", "--resume", str(tmp_path), "--backend", "flower"], capsys)
    assert code == 2 and "--resume: resuming runs only on --backend sim" in err


def test_wire_round_trip_is_bit_exact():
    pytest.importorskip("flwr")
    from hetfl.flower.wire import CID, KNOBS, decode, encode

    tensors = {"b": torch.randn(3, 4).to(torch.bfloat16), "a": torch.randn(5), "idx": torch.arange(7).to(torch.uint8),
               "n": torch.tensor(-3), "empty": torch.zeros(0, 2), "t": torch.randn(4, 2).t()}  # t: not contiguous
    msg = Message(tensors, {"num_examples": 12, "train_loss": 0.1 + 0.2}, "update")
    back, fields = decode(encode(msg, {CID: 3, KNOBS: {"rank": 4}}))
    assert list(back.tensors) == list(tensors)  # the sender's order (stochastic codecs draw in it)
    for k, t in tensors.items():
        assert back.tensors[k].dtype == t.dtype and back.tensors[k].shape == t.shape and torch.equal(back.tensors[k], t)
    assert back.meta == msg.meta and back.kind == "update"
    assert fields == {CID: 3, KNOBS: {"rank": 4}}


def test_client_app_keeps_private_state_like_the_simulator():
    """Ditto's personal model (client state) persists in the node's Flower Context between rounds:
    after two rounds it equals the simulator's, which it would not if round 2 started afresh."""
    pytest.importorskip("flwr")
    from flwr.app import Context, Metadata, RecordDict
    from flwr.app import Message as FlowerMessage

    from hetfl.config import dump_config
    from hetfl.engine.link import Ledger, Link
    from hetfl.engine.loop import plan_population
    from hetfl.engine.sim import SimulatedBackend
    from hetfl.flower.apps import NODE_STATE, client_train
    from hetfl.flower.wire import CID, KNOBS, MEM, RC_CONFIG, RND, decode, encode, load_node_state
    from hetfl.runner import build_run

    cfg = load_config("floral-synth-mlp", [*TINY[1:], "method.name=ditto", "comm.up=fp32", "comm.down=fp32"])
    sc, method = build_run(cfg)
    state = method.setup(sc)
    knobs, mem = plan_population(method, sc)
    sim = SimulatedBackend(sc, method, Link("fp32", "fp32", Ledger(), cfg.seed))
    node = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={RC_CONFIG: dump_config(cfg)})
    c = 1
    for rnd in (1, 2):
        down = method.configure(state, rnd, [c])
        fields = {CID: c, RND: rnd, KNOBS: knobs[c], MEM: mem[c]}
        meta = Metadata(run_id=1, message_id=f"m{rnd}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id=str(rnd), created_at=time.time(), ttl=60.0, message_type="train")
        reply, nums = decode(client_train(FlowerMessage(metadata=meta, content=encode(down[c], fields)), node).content)
        replies, ctxs = sim.run_round(rnd, down, knobs, mem)
        assert reply.meta == replies[c].meta and nums["flops"] == ctxs[c].flops
        assert all(torch.equal(reply.tensors[k], t) for k, t in replies[c].tensors.items())
        state = method.aggregate(state, rnd, replies)
    kept = load_node_state(node.state[NODE_STATE])["clients"][c]["personal"]
    assert kept.keys() == sim.client_states[c]["personal"].keys()
    assert all(torch.equal(kept[k], t) for k, t in sim.client_states[c]["personal"].items())


def test_flower_run_equals_simulator(tmp_path, monkeypatch):
    """Bitwise, not approximately: the ClientApp builds the same model from the same seed, every
    client trains under the same (seed, round, client) seeds, and the link (codec draws, byte
    counts) runs on the server in both cases, so every number and file comes out identical.

    FLOP counting (the first step of each batch shape, per worker: the simulator's cache is shared
    by all clients, each SuperNode has its own) leaves a step's numbers unchanged (engine/flops.py)."""
    pytest.importorskip("flwr")
    from hetfl.flower.launch import run_flower
    from hetfl.runner import run_experiment

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the Flower processes use one thread, like this test process
    cfg = load_config("floral-synth-mlp", TINY)
    sim = run_experiment(cfg, tmp_path / "sim", report=False)
    seen = []
    flower = run_flower(cfg, tmp_path / "flower", supernodes=2, report=False, on_round=seen.append)
    assert [m["round"] for m in flower] == [1, 2] and seen == flower
    assert measured(flower) == measured(sim)  # losses, eval MSE, bytes per kind, FLOPs, simulated time, energy
    assert flower[0]["bytes_by_kind"] == sim[0]["bytes_by_kind"] and flower[1]["bytes_up"] > 0
    runs = (tmp_path / "flower" / "metrics.jsonl", tmp_path / "sim" / "metrics.jsonl")
    assert measured(read_metrics(runs[0])) == measured(read_metrics(runs[1]))  # wall-clock timings differ
    for name in ("clients.csv", "config.yaml", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "flower" / name).read_bytes() == (tmp_path / "sim" / name).read_bytes(), name
    assert (tmp_path / "flower" / "flower-logs" / "supernode1.log").exists()
