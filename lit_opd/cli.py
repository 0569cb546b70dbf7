"""``python -m lit_opd fit|validate|test --config x.yaml``, ``python -m lit_opd export``,
``python -m lit_opd calibrate`` (ListOPD's λ*: :mod:`lit_opd.methods.list_opd.cli`) and
``python -m lit_opd serve-teacher --model PATH`` (a teacher behind vLLM's log-prob API, for
``ServerTeacher``: :mod:`lit_opd.teachers.serve`).

LightningCLI in subclass mode: ``model`` is any :class:`PolicyModule` (OPDModule, SFTModule, ...)
and ``data`` any RolloutDataModule, both given as ``class_path`` + ``init_args``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_opd import errors
from lit_opd.callbacks.progress import StepProgressBar
from lit_opd.callbacks.report import RunSummary
from lit_opd.checkpoints import check_ckpt_path, hparam_changes, read_checkpoint, settings_change_message
from lit_opd.errors import CheckpointError, UserError
from lit_opd.methods.base import PolicyModule
from lit_opd.rollout.datamodule import RolloutDataModule
from lit_opd.run_dirs import continue_csv_metrics, last_checkpoint, pin_logger_versions

DESCRIPTION = (
    "Train (fit), validate or test a lit_opd method from a YAML config. Other commands: "
    "`python -m lit_opd export --ckpt_path CKPT --out DIR` (the student in Hugging Face format), "
    "`python -m lit_opd calibrate ...` (ListOPD's lambda*), "
    "`python -m lit_opd serve-teacher --model PATH` (a log-prob server for ServerTeacher); "
    "add --help after any of them for its settings."
)
# Loggers whose package is optional: class name -> (modules, any one of which will do; the extra).
_LOGGER_PACKAGES = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "lit_opd[tensorboard]"),
    "WandbLogger": (("wandb",), "lit_opd[wandb]"),
    "MLFlowLogger": (("mlflow",), "mlflow"),
    "CometLogger": (("comet_ml",), "comet-ml"),
    "NeptuneLogger": (("neptune",), "neptune"),
}
# The warnings ModelCheckpoint and CSVLogger give about a non-empty folder: expected when resuming.
_RESUME_NOISE = ("Checkpoint directory .* exists and is not empty", "Experiment logs directory .* exists")
# Method settings about one resume, never taken from the checkpoint's saved hparams.
_RESUME_OVERRIDES = ("allow_teacher_change", "allow_settings_change")


class OPDArgumentParser(LightningArgumentParser):
    """A parse error is one line (the full setting and the reason), not the usage text followed by
    jsonargparse's nested report; ``LIT_OPD_DEBUG=1`` restores the full report."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or errors.debug_requested():
            super().error(message, ex)
        sys.stderr.write(f"error: {errors.condense_parser_message(message)}\n"
                         "tip: add --help to list the accepted settings\n")
        self.exit(2)


class OPDCLI(LightningCLI):
    """The project's CLI. Kept in a regular module (not ``__main__``) so ``ddp_spawn`` can pickle it."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - LightningCLI's own arguments
        kwargs.setdefault("parser_class", OPDArgumentParser)
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        # One optimizer slot, the method's `optimizer`: LightningCLI's top-level --optimizer would
        # silently replace it (cli_main refuses that key with a message).
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--new_version", type=bool, default=False,
            help="fit: log and checkpoint into a new version_N folder. By default a launch continues the "
                 "newest version folder of its logger, so `--ckpt_path last` resumes the same run in place.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Lightning loads ckpt_path (weights only) next: a refused file is reported with its setting.
        errors.remember_settings(self.config)

    def _parse_ckpt_path(self) -> None:
        """Lightning lays a --ckpt_path's saved hparams over the config and command line, silently
        replacing what this run was given (e.g. ``lmbda``). Instead the given values stand, and a
        resume (``fit``) whose method settings differ from the checkpoint's is refused with the
        differences listed unless ``allow_settings_change`` (the rule the student spec and the
        objective follow too)."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        init = (model.get("init_args") if model is not None else None) or {}
        given = dict(init.items())
        super()._parse_ckpt_path()
        if not given:
            return
        saved = self.config[subcommand].model.init_args
        if subcommand == "fit":
            refuse_changed_settings(dict(saved.items()), given, self.config[subcommand].get("ckpt_path"))
        for key, value in given.items():
            saved[key] = value

    def before_instantiate_classes(self) -> None:
        # A model directory that fails to load is reported with the setting that named it.
        errors.remember_settings(self.config)
        # A missing --ckpt_path fails now, in one line, not after the models loaded.
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))
            check_logger_packages(self.config[subcommand].get("trainer", {}).get("logger"))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:  # noqa: ANN401 - Trainer arguments
        """The configured trainer plus the console's defaults: a :class:`StepProgressBar` (unless a
        progress bar is configured or turned off) and a :class:`RunSummary`."""
        chosen = self.config_init[self.subcommand] if self.subcommand else self.config_init  # run=False: none
        config = {**chosen.get("trainer", {}), **kwargs}
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        kwargs["callbacks"] = [*given, *console_callbacks(config, given)]
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            flatten_checkpoint_filename(callback)
        return trainer

    def before_fit(self) -> None:
        """Keep a run in one place: pin the logger's version folder, resolve `--ckpt_path last` there
        (or stop, naming where it looked) and let a resumed run append to its metrics."""
        pin_logger_versions(self.trainer, new=bool(self.config["fit"].get("new_version")))
        fit = self.config_init["fit"]
        ckpt_path = fit.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = fit["ckpt_path"] = last_checkpoint(self.trainer)
            rank_zero_info(f"resuming from {ckpt_path}")
            # Found only now, after the settings check a named file gets in _parse_ckpt_path. Only the
            # hparams are read: the tensors are mapped, not loaded a second time before Lightning's load.
            saved = read_checkpoint(ckpt_path, f"ckpt_path={ckpt_path!r}", mmap=True)
            saved = saved.get("hyper_parameters", {})
            refuse_changed_settings(saved, dict(self.config["fit"].model.init_args.items()), ckpt_path)
        if ckpt_path:
            for pattern in _RESUME_NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            continue_csv_metrics(self.trainer)


def refuse_changed_settings(saved: dict, given: dict, ckpt_path: str | None) -> None:
    """A resume whose method settings (plain hparams, e.g. ``lmbda``) differ from the checkpoint's
    stops, listing them, unless this run sets ``allow_settings_change``."""
    changes = hparam_changes(saved, given, ignore=_RESUME_OVERRIDES)
    if changes and not given.get("allow_settings_change"):
        raise CheckpointError(settings_change_message(f"ckpt_path={str(ckpt_path)!r}", changes))


# ----- the console ----------------------------------------------------------------------------
def console_callbacks(trainer_config: dict, given: list[L.Callback]) -> list[L.Callback]:
    """The callbacks the CLI adds to the configured ones: no second progress bar, nor one when the
    bar is turned off (Lightning refuses both), and one RunSummary."""
    added: list[L.Callback] = []
    bar_wanted = trainer_config.get("enable_progress_bar") is not False
    if bar_wanted and not any(isinstance(cb, ProgressBar) for cb in given):
        added.append(StepProgressBar())
    if not any(isinstance(cb, RunSummary) for cb in given):
        added.append(RunSummary())
    return added


def quiet_third_party() -> None:
    """Silence, by their exact text, the messages every run printed that say nothing about it:
    Lightning's own use of torch's deprecated ``LeafSpec``, its litlogger/litmodels tips, and the
    weight-loading bars of transformers. Everything else (lit_opd's warnings included) still shows."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_lightning_tip)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _not_a_lightning_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def flatten_checkpoint_filename(callback: L.Callback) -> None:
    """A ModelCheckpoint ``filename`` naming a metric with "/" (``{val/accuracy}``) would make a
    subfolder per value (Lightning writes ``val/accuracy=0.75``): the names it inserts get "_" instead."""
    if not isinstance(callback, ModelCheckpoint) or not callback.auto_insert_metric_name:
        return
    groups = re.findall(r"\{([^{}:]+)[^{}]*\}", callback.filename or "")
    if not any("/" in name for name in groups):
        return
    callback.filename = re.sub(
        r"\{([^{}:]+)([^{}]*)\}", lambda m: f"{m.group(1).replace('/', '_')}={{{m.group(1)}{m.group(2)}}}",
        callback.filename,
    )
    callback.auto_insert_metric_name = False


def check_logger_packages(logger: Any) -> None:  # noqa: ANN401 - the config's trainer.logger, any form
    """A configured logger whose package is missing fails now, in one line naming the package."""
    for entry in logger if isinstance(logger, list) else [logger]:
        class_path = entry.get("class_path") if hasattr(entry, "get") else None
        name = str(class_path or "").rsplit(".", 1)[-1]
        if name not in _LOGGER_PACKAGES:
            continue
        modules, install = _LOGGER_PACKAGES[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise UserError(
                f"trainer.logger: {name} needs the {modules[0]} package, which is not installed: "
                f"pip install '{install}' (or log with lightning.pytorch.loggers.CSVLogger)"
            )


def cli_main(args: ArgsType = None, run: bool = True) -> OPDCLI | None:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests pass a list)."""
    argv = list(sys.argv[1:] if args is None else args)
    moved = moved_objective_keys(argv)
    if moved:
        sys.exit(
            f"error: model.init_args.{moved[0]} is no longer a setting of the method: the loss settings "
            f"({', '.join(moved)}) moved under `objective`. Write, under model.init_args,\n"
            "  objective:\n    class_path: lit_opd.objectives.Divergence   # or SampledReward; ListOPD: "
            "lit_opd.methods.list_opd.BaseRelativeClip\n    init_args: {kind: jsd, beta: 0.5}\n"
            "(`divergence:` is now `kind:`; see CHANGELOG.md)"
        )
    slot = top_level_optimizer_keys(argv)
    if slot:
        sys.exit(
            f"error: {slot[0]}: the optimizer and its schedule are settings of the method, not top-level "
            "settings: write them as model.init_args.optimizer / model.init_args.scheduler "
            "(class_path + init_args), e.g. --model.init_args.optimizer.init_args.lr 1e-4"
        )
    quiet_third_party()
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return None
    if argv and argv[0] == "calibrate":
        from lit_opd.methods.list_opd.cli import calibrate_main

        calibrate_main(argv[1:])
        return None
    if argv and argv[0] == "serve-teacher":
        from lit_opd.teachers.serve import serve_main

        serve_main(argv[1:])
        return None
    return OPDCLI(
        PolicyModule,
        RolloutDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # None: LightningCLI reads sys.argv itself (passing it as `args` too triggers its
        # "args and command line arguments" warning on every `python -m lit_opd` run).
        args=None if args is None else argv,
        run=run,
    )


# Keys that were method arguments before objectives became components (OPDModule's ``lambda_``
# too; ListOPD keeps its own ``lambda_``).
_MOVED = (
    "loss", "divergence", "beta", "alpha", "temperature", "top_k", "chunk_size", "reduction", "estimator",
    "kl_coef", "clip_eps_low", "clip_eps_high", "dual_clip", "tis_cap", "clip", "reweight_to_base",
)


def moved_objective_keys(argv: list[str]) -> list[str]:
    """The pre-component loss keys an old config or override still sets on the method, if any."""
    prefix = "--model.init_args."
    overrides = [a.split("=")[0].removeprefix(prefix) for a in argv if a.startswith(prefix)]
    found = [k for k in overrides if k in _MOVED]
    for config in config_files(argv):
        model = config.get("model")
        if not isinstance(model, dict):  # e.g. a trainer-only config layered with others
            continue
        init = model.get("init_args") or {}
        found += [k for k in init if k in _MOVED]
        if str(model.get("class_path", "")).endswith(".OPDModule") and "lambda_" in init:
            found.append("lambda_")
    return list(dict.fromkeys(found))


def config_files(argv: list[str]) -> list[dict]:
    """The YAML files given with ``--config``, parsed (files that do not exist are the parser's to report)."""
    import yaml

    configs = []
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "-c") and os.path.isfile(value):
            with open(value) as fh:
                loaded = yaml.safe_load(fh)
            configs.append(loaded if isinstance(loaded, dict) else {})
    return configs


def top_level_optimizer_keys(argv: list[str]) -> list[str]:
    """LightningCLI's top-level ``optimizer`` / ``lr_scheduler`` given on the command line or in a config."""
    keys = ("optimizer", "lr_scheduler")
    flags = [a.removeprefix("--").split("=")[0].split(".")[0] for a in argv if a.startswith("--")]
    in_files = [k for config in config_files(argv) for k in keys if k in config]
    return list(dict.fromkeys([f for f in flags if f in keys] + in_files))


def export_main(argv: list[str]) -> None:
    """``export --ckpt_path CKPT --out DIR``: the student (and tokenizer) in Hugging Face format.

    A LoRA student is merged into its base (reloaded from the recorded spec, or ``--base``);
    ``--adapters_only true`` writes the peft adapter directory instead."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lit_opd export", description=export_main.__doc__)
    parser.add_argument("--ckpt_path", type=str, required=True, help="a lit_opd checkpoint (.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="directory to write (must be empty or new)")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace a non-empty --out (its old contents go once the new export is done)")
    parser.add_argument("--adapters_only", type=bool, default=False,
                        help="LoRA checkpoints: write the peft adapter dir instead of the merged model")
    parser.add_argument("--base", type=str | None, default=None,
                        help="LoRA checkpoints: base model path/hub id (default: the checkpoint's record)")
    cfg = parser.parse_args(argv)
    from lit_opd.export import export_checkpoint

    try:
        out = export_checkpoint(
            cfg.ckpt_path, cfg.out, overwrite=cfg.overwrite, adapters_only=cfg.adapters_only, base=cfg.base
        )
    except (errors.CheckpointError, errors.UnsafeCheckpoint, errors.ExportFailed) as err:  # the file: exit 1
        if errors.debug_requested():
            raise
        sys.stderr.write(f"error: {err}\n")
        sys.exit(1)
    except errors.UserError as err:  # a setting: one clear line, exit 2, nothing written
        parser.error(str(err))
    what = "LoRA adapters" if cfg.adapters_only else "student"
    print(f"exported {what} to {out}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The user's mistakes (lit_opd.errors) end with one message; bugs keep their traceback.
    with errors.user_errors_exit():
        cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
