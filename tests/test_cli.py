"""The command line: bad input gives one line and exit 2; run/report/compare/export/resume work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetfl.cli.main import main
from hetfl.track.rundir import read_metrics
from hetfl.track.walltime import without_walls

# A fast instruct scenario: few clients, few steps, tiny evaluation.
FAST = ["rounds=2", "population.num_clients=4", "population.clients_per_round=2", "train.local_steps=2",
        "train.batch_size=4", "data.samples_per_family=4", "data.eval_samples=6", "eval.max_new_tokens=4",
        "data.partition=iid"]


def sets(*items):
    out = []
    for it in items:
        out += ["--set", it]
    return out


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


BAD_INPUT = [
    (["run", "fedit-instruct", *sets("train.lrr=1")], "train.lrr: unknown key"),
    (["run", "fedit-instruct", *sets("rounds=abc")], "rounds: expected an integer"),
    (["run", "fedit-instruct", *sets("train.lr=-0.1")], "train.lr: must be > 0"),
    (["run", "fedit-instruct", *sets("population.clients_per_round=50")], "population.clients_per_round"),
    (["run", "fedit-instruct", *sets("method.name=fedfoo")], "method.name: unknown method 'fedfoo'"),
    (["run", "no-such-preset"], "no-such-preset: not a config file or a shipped preset"),
    (["run", "fedit-instruct", *sets("population.tiers={toaster: 1}")], "unknown device tier 'toaster'"),
    (["run", "fedit-instruct", *sets("lora.rank=100000")], "lora.rank: rank 100000 is larger than layer"),
    (["run", "fedit-instruct", *sets("comm.up=fp7")], "comm.up: unknown codec 'fp7'"),
    (["run", "fedit-instruct", *sets("model.name=gpt-17")], "model.name: unknown model 'gpt-17'"),
    (["validate", "fedit-instruct", *sets("eval.every=0")], "eval.every: must be >= 1"),
    (["report", "/nonexistent/run"], "not a run directory"),
    (["run", "--resume", "/nonexistent/run"], "no config.yaml"),
]


@pytest.mark.parametrize("args,msg", BAD_INPUT)
def test_bad_input_is_one_line_exit_2(args, msg, capsys, tmp_path):
    if args[0] == "run" and "--resume" not in args:
        args = [*args, "--out", str(tmp_path / "r")]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hetfl: error: ") and msg in lines[0], err
    assert "Traceback" not in err


def test_malformed_data_file_names_file_and_line(capsys, tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    code, _, err = run_cli(["run", "fedit-instruct", *sets(f"data.name={f}"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "data.jsonl:2" in err and "output" in err
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["run", "--bogus-flag"])
    assert e.value.code == 2


def test_run_writes_outputs_and_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["run", "fedit-instruct", *sets(*FAST), "--out", str(out)], capsys)
    assert code == 0, stdout
    for f in ("config.yaml", "metrics.jsonl", "clients.csv", "report.md", "quality.png", "checkpoints/last.pt",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / f).exists(), f
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("train_loss", "bytes_up", "bytes_down", "sim_time_s", "energy_j", "client_mem_peak_mb", "eval_rougeL"):
        assert key in rows[-1]
    for r in (rows[0], rows[2]):  # every evaluation (eval.every 2) says how many prompts it scored, per family too
        assert r["eval_n"] == 6 and sum(r["eval_n_by_family"].values()) == 6
        assert set(r["eval_rougeL_by_family"]) == set(r["eval_n_by_family"])
    assert "## Rouge-L per task family" in (out / "report.md").read_text()
    before = (out / "metrics.jsonl").read_text()
    code, _, err = run_cli(["run", "fedit-instruct", *sets(*FAST), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost
    # export to PEFT format from the run directory
    code, _, _ = run_cli(["export", str(out), "--peft", str(tmp_path / "peft")], capsys)
    assert code == 0 and (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_compare_writes_one_row_per_method(capsys, tmp_path):
    code, stdout, _ = run_cli(["compare", "fedit-instruct", "--methods", "fedit,fedavg-full", *sets(*FAST, "rounds=1"),
                               "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0
    lines = (tmp_path / "cmp" / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("run,method,") and len(lines) == 3
    assert {ln.split(",")[1] for ln in lines[1:]} == {"fedit", "fedavg-full"}
    assert (tmp_path / "cmp" / "compare.png").exists()


def test_list_and_validate(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0 and "fedit" in out and "fedit-instruct" in out and "phone-low" in out
    code, out, _ = run_cli(["validate", "fedit-instruct"], capsys)
    assert code == 0 and out.startswith("ok:")


def _cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hetfl", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _metrics(path: Path):
    return without_walls(read_metrics(path))


def test_resume_after_kill_gives_identical_metrics(tmp_path):
    args = sets(*FAST, "rounds=5", "eval.every=2")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p = _cli(["run", "fedit-instruct", *args, "--out", str(ref)])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    # Kill the second run once round 2 is checkpointed and round 3 is under way.
    p = _cli(["run", "fedit-instruct", *args, "--out", str(killed)])
    deadline = time.time() + 600
    while time.time() < deadline:
        rows = read_metrics(killed / "metrics.jsonl") if (killed / "metrics.jsonl").exists() else []
        if rows and rows[-1]["round"] >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(read_metrics(killed / "metrics.jsonl")) < 6  # really interrupted
    q = _cli(["run", "--resume", str(killed)])
    assert q.wait(timeout=600) == 0, q.stderr.read()
    assert _metrics(killed / "metrics.jsonl") == _metrics(ref / "metrics.jsonl")
    assert (killed / "clients.csv").read_text() == (ref / "clients.csv").read_text()


def test_metrics_jsonl_is_valid_json_lines(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(["run", "fedit-instruct", *sets(*FAST, "rounds=1"), "--out", str(out)], capsys)[0] == 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_local_hf_model_and_local_instruction_file_run_end_to_end(tmp_path, capsys):
    """A user's own Hugging Face folder and Alpaca-style JSONL go through the same code path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetfl.models.builders import load_causal_lm

    _, tok = load_causal_lm("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "my-model")
    tok.save_pretrained(tmp_path / "my-model")
    rows = [{"instruction": f"Say {w}", "input": "", "output": w, "category": c}
            for c in ("echo", "shout") for w in ("red", "blue", "green", "black", "white", "pink", "gold", "grey")]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["run", "fedit-instruct", *sets(*FAST, f"model.name={tmp_path / 'my-model'}",
                                                       f"data.name={data}", "data.eval_categories=[shout]"),
                            "--out", str(out)], capsys)
    assert code == 0, err
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["round"] == 2 and "eval_rougeL" in rows[-1]
    # LoRA r=8 on q,k,v,o (all 32x32) in 2 layers: 8 modules x (A 8x32 + B 32x8) = 4096 floats per client.
    assert rows[1]["bytes_down"] == 2 * 4096 * 4  # two clients per round, fp32
