"""OPAD's data side: trajectories split per assistant turn (TurnPrompts), tool outputs kept out of the
loss, and the grouped sampler (groups contiguous and in turn order, whole groups per rank, exact
mid-epoch resume) wired into RolloutDataModule by ``group_field``."""

from __future__ import annotations

import json
import types
from itertools import chain

import pytest
import torch

from lit_opd import RolloutDataModule, SamplingParams, TurnPrompts
from lit_opd.rollout.sampler import GroupedPromptSampler, ResumablePromptSampler, row_groups
from lit_opd.rollout.sampling import SampleOutput
from lit_opd.rollout.turns import EpisodeRolloutDataModule, split_turns
from lit_opd.tasks import ToolCalcTask, tool_calc_tokenizer
from lit_opd.tiny import make_tiny_model

SYSTEM = {"role": "system", "content": "Use the tool."}
USER = {"role": "user", "content": "What is 2+3, then times 4?"}
A1 = {"role": "assistant", "content": "CALL add 2 3"}
TOOL = {"role": "tool", "content": "5"}
A2 = {"role": "assistant", "content": "5, now times 4."}
A3 = {"role": "assistant", "content": "20"}
CONVERSATION = [SYSTEM, USER, A1, TOOL, A2, A3]


def test_a_three_turn_conversation_gives_three_samples_with_the_recorded_prefixes():
    rows = split_turns(CONVERSATION, group_id="c7", where="test", extra={"domain": "math"})
    assert [r["messages"] for r in rows] == [
        [SYSTEM, USER], [SYSTEM, USER, A1, TOOL], [SYSTEM, USER, A1, TOOL, A2]]
    assert [r["answer"] for r in rows] == ["CALL add 2 3", "5, now times 4.", "20"]
    assert [r["turn_index"] for r in rows] == [0, 1, 2]
    assert all(r["group_id"] == "c7" and r["num_turns"] == 3 and r["domain"] == "math" for r in rows)
    rows[0]["messages"][0]["content"] = "edited"  # rows hold copies: the trajectory is untouched
    assert SYSTEM["content"] == "Use the tool."


def test_jsonl_trajectories_keep_their_id_and_fields_and_full_mode_gives_one_row_each(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"messages": CONVERSATION, "id": "a", "domain": "math"}, {"messages": [USER, A3]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = TurnPrompts(path=str(path)).load()
    assert [(r["group_id"], r["turn_index"], r["num_turns"]) for r in rows] == [
        ("a", 0, 3), ("a", 1, 3), ("a", 2, 3), (1, 0, 1)]  # no id: the line's index
    assert rows[0]["domain"] == "math" and "domain" not in rows[3]
    full = TurnPrompts(path=str(path), mode="full").load()
    assert [(r["messages"], r["answer"]) for r in full] == [([SYSTEM, USER], "20"), ([USER], "20")]


@pytest.mark.parametrize(("messages", "message"), [
    ([SYSTEM, USER], "has no assistant turn, so there is nothing to distil; drop it or add"),
    ([USER, {"role": "function", "content": "5"}, A3], r"messages\[1\] has role 'function'.*rename it"),
    ([USER, {"role": "tool", "content": 5}, A3], r"messages\[1\] \(tool\) needs a string 'content'"),
    ([A1, USER, A3], "first message is an assistant turn with no context"),
    ("hello", "needs a non-empty list 'messages'"),
])
def test_bad_trajectories_name_the_line_and_the_fix(tmp_path, messages, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        TurnPrompts(path=str(path)).load()


def test_bad_source_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path"):
        TurnPrompts()
    with pytest.raises(ValueError, match="mode='all'"):
        TurnPrompts(task=ToolCalcTask(), mode="all")
    with pytest.raises(FileNotFoundError, match="TurnPrompts.path='nope.jsonl'"):
        TurnPrompts(path="nope.jsonl").load()


def test_the_task_source_grades_each_turn_with_the_tasks_verifier():
    source = TurnPrompts(task=ToolCalcTask(min_terms=3, max_terms=3), num_rows=2)
    rows = source.load()
    assert len(rows) == 6 and [r["turn_index"] for r in rows] == [0, 1, 2, 0, 1, 2]
    first = rows[0]["answer"]  # e.g. "CALL add 37 45": the same call with its arguments swapped passes
    _, tool, a, b = first.split()
    assert source.verify(f"CALL {tool} {b} {a}", first) and not source.verify(rows[2]["answer"], first)


# ----- tool outputs never get loss weight ---------------------------------------------------------
def _datamodule(tok, rows: int = 8, **kwargs) -> RolloutDataModule:  # noqa: ANN001, ANN003
    source = TurnPrompts(task=ToolCalcTask(min_terms=3, max_terms=3), num_rows=rows)
    dm = RolloutDataModule(source, val_size=0, batch_size=3, sampling=SamplingParams(max_new_tokens=8),
                           **kwargs)
    dm.tokenizer = tok
    dm.setup("fit")
    return dm


def test_tool_outputs_sit_in_the_prompt_and_the_loss_covers_only_the_generated_turn():
    tok = tool_calc_tokenizer()
    dm = _datamodule(tok, group_field="group_id")
    batch = next(iter(dm.train_dataloader()))  # one trajectory's three turns
    assert [r["turn_index"] for r in batch.rows] == [0, 1, 2]

    class Holder(torch.nn.Module):
        policy = make_tiny_model(len(tok), 32, 2, seed=0, max_positions=160)

    for source in ("student", "dataset"):
        rollout = dm.rollout(batch, Holder(), source, step=0)
        assert torch.equal(rollout.loss_mask_BT, rollout.completion_mask_BT)
        prompts = tok.batch_decode(rollout.prompt_ids_BP.tolist(), skip_special_tokens=True)
        last_tool = batch.rows[2]["messages"][-1]["content"]
        assert prompts[2].endswith(f"tool: {last_tool}assistant: ")
        trained = [ids[mask].tolist() for ids, mask in zip(rollout.completion_ids_BT, rollout.loss_mask_BT)]
        assert not any("tool:" in tok.decode(ids) for ids in trained)
    assert [tok.decode(ids, skip_special_tokens=True) for ids in trained] == [r["answer"] for r in batch.rows]


# ----- the grouped sampler ------------------------------------------------------------------------
GROUPS = [[0, 1, 2], [3, 4], [5], [6, 7, 8], [9, 10]]


def _runs(indices: list[int]) -> list[tuple[int, ...]]:
    """The stream cut where it moves from one group to another."""
    owner = {i: g for g, members in enumerate(GROUPS) for i in members}
    runs: list[list[int]] = []
    for i in indices:
        if runs and owner[runs[-1][-1]] == owner[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [tuple(r) for r in runs]


def test_groups_are_shuffled_whole_contiguous_and_in_turn_order():
    sampler = GroupedPromptSampler(GROUPS, seed=0, num_replicas=1, rank=0)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(11)) and len(sampler) == 11
    # each group once, in one piece, in order
    assert sorted(_runs(epoch0)) == sorted(tuple(g) for g in GROUPS)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(0)).tolist()
    assert epoch0 == list(chain.from_iterable(GROUPS[g] for g in order))
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(_runs(list(sampler))) == sorted(tuple(g) for g in GROUPS)


def test_two_ranks_get_disjoint_whole_groups_and_equal_lengths():
    ranks = [GroupedPromptSampler(GROUPS, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    streams = [list(s) for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == len(streams[0]) == len(streams[1]) == 7  # ceil((11 + 3) / 2)
    owned = [ranks[0].rank_rows(0)[r] for r in (0, 1)]
    assert not set(owned[0]) & set(owned[1]) and sorted(owned[0] + owned[1]) == list(range(11))
    for stream, mine in zip(streams, owned):
        assert stream[: len(mine)] == mine and set(stream) == set(mine)  # padding repeats the rank's own rows
        assert set(_runs(mine)) <= {tuple(g) for g in GROUPS}


def test_resume_continues_at_the_exact_next_index():
    for rank in (0, 1):
        full = GroupedPromptSampler(GROUPS, seed=1, num_replicas=2, rank=rank)
        full.set_epoch(2)
        resumed = GroupedPromptSampler(GROUPS, seed=1, num_replicas=2, rank=rank, resume_epoch=2,
                                       resume_skip=4)
        resumed.set_epoch(2)
        assert list(resumed) == list(full)[4:] and len(resumed) == len(full)
        assert list(resumed) == list(full)  # only the first pass over the resumed epoch skips


def test_sampler_refuses_fewer_groups_than_ranks():
    with pytest.raises(ValueError, match="whole groups to 2 rank.*got 1 group"):
        GroupedPromptSampler([[0, 1]], seed=0, num_replicas=2, rank=0)


def test_datamodule_group_field_batches_whole_trajectories_and_resumes():
    tok = tool_calc_tokenizer()
    dm = _datamodule(tok, rows=6, group_field="group_id")
    groups = [tuple(r["row"]["group_id"] for r in [dm.train_rows[i] for i in batch.row_index_B.tolist()])
              for batch in dm.train_dataloader()]
    assert len(groups) == 6 and all(len(set(g)) == 1 for g in groups)  # batch 3 = one 3-turn trajectory
    assert sorted(g[0] for g in groups) == list(range(6))
    dm.load_state_dict({"epoch": 0, "batches_done": 2})
    resumed = [batch.rows[0]["group_id"] for batch in dm.train_dataloader()]
    assert resumed == [g[0] for g in groups][2:]
    ungrouped = _datamodule(tok, rows=6)
    assert type(ungrouped.train_dataloader().sampler) is ResumablePromptSampler  # the default is unchanged


def test_validation_split_takes_whole_trajectories():
    tok = tool_calc_tokenizer()
    source = TurnPrompts(task=ToolCalcTask(), num_rows=20)
    dm = RolloutDataModule(source, val_size=0.25, group_field="group_id")
    dm.tokenizer = tok
    dm.setup("fit")
    val, train = ({r["row"]["group_id"] for r in rows} for rows in (dm.val_rows, dm.train_rows))
    assert len(val) == 5 and not val & train and len(val | train) == 20
    assert len(dm.val_rows) + len(dm.train_rows) == len(TurnPrompts(task=ToolCalcTask(), num_rows=20).load())


def test_a_row_without_the_group_field_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"group_field='group_id': training row 1 has no 'group_id'.*"
                                         r"TurnPrompts does\) or set group_field: null"):
        row_groups([{"row": {"group_id": 0}}, {"row": {"prompt": "x"}}], "group_id", "training")
    tok = tool_calc_tokenizer()
    dm = _datamodule(tok, rows=4, group_field="trajectory")
    with pytest.raises(ValueError, match="group_field='trajectory'"):
        dm.train_dataloader()


# ----- mode full: tool spans inside the completion, out of the loss -------------------------------
TASK = ToolCalcTask(min_terms=3, max_terms=3)


class ScriptedEpisodes(EpisodeRolloutDataModule):
    """Turns come from the recorded trajectories instead of a model (the last one ends on a wrong
    answer), so the episode's assembly is checked exactly."""

    def sample_turn(self, model, contexts, params, draw, batch, source):  # noqa: ANN001, ANN201
        tok, rows = self.tokenizer, []
        script = {r["messages"][0]["content"]: [m["content"] for m in r["messages"][1::2]]
                  for r in TASK.make_rows(2, seed=0)}  # user, then assistant and tool by turns
        script[list(script)[1]][-1] = "0"
        for context in contexts:
            text = tok.decode(context, skip_special_tokens=True)
            turns = script[text.removeprefix("user: ").split("assistant")[0]]
            reply = turns[text.count("tool: ")]  # turns written so far = tool replies seen
            rows.append(tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        T = max(map(len, rows))
        ids_BT = torch.zeros(len(rows), T, dtype=torch.long)
        mask_BT = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, ids in enumerate(rows):
            ids_BT[i, :len(ids)], mask_BT[i, :len(ids)] = torch.tensor(ids), True
        return SampleOutput(ids_BT, mask_BT, mask_BT.float() * -0.5, torch.zeros(len(rows), dtype=torch.bool))


def test_full_mode_puts_tool_spans_in_the_completion_with_no_loss_weight():
    tok = tool_calc_tokenizer()
    dm = ScriptedEpisodes(TurnPrompts(task=TASK, num_rows=2, mode="full"), val_size=0, batch_size=2,
                          sampling=SamplingParams(max_new_tokens=16))
    dm.tokenizer = tok
    dm.setup("fit")
    assert [r["row"]["messages"] for r in dm.train_rows] == [r["messages"][:1] for r in TASK.make_rows(2, 0)]
    batch = next(iter(dm.loader(dm.train_rows, 2)))
    rollout = dm.rollout(batch, types.SimpleNamespace(policy=torch.nn.Linear(1, 1)), "student", step=0)
    for b, messages in enumerate(r["messages"] for r in TASK.make_rows(2, 0)):
        a1, t1, a2, t2, a3 = (m["content"] for m in messages[1:])
        a3 = "0" if b == 1 else a3
        completion = rollout.completion_ids_BT[b][rollout.completion_mask_BT[b]].tolist()
        assert tok.decode(completion) == (f"{a1}<eos><bos>tool: {t1}<eos><bos>assistant: {a2}<eos>"
                                          f"<bos>tool: {t2}<eos><bos>assistant: {a3}<eos>")
        trained = rollout.completion_ids_BT[b][rollout.loss_mask_BT[b]].tolist()
        assert tok.decode(trained) == f"{a1}<eos>{a2}<eos>{a3}<eos>"  # the tool spans get no loss weight
        untrained = rollout.completion_mask_BT[b] & ~rollout.loss_mask_BT[b]
        assert tok.decode(rollout.completion_ids_BT[b][untrained].tolist()) == (
            f"<bos>tool: {t1}<eos><bos>assistant: <bos>tool: {t2}<eos><bos>assistant: ")
        assert (rollout.sampler_logp_BT[b][untrained] == 0).all()
        assert (rollout.sampler_logp_BT[b][rollout.loss_mask_BT[b]] == -0.5).all()
    assert not rollout.truncated_B.any()
    assert dm.grade(rollout).tolist() == [1.0, 0.0]  # graded on the last turn: row 1 answered "0"


def test_full_mode_stops_at_max_turns_and_needs_a_tool():
    tok = tool_calc_tokenizer()
    source = TurnPrompts(task=TASK, num_rows=2, mode="full")
    dm = ScriptedEpisodes(source, val_size=0, batch_size=2, max_turns=2)
    dm.tokenizer = tok
    dm.setup("fit")
    holder = types.SimpleNamespace(policy=torch.nn.Linear(1, 1))
    rollout = dm.rollout(next(iter(dm.loader(dm.train_rows, 2))), holder, "student", step=0)
    texts = [tok.decode(ids[m].tolist())
             for ids, m in zip(rollout.completion_ids_BT, rollout.completion_mask_BT)]
    assert [text.count("tool: ") for text in texts] == [1, 1]
    with pytest.raises(ValueError, match="mode full needs a task with a tool"):
        TurnPrompts(path="unused.jsonl", mode="full").respond("CALL add 1 2")
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        EpisodeRolloutDataModule(TurnPrompts(task=TASK), max_turns=0)
