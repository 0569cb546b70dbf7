"""CollapseWatch: warns once per kind when the student collapses toward uniform, its completions run
away in length, or validation accuracy falls far below its best; ``stop: true`` ends the run."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch

from lit_opd import Divergence, HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.callbacks.collapse import CUT_KEY, ENTROPY_KEY, LENGTH_KEY, CollapseWatch, TrainingCollapsed
from lit_opd.tasks import AdditionTask
from tests.helpers import make_trainer

ASSETS = "lit_opd/assets/addition"
VOCAB = 104  # the shipped addition student's output vocabulary: ln V = 4.64


def feed(watch: CollapseWatch, steps: list[dict[str, float]], vocab: int = VOCAB) -> list[list[str]]:
    """Each step's metrics through the watch, as its training hook does; the kinds found per step."""
    found = []
    for metrics in steps:
        kinds = watch.new_findings(watch.observe(metrics), vocab)
        watch.warned.update(kinds)
        found.append(kinds)
    return found


def test_entropy_rising_to_uniform_is_found_once():
    watch = CollapseWatch(window=2)
    entropies = [1.6, 1.5, 2.0, 4.4, 4.5, 4.5, 4.6]
    found = feed(watch, [{ENTROPY_KEY: e} for e in entropies])
    assert found == [[], [], [], [], ["entropy"], [], []]  # window mean 4.45 >= 0.9 ln V, then quiet
    assert "ln V = 4.64" in watch.describe("entropy", {ENTROPY_KEY: 4.5}, VOCAB)


def test_a_student_that_starts_uniform_is_not_a_collapse():
    """Random weights give near-uniform entropy from step 1: nothing collapsed."""
    found = feed(CollapseWatch(window=2), [{ENTROPY_KEY: 0.99 * math.log(VOCAB)}] * 6)
    assert not any(found)


def test_runaway_length_and_cut_fraction():
    lengths = feed(CollapseWatch(window=2), [{LENGTH_KEY: v, CUT_KEY: 0.0} for v in (10, 12, 14, 20, 40)])
    assert lengths == [[], [], [], [], ["length"]]  # mean 30 >= 2 x the first window's 11
    cuts = feed(CollapseWatch(window=2), [{LENGTH_KEY: 6.0, CUT_KEY: c} for c in (0.1, 0.1, 0.3, 0.6)])
    assert cuts == [[], [], [], ["length"]]  # 0.45 >= 0.1 + 0.3
    steady = feed(CollapseWatch(window=2), [{LENGTH_KEY: 6.0 + i % 2, CUT_KEY: 0.1} for i in range(8)])
    assert not any(steady)


def test_accuracy_far_below_its_best():
    watch = CollapseWatch(accuracy_drop=0.5)
    assert [watch.accuracy_fell(a) for a in (0.2, 0.6, 0.4, 0.29)] == [False, False, False, True]
    assert watch.best_accuracy == 0.6


@pytest.mark.parametrize(
    "bad", [{"entropy_frac": 0.0}, {"length_ratio": 1.0}, {"window": 0}, {"cut_frac_rise": 2}]
)
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match=f"CollapseWatch.{next(iter(bad))}"):
        CollapseWatch(**bad)


def reverse_kl_run(lr: float, steps: int, callbacks=()) -> L.Trainer:  # noqa: ANN001
    """Reverse KL from the shipped addition student and teacher (the student starts at entropy 1.6)."""
    torch.manual_seed(0)
    module = OPDModule(f"{ASSETS}/student", HFTeacher(f"{ASSETS}/teacher"),
                       objective=Divergence(kind="jsd", beta=1.0),
                       optimizer=lambda params: torch.optim.AdamW(params, lr=lr))
    prompts = TaskPrompts(AdditionTask(max_digits=3, reverse_answer=True), num_rows=256)
    data = RolloutDataModule(prompts, batch_size=16, val_size=0, seed=0,
                             sampling=SamplingParams(max_new_tokens=6, temperature=1.0))
    trainer = make_trainer("unused", steps, callbacks)
    trainer.fit(module, data)
    return trainer


def test_reverse_kl_at_a_too_high_lr_warns_about_collapse_before_the_run_ends():
    """lr 1e-2 sends this student to uniform within a few steps (entropy 1.6 -> 4.5 of ln V = 4.64)
    while the teacher KL falls: the default watch (added by the method) says so, naming the step."""
    collapse = r"CollapseWatch: global step (\d+): the student's entropy"
    with pytest.warns(UserWarning, match=collapse) as record:
        reverse_kl_run(lr=1e-2, steps=10)
    message = next(str(w.message) for w in record if "collapsing toward uniform" in str(w.message))
    assert int(message.split("global step ")[1].split(":")[0]) < 10
    assert "lower model.init_args.optimizer.init_args.lr" in message
    assert sum("the student's entropy" in str(w.message) for w in record) == 1  # once per kind


def test_stop_true_ends_the_run_with_one_error():
    with pytest.raises(TrainingCollapsed, match=r"CollapseWatch \(stop: true\): global step \d+: .*uniform"):
        reverse_kl_run(lr=1e-2, steps=10, callbacks=[CollapseWatch(stop=True)])


def test_a_calm_run_gives_no_warning():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        reverse_kl_run(lr=1e-5, steps=10)
    assert not [w for w in record if "CollapseWatch" in str(w.message)]
