"""The quick start works with a Python that refuses system-wide installs (PEP 668, Debian/Ubuntu's python3).

The Makefile must make (and then only use) a project virtual environment when none is active, install torch
pinned and first, and install only what each command needs. The full install (minutes, hundreds of MB) is
measured by hand on a fresh clone (see the README); here the Makefile's plan is checked with ``make -n`` and the
virtual environment it makes is checked for a working pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT


def externally_managed_python() -> str | None:
    """A python3 with an EXTERNALLY-MANAGED marker (Debian's /usr/bin/python3) that can make venvs."""
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if not candidate or not Path(candidate).exists():
            continue
        probe = subprocess.run(
            [
                candidate,
                "-c",
                "import sysconfig, os, ensurepip; "
                "print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


PYTHON = externally_managed_python()
needs_pep668_python = pytest.mark.skipif(PYTHON is None, reason="no python3 with an EXTERNALLY-MANAGED marker here")


def make(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(
        ["make", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env={**base, **(env or {})}
    )


@needs_pep668_python
def test_that_python_refuses_a_system_wide_install() -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "pip", "install", "--dry-run", "six"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "externally-managed-environment" in proc.stderr + proc.stdout


@pytest.mark.parametrize(("target", "extra"), [("train", ".[demo]"), ("test", ".[test]")])
def test_make_plans_a_project_venv_with_pinned_torch_first(tmp_path: Path, target: str, extra: str) -> None:
    clone = tmp_path / "clone"  # what `make -n` reads: the Makefile and the stamps' prerequisite, pyproject.toml
    clone.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, clone / name)
    proc = make("-n", target, "PYTHON=python3", cwd=clone)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    venv = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv .venv"))
    torch = next(i for i, line in enumerate(lines) if 'pip install "torch==2.13.0"' in line)
    install = next(i for i, line in enumerate(lines) if f'pip install --quiet -e "{extra}"' in line)
    assert venv < torch < install
    assert all(".venv/bin/python" in line for line in lines[torch:] if "pip" in line or "pytest" in line)
    assert "[dev]" not in proc.stdout and (target != "train" or "[test]" not in proc.stdout)


def test_an_active_virtual_environment_is_used_as_is(tmp_path: Path) -> None:
    proc = make("-n", "test", cwd=ROOT, env={"VIRTUAL_ENV": sys.prefix})
    assert proc.returncode == 0, proc.stderr
    assert "-m venv" not in proc.stdout and f"{sys.prefix}/bin/python -m pytest" in proc.stdout


@needs_pep668_python
@pytest.mark.timeout(300)
def test_make_venv_with_that_python_gives_a_working_pip(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "Makefile", clone / "Makefile")
    proc = make("venv", f"PYTHON={PYTHON}", cwd=clone)
    assert proc.returncode == 0, proc.stderr
    pip = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, text=True, timeout=120
    )
    assert pip.returncode == 0 and str(clone / ".venv") in pip.stdout
    assert sysconfig.get_path("stdlib")  # the marker lives beside the stdlib of the base interpreter
