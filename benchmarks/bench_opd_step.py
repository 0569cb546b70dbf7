"""OPD step time: lit_opd's OPDModule against TRL's DistillationTrainer and GKDTrainer.

Identical tiny models (Qwen3 layout; student h64 × 2 layers, teacher h128 × 2 layers, random
init, same seeds), the same character tokenizer with a chat template, the same chat prompts,
batch 8, up to 32 new tokens sampled at temperature 1 (no top-k/top-p), JSD β = 0.5, AdamW at a
constant lr 1e-4, fp32, same thread count. Runs are interleaved (lit_opd, TRL, GKD, lit_opd, …);
per run the median wall time per optimizer step after a warm-up, then the median over runs.
It also prints where lit_opd's step goes (rollout, teacher forward, student forward + loss,
backward, optimizer, the rest) and the same work done with raw torch calls.

    python benchmarks/bench_opd_step.py           # 3 rounds × 20 steps
    python benchmarks/bench_opd_step.py --quick   # 1 round × 6 steps; records nothing
    python benchmarks/bench_opd_step.py --no-record   # 3 × 20 steps; RESULTS.md and opd_step.png untouched
    python benchmarks/bench_opd_step.py --device cuda   # GPU: student Qwen3 h1024×28 (0.6B layout,
        # character vocabulary), teacher h2048×28 (1.7B layout), batch 16, 64 new tokens, fp32 on both sides
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[1]

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import add_record_options, arg_parser, print_result, pyplot, qwen3_config, record, trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from lit_opd import Divergence, HFTeacher, ListPrompts, OPDModule, RolloutDataModule, SamplingParams  # noqa: E402
from lit_opd.tasks import char_tokenizer  # noqa: E402
from lit_opd.tiny import make_tiny_model  # noqa: E402

BATCH, NEW_TOKENS, LR, BETA = 8, 32, 1e-4, 0.5
DEVICE = "cpu"


def now() -> float:
    """Wall time after the device's queued work (GPU kernels run asynchronously)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def model_pair(tok) -> tuple[torch.nn.Module, torch.nn.Module]:  # noqa: ANN001
    """The same student and teacher (same seeds) for every trainer."""
    if DEVICE == "cpu":
        return make_tiny_model(len(tok), 64, 2, seed=0), make_tiny_model(len(tok), 128, 2, seed=1)
    from transformers import Qwen3ForCausalLM

    models = []
    for seed, (hidden, inter) in enumerate([(1024, 3072), (2048, 6144)]):
        torch.manual_seed(seed)
        with torch.device(DEVICE):
            models.append(Qwen3ForCausalLM(qwen3_config(hidden, 28, inter, len(tok))))
    return models[0], models[1]


def prompts(n: int = 256) -> list[str]:
    return [f"What is {i}+{i}?" for i in range(n)]


class LitTimer(L.Callback):
    """Wall time between consecutive step ends (covers prompt fetch, rollout and the update)."""

    def __init__(self) -> None:
        self.times, self.last, self.parts = [], None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.parts.append({"rollout": batch.rollout_seconds})

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # noqa: ANN001
        self.t_backward = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.parts[-1]["backward"] = time.perf_counter() - self.t_backward
        self.t_optim = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        now = time.perf_counter()
        self.parts[-1]["optimizer"] = now - self.t_optim
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


class TimedOPDModule(OPDModule):
    """OPDModule that adds the wall time of its teacher scoring and of its loss (the student's forward
    included) to the current step's entry of ``parts`` (the LitTimer's)."""

    def __init__(self, *args, parts: list[dict], **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.parts = parts

    def timed(self, key: str, fn, *args):  # noqa: ANN001, ANN002, ANN202
        start = time.perf_counter()
        out = fn(*args)
        self.parts[-1][key] = self.parts[-1].get(key, 0.0) + time.perf_counter() - start
        return out

    def score_teacher(self, batch):  # noqa: ANN001, ANN201
        return self.timed("teacher_forward", super().score_teacher, batch)

    def loss(self, batch, teacher_out):  # noqa: ANN001, ANN201
        return self.timed("student_forward_and_loss", super().loss, batch, teacher_out)


def run_lit(steps: int) -> dict:
    tok = char_tokenizer(chat_template=True)
    student, teacher = model_pair(tok)
    timer = LitTimer()
    module = TimedOPDModule(student, HFTeacher(teacher, tokenizer=tok), tokenizer=tok,
                            objective=Divergence(beta=BETA), parts=timer.parts,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.0))
    data = RolloutDataModule(ListPrompts([{"prompt": p} for p in prompts()]), val_size=0, batch_size=BATCH,
                             sampling=SamplingParams(max_new_tokens=NEW_TOKENS), seed=0)
    fit = trainer(steps, [timer], accelerator="gpu" if DEVICE == "cuda" else "cpu")
    fit.fit(module, data)
    parts = timer.parts[2:]
    breakdown = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in parts[0]}
    return {"step_s": statistics.median(timer.times[1:]), "loss": float(fit.callback_metrics["train/loss"]),
            "breakdown": breakdown}


class HFTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.times.append(time.perf_counter() - self.start)


def run_trl(kind: str, steps: int) -> dict:
    from datasets import Dataset

    tok = char_tokenizer(chat_template=True)
    student, teacher = model_pair(tok)
    timer = HFTimer()
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                      lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                      use_cpu=DEVICE == "cpu", bf16=False, fp16=False, activation_checkpointing=False,
                      dataloader_num_workers=0, seed=0, disable_tqdm=True, weight_decay=0.0)
        from transformers import TrainingArguments

        known = TrainingArguments.__dataclass_fields__  # older transformers lack activation_checkpointing
        common = {k: v for k, v in common.items() if k in known}
        if kind == "DistillationTrainer":
            from trl import DistillationConfig, DistillationTrainer

            data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts()])
            args = DistillationConfig(beta=BETA, temperature=1.0, top_k=0, max_completion_length=NEW_TOKENS,
                                      **common)
            trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok,
                                          train_dataset=data, args=args, callbacks=[timer])
        else:
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]
                     for p in prompts()]
            data = Dataset.from_list([{"messages": chat} for chat in chats])
            args = GKDConfig(lmbda=1.0, beta=BETA, temperature=1.0, max_new_tokens=NEW_TOKENS, max_length=128,
                             **common)
            trainer = GKDTrainer(model=student, teacher_model=teacher, processing_class=tok,
                                 train_dataset=data, args=args, callbacks=[timer])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": statistics.median(timer.times[2:]), "loss": losses[-1]}


def raw_compute() -> dict:
    """The same step's model work with plain torch calls: the floor for the breakdown."""
    from lit_opd.models import completion_logits
    from lit_opd.rollout.sampling import sample
    from lit_opd.types import RolloutBatch

    tok = char_tokenizer(chat_template=True)
    student, teacher = model_pair(tok)
    optim = torch.optim.AdamW(student.parameters(), lr=LR)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
           for p in prompts(BATCH)]
    P = max(map(len, ids))
    prompt = torch.tensor([[0] * (P - len(i)) + i for i in ids], device=DEVICE)
    pads = torch.tensor([P - len(i) for i in ids], device=DEVICE)
    mask = (torch.arange(P, device=DEVICE)[None] >= pads[:, None]).long()
    times = {"rollout": [], "teacher_forward": [], "student_forward_backward": [], "optimizer": []}
    for _ in range(8):
        t0 = now()
        out = sample(student, prompt, mask, SamplingParams(max_new_tokens=NEW_TOKENS), [3], 0)
        t1 = now()
        batch = RolloutBatch(prompt_ids_BP=prompt, prompt_mask_BP=mask, completion_ids_BT=out.tokens_BT,
                             completion_mask_BT=out.mask_BT, sampler_logp_BT=out.logp_BT,
                             answers=[None] * BATCH, row_index_B=torch.arange(BATCH, device=DEVICE))
        with torch.no_grad():
            t_logits = completion_logits(teacher, batch)
        t2 = now()
        from lit_opd.objectives.divergences import generalized_jsd

        generalized_jsd(completion_logits(student, batch), t_logits, BETA, out.mask_BT).backward()
        t3 = now()
        optim.step()
        optim.zero_grad()
        t4 = now()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key].append(value)
    return {k: statistics.median(v[2:]) for k, v in times.items()}


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    add_record_options(parser, " and benchmarks/opd_step.png")
    parser.add_argument("--machine", default="2-core CPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda":
        global BATCH, NEW_TOKENS, DEVICE
        BATCH, NEW_TOKENS, DEVICE = 16, 64, "cuda"
        args.machine = torch.cuda.get_device_name(0)
    if args.quick:
        args.rounds, args.steps = 1, 6
    torch.set_num_threads(args.threads)
    runs = {"lit_opd": [], "DistillationTrainer": [], "GKDTrainer": []}
    for _ in range(args.rounds):
        runs["lit_opd"].append(run_lit(args.steps))
        runs["DistillationTrainer"].append(run_trl("DistillationTrainer", args.steps))
        runs["GKDTrainer"].append(run_trl("GKDTrainer", args.steps))
    step = {k: statistics.median(r["step_s"] for r in v) for k, v in runs.items()}
    loss = {k: statistics.median(r["loss"] for r in v) for k, v in runs.items()}
    breakdown = runs["lit_opd"][-1]["breakdown"]
    raw = raw_compute()
    table = report(step, loss, breakdown, raw, args)
    print(table)
    if os.environ.get("OUT") and DEVICE == "cuda":  # the device tool returns what is written under $OUT
        plot(step, breakdown, Path(os.environ["OUT"]) / "opd_step_gpu.png")
        Path(os.environ["OUT"], "opd_step_gpu.md").write_text(table)
    elif not args.no_record and not args.quick:
        plot(step, breakdown, ROOT / "benchmarks" / "opd_step.png")
        record(args, table)
    print_result("opd_step_speedup_vs_trl", step["DistillationTrainer"] / step["lit_opd"], digits=3)


def plot(step: dict, breakdown: dict, out: Path) -> None:
    """Median step time per trainer, lit_opd's split into its parts."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 3.4))
    names = list(step)
    ax.barh(names[1:], [step[n] * 1e3 for n in names[1:]], color="tab:gray")
    left = 0.0
    parts = [("rollout", breakdown.get("rollout", 0.0)),
             ("teacher forward", breakdown.get("teacher_forward", 0.0)),
             ("student fwd + loss + bwd",
              breakdown.get("student_forward_and_loss", 0.0) + breakdown.get("backward", 0.0)),
             ("optimizer", breakdown.get("optimizer", 0.0))]
    parts.append(("other", step["lit_opd"] - sum(v for _, v in parts)))
    for name, seconds in parts:
        ax.barh(["lit_opd"], [seconds * 1e3], left=[left], label=name)
        left += seconds * 1e3
    ax.set_xlabel("median time per optimizer step (ms)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def report(step: dict, loss: dict, breakdown: dict, raw: dict, args: argparse.Namespace) -> str:
    lines = [f"\n## OPD step against TRL — {datetime.date.today()} — {args.machine}\n",
             f"`python benchmarks/bench_opd_step.py` ({args.rounds} interleaved rounds × {args.steps} steps, "
             f"{args.threads} threads; student {'Qwen3 h64×2' if DEVICE == 'cpu' else 'Qwen3 h1024×28'}, "
             "teacher "
             f"{'h128×2' if DEVICE == 'cpu' else 'h2048×28'}, batch {BATCH}, ≤ {NEW_TOKENS} new "
             f"tokens, JSD β = {BETA}, fp32).\n",
             f"Plot: `benchmarks/{'opd_step' if DEVICE == 'cpu' else 'opd_step_gpu'}.png`.\n",
             "| trainer | median step (ms) | TRL / this | loss after the run |", "|---|---|---|---|"]
    for name in step:
        lines.append(f"| {name} | {step[name] * 1e3:.1f} | {step[name] / step['lit_opd']:.2f}× | "
                     f"{loss[name]:.4f} |")
    total = step["lit_opd"]
    lines += ["", "Where lit_opd's step goes (median ms) against the same work as raw torch calls:", "",
              "| part | lit_opd step | raw torch |", "|---|---|---|"]
    rows = [("rollout", breakdown.get("rollout", 0), raw["rollout"]),
            ("teacher forward", breakdown.get("teacher_forward", 0), raw["teacher_forward"]),
            ("student forward + loss + backward",
             breakdown.get("student_forward_and_loss", 0) + breakdown.get("backward", 0),
             raw["student_forward_backward"]),
            ("optimizer", breakdown.get("optimizer", 0), raw["optimizer"])]
    for name, ours, floor in rows:
        lines.append(f"| {name} | {ours * 1e3:.1f} | {floor * 1e3:.1f} |")
    raw_sum = sum(raw.values())
    rest = total - sum(r[1] for r in rows)
    lines.append(f"| everything else (Lightning loop, logging, data) | {rest * 1e3:.1f} | – |")
    lines.append(f"| **whole step** | **{total * 1e3:.1f}** | **{raw_sum * 1e3:.1f}** (step / raw = "
                 f"{total / raw_sum:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
