"""Prompt sources, tokenization, splits and the resumable sampler of the RolloutDataModule."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lit_opd.methods.base import PolicyModule
from lit_opd.rollout import JsonlPrompts, ListPrompts, RolloutDataModule, TaskPrompts
from lit_opd.rollout.prompts import dataset_completions
from lit_opd.rollout.prompts import PromptTokenizer, collate_prompts
from lit_opd.rollout.sampler import ResumablePromptSampler
from lit_opd.tasks import AdditionTask, char_tokenizer
from lit_opd.types import RolloutBatch, SamplingParams
from tests.helpers import addition_rows, make_tiny_model

# Rows with fields the encoder never reads: they must still reach the method, untouched.
META_ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1), "domain": "math", "meta": {"id": i, "tags": ["x"]}}
             for i in range(6)]


def _dm(source, **kwargs):
    dm = RolloutDataModule(source, **kwargs)
    dm.tokenizer = char_tokenizer()
    dm.setup("fit")
    return dm


def _attached_dm(module, source, **kwargs):
    """A datamodule set up under a (not running) CPU Trainer that holds ``module``, as in ``fit``."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    dm = RolloutDataModule(source, **kwargs)
    dm.trainer = trainer
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

    from lit_opd.rollout.distributed import generation_context

    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False)
    with generation_context(trainer):
        assert torch.is_autocast_enabled("cpu") is autocast
    assert not torch.is_autocast_enabled("cpu")
    with generation_context(None):  # a DataModule used without a Trainer
        assert not torch.is_autocast_enabled("cpu")


def test_rollout_batch_state_round_trips():
    """What EffOPD's loss score keeps in a checkpoint: CPU tensors, same values back."""
    from lit_opd.types import RolloutBatch

    batch = RolloutBatch(
        prompt_ids_BP=torch.ones(2, 3, dtype=torch.long), prompt_mask_BP=torch.ones(2, 3, dtype=torch.long),
        completion_ids_BT=torch.tensor([[5, 3], [6, 0]]), completion_mask_BT=torch.tensor([[True, True], [True, False]]),
        sampler_logp_BT=torch.tensor([[-0.5, -1.0], [-2.0, 0.0]]), answers=["8", None], row_index_B=torch.arange(2),
        extras={"dropped": 1},
    )
    state = batch.to_state()
    assert "extras" not in state and all(v.device.type == "cpu" for v in state.values() if torch.is_tensor(v))
    back = RolloutBatch.from_state(state, "cpu")
    assert torch.equal(back.sampler_logp_BT, batch.sampler_logp_BT) and back.answers == ["8", None]
    assert back.extras == {}


def test_records_and_prompt_batches_carry_a_copy_of_the_source_row():
    enc = PromptTokenizer(char_tokenizer(), 64, "error", None, None)
    records = enc.rows(META_ROWS[:2], "training")
    assert [r["row"] for r in records] == META_ROWS[:2] and records[0]["row"] is not META_ROWS[0]
    batch = collate_prompts(records, pad_id=0)
    assert batch.rows == META_ROWS[:2] and batch.to("cpu").rows == META_ROWS[:2]
    by_hand = {"prompt_ids": [5], "answer": None, "answer_ids": [], "row_index": 0}  # raw text, no source row
    assert collate_prompts([by_hand], pad_id=0).rows == [{}]


def _row_sources(kind: str) -> tuple:
    if kind == "list":
        return ListPrompts(META_ROWS[:4]), ListPrompts(META_ROWS[4:])
    return TaskPrompts(AdditionTask(1, 2), num_rows=4), TaskPrompts(AdditionTask(1, 2), num_rows=2, seed=1)


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("kind", ["list", "task"])
def test_source_rows_travel_with_every_rollout_batch(char_tok, kind, num_samples):
    """Training (on-policy, G samples a prompt), validation (greedy, one) and dataset completions
    carry each row's source row, and train on every generated token unless a source says otherwise."""
    train, val = _row_sources(kind)
    if kind == "task":  # TaskPrompts rows are the task's own rows, every field included
        assert train.load() == addition_rows(4) and val.load() == addition_rows(2, seed=1)
    module = PolicyModule(make_tiny_model(len(char_tok)), tokenizer=char_tok)
    dm = _attached_dm(module, train, val_source=val, batch_size=2,
                      sampling=SamplingParams(max_new_tokens=3, num_samples=num_samples))
    dm.trainer.training = True
    prompts = next(iter(dm.train_dataloader()))
    expected = [train.load()[i] for i in prompts.row_index_B.tolist()]
    batches = [(dm.on_after_batch_transfer(prompts.to("cpu"), 0), num_samples)]
    batches.append((dm.rollout(prompts, module, "dataset", step=0), 1))
    dm.trainer.validating = True
    val_prompts = next(iter(dm.val_dataloader()))
    batches.append((dm.on_after_batch_transfer(val_prompts.to("cpu"), 0), 1))
    val_expected = [val.load()[i] for i in val_prompts.row_index_B.tolist()]
    sources = (("student", expected), ("dataset", expected), ("greedy", val_expected))
    for (batch, G), (source, rows) in zip(batches, sources):
        assert batch.source == source and len(batch.rows) == batch.completion_ids_BT.shape[0]
        assert batch.rows == [row for row in rows for _ in range(G)]
        assert torch.equal(batch.loss_mask_BT, batch.completion_mask_BT)


def test_setup_hands_the_encoded_prompts_to_the_method_once(char_tok):
    class Recording(PolicyModule):
        def connect_prompts(self, encoder, train_rows, val_rows):  # noqa: ANN001
            self.calls = [*getattr(self, "calls", []), (encoder, train_rows, val_rows)]

    module = Recording(make_tiny_model(len(char_tok)), tokenizer=char_tok)
    dm = _attached_dm(module, ListPrompts(META_ROWS[:4]), val_source=ListPrompts(META_ROWS[4:]))
    [(encoder, train_rows, val_rows)] = module.calls
    assert isinstance(encoder, PromptTokenizer) and encoder.tokenizer is char_tok
    assert train_rows is dm.train_rows and val_rows is dm.val_rows
    assert [r["row"] for r in val_rows] == META_ROWS[4:]


def test_setup_leaves_other_lightning_modules_alone(char_tok):
    module = L.LightningModule()
    module.tokenizer = char_tok  # a plain module never hears of connect_prompts, and setup still works
    dm = _attached_dm(module, ListPrompts(META_ROWS), val_size=2)
    assert len(dm.train_rows) == 4 and len(dm.val_rows) == 2


def test_rollout_batch_state_round_trips_rows_and_loss_mask():
    completion_BT = torch.tensor([[True, True, True], [True, False, False]])
    loss_BT = torch.tensor([[True, False, True], [True, False, False]])  # e.g. a tool's output masked out
    ones_BP = torch.ones(2, 1, dtype=torch.long)
    fields = dict(prompt_ids_BP=ones_BP, prompt_mask_BP=ones_BP,
                  completion_ids_BT=torch.tensor([[5, 6, 3], [3, 0, 0]]), completion_mask_BT=completion_BT,
                  sampler_logp_BT=None, answers=["1", "2"], row_index_B=torch.arange(2), rows=META_ROWS[:2])
    back = RolloutBatch.from_state(RolloutBatch(**fields, loss_mask_BT=loss_BT).to_state(), "cpu")
    assert back.rows == META_ROWS[:2] and torch.equal(back.loss_mask_BT, loss_BT)
    default = RolloutBatch.from_state(RolloutBatch(**fields).to_state(), "cpu")
    assert torch.equal(default.loss_mask_BT, completion_BT) and default.rows == META_ROWS[:2]
