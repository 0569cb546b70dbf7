"""A checkpoint that cannot be trusted or used is refused in one line, before anything from it loads:
resume (``fit --ckpt_path``), ``validate``/``test --ckpt_path`` and ``export`` (issue 24).

* corrupted on disk since it was saved (4096 bytes flipped inside one weight tensor: torch does not
  notice, the recorded sha256 does); a checkpoint from before checksums loads with a note;
* resumed with another student path, β or objective class (``allow_settings_change`` overrides;
  a setting the checkpoint predates counts at its default);
* damaged or truncated, of another architecture, or missing.

Every case runs the CLI in-process on the ``last.ckpt`` of one real 2-step fit.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig

from lit_opd.checkpoints import architecture_mismatch, tensor_digest, verify_checksums
from lit_opd.errors import CheckpointError
from lit_opd.objectives import SampledReward
from tests.helpers import make_module
from tests.integration.cli import refused, run_main
from tests.integration.scripts.procs import tiny_opd_config

pytestmark = pytest.mark.integration

FIX = "Use another checkpoint, e.g. an earlier one of the same run."
SETTINGS_FIX = (
    "Resume with the same settings, or set allow_settings_change: true to continue with the new ones "
    "on purpose."
)


def _config(root: Path, name: str, student: str, teacher: str, max_steps: int = 2, **model: object) -> Path:
    return tiny_opd_config(
        root / f"{name}.yaml", root / "run", student, teacher, max_steps=max_steps, **model
    )


def _resume(tiny_run: tuple[Path, Path], *extra: str, command: str = "fit") -> list[str]:
    """``COMMAND --config CONFIG --ckpt_path LAST *extra`` for the module's 2-step run."""
    return [command, "--config", str(tiny_run[0]), "--ckpt_path", str(tiny_run[1]), *extra]


def _one_more_step(root: Path) -> list[str]:
    """Overrides for a resume that trains step 3 and writes nothing the other tests read."""
    return ["--trainer.max_steps", "3", "--trainer.default_root_dir", str(root), "--trainer.callbacks", "[]",
            "--trainer.logger", "false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, student_dir, teacher_dir) -> tuple[Path, Path]:
    """One real 2-step fit through the CLI: its config and its ``last.ckpt``."""
    root = tmp_path_factory.mktemp("integrity")
    config = _config(root, "tiny", student_dir, teacher_dir)
    with pytest.MonkeyPatch.context() as mp:
        run_main(["fit", "--config", str(config)], mp)
    return config, root / "run" / "checkpoints" / "last.ckpt"


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where an (uncompressed) zip entry's bytes start in the file: after its local header."""
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def flip_inside_tensor(good: Path, dst: Path, nbytes: int = 4096) -> str:
    """Copy ``good`` with ``nbytes`` bytes inverted in the middle of its largest student tensor's
    storage; returns the first key (sorted) of the tensors that changed (tied weights share one)."""
    state = torch.load(good, map_location="cpu", weights_only=True)["state_dict"]
    key = max(state, key=lambda k: state[k].numel() * state[k].element_size())
    raw = state[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(raw) > 2 * nbytes
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        entry = next(i for i in archive.infolist() if "/data/" in i.filename and archive.read(i) == raw)
    start = _data_offset(good, entry) + (len(raw) - nbytes) // 2
    data[start : start + nbytes] = bytes(b ^ 0xFF for b in data[start : start + nbytes])
    dst.write_bytes(bytes(data))
    # Not vacuous: torch loads the flipped file without a word, and the tensor did change.
    flipped = torch.load(dst, map_location="cpu", weights_only=True)["state_dict"]
    changed = {k for k in state if not torch.equal(flipped[k], state[k])}
    assert key in changed
    return min(changed)


# ----- checksums ---------------------------------------------------------------------------------
def test_every_student_tensor_has_a_recorded_sha256(tiny_run):
    checkpoint = torch.load(tiny_run[1], map_location="cpu", weights_only=True)
    record, state = checkpoint["lit_opd"]["checksums"], checkpoint["state_dict"]
    assert record["algorithm"] == "sha256"
    assert list(record["tensors"]) == sorted(state)
    key = sorted(state)[0]
    t = state[key]
    by_hand = hashlib.sha256(
        f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().numpy().tobytes()
    ).hexdigest()
    assert record["tensors"][key] == by_hand == tensor_digest(t)


@pytest.fixture(scope="module")
def corrupted(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    bad = tmp_path_factory.mktemp("corrupted") / "flipped.ckpt"
    return bad, flip_inside_tensor(tiny_run[1], bad)


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_a_corrupted_checkpoint_is_refused_naming_file_and_tensor(
    command, tiny_run, corrupted, monkeypatch, capsys
):
    bad, key = corrupted
    checkpoints_before = sorted((tiny_run[1].parent).iterdir())
    line = refused([command, "--config", str(tiny_run[0]), "--ckpt_path", str(bad)], monkeypatch, capsys)
    assert line == (
        f"error: ckpt_path='{bad}' is corrupted: its tensor {key!r} differs from the sha256 recorded "
        f"when it was saved (the file changed since); nothing was loaded. {FIX}"
    )
    assert sorted((tiny_run[1].parent).iterdir()) == checkpoints_before  # nothing trained or saved


def test_export_refuses_a_corrupted_checkpoint_and_writes_nothing(corrupted, tmp_path, monkeypatch, capsys):
    bad, key = corrupted
    out = tmp_path / "exported"
    line = refused(["export", "--ckpt_path", str(bad), "--out", str(out)], monkeypatch, capsys)
    assert line == (
        f"error: export --ckpt_path '{bad}' is corrupted: its tensor {key!r} differs from the sha256 "
        f"recorded when it was saved (the file changed since); nothing was written. {FIX}"
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(corrupted, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_OPD_DEBUG", "1")
    with pytest.raises(CheckpointError, match="is corrupted"):
        run_main(["export", "--ckpt_path", str(corrupted[0]), "--out", str(tmp_path / "x")], monkeypatch)


@pytest.fixture(scope="module")
def unrecorded(tiny_run, tmp_path_factory) -> Path:
    """The fit's checkpoint as lit_opd wrote it before checksums existed."""
    checkpoint = torch.load(tiny_run[1], map_location="cpu", weights_only=True)
    del checkpoint["lit_opd"]["checksums"]
    path = tmp_path_factory.mktemp("old") / "before_checksums.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_from_before_checksums_resumes_and_exports_with_a_note(
    tiny_run, unrecorded, tmp_path, monkeypatch, caplog
):
    notes = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    notes.addHandler(caplog.handler)  # Lightning's logger does not propagate to pytest's
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
            run_main(
                [
                    "fit",
                    "--config",
                    str(tiny_run[0]),
                    "--ckpt_path",
                    str(unrecorded),
                    "--trainer.max_steps",
                    "3",
                    "--trainer.default_root_dir",
                    str(tmp_path / "resumed"),
                    "--trainer.callbacks",
                    "[]",
                    "--trainer.logger",
                    "false",
                ],
                monkeypatch,
            )
            run_main(
                ["export", "--ckpt_path", str(unrecorded), "--out", str(tmp_path / "exported")], monkeypatch
            )
    finally:
        notes.removeHandler(caplog.handler)
    note = f"note: ckpt_path='{unrecorded}' records no checksums of its tensors"
    assert note in caplog.text
    assert f"note: export --ckpt_path '{unrecorded}' records no checksums" in caplog.text
    assert (tmp_path / "exported" / "config.json").exists()


# ----- settings changed on resume ----------------------------------------------------------------
def test_another_beta_is_refused(tiny_run, monkeypatch, capsys):
    beta = ("--model.init_args.objective.init_args.beta", "0.9")
    assert refused(_resume(tiny_run, *beta), monkeypatch, capsys) == (
        f"error: ckpt_path='{tiny_run[1]}' was trained with other settings: objective beta 0.5 -> 0.9. "
        f"{SETTINGS_FIX}")


def test_another_student_path_and_beta_are_listed_together(
    tiny_run, student_dir, teacher_dir, tmp_path, monkeypatch, capsys
):
    moved = str(tmp_path / "student_copy")
    shutil.copytree(student_dir, moved)
    config = _config(
        tmp_path,
        "changed",
        moved,
        teacher_dir,
        objective={"class_path": "lit_opd.objectives.Divergence", "init_args": {"beta": 0.2}},
    )
    line = refused(["fit", "--config", str(config), "--ckpt_path", str(tiny_run[1])], monkeypatch, capsys)
    assert line == (
        f"error: ckpt_path='{tiny_run[1]}' was trained with other settings: student path "
        f"{student_dir!r} -> {moved!r}; objective beta 0.5 -> 0.2. {SETTINGS_FIX}"
    )


def test_another_objective_class_is_a_change(char_tok):
    checkpoint = {"state_dict": {}}
    make_module(char_tok).on_save_checkpoint(checkpoint)  # Divergence, the default
    changed = make_module(char_tok, objective=SampledReward())
    assert changed.settings_changes(checkpoint["lit_opd"]) == ["objective class Divergence -> SampledReward"]
    with pytest.raises(CheckpointError, match="other settings: objective class Divergence -> SampledReward"):
        changed.on_load_checkpoint(checkpoint)  # outside a trainer: checked as a resume
    changed.allow_settings_change = True
    changed.on_load_checkpoint(checkpoint)


def test_allow_teacher_change_on_the_command_line_is_not_undone_by_the_checkpoint(
    tiny_run, student_dir, tmp_path, monkeypatch, capsys
):
    """LightningCLI lays a checkpoint's saved hparams over the command line; the allow_* overrides
    given for this run must stand (here: another teacher on purpose)."""
    config = _config(tmp_path, "other_teacher", student_dir, student_dir)
    args = ["fit", "--config", str(config), "--ckpt_path", str(tiny_run[1]), *_one_more_step(tmp_path)]
    assert "allow_teacher_change: true" in refused(args, monkeypatch, capsys)
    run_main([*args, "--model.init_args.allow_teacher_change", "true"], monkeypatch)


def test_allow_settings_change_resumes_on_purpose(tiny_run, tmp_path, monkeypatch):
    allowed = ("--model.init_args.allow_settings_change", "true")
    beta = ("--model.init_args.objective.init_args.beta", "0.9")
    run_main(_resume(tiny_run, *beta, *allowed, *_one_more_step(tmp_path)), monkeypatch)


def test_validate_with_another_beta_is_not_a_resume(tiny_run, monkeypatch):
    """Only a resume trains with the settings; validate/test still check checksums and architecture."""
    beta = ("--model.init_args.objective.init_args.beta", "0.9")
    run_main(_resume(tiny_run, *beta, command="validate"), monkeypatch)


def test_a_setting_newer_than_the_checkpoint_counts_at_its_default(char_tok):
    """SampledReward gained ``is_cap`` (default None): a checkpoint without the key is unchanged at
    None, changed at 2.0."""
    module = make_module(char_tok, objective=SampledReward())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    info = checkpoint["lit_opd"]
    del info["objective"]["is_cap"]
    assert module.settings_changes(info) == []
    assert make_module(char_tok, objective=SampledReward(is_cap=2.0)).settings_changes(info) == [
        "objective is_cap None -> 2.0"
    ]
    assert make_module(char_tok, objective=SampledReward(kl_coef=0.5)).settings_changes(info) == [
        "objective kl_coef 1.0 -> 0.5"
    ]


# ----- unusable files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root, data = tmp_path_factory.mktemp("damaged"), tiny_run[1].read_bytes()
    files = {"truncated": data[: len(data) // 2], "zeroed_head": bytes(64) + data[64:], "empty": b""}
    for name, content in files.items():
        (root / f"{name}.ckpt").write_bytes(content)
    return {name: root / f"{name}.ckpt" for name in files}


DAMAGE = {
    "truncated": "it is not a complete zip archive: failed finding central directory",
    "zeroed_head": "it does not parse as a torch checkpoint: Unsupported operand 0",
    "empty": "it is empty or ends early",
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_on_resume(case, tiny_run, damaged, monkeypatch, capsys):
    bad = damaged[case]
    line = refused(["fit", "--config", str(tiny_run[0]), "--ckpt_path", str(bad)], monkeypatch, capsys)
    assert (
        line
        == f"error: ckpt_path='{bad}' is damaged or truncated ({DAMAGE[case]}); nothing was loaded. {FIX}"
    )


@pytest.mark.parametrize("case", ["truncated", "zeroed_head"])
def test_a_damaged_checkpoint_is_one_line_on_export(case, damaged, tmp_path, monkeypatch, capsys):
    bad, out = damaged[case], tmp_path / "exported"
    line = refused(["export", "--ckpt_path", str(bad), "--out", str(out)], monkeypatch, capsys)
    assert line == (
        f"error: export --ckpt_path '{bad}' is damaged or truncated ({DAMAGE[case]}); nothing was "
        f"written. {FIX}"
    )
    assert not out.exists()


def test_a_checkpoint_of_another_architecture_names_both(
    tiny_run, teacher_dir, student_dir, tmp_path, monkeypatch, capsys
):
    """The teacher (hidden 48) as the student (hidden 32): today 78 "size mismatch" lines."""
    config = _config(tmp_path, "other_arch", teacher_dir, teacher_dir)
    saved, configured = (AutoConfig.from_pretrained(d).to_dict() for d in (student_dir, teacher_dir))
    differ = [
        k
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        if saved[k] != configured[k]
    ]
    assert "hidden_size" in differ

    def describe(c: dict) -> str:
        return f"qwen3 ({', '.join(f'{k} {c[k]}' for k in differ)})"

    line = refused(["fit", "--config", str(config), "--ckpt_path", str(tiny_run[1])], monkeypatch, capsys)
    assert line == (
        f"error: ckpt_path='{tiny_run[1]}' holds a student of another architecture: {describe(saved)} "
        f"in the checkpoint, {describe(configured)} configured; nothing was loaded. Configure the "
        "student this checkpoint was trained from (model.init_args.student)."
    )


def test_without_configs_the_first_tensor_of_another_shape_is_named():
    saved = {"student.a": torch.zeros(2), "student.b": torch.zeros(3, 4)}
    current = {"student.a": torch.zeros(2), "student.b": torch.zeros(3, 5)}
    assert architecture_mismatch(None, None, saved, current) == (
        "a student of another architecture: its tensor 'student.b' has shape [3, 4], "
        "the configured student's [3, 5]"
    )


def test_tensors_missing_or_added_since_the_save_are_refused():
    state = {"student.a": torch.ones(3), "student.b": torch.zeros(2)}
    info = {"checksums": {"algorithm": "sha256", "tensors": {k: tensor_digest(v) for k, v in state.items()}}}
    assert verify_checksums(info, state, "x")
    with pytest.raises(CheckpointError, match="x lacks the tensor 'student.b' it was saved with"):
        verify_checksums(info, {"student.a": state["student.a"]}, "x")
    with pytest.raises(CheckpointError, match="x holds a tensor 'student.c' that was not in it"):
        verify_checksums(info, {**state, "student.c": torch.zeros(1)}, "x")


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_missing_checkpoint_is_one_line(command, tiny_run, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "last.ckpt"
    line = refused([command, "--config", str(tiny_run[0]), "--ckpt_path", str(missing)], monkeypatch, capsys)
    assert line == (
        f"error: ckpt_path='{missing}' does not exist; nothing was loaded. Check the path "
        "(`--ckpt_path last` resumes from the run's newest last.ckpt)."
    )


def test_the_recorded_settings_are_what_is_compared(tiny_run):
    """What the checks read: the student spec and the objective's settings, as saved."""
    info = torch.load(tiny_run[1], map_location="cpu", weights_only=True)["lit_opd"]
    config = yaml.safe_load(Path(tiny_run[0]).read_text())["model"]["init_args"]
    assert info["student_spec"]["path"] == config["student"]
    assert info["objective"]["class"] == "Divergence" and info["objective"]["beta"] == 0.5


def test_another_method_setting_is_refused_not_silently_replaced(tiny_run, monkeypatch, capsys):
    """LightningCLI lays the checkpoint's hparams over the command line: lmbda 0.9 given for this run
    used to become the checkpoint's 0.5 without a word."""
    line = refused(_resume(tiny_run, "--model.init_args.lmbda", "0.9"), monkeypatch, capsys)
    assert line == (f"error: ckpt_path='{tiny_run[1]}' was trained with other settings: lmbda 0.5 -> 0.9. "
                    f"{SETTINGS_FIX}")


def test_a_method_setting_changed_on_purpose_is_the_one_used(tiny_run, tmp_path, monkeypatch):
    from lit_opd import cli

    built, before_fit = [], cli.OPDCLI.before_fit

    def spy(self) -> None:  # noqa: ANN001 - the CLI's own hook, still run
        built.append(self.model.lmbda)
        before_fit(self)

    monkeypatch.setattr(cli.OPDCLI, "before_fit", spy)
    allowed = ("--model.init_args.allow_settings_change", "true")
    lmbda = ("--model.init_args.lmbda", "0.9")
    run_main(_resume(tiny_run, *lmbda, *allowed, *_one_more_step(tmp_path)), monkeypatch)
    assert built == [0.9]


def test_a_changed_method_setting_is_refused_on_a_last_resume_too(tiny_run, monkeypatch, capsys):
    """`--ckpt_path last` is resolved only once the trainer exists; the settings are checked then."""
    args = ["fit", "--config", str(tiny_run[0]), "--ckpt_path", "last", "--model.init_args.lmbda", "0.9"]
    assert refused(args, monkeypatch, capsys) == (
        f"error: ckpt_path='{tiny_run[1]}' was trained with other settings: lmbda 0.5 -> 0.9. {SETTINGS_FIX}")
