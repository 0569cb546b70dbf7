"""The EffOPD benchmarks' runs (``bench_effopd.py``, ``bench_effopd_regimes.py``): one plain-OPD or
OPD + EffOPD training run as a worker process, its clock and probes, and the speed-up read off two
runs' curves. Both benchmarks import this module; neither imports the other.

    python benchmarks/effopd_runs.py ARM --seed S --out-dir DIR [settings]   # one run (``launch`` does this)

A worker writes ``DIR/ARM_seedS.json`` (its log: ``DIR/ARM_seedS.log``). Arms: ``plain`` (OPD),
``effopd`` (OPD + EffOPDCallback scored by greedy accuracy on its own held-out prompts),
``effopd_loss`` (scored by minus the loss on the student's rollouts of those prompts) and
``effopd_all`` (every parameter moves, not only attention and MLP). The settings, the clock and the
probes are described in bench_effopd.py's docstring.
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

STUDENT = "lit_opd/assets/addition/student"
TEACHER = "lit_opd/assets/addition/teacher"
TRAIN_SEED, VAL_SEED, SCORE_SEED = 4, 2, 3  # TaskPrompts seeds: training, reported val, EffOPD score set
ARMS = ("plain", "effopd")
# the regime sweep's variants: EffOPD scored by the loss, and EffOPD moving every parameter
WORKER_ARMS = ARMS + ("effopd_loss", "effopd_all")
SCAN_MULTIPLIERS = (0.0, 0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
WORKER_SETTINGS = ("steps", "eval_every", "val_rows", "score_rows", "dyn_every", "ref_step", "lr", "student")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import ROOT, trainer  # noqa: E402

from lit_opd import Divergence, HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts  # noqa: E402
from lit_opd.methods.eff_opd import EffOPDCallback, UpdateDynamicsCallback  # noqa: E402
from lit_opd.methods.eff_opd.held_out import held_out_rollouts, loss_score  # noqa: E402
from lit_opd.methods.eff_opd.parameters import policy_of, select_parameters  # noqa: E402
from lit_opd.tasks import AdditionTask  # noqa: E402


# ----- one run (a worker process) ----------------------------------------------------------------
def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    L.seed_everything(seed, verbose=False)
    module = OPDModule(
        args.student, HFTeacher(TEACHER), objective=Divergence(kind="jsd", beta=0.0),
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0),
    )
    data, score_data = datamodules(seed, args)
    pow2 = [2**k for k in range(0, 31) if 2**k <= args.steps]
    windows = scan_windows(pow2)
    probes = Probes(arm, args, pow2, windows, score_data)
    started = time.perf_counter()
    trainer(args.steps, probes.callbacks, default_root_dir=str(args.out_dir)).fit(module, data)
    total = time.perf_counter() - started
    result = {
        "arm": arm, "seed": seed, "steps": args.steps, "eval_every": args.eval_every, "lr": args.lr,
        "student": str(args.student), "val_rows": args.val_rows, "score_rows": args.score_rows,
        "points": probes.points(), "process_seconds": total, "excluded_seconds": probes.clock.excluded_wall,
        "dynamics_history": probes.dynamics.history, "dynamics_final": probes.dynamics.summary(),
        "effopd_history": probes.effopd.history if probes.effopd is not None else [],
    }
    if arm == "plain":
        result["rank1"] = rank1_probe(module, data, probes.dynamics)
        result["line_scan"] = line_scan(module, data, probes.snapshots.saved, windows)
    return result


def datamodules(seed: int, args: argparse.Namespace) -> tuple[RolloutDataModule, RolloutDataModule]:
    """The training prompts with the reported validation set, and EffOPD's own held-out prompts: a
    second DataModule used only for its evaluate(), encoded with the student's tokenizer up front."""
    task = AdditionTask(max_digits=3, reverse_answer=True)
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    data = RolloutDataModule(
        TaskPrompts(task, num_rows=20000, seed=TRAIN_SEED),
        val_source=TaskPrompts(task, num_rows=args.val_rows, seed=VAL_SEED),
        batch_size=64, val_batch_size=256, sampling=sampling, seed=seed,
    )
    score_source = TaskPrompts(task, num_rows=args.score_rows, seed=SCORE_SEED)
    score_data = RolloutDataModule(score_source, val_source=score_source, batch_size=64, val_batch_size=256,
                                   sampling=sampling, seed=seed, tokenizer=str(args.student))
    score_data.setup("fit")
    return data, score_data


class Probes:
    """One run's callbacks, in the order they run: update dynamics; the plain run's snapshots, or
    EffOPD's loss score, the "pre" recorder and EffOPDCallback; the reported-accuracy recorder."""

    def __init__(self, arm: str, args: argparse.Namespace, pow2: list[int], windows: list[tuple[int, int]],
                 score_data: RolloutDataModule) -> None:
        self.clock = Clock()
        self.recorder = Recorder(self.clock, args.eval_every, args.steps, pow2, "post")
        self.dynamics = TimedDynamics(self.clock, every_n_steps=args.dyn_every, reference_step=args.ref_step)
        self.snapshots = Snapshots(self.clock, {step for window in windows for step in window})
        self.callbacks: list = [self.dynamics]
        self.effopd = None
        if arm == "plain":
            self.callbacks.append(self.snapshots)
        if arm.startswith("effopd"):
            score_fn = HeldOutLoss(score_data) if arm == "effopd_loss" else HeldOutAccuracy(score_data)
            if arm == "effopd_loss":
                self.callbacks.append(score_fn)
            include = {"include": ("",)} if arm == "effopd_all" else {}  # "" is in every parameter name
            self.effopd = EffOPDCallback(schedule="pow2", num_trials=5, initial_factor=2.0, score_fn=score_fn,
                                         seed=0, **include)
            self.callbacks += [Recorder(self.clock, None, args.steps, pow2, "pre"), self.effopd]
        self.callbacks.append(self.recorder)

    def points(self) -> list[dict]:
        """Every recorded accuracy point, by step ("pre" before "post" at a search step)."""
        found = [p for c in self.callbacks if isinstance(c, Recorder) for p in c.points]
        return sorted(found, key=lambda p: (p["step"], p["kind"] != "pre"))


class HeldOutAccuracy:
    """EffOPD's score: greedy accuracy on its own held-out prompts, never the reported set."""

    def __init__(self, score_data: RolloutDataModule) -> None:
        self.score_data = score_data

    def __call__(self, trainer, pl_module) -> float:  # noqa: ANN001
        return self.score_data.evaluate(pl_module)["accuracy"]


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
        self.clock, self.every, self.last = clock, every, last
        self.pow2, self.pow2_kind = set(pow2), pow2_kind
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


# ----- the parent's side: start runs, read their curves ---------------------------------------------
def launch(arm: str, seed: int, args: argparse.Namespace) -> tuple[subprocess.Popen, Path]:
    """Start one run as a worker process (one torch thread); its output goes to a log beside its JSON."""
    path = args.out_dir / f"{arm}_seed{seed}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    settings = [x for name in WORKER_SETTINGS
                for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    cmd = [sys.executable, __file__, arm, "--seed", str(seed), "--out-dir", str(args.out_dir), *settings]
    log = open(args.out_dir / f"{arm}_seed{seed}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), path


def grid(run: dict) -> list[dict]:
    return [p for p in run["points"] if p["kind"] == "grid"]


def first_at_least(points: list[dict], accuracy: float) -> dict:
    """The first grid point after step 0 with at least ``accuracy`` (the last point if none)."""
    return next((p for p in points if p["acc"] >= accuracy and p["step"] > 0), points[-1])


def compare(plain: dict, eff: dict) -> dict:
    """Speed-up of one seed (see bench_effopd.py's docstring): both runs' first eval point at the lower of
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


def main() -> None:
    """The worker: one run, written to ``--out-dir/ARM_seedS.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arm", choices=WORKER_ARMS)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    for name in WORKER_SETTINGS:
        kind = {"lr": float, "student": str}.get(name, int)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, required=True)
    args = parser.parse_args()
    result = run_arm(args.arm, args.seed, args)
    (args.out_dir / f"{args.arm}_seed{args.seed}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
