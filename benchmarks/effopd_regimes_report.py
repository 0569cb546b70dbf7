"""The EffOPD regime sweep's reading (``bench_effopd_regimes.py``): per regime, the plain runs'
line scans and update dynamics and each EffOPD arm's speed-up (``effopd_runs.compare``), then the
section's tables and the plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path

import effopd_runs as effopd
from common import pyplot

MIN_GAIN = 0.05  # plain OPD's accuracy gain (end - step 0) below which a seed has no speed-up to measure
ARM_MARKS = {"effopd": ("o", 1.0), "effopd_loss": ("s", 1.08), "effopd_all": ("^", 0.92)}
SCORE_NAMES = {"effopd": "greedy accuracy", "effopd_loss": "loss on rollouts",
               "effopd_all": "greedy accuracy, every parameter"}


# ----- summarising ------------------------------------------------------------------------------------
def med(values: Iterable[float | None]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def speedups(plains: list[dict], effs: list[dict]) -> list[dict | None]:
    """effopd_runs.compare per seed, None where plain OPD did not learn (gain < MIN_GAIN)."""
    rows = []
    for plain, eff in zip(plains, effs):
        points = effopd.grid(plain)
        rows.append(effopd.compare(plain, eff) if points[-1]["acc"] - points[0]["acc"] >= MIN_GAIN else None)
    return rows


def scan_summary(plains: list[dict]) -> list[dict]:
    """Per line-scan window, medians over seeds: ‖d‖/‖θ‖, accuracy at each m, the best m."""
    out = []
    for i, entry in enumerate(plains[0]["line_scan"]):
        accs = [med(run["line_scan"][i]["acc"][j] for run in plains)
                for j in range(len(effopd.SCAN_MULTIPLIERS))]
        best = max(range(len(accs)), key=lambda j: accs[j])
        out.append({"window": tuple(entry["window"]),
                    "rel_norm": med(r["line_scan"][i]["rel_norm"] for r in plains),
                    "acc": accs, "best_m": effopd.SCAN_MULTIPLIERS[best]})
    return out


def pow2_windows(scan: list[dict]) -> list[dict]:
    """The scanned windows s/2 → s: the ones EffOPD's searches see when nothing is kept."""
    return [w for w in scan if w["window"][1] == 2 * w["window"][0]]


def steepest(scan: list[dict]) -> dict:
    """The pow2 window along which accuracy rose most (m = 1 against m = 0): where the learning was."""
    one, zero = effopd.SCAN_MULTIPLIERS.index(1.0), effopd.SCAN_MULTIPLIERS.index(0.0)
    return max(pow2_windows(scan), key=lambda w: w["acc"][one] - w["acc"][zero])


def summarise(regime, runs: dict) -> dict:  # noqa: ANN001 - a Regime
    plains = runs["plain"]
    scan = scan_summary(plains)
    picture = effopd.dynamics_picture(plains)
    out = {
        "regime": regime, "scan": scan, "last": pow2_windows(scan)[-1], "rise": steepest(scan),
        # the 16-step window ending at the last pow2 step
        "short": [w for w in scan if w["window"][1] - w["window"][0] == 16][-1],
        "acc0": med(effopd.grid(p)[0]["acc"] for p in plains),
        "acc_end": med(effopd.grid(p)[-1]["acc"] for p in plains),
        "energy": med(v["top1_energy"] for v in picture.values()),
        "cos": med(v["u1_cos"] for v in picture.values()), "arms": {},
    }
    for arm in regime.arms[1:]:
        rows = speedups(plains, runs[arm])
        searches = [h for run in runs[arm] for h in run["effopd_history"]]
        out["arms"][arm] = {
            "rows": rows, "speedup": med(r["speedup"] for r in rows if r),
            "wall": med(r["wall_speedup"] for r in rows if r),
            "delta": [effopd.grid(e)[-1]["acc"] - effopd.grid(p)[-1]["acc"]
                      for p, e in zip(plains, runs[arm])],
            "kept": sum(h["multiplier"] > 1 for h in searches), "searches": len(searches),
        }
    return out


# ----- reporting --------------------------------------------------------------------------------------
def fmt_x(value: float, row: dict | None = None) -> str:
    if row is None or math.isnan(value):
        return "—"
    return ("" if row["reached"] else "< ") + f"{value:.2f}×"


def render(summaries: list[dict], seeds: list[int], meta: dict) -> str:
    lines = intro_lines(seeds, meta) + regime_lines(summaries) + scan_lines(summaries)
    lines += ["", "![EffOPD speed-up against window size, and the line scans](effopd_regimes.png)", ""]
    return "\n".join(lines)


def intro_lines(seeds: list[int], meta: dict) -> list[str]:
    """The section's heading and its setup paragraph."""
    return [
        f"## EffOPD across update regimes — {meta['date']} — 2-core CPU (this project's dev machine)",
        "",
        f"`{meta['command']}` (runtime {meta['runtime']}; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end). The quickstart task, models, data and evaluation sets of the "
        "first EffOPD section above (512 reported validation prompts; EffOPD scores its own 512 prompts), "
        "EffOPD as the paper specifies it (pow2 schedule, trials 3, 5, 7, 9, 11 × d); one AdamW learning "
        f"rate per regime, seeds {', '.join(map(str, seeds))}, plain OPD and OPD + EffOPD from the same "
        f"seed. The SFT warm start is the quickstart student after {meta.get('warm_steps', 600)} more steps "
        "of SFT on the reference answers (configs/sft/quickstart_sft.yaml's setting): a student that "
        "starts near a good solution, as post-training starts from a pretrained model. ‖d‖/‖θ‖: how far a "
        "window's update moves EffOPD's parameters (median over seeds, plain runs); best m: where "
        "reported-set accuracy along θ_a + m·d peaks (m = 1 is where training got to, m = 3 EffOPD's first "
        "trial); steepest window: the pow2 window along which accuracy rose most; σ₁² share: median top-1 "
        "energy σ₁²/Σσ² of ΔW = W − W0 over the attention and MLP matrices at the end; |cos u₁|: its top "
        "left singular vector at the end against the one at the reference step. Speed-up: the steps (wall "
        "time) plain OPD needs to first reach T over those EffOPD needs, T = the lower of the two runs' "
        "final accuracies, so two identical runs give 1.00× (< : EffOPD ended below plain OPD; the first "
        "EffOPD section used plain's last step as the numerator instead); — : plain OPD gained less than "
        f"{MIN_GAIN} accuracy, so there is nothing to speed up.",
    ]


def regime_lines(summaries: list[dict]) -> list[str]:
    """One row per regime and EffOPD arm."""
    lines = [
        "",
        "| lr | steps | plain acc step 0 → end | EffOPD score | ‖d‖/‖θ‖ last pow2 window (16-step) | best m "
        "(16-step) | steepest window: ‖d‖/‖θ‖, acc m=1 → m=3 | σ₁² share | \\|cos u₁\\| (ref step) | "
        "searches kept | steps speed-up: median (per seed) | wall speed-up | final acc EffOPD − plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        reg, last, short, rise = s["regime"], s["last"], s["short"], s["rise"]
        for arm, a in s["arms"].items():
            per_seed = ", ".join(fmt_x(r["speedup"], r) if r else "—" for r in a["rows"])
            win = f"{last['window'][0]}→{last['window'][1]}"
            at_one = rise["acc"][effopd.SCAN_MULTIPLIERS.index(1.0)]
            lines.append(
                f"| {reg.label} | {reg.steps} | {s['acc0']:.3f} → {s['acc_end']:.3f} | {SCORE_NAMES[arm]} | "
                f"{last['rel_norm']:.3f} ({win}; {short['rel_norm']:.4f}) | "
                f"{last['best_m']:g} ({short['best_m']:g}) | "
                f"{rise['window'][0]}→{rise['window'][1]}: {rise['rel_norm']:.4f}, "
                f"{at_one:.3f} → {rise['acc'][-1]:.3f} | {s['energy']:.2f} | "
                f"{s['cos']:.2f} ({reg.dyn_every}) | {a['kept']} of {a['searches']} | "
                f"**{a['speedup']:.2f}×** ({per_seed}) | {a['wall']:.2f}× | "
                f"{', '.join(f'{d:+.3f}' for d in a['delta'])} |"
            )
    return lines


def scan_lines(summaries: list[dict]) -> list[str]:
    """The line scans of every regime, best m in bold."""
    multipliers = effopd.SCAN_MULTIPLIERS
    header = "| lr | window a → b | ‖d‖/‖θ_b‖ | " + " | ".join(f"m={m:g}" for m in multipliers) + " |"
    lines = ["", "Line scans (plain runs, median over seeds; reported-set accuracy at θ_a + m·d, best in "
             "bold):", "", header, "|---|---|---|" + "---|" * len(multipliers)]
    for s in summaries:
        for w in s["scan"]:
            best = w["acc"].index(max(w["acc"]))
            cells = " | ".join(f"**{v:.3f}**" if j == best else f"{v:.3f}" for j, v in enumerate(w["acc"]))
            window = f"{w['window'][0]} → {w['window'][1]}"
            lines.append(f"| {s['regime'].label} | {window} | {w['rel_norm']:.4f} | {cells} |")
    return lines


def plot(summaries: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        c, x = colors[i % len(colors)], s["last"]["rel_norm"]
        for arm, a in s["arms"].items():
            marker, shift = ARM_MARKS[arm]  # arms of one regime side by side, not on top of each other
            ys = [r["speedup"] for r in a["rows"] if r]
            left.plot([x * shift] * len(ys), ys, marker, color=c, mfc="none", ms=7)
            if ys:
                left.plot([x * shift], [a["speedup"]], marker, color=c, ms=10,
                          label=f"lr {s['regime'].label}, {SCORE_NAMES[arm]} (median)")
        for w, style in ((s["rise"], "-"), (s["short"], ":")):
            one = w["acc"][effopd.SCAN_MULTIPLIERS.index(1.0)]
            right.plot(effopd.SCAN_MULTIPLIERS, [v - one for v in w["acc"]], style, marker=".", color=c,
                       label=f"lr {s['regime'].label}, {w['window'][0]}→{w['window'][1]} "
                             f"(‖d‖/‖θ‖ {w['rel_norm']:.3f})")
    for i, s in enumerate(summaries):  # where each regime sits, also when no seed had a speed-up
        left.axvline(s["last"]["rel_norm"], color=colors[i % len(colors)], lw=0.6, ls=":")
    left.axhline(1.0, color="grey", lw=0.8)
    left.axhline(3.0, color="grey", lw=0.8, ls="--", label="paper: ~3× fewer steps")
    left.set_xscale("log")
    xs = [s["last"]["rel_norm"] for s in summaries]
    left.set_xlim(min(xs) / 2, max(xs) * 2)
    left.set_ylim(0, max(3.5, left.get_ylim()[1]))
    left.set_xlabel("‖d‖/‖θ‖ of the last pow2 window (plain OPD, median over seeds)")
    left.set_ylabel("steps to plain OPD's final accuracy: plain / EffOPD")
    left.legend(fontsize=7)
    right.axhline(0.0, color="grey", lw=0.8)
    right.axvline(3.0, color="grey", lw=0.8, ls="--")
    right.set_xlabel("m along the window's update d (1 = where training got; 3 = EffOPD's first trial)")
    right.set_ylabel("reported accuracy at θ_a + m·d minus at m = 1")
    right.legend(fontsize=6)
    fig.suptitle("EffOPD by update regime (quickstart task): speed-up against window size (left), "
                 "accuracy along the update direction (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_regime(summaries: list[dict]) -> tuple[str, float]:
    """(label, median speed-up) of the regime and score with the highest median speed-up."""
    options = [(f"lr {s['regime'].label}, {SCORE_NAMES[arm]}", a["speedup"])
               for s in summaries for arm, a in s["arms"].items() if not math.isnan(a["speedup"])]
    return max(options, key=lambda o: o[1]) if options else ("none measurable", math.nan)


