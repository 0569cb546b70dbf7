"""OmniOPDModule: on-policy distillation from a teacher that is only asked for text.

Paper: "OmniOPD: Logit-Free On-Policy Distillation via Speculative Verification", arXiv 2606.01476
(only its abstract was available; README.md beside this file gives the equations we use and which
choices are ours). Each step: the student samples completions (RolloutDataModule); at the
highest-entropy positions of each completion (:func:`~lit_opd.methods.omni_opd.audits.pick_audits`)
the teacher continues the prompt and the response so far N times; the student's own next chunk is
scored by its text similarity to those continuations, becomes a bounded target π̂, and is trained
toward it, while a KL anchor to the initial student holds every unaudited token in place
(:class:`~lit_opd.methods.omni_opd.objective.SpeculativeVerification`).

Only text crosses between student and teacher: the teacher may have any tokenizer, and its
``score`` is never called. It must implement ``generate_text`` (APITeacher, HFTextTeacher, HFTeacher).

Run: ``python -m lit_opd fit --config configs/omni_opd/quickstart.yaml``.
"""

from __future__ import annotations

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_opd.errors import SettingError
from lit_opd.methods.base import default_optimizer
from lit_opd.methods.omni_opd.audits import chunk_mask, pick_audits, repetition_loops
from lit_opd.methods.omni_opd.group import Candidates, GroupVerification
from lit_opd.methods.omni_opd.objective import AnchorTerms, SpeculativeVerification, Verdicts, gather_chunks
from lit_opd.methods.omni_opd.similarity import semantic_count
from lit_opd.methods.taught import TaughtModule
from lit_opd.models import ModelSpec, completion_logits
from lit_opd.objectives import divergences as D
from lit_opd.rollout.datamodule import RolloutDataModule, step_seed
from lit_opd.rollout.distributed import ranks_agree
from lit_opd.rollout.engines import BuiltinEngine
from lit_opd.rollout.prompts import ChatPrefix, eos_ids, left_pad
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch, SamplingParams

def added_text(tokenizer: PreTrainedTokenizerBase, before_ids: list[int], before_text: str,
               chunk_ids: list[int]) -> str:
    """The text ``chunk_ids`` add after ``before_ids`` (decoded as ``before_text``): decoded together, so
    a tokenizer that merges across the boundary (spaces, byte pieces) gives the chunk's real characters."""
    upto = tokenizer.decode(before_ids + chunk_ids, skip_special_tokens=True)
    return upto[len(before_text):] if upto.startswith(before_text) else tokenizer.decode(
        chunk_ids, skip_special_tokens=True)


#: One audit as the teacher sees it: (row, start, teacher prefix, chunk text, chunk ends the completion).
Audit = tuple[int, int, str, str, bool]


class OmniOPDModule(TaughtModule):
    """Logit-free OPD: chunk targets from a text-only teacher, a KL anchor everywhere else.

    Args:
        student, tokenizer, optimizer, scheduler: see :class:`PolicyModule`.
        teacher: anything that returns text continuations (``APITeacher``, ``HFTextTeacher``,
            ``HFTeacher``); its tokenizer may differ from the student's. Never scored, never trained.
        objective: :class:`SpeculativeVerification` (chunk size, audits, continuations, α, β, φ, ...),
            or :class:`~lit_opd.methods.omni_opd.group.GroupVerification` (N student candidates per
            audit compete for the teacher's agreement; standardized advantages).
        seed: seed of the teacher's sampling; step s asks with a seed derived from (seed, s, rank),
            so a resumed run asks exactly what the unbroken run asked.
        reference: π_ref of the anchor; None = a frozen copy of the student's initial weights.
        allow_teacher_change: resume from a checkpoint made with another teacher.
        allow_settings_change: resume from a checkpoint made with another student spec or objective
            (class or setting); off, such a resume is refused listing the differences.
    """

    def __init__(
        self,
        student: ModelSpec | str | nn.Module,
        teacher: Teacher,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        objective: SpeculativeVerification = lazy_instance(SpeculativeVerification),
        seed: int = 0,
        reference: ModelSpec | str | None = None,
        allow_teacher_change: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        allow_settings_change: bool = False,
    ) -> None:
        if not isinstance(objective, SpeculativeVerification):
            raise SettingError(f"OmniOPDModule.objective must be a SpeculativeVerification (OmniOPD's loss), "
                             f"got {type(objective).__name__}; use OPDModule for token-level objectives")
        if not teacher.generates_text():
            raise SettingError(
                f"OmniOPDModule needs a teacher that returns text continuations (generate_text), but "
                f"{type(teacher).__name__} returns log-probs only. Use APITeacher (any OpenAI-compatible "
                "server, e.g. `vllm serve` or `transformers serve`), HFTextTeacher or HFTeacher."
            )
        super().__init__(student, teacher, tokenizer, objective, allow_teacher_change, optimizer, scheduler,
                         allow_settings_change=allow_settings_change)
        # No vocabulary check: only text crosses, so the teacher's tokenizer may be any.
        self.seed = seed
        self._eos = set(eos_ids(self.tokenizer))
        self.freeze_reference(reference)  # π_ref of the anchor

    # ----- the step -----------------------------------------------------------------------------
    progress_bar_terms = ("teacher_kl", "entropy", "target_mean", "audits_per_seq", "anchor_kl")

    def compute_loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        loss, metrics = self.loss(batch)
        loops_B = repetition_loops(batch.completion_ids_BT, batch.completion_mask_BT)
        metrics["repetition_rate"] = loops_B.float().mean()
        return loss, metrics

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """The objective on one RolloutBatch (the teacher is asked here) and detached diagnostics."""
        logits_BTV = completion_logits(self.student, batch)
        entropy_BT = D.entropy(logits_BTV.detach())
        mask_BT = batch.loss_mask_BT.bool()
        starts = pick_audits(entropy_BT, mask_BT, self.objective.chunk_tokens, self.objective.max_audits)
        verdicts = self.verify(batch, starts)
        with torch.no_grad():
            reference_logits_BTV = completion_logits(self.reference, batch)
        terms = AnchorTerms(D.token_logprobs(logits_BTV, batch.completion_ids_BT), logits_BTV,
                            reference_logits_BTV, entropy_BT)
        if isinstance(self.objective, GroupVerification):
            loss, metrics = self.objective(batch, terms, verdicts, self.candidates(batch, verdicts))
        else:
            loss, metrics = self.objective(batch, terms, verdicts)
        metrics.update(self._audit_metrics(verdicts, entropy_BT, mask_BT))
        return loss, metrics

    def _audit_metrics(self, verdicts: Verdicts, entropy_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict:
        obj = self.objective
        asked = max(verdicts.requested * obj.num_continuations, 1)
        sequences = max(int((mask_BT.sum(-1) > 0).sum()), 1)
        kept = [[] for _ in range(mask_BT.shape[0])]
        for row, start in zip(verdicts.rows, verdicts.starts):
            kept[row].append(start)
        audited_BT = chunk_mask(kept, tuple(mask_BT.shape), obj.chunk_tokens, mask_BT.device)
        forks_BT = chunk_mask(kept, tuple(mask_BT.shape), 1, mask_BT.device)
        return {
            "audits_per_seq": len(verdicts.rows) / sequences,
            "audits_dropped": float(verdicts.dropped),
            "teacher_prefixes": float(verdicts.requested),
            "teacher_unanswered_frac": verdicts.unanswered / asked,
            "entropy": D.reduce_masked(entropy_BT, mask_BT),
            "entropy_audited": D.reduce_masked(entropy_BT, forks_BT),
            "entropy_other": D.reduce_masked(entropy_BT, mask_BT & ~audited_BT),
        }

    # ----- asking the teacher -------------------------------------------------------------------
    def query_seed(self) -> int:
        """The teacher's sampling seed for this step: fixed by (seed, global step, rank)."""
        return step_seed(self.seed, self.global_step, self.global_rank)

    def verify(self, batch: RolloutBatch, starts: list[list[int]]) -> Verdicts:
        """Ask the teacher to continue every audit's prefix (one ``generate_text`` call, audits in
        increasing position within each row) and count how far it agrees with each chunk."""
        audits = self._audit_texts(batch, starts)
        if not audits:
            return Verdicts()
        obj = self.objective
        answers = self.teacher.generate_text([a[2] for a in audits], max_new_tokens=obj.max_new_tokens,
                                             num_samples=obj.num_continuations,
                                             temperature=obj.teacher_temperature, seed=self.query_seed())
        if len(answers) != len(audits) or any(len(a) != obj.num_continuations for a in answers):
            raise SettingError(
                f"{type(self.teacher).__name__}.generate_text returned {[len(a) for a in answers]} "
                f"continuations for {len(audits)} prefixes; it must return num_samples="
                f"{obj.num_continuations} entries (None for a failed one) per prefix"
            )
        verdicts = Verdicts(requested=len(audits))
        k_sem, answered = [], []
        for (row, start, _, chunk, ends), texts in zip(audits, answers):
            value, count = semantic_count(chunk, texts, obj.similarity_fn, ends)
            verdicts.unanswered += obj.num_continuations - count
            if count == 0:  # every request for this audit failed: no evidence, not a zero
                verdicts.dropped += 1
                continue
            verdicts.rows.append(row)
            verdicts.starts.append(start)
            verdicts.continuations.append(texts)
            k_sem.append(value)
            answered.append(count)
        verdicts.k_sem_A, verdicts.answered_A = torch.tensor(k_sem), torch.tensor(answered, dtype=torch.float)
        return verdicts

    # ----- the group objective's candidates ----------------------------------------------------
    def candidates(self, batch: RolloutBatch, verdicts: Verdicts) -> Candidates | None:
        """N candidate chunks per kept audit (the sampled one first, then N − 1 fresh student samples
        from the same prefix), scored by the student (with grad) and against the audit's continuations."""
        if not verdicts.rows:
            return None
        obj, tok = self.objective, self.tokenizer
        C, N, A = obj.chunk_tokens, obj.candidates, len(verdicts.rows)
        prefixes = [self._prompt_ids(batch, row) + batch.completion_ids_BT[row, :start].tolist()
                    for row, start in zip(verdicts.rows, verdicts.starts)]
        prefix_ids_AP, prefix_mask_AP = left_pad(prefixes, tok.pad_token_id, batch.prompt_ids_BP.device)
        fresh = self._fresh_chunks(prefix_ids_AP, prefix_mask_AP, N - 1)
        ids_ANC = torch.full((A, N, C), tok.pad_token_id, dtype=torch.long, device=prefix_ids_AP.device)
        mask_ANC = torch.zeros((A, N, C), dtype=torch.bool, device=prefix_ids_AP.device)
        ids_ANC[:, 0] = gather_chunks(batch.completion_ids_BT, verdicts.rows, verdicts.starts, C)
        mask_ANC[:, 0] = True
        width = fresh.tokens_BT.shape[1]
        ids_ANC[:, 1:, :width] = fresh.tokens_BT.view(A, N - 1, width)
        mask_ANC[:, 1:, :width] = fresh.mask_BT.view(A, N - 1, width).bool()
        scored = RolloutBatch(
            prompt_ids_BP=prefix_ids_AP.repeat_interleave(N, 0), prompt_mask_BP=prefix_mask_AP.repeat_interleave(N, 0),
            completion_ids_BT=ids_ANC.view(A * N, C), completion_mask_BT=mask_ANC.view(A * N, C),
            sampler_logp_BT=None, answers=[None] * (A * N),
            row_index_B=torch.arange(A * N, device=prefix_ids_AP.device))
        logp_ANC = D.token_logprobs(completion_logits(self.student, scored), scored.completion_ids_BT).view(A, N, C)
        k_sem_AN, answered_AN = self._candidate_counts(prefixes, ids_ANC, mask_ANC, verdicts.continuations)
        return Candidates(logp_ANC, mask_ANC, k_sem_AN.to(logp_ANC.device), answered_AN.to(logp_ANC.device))

    @torch.no_grad()
    def _fresh_chunks(self, prefix_ids_AP: torch.Tensor, prefix_mask_AP: torch.Tensor, per_prefix: int):  # noqa: ANN202
        """``per_prefix`` student samples of up to C tokens after each prefix (seeded per step)."""
        params = SamplingParams(max_new_tokens=self.objective.chunk_tokens, num_samples=per_prefix,
                                temperature=self.objective.candidate_temperature)
        seed = step_seed(self.seed + 1, self.global_step, self.global_rank)
        policy = self.policy  # what rollouts sample from (for a LoRA student, the model inside the PeftModel)
        was_training = policy.training
        policy.eval()
        try:
            trainer = self._trainer  # None outside a Trainer (``self.trainer`` would raise)
            datamodule = getattr(trainer, "datamodule", None)
            if isinstance(datamodule, RolloutDataModule):  # the run's engine, as every student sample
                return datamodule.sample_student(policy, prefix_ids_AP, prefix_mask_AP, params, seed)
            return BuiltinEngine().generate(policy, prefix_ids_AP, prefix_mask_AP, params, seed=seed,
                                            eos_token_ids=eos_ids(self.tokenizer),
                                            pad_token_id=self.tokenizer.pad_token_id,
                                            all_ranks_done=ranks_agree(trainer) if trainer else None)
        finally:
            policy.train(was_training)

    def _candidate_counts(self, prefixes: list[list[int]], ids_ANC: torch.Tensor, mask_ANC: torch.Tensor,
                          continuations: list[list[str | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_sem, answered) of every candidate against its audit's teacher continuations: (A, N) each."""
        obj, tok = self.objective, self.tokenizer
        k_sem, answered = [], []
        for prefix, cands_NC, masks_NC, texts in zip(prefixes, ids_ANC.tolist(), mask_ANC.tolist(), continuations):
            prefix_text = tok.decode(prefix, skip_special_tokens=True)  # once per audit, not per candidate
            row_k, row_n = [], []
            for ids, mask in zip(cands_NC, masks_NC):
                ids = [i for i, m in zip(ids, mask) if m]
                value, count = semantic_count(added_text(tok, prefix, prefix_text, ids), texts, obj.similarity_fn,
                                              bool(ids) and ids[-1] in self._eos)
                row_k.append(value)
                row_n.append(count)
            k_sem.append(row_k)
            answered.append(row_n)
        return torch.tensor(k_sem), torch.tensor(answered, dtype=torch.float)

    def _prompt_ids(self, batch: RolloutBatch, row: int) -> list[int]:
        return batch.prompt_ids_BP[row][batch.prompt_mask_BP[row].bool()].tolist()

    def _audit_texts(self, batch: RolloutBatch, starts: list[list[int]]) -> list[Audit]:
        """(row, start, teacher prefix, chunk text, chunk ends the completion) per audit, row by row,
        starts increasing. The prefix is the prompt's text and the response before the chunk, never
        the chunk itself; the chunk's text is what it adds to that decoded response."""
        C, tok = self.objective.chunk_tokens, self.tokenizer
        out = []
        for row, row_starts in enumerate(starts):
            if not row_starts:
                continue
            prompt_ids, source_row = self._prompt_ids(batch, row), batch.rows[row] if batch.rows else {}
            ids = batch.completion_ids_BT[row].tolist()
            for start in sorted(row_starts):
                before = tok.decode(ids[:start], skip_special_tokens=True)
                chunk = added_text(tok, ids[:start], before, ids[start : start + C])
                # Roles kept for a chat-mode teacher; the text as the student saw it for a completions one.
                prefix = ChatPrefix.of(tok, prompt_ids, source_row, before)
                out.append((row, start, prefix, chunk, ids[start + C - 1] in self._eos))
        return out
