"""A method handed a plain LightningDataModule stops at setup with one message naming
RolloutDataModule, instead of failing inside the teacher on a batch it cannot read."""

from __future__ import annotations

import lightning as L
import pytest
from torch.utils.data import DataLoader

from lit_opd.errors import UserError
from tests.helpers import addition_rows, make_module, make_trainer


class PromptRows(L.LightningDataModule):
    """What a Lightning user writes first: the prompt rows, batched by a plain DataLoader."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(addition_rows(8), batch_size=4, collate_fn=list)


def test_a_plain_datamodule_is_refused_in_one_line(char_tok, tmp_path):
    module = make_module(char_tok)
    with pytest.raises(UserError, match=r"PromptRows is a plain LightningDataModule, but OPDModule needs a "
                                        r"lit_opd\.RolloutDataModule") as err:
        make_trainer(tmp_path, max_steps=1).fit(module, PromptRows())
    assert "ListPrompts" in str(err.value) and "\n" not in str(err.value)
