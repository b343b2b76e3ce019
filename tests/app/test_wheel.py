"""The wheel ships the main job: ``lit_partial/app/``, every YAML file of its config tree and the console scripts.

The wheel is built from a copy of what it is built from (``pyproject.toml``, ``README.md``, ``lit_partial/``) with
the installed setuptools (``build_meta``, what ``pip wheel --no-build-isolation`` calls), so the checkout gets no
``build/`` or ``*.egg-info`` folder. The install itself is checked by hand in a fresh virtual environment (the
README's ``pip install "lit-partial[demo]"`` then ``lit-partial-train ...`` from an empty folder).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile

import pytest

from lit_partial.app.config import CONF_DIR
from tests.helpers.cli import ROOT

PACKAGE = ROOT / "lit_partial"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "lit_partial", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src / "dist")], cwd=src, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return zipfile.ZipFile(src / "dist" / proc.stdout.split()[-1])


@pytest.mark.timeout(300)
def test_the_wheel_holds_the_app_and_every_yaml_file_of_its_config_tree(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    yaml_files = {f"lit_partial/app/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert len(yaml_files) > 30 and "lit_partial/app/conf/train.yaml" in yaml_files
    assert yaml_files <= names, sorted(yaml_files - names)
    app_modules = {f"lit_partial/app/{p.name}" for p in (PACKAGE / "app").glob("*.py")}
    assert {"lit_partial/app/train.py", "lit_partial/app/compare.py"} <= app_modules <= names
    assert "lit_partial/py.typed" in names
    assert "lit_partial/demos/data/stdlib_text.json.gz" in names  # the LLM job's corpus (experiment=lm)
    assert not any(n.startswith(("benchmarks/", "examples/", "scripts/", "tests/")) for n in names)


@pytest.mark.timeout(300)
def test_the_wheel_declares_the_console_scripts(wheel: zipfile.ZipFile) -> None:
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {
        "lit-partial-train": "lit_partial.app.train:main",
        "lit-partial-compare": "lit_partial.app.compare:main",
    }
