"""MAD-OPD benchmark: OPD from two complementary experts — each single teacher, ``routed``
(MOPD), ``fixed`` (MT-OPD) and ``debate`` (MAD-OPD with the likelihood confidence) — on the
quickstart task split into two halves; plus ``debate_sharp``, the same debate with a sharper
confidence temperature.

    OMP_NUM_THREADS=1 python benchmarks/bench_mad_opd.py                  # ~49 min, 1 shared core, 2026-12-06
    OMP_NUM_THREADS=1 python benchmarks/bench_mad_opd.py --quick          # smoke test, < 1 min, no RESULTS.md
    OMP_NUM_THREADS=1 python benchmarks/bench_mad_opd.py --no-record      # the full run; RESULTS.md untouched
    OMP_NUM_THREADS=1 python benchmarks/bench_mad_opd.py --opad-log FILE  # also quote bench_opad.py's output

Everything is built here, nothing is downloaded; teachers and runs are cached under
``runs/bench_mad_opd/`` (delete it, or change a setting, to recompute).

1. Task: the quickstart's reversed 1-3 digit addition (``AdditionTask(max_digits=3,
   reverse_answer=True)``), each row tagged with a ``domain`` by the rule of
   configs/mad_opd/addition_domains.jsonl: ``three_digit`` when an operand has 3 digits, else
   ``short``. OPD prompts: 20000 rows (TaskPrompts seed 4, as configs/quickstart.yaml) in a
   ``ListPrompts`` that carries the field (for ``routed``); validation: the quickstart's 512 prompts
   (seed 2), reported overall and per half.
2. Teachers: two models of the quickstart teacher's architecture (configs/models/addition-teacher:
   Qwen3 layout, 4 layers, h128), trained from random init by SFT (SFTModule, AdamW lr 3e-3, warmup
   + cosine, batch 64, ``--teacher-steps``: 2000 for short, 4000 for the harder three_digit half,
   which reached only 0.79 on its half after 2000) on ONE half each (teacher ``short`` on short rows only,
   teacher ``three_digit`` on three_digit rows only; rows from TaskPrompts seed 1), so each is
   strong on its half and weak on the other. Saved to runs/bench_mad_opd/teachers/<name>.
3. Student: lit_opd/assets/addition/student (3 layers, h96, the quickstart's warm start).
4. Arms, all ``MADOPDModule`` with the same loss (forward KL = JSD β 0 as configs/quickstart.yaml,
   ``seq_mean``), AdamW lr 2e-3, batch 64, on-policy samples at temperature 1, 6 new tokens,
   ``--steps`` steps, seeds 0, 1, 2 (seed_everything, data order, rollout draws, debate draws):
   ``single_short`` / ``single_three_digit`` (one teacher: mode routed with both domains routed to
   it, so it runs the same loss code as the others), ``routed`` (each row scored by its
   domain's expert: the oracle router), ``fixed`` (0.5 / 0.5), ``debate`` (rounds 1, as
   configs/mad_opd/debate.yaml: each teacher answers the bare question at temperature 0.7; these
   tiny models emit no ``<<CONFIDENCE=N>>`` tags, so ``confidence: logprob``,
   c_k = 100·exp(mean log-prob of teacher k's own answer), w = softmax(c / 100); each teacher scores
   the student after the bare question, since they cannot read a transcript); ``debate_sharp``
   (the same debate with ``confidence_temperature`` τ = ``--sharp-temperature``, default 0.05:
   w = softmax(c / 100 / τ); at τ = 1 two teachers can never get weights beyond 0.73 / 0.27).
5. Reported: greedy exact-match accuracy before/after per arm, seed and half; wall time of each
   run's fit; the debate's mean weights per half (does the right expert get more weight where it
   is strong?), for both debate arms. ``madopd_vs_best_single`` (``madopd_sharp_vs_best_single``,
   ``routed_vs_best_single``) = the mean over seeds of the paired difference debate at τ = 1
   (debate_sharp, routed) − best single arm in overall accuracy, "best single" being the
   single-teacher arm with the higher mean over seeds.

Writes benchmarks/mad_opd.png and (full run only, unless ``--no-record``) writes its dated section into
benchmarks/RESULTS.md: it replaces this benchmark's earlier section (found by its heading) in place, or
appends one if there is none. Ends with ``RESULT madopd_sharp_vs_best_single <gain>``,
``RESULT madopd_vs_best_single <gain>`` and ``RESULT routed_vs_best_single <gain>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import add_record_options, arg_parser, pyplot, record, result_line, save_student, trainer  # noqa: E402

from lit_opd import HFTeacher, ListPrompts, RolloutDataModule, SamplingParams, SFTModule  # noqa: E402
from lit_opd.methods.mad_opd import MADOPDModule  # noqa: E402
from lit_opd.methods.mad_opd.debate import DebatePrompts, DebateSettings  # noqa: E402
from lit_opd.models import ModelSpec  # noqa: E402
from lit_opd.objectives import Divergence  # noqa: E402
from lit_opd.schedules import WarmupCosine  # noqa: E402
from lit_opd.tasks import AdditionTask  # noqa: E402

STUDENT = "lit_opd/assets/addition/student"
TEACHER_ARCH = "configs/models/addition-teacher"
HALVES = ("short", "three_digit")
ARMS = ("single_short", "single_three_digit", "routed", "fixed", "debate", "debate_sharp")
DEBATE_ARMS = ("debate", "debate_sharp")
HEADING = "## MAD-OPD: single teachers vs routed / fixed / debate"  # this benchmark's RESULTS.md section
TRAIN_SEED, VAL_SEED, TEACHER_DATA_SEED = 4, 2, 1  # TaskPrompts seeds (as the quickstart configs)
TASK = AdditionTask(max_digits=3, reverse_answer=True)
# configs/mad_opd/debate.yaml's texts: the tiny teachers know only "a+b=" -> reversed sum.
DEBATE = DebateSettings(
    rounds=1, max_new_tokens=6, temperature=0.7, confidence="logprob", confidence_temperature=1.0,
    prompts=DebatePrompts(first_round="{prompt}{confidence}",
                          next_round="{transcript}\n{expert}:{prompt}{confidence}", force_decode="{prompt}",
                          entry="{expert}{round}:{answer}", start="", end=""),
)


def domain(row: dict) -> str:
    """configs/mad_opd/addition_domains.jsonl's rule: three_digit when an operand has 3 digits."""
    a, b = row["prompt"].rstrip("=").split("+")
    return "three_digit" if max(len(a), len(b)) == 3 else "short"


def rows(num_rows: int, seed: int) -> list[dict]:
    return [dict(r, domain=domain(r)) for r in TASK.make_rows(num_rows, seed)]


def datamodule(train: list[dict], val: list[dict], seed: int, tokenizer: str | None = None
               ) -> RolloutDataModule:
    """The prompts, 64 a step at temperature 1; ``tokenizer`` (a path) lets it encode them before a fit."""
    return RolloutDataModule(ListPrompts(train), val_source=ListPrompts(val), batch_size=64,
                             val_batch_size=256, sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
                             seed=seed, tokenizer=tokenizer)


def accuracy(module, dm: RolloutDataModule) -> dict[str, float]:  # noqa: ANN001
    """Greedy accuracy of ``module.policy`` overall and per half on the validation rows."""
    out, total = {}, 0.0
    for half in HALVES:
        part = [r for r in dm.val_rows if r["row"]["domain"] == half]
        correct, count = dm.greedy_correct(part, module)
        out[half], total = correct / count, total + correct
    out["overall"] = total / len(dm.val_rows)
    return out


# ----- teachers ----------------------------------------------------------------------------------
def teacher(name: str, args: argparse.Namespace, val: list[dict]) -> dict:
    """Train (or load) the expert on half ``name``; its per-half greedy accuracy."""
    out = args.out_dir / "teachers" / name
    steps = args.teacher_steps[HALVES.index(name)]
    meta_path, key = out / "bench_meta.json", {"half": name, "steps": steps,
                                                "rows": args.teacher_rows, "val_rows": args.val_rows}
    if meta_path.exists() and json.loads(meta_path.read_text())["key"] == key:
        return json.loads(meta_path.read_text())
    L.seed_everything(0, verbose=False)
    train = [r for r in rows(args.teacher_rows, TEACHER_DATA_SEED) if r["domain"] == name]
    dm = datamodule(train, val, seed=0)
    module = SFTModule(ModelSpec(path=TEACHER_ARCH, random_init=True),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
                       scheduler=lambda o: WarmupCosine(o, total_steps=steps,
                                                        warmup_steps=min(100, steps // 10), min_ratio=0.05))
    started = time.perf_counter()
    trainer(steps).fit(module, dm)
    seconds = time.perf_counter() - started
    module.student.eval()
    meta = {"key": key, "train_rows": len(train), "seconds": seconds, "accuracy": accuracy(module, dm)}
    save_student(module, out)
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


# ----- arms --------------------------------------------------------------------------------------
class WeightProbe(MADOPDModule):
    """MADOPDModule that also keeps each step's per-row weights by domain (debate diagnostics)."""

    def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*a, **kw)
        self.weight_sums = {h: [0.0] * len(self.group.names) for h in HALVES}
        self.weight_rows = dict.fromkeys(HALVES, 0)

    def judge(self, batch):  # noqa: ANN001, ANN201
        judged = super().judge(batch)
        for b, row in enumerate(batch.rows):
            w = judged.weights_BK[b]
            w = (w / w.sum()).tolist()
            sums = self.weight_sums[row["domain"]]
            for k, value in enumerate(w):
                sums[k] += value
            self.weight_rows[row["domain"]] += 1
        return judged


def arm_settings(arm: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """(the arm's experts, its MADOPDModule settings)."""
    experts = {h: HFTeacher(str(args.out_dir / "teachers" / h), name=h) for h in HALVES}
    if arm.startswith("single_"):  # one teacher: routed with every domain routed to it (the same loss path)
        name = arm.removeprefix("single_")
        return {name: experts[name]}, {"mode": "routed", "route_field": "domain",
                                       "routes": dict.fromkeys(HALVES, name)}
    if arm == "routed":
        return experts, {"mode": "routed", "route_field": "domain"}  # the domain's value is its expert's name
    if arm == "fixed":
        return experts, {"mode": "fixed", "weights": {h: 0.5 for h in HALVES}}
    if arm == "debate":
        return experts, {"mode": "debate", "debate": DEBATE}
    if arm == "debate_sharp":
        return experts, {"mode": "debate",
                         "debate": dataclasses.replace(DEBATE, confidence_temperature=args.sharp_temperature)}
    raise ValueError(f"unknown arm {arm!r}")


def run_arm(arm: str, seed: int, args: argparse.Namespace, train: list[dict], val: list[dict]) -> dict:
    path = args.out_dir / "runs" / f"{arm}_seed{seed}.json"
    key = {"arm": arm, "seed": seed, "steps": args.steps, "teacher_steps": args.teacher_steps,
           "teacher_rows": args.teacher_rows, "val_rows": args.val_rows, "train_rows": len(train)}
    if arm == "debate_sharp":  # only this arm's key carries τ, so the other arms' caches stay valid
        key["confidence_temperature"] = args.sharp_temperature
    if path.exists() and json.loads(path.read_text())["key"] == key:
        return json.loads(path.read_text())
    L.seed_everything(seed, verbose=False)
    experts, kwargs = arm_settings(arm, args)
    module = WeightProbe(STUDENT, experts, objective=Divergence(kind="jsd", beta=0.0, reduction="seq_mean"),
                         seed=seed, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0),
                         **kwargs)
    dm = datamodule(train, val, seed=seed, tokenizer=STUDENT)  # the student's tokenizer, as the module's
    dm.setup("fit")  # the prompts, for the accuracy before training
    before = accuracy(module, dm)
    started = time.perf_counter()
    trainer(args.steps).fit(module, dm)
    seconds = time.perf_counter() - started
    result = {"key": key, "arm": arm, "seed": seed, "before": before, "after": accuracy(module, dm),
              "seconds": seconds}
    if arm in DEBATE_ARMS:
        result["weights"] = {h: dict(zip(module.group.names, [s / max(module.weight_rows[h], 1)
                                                              for s in module.weight_sums[h]]))
                             for h in HALVES}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


# ----- report ------------------------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def gains(results: dict, arm: str, best: str) -> list[float]:
    """Paired per-seed overall-accuracy differences arm − best."""
    overall = {a: [results[a][s]["after"]["overall"] for s in sorted(results[arm])] for a in (arm, best)}
    return [x - y for x, y in zip(overall[arm], overall[best])]


def plot(results: dict, seeds: list[int], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), sharey=True)
    for ax, part in zip(axes, ("overall", *HALVES)):
        before = mean([results[a][s]["before"][part] for a in ARMS for s in seeds])
        for i, arm in enumerate(ARMS):
            vals = [results[arm][s]["after"][part] for s in seeds]
            ax.bar(i, mean(vals), color=f"C{i}", alpha=0.7)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.axhline(before, color="grey", ls="--", lw=1, label="student before")
        ax.set_xticks(range(len(ARMS)), [a.replace("_", "\n", 1) for a in ARMS], fontsize=8)
        ax.set_title(f"{part} ({'all' if part == 'overall' else part} val prompts)", fontsize=9)
    axes[0].set_ylabel("greedy exact match after OPD")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"MAD-OPD arms on reversed 1-3 digit addition, two half-experts; bars = mean of seeds "
                 f"{seeds}, dots = seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict, teachers: dict, seeds: list[int], args: argparse.Namespace, best: str,
           opad: list[str], total: float) -> str:
    lines = setup_lines(teachers, seeds, args) + arm_lines(results, seeds, args, best)
    if opad:
        lines += ["", "OPAD per-turn greedy accuracy, `OMP_NUM_THREADS=1 python benchmarks/bench_opad.py` "
                  "run right after this benchmark (one seed; setup in its docstring):", "", *opad]
    if args.notes:
        lines += ["", args.notes.read_text().strip()]
    fits = sum(results[a][s]["seconds"] for a in ARMS for s in seeds)
    lines += ["", f"Time (one core, fits only, from the cached runs): teachers "
              f"{sum(t['seconds'] for t in teachers.values()) / 60:.1f} min, arms {fits / 60:.1f} min; this "
              f"invocation {total / 60:.1f} min.", "", "```", *result_lines(results, best), "```", ""]
    return "\n".join(lines)


def setup_lines(teachers: dict, seeds: list[int], args: argparse.Namespace) -> list[str]:
    """The section's heading, its setup paragraph and the teachers' table."""
    day = datetime.date.today().isoformat()
    n_half = {h: sum(r["domain"] == h for r in rows(args.val_rows, VAL_SEED)) for h in HALVES}
    lines = [f"{HEADING} — {day} — 1 CPU thread", "",
             "`OMP_NUM_THREADS=1 python benchmarks/bench_mad_opd.py` (method: "
             "lit_opd/methods/mad_opd/README.md). Reversed 1-3 digit addition split by domain "
             "(`three_digit`: an operand has 3 digits; else `short`); val = the quickstart's "
             f"{args.val_rows} prompts ({n_half['short']} short, {n_half['three_digit']} three_digit). Two "
             "experts of the quickstart teacher's architecture trained by SFT from scratch on ONE half "
             f"each ({args.teacher_steps[0]} / {args.teacher_steps[1]} steps); student "
             "lit_opd/assets/addition/student; every arm MADOPDModule, forward KL (JSD β 0), seq_mean, "
             f"AdamW lr 2e-3, batch 64, {args.steps} steps, seeds {seeds}. debate: rounds 1, confidence "
             "`logprob` (c_k = 100·exp(mean log-prob of the teacher's own sampled answer), w = "
             "softmax(c/100)), scoring after the bare prompt; debate_sharp: the same with "
             f"`confidence_temperature` τ = {args.sharp_temperature:g} (w = softmax(c/100/τ)). "
             f"Plot: `mad_opd.png`.", "",
             "Teachers (greedy accuracy):", "",
             "| teacher | trained on | short | three_digit | overall | SFT time |",
             "|---|---|---|---|---|---|"]
    for h in HALVES:
        a = teachers[h]["accuracy"]
        lines.append(f"| `{h}` | {teachers[h]['train_rows']} {h} rows | {a['short']:.3f} "
                     f"| {a['three_digit']:.3f} | {a['overall']:.3f} | {teachers[h]['seconds']:.0f} s |")
    return lines


def arm_lines(results: dict, seeds: list[int], args: argparse.Namespace, best: str) -> list[str]:
    """The arms' table, the paired gains over the best single teacher and the debate weights."""
    lines = ["", "Student, greedy accuracy before → after (per seed; mean):", "",
              "| arm | overall | short | three_digit | wall s / run |", "|---|---|---|---|---|"]
    for arm in ARMS:
        cells = []
        for part in ("overall", *HALVES):
            per = [results[arm][s]["after"][part] for s in seeds]
            b = mean([results[arm][s]["before"][part] for s in seeds])
            cells.append(f"{b:.3f} → **{mean(per):.3f}** ({' / '.join(f'{v:.3f}' for v in per)})")
        secs = mean([results[arm][s]["seconds"] for s in seeds])
        lines.append(f"| {arm} | {' | '.join(cells)} | {secs:.0f} |")
    lines += ["", f"Best single teacher by mean overall accuracy: `{best}`. Paired per-seed gains in overall "
              "accuracy:", ""]
    for arm in ("routed", "fixed", *DEBATE_ARMS):
        g = gains(results, arm, best)
        lines.append(f"- {arm} − {best}: {' / '.join(f'{x:+.3f}' for x in g)} (mean {mean(g):+.3f})")
    lines += ["", "Debate weights (mean normalised w over training rows, all seeds):", "",
              "| arm | τ | rows | w(`short`) | w(`three_digit`) |", "|---|---|---|---|---|"]
    for arm, tau in zip(DEBATE_ARMS, (DEBATE.confidence_temperature, args.sharp_temperature)):
        for h in HALVES:
            ws = [results[arm][s]["weights"][h] for s in seeds]
            lines.append(f"| {arm} | {tau:g} | {h} | {mean([w['short'] for w in ws]):.3f} "
                         f"| {mean([w['three_digit'] for w in ws]):.3f} |")
    return lines


def result_lines(results: dict, best: str) -> list[str]:
    return [result_line("madopd_sharp_vs_best_single", mean(gains(results, "debate_sharp", best))),
            result_line("madopd_vs_best_single", mean(gains(results, "debate", best))),
            result_line("routed_vs_best_single", mean(gains(results, "routed", best)))]


def parse_args() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed, a few steps, tiny sets; no RESULTS.md")
    parser.add_argument("--steps", type=int, default=500, help="OPD steps per arm")
    parser.add_argument("--teacher-steps", type=int, nargs=2, default=[2000, 4000],
                        help="SFT steps of the short and the three_digit expert (the harder half gets more)")
    parser.add_argument("--teacher-rows", type=int, default=100000, help="rows drawn before the split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sharp-temperature", type=float, default=0.05,
                        help="confidence_temperature of the debate_sharp arm (debate keeps the paper's 1)")
    parser.add_argument("--val-rows", type=int, default=512)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench_mad_opd")
    parser.add_argument("--opad-log", type=Path, help="bench_opad.py's output: its RESULT lines are quoted")
    parser.add_argument("--notes", type=Path, help="a hand-written Markdown reading, appended to the section")
    add_record_options(parser)
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "mad_opd.png")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.teacher_steps, args.teacher_rows = 4, [10, 10], 2000
        args.seeds, args.val_rows = [0], 64
        args.out_dir, args.no_record = args.out_dir / "quick", True
        args.plot = args.out_dir / "mad_opd.png"
    return args


def opad_quote(log: Path | None) -> list[str]:
    """bench_opad.py's Markdown table and RESULT lines (in a code block), from its output."""
    if log is None:
        return []
    text = log.read_text()
    return [*re.findall(r"^\|.*\|$", text, flags=re.M), "", "```",
            *re.findall(r"^RESULT opad_turn_accuracy .*$", text, flags=re.M), "```"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    os.chdir(ROOT)
    start = time.perf_counter()
    train, val = rows(20000, TRAIN_SEED), rows(args.val_rows, VAL_SEED)
    teachers = {h: teacher(h, args, val) for h in HALVES}
    for h, meta in teachers.items():
        print(f"teacher {h}: {meta['accuracy']} ({meta['seconds']:.0f} s)", flush=True)
    results: dict = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            r = run_arm(arm, seed, args, train, val)
            results[arm][seed] = r
            print(f"{arm} seed {seed}: {r['before']['overall']:.3f} -> {r['after']['overall']:.3f} "
                  f"(short {r['after']['short']:.3f}, three_digit {r['after']['three_digit']:.3f}) "
                  f"{r['seconds']:.0f} s", flush=True)
    best = max(("single_short", "single_three_digit"),
               key=lambda a: mean([results[a][s]["after"]["overall"] for s in args.seeds]))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.seeds, args.plot)
    section = render(results, teachers, args.seeds, args, best, opad_quote(args.opad_log),
                     time.perf_counter() - start)
    print("\n" + section)
    record(args, section)
    for line in result_lines(results, best):
        print(line)


if __name__ == "__main__":
    main()
