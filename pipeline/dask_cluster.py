"""A dask.distributed cluster on this machine, as separate processes: one scheduler and worker
processes of a given number of threads, for running the feature job with ``--runner dask``
locally, in the tests and in the benchmark. (On a real cluster, start ``dask scheduler`` and
``dask worker`` on its machines and pass ``--dask_client_address tcp://HOST:8786``.)

The scheduler picks its own port and writes its address to a scheduler file, so no port can
be taken from under it between choosing and binding.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def local_cluster(workers: int = 2, threads: int = 1, *, env: dict | None = None, timeout=120):
    """Yields the scheduler's address once ``workers`` worker processes have joined; stops
    every process on exit."""
    from distributed import Client

    dask = Path(sys.executable).with_name("dask")
    folder = Path(tempfile.mkdtemp(prefix="qn-dask-"))
    scheduler_file = folder / "scheduler.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    common = ["--no-dashboard", "--scheduler-file", str(scheduler_file)]
    procs, logs = [], []

    def start(name, argv):
        log = open(folder / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        start("scheduler", [str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", *common])
        deadline = time.monotonic() + timeout
        while not scheduler_file.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start: {folder / 'scheduler.log'}")
            time.sleep(0.2)
        start(
            "workers",
            [str(dask), "worker", "--nworkers", str(workers), "--nthreads", str(threads)]
            + ["--host", "127.0.0.1", *common],
        )
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(workers, timeout=timeout)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
