"""A LoRA checkpoint resumed with other adapter settings is refused with a whole sentence: each
setting that differs with both values, and the fix."""

from __future__ import annotations

import pytest

from lit_opd.lora import check_resume


def test_changed_lora_settings_are_listed_with_both_values_and_the_fix():
    saved = {"peft": {"config": {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0}}}
    current = {"config": {"r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0}}
    with pytest.raises(ValueError) as err:
        check_resume(saved, current, None)
    message = str(err.value)
    assert "(alpha: checkpoint 16.0, configured 32.0, r: checkpoint 8, configured 16)" in message
    assert message.endswith("model.init_args.student.lora, or start a new run without --ckpt_path.")
