"""ListOPD cliff benchmark (issue 5 part 5): parse validity and NDCG@1 against λ around the predicted λ*.

    python benchmarks/bench_listopd_cliff.py               # 7 λ (+1 far) x 3 seeds x 30 steps
    python benchmarks/bench_listopd_cliff.py --quick       # smoke run (~2 min once models are cached)
    python benchmarks/bench_listopd_cliff.py --no-record   # full run; RESULTS.md untouched
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
   not used for the onset. Per λ and seed (``--seeds``): ``ListOPDModule(lambda_=λ,
   objective=BaseRelativeClip(clip=0.2), lambda_star=λ*, allow_above_cliff=True)``, ``--steps`` steps
   of batch 32, AdamW lr 3e-4, rollouts at temperature 1 (RolloutDataModule seed = run seed, training
   prompts TaskPrompts seed 15).
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

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    add_record_options,
    arg_parser,
    print_result,
    record,
    save_student,
    trainer,
    with_notes,
)
from listopd_cliff_analysis import analyse, fmt_onset, plot, table  # noqa: E402

from lit_opd import (  # noqa: E402
    BaseRelativeClip,
    HFTeacher,
    ListOPDModule,
    ModelSpec,
    RolloutDataModule,
    SamplingParams,
    SFTModule,
    TaskPrompts,
)
from lit_opd.methods.list_opd.calibration import calibrate  # noqa: E402
from lit_opd.methods.list_opd.cliff import lambda_star  # noqa: E402
from lit_opd.methods.list_opd.module import ranking_score  # noqa: E402
from lit_opd.models import freeze, load_causal_lm, load_tokenizer  # noqa: E402
from lit_opd.tasks import RankingTask  # noqa: E402

K, CLIP, CAL_ROWS, CAL_SEED, VAL_SEED = 4, 0.2, 64, 13, 12
TASK = RankingTask(k=K)
# The recorded run sampled with the model's own forward; "auto" draws the same distribution faster.
ENGINE = "hf"


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
    save_student(module, out)
    seconds = time.perf_counter() - started
    print(f"[trained] {out}: {steps} SFT steps in {seconds:.0f} s")
    return seconds


def calibrate_at(teacher: Path, temperature: float, base: torch.nn.Module, tok):  # noqa: ANN001, ANN201
    """The library's calibration of ``HFTeacher(teacher, temperature=τ)`` (its scoring model) against
    ``base``."""
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


def datamodule(seed: int, val_rows: int, tokenizer: str | None = None) -> RolloutDataModule:
    return RolloutDataModule(
        TaskPrompts(TASK, num_rows=20000, seed=15),
        val_source=TaskPrompts(TASK, num_rows=val_rows, seed=VAL_SEED), batch_size=32, val_batch_size=256,
        sampling=SamplingParams(max_new_tokens=32, temperature=1.0, decode_step=ENGINE), seed=seed,
        tokenizer=tokenizer,
    )


def warm_start_level(student: Path, val_rows: int, seeds: list[int]) -> dict:
    module = SFTModule(str(student))
    rows = TASK.make_rows(val_rows, VAL_SEED)
    per_seed = []
    for seed in seeds:
        data = datamodule(seed, val_rows, tokenizer=str(student))  # encoded up front: no trainer here
        data.setup("fit")
        per_seed.append(evaluate(module, data, rows, seed))
    return {key: statistics.median(r[key] for r in per_seed) for key in per_seed[0]}


class History(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        keys = ("train/parse_valid", "train/tail_ratio", "train/tail_ratio_min", "train/clip_frac",
                "train/loss")
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


def section(args: argparse.Namespace, res: dict, onsets: dict) -> str:
    """The dated RESULTS.md section (``res``: what ``measure`` saved; ``onsets``: from ``analyse``)."""
    cal, grid, centre, warm, runs = res["calibration"], res["grid"], res["centre"], res["warm"], res["runs"]
    s_on, g_on = onsets["sampled"], onsets["greedy"]
    per_seed = "; ".join(f"seed {s}: {fmt_onset(i, grid)}" for s, i in onsets["per_seed"].items())
    trace = ", ".join(f"τ={t:.4f}→λ*={lam:.3g}" for t, lam in res["trace"])
    how = "fixed" if res["fixed_tau"] else f"bisected for a calibrated λ* of {res['target']}"
    command = " ".join(["python benchmarks/bench_listopd_cliff.py", *res["argv"]])
    cache = res["out_dir"]
    trained = (f"model training {res['train_seconds'] / 60:.1f} min of it (models cached in `{cache}`)"
               if res["train_seconds"] else f"models loaded from the cache in `{cache}` (no training)")
    wide = ""
    if res["wide_grid"]:
        wide = "\n\nFar above λ* (same settings; not part of the onset grid):\n\n" + table(
            runs, res["wide_grid"], cal["lambda_star"], None, warm)
    return f"""
## ListOPD extrapolation cliff — {res['date']} — 2-core CPU (one torch thread)

`{command}`: {res['total_seconds'] / 60:.1f} min in all; {trained}.

- **Pair**: teacher configs/models/ranking-teacher (4 layers, h128), SFT {res['teacher_steps']} steps; warm \
start configs/models/ranking-student (3 layers, h96), SFT {res['student_steps']} steps; RankingTask K={K}.
- **Teacher scoring temperature** τ = {res['tau']:.4f} (`HFTeacher(temperature=τ)`; calibration measures \
the same distribution), {how}: {trace}.
- **Calibration** ({CAL_ROWS} teacher-forced rows, c = {CLIP}, structural positions): **λ* = \
{cal['lambda_star']:.4f}**, binding position {cal['binding_position']} (`{cal['binding_token']}`), median p \
= {cal['p']:.6f} and b = {cal['b']:.6f} there: (1−p)/(1−b) = {cal['rho']:.3f} against 1 − c = {1 - CLIP}. \
At τ = 1: λ* = {res['trace'][0][1]:.4g}. Diagnostic: with the band read two-sided (where p < b the tail \
ratio may not exceed 1 + c; `two_sided_lambda_star`), λ* would be {cal['two_sided']:.4g}.
- **ListOPD**: {res['steps']} steps per run, batch 32, AdamW lr {res['lr']}, clip c = {CLIP}; seeds \
{', '.join(map(str, res['seeds']))}; grid λ = λ*·(1 + {res['grid_frac']}k), k = −{centre}..{centre}.
- **Measured** after the last step on {res['val_rows']} held-out prompts, for sampled (temperature 1) and \
greedy completions. Tail ratio = (1 − Q_C)/(1 − b) at the binding positions of {res['tail_rows']} \
calibration prompts, median of the last 5 steps (clip-safe: ≥ {1 - CLIP}).

{table(runs, grid, cal["lambda_star"], centre, warm)}{wide}

Onset = the first grid λ where the seed-median parse rate is ≥ 10 points below its value at the smallest λ. \
Sampled: {fmt_onset(s_on, grid)}; greedy: {fmt_onset(g_on, grid)}; per seed (sampled): {per_seed}. The \
predicted λ* is grid index {centre}. **RESULT listopd_onset_error \
{onsets['error']}**{' (no onset in the grid: a lower bound)' if s_on is None else ''}.

![ListOPD cliff: parse rate and NDCG@1 against λ](listopd_cliff.png)
"""


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


def parse_args() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 λ, 4 steps; no RESULTS.md")
    add_record_options(parser)
    parser.add_argument("--report-only", action="store_true", help="re-render from --out-dir/results.json")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown analysis appended to the section")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench_listopd")
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
        raise SystemExit(f"--grid-frac {args.grid_frac} / --grid-half {args.grid_half}: "
                         "need 0 < frac·half < 1")
    return args


def main() -> None:
    args = parse_args()
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
    plot(res["runs"], res["grid"] + res["wide_grid"], lam_star, res["warm"], args.plot, K)
    text = with_notes(section(args, res, onsets), args.notes)
    print(text)
    record(args, text)
    print_result("listopd_onset_error", onsets["error"])


if __name__ == "__main__":
    main()
