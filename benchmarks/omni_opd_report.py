"""The OmniOPD benchmark's report (``bench_omni_opd.py``): per-arm summaries of the cached runs, the
paired gains, the table, the plot and the RESULTS.md section."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from common import pyplot, result_line

ARMS = ("sft", "opd", "omniopd", "omniopd_ref", "omniopd_bpe", "omniopd_api")
LABELS = {"sft": "SFT on teacher samples", "opd": "logit OPD (forward KL)",
          "omniopd": "OmniOPD (group), text only", "omniopd_ref": "OmniOPD (reference objective)",
          "omniopd_bpe": "OmniOPD, BPE-tokenizer teacher", "omniopd_api": "OmniOPD via transformers serve"}


def summarize(results: list[dict]) -> dict[str, dict]:
    by_arm: dict[str, dict] = {}
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        final = [r["accuracy"][-1] for r in runs]
        by_arm[arm] = {
            "seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"], "final": final,
            "final_mean": statistics.mean(final), "before": runs[0]["accuracy"][0],
            "tokens": statistics.mean(r["teacher_tokens"][-1] for r in runs),
            "rep_sampled": statistics.mean(r["repetition_sampled"] for r in runs),
            "rep_greedy": statistics.mean(r["repetition_greedy"] for r in runs),
            "len_greedy": statistics.mean(r["length_greedy"] for r in runs),
            "wall_s": statistics.mean(r["wall_s"] for r in runs),
        }
    return by_arm


def paired_gain(results: list[dict], arm: str, other: str) -> tuple[float, list[float]]:
    """Mean over the seeds both arms ran of (arm − other) final accuracy, and the per-seed gains."""
    finals = {(r["arm"], r["seed"]): r["accuracy"][-1] for r in results}
    seeds = sorted(s for (a, s) in finals if a == arm and (other, s) in finals)
    gains = [finals[(arm, s)] - finals[(other, s)] for s in seeds]
    return (statistics.mean(gains) if gains else float("nan")), gains


def table(by_arm: dict[str, dict]) -> str:
    lines = ["| arm | seeds | steps | greedy accuracy before → after (per seed) | mean after "
             "| teacher tokens | loops, sampled / greedy | greedy length | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, s in by_arm.items():
        per_seed = ", ".join(f"{a:.3f}" for a in s["final"])
        seeds = ",".join(map(str, s["seeds"]))
        lines.append(f"| {LABELS[arm]} | {seeds} | {s['steps']} | {s['before']:.3f} → "
                     f"{per_seed} | **{s['final_mean']:.3f}** | {s['tokens']:.3g} | {s['rep_sampled']:.3f} / "
                     f"{s['rep_greedy']:.3f} | {s['len_greedy']:.1f} | {s['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, arm in enumerate(ARMS):
        runs = [r for r in results if r["arm"] == arm]
        for k, r in enumerate(runs):
            style = {"color": f"C{index}", "alpha": 0.8, "label": LABELS[arm] if k == 0 else None}
            left.plot(r["eval_steps"], r["accuracy"], marker="o", ms=3, **style)
            # a log axis: no step 0
            spent = [(t, a) for t, a in zip(r["teacher_tokens"], r["accuracy"]) if t > 0]
            right.plot([t for t, _ in spent], [a for _, a in spent], marker="o", ms=3, **style)
    left.set(xlabel="training step", ylabel="greedy val accuracy",
             title="accuracy vs steps (one line a seed)")
    right.set(xlabel="teacher tokens spent", ylabel="greedy val accuracy", xscale="log",
              title="accuracy vs teacher tokens")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def section(results: list[dict], by_arm: dict, samples: dict) -> str:
    """The dated RESULTS.md section (``samples``: the SFT arm's teacher samples' meta)."""
    vs_sft, sft_gains = paired_gain(results, "omniopd", "sft")
    vs_opd, opd_gains = paired_gain(results, "omniopd", "opd")
    return "\n".join([
        f"## OmniOPD vs SFT on teacher samples vs logit OPD, carry task ({time.strftime('%Y-%m-%d')})",
        "",
        "`python benchmarks/bench_omni_opd.py` — one trained teacher "
        "(lit_opd/assets/carry_addition/teacher, 100 % greedy) used three ways; each arm is a shipped "
        "config run by `python -m lit_opd fit` (one torch thread each, several runs at a time on a 2-core "
        "CPU: wall times are inflated by up to ~4x and compare only roughly). Student 17.6 % greedy, batch "
        "32, greedy exact match on 512 validation prompts. SFT and OPD: AdamW lr 1e-3 "
        "(configs/opd/carry.yaml); OmniOPD: lr 1e-4, C = 9, M = 3 audits, N = 4 continuations, φ = edit, α "
        "= 1, β = 0.1; the group objective with 4 candidates per audit (configs/omni_opd/carry.yaml), the "
        "reference objective with the same settings (`omniopd_ref`). SFT trains on one teacher sample per "
        f"prompt (temperature 1; {samples['correct_frac']:.1%} of them correct). Teacher tokens: what the "
        "teacher read and wrote (OPD: its forward over prompt + completion; OmniOPD: prompts and "
        "continuations as the teacher counts them — an API server counts the prompt once per request, and "
        "`transformers serve` ignores `n`, so each continuation is its own request). Loops: the final "
        "student's 512 completions, `repetition_loops`.",
        "",
        table(by_arm),
        "",
        f"OmniOPD − SFT per seed: {', '.join(f'{g:+.3f}' for g in sft_gains)}; OmniOPD − OPD per seed: "
        f"{', '.join(f'{g:+.3f}' for g in opd_gains)}.",
        "",
        "![OmniOPD benchmark](omni_opd.png)",
        "",
        result_line("omniopd_vs_sft", vs_sft),
        result_line("omniopd_vs_opd", vs_opd),
        "",
    ])


