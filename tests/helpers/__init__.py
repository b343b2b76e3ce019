"""Shared test code, mirroring Lightning's ``tests/tests_pytorch/helpers``; test modules import only from here.

- ``trainers``: ``quiet_trainer``, ``RecordGrads``, ``SaveParamsPerRank`` / ``load_rank_states``,
  ``assert_states_bitwise_equal`` (re-exported here: ``from tests.helpers import quiet_trainer``);
- ``models``: ``TinyNet`` and its loaders; ``activation_models``, ``resnet``: the activation-memory and ResNet
  models; ``plateau``: a scripted validation curve; ``compile``: Dynamo's counters;
- ``cli``: running the main job's command line (``run_job``, ``run_job_forked``, ``assert_config_error``,
  ``compose_train``); ``cli_targets``: classes the CLI tests build through ``extra_target_roots``;
- ``ddp_scripts``: multi-process runs started with ``python -m tests.helpers.ddp_scripts.<name>``.
"""

from tests.helpers.trainers import (
    RecordGrads,
    SaveParamsPerRank,
    assert_states_bitwise_equal,
    load_rank_states,
    quiet_trainer,
)

__all__ = ["RecordGrads", "SaveParamsPerRank", "assert_states_bitwise_equal", "load_rank_states", "quiet_trainer"]
