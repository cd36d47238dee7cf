"""Natural Instructions task-file loader on tiny files written by the test."""

from __future__ import annotations

import json

import pytest

from hetfl.data.instruct import Example, prompt_of
from hetfl.data.natural_instructions import load_ni_task, load_ni_tasks
from hetfl.errors import DataError


def write_task(path, definition, instances):
    path.write_text(json.dumps({"Definition": definition, "Categories": ["Misc"], "Instances": instances}))
    return path


def test_task_file_maps_to_examples_and_alpaca_prompt(tmp_path):
    f = write_task(tmp_path / "task001_add.json", ["Add the two numbers."],
                   [{"id": "a", "input": "2 + 3", "output": ["5", "five"]}, {"input": "1 + 1", "output": ["2"]}])
    rows = load_ni_task(f)
    assert rows == [Example("Add the two numbers.", "2 + 3", "5", "task001_add"),
                    Example("Add the two numbers.", "1 + 1", "2", "task001_add")]
    assert prompt_of(rows[0]) == "### Instruction:\nAdd the two numbers.\n\n### Input:\n2 + 3\n\n### Response:\n"


@pytest.mark.parametrize("content,match", [
    ("{not json", r"task9\.json:1: invalid JSON"),
    (json.dumps([1, 2]), r"task9\.json: expected a JSON object"),
    (json.dumps({"Instances": []}), r"task9\.json: missing key 'Definition'"),
    (json.dumps({"Definition": ["d"], "Instances": {}}), r"task9\.json: 'Instances' must be a list"),
    (json.dumps({"Definition": ["d"], "Instances": [{"input": "x", "output": ["y"]}, {"input": "x"}]}),
     r"task9\.json: Instances\[1\]: missing key 'output'"),
    (json.dumps({"Definition": ["d"], "Instances": [{"input": 3, "output": ["y"]}]}),
     r"task9\.json: Instances\[0\]: 'input' must be a string"),
    (json.dumps({"Definition": ["d"], "Instances": [{"input": "x", "output": []}]}),
     r"task9\.json: Instances\[0\]: 'output' must be a string or a non-empty list"),
    (json.dumps({"Definition": [""], "Instances": []}), r"task9\.json: empty 'Definition'"),
])
def test_malformed_files_name_file_and_instance(tmp_path, content, match):
    f = tmp_path / "task9.json"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_ni_task(f)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="task file not found"):
        load_ni_task(tmp_path / "nope.json")


def test_preprocessing_filters_long_inputs_small_tasks_and_samples_a_fifth(tmp_path):
    big = write_task(tmp_path / "task1_big.json", "Echo.",
                     [{"input": f"x{i}", "output": [f"y{i}"]} for i in range(30)]
                     + [{"input": "z" * 1024, "output": ["long"]}])  # too long: dropped before counting
    small = write_task(tmp_path / "task2_small.json", "Echo.",
                       [{"input": f"x{i}", "output": [f"y{i}"]} for i in range(19)])  # < 20: dropped
    rows = load_ni_tasks([big, small], seed=0)
    assert len(rows) == 6 and {r.category for r in rows} == {"task1_big"}  # int(30 * 0.2)
    assert all(r.output == "y" + r.input[1:] for r in rows)
    assert [r.input for r in rows] == sorted((r.input for r in rows), key=lambda s: int(s[1:]))  # file order
    assert rows == load_ni_tasks([big, small], seed=0)


def test_a_folder_of_task_files_is_a_dataset_with_held_out_tasks(tmp_path):
    """`data.name: <folder>` loads every task file (FedHDS preprocessing: 20% of each task's
    instances), one category per task; `data.eval_categories` holds whole tasks out."""
    from hetfl.config import load_config
    from hetfl.scenario import build_scenario

    for t in range(3):
        write_task(tmp_path / f"task00{t}_x.json", [f"Definition {t}."],
                   [{"input": f"in {t} {i}", "output": [f"out {i}"]} for i in range(25)])
    cfg = load_config({
        "model": {"name": "tiny-llama-random"},
        "data": {"name": str(tmp_path), "eval_categories": ["task002_x"], "partition": "task-per-client",
                 "eval_samples": 10},
        "population": {"num_clients": 2, "clients_per_round": 1},
    })
    sc = build_scenario(cfg)
    assert sc.categories == ["task000_x", "task001_x"]
    assert sorted(len(d) for d in sc.client_data) == [5, 5]  # 20% of 25 per task, one task per client
    assert [e.category for e in sc.task.eval_examples] == ["task002_x"] * 5  # its 5 sampled instances


def test_a_folder_without_task_files_is_one_line_error(tmp_path):
    from hetfl.config import load_config
    from hetfl.scenario import build_scenario

    with pytest.raises(DataError, match=r"no Natural Instructions task files"):
        build_scenario(load_config({"model": {"name": "tiny-llama-random"}, "data": {"name": str(tmp_path)}}))
