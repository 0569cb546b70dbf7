"""EffOPD across update regimes (issue 13): in which regime does extrapolating along the update pay?

    python benchmarks/bench_effopd_regimes.py                # the sweep, ~60 min on 2 CPU cores
    python benchmarks/bench_effopd_regimes.py --quick        # smoke run, ~1 min, writes nothing to RESULTS.md
    python benchmarks/bench_effopd_regimes.py --report-only  # re-render table, plot and section from the cache

Every run is one of bench_effopd.py's workers: the quickstart task, student and teacher, the same
training data, reported validation set (512 prompts) and EffOPD score set (512 other prompts), and
EffOPD as the paper specifies it (pow2 schedule, trials θ_anc + (3, 5, 7, 9, 11)·d, strict ``>``).
A regime is one AdamW learning rate, run long enough for plain OPD to learn where the budget allows:

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
(UpdateDynamicsCallback); per arm: searches kept, and bench_effopd.compare's speed-up in steps and
wall time to the lower of the two runs' final accuracies, per seed. A seed whose plain run gains less than
``MIN_GAIN`` accuracy over its step-0 value has no speed-up to measure ("—"), so noise around the
start accuracy is never read as a speed-up.

Runs are cached as JSON in ``--out-dir/lr{lr}/{arm}_seed{s}.json`` and reused when their settings
match; ``--jobs`` runs (one torch thread each) go at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import bench_effopd as base  # the worker, the clock-excluded evaluations and compare()

ROOT = base.ROOT
MIN_GAIN = 0.05  # plain OPD's accuracy gain (end - step 0) below which a seed has no speed-up to measure


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
ARM_MARKS = {"effopd": ("o", 1.0), "effopd_loss": ("s", 1.08), "effopd_all": ("^", 0.92)}
SCORE_NAMES = {"effopd": "greedy accuracy", "effopd_loss": "loss on rollouts",
               "effopd_all": "greedy accuracy, every parameter"}


# ----- running (cached) -----------------------------------------------------------------------------
def worker_args(regime: Regime, args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        steps=regime.steps, eval_every=regime.eval_every, val_rows=args.val_rows, score_rows=args.score_rows,
        dyn_every=regime.dyn_every, ref_step=regime.dyn_every, lr=regime.lr,
        student=str(warm_student_path(args)) if regime.warm else base.STUDENT,
        out_dir=args.out_dir / f"lr{regime.name}",
    )


def cached(path: Path, wargs: argparse.Namespace) -> dict | None:
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    run.setdefault("student", base.STUDENT)
    keys = ("steps", "eval_every", "val_rows", "score_rows", "lr", "student")
    return run if all(run.get(k) == getattr(wargs, k) for k in keys) else None


def warm_student_path(args: argparse.Namespace) -> Path:
    return args.out_dir / "warm_student"


def build_warm_student(args: argparse.Namespace) -> None:
    """The quickstart student after SFT on the reference answers, as configs/sft/quickstart_sft.yaml
    trains it (AdamW lr 2e-3, 64 prompts a step, seed 0) for ``args.warm_steps`` steps, saved with
    ``save_pretrained``: a student that starts near a good solution, as post-training starts from a
    pretrained model. Built once into the cache."""
    path = warm_student_path(args)
    if (path / "config.json").exists():
        return
    import lightning as L
    import torch

    from lit_opd import RolloutDataModule, SamplingParams, SFTModule, TaskPrompts
    from lit_opd.tasks import AdditionTask

    L.seed_everything(0, verbose=False)
    task = AdditionTask(max_digits=3, reverse_answer=True)
    module = SFTModule(base.STUDENT, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))
    data = RolloutDataModule(
        TaskPrompts(task, num_rows=20000, seed=base.TRAIN_SEED), batch_size=64, seed=0,
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.warm_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    partial = path.with_name(path.name + ".partial")  # a crash never leaves a half-written student
    module.student.save_pretrained(partial)
    module.tokenizer.save_pretrained(partial)
    partial.rename(path)


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
            proc, _ = base.launch(arm, seed, wargs)
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
                sys.exit(f"lr {regime.name} {arm}: runs missing in {wargs.out_dir}; run without --report-only")
            runs[arm] = found
        out[regime.name] = runs
    return out


# ----- summarising ------------------------------------------------------------------------------------
def med(values: Iterable[float | None]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def speedups(plains: list[dict], effs: list[dict]) -> list[dict | None]:
    """bench_effopd.compare per seed, None where plain OPD did not learn (gain < MIN_GAIN)."""
    rows = []
    for plain, eff in zip(plains, effs):
        points = base.grid(plain)
        rows.append(base.compare(plain, eff) if points[-1]["acc"] - points[0]["acc"] >= MIN_GAIN else None)
    return rows


def scan_summary(plains: list[dict]) -> list[dict]:
    """Per line-scan window, medians over seeds: ‖d‖/‖θ‖, accuracy at each m, the best m."""
    out = []
    for i, entry in enumerate(plains[0]["line_scan"]):
        accs = [med(run["line_scan"][i]["acc"][j] for run in plains) for j in range(len(base.SCAN_MULTIPLIERS))]
        best = max(range(len(accs)), key=lambda j: accs[j])
        out.append({"window": tuple(entry["window"]), "rel_norm": med(r["line_scan"][i]["rel_norm"] for r in plains),
                    "acc": accs, "best_m": base.SCAN_MULTIPLIERS[best]})
    return out


def pow2_windows(scan: list[dict]) -> list[dict]:
    """The scanned windows s/2 → s: the ones EffOPD's searches see when nothing is kept."""
    return [w for w in scan if w["window"][1] == 2 * w["window"][0]]


def steepest(scan: list[dict]) -> dict:
    """The pow2 window along which accuracy rose most (m = 1 against m = 0): where the learning was."""
    one, zero = base.SCAN_MULTIPLIERS.index(1.0), base.SCAN_MULTIPLIERS.index(0.0)
    return max(pow2_windows(scan), key=lambda w: w["acc"][one] - w["acc"][zero])


def summarise(regime: Regime, runs: dict) -> dict:
    plains = runs["plain"]
    scan = scan_summary(plains)
    picture = base.dynamics_picture(plains)
    out = {
        "regime": regime, "scan": scan, "last": pow2_windows(scan)[-1], "rise": steepest(scan),
        "short": [w for w in scan if w["window"][1] - w["window"][0] == 16][-1],  # the one ending at the last pow2 step
        "acc0": med(base.grid(p)[0]["acc"] for p in plains), "acc_end": med(base.grid(p)[-1]["acc"] for p in plains),
        "energy": med(v["top1_energy"] for v in picture.values()),
        "cos": med(v["u1_cos"] for v in picture.values()), "arms": {},
    }
    for arm in regime.arms[1:]:
        rows = speedups(plains, runs[arm])
        searches = [h for run in runs[arm] for h in run["effopd_history"]]
        out["arms"][arm] = {
            "rows": rows, "speedup": med(r["speedup"] for r in rows if r), "wall": med(r["wall_speedup"] for r in rows if r),
            "delta": [base.grid(e)[-1]["acc"] - base.grid(p)[-1]["acc"] for p, e in zip(plains, runs[arm])],
            "kept": sum(h["multiplier"] > 1 for h in searches), "searches": len(searches),
        }
    return out


# ----- reporting --------------------------------------------------------------------------------------
def fmt_x(value: float, row: dict | None = None) -> str:
    if row is None or math.isnan(value):
        return "—"
    return ("" if row["reached"] else "< ") + f"{value:.2f}×"


def render(summaries: list[dict], seeds: list[int], meta: dict) -> str:
    lines = [
        f"## EffOPD across update regimes — {meta['date']} — 2-core CPU (this project's dev machine)",
        "",
        f"`{meta['command']}` (runtime {meta['runtime']}; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end). The quickstart task, models, data and evaluation sets of the first EffOPD section "
        "above (512 reported validation prompts; EffOPD scores its own 512 prompts), EffOPD as the paper "
        "specifies it (pow2 schedule, trials 3, 5, 7, 9, 11 × d); one AdamW learning rate per regime, "
        f"seeds {', '.join(map(str, seeds))}, plain OPD and OPD + EffOPD from the same seed. The SFT warm start "
        f"is the quickstart student after {meta.get('warm_steps', 600)} more steps of SFT on the reference "
        "answers (configs/sft/quickstart_sft.yaml's setting): a student that starts near a good solution, as "
        "post-training starts from a pretrained model. ‖d‖/‖θ‖: how far "
        "a window's update moves EffOPD's parameters (median over seeds, plain runs); best m: where "
        "reported-set accuracy along θ_a + m·d peaks (m = 1 is where training got to, m = 3 EffOPD's first "
        "trial); steepest window: the pow2 window along which accuracy rose most; σ₁² share: median top-1 energy σ₁²/Σσ² of ΔW = W − W0 over the attention and MLP "
        "matrices at the end; |cos u₁|: its top left singular vector at the end against the one at the "
        "reference step. Speed-up: the steps (wall time) plain OPD needs to first reach T over those EffOPD "
        "needs, T = the lower of the two runs' final accuracies, so two identical runs give 1.00× (< : EffOPD "
        "ended below plain OPD; the first EffOPD section used plain's last step as the numerator instead); "
        f"— : plain OPD gained less than {MIN_GAIN} accuracy, so there is nothing to speed up.",
        "",
        "| lr | steps | plain acc step 0 → end | EffOPD score | ‖d‖/‖θ‖ last pow2 window (16-step) | best m "
        "(16-step) | steepest window: ‖d‖/‖θ‖, acc m=1 → m=3 | σ₁² share | \\|cos u₁\\| (ref step) | searches kept | "
        "steps speed-up: median (per seed) | wall speed-up | final acc EffOPD − plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        reg, last, short, rise = s["regime"], s["last"], s["short"], s["rise"]
        for arm, a in s["arms"].items():
            per_seed = ", ".join(fmt_x(r["speedup"], r) if r else "—" for r in a["rows"])
            win = f"{last['window'][0]}→{last['window'][1]}"
            lines.append(
                f"| {reg.label} | {reg.steps} | {s['acc0']:.3f} → {s['acc_end']:.3f} | {SCORE_NAMES[arm]} | "
                f"{last['rel_norm']:.3f} ({win}; {short['rel_norm']:.4f}) | {last['best_m']:g} ({short['best_m']:g}) | "
                f"{rise['window'][0]}→{rise['window'][1]}: {rise['rel_norm']:.4f}, "
                f"{rise['acc'][base.SCAN_MULTIPLIERS.index(1.0)]:.3f} → {rise['acc'][-1]:.3f} | {s['energy']:.2f} | "
                f"{s['cos']:.2f} ({reg.dyn_every}) | {a['kept']} of {a['searches']} | "
                f"**{a['speedup']:.2f}×** ({per_seed}) | {a['wall']:.2f}× | "
                f"{', '.join(f'{d:+.3f}' for d in a['delta'])} |"
            )
    lines += ["", "Line scans (plain runs, median over seeds; reported-set accuracy at θ_a + m·d, best in bold):", "",
              "| lr | window a → b | ‖d‖/‖θ_b‖ | " + " | ".join(f"m={m:g}" for m in base.SCAN_MULTIPLIERS) + " |",
              "|---|---|---|" + "---|" * len(base.SCAN_MULTIPLIERS)]
    for s in summaries:
        for w in s["scan"]:
            best = w["acc"].index(max(w["acc"]))
            cells = " | ".join(f"**{v:.3f}**" if j == best else f"{v:.3f}" for j, v in enumerate(w["acc"]))
            lines.append(f"| {s['regime'].label} | {w['window'][0]} → {w['window'][1]} | {w['rel_norm']:.4f} | {cells} |")
    lines += ["", "![EffOPD speed-up against window size, and the line scans](effopd_regimes.png)", ""]
    return "\n".join(lines)


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        c, x = colors[i % len(colors)], s["last"]["rel_norm"]
        for arm, a in s["arms"].items():
            marker, shift = ARM_MARKS[arm]  # arms of one regime side by side, not on top of each other
            ys = [r["speedup"] for r in a["rows"] if r]
            left.plot([x * shift] * len(ys), ys, marker, color=c, mfc="none", ms=7)
            if ys:
                left.plot([x * shift], [a["speedup"]], marker, color=c, ms=10,
                          label=f"lr {s['regime'].label}, {SCORE_NAMES[arm]} (median)")
        for w, style in ((s["rise"], "-"), (s["short"], ":")):
            one = w["acc"][base.SCAN_MULTIPLIERS.index(1.0)]
            right.plot(base.SCAN_MULTIPLIERS, [v - one for v in w["acc"]], style, marker=".", color=c,
                       label=f"lr {s['regime'].label}, {w['window'][0]}→{w['window'][1]} (‖d‖/‖θ‖ {w['rel_norm']:.3f})")
    for i, s in enumerate(summaries):  # where each regime sits, also when no seed had a speed-up
        left.axvline(s["last"]["rel_norm"], color=colors[i % len(colors)], lw=0.6, ls=":")
    left.axhline(1.0, color="grey", lw=0.8)
    left.axhline(3.0, color="grey", lw=0.8, ls="--", label="paper: ~3× fewer steps")
    left.set_xscale("log")
    xs = [s["last"]["rel_norm"] for s in summaries]
    left.set_xlim(min(xs) / 2, max(xs) * 2)
    left.set_ylim(0, max(3.5, left.get_ylim()[1]))
    left.set_xlabel("‖d‖/‖θ‖ of the last pow2 window (plain OPD, median over seeds)")
    left.set_ylabel("steps to plain OPD's final accuracy: plain / EffOPD")
    left.legend(fontsize=7)
    right.axhline(0.0, color="grey", lw=0.8)
    right.axvline(3.0, color="grey", lw=0.8, ls="--")
    right.set_xlabel("m along the window's update d (1 = where training got; 3 = EffOPD's first trial)")
    right.set_ylabel("reported accuracy at θ_a + m·d minus at m = 1")
    right.legend(fontsize=6)
    fig.suptitle("EffOPD by update regime (quickstart task): speed-up against window size (left), "
                 "accuracy along the update direction (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_regime(summaries: list[dict]) -> tuple[str, float]:
    """(label, median speed-up) of the regime and score with the highest median speed-up."""
    options = [(f"lr {s['regime'].label}, {SCORE_NAMES[arm]}", a["speedup"])
               for s in summaries for arm, a in s["arms"].items() if not math.isnan(a["speedup"])]
    return max(options, key=lambda o: o[1]) if options else ("none measurable", math.nan)


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
    meta = {"date": time.strftime("%Y-%m-%d"), "load_start": old["load_start"] if len(pieces) > 1 else load_start,
            "load_end": base.load_avg(), "runtime": runtime, "pieces_s": pieces, "warm_steps": args.warm_steps,
            "command": "python benchmarks/bench_effopd_regimes.py" + (" --quick" if args.quick else "")}
    path.write_text(json.dumps(meta))
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--warm-steps", type=int, default=600, help="SFT steps of the warm-start student")
    parser.add_argument("--val-rows", type=int, default=512)
    parser.add_argument("--score-rows", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 small regimes, 1 seed, 40 steps; no RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="re-render from the cached runs")
    parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the section")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench_effopd_regimes")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    regimes = REGIMES
    if args.quick:
        regimes, args.seeds, args.val_rows, args.score_rows, args.no_append = QUICK_REGIMES, "0", 128, 128, True
        args.warm_steps = 20
        args.out_dir = args.out_dir / "quick"
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), base.load_avg()
    if not args.report_only and any(r.warm for r in regimes):
        build_warm_student(args)
    ran = 0 if args.report_only else run_missing(regimes, seeds, args)
    total = sum(len(r.arms) for r in regimes) * len(seeds)
    meta = sweep_meta(args, ran, total, time.perf_counter() - started, load_start)
    summaries = [summarise(r, runs) for r, runs in zip(regimes, load(regimes, seeds, args).values())]
    plot_path = args.out_dir / "effopd_regimes.png" if args.no_append else ROOT / "benchmarks" / "effopd_regimes.png"
    plot(summaries, plot_path)
    section = render(summaries, seeds, meta)
    if args.notes is not None:
        section += "\n" + args.notes.read_text().strip() + "\n"
    print(section)
    if not args.no_append:
        text = args.results.read_text() if args.results.exists() else ""
        with open(args.results, "a") as fh:
            fh.write(("" if text.endswith("\n\n") or not text else "\n") + section)
        print(f"appended to {args.results}; plot {plot_path}")
    label, best = best_regime(summaries)
    print(f"best regime: {label}")
    print(f"RESULT effopd_best_regime_speedup {best:.2f}")
    print(f"RESULT effopd_speedup {summaries[0]['arms']['effopd']['speedup']:.2f}")


if __name__ == "__main__":
    main()
