"""Multi-turn (tool-use) trajectories as per-turn prompts: OPAD's step-level split.

A trajectory with n assistant turns becomes n rows. Row i holds the *recorded* history before
assistant turn i (system, user, earlier assistant turns and tool outputs) as ``messages``, the
recorded turn as ``answer`` (for the verifier and for dataset completions), and ``group_id``,
``turn_index`` and ``num_turns``. The student then generates only turn i, on-policy, after a
history that came from the data, so one wrong step does not derail the later ones
("teacher_forcing"). Tool outputs live only in the prompt and are never trained on.

``mode: full`` instead yields one row per trajectory, its history up to the first assistant turn,
and the student plays every turn against the tool (:class:`EpisodeRolloutDataModule`).

Turns of a trajectory share ``group_id``; ``RolloutDataModule(group_field="group_id")`` keeps them
together and in order (:class:`~lit_opd.rollout.sampler.GroupedPromptSampler`).
"""

from __future__ import annotations

import json
from typing import Literal

import torch

from lit_opd.errors import SettingError
from lit_opd.rollout.datamodule import RolloutDataModule, step_seed
from lit_opd.rollout.engines import BuiltinEngine
from lit_opd.rollout.prompts import eos_ids, left_pad
from lit_opd.rollout.sources import PromptSource, read_lines
from lit_opd.tasks.base import Task
from lit_opd.types import RolloutBatch

ROLES = ("system", "user", "assistant", "tool")
TURN_FIELDS = ("messages", "answer", "group_id", "turn_index", "num_turns")


def check_messages(messages: object, where: str) -> list[dict]:
    """A list of ``{"role": one of ROLES, "content": str}``; one error naming the message and the fix."""
    if not isinstance(messages, list) or not messages:
        raise SettingError(f"{where}: a trajectory needs a non-empty list 'messages'")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise SettingError(f"{where}: messages[{i}] has role {role!r}; TurnPrompts reads the roles "
                             f"{list(ROLES)} (rename it, e.g. 'function' -> 'tool')")
        if not isinstance(message.get("content"), str):
            raise SettingError(f"{where}: messages[{i}] ({role}) needs a string 'content'")
    return messages


def split_turns(
    messages: list[dict], group_id: object, where: str, extra: dict | None = None,
) -> list[dict]:
    """One row per assistant turn: the recorded history before it, the turn itself as ``answer``."""
    check_messages(messages, where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise SettingError(f"{where}: the trajectory has no assistant turn, so there is nothing to distil; "
                         "drop it or add the assistant's turns")
    if turns[0] == 0:
        raise SettingError(f"{where}: the first message is an assistant turn with no context before it; "
                         "start the trajectory with a system or user message")
    return [
        {**(extra or {}), "messages": [dict(m) for m in messages[:index]],
         "answer": messages[index]["content"], "group_id": group_id, "turn_index": turn,
         "num_turns": len(turns)}
        for turn, index in enumerate(turns)
    ]


class TurnPrompts(PromptSource):
    """Multi-turn trajectories split into per-turn prompts (module docstring).

    Args:
        path: a JSONL file, one trajectory per line: ``{"messages": [...], "id": optional}`` with
            roles system/user/assistant/tool; other fields are copied onto every turn's row.
        task: or a :class:`~lit_opd.tasks.Task` whose rows are trajectories (e.g. ``ToolCalcTask``);
            its verifier grades each turn.
        num_rows, seed: trajectories drawn from ``task``.
        mode: "teacher_forcing" (a row per assistant turn) or "full" (a row per trajectory: the
            history before its first assistant turn; ``answer`` is the final turn).
    """

    def __init__(self, path: str | None = None, task: Task | None = None, num_rows: int = 1000, seed: int = 0,
                 mode: Literal["teacher_forcing", "full"] = "teacher_forcing") -> None:
        if (path is None) == (task is None):
            raise SettingError("TurnPrompts needs exactly one of path (a JSONL file of trajectories) or task")
        if mode not in ("teacher_forcing", "full"):
            raise SettingError(f"TurnPrompts.mode={mode!r}: use 'teacher_forcing' or 'full'")
        if num_rows < 1:
            raise SettingError(f"TurnPrompts.num_rows must be >= 1, got {num_rows}")
        self.path, self.task, self.num_rows, self.seed, self.mode = path, task, num_rows, seed, mode

    def trajectories(self) -> list[tuple[str, dict]]:
        """(where, trajectory) pairs, in file or task order."""
        if self.task is not None:
            rows = self.task.make_rows(self.num_rows, self.seed)
            return [(f"TurnPrompts task row {i}", row) for i, row in enumerate(rows)]
        out = []
        for lineno, line in read_lines(self.path, "TurnPrompts.path"):
            if line.strip():
                try:
                    out.append((f"{self.path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise SettingError(f"{self.path}:{lineno}: not valid JSON ({err.msg})") from err
        if not out:
            raise SettingError(f"TurnPrompts.path={self.path!r} holds no trajectories")
        return out

    def load(self) -> list[dict]:
        rows = []
        for index, (where, trajectory) in enumerate(self.trajectories()):
            if not isinstance(trajectory, dict):
                raise SettingError(f"{where}: expected an object with 'messages', got "
                                 f"{type(trajectory).__name__}")
            extra = {k: v for k, v in trajectory.items() if k not in (*TURN_FIELDS, "id")}
            turns = split_turns(trajectory.get("messages"), trajectory.get("id", index), where, extra)
            if self.mode == "full":  # the first turn's history; the episode is graded on its last turn
                turns = [{**turns[0], "answer": turns[-1]["answer"]}]
            rows += turns
        return rows

    def verify(self, completion: str, answer: str | None) -> bool:
        if self.task is not None:
            return self.task.verify(completion, answer)
        return super().verify(completion, answer)

    def respond(self, assistant_text: str) -> str | None:
        """The tool's reply to a generated turn (None: no call, the episode ends), for mode full."""
        respond = getattr(self.task, "respond", None)
        if respond is None:
            raise SettingError("TurnPrompts mode full needs a task with a tool (a respond(text) method, e.g. "
                             "ToolCalcTask); recorded JSONL trajectories have no tool to call")
        return respond(assistant_text)


# ----- mode "full": the student plays every turn against the tool ---------------------------------
def tool_reply_ids(
    tokenizer, assistant_text: str, reply: str, template_kwargs: dict | None = None,  # noqa: ANN001
) -> list[int]:
    """The tokens that follow a finished assistant turn (its end-of-turn token already generated): the
    tool message and the next generation prompt, as the chat template renders them after that turn
    (with the datamodule's ``chat_template_kwargs``)."""
    turn, kwargs = [{"role": "assistant", "content": assistant_text}], template_kwargs or {}
    before = tokenizer.apply_chat_template(turn, tokenize=False, **kwargs)
    after = tokenizer.apply_chat_template([*turn, {"role": "tool", "content": reply}],
                                          add_generation_prompt=True, tokenize=False, **kwargs)
    if not after.startswith(before):
        raise SettingError("EpisodeRolloutDataModule: the chat template renders an assistant turn differently "
                         "once a tool message follows it; use a template that only appends later messages")
    # What the template writes after the end-of-turn token (e.g. a newline) was not generated: add it here.
    eos = tokenizer.eos_token
    tail = before[before.rfind(eos) + len(eos):] if eos and eos in before else ""
    return tokenizer(tail + after[len(before):], add_special_tokens=False)["input_ids"]


class EpisodeRolloutDataModule(RolloutDataModule):
    """A RolloutDataModule for ``TurnPrompts(mode="full")``: the student writes an assistant turn, the
    source's tool answers it (``respond``), the tool's message and the next generation prompt are
    appended, and the student goes on, until a turn calls no tool or ``max_turns`` turns are written.

    The completion holds every generated turn *and* the tool spans between them; ``loss_mask_BT`` is
    False on the tool spans (and their sampler log-probs are 0), so the objective never trains on
    them, while the teacher and the student still read them as context. Validation grades the last
    turn. Other settings: :class:`RolloutDataModule`; ``sampling.max_new_tokens`` limits each turn.
    """

    def __init__(self, *args, max_turns: int = 10, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        if max_turns < 1:
            raise SettingError(f"EpisodeRolloutDataModule.max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns

    def complete(self, model, batch, params, seed, source):  # noqa: ANN001, ANN201 - see the base
        if params.num_samples != 1:
            raise SettingError("EpisodeRolloutDataModule plays one episode per prompt; set "
                             "sampling.num_samples: 1")
        respond = (self.val_source if source == "greedy" and self.val_source else self.source).respond
        contexts = [ids[mask.bool()].tolist() for ids, mask in zip(batch.prompt_ids_BP, batch.prompt_mask_BP)]
        pieces: list[list[tuple[list[int], bool, list[float]]]] = [[] for _ in contexts]
        # The built-in engine draws every turn from one stream; an engine that takes a seed per call
        # (vLLM) gets one per turn.
        generator = torch.Generator(device=batch.prompt_ids_BP.device).manual_seed(seed)
        finals, active = [""] * len(contexts), list(range(len(contexts)))
        for turn in range(self.max_turns):
            out = self.sample_turn(model, [contexts[b] for b in active], params, (seed, turn, generator), batch,
                                   source)
            still = []
            for i, b in enumerate(active):
                ids, logp = out.tokens_BT[i][out.mask_BT[i]].tolist(), out.logp_BT[i][out.mask_BT[i]].tolist()
                finals[b] = self.tokenizer.decode(ids, skip_special_tokens=True)
                pieces[b].append((ids, True, logp))
                reply = respond(finals[b]) if ids and ids[-1] in eos_ids(self.tokenizer) else None
                if reply is not None and turn + 1 < self.max_turns:
                    template_kwargs = self.prompt_settings.get("chat_template_kwargs")
                    tool_ids = tool_reply_ids(self.tokenizer, finals[b], reply, template_kwargs)
                    pieces[b].append((tool_ids, False, [0.0] * len(tool_ids)))
                    contexts[b] = contexts[b] + ids + tool_ids
                    still.append(b)
            active = still
            if not active:
                break
        rollout = episode_batch(batch, pieces, self.tokenizer.pad_token_id, eos_ids(self.tokenizer), source)
        rollout.extras["final_texts"] = finals
        return rollout

    def sample_turn(self, model, contexts: list[list[int]], params, draw, batch, source):  # noqa: ANN001, ANN201
        """One turn for each context (left padded on the batch's device); ``draw`` = (episode seed, turn,
        the episode's generator). The student's turns go through the engine, a teacher's are sampled here."""
        seed, turn, generator = draw
        ids_BP, mask_BP = left_pad(contexts, self.tokenizer.pad_token_id, batch.prompt_ids_BP.device)
        if source == "teacher":
            return BuiltinEngine().generate(model, ids_BP, mask_BP, params, seed=seed, generator=generator,
                                            eos_token_ids=eos_ids(self.tokenizer),
                                            pad_token_id=self.tokenizer.pad_token_id)
        return self.sample_student(model, ids_BP, mask_BP, params, step_seed(seed, turn, 0), generator)

    def decode(self, rollout: RolloutBatch) -> list[str]:
        """The last assistant turn of each episode (what the verifier grades)."""
        return rollout.extras.get("final_texts") or super().decode(rollout)


def episode_batch(batch, pieces: list[list[tuple[list[int], bool, list[float]]]], pad_id: int,  # noqa: ANN001
                  eos: list[int], source: str) -> RolloutBatch:
    """Right-padded completions from each row's (token ids, trained?, sampler log-probs) pieces."""
    device = batch.prompt_ids_BP.device
    T = max(sum(len(ids) for ids, _, _ in row) for row in pieces)
    ids_BT = torch.full((len(pieces), T), pad_id, dtype=torch.long, device=device)
    mask_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
    loss_BT, logp_BT = torch.zeros_like(mask_BT), torch.zeros(ids_BT.shape, device=device)
    for b, row in enumerate(pieces):
        ids = [t for piece, _, _ in row for t in piece]
        ids_BT[b, :len(ids)], mask_BT[b, :len(ids)] = torch.tensor(ids, dtype=torch.long), True
        loss_BT[b, :len(ids)] = torch.tensor([trained for piece, trained, _ in row for _ in piece])
        logp_BT[b, :len(ids)] = torch.tensor([lp for _, _, logp in row for lp in logp])
    # An episode ends on a generated turn: cut when that turn has no EOS (it hit max_new_tokens).
    truncated_B = torch.tensor([not row[-1][0] or row[-1][0][-1] not in eos for row in pieces])
    return RolloutBatch(
        prompt_ids_BP=batch.prompt_ids_BP, prompt_mask_BP=batch.prompt_mask_BP, completion_ids_BT=ids_BT,
        completion_mask_BT=mask_BT, sampler_logp_BT=logp_BT, answers=list(batch.answers),
        row_index_B=batch.row_index_B, source=source, truncated_B=truncated_B.to(device),
        loss_mask_BT=loss_BT, rows=list(batch.rows),
    )
