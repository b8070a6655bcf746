"""torchrun + DDP on the CPU (Gloo): two ranks, on one node or on two, train one model and count
every val image once."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastkd.logging import read_metrics

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(torchrun: str, config: Path, nodes: int) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks: one node running 2 processes, or 2 nodes (on this machine) running 1 each.

    The two-node launch is what a multi-node job looks like to each process: LOCAL_RANK is 0
    on both, RANK and the node rank tell them apart, and they meet at MASTER_ADDR:MASTER_PORT.
    """
    train = ["-m", "fastkd.train", "--config", str(config)]
    if nodes == 1:
        command = [torchrun, "--nproc_per_node", "2", *train]
        return [subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)]
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                *train,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        for node in (1, 0)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2], ids=["1node_x2", "2nodes_x1"])
def test_torchrun_two_ranks(nodes, tiny_imagefolder, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"dir": str(tmp_path / "run")},
                "data": {"root": str(tiny_imagefolder), "image_size": 32, "val_resize": 36,
                         "batch_size": 4, "val_batch_size": 3, "workers": 1},
                "teacher": {"arch": "resnet18", "weights": "random"},
                "student": {"arch": "resnet18"},
                "loss": {"kind": "wsld"},
                "train": {"epochs": 2, "compile": False, "log_every": 1, "device": "cpu",
                          "profile": True, "profile_skip": 1, "profile_steps": 1},
            }
        )
    )  # fmt: skip
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    for result in _launch(torchrun, config, nodes):
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["num_val_images"] == 20  # 10 + 10 across the ranks, none twice, none missing
    epochs = [r for r in read_metrics(tmp_path / "run") if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]  # only rank 0 writes
    # 24 training images, 2 ranks x batch 4: 3 full steps per rank per epoch.
    assert read_metrics(tmp_path / "run")[0]["steps_per_epoch"] == 3
    # train.profile: each rank writes its own trace and tables; one profile record (rank 0).
    profile = tmp_path / "run" / "profile"
    for rank in (0, 1):
        for name in (f"trace_rank{rank}.json", f"ops_rank{rank}.json", f"ops_rank{rank}.txt"):
            assert (profile / name).is_file(), name
    profiles = [r for r in read_metrics(tmp_path / "run") if r["event"] == "profile"]
    assert len(profiles) == 1 and profiles[0]["steps"] == 1
    # Both ranks trained the same replica: the exported weights load and are finite.
    state = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
