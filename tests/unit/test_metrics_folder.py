"""The supervisor's shared metrics directory: one per supervisor, and the ones a killed
supervisor left behind are removed by the next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestra import metrics


def test_a_killed_supervisors_directory_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(gone.stdout)
    orphan = tmp_path / f"orchestra-metrics-{dead_pid}-abc123"
    orphan.mkdir()
    (orphan / "counter_1.db").write_bytes(b"x" * 100)
    alive = tmp_path / f"orchestra-metrics-{os.getppid()}-def456"  # a running supervisor's
    alive.mkdir()
    other = tmp_path / "orchestra-metrics-notapid"
    other.mkdir()
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    undo = metrics.share_between_processes()
    try:
        mine = Path(os.environ[metrics.MULTIPROC_ENV])
        assert mine.parent == tmp_path and mine.name.startswith(f"orchestra-metrics-{os.getpid()}-")
        assert not orphan.exists()
        assert alive.exists() and other.exists()
    finally:
        undo()
    assert not mine.exists() and os.environ[metrics.MULTIPROC_ENV] == str(tmp_path)
