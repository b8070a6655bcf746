"""The quickstart driver: three stages chained through the teacher's student.pt, a report, reuse."""

from __future__ import annotations

import json

import pytest

from fastkd.quickstart import main

SMALL = [
    "data.synthetic.num_classes=3",
    "data.synthetic.train_per_class=16",
    "data.synthetic.val_per_class=5",
    "data.batch_size=16",
    "train.epochs=1",
    "train.log_every=100",
]


@pytest.mark.slow
def test_quickstart_runs_three_stages_and_reuses_them(tmp_path, capsys):
    args = ["--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data")]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0
    first = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert [s["stage"] for s in report] == ["teacher", "baseline", "wsld"]
    assert [s["loss"] for s in report] == ["ce", "ce", "wsld"]
    assert all(s["num_val_images"] == 15 for s in report)
    # The WSLD stage distilled from the teacher stage's weights: it measured the same teacher.
    assert report[2]["teacher_top1"] == pytest.approx(report[0]["top1"], abs=1e-6)
    assert "WSLD vs baseline" in first and (tmp_path / "runs" / "report.txt").is_file()
    for stage in ("teacher", "baseline", "wsld"):
        assert (tmp_path / "runs" / stage / "student.pt").is_file()

    # A second call reuses the finished runs instead of training again.
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.count("reusing the finished run") == 3
    again = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert [s["top1"] for s in again] == [s["top1"] for s in report]


def test_quickstart_reports_user_errors(tmp_path, capsys):
    code = main(
        [
            "--runs",
            str(tmp_path / "runs"),
            "--data",
            str(tmp_path / "d"),
            "--set",
            "data.batchsize=2",
        ]
    )
    assert code == 2
    assert "did you mean 'data.batch_size'" in capsys.readouterr().err
