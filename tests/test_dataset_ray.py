"""`altclip embed -o DIR/ --ray`: a local Ray and a two-node cluster on this machine fill the same
dataset as one process does, bit for bit, also when an actor is killed in the middle of a part."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_cli import invoke, write_image
from test_dataset import BASE, _assert_merge_equals_single
from test_dataset import _single as _single_run

ray = pytest.importorskip("ray")
TESTS = str(Path(__file__).resolve().parent)


def _runtime_env(tmp: Path) -> dict:
    """Workers with the tests' hook, caches of their own and no network, as the tests' driver."""
    return {"worker_process_setup_hook": "embedhooks.ray_worker_setup",
            "env_vars": {"PYTHONPATH": TESTS, "ALTCLIP_HOME": str(tmp / "altclip"), "HF_HOME": str(tmp / "hf"),
                         "HF_HUB_OFFLINE": "1", "ALTCLIP_TEST_KILL_TRIGGER": str(tmp / "kill-one-actor")}}


def _single(model, *extra, **kwargs):
    """The one-process reference, with the actors' one torch thread (Ray sets OMP_NUM_THREADS to
    an actor's CPUs): on the CPU the thread count changes the last bits of some rows."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _single_run(model, *extra, **kwargs)
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    # 2 CPUs, actors of 1 CPU each: never every CPU taken by one actor (ray-project/ray#44687).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=_runtime_env(tmp))
    yield tmp
    ray.shutdown()


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        write_image(folder / f"p{i:02d}.png", 100 + i, size=(40 + i, 32))
    (folder / "p07.png").write_text("not an image")
    return folder


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ray_actors_fill_the_dataset_as_one_process(local_ray, photos, model, workers):
    _single(model)
    result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8",
                    "--workers", workers, "--ray")
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.splitlines()
    assert f"Ray: 4 parts for {workers} actor{'s' if workers == '2' else ''} (0 GPU, 1 CPU each)" in lines
    assert "error: imgs/p07.png: not an image, or in a format Pillow cannot read" in lines
    assert "warning: 1 of 30 inputs failed" in lines
    _assert_merge_equals_single()


def test_texts_with_ray(local_ray, tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    Path("t.txt").write_text("".join(f"line {i} " + "x " * (i % 5) + "\n" for i in range(21)))
    _single(model, inputs=("--text", "t.txt"))
    result = invoke("embed", "--text", "t.txt", "-o", "ds/", "-m", model, *BASE, "--part-size", "8", "--ray")
    assert result.exit_code == 0, result.stderr
    _assert_merge_equals_single()


def test_an_actor_killed_in_a_part_is_replaced_and_the_part_redone(local_ray, photos, model):
    _single(model)
    trigger = local_ray / "kill-one-actor"
    trigger.write_text("")
    result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8",
                    "--workers", "1", "--ray")
    assert not trigger.exists()  # an actor did die in the middle of a part
    assert result.exit_code == 3, result.stderr
    assert not [p for p in os.listdir("ds") if p.startswith(".")]  # the dead actor's staging removed
    _assert_merge_equals_single()


def test_resume_with_ray_skips_the_parts_done_and_other_settings_are_refused(local_ray, photos, model):
    assert invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8",
                  "--shard", "1/2").exit_code == 0
    refused = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, "-b", "4", "--precision", "bf16",
                     "--ray", "--resume")
    assert refused.exit_code == 1
    assert "error: cannot resume: the earlier run used precision 'fp32', this one 'bf16'" in refused.stderr
    resumed = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--resume", "--ray")
    assert resumed.exit_code == 3, resumed.stderr
    assert "Ray: 2 parts for 1 actor (0 GPU, 1 CPU each)" in resumed.stderr
    assert "wrote 2 parts to" in resumed.stderr and "(4 of 4 parts of this run complete, 29 rows)" in resumed.stderr


def test_gpus_asked_of_a_cluster_without_them_is_an_error_not_a_hang(local_ray, photos, model):
    result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--gpus-per-worker", "1", "--ray")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-2:] == [
        "error: --gpus-per-worker 1: the Ray cluster has no GPUs",
        "hint: leave out --gpus-per-worker (or give 0) to embed on the CPUs"]


def test_two_nodes_write_one_dataset_in_a_shared_folder(photos, model, tmp_path):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the module's local Ray, if an earlier test started it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=_runtime_env(tmp_path))
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        _single(model)
        shared = tmp_path / "shared"
        shared.mkdir()
        result = invoke("embed", "--image", "imgs", "-o", f"{shared}/ds/", "-m", model, *BASE, "--part-size", "4",
                        "--workers", "2", "--ray")
        assert result.exit_code == 3, result.stderr
        writers = {json.loads((shared / "ds" / f"part-{p:05d}.done").read_text())["writer"] for p in range(8)}
        assert len(writers) == 2  # an actor on each node (1 CPU each) wrote parts
        _assert_merge_equals_single(str(shared / "ds"))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_without_ray_installed_the_hint_says_how(photos, model, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--ray")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: --ray needs Ray (with Ray Data), which is not installed",
                                          "hint: pip install 'altclip[ray]'"]



def test_resume_with_ray_of_a_complete_dataset_has_nothing_to_do_and_starts_no_ray(photos, model, monkeypatch):
    (photos / "p07.png").unlink()  # every input an image: the finished run exits 0
    done = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8")
    assert done.exit_code == 0, done.stderr
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--resume", "--ray")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert f"{Path('ds').resolve()}: every part is already complete: nothing to do" in lines
    assert not any(line.startswith("Ray:") for line in lines)
