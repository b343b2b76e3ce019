"""The comparison report from a checkout: ``python scripts/compare.py <sweep folder>`` = ``lit-partial-compare``."""

from lit_partial.app.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
