"""The measured claims of lit_partial: time ratios side by side in one run, FLOPs, bytes (not shipped in the wheel).

Run all sections, or some, from a checkout, and write ``results.md``, ``results.json`` and plots into ``--out``:

    python -m benchmarks                       # every section (or: make bench)
    python -m benchmarks --only freezing       # one section (a module name in benchmarks/)
    python -m benchmarks --quick               # fewer rounds, for a smoke run

Each section is a module of this package (not starting with ``_``) with ``run(args) -> Section`` and
``REQUIRES``, the optional packages it imports (checked for every chosen section before the first one runs:
``pip install 'lit-partial[bench]'`` installs them all).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import sys
import time
from pathlib import Path

import torch

__all__ = ["PIP_NAMES", "available_sections", "main", "missing_dependencies"]


def available_sections() -> list[str]:
    """Names of the benchmark sections (modules of ``benchmarks`` not starting with ``_``)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


#: Import name -> pip name of the optional packages that sections declare in ``REQUIRES``.
PIP_NAMES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "transformers": "transformers"}


def missing_dependencies(sections: list[str]) -> dict[str, list[str]]:
    """Optional packages the chosen sections need but the environment lacks: ``{import name: [sections]}``."""
    missing: dict[str, list[str]] = {}
    for name in sections:
        for package in getattr(importlib.import_module(f"benchmarks.{name}"), "REQUIRES", ()):
            if importlib.util.find_spec(package) is None:
                missing.setdefault(package, []).append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    sections = available_sections()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sections, default=sections, help="sections to run")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (smoke run, noisier)")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results"), help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--skip-missing", action="store_true", help="run only the sections whose optional packages are installed"
    )
    args = parser.parse_args(argv)
    missing = missing_dependencies(args.only)
    if missing:
        lines = [f"  {PIP_NAMES.get(m, m)} (for {', '.join(s)})" for m, s in missing.items()]
        pip = " ".join(sorted({PIP_NAMES.get(m, m) for m in missing}))
        if not args.skip_missing:
            print(
                "[benchmark] missing optional packages:\n" + "\n".join(lines) + f"\nFix: pip install {pip} (or "
                "pip install 'lit-partial[bench]' for all of them), or add --skip-missing to run the other sections, "
                "or choose sections with --only.",
                file=sys.stderr,
            )
            return 2
        skipped = {s for names in missing.values() for s in names}
        print(f"[benchmark] skipping {', '.join(sorted(skipped))}: missing {pip}", flush=True)
        args.only = [name for name in args.only if name not in skipped]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    header = f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU only"
    )
    report, results = [f"## Benchmark results\n\n{header}; `python -m benchmarks`\n"], {}
    for name in args.only:
        start = time.perf_counter()
        print(f"[benchmark] {name} ...", flush=True)
        section = importlib.import_module(f"benchmarks.{name}").run(args)
        print(section.markdown(), flush=True)
        print(f"[benchmark] {name} took {time.perf_counter() - start:.1f}s", flush=True)
        report.append(section.markdown())
        results[name] = {"title": section.title, "rows": section.rows, "notes": section.notes}
    (args.out / "results.md").write_text("\n".join(report))
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"[benchmark] wrote {args.out / 'results.md'}")
    return 0
