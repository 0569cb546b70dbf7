"""Rollout throughput: lit_opd's KV-cached sampler against Hugging Face ``generate``.

Same model, prompts, sampling settings (temperature 1, no top-k/top-p) and exactly the same amount
of work: every row generates ``max_new_tokens`` tokens (EOS disabled on both sides). Runs are
interleaved (ours, HF, ours, HF, …) and the median of each is compared.

    python benchmarks/bench_rollout.py            # batch 16 and 64 × 32 and 128 new tokens
    python benchmarks/bench_rollout.py --quick       # one shape, one repeat; records nothing
    python benchmarks/bench_rollout.py --no-record   # RESULTS.md and rollout.png untouched

On a CUDA device it adds a Qwen3-0.6B layout (bf16, random init) and a column for the lean step
without its CUDA graph (``SamplingParams(cuda_graph=False)``), which isolates what the graph buys.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from common import add_record_options, arg_parser, print_result, pyplot, record  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from lit_opd.rollout.sampling import sample  # noqa: E402
from lit_opd.tasks import AdditionTask, char_tokenizer  # noqa: E402
from lit_opd.types import SamplingParams  # noqa: E402


def models(device: str) -> dict[str, torch.nn.Module]:
    """The quickstart student (0.35M parameters) and a 25M-parameter Qwen3 layout (h512, 8 layers)."""
    torch.manual_seed(0)
    mid = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=104, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=512, pad_token_id=0, eos_token_id=3,
        tie_word_embeddings=True))
    small = AutoModelForCausalLM.from_pretrained(ROOT / "lit_opd/assets/addition/student")
    found = {"quickstart student (0.35M)": small.to(device).eval(),
             "Qwen3 h512 L8 (25M)": mid.to(device).eval()}
    if device == "cuda":
        with torch.device(device):
            big = Qwen3ForCausalLM(Qwen3Config(
                vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                pad_token_id=0, eos_token_id=3, tie_word_embeddings=True))
        found["Qwen3-0.6B layout (bf16)"] = big.to(torch.bfloat16).eval()
    return found


def timed(fn) -> float:  # noqa: ANN001
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(model, batch: int, new_tokens: int, repeats: int, device: str) -> dict:  # noqa: ANN001
    tok = char_tokenizer()
    rows = AdditionTask(1, 3).make_rows(batch, seed=0)
    enc = tok([r["prompt"] for r in rows], padding=True, return_tensors="pt").to(device)
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False)

    def ours(run_params: SamplingParams = params) -> None:
        out = sample(model, enc.input_ids, enc.attention_mask, run_params, [3], 0)
        assert out.tokens_BT.shape == (batch, new_tokens)

    def eager() -> None:
        ours(SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False, cuda_graph=False))

    def hf() -> None:
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        assert out.sequences.shape[1] == enc.input_ids.shape[1] + new_tokens

    runs = {"ours": ours, "hf": hf, **({"eager": eager} if device == "cuda" else {})}
    with torch.no_grad():
        times = {name: [] for name in runs}
        for name, fn in runs.items():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn))
    tokens = batch * new_tokens
    t = {name: statistics.median(values) for name, values in times.items()}
    row = {"batch": batch, "new": new_tokens, "ours_tok_s": tokens / t["ours"], "hf_tok_s": tokens / t["hf"],
           "speedup": t["hf"] / t["ours"]}
    if "eager" in t:
        row["eager_tok_s"] = tokens / t["eager"]
    return row


def plot(rows: list[dict], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['model'].split(' (')[0]}\nB{r['batch']}×{r['new']}" for r in rows]
    x = range(len(rows))
    series = [("ours_tok_s", "lit_opd sample()"), ("hf_tok_s", "HF generate")]
    if "eager_tok_s" in rows[0]:
        series.append(("eager_tok_s", "lean step, no CUDA graph"))
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in x], [r[key] for r in rows], width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("generated tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_record_options(parser, " and benchmarks/rollout.png")
    parser.add_argument("--machine", default="2-core CPU")
    parser.add_argument("--shapes", default="16x32,16x128,64x32,64x128",
                        help="batch x new tokens, comma separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = ([(16, 32)] if args.quick
              else [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")])
    rows = []
    for name, model in models(device).items():
        for batch, new in shapes:
            row = {"model": name, **compare(model, batch, new, 1 if args.quick else args.repeats, device)}
            print(row, flush=True)
            rows.append(row)
    machine = torch.cuda.get_device_name(0) if device == "cuda" else args.machine
    eager = device == "cuda"
    lines = [f"\n## Rollout throughput — {datetime.date.today()} — {machine}\n",
             f"`python benchmarks/bench_rollout.py` ({device}, {args.threads} threads, sampling at "
             "temperature 1, "
             "every row generates exactly the new-token budget, median of interleaved repeats). "
             "Plot: `benchmarks/rollout.png`.\n",
             "| model | batch × new tokens | lit_opd tok/s | HF generate tok/s | speed-up |"
             + (" lean step without CUDA graph tok/s |" if eager else ""),
             "|---|---|---|---|---|" + ("---|" if eager else "")]
    lines += [f"| {r['model']} | {r['batch']} × {r['new']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
              f"{r['speedup']:.2f}× |" + (f" {r['eager_tok_s']:.0f} |" if eager else "") for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    out_dir = os.environ.get("OUT")  # the device tool returns what is written under $OUT
    if out_dir and not args.quick:
        plot(rows, Path(out_dir) / "rollout_gpu.png")
        Path(out_dir, "rollout_gpu.md").write_text(table)
    elif not args.no_record and not args.quick:
        plot(rows, ROOT / "benchmarks" / "rollout.png")
        record(args, table)
    print_result("rollout_speedup_vs_hf", statistics.median(r["speedup"] for r in rows), digits=3)


if __name__ == "__main__":
    main()
