"""Peak memory and time of the loss: naive full-logits pair against the memory-lean paths.

Three ways to compute the same generalized JSD (β=0.5) between a student and a teacher over T
completion tokens, forward and backward, from last hidden states h (T×H) and output layers W (V×H):

* naive          — logits = h Wᵀ for both models ([T, V] each), log-softmax, JSD, backward.
* chunked logits — the same logits, the divergence in checkpointed chunks (divergences.py).
* lean (hidden)  — never forms [T, V]: chunks of hidden states go through W inside checkpointed
                   chunks (lean_loss.py); this is OPDModule's path when ``chunk_size`` is set.

Each path runs in its own subprocess; peak memory is the growth of peak RSS over the RSS once the
inputs exist (CPU) or ``torch.cuda.max_memory_allocated`` growth (GPU). Values and gradients of
every path are checked against the naive one.

    python benchmarks/bench_divergence.py            # V = 32k and 151k, T = 512, H = 1024
    python benchmarks/bench_divergence.py --quick    # small sizes, seconds; records nothing
    python benchmarks/bench_divergence.py --no-record    # full sizes; RESULTS.md and divergence.png untouched
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, add_record_options, arg_parser, print_result, pyplot, record

PATHS = ("naive", "chunked_logits", "lean_hidden")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(path: str, V: int, T: int, H: int, chunk: int, device: str) -> dict:
    """One measurement, in a fresh process so peak memory belongs to this path alone."""
    import torch

    from lit_opd.objectives import divergences as D
    from lit_opd.objectives.lean import hidden_divergence

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    s_h = (torch.randn(1, T, H, generator=g) * 0.5).to(device).requires_grad_(True)
    s_w = (torch.randn(V, H, generator=g) * 0.05).to(device).requires_grad_(True)
    t_h = (torch.randn(1, T, H, generator=g) * 0.5).to(device)
    t_w = (torch.randn(V, H, generator=g) * 0.05).to(device)
    ids = torch.randint(0, V, (1, T), generator=g).to(device)
    mask = torch.ones(1, T, dtype=torch.bool, device=device)

    def run() -> torch.Tensor:
        if path == "lean_hidden":
            loss = hidden_divergence(s_h, s_w, t_h, t_w, ids, mask, kind="jsd", beta=0.5,
                                     chunk_size=chunk).loss
        else:
            s_logits = s_h @ s_w.T
            with torch.no_grad():
                t_logits = t_h @ t_w.T
            chunks = chunk if path != "naive" else None
            loss = D.generalized_jsd(s_logits, t_logits, 0.5, mask, chunk_size=chunks)
        loss.backward()
        return loss.detach()

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mib()
    start = time.perf_counter()
    loss = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _peak_rss_mib() - base_rss
    return {"path": path, "V": V, "loss": float(loss), "seconds": seconds, "peak_mib": peak,
            "grad_h": s_h.grad.double().cpu().flatten()[:4096].tolist(),
            "grad_w_norm": float(s_w.grad.double().norm())}


def measure(path: str, V: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--V", str(V), "--T", str(args.T), "--H", str(args.H),
           "--chunk", str(args.chunk), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(row: dict, ref: dict) -> float:
    """Largest relative difference of loss, gradient sample and gradient norm against the naive path."""
    rel = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
    scale = max(max(abs(x) for x in ref["grad_h"]), 1e-12)
    rel = max(rel, max(abs(a - b) for a, b in zip(row["grad_h"], ref["grad_h"])) / scale)
    return max(rel, abs(row["grad_w_norm"] - ref["grad_w_norm"]) / max(ref["grad_w_norm"], 1e-12))


def plot(rows: list[dict], out: Path) -> None:
    plt = pyplot()
    vocabs = sorted({r["V"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.27
    for i, path in enumerate(PATHS):
        peaks = [next(r["peak_mib"] for r in rows if r["V"] == V and r["path"] == path) for V in vocabs]
        ax.bar([j + (i - 1) * width for j in range(len(vocabs))], peaks, width, label=path)
    ax.set_xticks(range(len(vocabs)), [f"V = {V:,}" for V in vocabs])
    ax.set_ylabel("peak memory of the loss (MiB)")
    ax.set_title("JSD loss forward+backward, T = 512, H = 1024")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"\n## Memory-lean divergence — {datetime.date.today()} — {args.machine}\n",
             f"`python benchmarks/bench_divergence.py` (T = {args.T}, H = {args.H}, chunk = {args.chunk}, "
             f"JSD β = 0.5, forward + backward, fp32, device {args.device}). Peak = growth of peak memory "
             "over the inputs (student/teacher hidden states and output layers). Plot: "
             "`benchmarks/divergence.png`.\n",
             "| V | path | peak (MiB) | peak / naive | time (s) | max rel. diff vs naive |",
             "|---|---|---|---|---|---|"]
    for V in sorted({r["V"] for r in rows}):
        ref = next(r for r in rows if r["V"] == V and r["path"] == "naive")
        for r in (r for r in rows if r["V"] == V):
            ratio = r["peak_mib"] / ref["peak_mib"]
            lines.append(f"| {V:,} | {r['path']} | {r['peak_mib']:.0f} | {ratio:.3f} | {r['seconds']:.2f} | "
                         f"{compare(r, ref):.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--worker", choices=PATHS)
    parser.add_argument("--V", type=int, default=0)
    parser.add_argument("--vocabs", default="32000,151936")
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--H", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="V = 4k and 8k, T = 128, H = 128")
    add_record_options(parser, " and benchmarks/divergence.png")
    parser.add_argument("--machine", default="2-core CPU")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.V, args.T, args.H, args.chunk, args.device)))
        return
    if args.quick:
        args.vocabs, args.T, args.H = "4096,8192", 128, 128
    rows = [measure(path, V, args) for V in map(int, args.vocabs.split(",")) for path in PATHS]
    table = report(rows, args)
    print(table)
    if not args.no_record and not args.quick:
        plot(rows, ROOT / "benchmarks" / "divergence.png")
        record(args, table)
    V_max = max(r["V"] for r in rows)
    naive = next(r for r in rows if r["V"] == V_max and r["path"] == "naive")
    lean = next(r for r in rows if r["V"] == V_max and r["path"] == "lean_hidden")
    print_result("divergence_peak_memory_ratio", lean["peak_mib"] / naive["peak_mib"])


if __name__ == "__main__":
    main()
