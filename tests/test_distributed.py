"""torchrun + DDP on the CPU (Gloo): two ranks, on one node or on two, train one model and count
every val image once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from PIL import Image

from fastkd.logging import read_metrics

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(
    torchrun: str,
    config: Path,
    nodes: int,
    node_overrides: tuple[list[str], ...] = ([], []),
    module: tuple[str, ...] = ("fastkd.train",),
    env: dict[str, str] | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks: one node running 2 processes, or 2 nodes (on this machine) running 1 each.

    The two-node launch is what a multi-node job looks like to each process: LOCAL_RANK is 0
    on both, RANK and the node rank tell them apart, and they meet at MASTER_ADDR:MASTER_PORT.
    ``node_overrides[n]``: config overrides for node n only (two-node launch). ``module``: the
    module to run and its arguments before ``--config``. ``env``: extra environment variables.
    """
    train = ["-m", *module, "--config", str(config)]
    env = {**os.environ, **(env or {})}
    if nodes == 1:
        command = [torchrun, "--nproc_per_node", "2", *train]
        return [
            subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
        ]
    port = str(_free_port())
    procs = {}
    for node in (1, 0):
        node_args = ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node)]
        address = ["--master_addr", "127.0.0.1", "--master_port", port]
        command = [torchrun, *node_args, *address, *train, *node_overrides[node]]
        procs[node] = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env
        )
    results = []
    for node in (0, 1):
        try:
            out, err = procs[node].communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for proc in procs.values():
                proc.kill()
            raise
        results.append(
            subprocess.CompletedProcess(procs[node].args, procs[node].returncode, out, err)
        )
    return results


def _write_config(tmp_path: Path, root: Path, run_dir: Path, loss: str, **train) -> Path:
    """A small CPU config for torchrun runs; ``train`` adds train.* keys."""
    config = tmp_path / "ddp.yaml"
    tree = {
        "run": {"dir": str(run_dir)},
        "data": {
            "root": str(root),
            "image_size": 32,
            "val_resize": 36,
            "batch_size": 4,
            "val_batch_size": 3,
            "workers": 1,
        },
        "teacher": {"arch": "resnet18", "weights": "random"},
        "student": {"arch": "resnet18"},
        "loss": {"kind": loss},
        "train": {"epochs": 1, "compile": False, "device": "cpu", **train},
    }
    config.write_text(yaml.safe_dump(tree))
    return config


def _torchrun() -> str:
    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2], ids=["1node_x2", "2nodes_x1"])
def test_torchrun_two_ranks(nodes, tiny_imagefolder, tmp_path):
    config = _write_config(
        tmp_path,
        tiny_imagefolder,
        tmp_path / "run",
        "wsld",
        epochs=2,
        log_every=1,
        profile={"enabled": True, "skip": 1, "steps": 1},
    )
    torchrun = _torchrun()
    scans = tmp_path / "scans.log"
    for result in _launch(torchrun, config, nodes, env=_scan_probe(scans)):
        assert result.returncode == 0, result.stderr[-3000:]
    # One walk and pre-scan of data.root per run, on rank 0; the other rank received its
    # result, and on a node of its own it walked (never pre-scanned) its copy to check it.
    expected = ["0 prescan 24", "0 prescan 20", "0 walk train", "0 walk val"]
    expected += ["1 walk train", "1 walk val"] if nodes == 2 else []
    assert sorted(scans.read_text().splitlines()) == sorted(expected)
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


def _scan_probe(log: Path) -> dict[str, str]:
    """Environment that makes every launched process record its data scans in ``log``."""
    probe = str(Path(__file__).resolve().parent / "scan_probe")
    path = os.pathsep.join([probe, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "FASTKD_TEST_SCAN_LOG": str(log)}


@pytest.mark.slow
def test_nodes_with_their_own_data_copies(tiny_imagefolder, tmp_path):
    """Node 1 keeps its copy under another path: it trains on rank 0's file list there. A copy
    that lacks files, or a node launched with another batch size, stops both nodes at setup
    with one error saying what differs, instead of failing or hanging later."""
    config = _write_config(tmp_path, tiny_imagefolder, tmp_path / "run", "ce")
    local = shutil.copytree(tiny_imagefolder, tmp_path / "node1-disk" / "data")
    node0, node1 = _launch(_torchrun(), config, 2, ([], [f"data.root={local}"]))
    assert node0.returncode == 0 and node1.returncode == 0, node1.stderr[-3000:]

    train_dir = local / "train" / sorted(os.listdir(local / "train"))[1]
    (train_dir / sorted(os.listdir(train_dir))[0]).unlink()
    other_run = f"run.dir={tmp_path / 'b'}"
    node0, node1 = _launch(_torchrun(), config, 2, ([other_run], [other_run, f"data.root={local}"]))
    assert node0.returncode != 0 and node1.returncode != 0, node0.stderr[-2000:]
    assert "train files that rank 0 scanned are missing under" in node1.stderr, node1.stderr[-3000:]
    assert "rank(s) 1 failed while reading data.root" in node0.stderr, node0.stderr[-3000:]

    other_run = f"run.dir={tmp_path / 'c'}"
    node0, node1 = _launch(_torchrun(), config, 2, ([other_run], [other_run, "data.batch_size=2"]))
    for result in (node0, node1):
        assert result.returncode != 0, result.stderr[-3000:]
        assert "the ranks disagree about the data" in result.stderr, result.stderr[-3000:]
        assert "steps per epoch (rank 0: 3, rank 1: 6)" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "c" / "last.pt").exists()


def _finished_run(tmp_path: Path, root: Path) -> Path:
    """A one-epoch single-process run in tmp_path/node0 (its last.pt); returns its config."""
    config = _write_config(tmp_path, root, tmp_path / "node0", "ce")
    first = subprocess.run(
        [sys.executable, "-m", "fastkd.train", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "node0" / "last.pt").is_file()
    return config


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["auto", "unset"])
def test_nodes_that_see_different_run_dirs_fail_clearly(resume, tiny_imagefolder, tmp_path):
    """A run.dir that is not shared between nodes: node 0 finds a finished epoch there, node 1
    an empty folder. With run.resume=auto node 0 would resume and node 1 start over (ranks
    training different epochs, then waiting for each other); without it node 0 would refuse
    and node 1 wait for it. Both must instead stop at once with the same clear error."""
    config = _finished_run(tmp_path, tiny_imagefolder)
    torchrun = _torchrun()
    common = ["train.epochs=2"] + (["run.resume=auto"] if resume == "auto" else [])
    node_overrides = ([*common], [*common, f"run.dir={tmp_path / 'node1'}"])
    results = _launch(torchrun, config, 2, node_overrides)
    for node, result in enumerate(results):
        assert result.returncode != 0, f"node {node} went on:\n{result.stderr[-3000:]}"
        assert "fastkd: error: the ranks disagree about run.dir" in result.stderr, result.stderr[
            -3000:
        ]
    assert "rank 1 starts a new run" in results[1].stderr
    mine = "resumes from" if resume == "auto" else "refuses to start (run.dir="
    assert f"rank 0 {mine}" in results[0].stderr
    assert not (tmp_path / "node1").exists()  # nothing was written on the disagreeing node


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "step", "own_error"),
    [
        ("data.root={missing}", "reading data.root", "does not exist or is not a folder"),
        ("teacher.weights={missing}/t.pt", "loading the models", "t.pt"),
    ],
    ids=["data", "teacher"],
)
def test_a_path_missing_on_one_node_stops_every_node(
    override, step, own_error, tiny_imagefolder, tmp_path
):
    """Node-local copies of the data or weights, missing on node 1 only: node 1 reports its own
    error and node 0 says which rank failed, at once, instead of waiting in DDP's first
    broadcast until a collective timeout."""
    config = _write_config(tmp_path, tiny_imagefolder, tmp_path / "run", "wsld")
    torchrun = _torchrun()
    missing = override.format(missing=tmp_path / "not-on-this-node")
    node0, node1 = _launch(torchrun, config, 2, ([], [missing]))
    assert node1.returncode != 0 and node0.returncode != 0, node0.stderr[-2000:]
    assert "fastkd: error:" in node1.stderr and own_error in node1.stderr, node1.stderr[-3000:]
    expected = f"fastkd: error: rank(s) 1 failed while {step}"
    assert expected in node0.stderr, node0.stderr[-3000:]
    assert "rank 0 stops too" in node0.stderr


@pytest.mark.slow
def test_a_checkpoint_unreadable_on_one_node_stops_every_node(tiny_imagefolder, tmp_path):
    """Both nodes resume from a checkpoint path that exists on both, but node 1's copy is
    truncated: it fails while loading (after DDP is built), and node 0 must not wait for it."""
    config = _finished_run(tmp_path, tiny_imagefolder)
    good = tmp_path / "node0" / "last.pt"
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    resumed = [f"run.dir={tmp_path / 'resumed'}", "train.epochs=2"]
    node0, node1 = _launch(
        _torchrun(), config, 2, ([*resumed, f"run.resume={good}"], [*resumed, f"run.resume={bad}"])
    )
    assert node0.returncode != 0 and node1.returncode != 0, node0.stderr[-2000:]
    assert "cannot be read as a checkpoint" in node1.stderr, node1.stderr[-3000:]
    expected = f"fastkd: error: rank(s) 1 failed while loading the checkpoint {good}"
    assert expected in node0.stderr, node0.stderr[-3000:]


@pytest.mark.slow
def test_eval_with_data_missing_on_one_node_stops_every_node(tiny_imagefolder, tmp_path):
    """``python -m fastkd.eval`` under torchrun: node 1 has no data copy. Both stop at once."""
    weights = tmp_path / "student.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), weights)
    config = _write_config(tmp_path, tiny_imagefolder, tmp_path / "run", "ce")
    eval_module = ("fastkd.eval", "--checkpoint", str(weights))
    node0, node1 = _launch(
        _torchrun(), config, 2, ([], [f"data.root={tmp_path / 'absent'}"]), module=eval_module
    )
    assert node0.returncode != 0 and node1.returncode != 0, node0.stderr[-2000:]
    assert "does not exist or is not a folder" in node1.stderr, node1.stderr[-3000:]
    expected = "rank(s) 1 failed while reading data.root"
    assert expected in node0.stderr, node0.stderr[-3000:]

    # Both nodes with the data: the two ranks evaluate every validation image once.
    node0, node1 = _launch(_torchrun(), config, 2, module=eval_module)
    assert node0.returncode == 0 and node1.returncode == 0, (
        node0.stderr[-3000:] + node1.stderr[-3000:]
    )
    assert "num_images 20" in node0.stdout


def test_disagreement_names_each_differing_entry_with_every_ranks_value():
    from fastkd.distributed import disagreement

    same = {"steps per epoch": 3, "file list hash": "ab12"}
    assert disagreement([same, dict(same)]) is None
    other = {"steps per epoch": 6, "file list hash": "ab12"}
    assert disagreement([same, other, same]) == "steps per epoch (rank 0: 3, rank 1: 6, rank 2: 3)"


def test_setup_waits_use_their_own_long_timeout(monkeypatch):
    """Rank 0 scanning millions of files keeps the others waiting in a group of their own with
    run.setup_timeout_min, not in the default group (NCCL: 10 minutes) that training uses."""
    from datetime import timedelta

    import torch.distributed as dist

    from fastkd import distributed

    made = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: made.update(default=kwargs))
    groups_made = []

    def new_group(**kwargs):
        groups_made.append(kwargs)
        return "group" if len(groups_made) == 1 else "control"

    monkeypatch.setattr(dist, "new_group", new_group)
    info = distributed.init_distributed("cpu", setup_timeout_min=90)
    try:
        assert (info.rank, info.world_size) == (1, 2)
        assert "timeout" not in made["default"]  # the training collectives' own default
        # The setup group (the default backend), then fastkd.control's Gloo group.
        assert groups_made == [{"timeout": timedelta(minutes=90)}, {"backend": "gloo"}]
        assert distributed._setup_group == "group"
        assert distributed.control_group() == "control"
        # Every setup collective waits in that group, never in the training group.
        groups = []
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
        monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: groups.append(group))
        monkeypatch.setattr(dist, "barrier", lambda group=None: groups.append(group))
        monkeypatch.setattr(
            dist, "broadcast_object_list", lambda box, src, group=None: groups.append(group)
        )
        monkeypatch.setattr(
            dist,
            "all_gather_object",
            lambda out, obj, group=None: (
                groups.append(group) or out.__setitem__(slice(None), [obj, obj])
            ),
        )
        distributed.ranks_agree([1.0], info.device)
        with distributed.fail_together(info, "a setup step"):
            pass
        distributed.broadcast_from_main("x", info)
        distributed.agree_on({"steps": 3}, info, "the data")
        assert groups == ["group"] * 4
    finally:
        monkeypatch.setattr(distributed, "_setup_group", None)
        monkeypatch.setattr(distributed, "_control_group", None)


def test_a_gloo_group_that_cannot_connect_is_one_clear_error(monkeypatch):
    import torch.distributed as dist

    from fastkd import distributed
    from fastkd.errors import ConfigError

    def new_group(**kwargs):
        if kwargs.get("backend") == "gloo":
            raise RuntimeError("Gloo connectFullMesh failed")
        return "group"

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(dist, "new_group", new_group)
    try:
        with pytest.raises(ConfigError, match=r"rank 1: cannot open the Gloo group.*GLOO_SOCKET"):
            distributed.init_distributed("cpu")
    finally:
        monkeypatch.setattr(distributed, "_setup_group", None)
        monkeypatch.setattr(distributed, "_control_group", None)


def test_a_split_index_travels_without_its_root(tmp_path):
    """Rank 0 sends its scan relative to its data.root; a node keeps its copy elsewhere, and
    a copy that lacks even one file of thousands is found before training."""
    from fastkd.data import DataError
    from fastkd.data.folder import SplitIndex, scan_split

    jpeg = Image.new("RGB", (8, 8))
    for c in range(3):
        (tmp_path / "rank0" / "train" / f"c{c}").mkdir(parents=True)
        for i in range(1000):
            jpeg.save(tmp_path / "rank0" / "train" / f"c{c}" / f"{i}.JPEG")
    index = scan_split(tmp_path / "rank0", "train")
    copy = shutil.copytree(tmp_path / "rank0", tmp_path / "node1")
    there = SplitIndex.from_portable(index.portable(), copy)
    assert there.files == scan_split(copy, "train").files and there.labels == index.labels
    assert there.classes == index.classes and there.digest() == index.digest()
    there.check_on_this_node()
    (copy / "train" / "c2" / "extra.JPEG").write_bytes(b"never read")  # extra files: harmless
    there.check_on_this_node()
    reordered = SplitIndex(
        index.split, index.root, index.classes, index.files[::-1], index.labels[::-1]
    )
    assert reordered.digest() != index.digest()
    os.remove(there.files[1234])
    with pytest.raises(
        DataError, match=r"1 of the 3000 train files that rank 0 scanned are missing"
    ):
        there.check_on_this_node()
