"""Run the main job's CLI in a subprocess (with a timeout) and share a pretrained-backbone cache."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "scripts" / "train.py"


_USER_ENV = ("HYDRA_FULL_ERROR", "LIT_PARTIAL_USER_HYDRA_FULL_ERROR")


def run_job(
    *overrides: str, run_dir: Path, timeout: int = 400, new_session: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python scripts/train.py <overrides> hydra.run.dir=<run_dir>`` from the repository root."""
    base = {k: v for k, v in os.environ.items() if k not in _USER_ENV}
    full_env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
        start_new_session=new_session,
    )


def run_job_forked(*overrides: str, run_dir: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """:func:`run_job` in a child forked from the test process: the same CLI, exit status and output.

    ``python scripts/train.py`` spends about 10 s importing torch, Lightning and Hydra before it reads its first
    override; a forked child has them already. For the runs that stop at a configuration error (the job
    itself, not its imports, is under test). ``scripts/train.py`` runs as ``__main__`` in the child, as from the
    command line; what it writes to ``sys.stdout``/``sys.stderr`` and to file descriptors 1 and 2 is captured.
    """
    argv = [str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                for key in _USER_ENV:
                    os.environ.pop(key, None)
                os.chdir(ROOT)
                from hydra.core.global_hydra import GlobalHydra

                GlobalHydra.instance().clear()
                sys.argv = argv
                try:
                    runpy.run_path(str(TRAIN), run_name="__main__")
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    if isinstance(exc.code, str):
                        print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), stdout, stderr)
