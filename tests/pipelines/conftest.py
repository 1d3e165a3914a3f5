"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.pipelines import chaos


@pytest.fixture(scope="session")
def chaos_backtest(tmp_path_factory) -> tuple[Path, Path]:
    """The chaos suite's uninterrupted backtest (tests/pipelines/chaos.py), run once for the
    session: its folder (store.db, checkpoints/) and config. Read it; copy what a test
    changes."""
    tmp = tmp_path_factory.mktemp("backtest")
    cfg = chaos.write_config(tmp)
    chaos.upgrade(tmp)
    done = subprocess.run(
        chaos.backtest_cmd(cfg), cwd=tmp, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return tmp, cfg
