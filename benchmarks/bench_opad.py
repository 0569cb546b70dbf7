"""OPAD benchmark: per-turn greedy accuracy of a tiny student on the tool-use task, before and after
step-level agentic distillation (MADOPDModule, fixed mode, two teachers).

    OMP_NUM_THREADS=1 python benchmarks/bench_opad.py           # 4 min 39 s on one CPU core (2026-12-06)
    OMP_NUM_THREADS=1 python benchmarks/bench_opad.py --quick   # smoke test, ~30 s

Everything is built in the script, nothing is downloaded:

1. Task: ``ToolCalcTask`` (sums of 2-3 terms of 1-2 digits through an ``add`` tool: 2-3 assistant
   turns a trajectory), split per assistant turn by ``TurnPrompts`` (teacher_forcing: recorded
   history, one turn generated), grouped by trajectory (``group_field: group_id``).
2. Teachers: a 2-layer, width-64 model trained by SFT on the recorded turns for ``--teacher-steps``
   steps (``late``), and the same model half-way through (``early``), a weaker second expert.
3. Student: a 2-layer, width-48 model warm-started by SFT for ``--warm-steps`` steps.
4. OPAD: ``--opad-steps`` steps of MADOPDModule (mode fixed, weights late 0.75 / early 0.25,
   JSD β 0.5, seq_mean) with on-policy turns at temperature 1.
5. Per-turn greedy accuracy (the task's verifier: a call must give the recorded call's result, the
   last turn must be the sum) on ``--val-rows`` held-out trajectories, before and after; a reference
   row for SFT on the recorded turns for the same number of steps from the same warm start.

Prints a table and ``RESULT opad_turn_accuracy <turn>: <before> <after>`` lines (turn 0 = first).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import lightning as L
import torch
from common import arg_parser, print_result, trainer

from lit_opd import HFTeacher, RolloutDataModule, SamplingParams, SFTModule
from lit_opd.methods.mad_opd import MADOPDModule
from lit_opd.objectives import Divergence
from lit_opd.rollout.turns import TurnPrompts
from lit_opd.tasks.tool_calc import ToolCalcTask, tool_calc_tokenizer
from lit_opd.tiny import make_tiny_model

MAX_POSITIONS = 160  # a 3-turn prompt is at most ~105 characters, a turn at most ~17


def datamodule(task: ToolCalcTask, args: argparse.Namespace, tok) -> RolloutDataModule:  # noqa: ANN001
    dm = RolloutDataModule(
        TurnPrompts(task=task, num_rows=args.train_rows, seed=1),
        val_source=TurnPrompts(task=task, num_rows=args.val_rows, seed=2),
        batch_size=args.batch_size, val_batch_size=256, group_field="group_id",
        sampling=SamplingParams(max_new_tokens=18, temperature=1.0), seed=0,
    )
    dm.tokenizer = tok
    dm.setup("fit")
    return dm


def sft(model, tok, dm: RolloutDataModule, steps: int, lr: float) -> None:  # noqa: ANN001
    module = SFTModule(model, tokenizer=tok,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0))
    trainer(steps).fit(module, dm)


def turn_accuracy(model, tok, dm: RolloutDataModule) -> dict[int, float]:  # noqa: ANN001
    """Greedy accuracy per turn index on the validation turns."""
    holder = SFTModule(model, tokenizer=tok)  # any PolicyModule: the datamodule decodes with .policy
    accuracy = {}
    for turn in sorted({r["row"]["turn_index"] for r in dm.val_rows}):
        rows = [r for r in dm.val_rows if r["row"]["turn_index"] == turn]
        correct, count = dm.greedy_correct(rows, holder)
        accuracy[turn] = correct / count
    return accuracy


def opad(student, teachers: dict, tok, dm: RolloutDataModule, steps: int, lr: float) -> None:  # noqa: ANN001
    module = MADOPDModule(
        student, {name: HFTeacher(model, tokenizer=tok, name=name) for name, model in teachers.items()},
        tokenizer=tok, mode="fixed", weights={"late": 0.75, "early": 0.25},
        objective=Divergence(kind="jsd", beta=0.5, reduction="seq_mean"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
    )
    trainer(steps).fit(module, dm)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage, to check it runs")
    parser.add_argument("--teacher-steps", type=int, default=700)
    parser.add_argument("--warm-steps", type=int, default=250)
    parser.add_argument("--opad-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="OPAD and the SFT reference")
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--val-rows", type=int, default=200)
    args = parser.parse_args()
    if args.quick:
        args.teacher_steps, args.warm_steps, args.opad_steps, args.val_rows = 20, 4, 4, 24
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(0, verbose=False)
    start = time.perf_counter()
    tok, task = tool_calc_tokenizer(), ToolCalcTask(min_terms=2, max_terms=3, max_digits=2)
    dm = datamodule(task, args, tok)

    teacher = make_tiny_model(len(tok), hidden=64, layers=2, seed=1, max_positions=MAX_POSITIONS)
    sft(teacher, tok, dm, args.teacher_steps // 2, lr=3e-3)
    early = copy.deepcopy(teacher)
    sft(teacher, tok, dm, args.teacher_steps - args.teacher_steps // 2, lr=3e-3)
    student = make_tiny_model(len(tok), hidden=48, layers=2, seed=0, max_positions=MAX_POSITIONS)
    sft(student, tok, dm, args.warm_steps, lr=3e-3)
    rows = {"teacher late": turn_accuracy(teacher, tok, dm), "teacher early": turn_accuracy(early, tok, dm),
            "student before": turn_accuracy(student, tok, dm)}
    print(f"teachers and warm start: {time.perf_counter() - start:.0f} s", flush=True)

    baseline = copy.deepcopy(student)
    sft(baseline, tok, dm, args.opad_steps, lr=args.lr)
    rows[f"SFT +{args.opad_steps} (reference)"] = turn_accuracy(baseline, tok, dm)
    t0 = time.perf_counter()
    opad(student, {"late": teacher, "early": early}, tok, dm, args.opad_steps, lr=args.lr)
    opad_seconds = time.perf_counter() - t0
    rows[f"OPAD +{args.opad_steps}"] = turn_accuracy(student, tok, dm)

    turns = sorted(rows["student before"])
    print(f"\n| model | {' | '.join(f'turn {t}' for t in turns)} |\n|---|{'---|' * len(turns)}")
    for name, accuracy in rows.items():
        print(f"| {name} | {' | '.join(f'{accuracy[t]:.3f}' for t in turns)} |")
    print(f"\nOPAD {args.opad_steps} steps: {opad_seconds:.0f} s; total {time.perf_counter() - start:.0f} s")
    for t in turns:
        after = rows[f"OPAD +{args.opad_steps}"][t]
        print_result("opad_turn_accuracy", f"{t}:", rows["student before"][t], after, digits=3)


if __name__ == "__main__":
    main()
