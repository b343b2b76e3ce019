"""Checkpoints written before persisted configurations became plain data (#20) still resume, bit for bit.

``tests/fixtures/<case>.ckpt`` were written by ``tests/fixtures/make_legacy.py`` with the code of that day: their
technique states are keyed, and their configurations recorded, as ``repr()`` of internal dataclasses.
"""

from __future__ import annotations

import warnings

import pytest

from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.legacy import CASES, FIXTURES, RESUMED_EPOCHS, new_model
from tests.helpers.models import tiny_loader


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_from_before_plain_configs_resumes_exactly(case: str) -> None:
    callbacks, _ = CASES[case]
    full = new_model(case)
    quiet_trainer(max_epochs=RESUMED_EPOCHS, callbacks=callbacks()).fit(full, tiny_loader())
    resumed, cbs = new_model(case), callbacks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=RESUMED_EPOCHS, callbacks=cbs)
        trainer.fit(resumed, tiny_loader(), ckpt_path=FIXTURES / f"{case}.ckpt")
    unclaimed = [str(w.message) for w in caught if "Please add the following callbacks" in str(w.message)]
    assert not unclaimed, unclaimed  # every saved technique state found its technique
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())
    assert trainer.global_step == 4 * RESUMED_EPOCHS


def test_fixtures_are_small() -> None:
    sizes = {path.name: path.stat().st_size for path in FIXTURES.glob("*.ckpt")}
    assert set(sizes) == {f"{case}.ckpt" for case in CASES}
    assert max(sizes.values()) < 50_000, sizes


@pytest.mark.parametrize("case", sorted(CASES))
def test_new_checkpoints_record_plain_data_and_their_keys_hold_no_repr(case: str) -> None:
    for cb in CASES[case][0]():
        record = cb.state_dict()["lit_partial"]  # type: ignore[attr-defined]  # a Technique
        for text in (cb.state_key, repr(record["config"])):
            assert not any(name in text for name in ("Rule(", "Probability(", "EveryNSteps(", "AllOf(")), text
        legacy = cb.legacy_state_key  # type: ignore[attr-defined]  # a Technique
        assert legacy is None or legacy.startswith(type(cb).__qualname__)
