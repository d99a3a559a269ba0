"""A job script for the worker-pool tests: ``pool_job.py MODE NAME DIR``.

It prints its name and process id, its GPUs and threads (``env cvd=... omp=...``), then,
when ``DIR/poison-NAME`` exists, fails the way MODE says (``crash``: SIGSEGV; ``exit``:
os._exit(3); ``orphan``: the same, leaving a forked child behind; ``hang``: sleeps; ``oom``:
allocates past an address-space limit; ``wait``: writes ``DIR/NAME.pid`` and sleeps, for a
kill -9 from outside); otherwise it writes ``DIR/NAME.done`` and exits 0 (``dirty`` changes
the working directory, the environment and the root logger first). ``--serve FD`` runs it as
a long-lived worker.
"""

import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALLOWED_MB = 512  # the address space an "oom" job may grow by before MemoryError


def main(argv):
    mode, name, folder = argv
    folder = Path(folder)
    print(f"job {name} in pid {os.getpid()}", flush=True)
    print(f"state cwd={os.getcwd()} leak={os.environ.get('POOL_LEAK')} "
          f"handlers={len(logging.getLogger().handlers)}", flush=True)
    print(f"env cvd={os.environ.get('CUDA_VISIBLE_DEVICES')} "
          f"omp={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    if mode == "dirty":  # what a job may change in its process
        os.chdir("/")
        os.environ["POOL_LEAK"] = "1"
        logging.getLogger().addHandler(logging.StreamHandler())
    if (folder / f"poison-{name}").exists():
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif mode == "exit":
            os._exit(3)
        elif mode == "orphan":  # exits, leaving a child that holds the worker's descriptors
            if os.fork() == 0:
                time.sleep(3600)
            os._exit(3)
        elif mode == "hang":
            time.sleep(3600)
        elif mode == "oom":
            with open("/proc/self/statm") as fh:
                size = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limit = size + ALLOWED_MB * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(
                resource.RLIMIT_AS)[1]))
            data = bytearray(2 * ALLOWED_MB * 2**20)
            return len(data)
        elif mode == "wait":
            (folder / f"{name}.pid").write_text(str(os.getpid()))
            time.sleep(3600)
    (folder / f"{name}.done").write_text(str(os.getpid()))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        from gputracker.serve import serve

        sys.exit(serve(main, int(sys.argv[2])))
    sys.exit(main(sys.argv[1:]))
