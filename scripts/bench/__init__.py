"""Benchmark sections: each module here (not starting with ``_``) has ``run(args) -> Section``."""
