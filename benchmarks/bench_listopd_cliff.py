"""ListOPD cliff benchmark (issue 5 part 5): parse validity and NDCG@1 against λ around the predicted λ*.

    python benchmarks/bench_listopd_cliff.py               # 7 λ (+1 far) x 3 seeds x 30 steps
    python benchmarks/bench_listopd_cliff.py --quick       # smoke run (~2 min once models are cached)
    python benchmarks/bench_listopd_cliff.py --no-record   # full run, no RESULTS.md section
    python benchmarks/bench_listopd_cliff.py --report-only --notes FILE   # re-render from saved runs

Time on one CPU thread (2-core dev machine): ~6 min to train the pair (cached afterwards under
runs/bench_listopd/), then ~14 min for calibration and the 24 ListOPD runs.

Claim (arXiv 2605.08737; lit_opd/methods/list_opd/README.md): strict parse validity is flat for λ below the
closed-form cliff λ*(p, b, c) and falls above it, the empirical onset within one grid step of λ*,
while NDCG@1 on parsed outputs stays flat.

Setup (RankingTask K=4, char tokenizer, all on CPU with one torch thread):

1. **Teacher**: configs/models/ranking-teacher (Qwen3 layout, 4 layers, h128) from random init, SFT
   ``--teacher-steps`` steps (batch 64, AdamW lr 3e-3, TaskPrompts seed 11). **Warm start**:
   configs/models/ranking-student (3 layers, h96), SFT ``--student-steps`` steps (seed 14). Both are
   cached under ``--out-dir`` (teacher/, student/) and reused by later runs.
2. **Teacher temperature τ** (``HFTeacher(temperature=τ)``: the teacher's distribution is
   softmax(logits/τ) in training *and* in calibration, which reads ``HFTeacher.scoring_model()``). At τ = 1
   the teacher's tail at the structural positions is thinner than (1 − c) times the warm start's,
   so λ* < 1 (the regime of configs/list_opd/*.yaml). τ > 1 fattens the teacher's tails; τ is
   set by bisection so that the calibrated λ* is ``--target-lambda-star`` (default 1.2, the paper's
   regime λ* > 1), or fixed with ``--teacher-temperature``. This is a choice of teacher, made before
   any ListOPD run and from calibration only; the runs then test the prediction.
3. **Calibration**: ``lit_opd.methods.list_opd.calibration.calibrate`` (64 RankingTask rows, seed 13, c = 0.2,
   structural positions, base anchor) gives λ*, p, b and the binding position.
4. **Grid**: λ = λ*·(1 + 0.1 k), k = −3..3 (``--grid-frac``, ``--grid-half``); the predicted λ* is
   the middle grid point. ``--wide`` adds points far above it (default 4λ*), reported apart and
   not used for the onset. Per λ and seed (``--seeds``): ``ListOPDModule(lambda_=λ, objective=BaseRelativeClip(clip=0.2),
   lambda_star=λ*, allow_above_cliff=True)``, ``--steps`` steps of batch 32, AdamW lr 3e-4,
   rollouts at temperature 1 (RolloutDataModule seed = run seed, training prompts TaskPrompts seed 15).
5. **Measured after the last step**, on 256 held-out prompts (TaskPrompts seed 12, disjoint from
   training by seed): strict parse rate and mean NDCG@1 on parsed outputs, for **sampled**
   completions (temperature 1, the distribution training moves) and **greedy** ones. The SFT warm
   start is measured the same way.

**Onset** (the ``RESULT`` line): on the grid, the first λ at which the seed-median *sampled* parse
rate is at least 10 points below its value at the smallest grid λ. ``listopd_onset_error`` is
|onset index − λ* index| in grid steps. When no grid λ drops by 10 points there is no measured
onset and the value printed is one step past the end of the grid (``grid-half + 1``), a lower bound.
The greedy onset is reported beside it (same rule).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import lightning as L
import torch

from lit_opd import (
    BaseRelativeClip,
    HFTeacher,
    ListOPDModule,
    ModelSpec,
    RolloutDataModule,
    SamplingParams,
    SFTModule,
    TaskPrompts,
)
from lit_opd.methods.list_opd.calibration import calibrate
from lit_opd.methods.list_opd.cliff import lambda_star
from lit_opd.methods.list_opd.module import ranking_score
from lit_opd.models import freeze, load_causal_lm, load_tokenizer  # noqa: E402
from lit_opd.tasks import RankingTask

K, CLIP, CAL_ROWS, CAL_SEED, VAL_SEED = 4, 0.2, 64, 13, 12
TASK = RankingTask(k=K)
ENGINE = "hf"  # the recorded run sampled with the model's own forward; "auto" draws the same distribution faster


def trainer(steps: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=callbacks or [])


def sft(config: str, out: Path, steps: int, data_seed: int) -> float:
    """SFT from random init with the library's SFTModule; saves model + tokenizer to ``out``."""
    if (out / "config.json").exists():
        print(f"[cached] {out}")
        return 0.0
    started = time.perf_counter()
    L.seed_everything(0, verbose=False)
    module = SFTModule(ModelSpec(path=str(ROOT / config), random_init=True),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    data = RolloutDataModule(TaskPrompts(TASK, num_rows=20000, seed=data_seed), val_size=0, batch_size=64,
                             sampling=SamplingParams(max_new_tokens=32, decode_step=ENGINE))
    trainer(steps).fit(module, data)
    module.student.save_pretrained(out)
    module.tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - started
    print(f"[trained] {out}: {steps} SFT steps in {seconds:.0f} s")
    return seconds


def calibrate_at(teacher: Path, temperature: float, base: torch.nn.Module, tok):  # noqa: ANN001, ANN201
    """The library's calibration of ``HFTeacher(teacher, temperature=τ)`` (its scoring model) against ``base``."""
    scorer = HFTeacher(str(teacher), tok, temperature=temperature).scoring_model()
    return calibrate(scorer, base, tok, TASK.make_rows(CAL_ROWS, CAL_SEED), c=CLIP)


def choose_temperature(args: argparse.Namespace, teacher: Path, student: Path) -> tuple[float, object, list]:
    """τ (``--teacher-temperature``, or the probe of a bisection on [1, 2] whose finite λ*(τ) is
    closest to the target), the calibration report at τ, and the (τ, λ*) pairs probed (τ = 1 first)."""
    tok = load_tokenizer(None, str(student))
    base = freeze(load_causal_lm(str(student)))
    at_one = calibrate_at(teacher, 1.0, base, tok)
    trace = [(1.0, at_one.lambda_star)]
    if args.teacher_temperature is not None:
        report = calibrate_at(teacher, args.teacher_temperature, base, tok)
        return args.teacher_temperature, report, trace + [(args.teacher_temperature, report.lambda_star)]
    if at_one.lambda_star >= args.target_lambda_star:
        return 1.0, at_one, trace
    lo, hi = 1.0, 2.0
    for _ in range(args.bisect_steps):  # λ*(τ) grows with τ: the teacher's valid mass falls toward b
        mid = (lo + hi) / 2
        lam = calibrate_at(teacher, mid, base, tok).lambda_star
        trace.append((mid, lam))
        lo, hi = (mid, hi) if lam < args.target_lambda_star else (lo, mid)
    finite = [(t, lam) for t, lam in trace if math.isfinite(lam)]
    tau = min(finite, key=lambda tl: abs(math.log(tl[1] / args.target_lambda_star)))[0]  # closest probe
    return tau, calibrate_at(teacher, tau, base, tok), trace


def two_sided_lambda_star(report) -> float:  # noqa: ANN001 - a CalibrationReport
    """Diagnostic beside the one-sided λ* the benchmark runs with: the same positions read with the
    two-sided band (``lambda_star(..., two_sided=True)``; where p < b, λ > 1 extrapolates the
    student's tail *above* the warm start's). Median over prompts of the per-prompt minimum, as
    ``calibrate(..., two_sided=True)`` computes it."""
    per_prompt = [
        min((lambda_star(s.p, s.b, CLIP, two_sided=True) for s in prompt.positions), default=math.inf)
        for prompt in report.prompts
    ]
    return statistics.median(per_prompt)


# ----- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(module, data: RolloutDataModule, rows: list[dict], seed: int) -> dict:
    """Sampled (temperature 1) and greedy parse rate and NDCG@1 on parsed outputs, on ``rows``."""
    out = {}
    for mode, source in (("sampled", "student"), ("greedy", "greedy")):
        valid, ndcg = [], []
        for batch in data.val_dataloader():
            rollout = data.rollout(batch.to(module.device), module, source, step=10**6 + seed)
            for text, index in zip(data.decode(rollout), rollout.row_index_B.tolist(), strict=True):
                ok, score = ranking_score(text, rows[index], None)
                valid.append(float(ok))
                if score is not None:
                    ndcg.append(score)
        out[f"parse_{mode}"] = sum(valid) / len(valid)
        out[f"ndcg_{mode}"] = sum(ndcg) / len(ndcg) if ndcg else math.nan
    return out


def datamodule(seed: int, val_rows: int) -> RolloutDataModule:
    return RolloutDataModule(
        TaskPrompts(TASK, num_rows=20000, seed=15),
        val_source=TaskPrompts(TASK, num_rows=val_rows, seed=VAL_SEED), batch_size=32, val_batch_size=256,
        sampling=SamplingParams(max_new_tokens=32, temperature=1.0, decode_step=ENGINE), seed=seed,
    )


def warm_start_level(student: Path, val_rows: int, seeds: list[int]) -> dict:
    module = SFTModule(str(student))
    rows = TASK.make_rows(val_rows, VAL_SEED)
    per_seed = []
    for seed in seeds:
        data = datamodule(seed, val_rows)
        data.tokenizer = module.tokenizer
        data.setup("fit")
        per_seed.append(evaluate(module, data, rows, seed))
    return {key: statistics.median(r[key] for r in per_seed) for key in per_seed[0]}


class History(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        keys = ("train/parse_valid", "train/tail_ratio", "train/tail_ratio_min", "train/clip_frac", "train/loss")
        self.steps.append({k: float(metrics[k]) for k in keys if k in metrics})


def run_one(args: argparse.Namespace, teacher: Path, student: Path, tau: float, lam_star: float,
            lam: float, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    module = ListOPDModule(
        str(student), HFTeacher(str(teacher), temperature=tau), objective=BaseRelativeClip(clip=CLIP),
        lambda_=lam, lambda_star=lam_star,
        allow_above_cliff=True, calibration_source=TaskPrompts(TASK, num_rows=CAL_ROWS, seed=CAL_SEED),
        calibration_rows=args.tail_rows,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0),
    )
    data, history = datamodule(seed, args.val_rows), History()
    started = time.perf_counter()
    trainer(args.steps, [history]).fit(module, data)
    seconds = time.perf_counter() - started
    result = evaluate(module, data, TASK.make_rows(args.val_rows, VAL_SEED), seed)
    last = history.steps[-5:]
    result.update(lam=lam, seed=seed, seconds=seconds,
                  tail_ratio=statistics.median(s.get("train/tail_ratio", math.nan) for s in last),
                  clip_frac=statistics.mean(s.get("train/clip_frac", 0.0) for s in history.steps))
    print(f"  λ={lam:.4f} seed={seed}: parse sampled {result['parse_sampled']:.3f} "
          f"greedy {result['parse_greedy']:.3f}"
          f" | ndcg@1 sampled {result['ndcg_sampled']:.3f} greedy {result['ndcg_greedy']:.3f}"
          f" | tail ratio {result['tail_ratio']:.3f} clip {result['clip_frac']:.3f} | {seconds:.0f} s",
          flush=True)
    return result


# ----- analysis ----------------------------------------------------------------------------------
def medians(runs: list[dict], grid: list[float], key: str) -> list[float]:
    return [statistics.median(r[key] for r in runs if r["lam"] == lam) for lam in grid]


def onset_index(levels: list[float], drop: float = 0.10) -> int | None:
    """First grid index whose level is ≥ ``drop`` below the level at the smallest λ; None if none."""
    return next((i for i, v in enumerate(levels) if v <= levels[0] - drop), None)


def seed_onsets(runs: list[dict], grid: list[float], key: str) -> dict[int, int | None]:
    seeds = sorted({r["seed"] for r in runs})
    return {s: onset_index([next(r[key] for r in runs if r["seed"] == s and r["lam"] == lam) for lam in grid])
            for s in seeds}


def fmt_onset(index: int | None, grid: list[float]) -> str:
    return "none in grid" if index is None else f"λ={grid[index]:.4f} (index {index})"


def table(runs: list[dict], grid: list[float], lam_star: float, centre: int | None, warm: dict) -> str:
    """Markdown: the warm start, then per grid λ the seed medians (sampled parse per seed too)."""
    head = ("| λ | λ/λ* | parse sampled: median (per seed) | parse greedy | NDCG@1 sampled | NDCG@1 greedy "
            "| tail ratio at end | clip frac |")
    lines = [head, "|---|---|---|---|---|---|---|---|",
             f"| SFT warm start | — | {warm['parse_sampled']:.3f} | {warm['parse_greedy']:.3f} | "
             f"{warm['ndcg_sampled']:.3f} | {warm['ndcg_greedy']:.3f} | 1 | — |"]
    for i, lam in enumerate(grid):
        rs = sorted((r for r in runs if r["lam"] == lam), key=lambda r: r["seed"])

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        seeds = ", ".join(f"{r['parse_sampled']:.3f}" for r in rs)
        mark = " **(λ*)**" if i == centre else ""
        lines.append(f"| {lam:.4f}{mark} | {lam / lam_star:.2f} | {med('parse_sampled'):.3f} ({seeds}) | "
                     f"{med('parse_greedy'):.3f} | {med('ndcg_sampled'):.3f} | {med('ndcg_greedy'):.3f} | "
                     f"{med('tail_ratio'):.3f} | {statistics.mean(r['clip_frac'] for r in rs):.3f} |")
    return "\n".join(lines)


def plot(runs: list[dict], grid: list[float], lam_star: float, warm: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    seeds = sorted({r["seed"] for r in runs})
    panels = ((axes[0], "parse", "strict parse rate"), (axes[1], "ndcg", "NDCG@1 on parsed outputs"))
    for ax, metric, label in panels:
        for mode, colour in (("sampled", "tab:blue"), ("greedy", "tab:orange")):
            key = f"{metric}_{mode}"
            for s in seeds:
                ys = [next(r[key] for r in runs if r["seed"] == s and r["lam"] == lam) for lam in grid]
                ax.plot(grid, ys, color=colour, alpha=0.3, lw=1)
            ax.plot(grid, medians(runs, grid, key), color=colour, lw=2.2, marker="o",
                    label=f"{mode}: seed median")
            ax.axhline(warm[key], color=colour, ls=":", lw=1.5, label=f"{mode}: SFT warm start")
        ax.axvline(lam_star, color="k", ls="--", lw=1.2, label=f"predicted λ* = {lam_star:.3f}")
        if max(grid) / min(grid) > 2.5:  # points far above λ*: a log axis keeps the fine grid readable
            ax.set_xscale("log")
            ticks = (0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8)
            ax.set_xticks([t for t in ticks if min(grid) * 0.9 <= t <= max(grid) * 1.1])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("λ (reward extrapolation)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"ListOPD on RankingTask K={K}: {len(seeds)} seeds (thin lines), "
                 f"{len(runs) // len(seeds)} λ values, held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(args: argparse.Namespace, res: dict, onsets: dict) -> str:
    """The dated RESULTS.md section (``res``: what ``measure`` saved; ``onsets``: from ``analyse``)."""
    cal, grid, centre, warm, runs = res["calibration"], res["grid"], res["centre"], res["warm"], res["runs"]
    s_on, g_on = onsets["sampled"], onsets["greedy"]
    per_seed = "; ".join(f"seed {s}: {fmt_onset(i, grid)}" for s, i in onsets["per_seed"].items())
    trace = ", ".join(f"τ={t:.4f}→λ*={lam:.3g}" for t, lam in res["trace"])
    how = "fixed" if res["fixed_tau"] else f"bisected for a calibrated λ* of {res['target']}"
    command = " ".join(["python benchmarks/bench_listopd_cliff.py", *res["argv"]])
    trained = (f"model training {res['train_seconds'] / 60:.1f} min of it (models cached in `{res['out_dir']}`)"
               if res["train_seconds"] else f"models loaded from the cache in `{res['out_dir']}` (no training)")
    wide = ""
    if res["wide_grid"]:
        wide = "\n\nFar above λ* (same settings; not part of the onset grid):\n\n" + table(
            runs, res["wide_grid"], cal["lambda_star"], None, warm)
    return f"""
## ListOPD extrapolation cliff — {res['date']} — 2-core CPU (one torch thread)

`{command}`: {res['total_seconds'] / 60:.1f} min in all; {trained}.

- **Pair**: teacher configs/models/ranking-teacher (4 layers, h128), SFT {res['teacher_steps']} steps; warm start \
configs/models/ranking-student (3 layers, h96), SFT {res['student_steps']} steps; RankingTask K={K}.
- **Teacher scoring temperature** τ = {res['tau']:.4f} (`HFTeacher(temperature=τ)`; calibration measures the same \
distribution), {how}: {trace}.
- **Calibration** ({CAL_ROWS} teacher-forced rows, c = {CLIP}, structural positions): **λ* = {cal['lambda_star']:.4f}**, \
binding position {cal['binding_position']} (`{cal['binding_token']}`), median p = {cal['p']:.6f} and \
b = {cal['b']:.6f} there: (1−p)/(1−b) = {cal['rho']:.3f} against 1 − c = {1 - CLIP}. At τ = 1: λ* = {res['trace'][0][1]:.4g}. \
Diagnostic: with the band read two-sided (where p < b the tail ratio may not exceed 1 + c; \
`two_sided_lambda_star`), λ* would be {cal['two_sided']:.4g}.
- **ListOPD**: {res['steps']} steps per run, batch 32, AdamW lr {res['lr']}, clip c = {CLIP}; seeds \
{', '.join(map(str, res['seeds']))}; grid λ = λ*·(1 + {res['grid_frac']}k), k = −{centre}..{centre}.
- **Measured** after the last step on {res['val_rows']} held-out prompts, for sampled (temperature 1) and greedy \
completions. Tail ratio = (1 − Q_C)/(1 − b) at the binding positions of {res['tail_rows']} calibration prompts, \
median of the last 5 steps (clip-safe: ≥ {1 - CLIP}).

{table(runs, grid, cal["lambda_star"], centre, warm)}{wide}

Onset = the first grid λ where the seed-median parse rate is ≥ 10 points below its value at the smallest λ. \
Sampled: {fmt_onset(s_on, grid)}; greedy: {fmt_onset(g_on, grid)}; per seed (sampled): {per_seed}. \
The predicted λ* is grid index {centre}. \
**RESULT listopd_onset_error {onsets['error']}**{' (no onset in the grid: a lower bound)' if s_on is None else ''}.

![ListOPD cliff: parse rate and NDCG@1 against λ](listopd_cliff.png)
"""


def analyse(res: dict) -> dict:
    grid, centre, runs = res["grid"], res["centre"], res["runs"]
    s_on = onset_index(medians(runs, grid, "parse_sampled"))
    g_on = onset_index(medians(runs, grid, "parse_greedy"))
    return {"sampled": s_on, "greedy": g_on, "per_seed": seed_onsets(runs, grid, "parse_sampled"),
            "error": abs(s_on - centre) if s_on is not None else len(grid) - centre}


def measure(args: argparse.Namespace) -> dict:
    """Train (or load) the pair, choose τ, calibrate, run the grid; everything the report needs."""
    started = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    teacher = args.out_dir / f"teacher{args.teacher_steps}"
    student = args.out_dir / f"student{args.student_steps}"
    train_seconds = sft("configs/models/ranking-teacher", teacher, args.teacher_steps, 11)
    train_seconds += sft("configs/models/ranking-student", student, args.student_steps, 14)
    tau, report, trace = choose_temperature(args, teacher, student)
    if not math.isfinite(report.lambda_star):
        raise SystemExit(f"calibrated λ* = inf at τ = {tau}: no cliff to test (use --teacher-temperature)")
    lam_star = report.lambda_star
    print(f"{report.table()}\ntau {tau:.4f} {report.summary()}")
    grid = [round(lam_star * (1 + args.grid_frac * k), 6) for k in range(-args.grid_half, args.grid_half + 1)]
    wide_grid = [round(lam_star * m, 6) for m in args.wide]
    warm = warm_start_level(student, args.val_rows, args.seeds)
    print(f"SFT warm start: {warm}")
    runs = [run_one(args, teacher, student, tau, lam_star, lam, seed) for lam in grid + wide_grid
            for seed in args.seeds]
    binding = next((r for r in report.per_position_table if r.position == report.binding_position), None)
    calibration = {"lambda_star": lam_star, "binding_position": report.binding_position, "p": report.p,
                   "b": report.b, "rho": (1 - report.p) / (1 - report.b),
                   "two_sided": two_sided_lambda_star(report),
                   "binding_token": binding.token if binding else "-", "table": report.table()}
    out_dir = args.out_dir.relative_to(ROOT) if args.out_dir.is_relative_to(ROOT) else args.out_dir
    return {
        "date": f"{datetime.date.today():%Y-%m-%d}", "argv": sys.argv[1:], "out_dir": str(out_dir),
        "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "tau": tau, "trace": trace,
        "fixed_tau": args.teacher_temperature is not None, "target": args.target_lambda_star,
        "calibration": calibration, "grid": grid, "centre": args.grid_half, "wide_grid": wide_grid,
        "grid_frac": args.grid_frac, "steps": args.steps, "lr": args.lr, "seeds": args.seeds,
        "val_rows": args.val_rows, "tail_rows": args.tail_rows, "warm": warm, "runs": runs,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 3 λ, 4 steps; no RESULTS.md")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="re-render from --out-dir/results.json")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown analysis appended to the section")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench_listopd")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "listopd_cliff.png")
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--student-steps", type=int, default=250)
    parser.add_argument("--teacher-temperature", type=float, default=None, help="fix τ (default: bisect)")
    parser.add_argument("--target-lambda-star", type=float, default=1.2)
    parser.add_argument("--bisect-steps", type=int, default=10)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="ListOPD steps per run")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--grid-frac", type=float, default=0.1)
    parser.add_argument("--grid-half", type=int, default=3)
    parser.add_argument("--wide", type=lambda s: [float(x) for x in s.split(",") if x], default=[4.0],
                        help="extra λ/λ* multipliers far above the grid (context, not in the onset)")
    parser.add_argument("--val-rows", type=int, default=256)
    parser.add_argument("--tail-rows", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.grid_half, args.val_rows, args.bisect_steps = [0, 1], 4, 1, 64, 5
        args.wide, args.no_record, args.plot = [], True, args.out_dir / "listopd_cliff_quick.png"
    for name in ("teacher_steps", "student_steps", "steps", "val_rows", "bisect_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.grid_frac <= 0 or args.grid_half < 1 or args.grid_frac * args.grid_half >= 1:
        raise SystemExit(f"--grid-frac {args.grid_frac} / --grid-half {args.grid_half}: need 0 < frac·half < 1")
    torch.set_num_threads(1)
    saved = args.out_dir / ("results_quick.json" if args.quick else "results.json")
    if args.report_only:
        res = json.loads(saved.read_text())
    else:
        res = measure(args)
        saved.write_text(json.dumps(res, indent=1))
    onsets = analyse(res)
    print(res["calibration"]["table"])
    lam_star = res["calibration"]["lambda_star"]
    plot(res["runs"], res["grid"] + res["wide_grid"], lam_star, res["warm"], args.plot)
    text = section(args, res, onsets)
    print(text)
    if not args.no_record:
        notes = args.notes.read_text() if args.notes else ""
        with args.results.open("a") as f:
            f.write(text + ("\n" + notes if notes else ""))
        print(f"appended to {args.results}")
    print(f"RESULT listopd_onset_error {onsets['error']}")


if __name__ == "__main__":
    main()
