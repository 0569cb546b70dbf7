"""Bad data and settings of the rollout side end in one line that names the setting and the fix
(issue 24), or now simply work (a huge seed, a padded teacher vocabulary).

Through ``python -m lit_opd fit`` in-process where the setting lives in a config; otherwise by calling
the code that raises and reading the line the CLI would print (:func:`lit_opd.errors.user_message`).
"""

from __future__ import annotations

import codecs
import copy
import errno
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lit_opd import HFTeacher, OPDModule
from lit_opd.cli import main
from lit_opd.errors import UserError, user_message
from lit_opd.models import completion_logits
from lit_opd.objectives import Divergence
from lit_opd.rollout import JsonlPrompts, ListPrompts, RolloutDataModule
from lit_opd.rollout.datamodule import rollout_seed, step_seed
from lit_opd.rollout.prompts import PromptTokenizer
from lit_opd.rollout.sampling import filter_logits
from lit_opd.rollout.turns import TurnPrompts
from lit_opd.tasks import char_tokenizer
from lit_opd.teachers.api import APITeacher
from lit_opd.types import SamplingParams
from tests.helpers import make_module, make_rollout_batch, make_tiny_model
from tests.integration.cli import raised
from tests.integration.scripts.procs import REPO, tiny_opd_config

pytestmark = pytest.mark.integration

KEY = "sk-proj-" + "Ab3dE" * 9  # what a pasted OpenAI key looks like (not a real one)
ROLES_ONLY = (  # a template that renders system/user/assistant and silently drops any other role
    "{% for m in messages %}{% if m['role'] in ['system', 'user', 'assistant'] %}<bos>{{ m['role'] }}: "
    "{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}<bos>assistant: {% endif %}"
)
RAISES = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be user/assistant') }}{% endif %}{{ m['content'] }}"
    "{% endfor %}"
)


def _line(fn, *args, **kwargs) -> str:  # noqa: ANN001, ANN003
    """The one line the CLI prints for what ``fn(*args, **kwargs)`` raises."""
    message = user_message(raised(fn, *args, **kwargs))
    assert message is not None and "\n" not in message, message
    return message


def _rows(tok, rows, split="training", **settings):  # noqa: ANN001, ANN003, ANN202
    options = dict(max_prompt_tokens=512, over_long="error", use_chat_template=None, system_prompt=None)
    return PromptTokenizer(tok, **{**options, **settings}).rows(rows, split)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----- through the CLI --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config(tmp_path_factory, student_dir, teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    return tiny_opd_config(root / "tiny.yaml", root / "run", student_dir, teacher_dir, max_steps=1)


def _cli_error(args: list[str], monkeypatch, capsys, never: str = "\0") -> str:  # noqa: ANN001
    """The one ``error:`` line of ``python -m lit_opd *args`` (exit 1, no traceback, ``never`` nowhere)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit_opd", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and never not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_bad_data_settings_via_the_cli(config, tmp_path, monkeypatch, capsys):
    fit = ["fit", "--config", str(config)]
    jsonl = ["--data.init_args.source", "lit_opd.JsonlPrompts", "--data.init_args.source.init_args.path"]
    long = _jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1="}, {"prompt": "2+2="}, {"prompt": "9" * 125}])
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(codecs.BOM_UTF16_LE + '{"prompt": "1+1="}\n'.encode("utf-16-le"))
    path_setting = "error: data.init_args.source.init_args.path: JsonlPrompts.path"
    cases = {
        "directory": ([*jsonl, str(tmp_path)], (
            f"{path_setting}='{tmp_path}' is a directory, not a file; point it at a .jsonl file")),
        "utf-16": ([*jsonl, str(utf16)], (
            f"{path_setting}='{utf16}' is UTF-16 text (or binary), not UTF-8; save it as UTF-8 "
            "(e.g. iconv -f UTF-16 -t UTF-8)")),
        "positions": ([*jsonl, long], (
            f"error: training row 2 ({long}:3) has a 125-token prompt: with sampling.max_new_tokens=6 it "
            "needs 131 positions, more than the student's max_position_embeddings=128; set max_prompt_tokens "
            "to at most 122 (with over_long_prompts 'truncate' or 'skip') or lower sampling.max_new_tokens")),
        "val_size 1.0": (["--data.init_args.val_size", "1.0"], (
            "error: RolloutDataModule.val_size=1.0 is neither a fraction below 1 (e.g. 0.1) nor a whole "
            "number of rows written without a decimal point (e.g. 10); use one of those (0 disables "
            "validation)")),
        "val_batch_size 0": (["--data.init_args.val_batch_size", "0"],
                             "error: RolloutDataModule.val_batch_size must be >= 1, got 0"),
    }
    for name, (override, expected) in cases.items():
        assert _cli_error([*fit, *override], monkeypatch, capsys) == expected, name


def test_a_pasted_api_key_is_refused_without_repeating_it(monkeypatch, capsys):
    args = ["fit", "--config", "configs/omni_opd/carry_api.yaml",
            "--model.init_args.teacher.init_args.api_key_env", KEY]
    line = _cli_error(args, monkeypatch, capsys, never=KEY[3:])
    assert line == (
        "error: APITeacher.api_key_env must be the NAME of an environment variable that holds the key (e.g. "
        "OPENAI_API_KEY), but the value given looks like a key itself (not shown here); put the key in a "
        "variable (export MY_API_KEY=...) and set APITeacher.api_key_env: MY_API_KEY"
    )
    monkeypatch.setenv("LIT_OPD_TEST_KEY", "x")
    for value in (KEY, "hf_" + "aB3" * 12, "A" * 41, "my key", "sk-abc"):
        err = raised(APITeacher, "http://127.0.0.1:1/v1", "m", api_key_env=value)
        assert value not in str(err) and "looks like a key" in user_message(err), value
    assert APITeacher("http://127.0.0.1:1/v1", "m", api_key_env="LIT_OPD_TEST_KEY").calls.api_key_env


# ----- rows -------------------------------------------------------------------------------------
def test_bad_rows_are_named(tmp_path):
    tok, chat = char_tokenizer(), char_tokenizer(chat_template=True)
    both = {"prompt": "1+1=", "messages": [{"role": "user", "content": "1+1="}]}
    assert _line(_rows, tok, [{"prompt": "2+2="}, both]) == (
        "training row 1 has both 'prompt' and 'messages'; keep one (which one is used would depend on "
        "whether the tokenizer has a chat template)"
    )
    assert _line(_rows, tok, [{"prompt": ""}]) == (
        "training row 0 has an empty 'prompt'; remove the row or write its prompt")
    chat.chat_template = ROLES_ONLY
    wizard = {"messages": [{"role": "wizard", "content": "cast 1+1"}, {"role": "user", "content": "1+1="}]}
    assert _line(_rows, chat, [{"prompt": "2+2="}, wizard]) == (
        "training row 1: the chat template drops messages with role 'wizard' (their text is not in its "
        "output); use a role it renders (system, user, assistant)"
    )
    empty_tool = [{"role": "tool", "content": ""}, {"role": "user", "content": "1"}]
    assert len(_rows(chat, [{"messages": empty_tool}])) == 1  # nothing to lose
    chat.chat_template = RAISES
    assert _line(_rows, chat, [{"prompt": "2+2=", "answer": "4"}], system_prompt="be brief") == (
        "training row 0: the tokenizer's chat template refused its messages (Conversation roles must be "
        "user/assistant); fix the row's roles/order or use a tokenizer whose template accepts them"
    )


def test_rows_are_named_by_their_file_line(tmp_path):
    """An over-long validation row is reported with its source index and file line, not its index in the
    validation split."""
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(40)]
    rows[29]["prompt"] = "1" * 20 + "+1="
    path = tmp_path / "v.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # a blank first line
    dm = RolloutDataModule(ListPrompts(rows[:8]), val_source=JsonlPrompts(str(path)), max_prompt_tokens=16)
    dm.tokenizer = char_tokenizer()
    assert _line(dm.setup, "fit") == (
        f"validation row 29 ({path}:31) has a 23-token prompt, longer than max_prompt_tokens=16; raise "
        "max_prompt_tokens or set over_long_prompts to 'truncate' or 'skip'"
    )


def test_skipped_rows_are_counted_when_too_few_remain():
    rows = [{"prompt": "1" * 20 if i % 5 else "1+1="} for i in range(50)]  # 40 of 50 over-long
    dm = RolloutDataModule(ListPrompts(rows), val_size=0, batch_size=16, max_prompt_tokens=8,
                           over_long_prompts="skip")
    dm.tokenizer = char_tokenizer()
    dm.setup("fit")
    assert _line(dm.train_dataloader) == (
        "RolloutDataModule has 10 training prompts (40 of 50 were skipped as longer than "
        "max_prompt_tokens=8, over_long_prompts='skip'), fewer than batch_size=16; lower batch_size, raise "
        "max_prompt_tokens or add prompts"
    )


def test_unreadable_jsonl_files(tmp_path, monkeypatch):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "1+1="}\n{"prompt": "caf\xe9"}\n')
    assert _line(JsonlPrompts(str(latin)).load) == (
        f"JsonlPrompts.path='{latin}' is not UTF-8 text: line 2 holds byte 0xe9; save the file as UTF-8 "
        "(e.g. iconv -f latin1 -t UTF-8)"
    )
    no_bom = tmp_path / "utf16be.jsonl"
    no_bom.write_bytes('{"prompt": "1+1="}\n'.encode("utf-16-be"))
    assert "is UTF-16 text (or binary), not UTF-8" in _line(JsonlPrompts(str(no_bom)).load)
    bom8 = _jsonl(tmp_path / "bom8.jsonl", [{"prompt": "1+1="}])
    Path(bom8).write_bytes(codecs.BOM_UTF8 + Path(bom8).read_bytes())
    assert JsonlPrompts(bom8).load() == [{"prompt": "1+1="}]  # a UTF-8 byte-order mark is fine

    def denied(self):  # noqa: ANN001, ANN202 - as root (here) chmod cannot make a file unreadable
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert _line(JsonlPrompts(bom8).load) == (
        f"JsonlPrompts.path='{bom8}' cannot be read: permission denied; make it readable (e.g. chmod a+r) "
        "or point at a copy you can read"
    )


# ----- settings ---------------------------------------------------------------------------------
def test_val_sizes_and_batch_sizes():
    source = ListPrompts([{"prompt": f"{i}+1="} for i in range(20)])
    for bad in (1.0, 1.5, -1, -0.5, True):
        line = _line(RolloutDataModule, source, val_size=bad)
        assert f"val_size={bad!r} is neither a fraction below 1" in line
    for name in ("batch_size", "val_batch_size"):
        for bad in (0, -2):
            line = _line(RolloutDataModule, source, **{name: bad})
            assert line == f"RolloutDataModule.{name} must be >= 1, got {bad}"
    sizes = {}
    for val_size in (1, 0.9, 0.1, 5):
        dm = RolloutDataModule(source, val_size=val_size)
        dm.tokenizer = char_tokenizer()
        dm.setup("fit")
        sizes[val_size] = len(dm.val_rows)
    assert sizes == {1: 1, 0.9: 18, 0.1: 2, 5: 5}


def test_any_int_seed_works_and_old_seeds_keep_their_streams():
    assert rollout_seed(7, 3, 1, "greedy") == ((7 * 1_000_003 + 3) * 4099 + 1) * 4 + 2  # unchanged
    assert step_seed(-5, 0, 0) == -5 * 1_000_003 * 4099  # torch takes negatives; kept as they were
    for seed in (560_000_001, 2**70, -(2**80)):
        torch.Generator().manual_seed(rollout_seed(seed, 12, 3, "student"))
        torch.Generator().manual_seed(step_seed(seed, 12, 3))
        assert rollout_seed(seed, 12, 3, "student") == rollout_seed(seed, 12, 3, "student")
    dm = RolloutDataModule(ListPrompts([{"prompt": f"{i}+1="} for i in range(8)]), val_size=2, batch_size=2,
                           seed=10**25)
    dm.tokenizer = char_tokenizer()
    dm.setup("fit")
    assert sum(len(b.row_index_B) for b in dm.train_dataloader()) == 6


def test_top_k_above_the_vocabulary_keeps_every_token():
    logits = torch.randn(2, 104)
    off = filter_logits(logits, SamplingParams())
    assert torch.equal(filter_logits(logits, SamplingParams(top_k=500)), off)


def test_divergence_top_k_above_the_vocabulary_is_one_line(char_tok):
    from lit_opd.objectives import Divergence
    from lit_opd.objectives.paths import token_terms
    from lit_opd.types import TeacherOutput
    from tests.helpers import make_rollout_batch

    batch = make_rollout_batch(char_tok)
    student = make_tiny_model(len(char_tok), 32, 2, seed=0)
    teacher = make_tiny_model(len(char_tok), 32, 2, seed=1)
    objective = Divergence(top_k=500)
    teacher_out = TeacherOutput(logits_BTV=completion_logits(teacher, batch).detach())
    terms = token_terms(student, batch, teacher_out, objective)
    with pytest.raises(ValueError) as err:
        objective(batch, terms, teacher_out)
    expected = "Divergence.top_k=500 is above the teacher's vocabulary (104 ids)"
    assert user_message(err.value).startswith(expected)


# ----- a teacher with a padded vocabulary -------------------------------------------------------
def _padded_pair(rows: int):  # noqa: ANN202
    """A model with ``rows`` output rows, and a copy cut to the 104 ids of the char tokenizer."""
    padded = make_tiny_model(rows, 32, 2, seed=1)
    cut = copy.deepcopy(padded)
    cut.resize_token_embeddings(104)
    return padded, cut


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["logits", "lean"])
def test_a_padded_vocabulary_is_compared_over_the_ids_both_have(char_tok, chunk_size):
    """The same tokenizer, embedding matrices of 104 and 128 rows: the loss is the one of the unpadded
    models, on either side and on both loss paths."""
    batch = make_rollout_batch(char_tok)
    padded_teacher, teacher = _padded_pair(128)
    padded_student, student = _padded_pair(120)

    def loss(s, t) -> torch.Tensor:  # noqa: ANN001
        module = OPDModule(copy.deepcopy(s), HFTeacher(t, tokenizer=char_tok), tokenizer=char_tok,
                           objective=Divergence(kind="jsd", beta=0.5, chunk_size=chunk_size))
        value = module.loss(batch, module.score_teacher(batch))[0]
        value.backward()
        return value.detach()

    expected = loss(student, teacher)
    assert torch.allclose(loss(student, padded_teacher), expected, atol=1e-6)
    assert torch.allclose(loss(padded_student, teacher), expected, atol=1e-6)
    assert torch.isfinite(loss(padded_student, padded_teacher))  # over the 120 ids both have
    small = make_tiny_model(100, 32, 2, seed=1)
    line = _line(HFTeacher, small, tokenizer=char_tok)
    assert line.startswith("The teacher model has 100 output rows but its tokenizer has 104 tokens")


# ----- the trainer, the optimizer, custom code, a full disk, DDP ranks ------------------------------
def test_trainer_and_optimizer_settings_via_the_cli(config, monkeypatch, capsys):
    fit = ["fit", "--config", str(config)]
    gpu = _cli_error([*fit, "--trainer.accelerator", "gpu"], monkeypatch, capsys)
    assert gpu.startswith("error: trainer: No supported gpu backend found! (this machine has ")
    assert gpu.endswith("set trainer.accelerator to cpu or auto, or run on a machine with a GPU and a CUDA "
                        "build of torch")
    assert _cli_error([*fit, "--model.init_args.optimizer.init_args.lr", "-0.1"], monkeypatch, capsys) == (
        "error: model.init_args.optimizer: the optimizer refused its settings (Invalid learning rate: -0.1); "
        "fix that value under model.init_args.optimizer.init_args")


def test_a_model_with_custom_code_is_refused_in_one_line(config, student_dir, tmp_path, monkeypatch, capsys):
    custom = tmp_path / "custom"
    shutil.copytree(student_dir, custom)
    settings = json.loads((custom / "config.json").read_text())
    settings.update(model_type="my_custom", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                     "AutoModelForCausalLM": "modeling_my.MyModel"})
    (custom / "config.json").write_text(json.dumps(settings))
    (custom / "configuration_my.py").write_text("raise SystemExit('code ran')\n")  # must never run
    line = _cli_error(["fit", "--config", str(config), "--model.init_args.student", str(custom)],
                      monkeypatch, capsys, never="code ran")
    assert line == (
        f"error: model.init_args.student: Model '{custom}' ships its own Python code (an auto_map in its "
        "config), which is not run unless you allow it; if you trust where it comes from, give the model as "
        "a spec with trust_remote_code: true (e.g. student: {path: ..., trust_remote_code: true}), or use a "
        "model transformers supports natively")


def test_a_full_disk_keeps_the_earlier_checkpoint_and_says_so(tmp_path, monkeypatch):
    from lit_opd.callbacks import AtomicCheckpointIO, checkpoint_io

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "tag": "old"}, path)

    def full_disk(obj, fh):  # noqa: ANN001 - torch.save's signature
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    new = {"state_dict": {"w": torch.ones(3)}, "tag": "new"}
    err = raised(AtomicCheckpointIO().save_checkpoint, new, path)
    assert user_message(err) == (
        f"Could not write checkpoint {path}: No space left on device; the earlier last.ckpt there is intact "
        f"(and the run's other checkpoints are untouched). Free space in {tmp_path} or point the "
        "ModelCheckpoint's dirpath at a disk with room, then resume with --ckpt_path set to the newest "
        "checkpoint there")
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["tag"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left


def test_turn_prompts_read_files_like_every_source(tmp_path):
    assert _line(TurnPrompts(path=str(tmp_path)).load) == (
        f"TurnPrompts.path='{tmp_path}' is a directory, not a file; point it at a .jsonl file")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    assert _line(TurnPrompts(path=str(latin1)).load).startswith(
        f"TurnPrompts.path='{latin1}' is not UTF-8 text: line 1 holds byte 0xe9")


def test_a_huge_method_seed_draws_its_mix(char_tok):
    module = make_module(char_tok, lmbda=0.5, seed=2**62)
    assert {module.completion_source() for _ in range(2)} <= {"student", "dataset"}


def test_only_rank_zero_prints_a_user_error(monkeypatch, capsys):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from lit_opd.errors import user_errors_exit

    for rank, printed in ((1, ""), (0, "error: bad setting\n")):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(SystemExit) as exit_, user_errors_exit():
            raise UserError("bad setting")
        assert exit_.value.code == 1
        assert capsys.readouterr().err.split("(set")[0] == printed
