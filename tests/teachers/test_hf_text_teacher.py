"""HFTextTeacher: text continuations from a local model's generate, with the trained addition
teacher ("63+4=" -> "76", the reversed sum), a random tiny model, and a model whose tokenizer is not
the student's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lit_opd.models import ModelSpec, check_tokenizers_compatible
from lit_opd.tasks import char_tokenizer
from lit_opd.teachers.text import HFTextTeacher
from tests.helpers import make_tiny_model, save_tiny_model

TEACHER = str(Path(__file__).resolve().parents[2] / "lit_opd" / "assets" / "addition" / "teacher")
GREEDY = {"63+4=": "76", "12+3=": "51", "99+1=": "001", "5+5=": "01"}  # reversed sums
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "plus", "is"]


@pytest.fixture(scope="module")
def trained():
    return HFTextTeacher(ModelSpec(path=TEACHER), batch_size=3)


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer unrelated to the student's character one (same special-token ids as the
    tiny models expect, different everything else)."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def test_greedy_answers_of_the_trained_teacher(trained):
    # 4 prompts over batch_size 3: two generate calls, left padding in each
    texts = trained.generate_text(list(GREEDY), max_new_tokens=6, num_samples=2, temperature=0.0)
    assert texts == [[a, a] for a in GREEDY.values()]
    assert trained.identity()["path"] == TEACHER and trained.identity()["class"] == "HFTextTeacher"


def test_usage_counts_prompts_and_sampled_tokens_up_to_the_end_token():
    teacher = HFTextTeacher(ModelSpec(path=TEACHER), batch_size=3)
    teacher.generate_text(list(GREEDY), max_new_tokens=6, num_samples=2, temperature=0.0)
    prompt_tokens = sum(len(teacher.tokenizer(p)["input_ids"]) for p in GREEDY)
    answer_tokens = sum(len(a) + 1 for a in GREEDY.values())  # one char a token, plus the end token
    assert teacher.stats() == {"calls": 4.0, "samples": 4.0, "prompt_tokens": float(prompt_tokens),
                               "completion_tokens": float(answer_tokens),
                               "tokens": float(prompt_tokens + answer_tokens)}
    resumed = HFTextTeacher(teacher.model, tokenizer=teacher.tokenizer)
    resumed.restore_stats(teacher.stats())
    assert resumed.stats() == teacher.stats()


def test_sampling_gives_num_samples_texts_of_digits(trained):
    texts = trained.generate_text(["63+4=", "12+3="], max_new_tokens=6, num_samples=3, temperature=1.0,
                                  seed=1)
    assert [len(row) for row in texts] == [3, 3]
    assert all(t.isdigit() for row in texts for t in row), texts


def test_stop_strings_cut(trained):
    stopped = HFTextTeacher(trained.model, tokenizer=trained.tokenizer, stop=["1"])
    assert stopped.generate_text(["99+1=", "63+4="], max_new_tokens=6, temperature=0.0) == [["00"], ["76"]]
    assert stopped.generate_text(["12+3="], max_new_tokens=6, num_samples=2) == [["5", "5"]]


def test_same_seed_same_texts(teacher_dir):
    teacher = HFTextTeacher(teacher_dir)  # random weights: samples differ from seed to seed
    prompts = ["12+3=", "4+56=", "7+8="]
    state = torch.random.get_rng_state()
    first = teacher.generate_text(prompts, max_new_tokens=8, num_samples=2, temperature=1.0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    assert teacher.generate_text(prompts, max_new_tokens=8, num_samples=2, temperature=1.0, seed=3) == first
    assert teacher.generate_text(prompts, max_new_tokens=8, num_samples=2, temperature=1.0, seed=4) != first


def test_teacher_with_another_tokenizer_than_the_student(tmp_path, char_tok):
    words = _word_tokenizer()
    with pytest.raises(ValueError, match="tokenizers differ"):  # token-level methods could not use it
        check_tokenizers_compatible(char_tok, words)
    save_tiny_model(make_tiny_model(len(words), hidden=32, layers=2, seed=3), words, tmp_path)
    teacher = HFTextTeacher(str(tmp_path))
    texts = teacher.generate_text(["one plus two is", "nine plus nine is"], max_new_tokens=5, num_samples=2,
                                  temperature=1.0)
    assert [len(row) for row in texts] == [2, 2] and any(t for row in texts for t in row)
    for text in (t for row in texts for t in row):
        assert len(text.split()) <= 5 and set(text.split()) <= set(WORDS), text


def test_chat_mode_renders_the_template(trained):
    chat_tok = char_tokenizer()  # the trained teacher's own tokenizer, fresh, to give it a template
    # the template hands the model the last line only: the prefix, which it was trained to continue
    chat_tok.chat_template = "{{ messages[-1]['content'].split('\\n')[-1] }}"
    teacher = HFTextTeacher(trained.model, tokenizer=chat_tok, chat=True, system_prompt="Add.")
    assert teacher.generate_text(["63+4=", "12+3="], max_new_tokens=6, temperature=0.0) == [["76"], ["51"]]
    assert teacher.identity()["chat"] is True


def test_errors_name_the_setting(trained):
    with pytest.raises(ValueError, match=r"HFTextTeacher\.chat"):
        HFTextTeacher(trained.model, tokenizer=trained.tokenizer, chat=True)  # no chat template
    with pytest.raises(ValueError, match=r"HFTextTeacher\.batch_size"):
        HFTextTeacher(trained.model, tokenizer=trained.tokenizer, batch_size=0)
    with pytest.raises(ValueError, match=r"HFTextTeacher\.stop"):
        HFTextTeacher(trained.model, tokenizer=trained.tokenizer, stop=[""])
    with pytest.raises(NotImplementedError, match="ServerTeacher.*HFTeacher"):
        trained.score(None)
    with pytest.raises(ValueError, match="temperature"):
        trained.generate_text(["1+1="], max_new_tokens=4, temperature=-1.0)
