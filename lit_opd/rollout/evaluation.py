"""Validation and test scoring: how completions are decoded (greedy, or n sampled per prompt), the
metrics (accuracy, mean@n, unbiased pass@k), their per-domain breakdown summed over batches and
DDP ranks, and a table of a few completions handed to the run's logger.

The RolloutDataModule decodes and grades (``evaluation`` setting); a method's ``validation_step`` /
``test_step`` feeds each graded :class:`~lit_opd.types.RolloutBatch` to a :class:`StageEvaluator`,
which logs everything once at the epoch's end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric

from lit_opd.errors import SettingError
from lit_opd.rollout.distributed import generation_context, is_sharded
from lit_opd.rollout.prompts import decode_completions
from lit_opd.types import RolloutBatch, SamplingParams

if TYPE_CHECKING:
    from lit_opd.rollout.datamodule import RolloutDataModule

COMPLETIONS_FILE = "completions.jsonl"
TABLE_COLUMNS = ("step", "prompt", "completion", "answer", "score", "domain")


@dataclass(frozen=True)
class Evaluation:
    """How validation and ``trainer.test`` decode and score (``RolloutDataModule(evaluation=...)``).

    Args:
        decoding: "greedy" (argmax, one completion per prompt) or "sampled" (``num_samples``
            completions per prompt at ``temperature`` / ``top_p``, seeded by the data seed and the
            global step: a rerun or a resumed run draws the same completions).
        temperature: sampled decoding only.
        top_p: sampled decoding only (1.0 = off).
        num_samples: completions per prompt (n); above 1 needs ``decoding: sampled``.
        pass_k: the k of each logged ``val/pass@k``: the chance that at least one of k completions is
            right, by the unbiased estimator 1 - C(n-c, k)/C(n, k) per prompt (Chen et al. 2021; c
            completions with score 1), averaged over prompts. Each k must be <= ``num_samples``.
        domain_field: the row field whose values split every metric (``val/accuracy/<value>``);
            rows without it count only in the totals. None = no breakdown.
        log_completions: prompts (the first ones of the validation set; under DDP, of global rank
            0's share) whose prompt, first completion, answer and score are logged each validation
            (and test): TensorBoard text, a W&B table, else ``completions.jsonl`` in the logger's
            ``log_dir``. 0 = none.
    """

    decoding: Literal["greedy", "sampled"] = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    pass_k: list[int] = field(default_factory=list)
    domain_field: str | None = "domain"
    log_completions: int = 0

    def __post_init__(self) -> None:
        if self.decoding not in ("greedy", "sampled"):
            raise SettingError(f"Evaluation.decoding={self.decoding!r}: use 'greedy' or 'sampled'")
        if self.num_samples < 1:
            raise SettingError(f"Evaluation.num_samples must be >= 1, got {self.num_samples}")
        if not self.temperature > 0:
            raise SettingError(f"Evaluation.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SettingError(f"Evaluation.top_p must be in (0, 1], got {self.top_p}")
        if self.log_completions < 0:
            raise SettingError(f"Evaluation.log_completions must be >= 0 (0 = off), got {self.log_completions}")
        if self.decoding == "greedy":
            self._check_greedy()
        for k in self.pass_k:
            if k < 1:
                raise SettingError(f"Evaluation.pass_k has k={k}; each k must be >= 1")
            if k > self.num_samples:
                raise SettingError(
                    f"Evaluation.pass_k has k={k} > num_samples={self.num_samples}: pass@k needs at least k "
                    f"completions per prompt; raise num_samples to {k} (decoding: sampled) or drop k={k}"
                )
        if len(set(self.pass_k)) != len(self.pass_k):
            raise SettingError(f"Evaluation.pass_k={self.pass_k} lists a k twice; list each k once")

    def _check_greedy(self) -> None:
        """Sampling settings under greedy decoding would be silently ignored: refuse them."""
        if self.num_samples > 1:
            raise SettingError(
                f"Evaluation.num_samples={self.num_samples} with decoding='greedy' scores {self.num_samples} "
                "identical completions per prompt; set decoding: sampled (or num_samples: 1)"
            )
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if value != 1.0:
                raise SettingError(
                    f"Evaluation.{name}={value} has no effect with decoding='greedy'; set decoding: sampled "
                    f"or leave {name} out"
                )

    @property
    def sampled(self) -> bool:
        return self.decoding == "sampled"

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """What the rollout engine draws validation completions with."""
        if not self.sampled:
            return SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            num_samples=self.num_samples,
        )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` right out of ``n`` completions: 1 - C(n-c, k)/C(n, k)
    (Chen et al. 2021). Exact integer binomials; C(n-c, k) is 0 when fewer than k are wrong."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise SettingError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def row_domains(rows: list[dict], domain_field: str | None) -> list[str]:
    """The sorted distinct values of ``domain_field`` over ``rows`` (as strings)."""
    if domain_field is None:
        return []
    return sorted({str(row[domain_field]) for row in rows if row.get(domain_field) is not None})


class EvaluationMetric(Metric):
    """Per-prompt scores summed per group (all prompts, then one group per domain) with a prompt count
    per group, so every mean is total score / total prompts over all batches and ranks (torchmetrics
    sums the states across DDP ranks in :meth:`compute`), never a mean of per-batch means.

    Per prompt: ``accuracy`` (mean score of its n completions; ``mean@n`` too when sampled) and
    ``pass@k`` for each k.
    """

    full_state_update = False

    def __init__(self, num_samples: int, pass_k: list[int], domains: list[str], sampled: bool) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.domain_index = {domain: 1 + i for i, domain in enumerate(domains)}
        self.group_suffixes = [""] + [f"/{domain}" for domain in domains]
        self.names = ["accuracy"] + [f"pass@{k}" for k in pass_k]
        self.mean_name = f"mean@{num_samples}" if sampled else None
        # pass@k of a prompt depends only on its count of right completions c: tabulate c = 0..n once.
        table = [[pass_at_k(num_samples, c, k) for k in pass_k] for c in range(num_samples + 1)]
        table_CK = torch.tensor(table, dtype=torch.float64).reshape(num_samples + 1, len(pass_k))  # K = 0 too
        self.register_buffer("pass_table_CK", table_CK, persistent=False)
        groups = len(self.group_suffixes)
        self.add_state("score_sums_GM", torch.zeros(groups, len(self.names), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("prompts_G", torch.zeros(groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, score_B: torch.Tensor, domains_P: list[str | None]) -> None:
        """``score_B``: each completion's score in [0, 1], the n of one prompt adjacent (B = P × n);
        ``domains_P``: each prompt's domain (None = none)."""
        score_PN = score_B.detach().to(self.prompts_G.device, torch.float64).view(-1, self.num_samples)
        right_P = (score_PN >= 1.0).sum(1)  # pass@k counts fully right completions
        values_PM = torch.cat([score_PN.mean(1, keepdim=True), self.pass_table_CK[right_P]], 1)
        groups = [self.domain_index.get(None if d is None else str(d), -1) for d in domains_P]  # -1: none
        group_P = torch.tensor(groups, dtype=torch.long, device=values_PM.device)
        in_domain_P = group_P >= 0
        self.score_sums_GM[0] += values_PM.sum(0)
        self.prompts_G[0] += len(domains_P)
        self.score_sums_GM.index_add_(0, group_P[in_domain_P], values_PM[in_domain_P])
        self.prompts_G.index_add_(0, group_P[in_domain_P], torch.ones_like(values_PM[in_domain_P, 0]))

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"accuracy": …, "mean@4": …, "pass@4": …, "accuracy/<domain>": …, "pass@4/<domain>": …}``
        (``mean@n``, sampled only, is ``accuracy`` under its usual name); groups without prompts left out."""
        out = {}
        for suffix, sums_M, prompts in zip(self.group_suffixes, self.score_sums_GM, self.prompts_G):
            if prompts > 0:
                out.update({name + suffix: (s / prompts).float() for name, s in zip(self.names, sums_M)})
        if self.mean_name and "accuracy" in out:
            out[self.mean_name] = out["accuracy"]
        return out


class StageEvaluator:
    """One validation (or test) epoch's scoring for a method: the :class:`EvaluationMetric` and the
    first ``log_completions`` prompts' completions, logged together by :meth:`log_epoch`."""

    def __init__(self, stage: str, settings: Evaluation, domains: list[str], tokenizer, device) -> None:  # noqa: ANN001
        self.stage, self.settings, self.tokenizer = stage, settings, tokenizer
        metric = EvaluationMetric(settings.num_samples, settings.pass_k, domains, settings.sampled)
        self.metric = metric.to(device)
        self.completions: list[dict] = []

    @classmethod
    def attached_to(cls, module: L.LightningModule, stage: Literal["val", "test"]) -> StageEvaluator:
        """An evaluator with the trainer's datamodule's ``evaluation`` settings and the domains of
        its ``val_rows`` / ``test_rows`` (defaults when the datamodule has neither)."""
        datamodule = getattr(module.trainer, "datamodule", None)
        settings = getattr(datamodule, "evaluation", None) or Evaluation()
        records = getattr(datamodule, "test_rows" if stage == "test" else "val_rows", None) or []
        domains = row_domains([record["row"] for record in records if "row" in record], settings.domain_field)
        tokenizer = getattr(datamodule, "tokenizer", None) or getattr(module, "tokenizer", None)
        return cls(stage, settings, domains, tokenizer, module.device)

    def update(self, batch: RolloutBatch) -> None:
        """Score one graded batch (``correct_B`` set by the datamodule) and keep its first completions."""
        n = self.settings.num_samples
        if batch.correct_B is None or batch.correct_B.numel() % n:
            raise RuntimeError(f"{self.stage} batch without scores for {n} completions per prompt")
        num_prompts = batch.correct_B.numel() // n
        field_name = self.settings.domain_field
        if batch.rows and field_name:
            domains_P = [row.get(field_name) for row in batch.rows[::n]]
        else:
            domains_P = [None] * num_prompts
        self.metric.update(batch.correct_B, domains_P)
        self._keep_completions(batch, domains_P)

    def _keep_completions(self, batch: RolloutBatch, domains_P: list[str | None]) -> None:
        """The first completion of each of the next prompts, until ``log_completions`` are kept."""
        room = self.settings.log_completions - len(self.completions)
        if room <= 0 or self.tokenizer is None:
            return
        n = self.settings.num_samples
        first = slice(0, room * n, n)  # the first completion of each of the next `room` prompts
        tok = self.tokenizer
        prompts = decode_completions(tok, batch.prompt_ids_BP[first], batch.prompt_mask_BP[first].bool())
        texts = decode_completions(tok, batch.completion_ids_BT[first], batch.completion_mask_BT[first])
        answers = batch.answers[first] if batch.answers else [None] * len(texts)
        scores = batch.correct_B[first].tolist()
        for prompt, text, answer, score, domain in zip(prompts, texts, answers, scores, domains_P):
            self.completions.append(
                dict(prompt=prompt, completion=text, answer=answer, score=score,
                     domain=None if domain is None else str(domain))
            )

    def log_epoch(self, module: L.LightningModule) -> None:
        """Log the epoch's metrics (same on every rank) and, on global rank zero outside the sanity
        check, the completions table."""
        metrics = {f"{self.stage}/{name}": value for name, value in self.metric.compute().items()}
        accuracy = metrics.pop(f"{self.stage}/accuracy")
        # Already summed across ranks by the metric: sync_dist only averages equal values and keeps
        # Lightning from warning about unsynced epoch-level logs.
        module.log(f"{self.stage}/accuracy", accuracy, prog_bar=self.stage == "val", sync_dist=True)
        if metrics:
            module.log_dict(metrics, sync_dist=True)
        trainer = module.trainer
        if self.completions and trainer.is_global_zero and not trainer.sanity_checking:
            rows = [dict(step=trainer.global_step, **row) for row in self.completions]
            for logger in trainer.loggers:
                log_completions_table(logger, f"{self.stage}/completions", rows)


def log_completions_table(logger: Logger, key: str, rows: list[dict]) -> None:
    """``rows`` (``TABLE_COLUMNS``) through ``logger``'s own table/text API — TensorBoard ``add_text``,
    W&B ``log_table`` — or else appended as JSON lines to ``completions.jsonl`` in its ``log_dir``."""
    step = rows[0]["step"]
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(key, markdown_table(rows), global_step=step)
    elif isinstance(logger, WandbLogger):
        data = [[row[column] for column in TABLE_COLUMNS] for row in rows]
        logger.log_table(key=key, columns=list(TABLE_COLUMNS), data=data)
    elif getattr(logger, "log_dir", None):
        path = Path(logger.log_dir) / COMPLETIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({"stage": key.split("/")[0], **row}, ensure_ascii=False) + "\n")
    else:
        name = type(logger).__name__
        rank_zero_warn(f"Evaluation.log_completions: {name} has no table API and no log_dir, so it shows "
                       "no completions; add a CSVLogger, TensorBoardLogger or WandbLogger")


def markdown_table(rows: list[dict]) -> str:
    """``rows`` as a Markdown table (TensorBoard renders text as Markdown)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def greedy_accuracy(datamodule: RolloutDataModule, module: L.LightningModule) -> dict[str, float]:
    """:meth:`RolloutDataModule.evaluate`: greedy accuracy on every validation prompt, each rank
    decoding every world_size-th prompt (all of them for a sharded student) and the counts summed."""
    if not datamodule.val_rows:
        raise SettingError("evaluate() needs validation prompts: set val_source or val_size > 0")
    trainer = getattr(datamodule, "trainer", None)
    split = trainer is not None and trainer.world_size > 1 and not is_sharded(trainer)
    rows = datamodule.val_rows[trainer.global_rank :: trainer.world_size] if split else datamodule.val_rows
    correct, count = datamodule.greedy_correct(rows, module)
    if split:
        totals = torch.tensor([correct, count], dtype=torch.float64, device=module.device)
        correct, count = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
    return {"accuracy": correct / count, "num_prompts": int(count), "decoded_here": len(rows)}


def greedy_correct(
    datamodule: RolloutDataModule, rows: list[dict], module: L.LightningModule,
) -> tuple[float, int]:
    """:meth:`RolloutDataModule.greedy_correct`: the student's greedy completions of ``rows``, graded."""
    params = SamplingParams(max_new_tokens=datamodule.val_sampling.max_new_tokens, greedy=True)
    policy, correct = module.policy, 0.0
    was_training = policy.training
    policy.eval()
    try:
        with generation_context(getattr(datamodule, "trainer", None)):
            for batch in datamodule.loader(rows, datamodule.val_batch_size):
                batch = batch.to(module.device)
                rollout = datamodule.complete(policy, batch, params, seed=0, source="greedy")
                correct += float(datamodule.grade(rollout).sum())
    finally:
        policy.train(was_training)
    return correct, len(rows)
