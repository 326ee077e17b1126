"""The supervisor's shared metrics directory: one per supervisor, held locked while it runs,
and the ones a killed supervisor left behind are removed by the next."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestra import metrics, metrics_folder


def test_a_killed_supervisors_directory_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan = tmp_path / "orchestra-metrics-123-abc123"  # its supervisor was SIGKILLed
    orphan.mkdir()
    (orphan / ".supervisor.lock").touch()
    (orphan / "counter_1.db").write_bytes(b"x" * 100)
    # Another supervisor's, running (in another container the pid may be this one's own).
    alive = tmp_path / f"orchestra-metrics-{os.getpid()}-def456"
    alive.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX);"
            " print('held', flush=True); sys.stdin.read()",
            str(alive / ".supervisor.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        unknown = tmp_path / "orchestra-metrics-notours"  # no lock file: left alone
        unknown.mkdir()
        monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
        undo = metrics_folder.share_between_processes()
        try:
            mine = Path(os.environ[metrics.MULTIPROC_ENV])
            assert mine.parent == tmp_path and mine.name.startswith("orchestra-metrics-")
            assert not orphan.exists()
            assert alive.exists() and unknown.exists()
            # Its own is held while it runs: the next supervisor leaves it alone.
            with open(mine / ".supervisor.lock") as other:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            undo()
        assert not mine.exists() and os.environ[metrics.MULTIPROC_ENV] == str(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_shared_label_file_cut_short_mid_line_is_read_without_that_line(
    tmp_path: Path,
) -> None:
    """A process killed as it wrote a label value leaves half a line: the others read the
    file on (a ValueError reached the task's finish, where the metric was counted)."""
    from orchestra.metric_labels import BoundedLabel

    shared = tmp_path / "labels_model.jsonl"
    shared.write_text('"llama3.2"\n"qwen"\n"mis')
    bounded = BoundedLabel("model", 200, "other", lambda: str(tmp_path))
    assert bounded("phi3") == "phi3"
    assert bounded("qwen") == "qwen"
    assert {"llama3.2", "qwen", "phi3"} <= bounded.seen
    # What it wrote is whole, for the next process to read.
    again = BoundedLabel("model", 200, "other", lambda: str(tmp_path))
    assert again("other-model") == "other-model"
    assert shared.read_text().splitlines()[-2:] == ['"phi3"', '"other-model"']
