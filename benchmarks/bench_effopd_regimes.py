"""EffOPD across update regimes (issue 13): in which regime does extrapolating along the update pay?

    python benchmarks/bench_effopd_regimes.py                # the sweep, ~60 min on 2 CPU cores
    python benchmarks/bench_effopd_regimes.py --quick        # smoke run, ~1 min, writes nothing to RESULTS.md
    python benchmarks/bench_effopd_regimes.py --report-only  # re-render table, plot and section from cache
    python benchmarks/bench_effopd_regimes.py --no-record    # the sweep; RESULTS.md and the plot untouched

Every run is one of the EffOPD benchmarks' workers (``effopd_runs.py``): the quickstart task,
student and teacher, the same training data, reported validation set (512 prompts) and EffOPD score
set (512 other prompts), and EffOPD as the paper specifies it (pow2 schedule, trials
θ_anc + (3, 5, 7, 9, 11)·d, strict ``>``). A regime is one AdamW learning rate, run long enough for
plain OPD to learn where the budget allows:

* lr 2e-3, 600 steps: the quickstart regime, bench_effopd.py's own setting (``effopd_speedup``).
* lr 2e-4, 1536 steps: one pow2 window moves the weights ~3x less.
* lr 2e-5, 4096 steps: ~25x less early on; plain OPD gets to 0.27 within the budget.
* lr 2e-5 from an SFT warm start, 1024 steps: the quickstart student after 600 more SFT steps on the
  reference answers (built once, cached), so OPD starts near a good solution and refines it in small
  steps, as post-training of a pretrained model does.

Arms per regime and seed: ``plain`` OPD, ``effopd`` (greedy accuracy on the score set) and, at lr 2e-4,
``effopd_loss`` (minus the method's loss on the student's own rollouts of the score set: the paper
allows a loss score, and a continuous score cannot be won by one lucky prompt) and ``effopd_all``
(every parameter moves, not only attention and MLP).

Reported per regime, from the plain runs: ‖d‖/‖θ‖ of each pow2 window (s/2 → s) and of a 16-step
window at the end, the line scan (reported-set accuracy at θ_a + m·d, m = 0 … 3) with its best m,
the top-1 energy share σ₁²/Σσ² of ΔW = W − W0 and |cos(u₁ early, u₁ at the end)|
(UpdateDynamicsCallback); per arm: searches kept, and ``effopd_runs.compare``'s speed-up in steps and
wall time to the lower of the two runs' final accuracies, per seed. A seed whose plain run gains less than
``MIN_GAIN`` (effopd_regimes_report.py) accuracy over its step-0 value has no speed-up to measure
("—"), so noise around the start accuracy is never read as a speed-up. The sweep's reading (tables,
plot) is in ``effopd_regimes_report.py``.

Runs are cached as JSON in ``--out-dir/lr{lr}/{arm}_seed{s}.json`` and reused when their settings
match; ``--jobs`` runs (one torch thread each) go at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import common
import effopd_runs as effopd  # the worker, the clock-excluded evaluations and compare()
import lightning as L
import torch
from effopd_regimes_report import best_regime, plot, render, summarise

from lit_opd import RolloutDataModule, SamplingParams, SFTModule, TaskPrompts
from lit_opd.tasks import AdditionTask

WARM_STUDENT = "warm_student"  # the SFT warm start's folder in --out-dir


@dataclasses.dataclass(frozen=True)
class Regime:
    lr: float
    steps: int
    eval_every: int
    dyn_every: int  # UpdateDynamicsCallback interval = the u₁ reference step ("early")
    arms: tuple[str, ...] = ("plain", "effopd")
    warm: bool = False  # start from the SFT warm start (warm_student) instead of the quickstart student

    @property
    def name(self) -> str:  # "2e-3", "2e-5-warm"
        mantissa, exponent = f"{self.lr:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}" + ("-warm" if self.warm else "")

    @property
    def label(self) -> str:  # for tables and plots
        return self.name.replace("-warm", ", SFT warm start")


REGIMES = (
    Regime(2e-3, 600, 20, 100),
    Regime(2e-4, 1536, 48, 256, ("plain", "effopd", "effopd_loss", "effopd_all")),
    Regime(2e-5, 4096, 128, 512),
    Regime(2e-5, 1024, 32, 128, warm=True),
)
QUICK_REGIMES = (Regime(2e-3, 40, 10, 20), Regime(2e-4, 40, 10, 20, ("plain", "effopd", "effopd_loss")),
                 Regime(2e-5, 40, 10, 20, warm=True))

# ----- running (cached) -----------------------------------------------------------------------------
def worker_args(regime: Regime, args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        steps=regime.steps, eval_every=regime.eval_every, val_rows=args.val_rows, score_rows=args.score_rows,
        dyn_every=regime.dyn_every, ref_step=regime.dyn_every, lr=regime.lr,
        student=str(args.out_dir / WARM_STUDENT) if regime.warm else effopd.STUDENT,
        out_dir=args.out_dir / f"lr{regime.name}",
    )


def cached(path: Path, wargs: argparse.Namespace) -> dict | None:
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    run.setdefault("student", effopd.STUDENT)
    keys = ("steps", "eval_every", "val_rows", "score_rows", "lr", "student")
    return run if all(run.get(k) == getattr(wargs, k) for k in keys) else None


def build_warm_student(args: argparse.Namespace) -> None:
    """The quickstart student after SFT on the reference answers, as configs/sft/quickstart_sft.yaml
    trains it (AdamW lr 2e-3, 64 prompts a step, seed 0) for ``args.warm_steps`` steps, saved with
    ``save_pretrained``: a student that starts near a good solution, as post-training starts from a
    pretrained model. Built once into the cache."""
    path = args.out_dir / WARM_STUDENT
    if (path / "config.json").exists():
        return
    L.seed_everything(0, verbose=False)
    task = AdditionTask(max_digits=3, reverse_answer=True)
    module = SFTModule(effopd.STUDENT, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))
    data = RolloutDataModule(
        TaskPrompts(task, num_rows=20000, seed=effopd.TRAIN_SEED), batch_size=64, seed=0,
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
    )
    common.trainer(args.warm_steps).fit(module, data)
    common.save_student(module, path)  # written beside it, then renamed: never a half-written student


def run_missing(regimes: tuple[Regime, ...], seeds: list[int], args: argparse.Namespace) -> int:
    """Run every (regime, arm, seed) without a matching cached result, ``args.jobs`` at a time,
    longest first; returns how many ran."""
    todo = []
    for regime in regimes:
        wargs = worker_args(regime, args)
        wargs.out_dir.mkdir(parents=True, exist_ok=True)
        todo += [(regime, arm, seed, wargs) for arm in regime.arms for seed in seeds
                 if cached(wargs.out_dir / f"{arm}_seed{seed}.json", wargs) is None]
    todo.sort(key=lambda job: -job[0].steps)
    count, running = len(todo), []
    while todo or running:
        while todo and len(running) < args.jobs:
            regime, arm, seed, wargs = todo.pop(0)
            proc, _ = effopd.launch(arm, seed, wargs)
            running.append((proc, f"lr {regime.name} {arm} seed {seed}", wargs.out_dir, time.perf_counter()))
        time.sleep(1.0)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, label, out_dir, started = job
            running.remove(job)
            if proc.returncode != 0:
                sys.exit(f"{label} failed; see the log in {out_dir}")
            print(f"{label}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return count


def load(regimes: tuple[Regime, ...], seeds: list[int], args: argparse.Namespace) -> dict:
    """{regime name: {arm: [run per seed]}} from the cache (every run must be there)."""
    out = {}
    for regime in regimes:
        wargs = worker_args(regime, args)
        runs = {}
        for arm in regime.arms:
            found = [cached(wargs.out_dir / f"{arm}_seed{s}.json", wargs) for s in seeds]
            if any(r is None for r in found):
                sys.exit(f"lr {regime.name} {arm}: runs missing in {wargs.out_dir}; "
                         "run without --report-only")
            runs[arm] = found
        out[regime.name] = runs
    return out


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def sweep_meta(args: argparse.Namespace, ran: int, total: int, seconds: float, load_start: str) -> dict:
    """What the section says about the sweep's run, kept in ``--out-dir/meta.json``. Nothing ran: the
    cache's figures. Some runs were added to a cache: this call's time is added to the cache's as one
    more piece, so the runtime stays the whole sweep's cost."""
    path = args.out_dir / "meta.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if old is not None and not ran:
        return old
    pieces = (old.get("pieces_s", []) if old is not None and ran < total else []) + [round(seconds)]
    runtime = minutes(sum(pieces)) + (f" in {len(pieces)} cached pieces: {', '.join(map(minutes, pieces))}"
                                      if len(pieces) > 1 else "")
    meta = {"date": time.strftime("%Y-%m-%d"),
            "load_start": old["load_start"] if len(pieces) > 1 else load_start,
            "load_end": common.load_avg(), "runtime": runtime, "pieces_s": pieces,
            "warm_steps": args.warm_steps,
            "command": "python benchmarks/bench_effopd_regimes.py" + (" --quick" if args.quick else "")}
    path.write_text(json.dumps(meta))
    return meta


def main() -> None:
    parser = common.arg_parser(__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--warm-steps", type=int, default=600, help="SFT steps of the warm-start student")
    parser.add_argument("--val-rows", type=int, default=512)
    parser.add_argument("--score-rows", type=int, default=512)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 small regimes, 1 seed, 40 steps; no RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="re-render from the cached runs")
    common.add_record_options(parser, " and benchmarks/effopd_regimes.png")
    parser.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the section")
    parser.add_argument("--out-dir", type=Path, default=common.ROOT / "runs" / "bench_effopd_regimes")
    args = parser.parse_args()
    regimes = REGIMES
    if args.quick:
        regimes, args.seeds, args.val_rows, args.score_rows = QUICK_REGIMES, "0", 128, 128
        args.no_record = True
        args.warm_steps, args.out_dir = 20, args.out_dir / "quick"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), common.load_avg()
    if not args.report_only and any(r.warm for r in regimes):
        build_warm_student(args)
    ran = 0 if args.report_only else run_missing(regimes, seeds, args)
    total = sum(len(r.arms) for r in regimes) * len(seeds)
    meta = sweep_meta(args, ran, total, time.perf_counter() - started, load_start)
    summaries = [summarise(r, runs) for r, runs in zip(regimes, load(regimes, seeds, args).values())]
    plot_dir = args.out_dir if args.no_record else common.ROOT / "benchmarks"
    plot_path = plot_dir / "effopd_regimes.png"
    plot(summaries, plot_path)
    section = render(summaries, seeds, meta)
    section = common.with_notes(section, args.notes)
    print(section)
    common.record(args, section)
    label, best = best_regime(summaries)
    print(f"best regime: {label}")
    common.print_result("effopd_best_regime_speedup", best, digits=2)
    common.print_result("effopd_speedup", summaries[0]["arms"]["effopd"]["speedup"], digits=2)


if __name__ == "__main__":
    main()
