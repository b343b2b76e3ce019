"""``python -m benchmarks``: run the benchmark sections (see :mod:`benchmarks`)."""

from benchmarks import main

raise SystemExit(main())
