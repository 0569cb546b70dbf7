"""A LoRA student end to end: a tiny OPD fit trains only the adapters, resumes exactly from a
mid-run checkpoint, exports merged weights or the adapter dir that reproduce its logits, and the
YAML form ``student: {path: ..., lora: {r: 8, alpha: 16}}`` parses through the CLI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("peft")

from lit_opd import (  # noqa: E402
    HFTeacher, ModelSpec, OPDModule, RolloutDataModule, SamplingParams, TaskPrompts,
)
from lit_opd.cli import cli_main  # noqa: E402
from lit_opd.lora import LoraSpec, is_peft_model  # noqa: E402
from lit_opd.models import load_causal_lm  # noqa: E402
from lit_opd.tasks import AdditionTask  # noqa: E402
from tests.integration.scripts.procs import REPO, tiny_opd_config  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:The dirpath has changed")]

LORA = LoraSpec(r=2, alpha=4.0)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.by_step[trainer.global_step] = float(outputs["loss"])


def _fit(  # noqa: ANN202
    root: Path, student: ModelSpec | str, teacher: str, max_steps: int, ckpt_path: str | None = None
):
    module = OPDModule(student, HFTeacher(teacher), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = RolloutDataModule(
        TaskPrompts(AdditionTask(1, 2), num_rows=24), val_size=0, batch_size=4,
        sampling=SamplingParams(max_new_tokens=6),
    )
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy="auto", max_steps=max_steps, logger=False,
        callbacks=[losses, ModelCheckpoint(root / "checkpoints", every_n_train_steps=2, save_top_k=-1)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer, losses.by_step


def _adapters(module: OPDModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.student.named_parameters() if v.requires_grad}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 30, 41, 9, 12], [2, 11, 12, 60, 70, 3]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, student_dir, teacher_dir):
    """A: LoRA, 4 steps unbroken (checkpoints at 2 and 4). B: resumed from A's step 2 to 4.
    Full: the same fit without LoRA, 2 steps, for the checkpoint size comparison."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    a = _fit(root / "A", ModelSpec(student_dir, lora=LORA), teacher_dir, 4)
    torch.manual_seed(1)  # B's fresh lora_A init differs from A's: the checkpoint must restore it
    b = _fit(root / "B", ModelSpec(student_dir, lora=LORA), teacher_dir, 4,
             ckpt_path=str(root / "A" / "checkpoints" / "epoch=0-step=2.ckpt"))
    full = _fit(root / "full", student_dir, teacher_dir, 2)
    return {"root": root, "A": a, "B": b, "full": full}


def test_only_adapters_moved(runs, student_dir):
    module, trainer, losses = runs["A"]
    assert trainer.global_step == 4 and len(losses) == 4
    base = load_causal_lm(student_dir).state_dict()
    for name, value in module.student.get_base_model().state_dict().items():
        if "lora_" not in name:  # the frozen base is bit-identical to what was loaded
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    lora_b = [v for k, v in _adapters(module).items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "adapters did not train"
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.student.parameters() if p.requires_grad}


def test_resume_gives_the_unbroken_adapters(runs):
    (module_a, _, losses_a), (module_b, trainer_b, losses_b) = runs["A"], runs["B"]
    assert trainer_b.global_step == 4 and sorted(losses_b) == [3, 4]
    for step in (3, 4):
        assert losses_b[step] == losses_a[step], step
    final_a, final_b = _adapters(module_a), _adapters(module_b)
    assert final_a.keys() == final_b.keys()
    for key, value in final_a.items():
        assert torch.equal(final_b[key], value), key


def test_lora_checkpoint_is_small(runs):
    root = runs["root"]
    lora_file = root / "A" / "checkpoints" / "epoch=0-step=2.ckpt"
    full_file = root / "full" / "checkpoints" / "epoch=0-step=2.ckpt"
    lora_ckpt = torch.load(lora_file, map_location="cpu", weights_only=False)
    full_ckpt = torch.load(full_file, map_location="cpu", weights_only=False)
    keys = list(lora_ckpt["state_dict"])
    assert keys and all(("lora_A" in k or "lora_B" in k) and k.startswith("student.") for k in keys), keys
    nbytes = {name: sum(v.numel() * v.element_size() for v in ck["state_dict"].values())
              for name, ck in (("lora", lora_ckpt), ("full", full_ckpt))}
    assert nbytes["lora"] < 0.1 * nbytes["full"], nbytes
    # optimizer state follows: AdamW moments for the adapters only
    assert lora_file.stat().st_size < 0.5 * full_file.stat().st_size, (lora_file.stat(), full_file.stat())
    sizes = {"lora": lora_file.stat().st_size, "full": full_file.stat().st_size}
    n_adapter = sum(v.numel() for v in lora_ckpt["state_dict"].values())
    print(f"state_dict bytes {nbytes}; file bytes {sizes} ({n_adapter} adapter parameters)")


def test_export_merged_and_adapters_reproduce_the_student(runs, student_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, (module, _, _) = runs["root"], runs["A"]
    ckpt = root / "A" / "checkpoints" / "epoch=0-step=4.ckpt"
    expected = _logits(module.student.eval())
    assert not torch.allclose(expected, _logits(load_causal_lm(student_dir)), atol=1e-4)  # adapters matter

    merged_dir, adapter_dir = root / "merged", root / "adapters"
    cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(merged_dir)])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not is_peft_model(merged) and not (merged_dir / "adapter_config.json").exists()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(merged_dir).get_vocab() == module.tokenizer.get_vocab()

    cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(adapter_dir), "--adapters_only", "true"])
    assert (adapter_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), adapter_dir)
    torch.testing.assert_close(_logits(peft_model), expected, atol=1e-5, rtol=0)


def test_export_errors_are_clean(runs, teacher_dir, capsys):
    root = runs["root"]
    lora_ckpt, full_ckpt = (root / d / "checkpoints" / "epoch=0-step=2.ckpt" for d in ("A", "full"))
    cases = [
        (["--ckpt_path", str(full_ckpt), "--adapters_only", "true"], "not LoRA adapters"),
        (["--ckpt_path", str(lora_ckpt), "--base", teacher_dir], "not the model these adapters were trained"),
    ]
    for i, (args, message) in enumerate(cases):
        with pytest.raises(SystemExit):
            cli_main(["export", *args, "--out", str(root / f"bad{i}")])
        assert message in capsys.readouterr().err
        assert not (root / f"bad{i}").exists()


def test_yaml_lora_student_parses_and_instantiates(tmp_path, student_dir, teacher_dir, monkeypatch, capsys):
    cfg_path = tiny_opd_config(tmp_path / "lora.yaml", tmp_path / "run", student_dir, teacher_dir)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["init_args"]["student"] = {"path": student_dir, "lora": {"r": 8, "alpha": 16}}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit_opd"])

    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(cfg_path), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["student"]
    assert printed["path"] == student_dir
    assert printed["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}

    # a Union-typed argument takes a whole YAML value on the command line, not dotted sub-keys
    override = f"{{path: {student_dir}, lora: {{r: 8, alpha: 16, dropout: 0.05}}}}"
    # run=False: no subcommand
    cli = cli_main(["--config", str(cfg_path), "--model.init_args.student", override], run=False)
    assert cli.model.student_spec == ModelSpec(student_dir, lora=LoraSpec(r=8, alpha=16, dropout=0.05))
    assert is_peft_model(cli.model.student)
    assert cli.model.student.peft_config["default"].r == 8


@pytest.mark.skipif(
    not (importlib.util.find_spec("bitsandbytes") and importlib.util.find_spec("accelerate")),
    reason="QLoRA needs bitsandbytes and accelerate (pip install 'lit_opd[quant]')",
)
def test_qlora_construction_smoke(student_dir):
    """4-bit base + LoRA on CPU: builds, trains only adapters, checkpoints only adapters, and a
    fresh module loads that checkpoint (the base's quant state is rebuilt, not saved)."""
    from lit_opd import SFTModule

    spec = ModelSpec(student_dir, quantization="4bit", lora=LORA)
    module = SFTModule(spec)
    assert any(type(m).__name__ == "Linear4bit" for m in module.student.modules())
    trainable = [n for n, p in module.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    module.student(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()  # QLoRA forward/backward
    assert all(p.grad is not None for p in module.student.parameters() if p.requires_grad)
    ckpt = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(ckpt)
    assert sorted(ckpt["state_dict"]) == sorted(f"student.{n}" for n in trainable)
    with torch.no_grad():
        for name, param in module.student.named_parameters():
            if "lora_B" in name:
                param.normal_()
    ckpt = {"state_dict": dict(module.state_dict())}
    module.on_save_checkpoint(ckpt)
    fresh = SFTModule(spec)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=fresh.strict_loading)
    torch.testing.assert_close(_logits(fresh.student), _logits(module.student), atol=0, rtol=0)
