"""The ListOPD cliff benchmark's analysis (``bench_listopd_cliff.py``): the onset of the parse-rate
drop on the λ grid, the per-λ table and the plot, from the runs the benchmark saved."""

from __future__ import annotations

import statistics
from pathlib import Path

from common import pyplot


def medians(runs: list[dict], grid: list[float], key: str) -> list[float]:
    return [statistics.median(r[key] for r in runs if r["lam"] == lam) for lam in grid]


def onset_index(levels: list[float], drop: float = 0.10) -> int | None:
    """First grid index whose level is ≥ ``drop`` below the level at the smallest λ; None if none."""
    return next((i for i, v in enumerate(levels) if v <= levels[0] - drop), None)


def seed_onsets(runs: list[dict], grid: list[float], key: str) -> dict[int, int | None]:
    seeds = sorted({r["seed"] for r in runs})
    return {s: onset_index([next(r[key] for r in runs if r["seed"] == s and r["lam"] == lam) for lam in grid])
            for s in seeds}


def fmt_onset(index: int | None, grid: list[float]) -> str:
    return "none in grid" if index is None else f"λ={grid[index]:.4f} (index {index})"


def table(runs: list[dict], grid: list[float], lam_star: float, centre: int | None, warm: dict) -> str:
    """Markdown: the warm start, then per grid λ the seed medians (sampled parse per seed too)."""
    head = ("| λ | λ/λ* | parse sampled: median (per seed) | parse greedy | NDCG@1 sampled | NDCG@1 greedy "
            "| tail ratio at end | clip frac |")
    lines = [head, "|---|---|---|---|---|---|---|---|",
             f"| SFT warm start | — | {warm['parse_sampled']:.3f} | {warm['parse_greedy']:.3f} | "
             f"{warm['ndcg_sampled']:.3f} | {warm['ndcg_greedy']:.3f} | 1 | — |"]
    for i, lam in enumerate(grid):
        rs = sorted((r for r in runs if r["lam"] == lam), key=lambda r: r["seed"])

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        seeds = ", ".join(f"{r['parse_sampled']:.3f}" for r in rs)
        mark = " **(λ*)**" if i == centre else ""
        lines.append(f"| {lam:.4f}{mark} | {lam / lam_star:.2f} | {med('parse_sampled'):.3f} ({seeds}) | "
                     f"{med('parse_greedy'):.3f} | {med('ndcg_sampled'):.3f} | {med('ndcg_greedy'):.3f} | "
                     f"{med('tail_ratio'):.3f} | {statistics.mean(r['clip_frac'] for r in rs):.3f} |")
    return "\n".join(lines)


def plot(runs: list[dict], grid: list[float], lam_star: float, warm: dict, path: Path, k: int) -> None:
    """Parse rate and NDCG@1 against λ: thin lines per seed, the seed median, the warm start, λ*."""
    import matplotlib.ticker

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    seeds = sorted({r["seed"] for r in runs})
    panels = ((axes[0], "parse", "strict parse rate"), (axes[1], "ndcg", "NDCG@1 on parsed outputs"))
    for ax, metric, label in panels:
        for mode, colour in (("sampled", "tab:blue"), ("greedy", "tab:orange")):
            key = f"{metric}_{mode}"
            for s in seeds:
                ys = [next(r[key] for r in runs if r["seed"] == s and r["lam"] == lam) for lam in grid]
                ax.plot(grid, ys, color=colour, alpha=0.3, lw=1)
            ax.plot(grid, medians(runs, grid, key), color=colour, lw=2.2, marker="o",
                    label=f"{mode}: seed median")
            ax.axhline(warm[key], color=colour, ls=":", lw=1.5, label=f"{mode}: SFT warm start")
        ax.axvline(lam_star, color="k", ls="--", lw=1.2, label=f"predicted λ* = {lam_star:.3f}")
        if max(grid) / min(grid) > 2.5:  # points far above λ*: a log axis keeps the fine grid readable
            ax.set_xscale("log")
            ticks = (0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8)
            ax.set_xticks([t for t in ticks if min(grid) * 0.9 <= t <= max(grid) * 1.1])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("λ (reward extrapolation)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"ListOPD on RankingTask K={k}: {len(seeds)} seeds (thin lines), "
                 f"{len(runs) // len(seeds)} λ values, held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def analyse(res: dict) -> dict:
    grid, centre, runs = res["grid"], res["centre"], res["runs"]
    s_on = onset_index(medians(runs, grid, "parse_sampled"))
    g_on = onset_index(medians(runs, grid, "parse_greedy"))
    return {"sampled": s_on, "greedy": g_on, "per_seed": seed_onsets(runs, grid, "parse_sampled"),
            "error": abs(s_on - centre) if s_on is not None else len(grid) - centre}


