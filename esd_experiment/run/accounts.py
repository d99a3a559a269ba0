"""Every list entry accounted for, once: the check a run ends with.

After a run each entry of the list is in exactly one of three states: **done** (a result
computed with the run's estimator options), **failed** (a ``failed_models.txt`` line with its
cause), or **not reached** because the run stopped (an outage, a full disk, a signal), with
nothing recorded for it. ``Accounts`` keeps the state the runner gave each entry; ``check``
holds it against the directory as it is on disk; ``exit_code`` derives the exit status from
it, so that 0 means every entry is done. A broken rule is an internal error: the run says so
and never exits 0. Imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

DONE, FAILED = "done", "failed"
EXIT_SOME_FAILED = 1
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE: the run broke its own accounting


class Accounts:
    """The state of each list entry (by key) in this run: done, failed, or none yet."""

    def __init__(self, keys: Iterable[str] | None):
        self.open = keys is None  # no list given (a runner driven alone): any key is one
        self.keys = list(dict.fromkeys(keys or ()))
        self.state: dict[str, str] = {}
        self.violations: list[str] = []

    def done(self, key: str) -> None:
        self._set(key, DONE)

    def failed(self, key: str) -> None:
        self._set(key, FAILED)

    def _set(self, key: str, state: str) -> None:
        if self.open and key not in self.keys:
            self.keys.append(key)
        if key not in self.keys:
            self.violations.append(f"{key} is {state} but is not in the list")
        elif key in self.state:
            self.violations.append(f"{key} is counted twice: {self.state[key]}, then {state}")
        else:
            self.state[key] = state

    def count(self, state: str) -> int:
        return sum(s == state for s in self.state.values())

    @property
    def not_reached(self) -> list[str]:
        return [k for k in self.keys if k not in self.state]

    def check(self, stopped: bool, on_disk: Callable[[str], tuple[bool, bool]]) -> list[str]:
        """The rules this run broke (none, normally). ``stopped``: the run ended before its
        list did (outage, full disk, signal, detached); ``on_disk(key)`` says whether the
        entry has a current result and whether it has a ``failed_models.txt`` line."""
        broken = list(self.violations)
        for key in self.keys:
            state = self.state.get(key)
            if state is None:
                if not stopped:
                    broken.append(f"{key} is neither done nor failed, yet the run was not "
                                  "stopped")
                continue
            has_result, has_failure = on_disk(key)
            if state == DONE and not (has_result and not has_failure):
                broken.append(f"{key} counted done but "
                              + ("has no current result" if not has_result
                                 else "is in failed_models.txt"))
            if state == FAILED and not (has_failure and not has_result):
                broken.append(f"{key} counted failed but "
                              + ("has no failed_models.txt line" if not has_failure
                                 else "has a current result"))
        return broken

    def exit_code(self, stop_code: int | None) -> int:
        """0 only when every entry is done; ``stop_code`` for a run that stopped (1 for an
        outage or a full disk, 128 + the signal); else 1 when some entry failed."""
        if stop_code is not None:
            return stop_code
        return 0 if self.count(DONE) == len(self.keys) else EXIT_SOME_FAILED


def internal_error_message(broken: list[str]) -> str:
    return (f"internal error: the run's accounting does not add up ({len(broken)} rule(s) "
            f"broken: {'; '.join(broken[:5])}); the results written are kept, rerun the same "
            "command, and please report this with <log_dir>/esd_experiment.log")
