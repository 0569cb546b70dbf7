"""Validation and test scoring: the Evaluation settings, pass@k, per-domain sums, the completions
table, test_source, and evaluate() staying greedy."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_opd import Evaluation, ListPrompts, PolicyModule, RolloutDataModule, SamplingParams
from lit_opd.rollout import pass_at_k
from lit_opd.rollout.evaluation import EvaluationMetric, markdown_table
from lit_opd.tasks import AdditionTask
from tests.helpers import make_module, make_trainer
from tests.integration.scripts.procs import REPO, clean_env, free_port, run

TEACHER = "lit_opd/assets/addition/teacher"  # trained: right on most sums, wrong on some when sampled hot


def _domain_rows(n: int, seed: int = 0) -> list[dict]:
    rows = AdditionTask(max_digits=3, reverse_answer=True).make_rows(n, seed)
    return [dict(row, domain="short" if len(row["prompt"]) <= 6 else "long") for row in rows]


def _validate(evaluation: Evaluation, root: Path, rows: list[dict] | None = None, **data) -> tuple:  # noqa: ANN003
    """``trainer.validate`` of the trained asset on ``rows``; (metrics, trainer, module, datamodule)."""
    rows = rows or _domain_rows(16)
    module = PolicyModule(TEACHER)
    dm = RolloutDataModule(ListPrompts(rows), val_source=ListPrompts(rows), batch_size=4, val_batch_size=6,
                           sampling=SamplingParams(max_new_tokens=6), evaluation=evaluation, **data)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(root), enable_progress_bar=False,
                        enable_model_summary=False)
    [metrics] = trainer.validate(module, dm, verbose=False)
    return metrics, trainer, module, dm


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 1, 1, 0.25), (4, 1, 4, 1.0), (5, 2, 2, 0.7), (4, 0, 2, 0.0), (4, 4, 1, 1.0), (10, 3, 3, 1 - 35 / 120),
])
def test_pass_at_k_matches_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(decoding="sampled", num_samples=4, pass_k=[1, 8]), "Evaluation.pass_k has k=8 > num_samples=4"),
    (dict(pass_k=[0]), "Evaluation.pass_k has k=0; each k must be >= 1"),
    (dict(decoding="sampled", num_samples=4, pass_k=[2, 2]), "lists a k twice"),
    (dict(num_samples=4), "num_samples=4 with decoding='greedy'"),
    (dict(temperature=0.7), "Evaluation.temperature=0.7 has no effect with decoding='greedy'"),
    (dict(decoding="sampled", top_p=0.0), r"Evaluation.top_p must be in \(0, 1\]"),
    (dict(decoding="beam"), "Evaluation.decoding='beam'"),
    (dict(log_completions=-1), "Evaluation.log_completions must be >= 0"),
])
def test_bad_evaluation_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        Evaluation(**settings)


def test_metric_sums_prompts_over_batches_per_domain_and_across_ranks():
    """Counts, not means of batch means: domain "a" has 2 prompts in the first batch and 1 in the second."""
    def fresh() -> EvaluationMetric:
        return EvaluationMetric(num_samples=2, pass_k=[1, 2], domains=["a", "b"], sampled=True)

    metric = fresh()
    metric.update(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]), ["a", "a", "b"])
    metric.update(torch.tensor([1.0, 1.0, 1.0, 0.0]), ["a", None])
    out = {name: round(float(value), 6) for name, value in metric.compute().items()}
    assert out == {
        "accuracy": 0.4, "mean@2": 0.4, "pass@1": 0.4, "pass@2": 0.6, "accuracy/a": 0.5, "pass@1/a": 0.5,
        "pass@2/a": round(2 / 3, 6), "accuracy/b": 0.0, "pass@1/b": 0.0, "pass@2/b": 0.0,
    }
    # Another rank's tally merges by the same sums the DDP sync uses.
    rank0, rank1 = fresh(), fresh()
    rank0.update(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]), ["a", "a", "b"])
    rank1.update(torch.tensor([1.0, 1.0, 1.0, 0.0]), ["a", None])
    rank0.merge_state(rank1)
    assert {k: round(float(v), 6) for k, v in rank0.compute().items()} == out


def test_sampled_validation_logs_pass_at_k_per_domain_and_repeats_on_rerun(tmp_path):
    evaluation = Evaluation(decoding="sampled", temperature=3.0, num_samples=4, pass_k=[1, 4])
    metrics, trainer, module, dm = _validate(evaluation, tmp_path)
    assert {"val/accuracy", "val/mean@4", "val/pass@1", "val/pass@4", "val/accuracy/short",
            "val/accuracy/long", "val/pass@4/short", "val/pass@4/long"} <= set(metrics)
    assert 0.0 < metrics["val/accuracy"] < metrics["val/pass@4"]  # some prompts right only in some samples
    assert metrics["val/pass@1"] == pytest.approx(metrics["val/accuracy"])  # unbiased pass@1 = c/n
    counts = {d: sum(r["domain"] == d for r in _domain_rows(16)) for d in ("short", "long")}
    total = sum(metrics[f"val/accuracy/{d}"] * c for d, c in counts.items()) / 16
    assert metrics["val/accuracy"] == pytest.approx(total)  # prompt-weighted, across 3 batches
    [again] = trainer.validate(module, dm, verbose=False)
    assert again == metrics  # seeded by (seed, step): the same completions every time
    greedy = RolloutDataModule(ListPrompts(_domain_rows(16)), val_source=ListPrompts(_domain_rows(16)),
                               sampling=SamplingParams(max_new_tokens=6))
    greedy.trainer = trainer
    greedy.setup("validate")
    assert dm.evaluate(module) == greedy.evaluate(module)  # evaluate() stays greedy for the callbacks


def test_greedy_validation_logs_accuracy_as_evaluate_does(tmp_path):
    metrics, _, module, dm = _validate(Evaluation(), tmp_path)
    assert metrics["val/accuracy"] == pytest.approx(dm.evaluate(module)["accuracy"])
    assert not any("pass@" in key or "mean@" in key for key in metrics)
    assert "val/accuracy/short" in metrics


def test_completions_table_is_appended_to_the_csv_loggers_dir_each_validation(tmp_path):
    metrics, trainer, module, dm = _validate(Evaluation(log_completions=3), tmp_path)
    trainer.validate(module, dm, verbose=False)
    lines = (Path(trainer.logger.log_dir) / "completions.jsonl").read_text().splitlines()
    table = [json.loads(line) for line in lines]
    rows = _domain_rows(16)
    assert len(table) == 6 and table[:3] == table[3:]
    for entry, row in zip(table, rows[:3] * 2):
        assert entry["stage"] == "val" and entry["step"] == 0
        assert entry["prompt"] == row["prompt"] and entry["answer"] == row["answer"]
        assert entry["domain"] == row["domain"]
        assert entry["score"] == float(entry["completion"] == row["answer"])


def test_trainer_test_uses_test_source_else_the_validation_rows(tmp_path):
    val_rows, test_rows = _domain_rows(6), [dict(r, domain="held_out") for r in _domain_rows(4, seed=9)]
    test_source = ListPrompts(test_rows)
    _, trainer, module, dm = _validate(Evaluation(), tmp_path, rows=val_rows, test_source=test_source)
    [tested] = trainer.test(module, dm, verbose=False)
    assert [r["row"] for r in dm.test_rows] == test_rows
    assert set(tested) == {"test/accuracy", "test/accuracy/held_out"}
    _, trainer, module, dm = _validate(Evaluation(), tmp_path, rows=val_rows)
    assert dm.test_rows is dm.val_rows
    [tested] = trainer.test(module, dm, verbose=False)
    assert set(tested) == {"test/accuracy", "test/accuracy/short", "test/accuracy/long"}


class LenientPrompts(ListPrompts):
    """A source with its own checker (as a user's custom source would have): anything goes."""

    def verify(self, completion: str, answer: str | None) -> bool:
        return True


def test_test_rows_are_graded_by_the_test_sources_own_checker(tmp_path):
    wrong = [dict(r, answer="x") for r in _domain_rows(4, seed=9)]  # no completion matches exactly
    _, trainer, module, dm = _validate(Evaluation(), tmp_path, rows=_domain_rows(4),
                                       test_source=LenientPrompts(wrong))
    [tested] = trainer.test(module, dm, verbose=False)
    assert tested["test/accuracy"] == 1.0


@pytest.mark.integration
def test_ddp_validation_sums_both_ranks_prompts(tmp_path):
    """Every logged figure, on both ranks, is the prompt-weighted result over the 12 prompts the two
    ranks decoded between them (6 each, in uneven batches), per domain too."""
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run([str(REPO / "tests" / "rollout" / "ddp_validate.py"), str(tmp_path)], timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    scores = [s for rank in ranks for s in rank["scores"]]
    domains = [d for rank in ranks for d in rank["domains"]]
    assert len(scores) == 12 and all(len(rank["scores"]) == 6 for rank in ranks)
    expected = {}
    for suffix, keep in (("", set(domains)), ("/short", {"short"}), ("/long", {"long"})):
        chosen = [s for s, d in zip(scores, domains) if d in keep]
        expected[f"val/accuracy{suffix}"] = sum(sum(s) / 4 for s in chosen) / len(chosen)
        expected[f"val/pass@4{suffix}"] = sum(pass_at_k(4, int(sum(s)), 4) for s in chosen) / len(chosen)
    for rank in ranks:
        assert {k: rank["metrics"][k] for k in expected} == pytest.approx(expected)
    assert 0.0 < expected["val/accuracy"] < expected["val/pass@4"]


def test_completions_during_fit_carry_the_step_and_skip_the_sanity_check(tmp_path, char_tok):
    rows = [dict(r, domain="a" if i % 2 else "b") for i, r in enumerate(_domain_rows(8))]
    data = RolloutDataModule(ListPrompts(rows), val_source=ListPrompts(rows[:4]), batch_size=2,
                             sampling=SamplingParams(max_new_tokens=4),
                             evaluation=Evaluation(log_completions=2))
    trainer = make_trainer(tmp_path, 2, logger=CSVLogger(tmp_path), val_check_interval=2,
                           check_val_every_n_epoch=None, limit_val_batches=None, num_sanity_val_steps=1)
    trainer.fit(make_module(char_tok), data)
    table = [json.loads(line) for line in (Path(trainer.logger.log_dir) / "completions.jsonl").open()]
    assert [(entry["step"], entry["prompt"], entry["domain"]) for entry in table] == [
        (2, rows[0]["prompt"], "b"), (2, rows[1]["prompt"], "a")]
    assert {"val/accuracy", "val/accuracy/a", "val/accuracy/b"} <= set(trainer.callback_metrics)


def test_markdown_table_for_tensorboard_keeps_pipes_and_newlines_inside_cells():
    row = dict(step=3, prompt="a|b=", completion="1\n2", answer="12", score=0.0, domain=None)
    header, rule, line = markdown_table([row]).splitlines()
    assert header == "| step | prompt | completion | answer | score | domain |"
    assert rule == "|---|---|---|---|---|---|"
    assert line == "| 3 | a\\|b= | 1<br>2 | 12 | 0.0 | None |"
