"""EffOPD benchmark: plain OPD against OPD + EffOPDCallback on the quickstart task (issue 4).

    python benchmarks/bench_effopd.py                  # 3 seeds x 600 steps, ~11 min on 2 CPU cores
    python benchmarks/bench_effopd.py --quick          # smoke test, ~1 min, writes nothing to RESULTS.md
    python benchmarks/bench_effopd.py --report-only    # re-render table/plot/section from saved runs

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

``--notes FILE`` appends a hand-written Markdown analysis to the section in the same write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_opd import Divergence, HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts  # noqa: E402
from lit_opd.callbacks import EffOPDCallback, UpdateDynamicsCallback  # noqa: E402
from lit_opd.methods.eff_opd.callback import (  # noqa: E402
    held_out_rollouts, loss_score, policy_of, select_parameters,
)
from lit_opd.tasks import AdditionTask  # noqa: E402

STUDENT = "lit_opd/assets/addition/student"
TEACHER = "lit_opd/assets/addition/teacher"
TRAIN_SEED, VAL_SEED, SCORE_SEED = 4, 2, 3  # TaskPrompts seeds: training, reported val, EffOPD score set
ARMS = ("plain", "effopd")
# the regime sweep's variants: EffOPD scored by the loss, and EffOPD moving every parameter
WORKER_ARMS = ARMS + ("effopd_loss", "effopd_all")


# ----- one run (a worker process) ----------------------------------------------------------------
def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    task = AdditionTask(max_digits=3, reverse_answer=True)
    L.seed_everything(seed, verbose=False)
    module = OPDModule(
        args.student, HFTeacher(TEACHER), objective=Divergence(kind="jsd", beta=0.0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0),
    )
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    data = RolloutDataModule(
        TaskPrompts(task, num_rows=20000, seed=TRAIN_SEED),
        val_source=TaskPrompts(task, num_rows=args.val_rows, seed=VAL_SEED),
        batch_size=64, val_batch_size=256, sampling=sampling, seed=seed,
    )
    # EffOPD's own held-out prompts: a second DataModule used only for its evaluate().
    score_source = TaskPrompts(task, num_rows=args.score_rows, seed=SCORE_SEED)
    score_data = RolloutDataModule(score_source, val_source=score_source, batch_size=64, val_batch_size=256,
                                   sampling=sampling, seed=seed)
    score_data.tokenizer = module.tokenizer
    score_data.setup("fit")

    def score_fn(trainer, pl_module) -> float:  # noqa: ANN001
        return score_data.evaluate(pl_module)["accuracy"]

    clock = Clock()
    pow2 = [2**k for k in range(0, 31) if 2**k <= args.steps]
    recorder = Recorder(clock, args.eval_every, args.steps, pow2, "post")
    dynamics = TimedDynamics(clock, every_n_steps=args.dyn_every, reference_step=args.ref_step)
    callbacks: list = [dynamics]
    effopd, windows = None, scan_windows(pow2)
    snapshots = Snapshots(clock, {step for window in windows for step in window})
    if arm == "plain":
        callbacks.append(snapshots)
    if arm.startswith("effopd"):
        if arm == "effopd_loss":
            score_fn = HeldOutLoss(score_data)
            callbacks.append(score_fn)
        include = {"include": ("",)} if arm == "effopd_all" else {}  # "" is in every parameter name
        effopd = EffOPDCallback(schedule="pow2", num_trials=5, initial_factor=2.0, score_fn=score_fn, seed=0,
                                **include)
        callbacks += [Recorder(clock, None, args.steps, pow2, "pre"), effopd]
    callbacks.append(recorder)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, default_root_dir=str(args.out_dir),
    )
    started = time.perf_counter()
    trainer.fit(module, data)
    total = time.perf_counter() - started
    points = sorted(recorder.points + [p for c in callbacks if isinstance(c, Recorder) and c is not recorder
                                       for p in c.points], key=lambda p: (p["step"], p["kind"] != "pre"))
    result = {
        "arm": arm, "seed": seed, "steps": args.steps, "eval_every": args.eval_every, "lr": args.lr, "student": str(args.student),
        "val_rows": args.val_rows, "score_rows": args.score_rows, "points": points,
        "process_seconds": total, "excluded_seconds": clock.excluded_wall,
        "dynamics_history": dynamics.history, "dynamics_final": dynamics.summary(),
        "effopd_history": effopd.history if effopd is not None else [],
    }
    if arm == "plain":
        result["rank1"] = rank1_probe(module, data, dynamics)
        result["line_scan"] = line_scan(module, data, snapshots.saved, windows)
    return result


class HeldOutLoss(L.Callback):
    """EffOPD's ``score="loss"`` (minus the method's loss, higher is better) on EffOPD's own score
    prompts, sampled once by the student when training starts, as the callback's loss cache does.
    The callback's built-in loss score reads the DataModule's validation prompts, which here are
    the reported set; this keeps the search off them."""

    def __init__(self, score_data: RolloutDataModule) -> None:
        self.score_data, self.batches = score_data, []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.batches = held_out_rollouts(self.score_data, pl_module, seed=0)

    def __call__(self, trainer, pl_module) -> float:  # noqa: ANN001
        return loss_score(pl_module, self.batches)


SCAN_MULTIPLIERS = (0.0, 0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)


def scan_windows(pow2: list[int]) -> list[tuple[int, int]]:
    """(anchor, end) step pairs of the line scan: the windows EffOPD's searches see when nothing is
    kept (s/2 -> s for pow2 s >= 32), and two short ones ending at the last pow2 step."""
    last = pow2[-1]
    windows = [(s // 2, s) for s in pow2 if s >= 32] + [(last - 16, last), (last - 1, last)]
    return sorted({w for w in windows if 0 <= w[0] < w[1]})


class Snapshots(L.Callback):
    """The plain run's student parameters after the given optimizer steps."""

    def __init__(self, clock: Clock, steps: set[int]) -> None:
        self.clock, self.steps, self.saved = clock, steps, {}

    def _save(self, step: int, pl_module) -> None:  # noqa: ANN001
        with self.clock.excluded():
            self.saved[step] = {n: p.detach().clone() for n, p in policy_of(pl_module).named_parameters()}

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.clock.start()
        if 0 in self.steps:
            self._save(0, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step in self.steps:
            self._save(trainer.global_step, pl_module)


@torch.no_grad()
def line_scan(module, data, saved: dict, windows: list[tuple[int, int]]) -> list[dict]:  # noqa: ANN001
    """Reported-set accuracy at θ_a + m (θ_b − θ_a) on the plain run's trajectory for each window
    (a, b) and m in SCAN_MULTIPLIERS, on EffOPD's parameter set (attention + MLP); the other
    parameters are set to their step-b values (so m = 1 is the step-b student; m = 3 is EffOPD's
    first trial). The run's final weights are restored afterwards."""
    policy = policy_of(module)
    moved = {n for n, _ in select_parameters(policy)}
    params = dict(policy.named_parameters())
    final = {n: p.detach().clone() for n, p in params.items()}
    out = []
    for a, b in windows:
        A, B = saved[a], saved[b]
        num = sum(float((B[n] - A[n]).norm() ** 2) for n in moved) ** 0.5
        den = sum(float(B[n].norm() ** 2) for n in moved) ** 0.5
        accs = []
        for m in SCAN_MULTIPLIERS:
            for n, p in params.items():
                p.copy_(A[n] + m * (B[n] - A[n]) if n in moved else B[n])
            accs.append(data.evaluate(module)["accuracy"])
        out.append({"window": [a, b], "rel_norm": num / den, "acc": accs})
    for n, p in params.items():
        p.copy_(final[n])
    return out


class Clock:
    """Wall and process-CPU seconds since training started, minus the reporting/diagnostic time."""

    def __init__(self) -> None:
        self.t0 = self.c0 = None
        self.excluded_wall = self.excluded_cpu = 0.0

    def start(self) -> None:
        if self.t0 is None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def now(self) -> tuple[float, float]:
        return (time.perf_counter() - self.t0 - self.excluded_wall,
                time.process_time() - self.c0 - self.excluded_cpu)

    def excluded(self):  # noqa: ANN201 - a context manager
        clock = self

        class _Excluded:
            def __enter__(self) -> None:
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc) -> None:  # noqa: ANN002
                clock.excluded_wall += time.perf_counter() - self.w
                clock.excluded_cpu += time.process_time() - self.c

        return _Excluded()


class Recorder(L.Callback):
    """Reported validation accuracy at step 0, every ``every`` steps and the last step ("grid"), and
    at the pow2 steps ("post", or "pre" when placed before EffOPDCallback), time-stamped by the clock."""

    def __init__(self, clock: Clock, every: int | None, last: int, pow2: list[int], pow2_kind: str) -> None:
        self.clock, self.every, self.last, self.pow2, self.pow2_kind = clock, every, last, set(pow2), pow2_kind
        self.points: list[dict] = []

    def _record(self, trainer, pl_module, kind: str) -> None:  # noqa: ANN001
        wall, cpu = self.clock.now()
        with self.clock.excluded():
            acc = trainer.datamodule.evaluate(pl_module)["accuracy"]
        self.points.append({"step": trainer.global_step, "kind": kind, "acc": acc, "wall": wall, "cpu": cpu})

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.clock.start()
        if self.every is not None:
            self._record(trainer, pl_module, "grid")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if self.every is not None and (step % self.every == 0 or step == self.last):
            self._record(trainer, pl_module, "grid")
        elif step in self.pow2:
            self._record(trainer, pl_module, self.pow2_kind)


class TimedDynamics(UpdateDynamicsCallback):
    """UpdateDynamicsCallback whose SVDs are left out of the benchmark's clock."""

    def __init__(self, clock: Clock, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.clock = clock

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.clock.start()
        with self.clock.excluded():
            super().on_train_start(trainer, pl_module)

    def measure(self, trainer, pl_module):  # noqa: ANN001, ANN201
        with self.clock.excluded():
            return super().measure(trainer, pl_module)


def rank1_probe(module, data, dynamics) -> dict:  # noqa: ANN001
    """Accuracy of the final student with every tracked matrix replaced by W0 + f(dW) (the other
    parameters, embeddings and norms, keep their trained values); f = identity, rank-1 dW rescaled
    to ||dW||_F (the official probe), plain rank-1 dW, and 0 (only the untracked parameters trained)."""
    params = dict(dynamics.tracked(policy_of(module)))
    final = {n: p.detach().clone() for n, p in params.items()}
    w0 = {n: dynamics.w0[n[: -len(".weight")] if n.endswith(".weight") else n] for n in params}

    def rank1(delta: torch.Tensor, rescale: bool) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        d1 = S[0] * torch.outer(U[:, 0], Vh[0])
        return d1 * (delta.norm() / d1.norm().clamp_min(1e-30)) if rescale else d1

    variants = {
        "full": lambda d: d,
        "rank1_rescaled": lambda d: rank1(d, True),
        "rank1": lambda d: rank1(d, False),
        "zero": lambda d: torch.zeros_like(d),
    }
    out = {}
    with torch.no_grad():
        for name, f in variants.items():
            for n, p in params.items():
                p.copy_(w0[n] + f(final[n].float() - w0[n]))
            out[name] = data.evaluate(module)["accuracy"]
        for n, p in params.items():
            p.copy_(final[n])
    return out


# ----- the parent: run the pairs, then report ------------------------------------------------------
def launch(arm: str, seed: int, args: argparse.Namespace) -> tuple[subprocess.Popen, Path]:
    path = args.out_dir / f"{arm}_seed{seed}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--worker", arm, "--seeds", str(seed), "--steps", str(args.steps),
           "--eval-every", str(args.eval_every), "--val-rows", str(args.val_rows),
           "--score-rows", str(args.score_rows), "--dyn-every", str(args.dyn_every),
           "--ref-step", str(args.ref_step), "--lr", str(args.lr), "--student", str(args.student), "--out-dir", str(args.out_dir)]
    log = open(args.out_dir / f"{arm}_seed{seed}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), path


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def grid(run: dict) -> list[dict]:
    return [p for p in run["points"] if p["kind"] == "grid"]


def first_at_least(points: list[dict], accuracy: float) -> dict:
    """The first grid point after step 0 with at least ``accuracy`` (the last point if none)."""
    return next((p for p in points if p["acc"] >= accuracy and p["step"] > 0), points[-1])


def compare(plain: dict, eff: dict) -> dict:
    """Speed-up of one seed (see the module docstring): both runs' first eval point at the lower of
    their final accuracies; ``reached``: EffOPD ended at or above plain OPD's final accuracy."""
    pg, eg = grid(plain), grid(eff)
    common = min(pg[-1]["acc"], eg[-1]["acc"])
    p_hit, e_hit = first_at_least(pg, common), first_at_least(eg, common)
    return {
        "seed": plain["seed"], "target": pg[-1]["acc"], "eff_final": eg[-1]["acc"], "common": common,
        "reached": eg[-1]["acc"] >= pg[-1]["acc"], "plain_first": p_hit["step"], "eff_step": e_hit["step"],
        "plain_wall": pg[-1]["wall"], "eff_wall": eg[-1]["wall"], "speedup": p_hit["step"] / e_hit["step"],
        "wall_speedup": p_hit["wall"] / e_hit["wall"], "cpu_speedup": p_hit["cpu"] / e_hit["cpu"],
    }


def displacement(run: dict, step: int) -> float:
    """Median over modules of ||W - W0|| / ||W0|| at ``step`` (nan if not measured there)."""
    values = [h["rel_update_norm"] for h in run["dynamics_history"] if h["step"] == step]
    return statistics.median(values) if values else math.nan


def dynamics_picture(runs: list[dict]) -> dict:
    """Per module, the median over seeds of the final rel_update_norm / top1_energy / u1_cos."""
    by_module: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for module, stats in run["dynamics_final"].items():
            for key in ("rel_update_norm", "top1_energy", "u1_cos"):
                by_module.setdefault(module, {}).setdefault(key, []).append(stats[key])
    return {m: {k: statistics.median(v) for k, v in d.items()} for m, d in by_module.items()}


def short(module: str) -> str:
    return module.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def plot(pairs: list[tuple[dict, dict]], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.suptitle("Quickstart (reversed 1-3 digit addition): plain OPD (dashed) vs OPD + EffOPD (solid), same seed "
                 "per colour. Dotted: plain OPD's final accuracy; circle: EffOPD first reaches it; "
                 "x: a search kept an extrapolation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(pairs: list[tuple[dict, dict]], rows: list[dict], args: argparse.Namespace, meta: dict) -> str:
    steps = args.steps
    reached = [r["reached"] for r in rows]
    med = statistics.median(r["speedup"] for r in rows)
    med_wall = statistics.median(r["wall_speedup"] for r in rows)
    med_cpu = statistics.median(r["cpu_speedup"] for r in rows)
    final_delta = [r["eff_final"] - r["target"] for r in rows]
    lower = sum(d < 0 for d in final_delta)
    lines = [
        f"## EffOPD: plain OPD against OPD + EffOPD — {meta['date']} — 2-core CPU (this project's dev machine)",
        "",
        f"`{meta['command']}` (runtime {meta['runtime']}; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end): the quickstart task and models (`configs/quickstart.yaml`: "
        "reversed 1-3 digit addition, forward KL, AdamW lr 2e-3, 64 prompts a step), "
        f"{steps} steps per run; plain OPD and OPD + `EffOPDCallback` (pow2 schedule, 5 trials, "
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
        lines.append(
            f"| {r['seed']} | {r['target']:.3f} | {r['eff_final']:.3f} | {r['plain_first']} / {r['eff_step']} | "
            f"{r['common']:.3f} | {mark}{r['speedup']:.2f}× | {mark}{r['wall_speedup']:.2f}× | "
            f"{mark}{r['cpu_speedup']:.2f}× | {r['plain_wall']:.0f} / {r['eff_wall']:.0f} |"
        )
    lines += [
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
            parts.append(f"{s}: ×{h['multiplier']:g}, {h['initial_score']:.3f}→{h['best_score']:.3f}{transfer}")
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
    lines.append("")
    # diagnostics
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
            f"- Update dynamics, {'plain OPD' if arm == 'plain' else 'OPD + EffOPD'} at step {steps} "
            f"(ΔW = W − W0, median over seeds): largest ‖ΔW‖/‖W0‖ "
            + ", ".join(f"{short(m)} {v['rel_update_norm']:.3f}" for m, v in top)
            + f"; by kind {kind_txt}. Top-1 energy σ₁²/Σσ² of ΔW: median {statistics.median(energies):.2f} "
            f"(range {min(energies):.2f}–{max(energies):.2f}; a Gaussian random matrix of these shapes has 0.02–0.04)"
            + (f"; |cos(u₁, u₁ at step {args.ref_step})| median {statistics.median(cosines):.2f}." if cosines else ".")
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
    scans = [pair[0].get("line_scan") for pair in pairs]
    if all(scans):
        lines += [
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
    lines += ["", "![EffOPD vs plain OPD: accuracy against step and wall time](effopd.png)", ""]
    return "\n".join(lines)


def report(args: argparse.Namespace, meta: dict) -> float:
    pairs = []
    for seed in args.seed_list:
        pair = tuple(json.loads((args.out_dir / f"{arm}_seed{seed}.json").read_text()) for arm in ARMS)
        pairs.append(pair)
    rows = [compare(p, e) for p, e in pairs]
    plot(pairs, rows, args.plot)
    section = render(pairs, rows, args, meta)
    if args.notes is not None:  # hand-written analysis, appended in the same write as the section
        section += "\n" + args.notes.read_text().strip() + "\n"
    print(section)
    if args.append:
        text = args.results.read_text() if args.results.exists() else ""  # re-read right before writing
        with open(args.results, "a") as fh:
            fh.write(("" if text.endswith("\n\n") or not text else "\n" if text.endswith("\n") else "\n\n")
                     + section)
        print(f"appended to {args.results}; plot {args.plot}")
    return statistics.median(r["speedup"] for r in rows)


def score_overlap(args: argparse.Namespace) -> int:
    task = AdditionTask(max_digits=3, reverse_answer=True)
    val = {r["prompt"] for r in task.make_rows(args.val_rows, VAL_SEED)}
    return sum(r["prompt"] in val for r in task.make_rows(args.score_rows, SCORE_SEED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "bench_effopd")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=None, help="default benchmarks/effopd.png")
    parser.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the section")
    parser.add_argument("--worker", choices=WORKER_ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.val_rows, args.score_rows = "0", 40, 10, 128, 128
        args.dyn_every, args.ref_step, args.no_append = 20, 10, True
        args.out_dir = args.out_dir.with_name(args.out_dir.name + "_quick")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.plot is None:
        args.plot = args.out_dir / "effopd.png" if args.quick else ROOT / "benchmarks" / "effopd.png"
    args.append = not args.no_append

    if args.worker:
        result = run_arm(args.worker, args.seed_list[0], args)
        (args.out_dir / f"{args.worker}_seed{args.seed_list[0]}.json").write_text(json.dumps(result))
        return

    started, load_start = time.perf_counter(), load_avg()
    if not args.report_only:
        for seed in args.seed_list:  # the pair of one seed side by side: 2 processes, 1 thread each
            t = time.perf_counter()
            procs = [launch(arm, seed, args) for arm in ARMS]
            for (proc, _), arm in zip(procs, ARMS):
                if proc.wait() != 0:
                    sys.exit(f"{arm} seed {seed} failed; see {args.out_dir / f'{arm}_seed{seed}.log'}")
            print(f"seed {seed}: both runs done in {time.perf_counter() - t:.0f} s", flush=True)
    runtime = time.perf_counter() - started
    cmd = "python benchmarks/bench_effopd.py" + ("" if args.seeds == "0,1,2" or args.quick else f" --seeds {args.seeds}") \
        + ("" if args.steps == 600 or args.quick else f" --steps {args.steps}") + (" --quick" if args.quick else "")
    meta = {
        "date": "2026-11-26", "command": cmd, "load_start": load_start, "load_end": load_avg(),
        "runtime": f"{int(runtime // 60)} min {int(runtime % 60)} s" if not args.report_only else "see above",
        "overlap": score_overlap(args),
    }
    if args.report_only and (args.out_dir / "meta.json").exists():
        meta = {**json.loads((args.out_dir / "meta.json").read_text()), "command": cmd}
    elif not args.report_only:
        (args.out_dir / "meta.json").write_text(json.dumps(meta))
    speedup = report(args, meta)
    print(f"RESULT effopd_speedup {speedup:.2f}")


if __name__ == "__main__":
    main()
