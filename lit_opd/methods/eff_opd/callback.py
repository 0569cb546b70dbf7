"""EffOPDCallback: extrapolate the student along its own OPD update direction, keep what helps.

Paper: EffOPD (arXiv 2605.11739); official code ``caiyuchen-ustc/EffOPD`` (verl
``fsdp_workers.py``: ``_iterative_test_and_modify``). Hand values and measured outcome: README.md here.

At optimizer steps s = 1, 2, 4, 8, ... (``s & (s-1) == 0``) a greedy line search runs over
the attention and MLP parameters M, with d = θ_s − θ_anc (θ_anc: the anchor)::

    θ^(k) = θ_anc + (1 + a0·k)·d          k = 1..num_trials   (a0 = 2: multipliers 3, 5, 7, 9, 11)
    accept θ^(k) while score(θ^(k)) > score(θ^(k-1))  (strict); at the first failure roll back to
    the last accepted point (bit-identical) and stop; then θ_anc ← the kept point.

The official code reaches the same points by ``θ ← θ + a(θ − θ_anc)``, ``a ← a/(1+a)`` from a = 2;
here the closed form is used, so every candidate is computed from the same two tensors.

Deliberate differences from the official code:

* The anchor is this callback's own fp32 copy, initialised from the student when training starts.
  The official code uses the G-OPD reference ("base") model as the anchor, so every accepted search
  also moves π_ref inside the λ-extrapolated reward; here the method's reference is left alone.
* The score is greedy (deterministic) validation accuracy, the method's loss on held-out rollouts
  cached once, or a user callable, under a fixed seed; the official code scores sampled
  generations, whose noise makes the strict ``>`` test a coin flip on small held-out sets.

As in the official code, the optimizer state (Adam moments, step counts) and the LR schedule are
not touched: the optimizer simply continues from the extrapolated weights.

Memory, distributed runs and checkpoints: README.md beside this file, "Memory, DDP and FSDP".

Run: ``python -m lit_opd fit --config configs/eff_opd/quickstart.yaml``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lit_opd.errors import SettingError
from lit_opd.methods.base import PolicyModule
from lit_opd.methods.eff_opd.held_out import held_out_rollouts, loss_score, scoring_context
from lit_opd.methods.eff_opd.parameters import (
    DEFAULT_MODULES, cpu_copy, local_tensor, policy_of, select_parameters,
)
from lit_opd.rollout.datamodule import RolloutDataModule
from lit_opd.types import RolloutBatch

ScoreFn = Callable[[L.Trainer, L.LightningModule], float]


# ----- the line search, free of Lightning --------------------------------------------------------
def multipliers(num_trials: int, initial_factor: float = 2.0) -> list[float]:
    """Multipliers of d = θ − θ_anc tried in order: ``1 + a0·k`` (3, 5, 7, 9, 11 for a0 = 2)."""
    return [1.0 + initial_factor * k for k in range(1, num_trials + 1)]


@dataclasses.dataclass
class SearchResult:
    """One line search: the start score, each trial's score and verdict, the multiplier kept."""

    initial_score: float
    trial_scores: list[float]
    trial_accepted: list[bool]
    multiplier: float  # 1.0 when no trial was accepted

    @property
    def num_accepted(self) -> int:
        return sum(self.trial_accepted)

    @property
    def best_score(self) -> float:
        kept = [s for s, ok in zip(self.trial_scores, self.trial_accepted) if ok]
        return kept[-1] if kept else self.initial_score


def _weights_changed(trainer: L.Trainer) -> None:
    """The datamodule's rollout engine must resync: the weights moved outside an optimizer step."""
    notify = getattr(trainer.datamodule, "weights_changed", None)
    if notify is not None:
        notify()


@torch.no_grad()
def _move_to(params: Sequence[Tensor], start: Sequence[Tensor], anchor: Sequence[Tensor], m: float) -> None:
    """``params ← anchor + m·(start − anchor)`` in fp32, cast to each param's dtype; m = 1 copies
    ``start`` exactly. The same inputs always give the same bits, so this is also the rollback."""
    for p, s, a in zip(params, start, anchor):
        if m == 1.0:
            p.copy_(s)
            continue
        a = a.to(p.device, non_blocking=True)
        p.copy_(torch.add(a, s.float() - a, alpha=m))


@torch.no_grad()
def extrapolation_search(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor],
    score: Callable[[], float],
    num_trials: int = 5,
    initial_factor: float = 2.0,
) -> SearchResult:
    """EffOPD's greedy line search on ``params`` (modified in place) against ``anchor`` (fp32,
    updated in place to the kept point). ``score()`` rates the current ``params``; higher is better.

    Trials θ_anc + m_k (θ − θ_anc) with ``m_k = multipliers(...)`` are accepted while each scores
    strictly higher than the last kept point; the first failure restores the last kept point
    bit-identically and ends the search.
    """
    start = [p.detach().clone() for p in params]
    best = score()
    result = SearchResult(best, [], [], 1.0)
    for m in multipliers(num_trials, initial_factor):
        _move_to(params, start, anchor, m)
        trial = score()
        accepted = trial > best
        result.trial_scores.append(trial)
        result.trial_accepted.append(accepted)
        if not accepted:
            _move_to(params, start, anchor, result.multiplier)
            break
        best, result.multiplier = trial, m
    for a, p in zip(anchor, params):
        a.copy_(p)
    return result


# ----- the callback ---------------------------------------------------------------------------
class EffOPDCallback(L.Callback):
    """EffOPD on any lit_opd method: see the module docstring for the algorithm.

    Works through ``pl_module.policy`` (the student's parameters) and a held-out score; the method
    does not know about it. Per search it logs ``effopd/{initial_score, trial_{i}_score,
    trial_{i}_accepted, num_accepted, multiplier, best_score}`` to the trainer's loggers at
    ``step = trainer.global_step`` and appends a dict to :attr:`history`.

    Args:
        schedule: when to search, by optimizer steps done: "pow2" (1, 2, 4, 8, ...), an int n
            (every n steps) or an explicit list of steps.
        num_trials: most extrapolation trials per search (the official ``max_test_iterations``).
        initial_factor: a0; trial k moves to θ_anc + (1 + a0·k)(θ − θ_anc).
        include: name substrings of the parameters that move (default: attention + MLP).
        score: "accuracy" (greedy validation accuracy, ``trainer.datamodule.evaluate``) or "loss"
            (− the method's loss on ``loss_batches`` validation batches rolled out by the student
            once, when training starts; cheaper, and it needs ``pl_module.teacher`` and
            ``pl_module.loss(batch, teacher_out)``).
        score_fn: ``(trainer, pl_module) -> float`` (higher is better); replaces ``score``.
        loss_batches: validation batches cached for ``score="loss"``.
        seed: torch seed set (in a forked RNG) around every score, so a stochastic score does not
            turn the strict comparison into noise and training draws are not disturbed.
        anchor_on_cpu: keep the fp32 anchor in host memory instead of next to the weights.
    """

    def __init__(
        self,
        schedule: Literal["pow2"] | int | list[int] = "pow2",
        num_trials: int = 5,
        initial_factor: float = 2.0,
        include: Sequence[str] = DEFAULT_MODULES,
        score: Literal["accuracy", "loss"] = "accuracy",
        score_fn: ScoreFn | None = None,
        loss_batches: int = 2,
        seed: int = 0,
        anchor_on_cpu: bool = False,
    ) -> None:
        if num_trials < 1 or initial_factor <= 0 or loss_batches < 1:
            raise SettingError(
                f"EffOPDCallback needs num_trials >= 1, initial_factor > 0, loss_batches >= 1; got "
                f"{num_trials}, {initial_factor}, {loss_batches}"
            )
        if score not in ("accuracy", "loss"):
            raise SettingError(f"EffOPDCallback.score={score!r}: use 'accuracy' or 'loss' (or pass score_fn)")
        valid_int = isinstance(schedule, int) and schedule > 0
        if schedule != "pow2" and not valid_int and not isinstance(schedule, list):
            raise SettingError(f"EffOPDCallback.schedule={schedule!r}: use 'pow2', an int >= 1 or a list")
        self.schedule, self.num_trials, self.initial_factor = schedule, num_trials, initial_factor
        self.include, self.score, self.score_fn = tuple(include), score, score_fn
        self.loss_batches, self.seed, self.anchor_on_cpu = loss_batches, seed, anchor_on_cpu
        self._reset()

    def _reset(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.last_trigger_step = 0
        self.anchor: dict[str, Tensor] | None = None
        self._sharded = False
        self._loss_cache: list[dict[str, Any]] | None = None
        self._loss_batches: list[RolloutBatch] = []

    def should_trigger(self, step: int) -> bool:
        """Whether the search runs after ``step`` optimizer steps (and has not run there yet)."""
        if step < 1 or step <= self.last_trigger_step:
            return False
        if self.schedule == "pow2":
            return step & (step - 1) == 0
        if isinstance(self.schedule, int):
            return step % self.schedule == 0
        return step in self.schedule

    # ----- lifecycle ------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit starts a new schedule; a resumed one reloads it next
            self._reset()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._params(pl_module)
        device = torch.device("cpu") if self.anchor_on_cpu else None
        if self.anchor is not None and self._sharded:
            rank_zero_warn("EffOPDCallback: the checkpoint holds rank 0's shard of the anchor only; "
                           "re-initialising the anchor from the resumed weights")
            self.anchor = None
        self._sharded = any(isinstance(p.data, DTensor) for _, p in params)
        if self.anchor is None:  # fresh run: the anchor is the student before its first step
            self.anchor = {n: local_tensor(p).detach().to(device=device, dtype=torch.float32, copy=True)
                           for n, p in params}
        else:  # resumed: check and place the saved anchor
            self._check_anchor(params)
            self.anchor = {n: self.anchor[n].to(device or local_tensor(p).device) for n, p in params}
        if self.score_fn is None and self.score == "loss":
            self._prepare_loss_cache(trainer, pl_module)
        elif self.score_fn is None:
            self._check_can_evaluate(trainer)

    def _params(self, pl_module: L.LightningModule) -> list[tuple[str, nn.Parameter]]:
        params = select_parameters(policy_of(pl_module), self.include)
        if not params:
            names = [n for n, _ in policy_of(pl_module).named_parameters()][:8]
            raise SettingError(f"EffOPDCallback.include={list(self.include)} matches no trainable parameter "
                             f"of the student (its parameters start: {names})")
        return params

    def _check_anchor(self, params: list[tuple[str, nn.Parameter]]) -> None:
        assert self.anchor is not None
        saved = {n: tuple(a.shape) for n, a in self.anchor.items()}
        current = {n: tuple(local_tensor(p).shape) for n, p in params}
        if saved != current:
            bad = sorted(set(saved.items()) ^ set(current.items()))[:4]
            raise SettingError(f"EffOPDCallback: the checkpoint's anchor does not match the student's "
                             f"extrapolated parameters (name, shape) here, e.g. {bad}; was `include`, the "
                             "model or the sharding changed?")

    @staticmethod
    def _check_can_evaluate(trainer: L.Trainer) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, RolloutDataModule):
            raise SettingError("EffOPDCallback(score='accuracy') needs the RolloutDataModule (its "
                             "evaluate(module)); pass score='loss' or score_fn otherwise")
        loader = datamodule.val_dataloader()
        if isinstance(loader, list) and not loader:
            raise SettingError("EffOPDCallback(score='accuracy') needs validation prompts: set the "
                             "DataModule's val_source or val_size > 0")

    def _prepare_loss_cache(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, PolicyModule):
            raise SettingError("EffOPDCallback(score='loss') needs a lit_opd method (its score_loss(batch)); "
                             f"{type(pl_module).__name__} is not one: use score_fn")
        if self._loss_cache is None:  # rank 0's rollouts on every rank: same scores, exact resume
            cache = self._roll_out_validation(trainer, pl_module)
            self._loss_cache = trainer.strategy.broadcast(cache, src=0)
        self._loss_batches = [RolloutBatch.from_state(s, pl_module.device) for s in self._loss_cache]

    def _roll_out_validation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        datamodule = trainer.datamodule
        cache = []
        if isinstance(datamodule, RolloutDataModule):
            cache = [r.to_state() for r in held_out_rollouts(datamodule, pl_module, self.seed, self.loss_batches)]
        if not cache:
            raise SettingError("EffOPDCallback(score='loss') needs a RolloutDataModule with validation "
                             "prompts: set its val_source or val_size > 0")
        return cache

    # ----- the search -----------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done, this one included
        if self.should_trigger(step):
            self.search(trainer, pl_module)

    def search(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SearchResult:
        """Run one line search now, at ``trainer.global_step``; log it and append to history."""
        assert self.anchor is not None, "EffOPDCallback.search runs after on_train_start"
        step, started = trainer.global_step, time.perf_counter()
        named = self._params(pl_module)
        result = extrapolation_search(
            [local_tensor(p) for _, p in named], [self.anchor[n] for n, _ in named],
            lambda: self._score(trainer, pl_module), self.num_trials, self.initial_factor,
        )
        _weights_changed(trainer)  # the kept point (or the restored start) is what rollouts use next
        self.last_trigger_step = step
        record = {"step": step, **dataclasses.asdict(result), "num_accepted": result.num_accepted,
                  "best_score": result.best_score, "seconds": time.perf_counter() - started}
        self.history.append(record)
        self._log(trainer, result, step)
        return result

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        _weights_changed(trainer)  # each trial scores other weights: an engine with its own copy syncs
        with scoring_context(pl_module, self.seed):
            if self.score_fn is not None:
                value = float(self.score_fn(trainer, pl_module))
            elif self.score == "loss":
                with trainer.precision_plugin.forward_context():  # the loss as training computes it
                    value = loss_score(pl_module, self._loss_batches)
            else:  # greedy accuracy on the validation prompts, by the task's verifier
                value = float(trainer.datamodule.evaluate(pl_module)["accuracy"])
        mean = trainer.strategy.reduce(
            torch.tensor(value, dtype=torch.float64, device=pl_module.device), reduce_op="mean"
        )
        return float(trainer.strategy.broadcast(float(mean), src=0))

    def _log(self, trainer: L.Trainer, result: SearchResult, step: int) -> None:
        metrics = {"effopd/initial_score": result.initial_score}
        for i, (value, ok) in enumerate(zip(result.trial_scores, result.trial_accepted), start=1):
            metrics[f"effopd/trial_{i}_score"] = value
            metrics[f"effopd/trial_{i}_accepted"] = float(ok)
        metrics.update({"effopd/num_accepted": float(result.num_accepted),
                        "effopd/multiplier": result.multiplier, "effopd/best_score": result.best_score})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        rank_zero_info(
            f"EffOPD step {step}: score {result.initial_score:.4f} -> {result.best_score:.4f}, "
            f"{result.num_accepted}/{len(result.trial_scores)} trials kept, multiplier {result.multiplier:g}"
        )

    # ----- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        anchor = None if self.anchor is None else cpu_copy(self.anchor)
        return {"anchor": anchor, "last_trigger_step": self.last_trigger_step, "sharded": self._sharded,
                "history": [dict(r) for r in self.history], "loss_cache": self._loss_cache}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.anchor = state_dict["anchor"]
        self.last_trigger_step = int(state_dict["last_trigger_step"])
        self.history = [dict(r) for r in state_dict["history"]]
        self._loss_cache = state_dict.get("loss_cache")
        self._sharded = bool(state_dict.get("sharded", False))
