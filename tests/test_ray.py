"""--backend ray (engine/ray_pool.py): the simulator's workers as Ray actors on a 2-node cluster
on localhost give the local simulator's results; a dead actor is reported and the run resumes.

Skipped without the optional `ray` package (make setup-ray)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from test_method_table import table_config  # noqa: E402
from test_workers import THREE, assert_same_run, run  # noqa: E402

from hetfl.engine.loop import run_rounds  # noqa: E402
from hetfl.engine.ray_pool import RayPool  # noqa: E402
from hetfl.engine.sim import SimulatedBackend  # noqa: E402
from hetfl.engine.workers import WorkerError  # noqa: E402
from hetfl.runner import build_run  # noqa: E402
from hetfl.track.rundir import RunDir, read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node on this machine, one CPU each: two actors, one per node."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.mark.parametrize("name", ["fslora", "floral", "ditto"])
def test_ray_cluster_gives_the_local_results(name, cluster, tmp_path):
    cfg = table_config(name, *THREE)
    run(cfg, tmp_path / "local", 1)
    run_experiment_ray(cfg, tmp_path / "ray", cluster.address)
    assert_same_run(tmp_path / "local", tmp_path / "ray")


def run_experiment_ray(cfg, path, address, **kw):
    from hetfl.runner import run_experiment

    return run_experiment(cfg, path, report=False, workers=0, ray=address, **kw)  # 0: one actor per CPU


def test_pool_takes_one_actor_per_cluster_cpu_and_spreads_them_over_the_nodes(cluster):
    pool = RayPool(table_config("fedit"), 0, build_run, address=cluster.address)
    try:
        assert pool.n == 2
        nodes = {ray.get(a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
                 for a in pool.actors}
        assert len(nodes) == 2  # one CPU per node: the two actors cannot share one
    finally:
        pool.close()


def test_a_killed_actor_names_client_and_round_and_the_run_resumes(cluster, tmp_path):
    cfg = table_config("ditto", *THREE, "rounds=3")
    run(cfg, tmp_path / "ref", 1)
    sc, method = build_run(cfg)
    backend: list[SimulatedBackend] = []

    def make(s, m, link, sel):
        backend.append(SimulatedBackend(s, m, link, selector=sel, workers=0, build=build_run,
                                        pool=lambda c, n, b: RayPool(c, n, b, address=cluster.address)))
        return backend[0]

    def kill_in_round_2(rnd, done, total):
        if rnd == 2 and done == 0:
            ray.kill(backend[0].pool.actors[0])

    out = tmp_path / "killed"
    with pytest.raises(WorkerError, match=r"Ray worker 0 died while training client \d+ in round 2 .*--resume"):
        run_rounds(sc, method, RunDir(out), backend=make, on_client=kill_in_round_2)
    assert [m["round"] for m in read_metrics(out / "metrics.jsonl")] == [1]
    run_experiment_ray(cfg, out, cluster.address, resume=True)
    assert_same_run(tmp_path / "ref", out)
