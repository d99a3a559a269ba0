"""What a run shows while it runs: a progress bar (or plain lines), its own log file, and
the closing per-model summary table of the demo."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("run_esd_experiment")

REFRESH_S = 1.0  # seconds between redraws of the bar while models run


class _BarSafeHandler(logging.Handler):
    """Writes log records above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


class Progress:
    """A progress bar (done / failed / running, ETA) on a terminal, redrawn every
    ``REFRESH_S`` while models run; otherwise a log line per model with the list's rate and
    ETA. ``running`` returns how many jobs run now (the backend's count)."""

    def __init__(self, total: int, enabled: bool, running: Callable[[], int] | None = None):
        self.total, self.done, self.failed = total, 0, 0
        self._running = running
        self._started = time.monotonic()
        self._bar = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._saved_handlers: list[logging.Handler] = []
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            root = logging.getLogger()
            self._saved_handlers = list(root.handlers)
            consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
            handler = _BarSafeHandler()
            if consoles:
                handler.setFormatter(consoles[0].formatter)
            root.handlers = [h for h in root.handlers if h not in consoles] + [handler]
            # Per-job start/exit lines would bury the bar; failures are still reported below.
            logging.getLogger("gputracker").setLevel(logging.WARNING)
            # smoothing=0: the ETA follows the list's average rate, and grows while a slow
            # model runs instead of standing still.
            self._bar = tqdm(total=total, unit="model", dynamic_ncols=True, file=sys.stderr,
                             smoothing=0)
            threading.Thread(target=self._redraw, name="progress", daemon=True).start()

    def _postfix(self, running: int) -> dict:
        if self._running is not None:
            running = self._running()
        return {"done": self.done, "failed": self.failed, "running": running}

    def _redraw(self) -> None:
        while not self._closed.wait(REFRESH_S):
            with self._lock:
                if self._bar is not None:
                    self._bar.set_postfix(self._postfix(0))

    def finished(self, model_id: str, ok: bool, running: int, detail: str = "") -> None:
        with self._lock:
            self.done += ok
            self.failed += not ok
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(self._postfix(running))
        count = self.done + self.failed
        elapsed = time.monotonic() - self._started
        pace = ""
        if self._bar is None:
            per_min = 60.0 * count / elapsed if elapsed > 0 else 0.0
            eta = (self.total - count) * elapsed / count
            pace = f" ({per_min:.1f} models/min, ETA {format_duration(eta)})"
        if not ok:
            logger.warning("[%d/%d] FAILED %s: %s%s", count, self.total, model_id, detail, pace)
        elif self._bar is None:
            logger.info("[%d/%d] done %s%s", count, self.total, model_id, pace)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
                logging.getLogger().handlers = self._saved_handlers
                logging.getLogger("gputracker").setLevel(logging.NOTSET)


class _RunLogHandler(logging.FileHandler):
    """The run's log file; a line it cannot write (a full disk) is left out silently: the
    console has it, and the run says what stopped it there."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextmanager
def run_log(path: Path):
    """Copy this process's log lines to ``path`` (appended: one file tells every run's story)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def summary_table(csvs: Iterable[tuple[str, Path]]) -> str:
    """One line per model with a result: layers, fitted layers and alpha statistics."""
    import pandas as pd

    lines = []
    for model_id, csv in csvs:
        df = pd.read_csv(csv)
        ok = df[df.status == "ok"]
        lines.append({"model": Path(model_id).name, "layers": len(df), "fitted": len(ok),
                      "mean_alpha": ok.alpha.mean(), "median_alpha": ok.alpha.median(),
                      "result": csv.name})
    return pd.DataFrame(lines).to_string(index=False, float_format="%.2f") if lines else ""


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
