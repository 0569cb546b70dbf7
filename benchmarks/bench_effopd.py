"""EffOPD benchmark: plain OPD against OPD + EffOPDCallback on the quickstart task (issue 4).

    python benchmarks/bench_effopd.py                  # 3 seeds x 600 steps, ~11 min on 2 CPU cores
    python benchmarks/bench_effopd.py --quick          # smoke test, ~1 min, writes nothing to RESULTS.md
    python benchmarks/bench_effopd.py --report-only    # re-render table/plot/section from saved runs
    python benchmarks/bench_effopd.py --no-record      # the full run; RESULTS.md and effopd.png untouched

Setup (mirrors configs/quickstart.yaml and configs/eff_opd/quickstart.yaml): student
lit_opd/assets/addition/student, teacher lit_opd/assets/addition/teacher, reversed 1-3 digit
addition, 64 prompts a step drawn from 20000 training rows (TaskPrompts seed 4), on-policy samples
at temperature 1, forward KL (JSD beta=0), AdamW lr 2e-3, max_new_tokens 6.

Per seed s, two runs with the same seed (RolloutDataModule(seed=s): data order and rollout draws;
lightning.seed_everything(s)) and the same number of steps, side by side in two processes (one
torch thread each):

* ``plain``:  OPD.
* ``effopd``: OPD + EffOPDCallback (pow2 schedule, 5 trials, a0 = 2). Its score is greedy accuracy
  on its OWN held-out prompts (TaskPrompts seed 3, ``--score-rows`` rows) through ``score_fn``,
  never on the reported validation set, so the search does not select on the test prompts.

Reported accuracy: greedy exact match on the quickstart's validation prompts (TaskPrompts seed 2,
``--val-rows`` rows), every ``--eval-every`` steps (and at step 0) in both runs: the shared grid
used for the speed-up. Both runs are also evaluated on it right after every pow2 step (after the
search in the EffOPD run), and the EffOPD run right before each search, to see whether what the
search gains on its score set carries over to the reported set; those points are for the plot
and the diagnostics only.

Time: wall clock (and process CPU time) since training started, excluding the reporting
evaluations and the diagnostics (SVDs, rank-1 probes) but including EffOPD's own trial
evaluations.

Speed-up, per seed: T = the lower of the two runs' final validation accuracies (both runs reach
it); ``speedup = plain OPD's first grid step with accuracy >= T / EffOPD's first such step`` (no
interpolation), and likewise for wall and CPU time at those points. It is marked < (and is usually
below 1) when EffOPD ends below plain OPD, so T is EffOPD's own final accuracy. Two identical runs
give exactly 1. (Until 2026-12-06 the numerator was plain OPD's last step, which credited EffOPD
with plain OPD's own wiggles: a seed where EffOPD kept nothing scored 1.14x.) The median over seeds
is the ``RESULT effopd_speedup`` line.

Diagnostics: UpdateDynamicsCallback on both runs (relative update norm ||dW||/||W0|| per module,
top-1 energy sigma_1^2 / sum sigma_i^2 of dW, |cos(u1, u1 at step --ref-step)|); on the plain run,
the accuracy of W0 + rank-1 dW (EffOPD's "low-rank concentration" probe) and a line scan: accuracy
at theta_a + m (theta_b - theta_a) along the plain trajectory's own update windows (a, b) for
m in 0 .. 3, i.e. where along the update direction the accuracy peaks (EffOPD's first trial is m = 3).

``--notes FILE`` appends a hand-written Markdown analysis to the section in the same write. The
section replaces this benchmark's earlier one in RESULTS.md (found by its heading), or is appended.
The runs themselves (a worker process each) are in ``effopd_runs.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    add_record_options,
    arg_parser,
    load_avg,
    print_result,
    pyplot,
    record,
    with_notes,
)
from effopd_runs import (
    ARMS,
    SCAN_MULTIPLIERS,
    SCORE_SEED,
    STUDENT,
    VAL_SEED,
    compare,
    displacement,
    dynamics_picture,
    grid,
    launch,
)

from lit_opd.tasks import AdditionTask


def short(module: str) -> str:
    return module.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def plot(pairs: list[tuple[dict, dict]], rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = ("step", "wall", "cpu")
    for i, ((plain, eff), row) in enumerate(zip(pairs, rows)):
        c = colors[i % len(colors)]
        for run, style, label in ((plain, "--", "OPD"), (eff, "-", "OPD + EffOPD")):
            pts = [p for p in run["points"] if p["kind"] in ("grid", "post")]
            for ax, key in zip(axes, keys):
                ax.plot([p[key] for p in pts], [p["acc"] for p in pts], style, color=c, lw=1.3,
                        label=f"seed {run['seed']}: {label}")
        kept = {h["step"] for h in eff["effopd_history"] if h["multiplier"] > 1}
        marks = [p for p in eff["points"] if p["kind"] == "post" and p["step"] in kept]
        for ax, key in zip(axes, keys):
            ax.axhline(row["target"], color=c, lw=0.6, ls=":")
            ax.plot([p[key] for p in marks], [p["acc"] for p in marks], "x", color=c, ms=7)
        if row["reached"]:
            hit = next(p for p in grid(eff) if p["step"] == row["eff_step"])
            for ax, key in zip(axes, keys):
                ax.plot([hit[key]], [hit["acc"]], "o", color=c, ms=8, mfc="none")
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("wall time (s): training + EffOPD trials, reporting evals excluded")
    axes[2].set_xlabel("process CPU time (s), same accounting")
    axes[0].set_ylabel("greedy accuracy, 512 reported val prompts")
    axes[0].legend(fontsize=7, ncol=1, loc="upper left")
    fig.suptitle("Quickstart (reversed 1-3 digit addition): plain OPD (dashed) vs OPD + EffOPD (solid), "
                 "same seed "
                 "per colour. Dotted: plain OPD's final accuracy; circle: EffOPD first reaches it; "
                 "x: a search kept an extrapolation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)




def render(pairs: list[tuple[dict, dict]], rows: list[dict], args: argparse.Namespace, meta: dict) -> str:
    lines = (speedup_lines(rows, args, meta) + target_lines(rows) + search_lines(pairs, args)
             + dynamics_lines(pairs, args) + scan_lines(pairs))
    lines += ["", "![EffOPD vs plain OPD: accuracy against step and wall time](effopd.png)", ""]
    return "\n".join(lines)


def speedup_lines(rows: list[dict], args: argparse.Namespace, meta: dict) -> list[str]:
    """The section's heading, its setup paragraph and the per-seed speed-up table."""
    lines = [
        f"## EffOPD: plain OPD against OPD + EffOPD — {meta['date']} — "
        "2-core CPU (this project's dev machine)",
        "",
        f"`{meta['command']}` (runtime {meta['runtime']}; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end): the quickstart task and models (`configs/quickstart.yaml`: "
        "reversed 1-3 digit addition, forward KL, AdamW lr 2e-3, 64 prompts a step), "
        f"{args.steps} steps per run; plain OPD and OPD + `EffOPDCallback` (pow2 schedule, 5 trials, "
        "multipliers 3, 5, 7, 9, 11) from the same seed (data order and rollout draws), run side by side "
        "with one torch thread each.",
        f"EffOPD scores greedy accuracy on its own {args.score_rows} held-out prompts (TaskPrompts seed "
        f"{SCORE_SEED}; {meta['overlap']} of them also occur in the reported set); the reported accuracy is "
        f"greedy exact match on the quickstart's {args.val_rows} validation prompts (seed {VAL_SEED}) every "
        f"{args.eval_every} steps. Time = training plus EffOPD's own trial evaluations; reporting "
        "evaluations and diagnostics are excluded. Speed-up = the steps (wall time, CPU time) plain OPD "
        "needs to first reach T over those EffOPD needs, T = the lower of the two final accuracies; "
        "marked < where EffOPD ends below plain OPD.",
        "",
        "| seed | plain OPD acc at end (target) | EffOPD acc at end | first step ≥ T: plain / EffOPD | "
        "T | steps speed-up | wall speed-up | CPU-time speed-up | plain / EffOPD wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "" if r["reached"] else "< "
        speedups = [f"{mark}{r[key]:.2f}×" for key in ("speedup", "wall_speedup", "cpu_speedup")]
        cells = [str(r["seed"]), f"{r['target']:.3f}", f"{r['eff_final']:.3f}",
                 f"{r['plain_first']} / {r['eff_step']}", f"{r['common']:.3f}", *speedups,
                 f"{r['plain_wall']:.0f} / {r['eff_wall']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_lines(rows: list[dict]) -> list[str]:
    """The medians' row and the verdict against issue 4's target."""
    reached = [r["reached"] for r in rows]
    med = statistics.median(r["speedup"] for r in rows)
    med_wall = statistics.median(r["wall_speedup"] for r in rows)
    med_cpu = statistics.median(r["cpu_speedup"] for r in rows)
    final_delta = [r["eff_final"] - r["target"] for r in rows]
    lower = sum(d < 0 for d in final_delta)
    return [
        f"| **median** | {statistics.median(r['target'] for r in rows):.3f} | "
        f"{statistics.median(r['eff_final'] for r in rows):.3f} | | | **{med:.2f}×** | **{med_wall:.2f}×** | "
        f"{med_cpu:.2f}× | |",
        "",
        f"Target (issue 4): ≥ 2.5× fewer steps to plain OPD's final accuracy, final accuracy not lower. "
        f"Measured over {len(rows)} seeds: median {med:.2f}× in steps, {med_wall:.2f}× in wall time "
        f"({med_cpu:.2f}× in CPU time); {sum(reached)} of {len(rows)} seeds reached plain OPD's final "
        f"accuracy at all, {sum(r['speedup'] >= 2.5 for r in rows)} by ≥ 2.5×; EffOPD's final accuracy "
        f"minus plain's: {', '.join(f'{d:+.3f}' for d in final_delta)} "
        f"({'not lower in any seed' if not lower else f'lower in {lower} of {len(rows)} seeds'}). "
        f"**{'Target met' if med >= 2.5 and not lower else 'Target not met'}.**",
        "",
    ]


def search_lines(pairs: list[tuple[dict, dict]], args: argparse.Namespace) -> list[str]:
    """What EffOPD's searches tried and kept, per seed."""
    lines = [
        "EffOPD's searches (step: kept multiplier, score-set accuracy before → after [reported-set accuracy "
        "before → after]; rejected searches restore the weights bit for bit, so their two reported "
        "figures are equal):",
        "",
    ]
    for plain, eff in pairs:
        pre = {p["step"]: p["acc"] for p in eff["points"] if p["kind"] == "pre"}
        post = {p["step"]: p["acc"] for p in eff["points"] if p["kind"] == "post"}
        parts, kept = [], []
        for h in eff["effopd_history"]:
            s = h["step"]
            transfer = f" [{pre[s]:.3f}→{post[s]:.3f}]" if s in pre and s in post else ""
            scores = f"{h['initial_score']:.3f}→{h['best_score']:.3f}"
            parts.append(f"{s}: ×{h['multiplier']:g}, {scores}{transfer}")
            if h["multiplier"] > 1:
                gain = round((h["best_score"] - h["initial_score"]) * args.score_rows)
                kept.append(f"step {s} (+{gain} of {args.score_rows} score prompts)")
        search_s = sum(h["seconds"] for h in eff["effopd_history"])
        n_evals = sum(1 + len(h["trial_scores"]) for h in eff["effopd_history"])
        disp = [displacement(run, args.ref_step) for run in (plain, eff)]
        lines.append(
            f"- seed {eff['seed']} ({n_evals} score evaluations, {search_s:.0f} s): " + "; ".join(parts)
            + f". Kept: {', '.join(kept) if kept else 'nothing'}. Median ‖ΔW‖/‖W0‖ at step {args.ref_step}: "
            f"plain {disp[0]:.2f}, EffOPD {disp[1]:.2f}."
        )
    return lines


def dynamics_lines(pairs: list[tuple[dict, dict]], args: argparse.Namespace) -> list[str]:
    """Update dynamics of both arms, and the plain run's low-rank probe."""
    lines = [""]
    for arm_i, arm in enumerate(ARMS):
        pic = dynamics_picture([pair[arm_i] for pair in pairs])
        top = sorted(pic.items(), key=lambda kv: -kv[1]["rel_update_norm"])[:5]
        energies = [v["top1_energy"] for v in pic.values()]
        cosines = [v["u1_cos"] for v in pic.values() if not math.isnan(v["u1_cos"])]
        kinds: dict[str, list[float]] = {}
        for m, v in pic.items():
            kinds.setdefault(m.rsplit(".", 1)[-1], []).append(v["rel_update_norm"])
        kind_txt = ", ".join(f"{k} {statistics.median(v):.3f}"
                             for k, v in sorted(kinds.items(), key=lambda kv: -statistics.median(kv[1])))
        lines.append(
            f"- Update dynamics, {'plain OPD' if arm == 'plain' else 'OPD + EffOPD'} at step {args.steps} "
            f"(ΔW = W − W0, median over seeds): largest ‖ΔW‖/‖W0‖ "
            + ", ".join(f"{short(m)} {v['rel_update_norm']:.3f}" for m, v in top)
            + f"; by kind {kind_txt}. Top-1 energy σ₁²/Σσ² of ΔW: median {statistics.median(energies):.2f} "
            f"(range {min(energies):.2f}–{max(energies):.2f}; a Gaussian random matrix of these shapes has "
            "0.02–0.04)"
            + (f"; |cos(u₁, u₁ at step {args.ref_step})| median {statistics.median(cosines):.2f}."
               if cosines else ".")
        )
    rank1 = [pair[0]["rank1"] for pair in pairs]
    lines.append(
        "- Low-rank probe on the plain run (tracked matrices set to W0 + f(ΔW), the rest as trained; "
        "median over seeds): full ΔW "
        f"{statistics.median(r['full'] for r in rank1):.3f}, rank-1 ΔW rescaled to ‖ΔW‖ "
        f"{statistics.median(r['rank1_rescaled'] for r in rank1):.3f}, rank-1 ΔW "
        f"{statistics.median(r['rank1'] for r in rank1):.3f}, ΔW = 0 (only embeddings and norms trained) "
        f"{statistics.median(r['zero'] for r in rank1):.3f}."
    )
    return lines


def scan_lines(pairs: list[tuple[dict, dict]]) -> list[str]:
    """The line scan along the plain runs' own update windows (when the runs have one)."""
    scans = [pair[0].get("line_scan") for pair in pairs]
    if not all(scans):
        return []
    lines = [
        "",
        "Line scan on the plain runs' trajectories (reported-set accuracy at θ_a + m·(θ_b − θ_a) on "
        "EffOPD's parameters, the rest at step b; m = 1 is the plain student at step b, m = 3 is "
        "EffOPD's first trial; median over seeds; ‖d‖/‖θ_b‖ = size of the window's update):",
        "",
        "| window a → b | ‖d‖/‖θ_b‖ | " + " | ".join(f"m={m:g}" for m in SCAN_MULTIPLIERS) + " | best m |",
        "|---|---|" + "---|" * (len(SCAN_MULTIPLIERS) + 1),
    ]
    for i, entry in enumerate(scans[0]):
        accs = [statistics.median(sc[i]["acc"][j] for sc in scans) for j in range(len(SCAN_MULTIPLIERS))]
        best = max(range(len(accs)), key=lambda j: accs[j])
        lines.append(
            f"| {entry['window'][0]} → {entry['window'][1]} | "
            f"{statistics.median(sc[i]['rel_norm'] for sc in scans):.3f} | "
            + " | ".join(f"**{v:.3f}**" if j == best else f"{v:.3f}" for j, v in enumerate(accs))
            + f" | {SCAN_MULTIPLIERS[best]:g} |"
        )
    return lines


def report(args: argparse.Namespace, meta: dict) -> float:
    pairs = []
    for seed in args.seed_list:
        pair = tuple(json.loads((args.out_dir / f"{arm}_seed{seed}.json").read_text()) for arm in ARMS)
        pairs.append(pair)
    rows = [compare(p, e) for p, e in pairs]
    plot(pairs, rows, args.plot)
    section = render(pairs, rows, args, meta)
    section = with_notes(section, args.notes)
    print(section)
    record(args, section)
    return statistics.median(r["speedup"] for r in rows)


def score_overlap(args: argparse.Namespace) -> int:
    task = AdditionTask(max_digits=3, reverse_answer=True)
    val = {r["prompt"] for r in task.make_rows(args.val_rows, VAL_SEED)}
    return sum(r["prompt"] in val for r in task.make_rows(args.score_rows, SCORE_SEED))


def parse_args() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (one plain/EffOPD pair each)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (the quickstart's 2e-3)")
    parser.add_argument("--student", default=STUDENT, help="the student's path (default: the quickstart's)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-rows", type=int, default=512, help="reported validation prompts (seed 2)")
    parser.add_argument("--score-rows", type=int, default=512, help="EffOPD's own score prompts (seed 3)")
    parser.add_argument("--dyn-every", type=int, default=100, help="UpdateDynamicsCallback interval")
    parser.add_argument("--ref-step", type=int, default=100, help="reference step of u1_cos")
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps, small sets, no RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="re-render from the runs in --out-dir")
    add_record_options(parser)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench_effopd")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default benchmarks/effopd.png; the run folder with --quick or --no-record")
    parser.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the section")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.val_rows, args.score_rows = "0", 40, 10, 128, 128
        args.dyn_every, args.ref_step, args.no_record = 20, 10, True
        args.out_dir = args.out_dir.with_name(args.out_dir.name + "_quick")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.plot is None:
        args.plot = (args.out_dir if args.quick or args.no_record else ROOT / "benchmarks") / "effopd.png"
    return args


def run_pairs(args: argparse.Namespace) -> None:
    """Each seed's plain and EffOPD runs side by side: 2 worker processes, 1 thread each."""
    for seed in args.seed_list:
        t = time.perf_counter()
        procs = [launch(arm, seed, args) for arm in ARMS]
        for (proc, _), arm in zip(procs, ARMS):
            if proc.wait() != 0:
                sys.exit(f"{arm} seed {seed} failed; see {args.out_dir / f'{arm}_seed{seed}.log'}")
        print(f"seed {seed}: both runs done in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    args = parse_args()
    started, load_start = time.perf_counter(), load_avg()
    if not args.report_only:
        run_pairs(args)
    runtime = time.perf_counter() - started
    cmd = ("python benchmarks/bench_effopd.py"
           + ("" if args.seeds == "0,1,2" or args.quick else f" --seeds {args.seeds}")
           + ("" if args.steps == 600 or args.quick else f" --steps {args.steps}")
           + (" --quick" if args.quick else ""))
    meta = {
        "date": "2026-11-26", "command": cmd, "load_start": load_start, "load_end": load_avg(),
        "runtime": f"{int(runtime // 60)} min {int(runtime % 60)} s" if not args.report_only else "see above",
        "overlap": score_overlap(args),
    }
    if args.report_only and (args.out_dir / "meta.json").exists():
        meta = {**json.loads((args.out_dir / "meta.json").read_text()), "command": cmd}
    elif not args.report_only:
        (args.out_dir / "meta.json").write_text(json.dumps(meta))
    print_result("effopd_speedup", report(args, meta), digits=2)


if __name__ == "__main__":
    main()
