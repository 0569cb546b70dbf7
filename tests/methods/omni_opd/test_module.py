"""OmniOPDModule with real teachers: the trained addition teacher behind HFTextTeacher (it answers
"63+4=" with "76", the reversed sum), a full-logit HFTeacher that must never be scored, a teacher
whose tokenizer is not the student's, a teacher that loses answers, a refused ServerTeacher, short
fits that log every metric, and a resume that repeats the unbroken run's losses."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lit_opd import HFTeacher, RolloutDataModule, SamplingParams, ServerTeacher, TaskPrompts
from lit_opd.methods.omni_opd import GroupVerification, OmniOPDModule, SpeculativeVerification
from lit_opd.models import check_tokenizers_compatible
from lit_opd.objectives import Divergence
from lit_opd.tasks import AdditionTask, char_tokenizer
from lit_opd.teachers.text import HFTextTeacher
from tests.helpers import make_rollout_batch, make_tiny_model, make_trainer

ASSETS = Path(__file__).resolve().parents[3] / "lit_opd" / "assets" / "addition"
TEACHER, STUDENT = str(ASSETS / "teacher"), str(ASSETS / "student")
SUMS = {"63+4=": "76", "12+3=": "51", "99+1=": "001"}  # reversed sums, the trained teacher's greedy answers
LOGGED = ("loss", "audits_per_seq", "audits_dropped", "entropy_audited", "entropy_other", "target_mean",
          "target_std", "ksem_zero_frac", "anchor_kl", "repetition_rate", "teacher_prefixes",
          "teacher_unanswered_frac")


class RecordingTeacher(HFTextTeacher):
    """The trained teacher, remembering what it was asked."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[list[str], dict]] = []

    def generate_text(self, prompts, **settings):  # noqa: ANN001, ANN003, ANN201
        self.asked.append((list(prompts), settings))
        return super().generate_text(prompts, **settings)


class FlakyTeacher(HFTextTeacher):
    """Loses answers the way a failing API does: every sample of the first prefix, and every other
    sample of the rest."""

    def generate_text(self, prompts, **settings):  # noqa: ANN001, ANN003, ANN201
        out = super().generate_text(prompts, **settings)
        return [[None if i == 0 or j % 2 else text for j, text in enumerate(row)]
                for i, row in enumerate(out)]


class GenerateOnlyTeacher(HFTeacher):
    """A full-logit teacher whose every logit path fails: OmniOPD must get by with generate_text."""

    calls = 0

    def score(self, batch):  # noqa: ANN001, ANN201
        raise AssertionError("OmniOPD asked the teacher to score tokens")

    def score_hidden(self, batch):  # noqa: ANN001, ANN201
        raise AssertionError("OmniOPD asked the teacher for hidden states")

    def scoring_model(self):  # noqa: ANN201
        raise AssertionError("OmniOPD asked the teacher for its scoring model")

    def generate_text(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.calls += 1
        return super().generate_text(*args, **kwargs)


def _objective(**settings) -> SpeculativeVerification:  # noqa: ANN003
    return SpeculativeVerification(**{"chunk_tokens": 2, "max_audits": 2, "num_continuations": 3, **settings})


def _data(rows: int = 48, batch_size: int = 8) -> RolloutDataModule:
    return RolloutDataModule(TaskPrompts(AdditionTask(1, 3, reverse_answer=True), num_rows=rows, seed=4),
                             val_size=0, batch_size=batch_size, sampling=SamplingParams(max_new_tokens=6))


def _permuted_char_tokenizer() -> PreTrainedTokenizerFast:
    """The characters of the student's char tokenizer under other ids (specials kept): no token-level
    method could pair it with the teacher's."""
    vocab = char_tokenizer().get_vocab()
    specials = sorted((i, t) for t, i in vocab.items() if i < 4)
    chars = sorted((t for t, i in vocab.items() if i >= 4), key=vocab.get, reverse=True)
    permuted = {t: i for i, t in specials} | {t: 4 + k for k, t in enumerate(chars)}
    backend = Tokenizer(models.WordLevel(vocab=permuted, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def _metrics(root: Path) -> list[dict[str, str]]:
    with next(root.glob("**/metrics.csv")).open() as fh:
        return list(csv.DictReader(fh))


# ----- what the teacher is asked ------------------------------------------------------------------
def test_teacher_is_asked_once_per_batch_for_the_text_before_each_chunk_in_order():
    teacher = RecordingTeacher(TEACHER)
    module = OmniOPDModule(STUDENT, teacher,
                           objective=_objective(num_continuations=4, teacher_temperature=0.0))
    batch = make_rollout_batch(module.tokenizer, list(SUMS), ["7612", "51", "001"])
    verdicts = module.verify(batch, [[2, 0], [], [1]])
    (prompts, settings), = teacher.asked  # one call for the whole batch
    # row 0's audits in increasing position, the prefix never holds the chunk itself
    assert prompts == ["63+4=", "63+4=76", "99+1=0"]
    assert settings == dict(max_new_tokens=2, num_samples=4, temperature=0.0, seed=module.query_seed())
    assert (verdicts.rows, verdicts.starts) == ([0, 0, 2], [0, 2, 1])  # row 0's chunks "76" and "12"
    # greedy teacher: "76" matches all 4 continuations; "12" none (the teacher stops after "76");
    # "01" all
    assert verdicts.k_sem_A.tolist() == [4.0, 0.0, 4.0] and verdicts.answered_A.tolist() == [4.0] * 3


def test_a_chat_row_reaches_the_teacher_with_its_roles():
    """A row rendered by a chat template keeps its conversation for a chat-mode teacher (system and
    user turns, the student's partial answer) instead of one flattened string."""
    teacher = RecordingTeacher(TEACHER)
    module = OmniOPDModule(STUDENT, teacher, objective=_objective(num_continuations=1, teacher_temperature=0.0))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "63+4="}]
    batch = make_rollout_batch(module.tokenizer, ["63+4="], ["7612"], rows=[{"prompt_messages": conversation}])
    module.verify(batch, [[2]])
    (prefix,), _ = teacher.asked[0]
    assert prefix.messages == conversation and prefix.response == "76"


def test_query_seed_follows_the_global_step_and_rank():
    module = OmniOPDModule(STUDENT, HFTextTeacher(TEACHER), seed=5)
    assert module.query_seed() == 5 * 1_000_003 * 4099  # step 0, rank 0, outside a trainer


def test_missing_continuations_are_dropped_from_n_and_empty_audits_are_dropped_and_counted():
    module = OmniOPDModule(STUDENT, FlakyTeacher(TEACHER), objective=_objective(num_continuations=4,
                                                                                  teacher_temperature=0.0))
    batch = make_rollout_batch(module.tokenizer, list(SUMS), ["76", "51", "001"])
    verdicts = module.verify(batch, [[0], [0], [0]])
    assert (verdicts.requested, verdicts.dropped, verdicts.unanswered) == (3, 1, 4 + 2 + 2)
    assert verdicts.rows == [1, 2] and verdicts.answered_A.tolist() == [2.0, 2.0]
    assert verdicts.k_sem_A.tolist() == [2.0, 2.0]  # k_sem over the answers that came, not over N
    loss, metrics = module.loss(batch)
    assert metrics["audits_dropped"] >= 1 and 0 < metrics["teacher_unanswered_frac"] < 1
    assert torch.isfinite(loss)


# ----- teachers -----------------------------------------------------------------------------------
def test_a_teacher_that_cannot_return_text_is_refused_with_one_clear_error(char_tok):
    server = ServerTeacher("http://127.0.0.1:9/v1", "some-model", k=4)
    with pytest.raises(ValueError, match="needs a teacher that returns text.*ServerTeacher.*APITeacher"):
        OmniOPDModule(make_tiny_model(len(char_tok)), server, tokenizer=char_tok)
    with pytest.raises(ValueError, match="objective must be a SpeculativeVerification.*Divergence"):
        OmniOPDModule(make_tiny_model(len(char_tok)), HFTextTeacher(TEACHER), tokenizer=char_tok,
                      objective=Divergence())


def test_the_teacher_is_never_scored(tmp_path):
    teacher = GenerateOnlyTeacher(TEACHER)
    module = OmniOPDModule(STUDENT, teacher, objective=_objective())
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, _data())
    assert trainer.global_step == 2 and teacher.calls == 2


def test_a_teacher_with_another_tokenizer_teaches(tmp_path):
    student_tok = _permuted_char_tokenizer()
    teacher = HFTextTeacher(TEACHER)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_tokenizers_compatible(student_tok, teacher.tokenizer)  # token-level methods could not
    module = OmniOPDModule(make_tiny_model(len(student_tok)), teacher, tokenizer=student_tok,
                           objective=_objective(num_continuations=2, teacher_temperature=0.0))
    right = make_rollout_batch(student_tok, list(SUMS), list(SUMS.values()))
    wrong = make_rollout_batch(student_tok, list(SUMS), ["67", "15", "100"])
    assert module.verify(right, [[0]] * 3).k_sem_A.tolist() == [2.0] * 3
    assert module.verify(wrong, [[0]] * 3).k_sem_A.tolist() == [0.0, 0.0, 1.0]  # "10" vs "00"
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, RolloutDataModule(
        TaskPrompts(AdditionTask(1, 2), num_rows=16), val_size=0, batch_size=4, tokenizer=student_tok,
        sampling=SamplingParams(max_new_tokens=4)))
    assert trainer.global_step == 2


# ----- fitting ------------------------------------------------------------------------------------
def test_a_short_fit_moves_the_student_and_logs_every_metric_every_step(tmp_path):
    module = OmniOPDModule(STUDENT, HFTextTeacher(TEACHER), objective=_objective(),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = make_trainer(tmp_path, 3, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1)
    trainer.fit(module, _data())
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())
    rows = [r for r in _metrics(tmp_path) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for row in rows:
        values = {key: float(row[f"train/{key}"]) for key in LOGGED}
        assert all(v == v for v in values.values()), values  # no NaN
        assert values["audits_per_seq"] > 0 and values["teacher_prefixes"] > 0
        assert 0 <= values["target_mean"] <= 1 and values["anchor_kl"] >= 0
        # the picker audits the forks: more uncertain there than elsewhere
        assert values["entropy_audited"] >= values["entropy_other"]
    assert float(rows[0]["train/anchor_kl"]) == 0.0  # the student is still its reference


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None,
         group: bool = False) -> tuple[dict[int, float], L.Trainer]:
    losses: dict[int, float] = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            losses[trainer.global_step - 1] = float(outputs["loss"])

    objective = GroupVerification(candidates=3, chunk_tokens=2, max_audits=2, num_continuations=3) if group \
        else _objective()
    module = OmniOPDModule(STUDENT, HFTextTeacher(TEACHER), objective=objective, seed=7,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    save = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(root, max_steps, callbacks=[Record(), save], enable_checkpointing=True)
    trainer.fit(module, _data(rows=40), ckpt_path=ckpt_path)  # 5 batches an epoch: crosses an epoch
    return losses, trainer


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # run B checkpoints elsewhere on purpose
@pytest.mark.parametrize("group", [False, True], ids=["reference", "group"])
def test_resume_repeats_the_unbroken_losses_and_the_checkpoint_names_teacher_and_objective(tmp_path, group):
    # the group objective also samples fresh candidates: seeded by the step, so a resume redraws them
    unbroken, _ = _fit(tmp_path / "A", 7, group=group)
    ckpt = tmp_path / "A" / "ckpt" / "epoch=0-step=3.ckpt"
    resumed, trainer = _fit(tmp_path / "B", 7, ckpt_path=str(ckpt), group=group)
    assert sorted(resumed) == [3, 4, 5, 6] and len({round(v, 6) for v in resumed.values()}) == 4
    for step, loss in resumed.items():
        assert loss == pytest.approx(unbroken[step], rel=1e-5, abs=1e-6), (step, unbroken, resumed)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert all(k.startswith("student.") for k in saved["state_dict"])
    assert saved["lit_opd"]["teacher"] == HFTextTeacher(TEACHER).identity()
    assert saved["lit_opd"]["objective"]["class"] == ("GroupVerification" if group else "SpeculativeVerification")
    assert saved["lit_opd"]["objective"]["chunk_tokens"] == 2


def test_resuming_with_another_teacher_is_refused(tmp_path):
    _fit(tmp_path / "A", 3)
    other = OmniOPDModule(STUDENT, HFTextTeacher(STUDENT), objective=_objective())
    with pytest.raises(ValueError, match="allow_teacher_change"):
        make_trainer(tmp_path, 4).fit(other, _data(rows=40), ckpt_path=str(tmp_path / "A" / "ckpt" /
                                                                           "epoch=0-step=3.ckpt"))
