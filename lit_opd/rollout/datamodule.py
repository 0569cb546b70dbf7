"""RolloutDataModule: prompts on the CPU, on-policy completions on the accelerator.

The DataLoader yields :class:`PromptBatch` es; once Lightning has moved one to the device,
:meth:`RolloutDataModule.on_after_batch_transfer` completes it with the *current* student
(``trainer.lightning_module.policy``) and hands a :class:`RolloutBatch` to the method. Validation
and test batches are decoded as ``evaluation`` says (greedy by default) and graded by the verifier.

Shared by every method; a method chooses where completions come from per step through
``completion_source()`` (student, teacher or dataset) — GKD's on/off-policy mix. The student's
completions come from the datamodule's rollout engine (``engine``: the built-in sampler by default,
or vLLM), through :meth:`RolloutDataModule.sample_student` — the one door every student
generation passes, validation and methods' extra samples included.
"""

from __future__ import annotations

import time
import warnings
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_opd.errors import SettingError
from lit_opd.rollout.distributed import generation_context, ranks_agree
from lit_opd.rollout.engines import BuiltinEngine, RolloutEngine
from lit_opd.rollout.evaluation import Evaluation, greedy_accuracy, greedy_correct
from lit_opd.rollout.prompts import (
    PromptConsumer, PromptTokenizer, collate_prompts, dataset_completions, decode_completions, eos_ids,
)
from lit_opd.rollout.sampler import GroupedPromptSampler, ResumablePromptSampler, row_groups
from lit_opd.rollout.sampling import SampleOutput
from lit_opd.rollout.settings import (
    check_batch_sizes,
    check_positions,
    check_val_size,
    data_seed,
    max_positions,
    rollout_seed,
    split_validation,
)
from lit_opd.rollout.settings import step_seed as step_seed  # re-exported: turns and methods import it here
from lit_opd.rollout.sources import PromptSource
from lit_opd.rollout.verifiers import Verifier, check_verifier, checked_score
from lit_opd.types import PromptBatch, RolloutBatch, SamplingParams

RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class RolloutDataModule(L.LightningDataModule):
    """Prompt sources, chat templating, left padding and on-policy generation.

    Args:
        source: training prompts (``JsonlPrompts``, ``ListPrompts`` or ``TaskPrompts``).
        val_source: validation prompts with answers; when None, ``val_size`` rows are split off
            ``source``.
        val_size: size of that split: a float in [0, 1) is a fraction of the rows (at least one row),
            an int a count; 0 disables validation. Anything else (1.0, 1.5, -1) is refused.
        batch_size: prompts per training step and device (rows = ``batch_size × num_samples``).
        val_batch_size: prompts per validation step (None = ``batch_size``).
        sampling: how training completions are drawn.
        val_max_new_tokens: completion limit for validation and test (defaults to sampling's).
        evaluation: how validation and test decode and score (:class:`Evaluation`: greedy or sampled,
            ``num_samples``, ``pass_k``, the per-domain breakdown, ``log_completions``); greedy
            accuracy by default.
        test_source: prompts with answers for ``trainer.test``; when None, test uses the validation
            rows.
        max_prompt_tokens: longest prompt allowed, in tokens. With the attached student, the longest
            prompt plus ``max_new_tokens`` must also fit its ``max_position_embeddings`` (checked at setup).
        over_long_prompts: what to do with a longer one: "error" (naming the row), "truncate"
            (keep its last ``max_prompt_tokens`` tokens) or "skip".
        use_chat_template: wrap prompts with the tokenizer's chat template; None = when it has one.
        system_prompt: system message prepended when the chat template is used.
        seed: shuffling and sampling seed (identical streams on resume); any int.
        num_workers: DataLoader workers (prompts are small; 0 is usually right).
        tokenizer: tokenizer path; None takes the attached method's ``tokenizer``.
        group_field: keep the rows that share this field's value together and in ``turn_index``
            order (the turns of one trajectory, ``TurnPrompts``' ``group_id``): groups are shuffled
            and dealt whole to ranks (:class:`GroupedPromptSampler`), and a validation split takes
            whole groups. None = rows shuffled one by one.
        chat_template: a Jinja chat template, or the path of a file holding one (``.jinja``, or a JSON
            file with a ``chat_template`` key), used instead of the tokenizer's own for every prompt.
        chat_template_kwargs: extra variables for the chat template, e.g. ``{enable_thinking: false}``
            for Qwen3.
        verifier: grades validation completions (``lit_opd.rollout.verifiers``: ``ExactMatch``,
            ``RegexMatch``, ``MathVerify``; from Python, any callable ``(completion, answer, row) ->
            float`` in [0, 1]). None = the prompt source's own ``verify`` (a task's checker, else
            exact match).
    """

    def __init__(
        self,
        source: PromptSource,
        val_source: PromptSource | None = None,
        val_size: int | float = 0.1,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        sampling: SamplingParams = SamplingParams(),
        val_max_new_tokens: int | None = None,
        max_prompt_tokens: int = 512,
        over_long_prompts: Literal["error", "truncate", "skip"] = "error",
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
        group_field: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        verifier: Verifier | None = None,
        engine: RolloutEngine | None = None,
        evaluation: Evaluation = Evaluation(),
        test_source: PromptSource | None = None,
    ) -> None:
        super().__init__()
        check_batch_sizes(batch_size, val_batch_size)
        check_val_size(val_size)
        check_verifier(verifier)
        self.source, self.val_source, self.test_source = source, val_source, test_source
        self.val_size = val_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.sampling, self.evaluation, self.verifier = sampling, evaluation, verifier
        self.val_sampling = evaluation.sampling_params(val_max_new_tokens or sampling.max_new_tokens)
        self.prompt_settings = dict(  # PromptTokenizer's arguments
            max_prompt_tokens=max_prompt_tokens, over_long=over_long_prompts,
            use_chat_template=use_chat_template, system_prompt=system_prompt,
            chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
        )
        self.seed, self.num_workers, self.tokenizer_path = seed, num_workers, tokenizer
        self.group_field = group_field
        self.engine = engine if engine is not None else BuiltinEngine()
        self._weight_edits = 0  # weight changes outside optimizer steps (EffOPD, a checkpoint load)
        self.tokenizer = None
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.test_rows: list[dict] = []
        self._skipped = 0  # training rows dropped as over-long (over_long_prompts="skip")
        self._epoch_position = {"epoch": 0, "batches_done": 0}

    # ----- prompts (CPU) --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Encode the training / validation rows (splitting validation off ``source`` if asked) and
        hand them to the attached method's ``PolicyModule.connect_prompts``."""
        if self.tokenizer is None:
            self.tokenizer = self._resolve_tokenizer()
        encode = PromptTokenizer(self.tokenizer, **self.prompt_settings)
        if encode.template is not None:
            # The override becomes the tokenizer's own, so every rendering (multi-turn tool replies,
            # MAD-OPD's debate), the checkpoint's tokenizer files and an export chat as the run was trained.
            self.tokenizer.chat_template = encode.template
        rows = self.source.load()
        train, val = list(range(len(rows))), []
        if self.val_source is None and self.val_size > 0:
            train, val = self._split_validation(rows)
        names = [self.source.row_name(i, "training") for i in train]
        self.train_rows = encode.rows([rows[i] for i in train], "training", names)
        self._skipped = encode.skipped
        val_source = self.val_source or self.source
        if self.val_source is not None:
            rows = self.val_source.load()
            val = list(range(len(rows)))
        val_names = [val_source.row_name(i, "validation") for i in val]
        self.val_rows = encode.rows([rows[i] for i in val], "validation", val_names) if val else []
        self.test_rows = self.val_rows
        if self.test_source is not None:
            test_rows = self.test_source.load()
            test_names = [self.test_source.row_name(i, "test") for i in range(len(test_rows))]
            self.test_rows = encode.rows(test_rows, "test", test_names)
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer else None
        if module is not None:
            limit = max_positions(getattr(module, "policy", None))
            new, val_new = self.sampling.max_new_tokens, self.val_sampling.max_new_tokens
            check_positions(self.train_rows, names, limit, new, "sampling.max_new_tokens")
            check_positions(self.val_rows, val_names, limit, val_new, "val_max_new_tokens")
            if self.test_source is not None:
                check_positions(self.test_rows, test_names, limit, val_new, "val_max_new_tokens")
            # The one hand-over of encoded prompts to the method (e.g. ListOPD calibrates on them);
            # other LightningModules attached to this datamodule know nothing of it.
            if isinstance(module, PromptConsumer):
                module.connect_prompts(encode, self.train_rows, self.val_rows)

    def _split_validation(self, rows: list[dict]) -> tuple[list[int], list[int]]:
        """(training, validation) indices of ``rows``: ``val_size`` rows — or, with ``group_field``,
        groups, so no trajectory has turns on both sides — drawn with the seed, so a resumed run
        validates on the same rows."""
        if self.group_field:
            groups = row_groups([{"row": row} for row in rows], self.group_field, "training")
        else:
            groups = [[i] for i in range(len(rows))]
        return split_validation(groups, self.val_size, self.seed, "groups" if self.group_field else "rows")

    def _resolve_tokenizer(self):  # noqa: ANN202
        trainer = getattr(self, "trainer", None)
        module_tok = getattr(trainer.lightning_module, "tokenizer", None) if trainer else None
        if module_tok is not None:
            return module_tok
        if self.tokenizer_path is None:
            raise SettingError(
                "RolloutDataModule has no tokenizer: attach it to a method with a `tokenizer` "
                "(trainer.fit(module, datamodule)) or pass `tokenizer=` a path"
            )
        from lit_opd.models import load_tokenizer

        return load_tokenizer(self.tokenizer_path, self.tokenizer_path)

    def train_dataloader(self) -> DataLoader:
        if len(self.train_rows) < self.batch_size:
            skipped = self._skipped and (
                f" ({self._skipped} of {self._skipped + len(self.train_rows)} were skipped as longer than "
                f"max_prompt_tokens={self.prompt_settings['max_prompt_tokens']}, over_long_prompts='skip')"
            )
            raise SettingError(
                f"RolloutDataModule has {len(self.train_rows)} training prompts{skipped or ''}, fewer than "
                f"batch_size={self.batch_size}; lower batch_size, raise max_prompt_tokens or add prompts"
            )
        # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader is stateful;
        # here the DataModule's state_dict restores the exact prompt position, so it is not.
        warnings.filterwarnings("ignore", message=RESUME_WARNING)
        trainer = getattr(self, "trainer", None)
        position = dict(
            seed=data_seed(self.seed),
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            resume_epoch=self._epoch_position["epoch"],
            resume_skip=self._epoch_position["batches_done"] * self.batch_size,
        )
        if self.group_field:
            groups = row_groups(self.train_rows, self.group_field, "training")
            sampler = GroupedPromptSampler(groups, **position)
        else:
            sampler = ResumablePromptSampler(len(self.train_rows), **position)
        return self.loader(self.train_rows, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_rows:
            return []
        return self.loader(self.val_rows, self.val_batch_size)

    def test_dataloader(self) -> DataLoader | list:
        """``test_source``'s prompts, or the validation prompts when it is None."""
        if not self.test_rows:
            return []
        return self.loader(self.test_rows, self.val_batch_size)

    def loader(self, rows: list[dict], batch_size: int, **kwargs) -> DataLoader:  # noqa: ANN003
        """A DataLoader of left-padded PromptBatches over encoded ``rows`` (as ``setup`` makes them)."""
        pad_id = self.tokenizer.pad_token_id
        return DataLoader(
            rows,
            batch_size=batch_size,
            collate_fn=lambda b: collate_prompts(b, pad_id),
            num_workers=self.num_workers,
            **kwargs,
        )

    # ----- rollout (device) -----------------------------------------------------------------
    def on_after_batch_transfer(self, batch: PromptBatch, dataloader_idx: int) -> RolloutBatch:
        if not isinstance(batch, PromptBatch):
            return batch
        trainer = self.trainer
        module = trainer.lightning_module
        if trainer.training:
            self._advance_position(trainer.current_epoch)
            return self.rollout(batch, module, module.completion_source(), trainer.global_step)
        rollout = self.rollout(batch, module, "greedy", trainer.global_step)
        rollout.correct_B = self.grade(rollout)
        return rollout

    def _advance_position(self, epoch: int) -> None:
        if epoch != self._epoch_position["epoch"]:
            self._epoch_position = {"epoch": epoch, "batches_done": 0}
        self._epoch_position["batches_done"] += 1

    def rollout(self, batch: PromptBatch, module: L.LightningModule, source: str, step: int) -> RolloutBatch:
        """Complete ``batch`` from ``source``: "student", "teacher", "dataset" or "greedy"."""
        start = time.perf_counter()
        if source == "dataset":
            rollout = dataset_completions(batch, self.tokenizer.pad_token_id)
        else:
            rollout = self._generate(batch, module, source, step)
        rollout.rollout_seconds = time.perf_counter() - start
        return rollout

    def _generate(self, batch: PromptBatch, module: L.LightningModule, source: str, step: int) -> RolloutBatch:
        params = self.val_sampling if source == "greedy" else self.sampling
        model = module.policy if source in ("student", "greedy") else module.teacher_generator()
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer else 0
        # Seeded by (seed, step, rank): rollouts differ across ranks, and a resumed run redraws
        # exactly the samples the unbroken run drew, without saving generator state.
        seed = rollout_seed(self.seed, step, rank, source)
        was_training = model.training
        model.eval()
        try:
            with generation_context(trainer):
                return self.complete(model, batch, params, seed, source)
        finally:
            model.train(was_training)

    def complete(
        self, model: torch.nn.Module, batch: PromptBatch, params: SamplingParams, seed: int, source: str,
    ) -> RolloutBatch:
        """Sample ``batch``'s completions from ``model`` (in eval mode, under the trainer's precision):
        the one step a multi-turn rollout (``lit_opd.rollout.turns.EpisodeRolloutDataModule``) replaces."""
        if source == "teacher":  # sequence-level KD: the teacher samples in this process
            out = BuiltinEngine().generate(
                model, batch.prompt_ids_BP, batch.prompt_mask_BP, params, seed=seed,
                eos_token_ids=eos_ids(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                all_ranks_done=ranks_agree(getattr(self, "trainer", None)),
            )
        else:
            out = self.sample_student(model, batch.prompt_ids_BP, batch.prompt_mask_BP, params, seed)
        G = params.num_samples
        return RolloutBatch(
            prompt_ids_BP=batch.prompt_ids_BP.repeat_interleave(G, 0),
            prompt_mask_BP=batch.prompt_mask_BP.repeat_interleave(G, 0),
            completion_ids_BT=out.tokens_BT,
            completion_mask_BT=out.mask_BT,
            sampler_logp_BT=out.logp_BT,
            answers=[a for a in batch.answers for _ in range(G)],
            row_index_B=batch.row_index_B.repeat_interleave(G, 0),
            source=source,
            truncated_B=out.truncated_B,
            rows=[r for r in batch.rows for _ in range(G)],
        )

    def sample_student(
        self, policy: torch.nn.Module, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor,
        params: SamplingParams, seed: int, generator: torch.Generator | None = None,
    ) -> SampleOutput:
        """The student's completions of left-padded prompts, from this datamodule's engine: the one
        door for every generation from the student (rollouts, validation, methods' extra samples).
        ``policy`` is the live student (``module.policy``); an engine with its own copy of the weights
        syncs it when :meth:`weights_version` moved since its last sync."""
        trainer = getattr(self, "trainer", None)
        self.engine.setup(policy, self.tokenizer, trainer, self.max_model_len())
        return self.engine.generate(
            policy, prompt_ids_BP, prompt_mask_BP, params, seed=seed, eos_token_ids=eos_ids(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id, weights_version=self.weights_version(),
            generator=generator, all_ranks_done=ranks_agree(trainer),
        )

    def weights_version(self) -> tuple[int, int]:
        """Changes whenever the student's weights may have: each optimizer step (the trainer's global
        step) and each :meth:`weights_changed` (weights rewritten outside the optimizer)."""
        trainer = getattr(self, "trainer", None)
        return (trainer.global_step if trainer is not None else 0, self._weight_edits)

    def weights_changed(self) -> None:
        """Tell the engine the student's weights changed outside an optimizer step (EffOPD's
        extrapolation, a restored checkpoint), so the next generation syncs them."""
        self._weight_edits += 1

    def max_model_len(self) -> int:
        """Longest prompt + completion this datamodule asks an engine for."""
        longest_completion = max(self.sampling.max_new_tokens, self.val_sampling.max_new_tokens)
        return self.prompt_settings["max_prompt_tokens"] + longest_completion

    def grade(self, rollout: RolloutBatch) -> torch.Tensor:
        """Each decoded completion's score in [0, 1] from ``verifier`` (1.0 / 0.0 from a source's
        ``verify``): (B,) floats."""
        trainer = getattr(self, "trainer", None)
        testing = trainer is not None and trainer.testing and self.test_source is not None
        source = self.test_source if testing else self.val_source or self.source
        verifier = self.verifier or (lambda text, answer, row: float(source.verify(text, answer)))
        texts = self.decode(rollout)
        rows = rollout.rows or [{}] * len(texts)
        scores = [checked_score(verifier, t, a, row) for t, a, row in zip(texts, rollout.answers, rows)]
        return torch.tensor(scores, dtype=torch.float, device=rollout.completion_ids_BT.device)

    @torch.no_grad()
    def evaluate(self, module: L.LightningModule) -> dict[str, float]:
        """Greedy accuracy of ``module.policy`` on every validation prompt (outside Lightning's
        loops: callbacks use it before/after training; every rank must call it). Under DDP each
        rank decodes every world_size-th prompt and the counts are summed; a sharded student needs
        every rank in every forward, so there each rank decodes all. Greedy decoding is
        deterministic, so every rank returns the same value. Also returns ``num_prompts`` and
        ``decoded_here`` (the prompts this rank decoded). Greedy whatever ``evaluation`` says."""
        return greedy_accuracy(self, module)

    def greedy_correct(self, rows: list[dict], module: L.LightningModule) -> tuple[float, int]:
        """(prompts the verifier accepts, prompts) for greedy completions of ``rows`` by the student:
        greedy whatever ``evaluation`` says, so callbacks compare deterministic numbers."""
        return greedy_correct(self, rows, module)

    def decode(self, rollout: RolloutBatch) -> list[str]:
        return decode_completions(self.tokenizer, rollout.completion_ids_BT, rollout.completion_mask_BT)

    # ----- exact resume ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(self._epoch_position)

    def load_state_dict(self, state_dict: dict) -> None:
        self._epoch_position = {"epoch": state_dict["epoch"], "batches_done": state_dict["batches_done"]}
        self.weights_changed()  # the student was restored from the checkpoint
