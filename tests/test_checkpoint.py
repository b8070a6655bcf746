"""Checkpoint writes: durable and atomic under injected faults and a real SIGKILL; stale
temporaries cleaned up; RNG states captured, saved with weights_only and restored bit for bit."""

from __future__ import annotations

import errno
import os
import random
import select
import signal
import stat
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastkd import checkpoint as ckpt_io


def checkpoint_like(epoch: int, size: int = 64) -> dict[str, Any]:
    """A small fastkd-format checkpoint whose tensors all depend on ``epoch``."""
    return {
        "format": ckpt_io.FORMAT,
        "version": ckpt_io.VERSION,
        "epoch": epoch,
        "student": {
            "w": torch.full((size, size), float(epoch)),
            "b": torch.arange(size, dtype=torch.int64) + epoch,
        },
    }


def assert_holds(path: Path, epoch: int) -> None:
    loaded = ckpt_io.load_checkpoint(path)
    want = checkpoint_like(epoch)
    assert loaded["epoch"] == epoch
    assert loaded["student"].keys() == want["student"].keys()
    for name, tensor in want["student"].items():
        assert torch.equal(loaded["student"][name], tensor), name


def assert_alone(path: Path) -> None:
    """``path`` is the only thing in its folder: no temporary left behind."""
    assert sorted(os.listdir(path.parent)) == [path.name]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """``run/last.pt`` holding ``checkpoint_like(1)``: the previous checkpoint a failed save keeps."""
    path = tmp_path / "run" / "last.pt"
    ckpt_io.atomic_save(checkpoint_like(1), path)
    return path


def test_a_durable_save_round_trips(tmp_path):
    path = tmp_path / "new" / "folder" / "last.pt"
    ckpt_io.atomic_save(checkpoint_like(3), path)
    assert_holds(path, 3)
    ckpt_io.atomic_save(checkpoint_like(4), path)  # over an existing file
    assert_holds(path, 4)
    assert_alone(path)


def test_the_file_then_the_folder_are_fsynced_around_the_rename(saved, monkeypatch):
    events: list[tuple[str, os.stat_result | None]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd)))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_io.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_io.os, "replace", replace)
    ckpt_io.atomic_save(checkpoint_like(2), saved)

    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    file_stat, folder_stat = events[0][1], events[2][1]
    assert stat.S_ISREG(file_stat.st_mode) and stat.S_ISDIR(folder_stat.st_mode)
    # The file fsynced is the one that became ``path``; the folder is the one holding it.
    assert os.path.samestat(file_stat, os.stat(saved))
    assert os.path.samestat(folder_stat, os.stat(saved.parent))
    assert_holds(saved, 2)
    assert_alone(saved)


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_a_save_failing_mid_write_keeps_the_previous_checkpoint(saved, monkeypatch, error):
    def torn_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04torn" * 4096)  # some bytes of a zip, then the failure
        raise error

    monkeypatch.setattr(ckpt_io.torch, "save", torn_save)
    with pytest.raises(type(error)):
        ckpt_io.atomic_save(checkpoint_like(2), saved)
    assert_holds(saved, 1)
    assert_alone(saved)


def _raise(error: OSError):
    def fail(*args: Any) -> None:
        raise error

    return fail


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("fsync", OSError(errno.EIO, "Input/output error")),
        ("replace", OSError(errno.EXDEV, "Invalid cross-device link")),
    ],
    ids=["file-fsync", "rename"],
)
def test_a_failing_fsync_or_rename_keeps_the_previous_checkpoint(saved, monkeypatch, call, error):
    monkeypatch.setattr(ckpt_io.os, call, _raise(error))
    with pytest.raises(OSError, match=error.strerror):
        ckpt_io.atomic_save(checkpoint_like(2), saved)
    assert_holds(saved, 1)
    assert_alone(saved)


def refuse_folder_fsync(monkeypatch: pytest.MonkeyPatch, code: int) -> list[int]:
    """Make fsync of a directory fail with ``code``; returns the list of refusals, one per call."""
    refused: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(code)
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(ckpt_io.os, "fsync", fsync)
    return refused


@pytest.mark.parametrize(
    "code", [errno.EINVAL, errno.EBADF, errno.EPERM, errno.ENOTSUP], ids=errno.errorcode.get
)
def test_a_folder_fsync_the_filesystem_refuses_is_no_error(saved, monkeypatch, code):
    refused = refuse_folder_fsync(monkeypatch, code)
    ckpt_io.atomic_save(checkpoint_like(2), saved)
    assert refused == [code]
    assert_holds(saved, 2)
    assert_alone(saved)


def test_a_folder_fsync_io_error_is_raised_after_the_rename(saved, monkeypatch):
    """EIO is a real failure (the rename may not be on disk): raised, with the new file in place."""
    refused = refuse_folder_fsync(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        ckpt_io.atomic_save(checkpoint_like(2), saved)
    assert refused == [errno.EIO]
    assert_holds(saved, 2)
    assert_alone(saved)


def test_remove_stale_temporaries_removes_those_and_only_those(tmp_path):
    stale = {".last.pt.tmp1234", ".best.pt.tmp99", ".student.pt.tmp5", ".a.b.pt.tmp7"}
    kept = {
        "last.pt",
        ".hidden",
        "notes.tmp123",
        ".last.pt.tmp",  # no pid
        ".last.pt.tmp12x",
        "last.pt.tmp12",  # no leading dot
        ".metrics.jsonl.tmp3",  # not a .pt
        ".last.pt.tmp12.bak",
    }
    for name in stale | kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".dir.pt.tmp4").mkdir()  # a folder so named is not a temporary
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".last.pt.tmp8").write_bytes(b"x")  # not recursive

    removed = ckpt_io.remove_stale_temporaries(tmp_path)
    assert removed == sorted(tmp_path / name for name in stale)
    assert set(os.listdir(tmp_path)) == kept | {".dir.pt.tmp4", "sub"}
    assert (tmp_path / "sub" / ".last.pt.tmp8").exists()
    assert ckpt_io.remove_stale_temporaries(tmp_path) == []
    assert ckpt_io.remove_stale_temporaries(tmp_path / "missing") == []


def write_forever(path: Path, checkpoints: list[dict[str, Any]], ready_fd: int) -> None:
    """The forked writer: announce itself, then save the checkpoints in turn until killed."""
    os.write(ready_fd, b"ready")
    for i in range(10**9):
        ckpt_io.atomic_save(checkpoints[i % 2], path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_killed_writer_leaves_the_old_or_the_new_checkpoint(tmp_path):
    """SIGKILL a process saving 32 MB checkpoints A and B in turn, at random moments of its
    saves: each time ``path`` loads and is A or B exactly. The writer is forked from this process
    (with torch already imported) rather than a fresh interpreter, whose ``import fastkd`` alone
    takes seconds: five kills stay within about two seconds."""
    numbers = torch.arange(8 * 2**20, dtype=torch.int32)  # 32 MB
    checkpoints = [
        {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "epoch": 0, "w": numbers},
        {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "epoch": 1, "w": numbers.flip(0)},
    ]
    path = tmp_path / "last.pt"
    ckpt_io.atomic_save(checkpoints[0], path)
    moments = random.Random(11)
    seen = []
    for _ in range(5):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: never returns into pytest
            try:
                os.close(read_fd)
                write_forever(path, checkpoints, write_fd)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], 30.0)
            assert ready, "the writer did not start within 30 s"
            time.sleep(moments.uniform(0.0, 0.4))  # one 32 MB save takes ~0.1-0.2 s
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(read_fd)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        epoch = loaded["epoch"]
        assert torch.equal(loaded["w"], checkpoints[epoch]["w"])
        seen.append(epoch)

    temporaries = {name for name in os.listdir(tmp_path) if name.startswith(".last.pt.tmp")}
    unrelated = {".hidden", "notes.tmp123", "best.pt"}
    for name in unrelated:
        (tmp_path / name).write_bytes(b"x")
    removed = ckpt_io.remove_stale_temporaries(tmp_path)
    assert {p.name for p in removed} == temporaries
    assert set(os.listdir(tmp_path)) == unrelated | {"last.pt"}
    assert ckpt_io.load_checkpoint(path)["epoch"] == seen[-1]


def draws() -> list[Any]:
    """A few draws from each global generator, gaussians included (they cache a value)."""
    return [
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        np.random.randn(3).tolist(),
        torch.rand(3),
        torch.randn(3),
    ]


def assert_same_draws(got: list[Any], want: list[Any]) -> None:
    for a, b in zip(got, want, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b


def assert_plain(value: Any) -> None:
    """Only what ``weights_only`` loads by design: no NumPy arrays or scalars anywhere."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            assert_plain(item)
    elif isinstance(value, list | tuple):
        for item in value:
            assert_plain(item)
    else:
        assert value is None or type(value) in (int, float, str, torch.Tensor), type(value)


def test_rng_state_survives_a_weights_only_file_and_repeats_the_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves Python's second gaussian cached
    np.random.randn(1)  # leaves NumPy's second gaussian cached
    state = ckpt_io.rng_state()
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    if not torch.cuda.is_initialized():
        assert state["cuda"] is None
    assert_plain(state)
    torch.save({"rng": state}, tmp_path / "rng.pt")
    want = draws()

    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    draws()
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    ckpt_io.restore_rng(loaded)
    assert_same_draws(draws(), want)


def test_restore_rng_skips_what_is_missing_or_from_another_machine():
    torch.manual_seed(0)
    state = ckpt_io.rng_state()
    want = torch.rand(4)
    # CUDA states for one more device than this machine has: skipped without error.
    foreign = [torch.zeros(16, dtype=torch.uint8)] * (torch.cuda.device_count() + 1)
    ckpt_io.restore_rng({"torch": state["torch"], "cuda": foreign})
    assert torch.equal(torch.rand(4), want)
    python_before = random.getstate()
    ckpt_io.restore_rng({"cuda": None})
    assert random.getstate() == python_before
