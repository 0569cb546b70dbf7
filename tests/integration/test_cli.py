"""``python -m lit_opd``: every shipped config parses, bad input gives a clean error, and a tiny
fit followed by ``export`` yields a Hugging Face model directory holding the trained student."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from lit_opd.cli import cli_main
from tests.integration.scripts.procs import REPO, TINY_OPD, run_lit_opd

pytestmark = pytest.mark.integration

# configs/teachers/ holds blocks to paste into a method's config, not whole fit configs.
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml") if "teachers" not in p.parts)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_config_parses(config, capsys, monkeypatch):
    """``--print_config`` parses and validates without instantiating, so no model needs to exist."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit_opd"])  # not pytest's own arguments
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(config), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err[-3000:]
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"].startswith("lit_opd.")
    assert printed["data"]["class_path"]


@pytest.mark.parametrize("config", [c for c in CONFIGS if "OPDModule" in (REPO / c).read_text()], ids=str)
def test_print_config_shows_the_objective_settings(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit_opd"])
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--print_config"])
    objective = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["objective"]
    kinds = ("Divergence", "SampledReward", "BaseRelativeClip", "SpeculativeVerification", "GroupVerification")
    assert objective["class_path"].split(".")[-1] in kinds
    settings = set(objective["init_args"])
    assert {"kl_coef", "reduction"} <= settings or "kind" in settings or {"chunk_tokens", "reduction"} <= settings


def test_a_pre_component_config_names_the_moved_keys(tmp_path, capsys, monkeypatch):
    """A config written before objectives were components fails with one message that says where
    its loss settings went, not a parser dump."""
    old = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    old["model"]["init_args"].pop("objective")
    old["model"]["init_args"].update(loss="divergence", divergence="jsd", beta=0.0)
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(path), "--print_config"])
    message = str(exit_.value.code)
    assert "is no longer a setting" in message and "(beta, divergence, loss)" in message
    assert "lit_opd.objectives.Divergence" in message
    with pytest.raises(SystemExit, match="model.init_args.beta is no longer"):
        cli_main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.beta", "1.0"])


def test_moved_key_check_reads_layered_configs(tmp_path):
    """A config without a model section (layered with others) is skipped, not a crash."""
    from lit_opd.cli import moved_objective_keys

    trainer_only = tmp_path / "trainer.yaml"
    trainer_only.write_text("trainer: {max_steps: 2}\n")
    args = ["fit", "--config", str(trainer_only), "--config", str(REPO / "configs/quickstart.yaml")]
    assert moved_objective_keys(args) == []
    assert moved_objective_keys([*args, "--model.init_args.beta", "1"]) == ["beta"]


def test_tiny_config_exercises_the_gkd_mix():
    cfg = yaml.safe_load(TINY_OPD.read_text())
    assert cfg["model"]["class_path"] == "lit_opd.OPDModule"
    assert cfg["model"]["init_args"]["lmbda"] < 1  # exercises the GKD mix
    assert cfg["data"]["init_args"]["sampling"]["max_new_tokens"] <= 6


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--model.init_args.betta", "0.3"], "betta"),
        (["--data.init_args.batch_size", "abc"], "batch_size"),
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_bad_override_is_a_clean_parser_error(override, key):
    proc = run_lit_opd(["fit", "--config", str(TINY_OPD.relative_to(REPO)), *override], timeout=60)
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr[-3000:]
    assert "error" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory, student_dir, teacher_dir):
    """configs/tiny/opd.yaml as shipped; model paths and output dirs replaced on the command line."""
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "run"
    proc = run_lit_opd(
        [
            "fit", "--config", str(TINY_OPD.relative_to(REPO)),
            "--model.init_args.student", student_dir,
            "--model.init_args.teacher.init_args.model", teacher_dir,
            "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "not recommended to provide both args" not in proc.stderr  # LightningCLI got sys.argv once
    ckpts = sorted(run_dir.glob("**/checkpoints/last.ckpt"))
    assert len(ckpts) == 1, sorted(run_dir.rglob("*"))
    assert sorted(run_dir.glob("**/metrics.csv")), "the CSVLogger of the config wrote nothing"
    return root, ckpts[0]


def test_fit_then_export_round_trips(tiny_fit, student_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, ckpt_path = tiny_fit
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    out = root / "export"
    proc = run_lit_opd(["export", "--ckpt_path", str(ckpt_path), "--out", str(out)], timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(student_dir)
    assert tokenizer.get_vocab() == original.get_vocab()
    assert tokenizer("12+3=")["input_ids"] == original("12+3=")["input_ids"]

    exported = model.state_dict()
    student = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items()}
    assert student, "checkpoint has no student weights"
    for key, value in student.items():
        assert torch.equal(exported[key], value), key
    initial = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in student.items()), "export wrote the untrained student"


def test_export_refuses_a_non_empty_out(tiny_fit):
    root, ckpt_path = tiny_fit
    out = root / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_lit_opd(["export", "--ckpt_path", str(ckpt_path), "--out", str(out)], timeout=60)
    assert proc.returncode != 0
    assert "--overwrite" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "config.json").exists()

    # with --overwrite true it writes (in-process: same entry point, no second interpreter start)
    cli_main(["export", "--ckpt_path", str(ckpt_path), "--out", str(out), "--overwrite", "true"])
    assert (out / "config.json").exists()
