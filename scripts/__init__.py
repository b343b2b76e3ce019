"""Project scripts: the Hydra main job (train.py) and the benchmark (benchmark.py, sections in bench/)."""
