"""--progress: the bar redraws while a model runs and counts the running jobs; a log that is
not a terminal gets one line per model with the list's rate and ETA."""

import io
import logging
import re
import sys
import time

from esd_experiment.run import progress as run_progress
from esd_experiment.run.progress import Progress

REDRAW_WAIT_S = 5.0  # how long the test waits for a redraw that is due every REFRESH_S


class Terminal(io.StringIO):
    """Captures what the bar draws; says it is a terminal so that the bar is drawn."""

    def isatty(self):
        return True


def test_the_bar_redraws_while_a_model_runs(monkeypatch):
    monkeypatch.setattr(run_progress, "REFRESH_S", 0.05)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    running = [1]
    progress = Progress(4, True, running=lambda: running[0])
    try:
        progress.finished("a", True, 0)  # the dispatcher's count when a job ends: none
        drawn = len(terminal.getvalue())
        deadline = time.monotonic() + REDRAW_WAIT_S
        while len(terminal.getvalue()) == drawn and time.monotonic() < deadline:
            time.sleep(0.02)
        redraw = terminal.getvalue()[drawn:]
    finally:
        progress.close()
    assert redraw, "no redraw while the next model ran"
    assert "1/4" in redraw and "running=1" in redraw


def test_a_log_gets_a_line_per_model_with_rate_and_eta(caplog):
    progress = Progress(3, True)  # stderr is not a terminal under pytest: plain lines
    with caplog.at_level(logging.INFO, logger="run_esd_experiment"):
        progress.finished("org/a", True, 1)
        progress.finished("org/b", False, 1, "exit code 1")
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert re.search(r"\[1/3\] done org/a .*models/min.*ETA \d+m\d\ds", lines[0])
    assert re.search(r"\[2/3\] FAILED org/b: exit code 1 .*models/min.*ETA \d+m\d\ds", lines[1])
