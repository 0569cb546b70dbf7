"""Prompt sources, tokenization, splits and the resumable sampler of the RolloutDataModule."""

from __future__ import annotations

import json

import pytest
import torch

from lit_opd.rollout import JsonlPrompts, ListPrompts, RolloutDataModule, TaskPrompts
from lit_opd.rollout.datamodule import dataset_completions
from lit_opd.rollout.prompts import PromptTokenizer, collate_prompts
from lit_opd.rollout.sampler import ResumablePromptSampler
from lit_opd.tasks import AdditionTask, char_tokenizer


def _dm(source, **kwargs):
    dm = RolloutDataModule(source, **kwargs)
    dm.tokenizer = char_tokenizer()
    dm.setup("fit")
    return dm


def test_jsonl_source_reads_prompts_messages_and_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"messages": [{"role": "user", "content": "hi"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert JsonlPrompts(str(path)).load() == rows


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "p.jsonl:2: not valid JSON"), ('{"text": "x"}', "needs a string 'prompt'"),
     ('{"prompt": "x", "answer": 3}', "'answer' must be a string")],
)
def test_jsonl_source_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        JsonlPrompts(str(path)).load()


def test_missing_jsonl_file_is_named():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlPrompts("nope.jsonl").load()


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = char_tokenizer(chat_template=True)
    enc = PromptTokenizer(tok, 512, "error", None, system_prompt="be brief")
    ids = enc.prompt_ids({"prompt": "1+1="}, "row 0")
    text = tok.decode(ids)
    assert text == "<bos>system: be brief<eos><bos>user: 1+1=<eos><bos>assistant: "
    plain = PromptTokenizer(tok, 512, "error", False, None).prompt_ids({"prompt": "1+1="}, "row 0")
    assert tok.decode(plain) == "1+1="


def test_over_long_prompt_error_names_the_row_and_the_fix():
    rows = [{"prompt": "1+1="}, {"prompt": "123456789+1="}]
    with pytest.raises(ValueError, match=r"training row 1 has a 12-token prompt.*max_prompt_tokens=8"):
        PromptTokenizer(char_tokenizer(), 8, "error", None, None).rows(rows, "training")
    kept = PromptTokenizer(char_tokenizer(), 8, "truncate", None, None).rows(rows, "training")
    assert char_tokenizer().decode(kept[1]["prompt_ids"]) == "56789+1="  # the end holds the question
    skipped = PromptTokenizer(char_tokenizer(), 8, "skip", None, None).rows(rows, "training")
    assert [r["row_index"] for r in skipped] == [0]


def test_collate_left_pads_and_appends_eos_to_answers():
    enc = PromptTokenizer(char_tokenizer(), 64, "error", None, None)
    records = enc.rows([{"prompt": "1+1=", "answer": "2"}, {"prompt": "10+10=", "answer": "02"}], "training")
    batch = collate_prompts(records, pad_id=0)
    assert batch.prompt_mask_BP.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
    rollout = dataset_completions(batch, pad_id=0)
    assert rollout.completion_mask_BT.tolist() == [[True, True, False], [True, True, True]]
    assert rollout.completion_ids_BT[0, 1].item() == 3  # EOS closes the answer


def test_dataset_completions_without_answers_fail_clearly():
    enc = PromptTokenizer(char_tokenizer(), 64, "error", None, None)
    batch = collate_prompts(enc.rows([{"prompt": "1+1="}], "training"), pad_id=0)
    with pytest.raises(ValueError, match="no 'answer'.*lmbda=1"):
        dataset_completions(batch, pad_id=0)


def test_validation_split_is_seeded_and_disjoint():
    source = ListPrompts([{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(50)])  # unique prompts
    a, b = _dm(source, val_size=0.2, seed=3), _dm(source, val_size=0.2, seed=3)
    assert len(a.val_rows) == 10 and len(a.train_rows) == 40
    assert [r["prompt_ids"] for r in a.val_rows] == [r["prompt_ids"] for r in b.val_rows]
    val = {tuple(r["prompt_ids"]) for r in a.val_rows}
    train = {tuple(r["prompt_ids"]) for r in a.train_rows}
    assert val.isdisjoint(train) and len(val | train) == 50
    assert val != {tuple(r["prompt_ids"]) for r in _dm(source, val_size=0.2, seed=4).val_rows}
    with pytest.raises(ValueError, match="val_size=50 leaves no training rows"):
        _dm(source, val_size=50)


def test_list_prompts_and_small_batch_errors():
    with pytest.raises(ValueError, match="ListPrompts.rows\\[1\\]"):
        ListPrompts([{"prompt": "a"}, {"nope": 1}])
    dm = _dm(ListPrompts([{"prompt": "a"}, {"prompt": "b"}]), val_size=0, batch_size=4)
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        dm.train_dataloader()


def test_resumable_sampler_continues_where_it_stopped():
    full = list(ResumablePromptSampler(20, seed=1, num_replicas=1, rank=0))
    resumed = ResumablePromptSampler(20, seed=1, num_replicas=1, rank=0, resume_epoch=0, resume_skip=8)
    assert len(resumed) == 20 and list(resumed) == full[8:]  # len is the whole epoch
    assert len(resumed) == 20 and list(resumed) == full  # the next pass over the epoch is whole again
    resumed.set_epoch(1)
    assert list(resumed) != full and sorted(resumed) == list(range(20))


def test_resumable_sampler_splits_ranks():
    r0 = list(ResumablePromptSampler(10, seed=0, num_replicas=2, rank=0))
    r1 = list(ResumablePromptSampler(10, seed=0, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 5 and not set(r0) & set(r1)


def test_datamodule_position_round_trips_through_state_dict():
    dm = _dm(TaskPrompts(AdditionTask(1, 2), num_rows=40), val_size=0, batch_size=4)
    for _ in range(3):
        dm._advance_position(epoch=0)
    fresh = _dm(TaskPrompts(AdditionTask(1, 2), num_rows=40), val_size=0, batch_size=4)
    fresh.load_state_dict(dm.state_dict())
    order = [int(i) for b in dm.train_dataloader() for i in b.row_index_B]
    resumed = [int(i) for b in fresh.train_dataloader() for i in b.row_index_B]
    full = [int(i) for b in _dm(TaskPrompts(AdditionTask(1, 2), 40), val_size=0, batch_size=4).train_dataloader()
            for i in b.row_index_B]
    assert resumed == full[12:] and order == full[12:]
    assert torch.is_tensor(next(iter(fresh.train_dataloader())).prompt_ids_BP)


@pytest.mark.parametrize("precision, autocast", [("bf16-mixed", True), ("32-true", False)])
def test_rollout_runs_under_the_trainers_precision(precision, autocast):
    """bf16-mixed trains the student under autocast, so its rollout must sample under it too."""
    import lightning as L

    from lit_opd.rollout.datamodule import generation_context

    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False)
    with generation_context(trainer):
        assert torch.is_autocast_enabled("cpu") is autocast
    assert not torch.is_autocast_enabled("cpu")
    with generation_context(None):  # a DataModule used without a Trainer
        assert not torch.is_autocast_enabled("cpu")


def test_rollout_batch_state_round_trips():
    """What EffOPD's loss score keeps in a checkpoint: CPU tensors, same values back."""
    from lit_opd.types import RolloutBatch

    batch = RolloutBatch(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                         torch.tensor([[5, 3], [6, 0]]), torch.tensor([[True, True], [True, False]]),
                         torch.tensor([[-0.5, -1.0], [-2.0, 0.0]]), ["8", None], torch.arange(2),
                         extras={"dropped": 1})
    state = batch.to_state()
    assert "extras" not in state and all(v.device.type == "cpu" for v in state.values() if torch.is_tensor(v))
    back = RolloutBatch.from_state(state, "cpu")
    assert torch.equal(back.sampler_logp_BT, batch.sampler_logp_BT) and back.answers == ["8", None]
    assert back.extras == {}
