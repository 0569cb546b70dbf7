"""``python -m lit_opd calibrate``: ListOPD's λ* for a teacher and a warm-start student, measured
on RankingTask rows (the same calibration ``ListOPDModule`` runs when fit starts)."""

from __future__ import annotations

from lit_opd.methods.list_opd.calibration import CalibrationReport, calibrate


def calibrate_main(argv: list[str]) -> CalibrationReport:
    """``calibrate --teacher PATH --student PATH [--num_rows N --seed S --clip C --k K]``: λ* of a
    teacher and a warm-start student on RankingTask rows; prints the table and a summary line."""
    from jsonargparse import ArgumentParser

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
    from lit_opd.errors import UserError
    from lit_opd.models import freeze, load_causal_lm, load_tokenizer
    from lit_opd.tasks.ranking import RankingTask
    from lit_opd.teachers.hf import HFTeacher

    try:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.student)
        teacher = HFTeacher(cfg.teacher, tokenizer, temperature=cfg.teacher_temperature).scoring_model()
        base = freeze(load_causal_lm(cfg.student))
        rows = RankingTask(k=cfg.k).make_rows(cfg.num_rows, cfg.seed)
        report = calibrate(teacher, base, tokenizer, rows, cfg.clip, cfg.anchor, positions=cfg.positions,
                           two_sided=cfg.two_sided)
    except UserError as err:
        parser.error(str(err))
    print(f"{report.table()}\nprompts {report.num_prompts} c {report.c}\n{report.summary()}")
    return report
