"""`python -m benchmarks` checks the optional packages of the chosen sections before running any of them."""

from __future__ import annotations

import importlib.util

import pytest

import benchmarks as benchmark
from benchmarks import masking


def test_every_section_declares_its_optional_packages() -> None:
    import importlib

    for name in benchmark.available_sections():
        requires = importlib.import_module(f"benchmarks.{name}").REQUIRES
        assert set(requires) <= set(benchmark.PIP_NAMES), name


def test_missing_package_stops_before_the_first_section(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    ran = []
    monkeypatch.setattr(masking, "run", lambda args: ran.append(args))
    code = benchmark.main(["--only", "masking", "selective", "activations", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and not ran
    assert "matplotlib (for selective, activations)" in err and "pip install matplotlib" in err
    assert "lit-partial[bench]" in err and "--skip-missing" in err
    assert benchmark.missing_dependencies(["masking"]) == {}


def test_skip_missing_runs_the_other_sections(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from benchmarks._common import Section

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(masking, "run", lambda args: Section("masking stub", [{"a": 1}]))
    code = benchmark.main(["--only", "masking", "selective", "--skip-missing", "--out", str(tmp_path)])
    assert code == 0
    report = (tmp_path / "results.md").read_text()
    assert "masking stub" in report and "Selective" not in report
