"""HealthGuard: training that goes non-finite skips the bad update, stops with one clear error when
it keeps happening, and never costs the user a good checkpoint. A step with nothing to learn from (a
remote teacher that answered none of its rows) is skipped the same way, and a teacher that stays
down ends the run with one line naming its URL.

Every :class:`~lit_opd.methods.base.PolicyModule` adds a default ``HealthGuard()`` through
``configure_callbacks`` unless the trainer already has one, so every method is covered without
configuration. To change its settings, list your own in ``trainer.callbacks`` (it then replaces the
default); ``enabled: false`` turns it off::

    trainer:
      callbacks:
        - class_path: lit_opd.callbacks.HealthGuard
          init_args: {max_consecutive_skips: 5}

Why a callback: the checks sit on Lightning's hooks (``on_before_backward``,
``on_before_optimizer_step``, ``on_train_batch_end``), so they work for any LightningModule and any
loss without touching ``training_step``, and a callback can install the checkpoint writer on the
strategy in ``setup`` without the user configuring plugins.

How an update is skipped: in ``on_before_optimizer_step`` (after backward and the DDP gradient
all-reduce, before clipping) every gradient is set to ``None``. ``torch.optim`` optimizers leave
parameters without a gradient alone, so AdamW's moments, its step count and weight decay do not move;
zeroing the gradients instead would still advance them. Lightning still counts the step (``global_step``
and the LR scheduler advance, as with a GradScaler's skipped step), so a run keeps its length. Returning
None from ``training_step`` is not used: Lightning cannot do it under DDP, and it does not see
gradients that are non-finite although the loss is finite, which is how a too-high learning rate
usually shows up first.

Unsupervised updates: a method reports the step's ``supervised_tokens`` in its ``step_terms`` (the
loss-mask tokens left once the rows its teacher did not answer are dropped; ``OPDModule.loss`` does).
With none in the whole update (on every rank) the gradients are exact zeros, yet AdamW's momentum
would still move the weights: the update is skipped as above (``train/skipped_unsupervised``, a
warning naming the teacher's URL). ``max_unsupervised_steps`` in a row stop the run with one line,
:class:`~lit_opd.errors.TeacherUnreachable`; a supervised step (partial answers count) resets the count.

Lightning's own tools remain available alongside: ``trainer.gradient_clip_val`` (clipping runs after
this check) and ``trainer.detect_anomaly=true`` (finds the operation that made the first NaN).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_opd.callbacks.checkpoint_io import install_atomic_checkpoint_io
from lit_opd.errors import NonFiniteError, SettingError, TeacherUnreachable, UserError
from lit_opd.models import any_nonfinite, first_nonfinite

SKIPPED_KEY = "train/skipped_nonfinite"
SKIPPED_UNSUPERVISED_KEY = "train/skipped_unsupervised"
SUPERVISED_TERM = "supervised_tokens"  # in a method's step_terms: the loss-mask tokens of the step


class HealthGuard(L.Callback):
    """Skip updates whose loss or gradients are NaN/inf; stop the run with one error after
    ``max_consecutive_skips`` such steps in a row, or as soon as a weight is NaN/inf.

    Each skipped step is counted (logged as ``train/skipped_nonfinite``, the total so far) and warned
    about with its step. The error names the step, the first non-finite loss term or parameter, and
    the settings most likely at fault (learning rate, temperatures, λ). Checkpoints are written
    atomically and never from non-finite weights (:class:`~lit_opd.callbacks.AtomicCheckpointIO`). Updates without
    supervision are skipped too (``train/skipped_unsupervised``; see the module's docstring).

    Args:
        max_consecutive_skips: skipped steps in a row after which the run stops.
        max_unsupervised_steps: skipped steps in a row without supervision (the teacher answered none
            of their rows: its server is down) after which the run stops, naming the teacher's URL.
        check_weights: after every update, check the trainable weights (one pass over them).
        atomic_checkpoints: install :class:`~lit_opd.callbacks.AtomicCheckpointIO` when the strategy uses Lightning's
            default checkpoint writer (a writer you configured yourself is left alone).
        enabled: False turns every check off (Lightning's behaviour).
    """

    def __init__(
        self,
        max_consecutive_skips: int = 3,
        max_unsupervised_steps: int = 5,
        check_weights: bool = True,
        atomic_checkpoints: bool = True,
        enabled: bool = True,
    ) -> None:
        for name, value in (("max_consecutive_skips", max_consecutive_skips),
                            ("max_unsupervised_steps", max_unsupervised_steps)):
            if value < 1:
                raise SettingError(f"HealthGuard.{name}={value} must be >= 1")
        self.max_consecutive_skips, self.check_weights = max_consecutive_skips, check_weights
        self.max_unsupervised_steps = max_unsupervised_steps
        self.atomic_checkpoints, self.enabled = atomic_checkpoints, enabled
        self.skipped = 0  # skipped updates in this run (resumed runs continue the count)
        self.skipped_unsupervised = 0
        self.consecutive = 0
        self.unsupervised_in_a_row = 0
        self._loss_bad: torch.Tensor | None = None  # over the micro-batches of one update
        self._supervised: torch.Tensor | None = None  # supervised tokens, over the same micro-batches
        self._loss: torch.Tensor | None = None
        self._updated_at: int | None = None  # the step whose update went through, until checked

    # ----- setup ----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and self.atomic_checkpoints:
            install_atomic_checkpoint_io(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.consecutive, self._loss_bad, self._updated_at = 0, None, None
        self.unsupervised_in_a_row, self._supervised = 0, None

    # ----- the checks -----------------------------------------------------------------------
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if not self.enabled:
            return
        self._loss = loss.detach()
        bad = ~torch.isfinite(self._loss).all()  # stays on the device: one sync per update, below
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        # A method that does not report its supervised tokens counts as supervised.
        tokens = (getattr(pl_module, "step_terms", None) or {}).get(SUPERVISED_TERM, 1.0)
        tokens = torch.as_tensor(tokens, device=self._loss.device).detach().float()
        self._supervised = tokens if self._supervised is None else self._supervised + tokens

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.enabled:
            return
        loss_bad, self._loss_bad = self._loss_bad, None
        supervised, self._supervised = self._supervised, None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # Under a GradScaler (16-mixed) inf gradients are routine and the scaler skips those steps itself.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads_bad = None if scaler is not None else any_nonfinite(p.grad for p in params)
        bad, unsupervised = _decide(trainer, [f for f in (loss_bad, grads_bad) if f is not None], supervised)
        if not bad:
            self.consecutive = 0
        if not unsupervised:
            self.unsupervised_in_a_row = 0
        if not (bad or unsupervised):
            self._updated_at = trainer.global_step
            return
        what = self._describe(pl_module, params, bool(loss_bad)) if bad else ""
        for p in params:
            p.grad = None
        if bad:
            self._skip(trainer, pl_module, what)
        else:
            self._skip_unsupervised(trainer, pl_module)

    def _skip(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        self.skipped += 1
        self.consecutive += 1
        step = trainer.global_step
        if self.consecutive >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"{what}; {self.consecutive} updates in a row had NaN/inf (each one skipped), so the run "
                "stops here instead of training on.",
                step=step, suspects=suspect_settings(trainer, pl_module),
            )
        rank_zero_warn(
            f"HealthGuard: global step {step}: {what}; this update was skipped "
            f"({self.consecutive}/{self.max_consecutive_skips} in a row before the run stops)."
        )

    def _skip_unsupervised(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.skipped_unsupervised += 1
        self.unsupervised_in_a_row += 1
        step, n, limit = trainer.global_step, self.unsupervised_in_a_row, self.max_unsupervised_steps
        teacher = _teacher_failed(pl_module)
        if n >= limit:
            what = f"{teacher} answered none of the rows" if teacher else "no token was in the loss mask"
            fix = "Check that the teacher's server is up, then resume with --ckpt_path last" if teacher else (
                "Check what empties the loss mask")
            raise (TeacherUnreachable if teacher else UserError)(
                f"At global step {step}: {what} of the last {n} training steps (each update skipped: the "
                f"student and its optimizer are as after the last supervised step), so the run stops here. "
                f"{fix}; HealthGuard.max_unsupervised_steps={limit} sets how many such steps in a row a run "
                "waits out."
            )
        what = f"{teacher} answered none of this step's rows" if teacher else "no token is in the loss mask"
        rank_zero_warn(f"HealthGuard: global step {step}: {what}; this update was skipped, nothing supervised "
                       f"it ({n}/{limit} in a row before the run stops).")

    def _describe(self, pl_module: L.LightningModule, params: list, loss_bad: bool) -> str:
        """What went non-finite: the loss (with its non-finite terms) or the first gradient."""
        if loss_bad:
            terms = getattr(pl_module, "step_terms", None) or {}
            names = [k for k, v in terms.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]
            named = f" (non-finite terms: {', '.join(names)})" if names else ""
            value = float(self._loss.float().mean()) if self._loss is not None else float("nan")
            return f"the loss is {value}{named}"
        names = {id(p): n for n, p in pl_module.named_parameters()}
        first = next((names.get(id(p), "?") for p in params if bool(any_nonfinite([p.grad]))), None)
        loss = "" if self._loss is None else f" (the loss, {float(self._loss.float().mean()):.4g}, is finite)"
        return f"the gradient of {first or 'a parameter on another rank'} holds NaN/inf{loss}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled:
            return
        pl_module.log(SKIPPED_KEY, float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(SKIPPED_UNSUPERVISED_KEY, float(self.skipped_unsupervised), on_step=True, on_epoch=False,
                      batch_size=1)
        step, self._updated_at = self._updated_at, None
        if step is None or not self.check_weights:
            return
        weights = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        bad = any_nonfinite(p for _, p in weights)
        if trainer.strategy.reduce_boolean_decision(bool(bad) if bad is not None else False, all=False):
            name = first_nonfinite(weights) or "a parameter shard on another rank"
            raise NonFiniteError(
                f"after this step's update the weight {name} holds NaN/inf (the loss and gradients were "
                "finite: the update itself overflowed).",
                step=step, suspects=suspect_settings(trainer, pl_module),
            )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A NaN found deep inside the rollout does not know the step or the settings; add them.
        if isinstance(exception, NonFiniteError):
            exception.add_context(trainer.global_step, suspect_settings(trainer, pl_module))

    # ----- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "skipped_unsupervised": self.skipped_unsupervised}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.skipped_unsupervised = int(state_dict.get("skipped_unsupervised", 0))


# ----- helpers ------------------------------------------------------------------------------
def _decide(
    trainer: L.Trainer, nonfinite: list[torch.Tensor], supervised: torch.Tensor | None
) -> tuple[bool, bool]:
    """(skip as non-finite, skip as unsupervised), with one host sync and the same on every rank (or
    DDP/FSDP ranks would drift apart): non-finite on any rank; no supervised token on any rank."""
    device = next((t.device for t in (*nonfinite, supervised) if t is not None), torch.device("cpu"))
    no = torch.zeros((), dtype=torch.bool, device=device)
    bad = torch.stack([f.to(device) for f in nonfinite]).any() if nonfinite else no
    empty = supervised.to(device) == 0 if supervised is not None else no
    bad_here, empty_here = torch.stack([bad, empty]).tolist()
    strategy = trainer.strategy
    return (strategy.reduce_boolean_decision(bool(bad_here), all=False),
            strategy.reduce_boolean_decision(bool(empty_here), all=True))


def _teacher_failed(pl_module: L.LightningModule) -> str | None:
    """The teacher, as a message names it (its class and the URLs its identity records), when it
    answered none of this step's rows; None when the loss mask is empty for another reason."""
    missing = (getattr(pl_module, "step_terms", None) or {}).get("teacher_missing_frac")
    teacher = getattr(pl_module, "teacher", None)
    if missing is None or float(missing) < 1.0:
        return None
    if teacher is None:
        return "the teacher"
    urls = sorted(set(_base_urls(teacher.identity())))
    return type(teacher).__name__ + (f" at {' and '.join(urls)}" if urls else "")


def _base_urls(identity: Any) -> Iterable[str]:
    """Every ``base_url`` in a teacher's identity (a group's holds its members' identities)."""
    if isinstance(identity, dict):
        for key, value in identity.items():
            if key == "base_url" and isinstance(value, str):
                yield value
            else:
                yield from _base_urls(value)


def suspect_settings(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """The settings that most often make training non-finite, with their values, learning rate first."""
    found = []
    for optimizer in trainer.optimizers:
        # The lr the user set (a scheduler keeps it as initial_lr), then where the schedule has it now.
        given = sorted({group.get("initial_lr", group["lr"]) for group in optimizer.param_groups})
        now = sorted({group["lr"] for group in optimizer.param_groups})
        scheduled = f", {', '.join(f'{lr:g}' for lr in now)} at this step" if now != given else ""
        lr = ", ".join(f"{lr:g}" for lr in given)
        found.append(f"lr={lr} (the usual cause: try it 10x lower{scheduled})")
    sampling = getattr(getattr(trainer, "datamodule", None), "sampling", None)
    if sampling is not None:
        found.append(f"sampling temperature={sampling.temperature:g}")
    objective = getattr(pl_module, "objective", None)
    settings = objective.settings() if hasattr(objective, "settings") else {}
    found += [f"objective {k}={settings[k]}" for k in ("temperature", "lambda_", "kl_coef") if k in settings]
    teacher_t = getattr(getattr(pl_module, "teacher", None), "temperature", None)
    if isinstance(teacher_t, (int, float)):
        found.append(f"teacher temperature={teacher_t:g}")
    if getattr(pl_module, "lambda_", None) is not None:
        found.append(f"{type(pl_module).__name__}.lambda_={pl_module.lambda_}")
    found.append(f"precision={trainer.precision}")
    found.append(f"gradient_clip_val={trainer.gradient_clip_val}")
    return ", ".join(found)
