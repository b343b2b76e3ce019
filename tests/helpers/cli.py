"""The main job from the tests: its CLI in a child process (with a timeout), its checks, its composed config."""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lit_partial.app.cli import CONFIG_ERROR_EXIT
from lit_partial.app.config import CONF_DIR, register_configs

ROOT = Path(__file__).resolve().parents[2]
#: The checkout's shim of ``lit-partial-train``: what the README's ``python scripts/train.py ...`` runs.
TRAIN = ROOT / "scripts" / "train.py"

register_configs()


def compose_train(*overrides: str, output_dir: str = "/tmp/lit_partial_test_outputs") -> DictConfig:
    """The main job's config (``conf/train.yaml``) with ``overrides``, composed as the command line would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def assert_config_error(proc: subprocess.CompletedProcess[str], pattern: str) -> str:
    """Exit status 2, no traceback, and the last stderr line is one ``Error: ...`` line matching ``pattern``."""
    assert proc.returncode == CONFIG_ERROR_EXIT, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


_USER_ENV = ("HYDRA_FULL_ERROR", "LIT_PARTIAL_USER_HYDRA_FULL_ERROR")


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child job: this checkout's ``lit_partial`` first, one thread, no user Hydra settings."""
    base = {k: v for k, v in os.environ.items() if k not in _USER_ENV}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})}


def run_job(
    *overrides: str, run_dir: Path, timeout: int = 400, new_session: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python scripts/train.py <overrides> hydra.run.dir=<run_dir>`` from the repository root."""
    return subprocess.run(
        [sys.executable, str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=job_env(env),
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


def lightning_cli_example_main() -> Callable[..., Any]:
    """``main`` of examples/lightning_cli/train.py (a runnable example, not an importable package)."""
    path = ROOT / "examples" / "lightning_cli" / "train.py"
    spec = importlib.util.spec_from_file_location("lightning_cli_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main  # type: ignore[no-any-return]
