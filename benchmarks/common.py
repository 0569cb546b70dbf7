"""What every benchmark shares: the quiet trainer, the RESULTS.md section writer, the ``--no-record``
flag, the ``RESULT`` line, a step timer, and the small helpers several scripts need.

A benchmark imports this module (``from common import ...``: ``python benchmarks/bench_x.py`` puts
``benchmarks/`` first on ``sys.path``) and never another benchmark. Heavy libraries (torch,
Lightning, matplotlib) are imported inside the functions that need them, so a script's parent
process that only launches workers stays light.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# A section's identity is its heading with the run's date blanked: a rerun on the same machine
# replaces its own section, another machine's run (another heading) gets its own.
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SECTION_HEADING = re.compile(r"^## .*$", flags=re.M)


# ----- training ----------------------------------------------------------------------------------
def trainer(max_steps: int, callbacks: Sequence = (), **settings: Any):  # noqa: ANN201 - an L.Trainer
    """A quiet CPU trainer for a benchmark's fits: no logger, checkpoints, progress bar, model summary
    or validation loop unless ``settings`` say otherwise (the defaults of ``tests/helpers.make_trainer``)."""
    import lightning as L

    quiet = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                 num_sanity_val_steps=0)
    return L.Trainer(callbacks=list(callbacks), **{**quiet, **settings})


def save_student(module: Any, out: Path) -> None:
    """Save a method's student and tokenizer in Hugging Face format to ``out``, written beside it
    first and renamed into place, so a crash never leaves a half-written model that a later run
    would take for a cached one."""
    import shutil

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    module.student.save_pretrained(partial)
    module.tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def step_timer():  # noqa: ANN201 - an L.Callback
    """A callback that stamps the wall clock at every training-step end (``ends``; ``times``: the
    seconds between consecutive ends, i.e. a whole step with its rollout) and keeps each rollout
    batch's ``num_tokens`` and ``rollout_seconds``. ``created``: when it was made."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.created = time.perf_counter()
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self.rollout_s: list[float] = []

        @property
        def times(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.ends.append(time.perf_counter())
            self.tokens.append(batch.num_tokens)
            self.rollout_s.append(batch.rollout_seconds)

    return StepTimer()


def qwen3_config(hidden: int, layers: int, inter: int, vocab: int, heads: int = 16, kv: int = 8):  # noqa: ANN201
    """A Qwen3 layout (random init, built from the config: nothing is downloaded) for the GPU-scale runs."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=True,
    )


def load_avg() -> str:
    """The 1, 5 and 15-minute load averages, as the sections quote them ("n/a" off Linux)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----- recording ---------------------------------------------------------------------------------
def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line, its module docstring (how to run it, what it measures) as the help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


class _NoRecord(argparse.Action):
    """``--no-record``; its old spelling ``--no-append`` still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        if option_string == "--no-append":
            warnings.warn("--no-append is deprecated: use --no-record", FutureWarning, stacklevel=2)
        namespace.no_record = True


def add_record_options(parser: argparse.ArgumentParser, what: str = "", results_file: bool = True) -> None:
    """The recording options every benchmark takes: ``--no-record`` (leave RESULTS.md, and the plot
    in ``benchmarks/``, untouched; ``--no-append`` is its deprecated alias) and ``--results`` (the
    file the section is written into; ``results_file=False`` for a script that writes no section).
    ``what``: what else ``--no-record`` leaves alone, for the help."""
    parser.add_argument("--no-record", "--no-append", dest="no_record", action=_NoRecord, nargs=0,
                        default=False, help=f"leave RESULTS.md{what} untouched (--no-append: old name)")
    if results_file:
        parser.add_argument("--results", type=Path, default=RESULTS, help="the results file (%(default)s)")


def section_key(heading: str) -> str:
    """What identifies a section: its ``## `` heading line with the run's date blanked."""
    return _DATE.sub("<date>", heading.strip())


def write_section(path: Path, section: str) -> str:
    """Write a benchmark's dated section into ``path``: replace the section with the same heading
    (``section_key``; from that heading to the next ``## `` heading) in place, or append it when
    there is none. Returns what was done, for the log line."""
    section = section.strip("\n") + "\n"
    key = section_key(section.splitlines()[0])
    if not key.startswith("## "):
        raise ValueError(f"a RESULTS.md section starts with its '## ' heading, got {key!r}")
    text = path.read_text() if path.exists() else ""
    found = [m for m in _SECTION_HEADING.finditer(text) if section_key(m.group()) == key]
    if len(found) > 1:
        raise SystemExit(f"{path} has {len(found)} sections headed {key!r}; merge them by hand first")
    if not found:
        gap = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        path.write_text(text + gap + section)
        return "appended to"
    start = found[0].start()
    after = _SECTION_HEADING.search(text, found[0].end())
    tail = text[after.start():] if after else ""
    path.write_text(text[:start] + section + ("\n" + tail if tail else ""))
    return "replaced its section in"


def record(args: argparse.Namespace, section: str) -> None:
    """Write ``section`` into ``args.results`` unless ``--no-record`` (or ``--quick``) says not to."""
    if args.no_record or getattr(args, "quick", False):
        return
    print(f"{write_section(args.results, section)} {args.results}")


def with_notes(section: str, notes: Path | None) -> str:
    """``section`` with a hand-written Markdown reading (``--notes FILE``) appended: one write for both."""
    return section if notes is None else section + "\n" + notes.read_text().strip() + "\n"


def result_line(name: str, *values: object, digits: int = 4) -> str:
    """``RESULT <name> <values>``: the line a benchmark ends with; floats to ``digits`` decimals."""
    cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values]
    return " ".join(["RESULT", name, *cells])


def print_result(name: str, *values: object, digits: int = 4) -> None:
    print(result_line(name, *values, digits=digits), flush=True)
