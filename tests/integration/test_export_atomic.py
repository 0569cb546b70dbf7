"""``export`` writes beside ``--out`` and moves the result into place only once it is complete
(issue 24): an ``--overwrite`` leaves exactly the new export (no stale shards or index of an older
sharded one), and a write that fails midway (a full disk) leaves ``--out`` as it was, with no half
export and no temporary folder behind.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.integration.cli import refused, run_main
from tests.integration.scripts.procs import tiny_opd_config

pytestmark = pytest.mark.integration

ENOSPC_SAFETENSORS = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, student_dir, teacher_dir) -> Path:
    """``last.ckpt`` of one real 2-step fit through the CLI."""
    root = tmp_path_factory.mktemp("export_atomic")
    config = tiny_opd_config(root / "tiny.yaml", root / "run", student_dir, teacher_dir, max_steps=2)
    with pytest.MonkeyPatch.context() as mp:
        run_main(["fit", "--config", str(config)], mp)
    return root / "run" / "checkpoints" / "last.ckpt"


def _export(ckpt: Path, out: Path, monkeypatch, *extra: str) -> None:  # noqa: ANN001
    run_main(["export", "--ckpt_path", str(ckpt), "--out", str(out), *extra], monkeypatch)


def test_a_new_export_has_the_usual_folder_mode_and_nothing_beside_it(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "new" / "model"
    _export(ckpt, out, monkeypatch)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    assert {"config.json", "model.safetensors"} <= set(_files(out))


def test_overwrite_replaces_a_sharded_export_completely(ckpt, student_dir, tmp_path, monkeypatch):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    AutoModelForCausalLM.from_pretrained(student_dir).save_pretrained(out, max_shard_size="20KB")
    shards = [n for n in _files(out) if n.startswith("model-") and n.endswith(".safetensors")]
    assert "model.safetensors.index.json" in _files(out) and len(shards) > 1  # really sharded
    _export(ckpt, fresh, monkeypatch)

    _export(ckpt, out, monkeypatch, "--overwrite", "true")

    assert _files(out) == _files(fresh)  # the new export and nothing else: no index, no old shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]  # no temporary folder left
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for key, value in saved.items():
        assert torch.equal(exported[key.removeprefix("student.")], value), key


def test_a_full_disk_leaves_no_half_export(ckpt, tmp_path, monkeypatch, capsys):
    """safetensors fails after transformers wrote config.json (what a full disk does)."""
    out = tmp_path / "new" / "model"

    def disk_full(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise SafetensorError(ENOSPC_SAFETENSORS)

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_full)
    line = refused(["export", "--ckpt_path", str(ckpt), "--out", str(out)], monkeypatch, capsys)
    assert line == (
        f"error: export --out '{out}': writing the export failed (No space left on device); --out was "
        "left as it was and no partial export remains."
    )
    assert list(tmp_path.iterdir()) == []  # neither --out, its new parent, nor a temporary folder


def test_a_failed_overwrite_keeps_the_old_export(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _export(ckpt, out, monkeypatch)
    before = _files(out)

    def half_written(self, save_directory, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        Path(save_directory, "config.json").write_text('{"half": ')  # then the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_written)
    line = refused(
        ["export", "--ckpt_path", str(ckpt), "--out", str(out), "--overwrite", "true"], monkeypatch, capsys
    )
    assert line == (
        f"error: export --out '{out}': writing the export failed (No space left on device); --out was "
        "left as it was and no partial export remains."
    )
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("holding", ["a folder", "the checkpoint"])
def test_overwrite_never_deletes_more_than_an_old_export(holding, ckpt, tmp_path, monkeypatch, capsys):
    """A run folder (subfolders) or the folder of the exported checkpoint is not an old export:
    replacing it would delete them, so ``--overwrite`` refuses and changes nothing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    source = ckpt
    if holding == "a folder":
        (out / "logs").mkdir()
    else:
        source = out / "last.ckpt"
        source.write_bytes(ckpt.read_bytes())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        _export(source, out, monkeypatch, "--overwrite", "true")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    reason = (
        "holds folders ('logs'), which --overwrite would delete with the rest of it (an export is files only)"
        if holding == "a folder"
        else "holds the checkpoint being exported, which --overwrite would delete"
    )
    assert f"error: export --out '{out}' {reason}; choose a new directory" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
