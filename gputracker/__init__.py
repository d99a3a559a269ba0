"""GPU/CPU job dispatcher: one child process per job, on free GPUs or CPU slots.

Usage from a runner::

    from gputracker import Dispatcher, Job, install_signal_handlers

    dispatcher = Dispatcher(gpus, gpus_per_job=1, memory_threshold_mb=500, max_check=10,
                            poll_interval=10.0)      # gpus None or [] -> CPU mode (cpu_slots=)
    restore = install_signal_handlers(dispatcher)   # SIGINT/SIGTERM -> dispatcher.stop()
    jobs = [Job(name=m, argv=[sys.executable, "esd_worker.py", m], log_path=log_of(m))
            for m in models]

    def on_finish(result):                           # runs on the dispatching thread
        if result.ok or result.stopped:
            return None
        if worth_retrying(result) and result.job.attempt < 3:
            return [dataclasses.replace(result.job, attempt=result.job.attempt + 1,
                                        not_before=dispatcher.now() + 30)]
        record_failure(result.name, result.describe(), result.log_path, result.tail(20))
        return None

    try:
        results = dispatcher.run(jobs, on_finish)    # the jobs are gone when it returns
    finally:
        restore()
    if dispatcher.stop_signum is not None:
        sys.exit(128 + dispatcher.stop_signum)       # 130 after Ctrl-C, 143 after SIGTERM

``DispatchThread(dispatcher, jobs, on_finish)`` runs the same loop on a thread.
``Dispatcher(..., launcher=WorkerPool(script))`` (gputracker.pool) runs the jobs of ``script``
in long-lived workers, one per slot, instead of a process per job (docs/workers.md).
"""

from gputracker.control import DispatchThread, install_signal_handlers
from gputracker.dispatcher import THREAD_VARS, Dispatcher
from gputracker.gpus import GPUQueryError, GPUStatus, detect_gpus, nvml_query
from gputracker.jobs import (
    Allocation,
    GroupProcess,
    Job,
    JobResult,
    Launcher,
    ProcessHandle,
    launch_in_session,
)

__all__ = [
    "THREAD_VARS",
    "Allocation",
    "DispatchThread",
    "Dispatcher",
    "GPUQueryError",
    "GPUStatus",
    "GroupProcess",
    "Job",
    "JobResult",
    "Launcher",
    "ProcessHandle",
    "detect_gpus",
    "install_signal_handlers",
    "launch_in_session",
    "nvml_query",
]
