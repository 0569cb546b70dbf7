"""Quickstart across seeds (issue 26): the shipped OPD and SFT quickstart configs on the same seeds,
each seed a paired comparison.

    python benchmarks/bench_quickstart_seeds.py              # seeds 0-4, both configs, ~10 min, 2 cores
    python benchmarks/bench_quickstart_seeds.py --no-record  # the same; RESULTS.md and the plot untouched

Every run is ``python -m lit_opd fit --config <config> --seed_everything S --data.init_args.seed S``
on the shipped ``configs/quickstart.yaml`` (OPD) and ``configs/sft/quickstart_sft.yaml`` (SFT); a seed
fixes the weights' RNG, the data order and the rollout draws, and both methods of a seed share them.
Only the output folders are moved into a temporary directory (``--steps`` and ``--val-rows`` shorten
a run for smoke tests). The greedy validation accuracy before and after comes from the run's own
``RESULT <name> <before> <after>`` line.

Each run's result is cached as JSON in ``--cache-dir`` under the method, a hash of the config file and
of the overrides, and the seed, so a re-render reads the cache and runs nothing; editing a config
changes its hash and reruns it. ``--jobs`` runs (one torch thread each) go at once.

Prints the per-seed table, draws ``benchmarks/quickstart_seeds.png`` (each seed's OPD and SFT
accuracy, joined by a line) and writes this benchmark's dated section into benchmarks/RESULTS.md
(replacing its earlier one); ``--no-record`` leaves both alone and puts the plot in the cache dir.
Ends with ``RESULT quickstart_opd_minus_sft_paired_min <x>`` and
``RESULT quickstart_opd_minus_sft_paired_mean <x>`` (after-accuracy, OPD minus SFT, over the seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml
from common import add_record_options, record, result_line

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("OPD", "SFT")  # the order of the table's columns
HEADING = "## Quickstart across seeds: OPD against SFT, paired"  # this benchmark's RESULTS.md section


def overrides(seed: int, args: argparse.Namespace) -> list[str]:
    """Command-line settings of one run besides the config: the seed, and the smoke-test shortcuts."""
    extra = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    if args.steps is not None:
        extra += ["--trainer.max_steps", str(args.steps)]
    if args.val_rows is not None:
        extra += ["--data.init_args.val_source.init_args.num_rows", str(args.val_rows)]
    return extra


def cache_path(method: str, seed: int, args: argparse.Namespace) -> Path:
    """``<method>_<hash of the config's settings and overrides>_seed<S>.json``: a changed setting is a
    new run; comments, key order and the file's path are not part of the key."""
    settings = yaml.safe_load(args.configs[method].read_text())
    key = hashlib.sha256(json.dumps([settings, overrides(-1, args)], sort_keys=True).encode()).hexdigest()
    return args.cache_dir / f"{method.lower()}_{key[:12]}_seed{seed}.json"


def relocated_config(config: Path, out_dir: Path) -> Path:
    """The shipped config with its logs and checkpoints sent to ``out_dir``, so a run never writes
    into (or resumes from) the user's ``runs/`` folder; every training setting stays as shipped."""
    cfg = yaml.safe_load(config.read_text())
    trainer = cfg["trainer"]
    trainer["default_root_dir"] = str(out_dir)
    trainer["logger"]["init_args"]["save_dir"] = str(out_dir)
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out_dir / "checkpoints")
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """One ``lit_opd fit`` of the shipped config (through ``cli_main``, as ``python -m lit_opd`` runs
    it); the before/after accuracy of its AccuracyReport, timed and cached."""
    from lit_opd.callbacks import AccuracyReport
    from lit_opd.cli import cli_main

    with tempfile.TemporaryDirectory(prefix=f"quickstart_{method.lower()}_{seed}_") as tmp:
        config = relocated_config(args.configs[method], Path(tmp))
        started = time.perf_counter()
        with warnings.catch_warnings():  # the benchmark's own argv is not the run's: LightningCLI warns
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            cli = cli_main(["fit", "--config", str(config), *overrides(seed, args)])
        seconds = time.perf_counter() - started
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AccuracyReport))
    result = {"method": method, "config": shown(args.configs[method]), "seed": seed,
              "overrides": overrides(seed, args),
              "before": round(report.before, 4), "after": round(report.after, 4),
              "seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d")}
    cache_path(method, seed, args).write_text(json.dumps(result, indent=1) + "\n")
    return result


def one_thread() -> None:
    """Pool workers share the cores: one torch thread each, as ``--jobs`` promises."""
    import torch

    torch.set_num_threads(1)


def collect(seeds: list[int], args: argparse.Namespace) -> tuple[dict, int]:
    """``{method: {seed: result}}`` from the cache, running what is missing; and how many ran."""
    results: dict = {m: {} for m in METHODS}
    missing = []
    for method in METHODS:
        for seed in seeds:
            path = cache_path(method, seed, args)
            if path.exists():
                results[method][seed] = json.loads(path.read_text())
            else:
                missing.append((method, seed))
    if not missing:
        return results, 0
    parallel = args.jobs > 1 and len(missing) > 1  # spawn: a fresh interpreter per worker, one thread each
    with ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn"), one_thread) if parallel \
            else contextlib.nullcontext() as pool:
        methods, run_seeds = zip(*missing)
        for result in (pool.map if parallel else map)(run_one, methods, run_seeds, [args] * len(missing)):
            results[result["method"]][result["seed"]] = result
            print(f"{method_seed(result)}: {result['before']:.3f} -> {result['after']:.3f} "
                  f"({result['seconds']:.0f} s)", flush=True)
    return results, len(missing)


def paired_differences(results: dict, seeds: list[int]) -> list[float]:
    return [results["OPD"][s]["after"] - results["SFT"][s]["after"] for s in seeds]


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def render(results: dict, seeds: list[int], ran: int, plot_name: str, args: argparse.Namespace) -> str:
    diffs = paired_differences(results, seeds)
    opd, sft = ([results[m][s]["after"] for s in seeds] for m in METHODS)
    dates = sorted({results[m][s]["date"] for m in METHODS for s in seeds})
    lines = [
        f"{HEADING} — {dates[-1]} — 2-core CPU (this project's dev machine)", "",
        f"`python benchmarks/bench_quickstart_seeds.py` ({ran} of {2 * len(seeds)} runs ran in this call, "
        f"the others were read from `{shown(args.cache_dir.resolve())}`; runs dated {', '.join(dates)}): "
        f"`{shown(args.configs['OPD'])}` (OPD; {training(args.configs['OPD'])}) and "
        f"`{shown(args.configs['SFT'])}` (SFT; {training(args.configs['SFT'])}), each with "
        f"`--seed_everything S --data.init_args.seed S` for seeds {', '.join(map(str, seeds))}. A seed fixes "
        "data order and sampling for both methods, so each seed is one paired comparison. Accuracy: greedy "
        "exact match on the validation sums, from each run's own `RESULT` line.", "",
        "| seed | OPD before → after | SFT before → after | OPD − SFT |", "|---|---|---|---|",
    ]
    for seed, diff in zip(seeds, diffs):
        opd_run, sft_run = results["OPD"][seed], results["SFT"][seed]
        lines.append(f"| {seed} | {before_after(opd_run)} | {before_after(sft_run)} | {diff:+.3f} |")
    lines += [f"| mean (min–max) | {spread(opd)} | {spread(sft)} | {statistics.mean(diffs):+.3f} "
              f"({min(diffs):+.3f}–{max(diffs):+.3f}) |", "",
              f"OPD above SFT on {sum(d > 0 for d in diffs)} of {len(seeds)} seeds; OPD's after-accuracy "
              f"spans {max(opd) - min(opd):.3f}. Mean wall time a run (one torch thread, up to {args.jobs} "
              f"at once, beside whatever else the machine ran: not a speed figure): OPD "
              f"{mean_seconds(results['OPD'], seeds)}, SFT {mean_seconds(results['SFT'], seeds)}.",
              "", f"![OPD against SFT per seed]({plot_name})", "", "```", *result_lines(diffs), "```", ""]
    return "\n".join(lines)


def training(config: Path) -> str:
    """The budget and optimizer of a config in a few words: steps, batch, lr and its schedule."""
    cfg = yaml.safe_load(config.read_text())
    model = cfg["model"]["init_args"]
    text = (f"{cfg['trainer']['max_steps']} steps of {cfg['data']['init_args']['batch_size']} prompts, "
            f"{model['optimizer']['class_path'].split('.')[-1]} lr {model['optimizer']['init_args']['lr']:g}")
    schedule = model.get("scheduler")
    if schedule is not None:
        settings = ", ".join(f"{k} {v}" for k, v in schedule.get("init_args", {}).items())
        text += f", {schedule['class_path'].split('.')[-1]} ({settings})"
    return text


def before_after(run: dict) -> str:
    return f"{run['before']:.3f} → {run['after']:.3f}"


def method_seed(run: dict) -> str:
    return f"{run['method']} seed {run['seed']}"


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def mean_seconds(runs: dict, seeds: list[int]) -> str:
    return f"{statistics.mean(runs[s]['seconds'] for s in seeds):.0f} s"


def result_lines(diffs: list[float]) -> list[str]:
    return [result_line("quickstart_opd_minus_sft_paired_min", min(diffs)),
            result_line("quickstart_opd_minus_sft_paired_mean", statistics.mean(diffs))]


def plot(results: dict, seeds: list[int], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, seed in enumerate(seeds):
        ys = [results["SFT"][seed]["after"], results["OPD"][seed]["after"]]
        ax.plot([0, 1], ys, "-o", color=colors[i % len(colors)], label=f"seed {seed}")
    before = statistics.mean(results["OPD"][s]["before"] for s in seeds)
    ax.axhline(before, color="grey", lw=0.8, ls="--", label=f"before training ({before:.3f})")
    ax.set_xticks([0, 1], [f"{m}\n{shown(args.configs[m])}" for m in ("SFT", "OPD")], fontsize=8)
    ax.set_xlim(-0.4, 1.4)
    ax.set_ylim(0, 1.03)
    ax.set_ylabel("greedy val accuracy after training")
    ax.set_title("Quickstart, paired seeds: SFT → OPD", fontsize=10)
    ax.legend(fontsize=7, loc="lower center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--opd-config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--sft-config", type=Path, default=ROOT / "configs" / "sft" / "quickstart_sft.yaml")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--steps", type=int, help="override trainer.max_steps (smoke tests)")
    parser.add_argument("--val-rows", type=int, help="override the validation prompts (smoke tests)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "cache" / "quickstart_seeds")
    add_record_options(parser, " and the plot")
    parser.add_argument("--plot", type=Path, help="default: benchmarks/, or the cache dir with --no-record")
    args = parser.parse_args()
    args.configs = {"OPD": args.opd_config.resolve(), "SFT": args.sft_config.resolve()}
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)  # the configs name the models by paths relative to the checkout
    if args.plot is None:
        args.plot = (args.cache_dir if args.no_record else ROOT / "benchmarks") / "quickstart_seeds.png"
    results, ran = collect(args.seeds, args)
    plot(results, args.seeds, args.plot, args)
    plot_name = os.path.relpath(args.plot.resolve(), args.results.resolve().parent)
    section = render(results, args.seeds, ran, plot_name, args)
    print(section)
    record(args, section)
    for line in result_lines(paired_differences(results, args.seeds)):
        print(line)


if __name__ == "__main__":
    main()
