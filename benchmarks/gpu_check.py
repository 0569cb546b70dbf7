"""GPU path check: bf16 mixed precision, a 4-bit teacher, and FSDP, on ~0.5B-scale models built
from a config (no download). Prints one table row per path: rollout tokens/s, median step time,
peak GPU memory; on a GPU, writes the table as its section of benchmarks/RESULTS.md (replacing the
section of the same heading: date aside, the same device), unless ``--no-record``.

    python benchmarks/gpu_check.py              # on a CUDA machine (< 8 minutes on one H100/H200)
    python benchmarks/gpu_check.py --no-record  # the same; RESULTS.md untouched
    python benchmarks/gpu_check.py --dry-run    # tiny sizes on CPU: checks the script itself

Models: student = Qwen3-0.6B layout (28 layers, h1024, vocab 151936), teacher = Qwen3-1.7B layout
(28 layers, h2048), both random init; the character tokenizer feeds them. Random models rarely
emit EOS, so every completion runs to max_new_tokens — the worst case for a rollout.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import add_record_options, arg_parser, qwen3_config, record, step_timer, trainer  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from lit_opd import (  # noqa: E402
    Divergence,
    HFTeacher,
    ModelSpec,
    OPDModule,
    RolloutDataModule,
    SamplingParams,
    TaskPrompts,
)
from lit_opd.tasks import AdditionTask, char_tokenizer  # noqa: E402


def save_model(config: Qwen3Config, path: Path, tok) -> str:  # noqa: ANN001
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is slow on CPU at 1.7B
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_path(name: str, student: str, teacher: ModelSpec, trainer_kwargs: dict, steps: int, batch: int,
             new_tokens: int, cuda_graph: bool = True) -> dict:
    tok = char_tokenizer()
    module = OPDModule(student, HFTeacher(teacher), tokenizer=tok,
                       objective=Divergence(beta=0.5, chunk_size=1024))
    data = RolloutDataModule(
        TaskPrompts(AdditionTask(1, 3), num_rows=4096), val_size=0, batch_size=batch,
        sampling=SamplingParams(max_new_tokens=new_tokens, cuda_graph=cuda_graph), tokenizer=None,
    )
    # Each step's wall time includes its rollout (the batch transfer happens before on_train_batch_start,
    # so the timer measures from the previous step's end); the first step is warm-up.
    timer = step_timer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fit = trainer(steps, [timer], enable_model_summary=True, **trainer_kwargs)
    start = time.perf_counter()
    fit.fit(module, data)
    wall = time.perf_counter() - start
    step_s = statistics.median(timer.times) if timer.times else float("nan")
    rollout_s = statistics.median(timer.rollout_s[1:]) if len(timer.rollout_s) > 1 else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    # tokens a second of each step after the first (the first is warm-up, as for the step times)
    per_step = [t / s for t, s in zip(timer.tokens[1:], timer.times)]
    train_tok_s = statistics.median(per_step) if per_step else 0
    return {
        "path": name, "step_s": step_s, "rollout_tok_s": batch * new_tokens / rollout_s,
        "train_tok_s": train_tok_s,
        "peak_gib": peak, "wall_s": wall, "loss": float(fit.callback_metrics.get("train/loss", float("nan"))),
    }


def parse_args() -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU; records nothing")
    add_record_options(parser)
    # --record was the opt-in before a GPU run recorded by default; gpu_check.sh still passes it
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--paths", default="bf16,bf16_eager,bf16_4bit_teacher,fsdp",
                        help="bf16_eager: the bf16 path with the rollout's CUDA graph off (its baseline)")
    args = parser.parse_args()
    if args.record:
        warnings.warn("--record is deprecated: a GPU run records unless --no-record", FutureWarning,
                      stacklevel=1)
    return args


def plans(teacher_dir: str, gpu: bool) -> dict[str, tuple[ModelSpec, dict]]:
    """Each path's teacher and Trainer settings."""
    bf16 = "bf16-mixed" if gpu else "32-true"
    return {
        "bf16": (ModelSpec(teacher_dir, dtype="bfloat16"), dict(precision=bf16)),
        "bf16_eager": (ModelSpec(teacher_dir, dtype="bfloat16"), dict(precision=bf16)),
        "bf16_4bit_teacher": (ModelSpec(teacher_dir, dtype="bfloat16", quantization="4bit"),
                              dict(precision=bf16)),
        "fsdp": (ModelSpec(teacher_dir, dtype="bfloat16"), dict(precision=bf16, strategy="fsdp")),
    }


def run_paths(args: argparse.Namespace, gpu: bool) -> list[dict]:
    """One row per path in ``--paths`` (a failed path's row carries its error)."""
    tok = char_tokenizer()
    if gpu:
        student_cfg = qwen3_config(1024, 28, 3072, 151936)
        teacher_cfg = qwen3_config(2048, 28, 6144, 151936)
        batch, new_tokens, accel = 16, 128, dict(accelerator="gpu", devices=1)
    else:
        student_cfg = qwen3_config(64, 2, 128, 256, heads=4, kv=2)
        teacher_cfg = qwen3_config(96, 2, 192, 256, heads=4, kv=2)
        batch, new_tokens, accel = 4, 8, dict(accelerator="cpu", devices=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        student = save_model(student_cfg, Path(tmp) / "student", tok)
        path_plans = plans(save_model(teacher_cfg, Path(tmp) / "teacher", tok), gpu)
        for name in args.paths.split(","):
            teacher, extra = path_plans[name]
            if not gpu and name == "fsdp":
                print("skip fsdp on CPU (Lightning's FSDP needs a GPU)")
                continue
            try:
                rows.append(run_path(name, student, teacher, {**accel, **extra}, args.steps, batch,
                                     new_tokens, cuda_graph=name != "bf16_eager"))
            except Exception as err:  # report every path, even when one fails
                rows.append({"path": name, "error": f"{type(err).__name__}: {err}"[:300]})
            if gpu:
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    args = parse_args()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        sys.exit("no CUDA device: run with --dry-run to check the script on CPU")
    table = render(run_paths(args, gpu), gpu)
    print(table)
    if gpu:  # a dry run's figures are not results
        record(args, table)
    if os.environ.get("OUT"):  # the device tool returns files written under $OUT
        Path(os.environ["OUT"], "gpu_check.md").write_text(table + "\n")


def render(rows: list[dict], gpu: bool) -> str:
    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    lines = [f"## GPU path check — {datetime.date.today()} — {device}\n",
             "| path | median step (s) | rollout tok/s | train tok/s | peak GPU mem (GiB) | loss | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | – | – | – | – | – | FAILED: {r['error']} |")
        else:
            lines.append(f"| {r['path']} | {r['step_s']:.3f} | {r['rollout_tok_s']:.0f} | "
                         f"{r['train_tok_s']:.0f} | {r['peak_gib']:.2f} | {r['loss']:.4f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
