"""PolicyModule: what every method shares — the student, its tokenizer, the optimizer, step
logging, validation and a checkpoint that holds the student and nothing else.

Methods subclass :class:`~lit_opd.methods.opd.OPDModule` (or this, for SFT) and implement
``loss(batch, ...)``. The rollout DataModule reaches the student through :attr:`policy`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from lit_opd import checkpoints, lora
from lit_opd.errors import CheckpointError, SettingError, UserError
from lit_opd.models import ModelSpec, as_spec, check_model_vocab, load_causal_lm, load_tokenizer
from lit_opd.rollout.datamodule import RolloutDataModule
from lit_opd.rollout.evaluation import StageEvaluator
from lit_opd.rollout.prompts import PromptTokenizer
from lit_opd.types import RolloutBatch


def default_optimizer(params) -> torch.optim.Optimizer:  # noqa: ANN001
    return torch.optim.AdamW(params, lr=1e-5)


def build_refusing_in_one_line(factory, arg, setting: str):  # noqa: ANN001, ANN201
    """``factory(arg)``; torch refuses bad settings (a negative lr, betas outside [0, 1)) with a
    ValueError from its own code, which the CLI would print as a bug: here it names the setting."""
    try:
        return factory(arg)
    except ValueError as err:
        raise SettingError(
            f"model.init_args.{setting}: the {setting} refused its settings ({err}); fix that value under "
            f"model.init_args.{setting}.init_args"
        ) from err


class PolicyModule(L.LightningModule):
    """Base of every method: owns the student (``policy``) and its tokenizer.

    Args:
        student: a :class:`ModelSpec`, a path / hub id, or (from Python) an ``nn.Module``. With
            ``ModelSpec.lora`` (or a peft ``PeftModel``) only the adapters train and are checkpointed.
        tokenizer: tokenizer path or object; defaults to the one stored with ``student``.
        optimizer: optimizer factory, ``params -> Optimizer`` (``class_path`` in YAML).
        scheduler: optional LR scheduler factory, stepped every optimizer step.
        allow_settings_change: resume (``fit --ckpt_path``) from a checkpoint made with another
            student spec (path, revision, dtype, quantization, tokenizer) or, for methods with an
            objective, another objective class or setting. Off: such a resume is refused, listing
            the differences. Checksums and the architecture are checked regardless.
    """

    def __init__(
        self,
        student: ModelSpec | str | nn.Module,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        allow_settings_change: bool = False,
    ) -> None:
        super().__init__()
        # Models, teachers and components are objects: the CLI's config.yaml records them instead.
        self.save_hyperparameters(
            ignore=["student", "teacher", "tokenizer", "objective", "optimizer", "scheduler", "reference"]
        )
        self.student = load_causal_lm(student)
        self.student.train()
        self.tokenizer = load_tokenizer(tokenizer, student)
        check_model_vocab(self.student, self.tokenizer, "student")
        self.student_spec = None if isinstance(student, nn.Module) else student
        if lora.is_peft_model(self.student):
            # Checkpoints hold only the adapters; the frozen base (4-bit quant state included) stays
            # as loaded here. on_load_checkpoint checks the adapter keys itself.
            self.strict_loading = False
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.allow_settings_change = allow_settings_change
        self.val_length = MeanMetric()
        self._evaluators: dict[str, StageEvaluator] = {}  # the running val / test tallies
        self._step_started = 0.0
        # The latest training step's loss terms (detached), so the HealthGuard can name a NaN one.
        self.step_terms: dict[str, torch.Tensor | float] = {}

    @property
    def policy(self) -> nn.Module:
        """The model that generates rollouts: the student, with its current weights (for a LoRA
        student, the transformers model inside the PeftModel, adapters in place and active)."""
        return lora.unwrap(self.student)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` shard the student FSDP2-style: every decoder layer, then
        the root, over the data-parallel mesh. Generation keeps working because each forward
        gathers its layer's shards (ranks stop decoding together, see ``rollout.ranks_agree``).
        Teachers and references stay replicated."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.student, FSDPModule):  # configure_model runs again for validate/test
            return
        dp_mesh = mesh["data_parallel"]
        for layer in self.policy.get_decoder().layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(self.student, mesh=dp_mesh)

    def completion_source(self) -> str:
        """Where this training step's completions come from: "student" (on-policy) by default."""
        return "student"

    def connect_prompts(self, encoder: PromptTokenizer, train_rows: list[dict], val_rows: list[dict]) -> None:
        """Called once by the RolloutDataModule's ``setup`` with its prompt encoder (chat template,
        length policy) and the encoded training / validation records, so a method that needs rows
        outside a batch (ListOPD's calibration) gets them without reaching into the datamodule.
        Nothing to do by default."""

    # ----- the step: one for every method ---------------------------------------------------
    def training_step(self, batch: RolloutBatch, batch_idx: int) -> torch.Tensor:
        """The one training step of every method: its :meth:`compute_loss` on the rollout batch, then
        the step's logging (loss terms, rollout statistics; a taught method adds its teacher's counters)."""
        loss, metrics = self.compute_loss(batch)
        self.log_rollout(batch, {"loss": loss.detach(), **metrics})
        return loss

    def compute_loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The method's loss on ``batch`` (differentiable) and its detached diagnostics, each logged as
        ``train/<key>`` (``supervised_tokens`` also tells the HealthGuard whether the step had any
        supervision). What a method writes, and all it writes of the step."""
        raise NotImplementedError(f"{type(self).__name__} does not define compute_loss")

    def score_loss(self, batch: RolloutBatch) -> torch.Tensor:
        """The method's training loss on ``batch`` without an update (EffOPD's held-out score)."""
        return self.compute_loss(batch)[0]

    # ----- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):  # noqa: ANN201
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = build_refusing_in_one_line(self.optimizer_factory, params, "optimizer")
        if self.scheduler_factory is None:
            return optimizer
        scheduler = build_refusing_in_one_line(self.scheduler_factory, optimizer, "scheduler")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        """A default :class:`~lit_opd.callbacks.HealthGuard` (skip NaN/inf updates, stop with one
        clear error, atomic checkpoints) and :class:`~lit_opd.callbacks.CollapseWatch` (warn when
        the student collapses toward uniform or its completions run away), each unless the trainer
        already has one: Lightning lets a callback returned here replace the trainer's own of the
        same type, so one the user configured (other settings, or ``enabled: false``) must win by not
        returning ours.

        Also where a DataModule that is not a RolloutDataModule is refused: Lightning calls this first
        of the module's hooks, with the DataModule attached, for fit, validate and test alike (methods
        override ``setup``/``on_fit_start`` without calling up), before a remote teacher connects."""
        # Imported here: lit_opd.callbacks imports the methods.
        from lit_opd.callbacks.collapse import CollapseWatch
        from lit_opd.callbacks.health import HealthGuard

        trainer = self._trainer
        check_rollout_datamodule(self, getattr(trainer, "datamodule", None))
        configured = list(trainer.callbacks) if trainer is not None else []
        defaults = [HealthGuard(), CollapseWatch()]
        return [cb for cb in defaults if not any(isinstance(own, type(cb)) for own in configured)]

    # ----- logging --------------------------------------------------------------------------
    def on_train_batch_start(self, batch: RolloutBatch, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: RolloutBatch, batch_idx: int) -> None:  # noqa: ANN001
        train_s = time.perf_counter() - self._step_started
        total_s = train_s + batch.rollout_seconds
        self.log_dict(
            {
                "time/rollout_s": batch.rollout_seconds,
                "time/train_s": train_s,
                "tok_s": batch.num_tokens / max(total_s, 1e-9),
            },
            prog_bar=False,
            batch_size=batch.completion_ids_BT.shape[0],
        )
        self.log("tok/s", batch.num_tokens / max(total_s, 1e-9), prog_bar=True, logger=False)

    progress_bar_terms: tuple[str, ...] = ("teacher_kl", "entropy")  # loss terms shown beside loss and len

    def log_rollout(self, batch: RolloutBatch, metrics: dict[str, torch.Tensor]) -> None:
        """Loss terms plus completion-length statistics, every step, key ones in the progress bar."""
        lengths_B = batch.completion_mask_BT.sum(-1).float()
        stats = {
            "rollout/len_mean": lengths_B.mean(),
            "rollout/len_max": lengths_B.max(),
            "rollout/cut_frac": batch.truncated_B.float().mean() if batch.truncated_B is not None else 0.0,
        }
        # The engine-vs-student KL describes the rollout, not the loss (OPDModule.loss measures it).
        stats.update({("rollout/" if k == "mismatch_kl" else "train/") + k: v for k, v in metrics.items()})
        self.step_terms = dict(metrics)
        B = batch.completion_ids_BT.shape[0]
        self.log_dict(stats, batch_size=B)
        bar = {"loss": metrics["loss"], "len": stats["rollout/len_mean"]}
        bar.update({k: metrics[k] for k in self.progress_bar_terms if k in metrics})
        self.log_dict(bar, prog_bar=True, logger=False, batch_size=B)

    # ----- validation -----------------------------------------------------------------------
    def validation_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        """Score the graded batch (``val/accuracy``, pass@k, per domain: logged at the epoch's end)."""
        self.val_length.update(batch.completion_mask_BT.sum(-1).float())
        self.log("val/len_mean", self.val_length, on_epoch=True, on_step=False)
        self._tally("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_tally("val")

    def test_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        """As :meth:`validation_step`, on ``test_source``'s prompts (``test/accuracy``, ...)."""
        self._tally("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_tally("test")

    def _tally(self, stage: str, batch: RolloutBatch, batch_idx: int) -> None:
        # A fresh tally at each epoch's first batch (none left over from an interrupted one), from
        # the attached datamodule's evaluation settings and rows; logged and dropped at the epoch's end.
        if batch_idx == 0 or stage not in self._evaluators:
            self._evaluators[stage] = StageEvaluator.attached_to(self, stage)
        self._evaluators[stage].update(batch)

    def _log_tally(self, stage: str) -> None:
        evaluator = self._evaluators.pop(stage, None)
        if evaluator is not None:
            evaluator.log_epoch(self)

    # ----- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Only the student's weights: frozen teachers/references are rebuilt from their specs.
        # A LoRA student keeps only its adapters; the frozen base is rebuilt from the spec.
        state = checkpoint["state_dict"]
        peft = lora.is_peft_model(self.student)
        keep = lora.trainable_keys(self.student, "student.") if peft else None
        for key in [k for k in state if not k.startswith("student.") or (keep is not None and k not in keep)]:
            del state[key]
        info = checkpoint.setdefault("lit_opd", {})
        info["student_config"] = self._student_config()
        info["tokenizer_files"] = tokenizer_files(self.tokenizer)
        info["student_spec"] = self._student_identity()
        if peft:
            info["peft"] = lora.peft_record(self.student)
        # Last: a sha256 per student tensor, checked before a resume, validate/test or export uses them.
        checksums = checkpoints.record_checksums(state)
        if checksums is not None:
            info["checksums"] = checksums

    def _student_identity(self) -> dict | None:
        return None if self.student_spec is None else as_spec(self.student_spec).identity()

    def _student_config(self) -> dict | None:
        return self.student.config.to_dict() if hasattr(self.student, "config") else None

    def _resuming(self) -> bool:
        """Whether the checkpoint being loaded resumes training (``fit``), not ``validate``/``test``."""
        trainer = self._trainer
        return trainer is None or trainer.state.fn == "fit"

    def settings_changes(self, info: dict) -> list[str]:
        """How this run's settings differ from a checkpoint's ``lit_opd`` record: the student spec
        here; methods with an objective add its class and settings."""
        return checkpoints.settings_changes(info, self._student_identity())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before Lightning loads the weights: a LoRA checkpoint fits the student, the file's tensors
        match their checksums, the architecture agrees and (when fitting) the settings do; each
        refusal is one line."""
        info, subject = checkpoint.get("lit_opd", {}), checkpoints.subject_of(self._trainer)
        saved_state = checkpoint.get("state_dict", {})
        current = lora.peft_record(self.student) if lora.is_peft_model(self.student) else None
        lora.check_resume(info, current, self._student_identity())
        if current is not None:
            lora.check_adapter_keys(set(saved_state), lora.trainable_keys(self.student, "student."))
        checkpoints.verify_checksums(info, saved_state, subject)
        own = self.state_dict() if current is None else {}
        if current is None:
            mismatch = checkpoints.architecture_mismatch(
                info.get("student_config"), self._student_config(), saved_state, own
            )
            if mismatch is not None:
                raise CheckpointError(f"{subject} holds {mismatch}; nothing was loaded. Configure the "
                                      "student this checkpoint was trained from (model.init_args.student).")
        if self._resuming() and not self.allow_settings_change:
            changes = self.settings_changes(info)
            if changes:
                raise CheckpointError(checkpoints.settings_change_message(subject, changes))
        # The saved state dict holds only student weights; other registered buffers keep their init.
        for key, value in own.items():
            saved_state.setdefault(key, value)


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The tokenizer's saved files, so ``export`` can write it even when it came from an object."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def check_rollout_datamodule(module: L.LightningModule, datamodule: L.LightningDataModule | None) -> None:
    """A method trains on the student's own rollouts: refuse, in one line, a DataModule that hands it
    anything else (its batches would otherwise fail deep inside the teacher)."""
    if datamodule is None or isinstance(datamodule, RolloutDataModule):
        return
    raise UserError(
        f"{type(datamodule).__name__} is a plain LightningDataModule, but {type(module).__name__} needs a "
        "lit_opd.RolloutDataModule: it samples completions with the current student before every step. Hand "
        "your prompts to one as a source, e.g. RolloutDataModule(ListPrompts(rows), batch_size=...) or "
        "JsonlPrompts(path) (CLI: data.class_path: lit_opd.RolloutDataModule)."
    )
