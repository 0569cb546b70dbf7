"""``python -m lit_opd fit|validate|test --config x.yaml``, ``python -m lit_opd export``,
``python -m lit_opd calibrate`` (ListOPD's λ*: :mod:`lit_opd.methods.list_opd.cli`) and
``python -m lit_opd serve-teacher --model PATH`` (a teacher behind vLLM's log-prob API, for
``ServerTeacher``: :mod:`lit_opd.teachers.serve`).

LightningCLI in subclass mode: ``model`` is any :class:`PolicyModule` (OPDModule, SFTModule, ...)
and ``data`` any RolloutDataModule, both given as ``class_path`` + ``init_args``.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_opd import errors
from lit_opd.checkpoints import check_ckpt_path
from lit_opd.methods.base import PolicyModule
from lit_opd.rollout.datamodule import RolloutDataModule



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
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        # Lightning loads ckpt_path (weights only) next: a refused file is reported with its setting.
        errors.remember_settings(self.config)

    def _parse_ckpt_path(self) -> None:
        """Lightning lays a --ckpt_path's saved hparams over the config and command line; the allow_*
        overrides decide about this resume only, so the values given for this run stand."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        init = (model.get("init_args") if model is not None else None) or {}
        given = {k: v for k, v in init.items() if k in _RESUME_OVERRIDES}
        super()._parse_ckpt_path()
        for key, value in given.items():
            self.config[subcommand].model.init_args[key] = value

    def before_instantiate_classes(self) -> None:
        # A model directory that fails to load is reported with the setting that named it.
        errors.remember_settings(self.config)
        # A missing --ckpt_path fails now, in one line, not after the models loaded.
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))


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
    import yaml

    prefix = "--model.init_args."
    overrides = [a.split("=")[0].removeprefix(prefix) for a in argv if a.startswith(prefix)]
    found = [k for k in overrides if k in _MOVED]
    for flag, value in zip(argv, argv[1:]):
        if flag != "--config" or not os.path.isfile(value):
            continue
        with open(value) as fh:
            model = (yaml.safe_load(fh) or {}).get("model")
        if not isinstance(model, dict):  # e.g. a trainer-only config layered with others
            continue
        init = model.get("init_args") or {}
        found += [k for k in init if k in _MOVED]
        if str(model.get("class_path", "")).endswith(".OPDModule") and "lambda_" in init:
            found.append("lambda_")
    return list(dict.fromkeys(found))


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
    except errors.UserError as err:  # unsafe/damaged/corrupted file, failed write: one line, exit 1
        if errors.debug_requested():
            raise
        sys.stderr.write(f"error: {err}\n")
        sys.exit(1)
    except (OSError, ValueError, ImportError) as err:  # one clear line, no traceback, nothing written
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
