"""What a CLI run shows: a bar in steps with the key figures, a closing summary, every command in
--help, third-party noise filtered by its exact text (our warnings kept), and one line for a logger
without its package or a second optimizer slot."""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lit_opd import RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.callbacks import RunSummary, StepProgressBar
from lit_opd.cli import cli_main, console_callbacks, flatten_checkpoint_filename, quiet_third_party
from lit_opd.lora import quiet_bnb_cpu_hint
from lit_opd.tasks import AdditionTask
from tests.helpers import make_module, make_trainer
from tests.integration.cli import refused
from tests.integration.scripts.procs import REPO

pytestmark = pytest.mark.integration
TINY = "configs/tiny/opd.yaml"


def test_help_lists_every_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit_opd"])  # not pytest's own arguments
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "export", "calibrate", "serve-teacher"):
        assert command in out, out


@pytest.mark.parametrize(
    ("logger", "package"), [("TensorBoardLogger", "tensorboard"), ("WandbLogger", "wandb")]
)
def test_a_logger_without_its_package_is_one_line(logger, package, monkeypatch, capsys):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    line = refused(["fit", "--config", TINY, "--trainer.logger", f"lightning.pytorch.loggers.{logger}"],
                   monkeypatch, capsys)
    assert line == (f"error: trainer.logger: {logger} needs the {package} package, which is not installed: "
                    f"pip install 'lit_opd[{package}]' (or log with lightning.pytorch.loggers.CSVLogger)")


@pytest.mark.parametrize("args", [["--optimizer", "torch.optim.SGD"], ["--lr_scheduler.class_path=x.Y"]])
def test_a_top_level_optimizer_is_refused(args, monkeypatch):
    """The method's `optimizer` is the one slot; LightningCLI's top-level one silently replaced it."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit, match=r"model\.init_args\.optimizer / model\.init_args\.scheduler"):
        cli_main(["fit", "--config", TINY, *args])


def test_a_metric_name_with_a_slash_makes_no_subfolder():
    callback = ModelCheckpoint(filename="{step}-{val/accuracy:.3f}")
    flatten_checkpoint_filename(callback)
    name = callback.format_checkpoint_name({"step": torch.tensor(5), "val/accuracy": torch.tensor(0.75)})
    assert name == "step=5-val_accuracy=0.750.ckpt"
    plain = ModelCheckpoint(filename="{epoch}-{step}")
    flatten_checkpoint_filename(plain)
    assert plain.filename == "{epoch}-{step}" and plain.auto_insert_metric_name


def test_the_cli_adds_one_bar_and_a_summary_unless_configured():
    assert [type(c) for c in console_callbacks({}, [])] == [StepProgressBar, RunSummary]
    assert [type(c) for c in console_callbacks({"enable_progress_bar": False}, [])] == [RunSummary]
    assert console_callbacks({}, [TQDMProgressBar(), RunSummary()]) == []


def test_the_bar_counts_steps_and_shows_the_key_figures(char_tok, tmp_path):
    bar, summary = StepProgressBar(), RunSummary()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    data = RolloutDataModule(TaskPrompts(AdditionTask(1, 2), num_rows=24), val_size=4, batch_size=4,
                             sampling=SamplingParams(max_new_tokens=4))
    trainer = make_trainer(tmp_path, max_steps=8, callbacks=[bar, summary, checkpoint],
                           enable_progress_bar=True, logger=CSVLogger(tmp_path), enable_checkpointing=True,
                           limit_val_batches=1, val_check_interval=4, check_val_every_n_epoch=None)
    trainer.fit(make_module(char_tok), data)  # 5 batches per epoch: one bar over both epochs
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (8, 8)
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert list(shown)[:5] == ["loss", "teacher_kl", "entropy", "len", "tok/s"]
    assert "v_num" not in shown and "val/accuracy" in shown
    lines = summary.summary_lines(trainer)
    assert lines[0] == "run summary: 8/8 steps"
    assert lines[1].startswith("  val/accuracy: last ") and "(step 8), best " in lines[1]
    assert f"  last checkpoint: {tmp_path / 'ckpt' / 'last.ckpt'}" in lines
    assert lines[-1].startswith(f"  export: python -m lit_opd export --ckpt_path {tmp_path / 'ckpt'}")


def test_third_party_noise_is_filtered_by_its_text_and_ours_is_kept(caplog):
    from transformers.utils import logging as hf_logging

    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            quiet_third_party()
            leafspec = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
            warnings.warn(leafspec, FutureWarning, stacklevel=1)
            warnings.warn("CollapseWatch: global step 3: ...", UserWarning, stacklevel=1)
            warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
        shown = [str(w.message) for w in record]
        assert shown == ["CollapseWatch: global step 3: ...", "some other deprecation"]
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=rank_zero.name):
        rank_zero.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        rank_zero.info("RESULT quickstart_val_accuracy 0.0 1.0")
    assert [r.getMessage() for r in caplog.records] == ["RESULT quickstart_val_accuracy 0.0 1.0"]


def test_the_bitsandbytes_cpu_hint_is_dropped_while_peft_is_imported(caplog):
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    hint = "Failed to load CPU gemm_4bit_forward from kernels-community: %s."
    with caplog.at_level(logging.WARNING, logger=bnb.name):
        with quiet_bnb_cpu_hint():
            bnb.warning(hint, "no kernels")
            bnb.warning("another bitsandbytes warning")
        bnb.warning(hint, "no kernels")  # outside (a quantized model's own import): shown
    assert [r.msg for r in caplog.records] == ["another bitsandbytes warning", hint]
