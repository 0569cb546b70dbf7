"""OmniOPD against SFT on teacher samples and logit OPD: one trained teacher used three ways (issue 11).

    python benchmarks/bench_omni_opd.py                 # 3 seeds x 150 steps, ~45 min on 2 CPU cores
    python benchmarks/bench_omni_opd.py --quick         # smoke run: 1 seed, 6 steps, no RESULTS.md
    python benchmarks/bench_omni_opd.py --report-only   # re-render the table, plot and section
    python benchmarks/bench_omni_opd.py --no-record     # the full run; RESULTS.md and omni_opd.png untouched

Task, models and settings are the shipped configs' (each arm *is* a config, run through
``python -m lit_opd fit`` in its own process, one torch thread, two at a time):

* ``sft``          SFTModule on the teacher's own samples (one completion per training prompt, sampled
                   at temperature 1 from the same teacher, drawn once and cached): configs/opd/carry.yaml
                   with the model and the training source swapped.
* ``opd``          OPDModule, the teacher's logits (forward KL): configs/opd/carry.yaml.
* ``omniopd``      OmniOPDModule, the teacher's text only (HFTextTeacher): configs/omni_opd/carry.yaml
                   (the group objective, GroupVerification).
* ``omniopd_ref``  the same settings under the reference single-chunk objective (SpeculativeVerification).
* ``omniopd_bpe``  the same with a teacher of another tokenizer (BPE, 98.6 % greedy):
                   configs/omni_opd/carry_bpe_teacher.yaml.
* ``omniopd_api``  the same as ``omniopd`` through the API path: APITeacher against `transformers
                   serve` over the teacher on 127.0.0.1 (``--api-seeds`` seeds, ``--api-steps`` steps:
                   a loopback HTTP request per continuation is ~8x slower on 2 cores).

Same student (lit_opd/assets/carry_addition/student, 17.6 % greedy), prompts (TaskPrompts seed 4), batch
(32), optimizer and steps in every arm; the seed sets ``seed_everything``, the data order and rollout
draws (``RolloutDataModule.seed``) and OmniOPD's teacher sampling (``OmniOPDModule.seed``). Reported:
greedy exact match on 512 validation prompts (TaskPrompts seed 2) every ``--eval-every`` steps; teacher
tokens spent (SFT: prompt + sampled tokens of the samples used; OPD: prompt + completion tokens the
teacher's forward read, B x (mean prompt + mean completion length); OmniOPD: the text teacher's
counters, prompts + continuations); the repetition rate of the final student (fraction of 512
completions sampled at temperature 1 that hold an n-gram loop, ``repetition_loops``) and of its greedy
answers; wall time. The report (summaries, table, plot, section) is in ``omni_opd_report.py``. Ends with
``RESULT omniopd_vs_sft <mean over seeds of OmniOPD − SFT final accuracy>`` and ``RESULT omniopd_vs_opd
<mean of OmniOPD − OPD>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from common import ROOT, add_record_options, arg_parser, record  # noqa: E402
from omni_opd_report import ARMS, plot, section, summarize, table  # noqa: E402

from lit_opd.methods.omni_opd.audits import repetition_loops  # noqa: E402
from lit_opd.models import load_causal_lm, load_tokenizer  # noqa: E402
from lit_opd.tasks import CarryAdditionTask  # noqa: E402
from lit_opd.teachers import HFTextTeacher  # noqa: E402

sys.path.insert(0, str(ROOT))  # tests.teachers.servers runs the API arm's server

CONFIGS = {"sft": "configs/opd/carry.yaml", "opd": "configs/opd/carry.yaml",
           "omniopd": "configs/omni_opd/carry.yaml", "omniopd_ref": "configs/omni_opd/carry.yaml",
           "omniopd_bpe": "configs/omni_opd/carry_bpe_teacher.yaml",
           "omniopd_api": "configs/omni_opd/carry.yaml"}
TEACHER = ROOT / "lit_opd/assets/carry_addition/teacher"
OUT = ROOT / "runs" / "bench_omni_opd"
TASK = CarryAdditionTask(min_digits=2, max_digits=4)  # the carry configs' task


# ----- one arm = one config ---------------------------------------------------------------------
def arm_config(arm: str, seed: int, steps: int, eval_every: int, run_dir: Path, extra: dict) -> dict:
    """The shipped config of ``arm`` with this run's seed, steps, directories and teacher swapped in."""
    config = yaml.safe_load((ROOT / CONFIGS[arm]).read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=eval_every, log_every_n_steps=1,
                   default_root_dir=str(run_dir), enable_progress_bar=False)
    trainer["logger"]["init_args"].update(save_dir=str(run_dir), name="logs", version=0)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if "ModelCheckpoint" not in c["class_path"]]
    trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                 "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True,
                                               "every_n_train_steps": steps, "save_top_k": 0}})
    config["seed_everything"] = seed
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    data["seed"] = seed  # the data order and the rollout draws
    if "seed" in model:  # OmniOPD's teacher sampling
        model["seed"] = seed
    model["student"] = str(ROOT / model["student"])
    if "teacher" in model:
        teacher = model["teacher"]["init_args"]
        teacher["model"] = str(ROOT / teacher["model"])
    if arm == "sft":
        config["model"] = {"class_path": "lit_opd.SFTModule",
                           "init_args": {"student": model["student"], "optimizer": model["optimizer"]}}
        data["source"] = {"class_path": "lit_opd.JsonlPrompts", "init_args": {"path": extra["samples"]}}
    if arm == "omniopd_ref":  # the same settings under the reference (single-chunk) objective
        objective = model["objective"]
        objective["class_path"] = "lit_opd.methods.omni_opd.SpeculativeVerification"
        objective["init_args"].pop("candidates", None)
    if arm == "omniopd_api":
        model["teacher"] = {"class_path": "lit_opd.APITeacher",
                            "init_args": {"base_url": extra["base_url"], "model": extra["served_model"],
                                          "concurrency": 8, "timeout": 30.0}}
    return config


def run_arm(arm: str, seed: int, steps: int, eval_every: int, extra: dict) -> dict:
    """Run one arm as `python -m lit_opd fit` and collect its curves; cached in OUT/<arm>_s<seed>.json."""
    cached = OUT / "results" / f"{arm}_s{seed}.json"
    result = json.loads(cached.read_text()) if cached.exists() else None
    if result is not None and result["steps"] == steps:
        return result
    run_dir = OUT / f"{arm}_s{seed}"
    if finished(run_dir):  # a run whose process outlived an interrupted benchmark: collect it
        return collect(arm, seed, steps, run_dir, extra, wall_s=(run_dir / "fit.log").stat().st_mtime
                       - (run_dir / "config.yaml").stat().st_mtime)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(arm_config(arm, seed, steps, eval_every, run_dir, extra)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with open(run_dir / "fit.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "lit_opd", "fit", "--config", str(config_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    wall_s = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {code}); see {run_dir / 'fit.log'}")
    return collect(arm, seed, steps, run_dir, extra, wall_s)


def finished(run_dir: Path) -> bool:
    log = run_dir / "fit.log"
    return (run_dir / "checkpoints" / "last.ckpt").exists() and log.exists() and "RESULT " in log.read_text()


def collect(arm: str, seed: int, steps: int, run_dir: Path, extra: dict, wall_s: float) -> dict:
    """The curves and final-student measures of a finished run, cached in OUT/results."""
    result = {"arm": arm, "seed": seed, "steps": steps, "wall_s": wall_s, **curves(arm, run_dir, extra),
              **final_repetition(run_dir, seed)}
    cached = OUT / "results" / f"{arm}_s{seed}.json"
    cached.parent.mkdir(exist_ok=True)
    cached.write_text(json.dumps(result, indent=1))
    return result


def curves(arm: str, run_dir: Path, extra: dict) -> dict:
    """Validation accuracy per step (step 0 from the AccuracyReport line) and cumulative teacher
    tokens at those steps, from the run's CSV log."""
    import pandas as pd

    log = pd.read_csv(run_dir / "logs" / "version_0" / "metrics.csv")
    before = next(float(line.split()[-1]) for line in (run_dir / "fit.log").read_text().splitlines()
                  if "val_accuracy before training:" in line)
    val = log.dropna(subset=["val/accuracy"])
    steps = [0] + [int(s) + 1 for s in val["step"]]
    accuracy = [before] + [float(a) for a in val["val/accuracy"]]
    train = log.dropna(subset=["train/loss"]).sort_values("step")
    if "teacher/tokens" in train:  # the text teacher's own counters (cumulative)
        spent = dict(zip(train["step"].astype(int) + 1, train["teacher/tokens"].astype(float)))
    else:  # SFT: the teacher's samples it trains on; OPD: the tokens the teacher's forward read
        row_tokens = (extra["sft_tokens_per_row"] if arm == "sft"
                      else extra["prompt_tokens"] + train["rollout/len_mean"])
        per_step = pd.Series(extra["batch"] * row_tokens, index=train.index)
        spent = dict(zip(train["step"].astype(int) + 1, per_step.cumsum().astype(float)))
    tokens = [0.0] + [spent.get(s, float("nan")) for s in steps[1:]]
    return {"eval_steps": steps, "accuracy": accuracy, "teacher_tokens": tokens,
            "repetition_train": float(train["train/repetition_rate"].mean())
            if "train/repetition_rate" in train else None}


# ----- the final student ------------------------------------------------------------------------
def final_repetition(run_dir: Path, seed: int, rows: int = 512, max_new_tokens: int = 48) -> dict:
    """Loop rate of the final student's completions on the validation prompts: sampled at temperature
    1 (seeded) and greedy; plus the greedy answers' mean length (a student that stops ending its
    answers runs to ``max_new_tokens``)."""
    student_dir = ROOT / "lit_opd/assets/carry_addition/student"
    tokenizer = load_tokenizer(None, str(student_dir))
    model = load_causal_lm(str(student_dir))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = {k.removeprefix("student."): v for k, v in state["state_dict"].items()
               if k.startswith("student.")}
    model.load_state_dict(weights)
    model.eval()
    prompts = [r["prompt"] for r in TASK.make_rows(rows, seed=2)]
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    out = {}
    torch.manual_seed(seed)
    with torch.no_grad():
        modes = (("sampled", {"do_sample": True, "temperature": 1.0}), ("greedy", {"do_sample": False}))
        for name, kwargs in modes:
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)[:, enc["input_ids"].shape[1]:]
            ended = (ids == tokenizer.eos_token_id).long()
            mask = (ended.cumsum(-1) - ended) == 0  # up to and including the first end token
            out[f"repetition_{name}"] = float(repetition_loops(ids, mask).float().mean())
            out[f"length_{name}"] = float(mask.sum(-1).float().mean())
    return out


# ----- what the arms share ----------------------------------------------------------------------
def teacher_samples(rows: int, seed: int = 0) -> tuple[Path, float]:
    """One completion per training prompt (TaskPrompts seed 4, the configs' order), sampled at
    temperature 1 from the teacher, as a JSONL the SFT arm trains on; and the teacher tokens one row
    cost (prompt + sampled tokens, up to the end token)."""
    path = OUT / f"teacher_samples_{rows}.jsonl"
    meta = OUT / f"teacher_samples_{rows}.json"
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())["tokens_per_row"]
    prompts = [r["prompt"] for r in TASK.make_rows(rows, seed=4)]
    torch.set_num_threads(2)
    teacher = HFTextTeacher(str(TEACHER), batch_size=256)
    texts = [row[0] for row in teacher.generate_text(prompts, max_new_tokens=48, temperature=1.0, seed=seed)]
    correct = sum(TASK.verify(t, r["answer"]) for t, r in zip(texts, TASK.make_rows(rows, seed=4)))
    OUT.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for prompt, text in zip(prompts, texts):
            fh.write(json.dumps({"prompt": prompt, "answer": text}) + "\n")
    stats = {"tokens_per_row": teacher.stats()["tokens"] / rows, "correct_frac": correct / rows}
    meta.write_text(json.dumps(stats))
    return path, stats["tokens_per_row"]


def mean_prompt_tokens(rows: int = 2000) -> float:
    tokenizer = load_tokenizer(None, str(ROOT / "lit_opd/assets/carry_addition/student"))
    prompts = [r["prompt"] for r in TASK.make_rows(rows, seed=4)]
    return statistics.mean(len(tokenizer(p)["input_ids"]) for p in prompts)


def serve_teacher():  # noqa: ANN201 - a context manager yielding (base_url, model name)
    """`transformers serve` over a copy of the teacher on 127.0.0.1 (the API arm's server)."""
    from tests.teachers.servers import free_port, running_server

    port = free_port()
    model_dir = OUT / "served_teacher"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(TEACHER, model_dir)
    argv = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    return running_server(argv, port), str(model_dir)


# ----- report -----------------------------------------------------------------------------------
# ----- main -------------------------------------------------------------------------------------
def jobs(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(arm, seed, steps), the slowest first so two workers finish together."""
    out = []
    for arm in args.arms:
        if arm == "omniopd_api":
            out += [(arm, s, args.api_steps) for s in args.api_seeds]
        else:
            out += [(arm, s, args.steps) for s in args.seeds]
    cost = {"omniopd_api": 9, "omniopd_bpe": 6, "omniopd": 6, "omniopd_ref": 4, "opd": 1, "sft": 1}
    return sorted(out, key=lambda job: -cost[job[0]] * job[2])


def run_all(args: argparse.Namespace) -> None:
    """Every (arm, seed) not cached yet, ``--workers`` at a time; the API arm's server while they run."""
    batch = 32
    samples, tokens_per_row = teacher_samples(args.steps * batch)
    extra = {"samples": str(samples), "sft_tokens_per_row": tokens_per_row, "batch": batch,
             "prompt_tokens": mean_prompt_tokens()}
    todo = jobs(args)
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(args.workers) as pool:
        if any(arm == "omniopd_api" for arm, _, _ in todo):
            server, served_model = serve_teacher()
            extra.update(base_url=stack.enter_context(server) + "/v1", served_model=served_model)
        for result in pool.map(lambda job: run_arm(job[0], job[1], job[2], args.eval_every, extra), todo):
            print(f"{result['arm']} seed {result['seed']}: {result['accuracy'][0]:.3f} -> "
                  f"{result['accuracy'][-1]:.3f} ({result['wall_s']:.0f} s)", flush=True)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--api-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--api-steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps, no API arm, no RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="re-render from the cached runs")
    add_record_options(parser, " and benchmarks/omni_opd.png")
    args = parser.parse_args()
    global OUT
    if args.quick:
        OUT = OUT.with_name("bench_omni_opd_quick")
        args.seeds, args.steps, args.eval_every, args.no_record = [0], 6, 3, True
        args.arms = [a for a in args.arms if a != "omniopd_api"]
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args)
    results = [json.loads(p.read_text()) for p in sorted((OUT / "results").glob("*.json"))]
    by_arm = summarize(results)
    print(table(by_arm))
    plot(results, OUT / "omni_opd.png" if args.no_record else ROOT / "benchmarks" / "omni_opd.png")
    text = section(results, by_arm, json.loads(next(OUT.glob("teacher_samples_*.json")).read_text()))
    record(args, text)
    print("\n".join(line for line in text.splitlines() if line.startswith("RESULT")))


if __name__ == "__main__":
    main()
