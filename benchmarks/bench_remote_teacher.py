"""Remote teachers on loopback: what an OPD step costs when the teacher lives in another process,
and how many text requests per second a text-only teacher gets through.

1. OPD step time, `ServerTeacher` (a `python -m lit_opd serve-teacher` process on 127.0.0.1)
   against `HFTeacher` (the same model in the training process), the quickstart models and task
   (student 3 layers h96, teacher 4 layers h128, batch 64, 6 new tokens), top-k divergence with the
   same k on both sides, AdamW lr 2e-3. Both sides get the same torch thread count (the trainer
   waits while the server computes, so they never compete). Runs alternate in-process / server;
   per run the median step time after a warm-up, then the median over runs. Also the time of
   `teacher.score` alone on one rollout batch.
2. Text requests per second through `APITeacher` against `transformers serve` over the trained
   teacher (completions mode, 4 new tokens), at concurrency 1, 4 and 16.

    python benchmarks/bench_remote_teacher.py            # 3 rounds × 30 steps, 96 text requests
    python benchmarks/bench_remote_teacher.py --quick    # 1 round × 10 steps, 32 text requests; no plot
    python benchmarks/bench_remote_teacher.py --no-record  # the full run; remote_teacher.png untouched

Prints its two tables, writes ``benchmarks/remote_teacher.png`` (not with ``--quick`` or
``--no-record``) and ends with ``RESULT server_teacher_step_overhead <server / in-process>``. Its
RESULTS.md section is written by hand from the tables.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import add_record_options, arg_parser, print_result, pyplot, step_timer, trainer  # noqa: E402

from lit_opd import Divergence, HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts  # noqa: E402
from lit_opd.tasks import AdditionTask  # noqa: E402
from lit_opd.teachers.api import APITeacher  # noqa: E402
from lit_opd.teachers.server import ServerTeacher  # noqa: E402
from tests.teachers.servers import free_port, python_argv, running_server  # noqa: E402

TEACHER = str(ROOT / "lit_opd/assets/addition/teacher")
STUDENT = str(ROOT / "lit_opd/assets/addition/student")
K, BATCH, THREADS = 8, 64, 2


def datamodule(tokenizer: str | None = None) -> RolloutDataModule:
    task = AdditionTask(max_digits=3, reverse_answer=True)
    return RolloutDataModule(TaskPrompts(task, num_rows=4000, seed=4), batch_size=BATCH,
                             sampling=SamplingParams(max_new_tokens=6, temperature=1.0), tokenizer=tokenizer)


def run_opd(teacher, steps: int) -> float:  # noqa: ANN001
    """Median seconds per OPD step with ``teacher`` (the first two steps are warm-up)."""
    L.seed_everything(0, verbose=False)
    module = OPDModule(STUDENT, teacher, objective=Divergence(kind="jsd", beta=0.0, top_k=K),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))
    timer = step_timer()  # wall time from one step's end to the next's: rollout, teacher, loss, update
    # Lightning's own validation defaults, as this benchmark has always run: a sanity check before step 1
    fit = trainer(steps, [timer], devices="auto", limit_val_batches=None, num_sanity_val_steps=None)
    fit.fit(module, datamodule())
    return statistics.median(timer.times[2:])


def score_time(teacher, repeats: int = 10) -> float:  # noqa: ANN001
    """Median seconds of ``teacher.score`` on one quickstart rollout batch."""
    module = OPDModule(STUDENT, HFTeacher(TEACHER), objective=Divergence(top_k=K))
    data = datamodule(tokenizer=STUDENT)  # the module's tokenizer: there is no trainer to hand it over
    data.setup("fit")
    batch = data.rollout(next(iter(data.train_dataloader())), module, "student", step=0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        teacher.score(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def step_overhead(rounds: int, steps: int) -> dict:
    port = free_port()
    argv = python_argv("-m", "lit_opd", "serve-teacher", "--model", TEACHER, "--k", str(K),
                       "--port", str(port), "--device", "cpu")
    with running_server(argv, port, env={"OMP_NUM_THREADS": str(THREADS)}) as root:
        server = ServerTeacher(base_url=f"{root}/v1", model=TEACHER, k=K)
        local = HFTeacher(TEACHER)
        runs = {"in-process": [], "server": []}
        for _ in range(rounds):
            runs["in-process"].append(run_opd(local, steps))
            runs["server"].append(run_opd(server, steps))
        scores = {"in-process": score_time(local), "server": score_time(server)}
    step = {name: statistics.median(times) for name, times in runs.items()}
    return {"step": step, "score": scores}


def text_rate(requests: int, levels: tuple[int, ...] = (1, 4, 16)) -> dict[int, float]:
    """Text requests per second through APITeacher at each concurrency level."""
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    argv = [str(exe), "serve", TEACHER, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    task = AdditionTask(max_digits=3, reverse_answer=True)
    prompts = [row["prompt"] for row in TaskPrompts(task, num_rows=requests, seed=7).load()]
    rates = {}
    with running_server(argv, port, env={"OMP_NUM_THREADS": str(THREADS)}) as root:
        for level in levels:
            teacher = APITeacher(base_url=f"{root}/v1", model=TEACHER, concurrency=level)
            teacher.generate_text(prompts[:2], max_new_tokens=4)  # warm the model and the connection pool
            start = time.perf_counter()
            answers = teacher.generate_text(prompts, max_new_tokens=4, temperature=1.0)
            elapsed = time.perf_counter() - start
            missing = sum(a is None for group in answers for a in group)
            assert missing == 0, f"{missing} text requests got no answer at concurrency {level}"
            rates[level] = requests / elapsed
    return rates


def plot(result: dict, rates: dict[int, float], out: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = list(result["step"])
    left.bar(names, [1000 * result["step"][n] for n in names], color=["#4c72b0", "#dd8452"])
    left.set_ylabel("ms per OPD step")
    ratio = result["step"]["server"] / result["step"]["in-process"]
    left.set_title(f"OPD step, teacher in-process vs serve-teacher ({ratio:.2f}×)", fontsize=9)
    levels = list(rates)
    right.plot(levels, [rates[c] for c in levels], marker="o")
    right.set_xscale("log", base=2)
    right.set_xticks(levels, [str(c) for c in levels])
    right.set_xlabel("concurrency")
    right.set_ylabel("requests / s")
    right.set_title("APITeacher → transformers serve (loopback)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    global THREADS
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round × 10 steps, 32 requests; no plot")
    add_record_options(parser, " and benchmarks/remote_teacher.png", results_file=False)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads on each side (2)")
    args = parser.parse_args()
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    rounds, steps, requests = (1, 10, 32) if args.quick else (3, 30, 96)
    result = step_overhead(rounds, steps)
    rates = text_rate(requests)
    ratio = result["step"]["server"] / result["step"]["in-process"]
    print("| teacher | ms / OPD step | ms / teacher.score (batch 64) |")
    print("|---|---|---|")
    for name in result["step"]:
        print(f"| {name} | {1000 * result['step'][name]:.1f} | {1000 * result['score'][name]:.1f} |")
    print("| concurrency | text requests / s |")
    print("|---|---|")
    for level, rate in rates.items():
        print(f"| {level} | {rate:.1f} |")
    if not (args.quick or args.no_record):
        plot(result, rates, ROOT / "benchmarks" / "remote_teacher.png")
    print_result("server_teacher_step_overhead", ratio, digits=3)


if __name__ == "__main__":
    main()
