"""EffOPDCallback on real tiny OPD fits: the accuracy-scored search, resume mid-schedule, what it
leaves alone (optimizer state, the G-OPD reference) and rank agreement under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lit_opd import HFTeacher, OPDModule, SampledReward, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.methods.eff_opd.callback import EffOPDCallback
from lit_opd.methods.eff_opd.parameters import select_parameters
from lit_opd.methods.eff_opd.dynamics import UpdateDynamicsCallback
from lit_opd.tasks import AdditionTask
from tests.integration.scripts.procs import REPO, clean_env, free_port, read_metrics, run, step_values
from tests.helpers import make_trainer

pytestmark = pytest.mark.integration

DDP_SCRIPT = REPO / "tests" / "integration" / "scripts" / "ddp_effopd.py"


class ParityTask(AdditionTask):
    """Addition prompts with a verifier a random tiny model passes about half the time (the parity of
    the first completion character's code plus the answer), so greedy accuracy moves when the
    weights do and the search has something to accept or reject."""

    def verify(self, completion: str, answer: str | None) -> bool:
        return bool(completion) and answer is not None and (ord(completion[0]) + int(answer)) % 2 == 0


def _module(student: str, teacher: str, lr: float, **kwargs) -> OPDModule:  # noqa: ANN003
    L.seed_everything(0)
    return OPDModule(student, HFTeacher(teacher), optimizer=lambda p: torch.optim.AdamW(p, lr=lr), **kwargs)


def _data(val_size: int = 16) -> RolloutDataModule:
    return RolloutDataModule(
        TaskPrompts(ParityTask(1, 2), num_rows=48), val_size=val_size, batch_size=4, val_batch_size=16,
        sampling=SamplingParams(max_new_tokens=4),
    )


def _trainer(root: Path, max_steps: int, callbacks: list, **kwargs) -> L.Trainer:  # noqa: ANN003
    return make_trainer(root, max_steps, callbacks, **kwargs)


def test_accuracy_scored_search_on_a_tiny_fit(tmp_path, student_dir, teacher_dir):
    module, data = _module(student_dir, teacher_dir, lr=3e-2), _data()
    effopd, dynamics = EffOPDCallback(score="accuracy"), UpdateDynamicsCallback(every_n_steps=2)
    logger = CSVLogger(tmp_path, name="logs")
    _trainer(tmp_path, 4, [effopd, dynamics], logger=logger, log_every_n_steps=1).fit(module, data)

    assert [r["step"] for r in effopd.history] == [1, 2, 4]
    rows = read_metrics(tmp_path)
    for key in ("effopd/initial_score", "effopd/best_score", "effopd/multiplier", "effopd/trial_1_score"):
        assert sorted(step_values(rows, key)) == [1, 2, 4], key
    for record in effopd.history:
        kept = [record["initial_score"]]
        for value, accepted in zip(record["trial_scores"], record["trial_accepted"]):
            if accepted:  # no accepted trial lowered (or merely matched) the score
                assert value > kept[-1], record
                kept.append(value)
            else:  # the first rejection ends the search
                assert value <= kept[-1] and record["trial_scores"][-1] == value, record
        assert record["best_score"] == kept[-1] and record["num_accepted"] == len(kept) - 1
        assert record["multiplier"] == 1 + 2 * record["num_accepted"]
        assert step_values(rows, "effopd/best_score")[record["step"]] == pytest.approx(record["best_score"])
    accepted = [ok for r in effopd.history for ok in r["trial_accepted"]]
    assert any(accepted) and not all(accepted), "the search never had both outcomes: the test is vacuous"
    # training ended right after the step-4 search: the kept weights score what the search measured
    assert data.evaluate(module)["accuracy"] == effopd.history[-1]["best_score"]

    summary = dynamics.summary()
    matrices = {n.removesuffix(".weight") for n, p in select_parameters(module.student) if p.dim() == 2}
    assert set(summary) == matrices
    assert all(s["step"] == 4 and s["rel_update_norm"] > 0 for s in summary.values())
    assert sorted(step_values(rows, "dynamics/mean_top1_energy")) == [2, 4]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_mid_schedule_continues_it(tmp_path, student_dir, teacher_dir):
    """Run A: 6 steps, checkpoints every 3. Run B resumes A's step-3 checkpoint: it searches at step 4
    only (1 and 2 come from the checkpoint) with the restored anchor and cached held-out rollouts,
    and ends exactly where A did."""
    ckpts = tmp_path / "ckpts"
    runs = {}
    for name, ckpt_path in (("A", None), ("B", ckpts / "epoch=0-step=3.ckpt")):
        module = _module(student_dir, teacher_dir, lr=1e-2)
        effopd = EffOPDCallback(score="loss", loss_batches=1)
        callbacks = [effopd]
        if name == "A":
            callbacks.append(ModelCheckpoint(dirpath=ckpts, every_n_train_steps=3, save_top_k=-1))
        trainer = _trainer(tmp_path / name, 6, callbacks, enable_checkpointing=name == "A")
        trainer.fit(module, _data(val_size=8), ckpt_path=ckpt_path)
        runs[name] = (module, effopd)

    saved = torch.load(ckpts / "epoch=0-step=3.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if "EffOPDCallback" in k)
    assert state["last_trigger_step"] == 2 and [r["step"] for r in state["history"]] == [1, 2]
    assert state["loss_cache"] and all(k.startswith("model.") for k in state["anchor"])
    (a, cb_a), (b, cb_b) = runs["A"], runs["B"]
    assert [r["step"] for r in cb_b.history] == [1, 2, 4]
    for step_a, step_b in zip(cb_a.history, cb_b.history):
        for key in ("trial_accepted", "multiplier", "num_accepted"):
            assert step_b[key] == step_a[key], (key, step_a, step_b)
        for key in ("initial_score", "trial_scores", "best_score"):
            assert step_b[key] == pytest.approx(step_a[key], rel=1e-5, abs=1e-6), (key, step_a, step_b)
    for name, value in cb_a.anchor.items():
        assert torch.allclose(cb_b.anchor[name], value, atol=1e-6), name
    for (name, pa), pb in zip(a.student.named_parameters(), b.student.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_optimizer_state_and_reference_are_left_alone(tmp_path, student_dir, teacher_dir):
    """A search that accepts every trial (a rising score) moves only the student's attention/MLP
    weights: the Adam state and the G-OPD reference (λ ≠ 1) are those of a run without EffOPD."""
    calls = iter(range(1000))
    effopd = EffOPDCallback(score_fn=lambda trainer, module: float(next(calls)))
    modules, optimizers = {}, {}
    for name, callbacks in (("plain", []), ("effopd", [effopd])):
        module = _module(student_dir, teacher_dir, lr=1e-2, objective=SampledReward(lambda_=1.25))
        initial = {k: v.detach().clone() for k, v in module.student.named_parameters()}
        trainer = _trainer(tmp_path / name, 1, callbacks)
        trainer.fit(module, _data(val_size=0))
        modules[name], optimizers[name] = module, trainer.optimizers[0].state_dict()["state"]
        reference = dict(module._frozen["reference"].named_parameters())
        assert all(torch.equal(reference[k], v) for k, v in initial.items()), "the reference moved"

    assert effopd.history[0]["multiplier"] == 11.0
    for index, state in optimizers["plain"].items():
        for key, value in state.items():
            assert torch.equal(optimizers["effopd"][index][key], value), (index, key)
    moved = {n for n, _ in select_parameters(modules["effopd"].student)}
    plain = dict(modules["plain"].student.named_parameters())
    for name, value in modules["effopd"].student.named_parameters():
        assert torch.equal(value, plain[name]) != (name in moved), name


def test_ddp_ranks_take_the_same_decisions(tmp_path, student_dir, teacher_dir):
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run([str(DDP_SCRIPT), student_dir, teacher_dir, str(tmp_path)], timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world_size"], r0["global_step"], r1["global_step"]) == (2, 2, 2)
    # on its own, rank 1's falling scores would have rejected every trial
    assert r1["raw_scores"] == sorted(r1["raw_scores"], reverse=True) and len(r1["raw_scores"]) == 12
    assert r0["history"] == r1["history"]
    assert [(r["step"], r["multiplier"]) for r in r0["history"]] == [(1, 11.0), (2, 11.0)]
    assert r0["initial"] == r1["initial"] and r0["final"] == r1["final"] != r0["initial"]
