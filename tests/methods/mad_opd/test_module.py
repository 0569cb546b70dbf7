"""MADOPDModule with real teachers (the trained addition teacher and a tiny random model of the same
char tokenizer): each mode's loss against a hand-built one, one clear error per bad setting, short
fits that move the student and log every metric, and a resume that repeats the unbroken losses."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lit_opd import HFTeacher, ListPrompts, RolloutDataModule, SamplingParams, TeacherCapability
from lit_opd.methods.mad_opd import DebateSettings, MADOPDModule
from lit_opd.models import completion_logits
from lit_opd.objectives import Divergence, SampledReward
from lit_opd.objectives import divergences as D
from lit_opd.tasks import AdditionTask, char_tokenizer
from lit_opd.teachers import TeacherGroup
from tests.helpers import make_rollout_batch, make_tiny_model, make_trainer
from tests.teachers.test_group import CountingTeacher

TEACHER = str(Path(__file__).resolve().parents[3] / "lit_opd" / "assets" / "addition" / "teacher")
PROMPTS, COMPLETIONS = ("12+3=", "4+56=", "7+8=", "99+1="), ("51", "06", "5", "001")
ROWS = [{"prompt": p, "domain": d} for p, d in zip(PROMPTS, ("math", "code", "math", "code"))]
ROUTES = {"math": "big", "code": "tiny"}
DEBATE = DebateSettings(rounds=2, max_new_tokens=4, confidence="tag_or_logprob")


class ScoreOnlyTeacher(CountingTeacher):
    """Full logits (say) but no text: it cannot debate."""

    capability = TeacherCapability.FULL_LOGITS


@pytest.fixture(scope="module")
def teachers(char_tok):
    return {"big": HFTeacher(TEACHER), "tiny": HFTeacher(make_tiny_model(len(char_tok), 32, 2, seed=1),
                                                        tokenizer=char_tok, name="tiny")}


def _module(tok, teachers, **kwargs) -> MADOPDModule:  # noqa: ANN003
    kwargs.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-2))
    return MADOPDModule(make_tiny_model(len(tok), 32, 2, seed=0), teachers, tokenizer=tok, **kwargs)


def _row_losses(module: MADOPDModule, batch, teacher: HFTeacher) -> torch.Tensor:  # noqa: ANN001
    """Each row's token-mean JSD(β = 0.5) to ``teacher``, from the full batch's logits."""
    values_BT = D.rows_divergence(completion_logits(module.student, batch), teacher.score(batch).logits_BTV,
                                  "jsd", 0.5, 0.1, 1.0)
    mask_BT = batch.loss_mask_BT
    return (values_BT * mask_BT).sum(-1) / mask_BT.sum(-1)


def test_routed_sends_each_row_to_its_teacher(char_tok, teachers):
    module = _module(char_tok, teachers, mode="routed", route_field="domain", routes=ROUTES)
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, rows=ROWS)
    judged = module.judge(batch)
    whole = {name: t.score(batch).logits_BTV for name, t in teachers.items()}
    for i, row in enumerate(ROWS):  # stitched rows equal each row's own teacher on the whole batch
        torch.testing.assert_close(judged.outputs[0].logits_BTV[i], whole[ROUTES[row["domain"]]][i],
                                   atol=1e-5, rtol=1e-5)
    loss, metrics = module.mad_loss(batch)
    per_row = {n: _row_losses(module, batch, t) for n, t in teachers.items()}
    expected = torch.stack([per_row[ROUTES[r["domain"]]][i] for i, r in enumerate(ROWS)])
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert metrics["loss/math"].item() == pytest.approx(expected[[0, 2]].mean().item(), rel=1e-5)
    assert {"loss/code", "teacher_kl/math", "teacher_kl/code", "top1_agreement"} <= set(metrics)


def test_an_unmapped_route_value_names_field_value_and_known_keys(char_tok, teachers):
    module = _module(char_tok, teachers, mode="routed", route_field="domain", routes=ROUTES)
    law = {"prompt": "4+56=", "domain": "law"}
    batch = make_rollout_batch(char_tok, PROMPTS[:2], COMPLETIONS[:2], rows=[ROWS[0], law])
    with pytest.raises(ValueError, match=r"domain='law'.*known domain values: \['code', 'math'\]"):
        module.mad_loss(batch)


def test_fixed_weights_mix_the_per_teacher_losses(char_tok, teachers):
    module = _module(char_tok, teachers, mode="fixed", weights={"big": 3, "tiny": 1})
    batch = make_rollout_batch(char_tok, PROMPTS, COMPLETIONS, rows=ROWS)
    loss, metrics = module.mad_loss(batch)
    big, tiny = (_row_losses(module, batch, teachers[n]) for n in ("big", "tiny"))
    expected = 0.75 * big + 0.25 * tiny
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert metrics["weight/big"].item() == pytest.approx(0.75) and metrics["coverage/tiny"].item() == 1.0
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters() if p.requires_grad)


def test_the_sampling_temperature_flag_reads_the_datamodule(char_tok, teachers):
    module = _module(char_tok, teachers, mode="fixed", divide_by_sampling_temperature=True)
    with pytest.raises(ValueError, match="divide_by_sampling_temperature needs a RolloutDataModule"):
        module.divergence_temperature()
    data = RolloutDataModule(ListPrompts([{"prompt": "1+1="}]), sampling=SamplingParams(temperature=0.7))
    module._trainer = type("T", (), {"datamodule": data})()
    assert module.divergence_temperature() == 0.7


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="vote"), r"mode='vote': use one of"),
    (dict(objective=SampledReward()), "must be a lit_opd.objectives.Divergence"),
    (dict(objective=Divergence(chunk_size=4)), "chunk_size: null"),
    (dict(objective=Divergence(temperature=2.0), divide_by_sampling_temperature=True), "keep one"),
    (dict(mode="routed"), "mode routed needs route_field"),
    (dict(mode="routed", route_field="domain", weights={"big": 1, "tiny": 1}),
     "weights is a setting of mode fixed"),
    (dict(mode="debate", route_field="domain"), "route_field is a setting of mode routed"),
    (dict(mode="fixed", routes={"x": "big"}), "routes is a setting of mode routed"),
    (dict(mode="fixed", weights={"big": 1}), r"missing \['tiny'\]"),
    (dict(mode="routed", route_field="domain", routes={"x": "huge"}), "teachers that do not exist"),
])
def test_bad_settings_name_the_setting_and_the_fix(char_tok, teachers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _module(char_tok, teachers, **kwargs)


def test_bad_teacher_sets_are_refused_naming_the_teacher(char_tok, teachers):
    with pytest.raises(ValueError, match="at least 2 teachers.*use OPDModule"):
        _module(char_tok, {"big": teachers["big"]}, mode="fixed")
    with pytest.raises(ValueError, match="teacher 'c' .* cannot generate text"):
        _module(char_tok, {"big": teachers["big"], "c": ScoreOnlyTeacher("c")})
    with pytest.raises(ValueError, match="capability FULL_LOGITS"):
        _module(char_tok, {"big": teachers["big"], "c": CountingTeacher("c")}, mode="fixed")
    other = char_tokenizer()
    other.pad_token = "<unk>"
    odd = HFTeacher(make_tiny_model(len(other), 32, 2, seed=4), tokenizer=other, name="odd")
    with pytest.raises(ValueError, match="Student and teacher 'odd' disagree on pad_token_id"):
        _module(char_tok, {"big": teachers["big"], "odd": odd}, mode="fixed")


def test_hyperparameters_hold_names_not_models(char_tok, teachers):
    module = _module(char_tok, TeacherGroup(teachers), mode="fixed")
    assert module.hparams["teachers"] == ["big", "tiny"] and module.hparams["debate"]["rounds"] == 2


# ----- fits ---------------------------------------------------------------------------------------
def _data(rows: int = 16, batch_size: int = 4) -> RolloutDataModule:
    source = [{**r, "domain": "math" if len(r["prompt"]) <= 5 else "code"}
              for r in AdditionTask(1, 2, reverse_answer=True).make_rows(rows, seed=4)]
    return RolloutDataModule(ListPrompts(source), val_size=0, batch_size=batch_size,
                             sampling=SamplingParams(max_new_tokens=4))


MODES = {  # mode: (settings, metrics it logs besides the common ones)
    "routed": (dict(route_field="domain", routes=ROUTES), ["loss/math", "teacher_kl/code", "top1_agreement"]),
    "fixed": (dict(weights={"big": 0.5, "tiny": 0.5}),
              ["div/big", "weight/tiny", "coverage/big", "top1/tiny"]),
    "debate": (dict(debate=DEBATE), ["div/tiny", "weight/big", "coverage/tiny", "top1/big", "debate/tokens",
                                     "debate/seconds", "missing_tag_frac", "context_cut_frac"]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_short_fit_moves_the_student_and_logs_the_metrics(tmp_path, char_tok, teachers, mode):
    kwargs, keys = MODES[mode]
    module = _module(char_tok, teachers, mode=mode, **kwargs)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = make_trainer(tmp_path, 2, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1)
    trainer.fit(module, _data())
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())
    with next(tmp_path.glob("**/metrics.csv")).open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    for key in ["loss", "teacher_kl", "entropy", "skipped_frac", *keys]:
        values = [float(r[f"train/{key}"]) for r in rows]
        assert all(v == v for v in values), (key, values)  # logged every step, never NaN


def _fit(root: Path, teachers: dict, max_steps: int, ckpt_path: str | None = None) -> dict[int, float]:
    losses: dict[int, float] = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            losses[trainer.global_step - 1] = float(outputs["loss"])

    tok = char_tokenizer()
    debate = DebateSettings(rounds=2, max_new_tokens=4, temperature=1.0, confidence="logprob")
    module = _module(tok, teachers, mode="debate", debate=debate, seed=3)
    save = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(root, max_steps, callbacks=[Record(), save], enable_checkpointing=True).fit(
        module, _data(rows=12), ckpt_path=ckpt_path)  # 3 batches an epoch: the resume crosses an epoch
    return losses


def test_resume_repeats_the_unbroken_debate_losses_and_checks_the_teachers(tmp_path, teachers):
    unbroken = _fit(tmp_path / "A", teachers, 5)
    ckpt = tmp_path / "A" / "ckpt" / "epoch=0-step=2.ckpt"
    resumed = _fit(tmp_path / "B", teachers, 5, ckpt_path=str(ckpt))
    assert sorted(resumed) == [2, 3, 4] and len({round(v, 6) for v in resumed.values()}) == 3
    for step, loss in resumed.items():
        assert loss == pytest.approx(unbroken[step], rel=1e-5, abs=1e-6), (step, unbroken, resumed)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert all(k.startswith("student.") for k in saved["state_dict"])
    assert saved["lit_opd"]["teacher"] == {name: t.identity() for name, t in teachers.items()}
    assert saved["lit_opd"]["objective"]["reduction"] == "seq_mean"
    settings = saved["lit_opd"]["mad_opd"]
    assert settings["mode"] == "debate" and settings["debate"]["rounds"] == 2
    swapped = {"big": teachers["tiny"], "tiny": teachers["big"]}
    with pytest.raises(ValueError, match=r"other teachers: \{'big'.*allow_teacher_change"):
        _fit(tmp_path / "C", swapped, 3, ckpt_path=str(ckpt))


def test_yaml_takes_the_teachers_as_a_mapping_or_as_a_teacher_group(tmp_path, capsys, monkeypatch):
    """``--print_config`` of configs/mad_opd/routed.yaml, and of the same run with its teachers and
    routes inside a ``TeacherGroup`` block."""
    import sys

    import yaml

    from lit_opd.cli import cli_main

    repo = Path(__file__).resolve().parents[3]
    cfg = yaml.safe_load((repo / "configs" / "mad_opd" / "routed.yaml").read_text())
    args = cfg["model"]["init_args"]
    group = {key: args.pop(key) for key in ("teachers", "route_field", "routes")}
    args["teachers"] = {"class_path": "lit_opd.teachers.TeacherGroup", "init_args": group}
    (tmp_path / "group.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", ["lit_opd"])
    printed = {}
    for name, path in (("mapping", "configs/mad_opd/routed.yaml"), ("group", str(tmp_path / "group.yaml"))):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["fit", "--config", path, "--print_config"])
        out, err = capsys.readouterr()
        assert exit_.value.code in (0, None), err[-2000:]
        printed[name] = yaml.safe_load(out)["model"]["init_args"]["teachers"]
    assert set(printed["mapping"]) == {"sharp", "soft"}
    assert printed["group"]["class_path"] == "lit_opd.teachers.TeacherGroup"
    assert printed["group"]["init_args"]["routes"] == {"three_digit": "sharp", "short": "soft"}
