"""CollapseWatch: a warning, once per kind, when a run degrades although its numbers stay finite.

The failures users report most are not NaNs (the :class:`~lit_opd.callbacks.HealthGuard` catches
those) but a student that quietly stops being a language model:

* **collapse to uniform**: the student's entropy (``train/entropy``) climbs toward ``ln V``, the
  entropy of a uniform distribution over its vocabulary, while ``train/teacher_kl`` may still fall;
  the usual cause is a learning rate too high for reverse KL or for LoRA adapters;
* **runaway length**: completions get much longer or hit the length limit (``rollout/len_mean``,
  ``rollout/cut_frac``); the usual cause is a student that no longer emits EOS where the teacher
  ends, i.e. a chat-template or EOS-id mismatch;
* **accuracy fall**: ``val/accuracy`` drops far below its best value of the run.

Every :class:`~lit_opd.methods.base.PolicyModule` adds a default ``CollapseWatch()`` through
``configure_callbacks``; one listed under ``trainer.callbacks`` replaces it (other thresholds,
``stop: true`` to end the run, ``enabled: false``). Signals are averaged over ``window`` steps so a
single noisy batch does not warn; the length baseline is the average of the run's first window.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lit_opd.errors import SettingError, UserError

ENTROPY_KEY = "train/entropy"
LENGTH_KEY = "rollout/len_mean"
CUT_KEY = "rollout/cut_frac"
ACCURACY_KEY = "val/accuracy"

_CAUSES = {
    "entropy": "likely cause: a learning rate too high for reverse KL or LoRA; lower "
               "model.init_args.optimizer.init_args.lr (e.g. 10x) or add trainer.gradient_clip_val",
    "length": "likely cause: the student no longer ends where the teacher does, a chat-template or EOS "
              "mismatch; check data.init_args.use_chat_template and that student, teacher and data share "
              "the EOS id",
    "accuracy": "likely cause: a learning rate too high for this objective; lower "
                "model.init_args.optimizer.init_args.lr or resume from an earlier checkpoint",
}


class TrainingCollapsed(UserError, RuntimeError):
    """Raised by ``CollapseWatch(stop=True)``: the message names the step, the signal and the cause."""


class CollapseWatch(L.Callback):
    """Warn once per kind when the student collapses toward uniform, its completions run away in
    length, or its validation accuracy falls far below its best.

    Args:
        entropy_frac: warn when ``train/entropy`` reaches this fraction of ``ln V`` (V: the student's
            output vocabulary) after having been below it in this run (a student that starts
            uniform, e.g. random weights, is not warned about).
        length_ratio: warn when ``rollout/len_mean`` reaches this multiple of its first-window mean.
        cut_frac_rise: warn when ``rollout/cut_frac`` rises this much (absolute) above its
            first-window mean.
        accuracy_drop: warn when ``val/accuracy`` falls below ``(1 - accuracy_drop) x`` its best.
        window: training steps averaged per signal (and the length baseline's steps).
        stop: end the run (one line, :class:`TrainingCollapsed`) instead of only warning.
        enabled: False turns every check off.
    """

    def __init__(
        self,
        entropy_frac: float = 0.9,
        length_ratio: float = 2.0,
        cut_frac_rise: float = 0.3,
        accuracy_drop: float = 0.5,
        window: int = 5,
        stop: bool = False,
        enabled: bool = True,
    ) -> None:
        for name, value in (("entropy_frac", entropy_frac), ("cut_frac_rise", cut_frac_rise),
                            ("accuracy_drop", accuracy_drop)):
            if not 0.0 < value <= 1.0:
                raise SettingError(f"CollapseWatch.{name}={value} must be in (0, 1]")
        if length_ratio <= 1.0:
            raise SettingError(f"CollapseWatch.length_ratio={length_ratio} must be > 1 (a multiple)")
        if window < 1:
            raise SettingError(f"CollapseWatch.window={window} must be >= 1")
        self.entropy_frac, self.length_ratio, self.cut_frac_rise = entropy_frac, length_ratio, cut_frac_rise
        self.accuracy_drop, self.window, self.stop, self.enabled = accuracy_drop, window, stop, enabled
        self.warned: set[str] = set()
        self.best_accuracy: float | None = None
        self.baseline: dict[str, float] = {}  # first-window means of length and cut fraction
        self.min_entropy: float | None = None
        self._recent: dict[str, deque[float]] = {}

    # ----- hooks ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled:
            return
        means = self.observe({k: trainer.callback_metrics.get(k) for k in (ENTROPY_KEY, LENGTH_KEY, CUT_KEY)})
        found = self.new_findings(means, vocab_size(pl_module))
        self._report(trainer, found, means)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = trainer.callback_metrics.get(ACCURACY_KEY)
        if not self.enabled or trainer.sanity_checking or accuracy is None:
            return
        accuracy = float(accuracy)
        fell = self.accuracy_fell(accuracy)
        self._report(trainer, ["accuracy"] if fell else [], {ACCURACY_KEY: accuracy})

    # ----- the checks (plain numbers, testable without a trainer) ----------------------------
    def observe(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Add one step's metrics; the window means of those seen, once a window is full."""
        means = {}
        for key, value in metrics.items():
            if value is None or not math.isfinite(float(value)):
                continue
            recent = self._recent.setdefault(key, deque(maxlen=self.window))
            recent.append(float(value))
            if len(recent) == self.window:
                means[key] = sum(recent) / self.window
        for key in (LENGTH_KEY, CUT_KEY):
            if key in means:
                self.baseline.setdefault(key, means[key])
        return means

    def new_findings(self, means: dict[str, float], vocab: int | None) -> list[str]:
        """The kinds (``entropy``, ``length``) these window means show that were not warned about yet."""
        found = []
        entropy = means.get(ENTROPY_KEY)
        if entropy is not None and vocab:
            ceiling = self.entropy_frac * math.log(vocab)
            was_below = self.min_entropy is not None and self.min_entropy < ceiling
            self.min_entropy = entropy if self.min_entropy is None else min(self.min_entropy, entropy)
            if entropy >= ceiling and was_below:
                found.append("entropy")
        length, cut = means.get(LENGTH_KEY), means.get(CUT_KEY)
        longer = length is not None and length >= self.length_ratio * max(self.baseline[LENGTH_KEY], 1.0)
        cut_more = cut is not None and cut >= self.baseline[CUT_KEY] + self.cut_frac_rise
        if longer or cut_more:
            found.append("length")
        return [kind for kind in found if kind not in self.warned]

    def accuracy_fell(self, accuracy: float) -> bool:
        """Whether ``accuracy`` is far below the best so far (then recorded as warned about)."""
        best = self.best_accuracy
        self.best_accuracy = accuracy if best is None else max(best, accuracy)
        return best is not None and best > 0 and accuracy < (1 - self.accuracy_drop) * best and \
            "accuracy" not in self.warned

    def describe(self, kind: str, means: dict[str, float], vocab: int | None) -> str:
        """What was seen, in numbers, for the warning of ``kind``."""
        if kind == "entropy":
            entropy, uniform = means[ENTROPY_KEY], math.log(vocab or 1)
            return (f"the student's entropy ({ENTROPY_KEY}, mean of {self.window} steps) is {entropy:.2f}, "
                    f"{entropy / uniform:.0%} of a uniform distribution's (ln V = {uniform:.2f}): it is "
                    "collapsing toward uniform")
        if kind == "length":
            named = ((LENGTH_KEY, "mean length"), (CUT_KEY, "cut fraction"))
            parts = [f"{name} {self.baseline[key]:.2f} -> {means[key]:.2f}"
                     for key, name in named if key in means]
            return (f"completions are running away in length ({', '.join(parts)}, first {self.window} steps "
                    "-> now)")
        return (f"{ACCURACY_KEY} fell to {means[ACCURACY_KEY]:.3f}, below {1 - self.accuracy_drop:.0%} of "
                f"its best ({self.best_accuracy:.3f})")

    # ----- reporting ------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, found: list[str], means: dict[str, float]) -> None:
        message = "; ".join(f"{self.describe(k, means, vocab_size(trainer.lightning_module))}; {_CAUSES[k]}"
                            for k in found)
        if self.stop and trainer.strategy.reduce_boolean_decision(bool(found), all=False):
            # Every rank stops together; a rank that saw nothing itself still names the reason.
            raise TrainingCollapsed(f"CollapseWatch (stop: true): global step {trainer.global_step}: "
                                    f"{message or 'another rank saw the run collapse'}")
        for kind in found:
            self.warned.add(kind)
        if message:
            rank_zero_warn(f"CollapseWatch: global step {trainer.global_step}: {message}")

    # ----- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"warned": sorted(self.warned), "best_accuracy": self.best_accuracy,
                "baseline": dict(self.baseline), "min_entropy": self.min_entropy}

    def load_state_dict(self, state_dict: dict) -> None:
        self.warned = set(state_dict.get("warned", []))
        self.best_accuracy = state_dict.get("best_accuracy")
        self.baseline = dict(state_dict.get("baseline", {}))
        self.min_entropy = state_dict.get("min_entropy")


def vocab_size(pl_module: L.LightningModule) -> int | None:
    """The student's output vocabulary (the logits' last dimension), None for a module without one."""
    policy = getattr(pl_module, "policy", None)
    head = policy.get_output_embeddings() if hasattr(policy, "get_output_embeddings") else None
    return getattr(head, "out_features", None) or getattr(getattr(policy, "config", None), "vocab_size", None)
