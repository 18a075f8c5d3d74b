"""Progress off a terminal (a cluster job's log file): plain lines, never progress-bar redraws; bars stay in a
terminal."""
from __future__ import annotations

import io

import train
from helpers import tiny_overrides
from utils.core.progress import progress
from utils.stages.cli import run_stage
from utils.train import monitor


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_in_a_file_and_a_bar_in_a_terminal():
    log = io.StringIO()
    assert list(progress(range(50), desc="extract African", stream=log, every_seconds=0.0)) == list(range(50))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 51
    assert lines[-1].startswith("extract African: 50/50 (100%) in 0:00:0")
    quiet = io.StringIO()
    assert list(progress(range(5), desc="x", stream=quiet)) == list(range(5))
    assert quiet.getvalue().splitlines() == ["x: 5/5 (100%) in 0:00:00"]  # only the closing line by default
    terminal = Terminal()
    list(progress(range(50), desc="extract African", stream=terminal))
    assert "\r" in terminal.getvalue() and "extract African" in terminal.getvalue()
    silent = io.StringIO()
    assert list(progress(range(3), desc="x", stream=silent, enabled=False)) == [0, 1, 2] and not silent.getvalue()


def test_training_output_to_a_file_has_log_lines_and_no_bar_redraws(tiny_synthetic, tmp_path, capsys, monkeypatch):
    run_stage(train.main, tiny_overrides(tiny_synthetic, tmp_path / "file", ethnicity="Asian", log_every=1))
    printed = capsys.readouterr().out
    assert "\r" not in printed and "it/s" not in printed
    assert printed.count(" samples/s eta ") == 6  # one plain line per step (log_every=1), 3 steps x 2 epochs
    monkeypatch.setattr(monitor, "is_terminal", lambda stream: True)
    run_stage(train.main, tiny_overrides(tiny_synthetic, tmp_path / "terminal", ethnicity="Asian", log_every=1))
    assert "\r" in capsys.readouterr().out  # in a terminal the bar is drawn as before
