"""HFDatasetPrompts: prompts from Hugging Face `datasets` data sets written by the test (save_to_disk,
parquet, JSONL), from a Dataset object, and from YAML; nothing is downloaded."""

from __future__ import annotations

import datasets
import pytest

from lit_opd import HFDatasetPrompts, RolloutDataModule
from lit_opd.tasks import char_tokenizer

CHAT = [
    {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}], "level": 1},
    {"messages": [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}], "level": 2},
]
QA = {"question": ["1+1=", "2+3=", "4+4="], "final": [2, 5, 8], "topic": ["math", "math", "code"]}


def test_a_save_to_disk_folder_in_the_conversational_format(tmp_path):
    datasets.Dataset.from_list(CHAT).save_to_disk(str(tmp_path / "chat"))
    rows = HFDatasetPrompts(str(tmp_path / "chat")).load()
    assert rows == CHAT  # loaded as stored; the reference turn is split off when prompts are encoded
    dm = RolloutDataModule(HFDatasetPrompts(str(tmp_path / "chat")), val_size=0, batch_size=1)
    dm.tokenizer = char_tokenizer(chat_template=True)
    dm.setup("fit")
    record = dm.train_rows[0]
    assert dm.tokenizer.decode(record["prompt_ids"]) == "<bos>user: 2+2=<eos><bos>assistant: "
    assert record["answer"] == "4" and record["row"]["level"] == 1


def test_a_dataset_dict_folder_picks_and_slices_its_split(tmp_path):
    splits = datasets.DatasetDict(train=datasets.Dataset.from_dict(QA), test=datasets.Dataset.from_dict(QA))
    splits.save_to_disk(str(tmp_path / "dd"))
    source = HFDatasetPrompts(str(tmp_path / "dd"), split="test[1:3]", columns={"prompt": "question"})
    assert [r["prompt"] for r in source.load()] == ["2+3=", "4+4="]
    with pytest.raises(ValueError, match=r"split='validation': the data set has splits \['train', 'test'\]"):
        HFDatasetPrompts(str(tmp_path / "dd"), split="validation").load()


def test_parquet_files_with_a_column_mapping(tmp_path):
    datasets.Dataset.from_dict(QA).to_parquet(str(tmp_path / "qa.parquet"))
    source = HFDatasetPrompts(str(tmp_path / "*.parquet"),
                              columns={"prompt": "question", "answer": "final", "domain": "topic"})
    rows = source.load()
    assert rows[1] == {"prompt": "2+3=", "answer": "5", "domain": "math"}  # numbers become text
    assert source.row_name(2, "training") == f"training row 2 ({tmp_path}/*.parquet [train] row 2)"


def test_jsonl_files_and_a_dataset_object(tmp_path):
    datasets.Dataset.from_list(CHAT).to_json(str(tmp_path / "chat.jsonl"))
    assert HFDatasetPrompts(str(tmp_path / "chat.jsonl")).load()[1]["level"] == 2
    in_memory = datasets.Dataset.from_dict(QA)
    assert HFDatasetPrompts(dataset=in_memory, columns={"prompt": "question"}).load()[0]["prompt"] == "1+1="


@pytest.mark.parametrize("kwargs, error, message", [
    ({}, ValueError, "needs exactly one of path"),
    ({"path": "x.parquet", "columns": {"question": "q"}}, ValueError, r"\['question'\], not row fields"),
    ({"path": "missing.parquet"}, FileNotFoundError, "'missing.parquet' does not exist"),
    ({"path": "nowhere/*.parquet"}, FileNotFoundError, r"path='nowhere/\*.parquet' matches no file"),
    ({"dataset": [{"prompt": "x"}]}, ValueError, "must be a datasets.Dataset or DatasetDict, got list"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, error, message):
    with pytest.raises(error, match=message):
        HFDatasetPrompts(**kwargs).load()


def test_a_mapped_column_that_is_missing_lists_the_columns(tmp_path):
    datasets.Dataset.from_dict(QA).to_parquet(str(tmp_path / "qa.parquet"))
    columns = r"no column 'problem'; its columns are \['question', 'final', 'topic'\]"
    with pytest.raises(ValueError, match=columns):
        HFDatasetPrompts(str(tmp_path / "qa.parquet"), columns={"prompt": "problem"}).load()


def test_a_row_without_a_prompt_names_the_row(tmp_path):
    datasets.Dataset.from_dict(QA).to_parquet(str(tmp_path / "qa.parquet"))
    with pytest.raises(ValueError, match=r"qa.parquet \[train\] row 0: a row needs a string 'prompt'"):
        HFDatasetPrompts(str(tmp_path / "qa.parquet")).load()


def test_a_hub_id_goes_through_load_dataset_and_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises((FileNotFoundError, ValueError), match="HFDatasetPrompts"):
        HFDatasetPrompts("no-such-user/no-such-dataset").load()


def test_the_source_builds_from_yaml(tmp_path):
    from jsonargparse import ArgumentParser

    datasets.Dataset.from_dict(QA).to_parquet(str(tmp_path / "qa.parquet"))
    parser = ArgumentParser()
    parser.add_argument("--source", type=HFDatasetPrompts)
    config = parser.parse_string(
        f"source: {{class_path: lit_opd.HFDatasetPrompts, init_args: {{path: {tmp_path}/qa.parquet, "
        "split: 'train[:2]', columns: {prompt: question, answer: final}}}")
    source = parser.instantiate_classes(config).source
    assert [r["answer"] for r in source.load()] == ["2", "5"]
