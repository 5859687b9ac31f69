"""The paper-shaped dry run: the whole DAG at 1024 px on a 2-node Ray cluster, as users run it.

A SAM ViT-B teacher from a checkpoint written by segment-anything's own builder (random
weights, so unofficial: allowed explicitly), 256x64x64 embeddings, both distillation phases and
the RPN on 2 Ray Train workers, one per node, checkpoints only through `storage_path`; one
training worker is killed (SIGKILL) during phase 2 and Ray Train restarts the worker group from
the latest checkpoint; the bundle is exported at 1024 with ONNX parity. The cluster's processes
are stopped by PID at the end.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

# Minutes of CPU (SAM ViT-B at 1024 on every teacher pass): its own CI step, `scripts/test.sh -m dryrun`.
pytestmark = [pytest.mark.dryrun, pytest.mark.timeout(2400)]

IMG = 1024


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def training_workers(raylets: set[int]) -> list[int]:
    """PIDs of the Ray Train worker processes of this test's cluster (children of its raylets;
    other Ray instances on the machine are left alone)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"RayTrainWorker" in cmdline and _parent(int(pid)) in raylets:
                found.append(int(pid))
        except OSError:
            continue
    return found


def kill_a_worker_once_phase2_checkpoints(storage: Path, raylets: set[int], stop: threading.Event,
                                          killed: list[int]) -> None:
    """Wait until Ray Train has registered phase 2's first checkpoint (its checkpoint manager's
    snapshot in the shared storage names one; a checkpoint directory alone may not be registered
    yet, and a retry would start from step 0), then SIGKILL one worker."""
    def registered() -> bool:
        for snapshot in storage.glob("prompt_kd-*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                    return True
            except (OSError, ValueError):  # being written
                continue
        return False

    while not stop.is_set():
        if registered() and (pids := training_workers(raylets)):
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    pids = [p.process.pid for node in cluster.list_all_nodes() for procs in node.all_processes.values() for p in procs]
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for pid in pids:  # every process the cluster started is gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"cluster process {pid} outlived the cluster")


def test_paper_shaped_dry_run_at_1024_on_two_nodes(cluster, tmp_path):
    from segment_anything import sam_model_registry

    from edgesam.artifacts import ArtifactStore
    from edgesam.config import load_profile
    from pipelines.stage import run_dag

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    shared = tmp_path / "shared"  # the one filesystem every node sees: storage and artifacts
    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)  # SAM's format, random weights
    train = {"epochs": 1, "batch_size": 1, "lr": 1e-4, "lr_ref_batch": 2, "warmup_steps": 1, "log_every": 1,
             "checkpoint_every": 1, "loader_workers": 0}
    cfg = load_profile("smoke", {
        "runtime": {"work_dir": str(shared / "runs"), "storage_path": str(shared / "ray"), "ray_address": cluster.address,
                    "num_workers": 2, "cpus_per_worker": 1, "max_failures": 1, "use_gpu": False},
        "data": {"num_train": 4, "num_val": 1, "images_per_tar": 4, "min_side": 320, "max_side": 480},
        "shard": {"target_size": IMG, "workers": 1},
        "teacher": {"kind": "vit_b", "checkpoint": str(checkpoint), "allow_unverified": True},
        "embed": {"batch_size": 1},
        "encoder_kd": {"eval_images": 1, "train": {**train, "max_steps": 2}},
        "prompt_kd": {"eval_images": 1, "max_prompts": 4, "train": {**train, "epochs": 2, "max_steps": 4}},  # 4 images / 2 workers: 2 steps per epoch
        "rpn": {"train": {**train, "max_steps": 2}},
        "evaluate": {"max_images": 1, "protocols": ["paper"], "refine_iters": 1, "overlay_images": 0,
                     "speed_repeats": 1},
        "export": {"latency_repeats": 1},
    })
    stop, killed = threading.Event(), []
    raylets = {p.process.pid for node in cluster.list_all_nodes() for p in node.all_processes["raylet"]}
    killer = threading.Thread(target=kill_a_worker_once_phase2_checkpoints, args=(shared / "ray", raylets, stop, killed))
    killer.start()
    try:
        results = run_dag(cfg, ArtifactStore(cfg.runtime.work_dir))
    finally:
        stop.set()
        killer.join()
    manifests = {name: artifact.manifest for name, (artifact, _) in results.items()}
    print("\nstage seconds:", json.dumps({name: m["seconds"] for name, m in manifests.items()}))
    assert killed, "no phase-2 worker was killed"
    assert manifests["prompt_kd"]["steps"] == 4 and manifests["prompt_kd"]["resumed_from_step"] >= 1
    assert manifests["teacher"]["img_size"] == IMG and manifests["embed"]["embedding_shape"] == [256, 64, 64]
    for name, file in (("encoder_kd", "student"), ("prompt_kd", "student"), ("rpn", "rpn")):
        assert (results[name][0].path / manifests[name][file]).is_file()  # back on the driver, via the checkpoint
    assert manifests["export"]["parity"]["passed"]
    config = json.loads((results["export"][0].path / "config.json").read_text())
    assert config["img_size"] == IMG
