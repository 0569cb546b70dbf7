"""``python -m lit_opd fit|validate|test --config x.yaml``, ``python -m lit_opd export`` and
``python -m lit_opd calibrate`` (ListOPD's λ*, :func:`calibrate_main` over :mod:`lit_opd.calibration`).

LightningCLI in subclass mode: ``model`` is any :class:`PolicyModule` (OPDModule, SFTModule, ...)
and ``data`` any RolloutDataModule, both given as ``class_path`` + ``init_args``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from lightning.pytorch.cli import ArgsType, LightningCLI

from lit_opd.methods.base import PolicyModule
from lit_opd.rollout.datamodule import RolloutDataModule

if TYPE_CHECKING:
    from lit_opd.calibration import CalibrationReport


class OPDCLI(LightningCLI):
    """The project's CLI. Kept in a regular module (not ``__main__``) so ``ddp_spawn`` can pickle it."""


def cli_main(args: ArgsType = None, run: bool = True) -> OPDCLI | None:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests pass a list)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return None
    if argv and argv[0] == "calibrate":
        calibrate_main(argv[1:])
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


def export_main(argv: list[str]) -> None:
    """``export --ckpt_path CKPT --out DIR``: the student (and tokenizer) in Hugging Face format.

    A LoRA student is merged into its base (reloaded from the recorded spec, or ``--base``);
    ``--adapters_only true`` writes the peft adapter directory instead."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lit_opd export", description=export_main.__doc__)
    parser.add_argument("--ckpt_path", type=str, required=True, help="a lit_opd checkpoint (.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="directory to write (must be empty or new)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace files in a non-empty --out")
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
    except (OSError, ValueError, ImportError) as err:  # one clear line, no traceback, nothing written
        parser.error(str(err))
    what = "LoRA adapters" if cfg.adapters_only else "student"
    print(f"exported {what} to {out}")


def calibrate_main(argv: list[str]) -> CalibrationReport:
    """``calibrate --teacher PATH --student PATH [--num_rows N --seed S --clip C --k K]``: λ* of a
    teacher and a warm-start student on RankingTask rows; prints the table and a summary line."""
    from jsonargparse import ArgumentParser

    from lit_opd.calibration import calibrate

    parser = ArgumentParser(prog="python -m lit_opd calibrate", description=calibrate_main.__doc__)
    parser.add_argument("--teacher", type=str, required=True, help="teacher model directory or hub id")
    parser.add_argument("--student", type=str, required=True, help="warm-start (G-OPD reference) model")
    parser.add_argument("--tokenizer", type=str, default=None, help="defaults to the student's")
    parser.add_argument("--num_rows", type=int, default=64, help="calibration prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration rows")
    parser.add_argument("--clip", type=float, default=0.2, help="clip strength c")
    parser.add_argument("--k", type=int, default=4, help="RankingTask K")
    parser.add_argument("--anchor", type=str, default="base", help="'base' (warm start) or 'teacher'")
    parser.add_argument("--positions", type=str, default="structural", help="'structural' or 'all'")
    parser.add_argument("--teacher_temperature", type=float, default=1.0, help="HFTeacher.temperature")
    parser.add_argument("--two_sided", type=bool, default=False, help="also watch the band's upper edge")
    cfg = parser.parse_args(argv)
    from lit_opd.models import freeze, load_causal_lm, load_tokenizer
    from lit_opd.tasks.ranking import RankingTask
    from lit_opd.teachers.hf import HFTeacher

    try:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.student)
        teacher = HFTeacher(cfg.teacher, tokenizer, temperature=cfg.teacher_temperature).scorer
        base = freeze(load_causal_lm(cfg.student))
        rows = RankingTask(k=cfg.k).make_rows(cfg.num_rows, cfg.seed)
        report = calibrate(teacher, base, tokenizer, rows, cfg.clip, cfg.anchor, positions=cfg.positions,
                           two_sided=cfg.two_sided)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    print(f"{report.table()}\nprompts {report.num_prompts} c {report.c}\n{report.summary()}")
    return report


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
