"""Prompts from a Hugging Face ``datasets`` data set (``pip install 'lit_opd[data]'``): a hub id, a
folder written by ``save_to_disk``, data files (parquet, JSON, JSONL, CSV), or a ``Dataset`` object.

Rows come out as every other source's: ``prompt`` or ``messages`` (the conversational format, its final
assistant turn the reference answer: :func:`~lit_opd.rollout.sources.split_reference`), optional
``answer`` and ``domain``, and every other column as it is.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from lit_opd.errors import MissingExtra, MissingFile, SettingError
from lit_opd.rollout.sources import PromptSource, check_row

#: Row fields a column can be mapped to (``columns: {prompt: question, answer: solution}``).
FIELDS = ("prompt", "messages", "answer", "domain", "completion")
# File endings → the datasets builder that reads them.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


class HFDatasetPrompts(PromptSource):
    """One split of a Hugging Face data set as prompt rows.

    Args:
        path: a hub id (``openai/gsm8k``, loaded by ``datasets.load_dataset``: the hub is only reached
            for an id), a folder saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or
            data files: one path, a glob (``data/*.parquet``) or a list (parquet, json, jsonl, csv, arrow).
        split: which split, with ``datasets``' slicing (``train``, ``test[:500]``). Data files form a
            split of that name.
        name: the data set's configuration (``main`` for gsm8k); None = its default.
        columns: row field → column, for data sets whose columns are named otherwise, e.g.
            ``{prompt: question, answer: final_answer}``; fields: prompt, messages, answer, domain,
            completion. Unmapped fields are read from columns of the same name.
        revision: the hub revision (branch, tag or commit) of a hub id.
        dataset: a ``datasets.Dataset`` (or a ``DatasetDict``, whose ``split`` is taken) already in
            memory, instead of ``path`` (from Python).
    """

    def __init__(
        self, path: str | list[str] | None = None, split: str = "train", name: str | None = None,
        columns: dict[str, str] | None = None, revision: str | None = None, dataset: Any = None,
    ) -> None:
        if (path is None) == (dataset is None):
            raise SettingError("HFDatasetPrompts needs exactly one of path (a hub id, a save_to_disk folder or "
                             "data files) or dataset (a datasets.Dataset)")
        unknown = sorted(set(columns or {}) - set(FIELDS))
        if unknown:
            raise SettingError(f"HFDatasetPrompts.columns names {unknown}, not row fields; map any of "
                             f"{', '.join(FIELDS)} to a column, e.g. {{prompt: question}}")
        self.path, self.split, self.name, self.revision = path, split, name, revision
        self.columns, self.dataset = dict(columns or {}), dataset

    def load(self) -> list[dict]:
        data = self._open()
        renames = {column: field for field, column in self.columns.items()}
        missing = sorted(set(renames) - set(data.column_names))
        if missing:
            raise SettingError(f"HFDatasetPrompts.columns: {self.where()} has no column {missing[0]!r}; its "
                             f"columns are {data.column_names}")
        rows = [self._row(record, renames, i) for i, record in enumerate(data)]
        if not rows:
            raise SettingError(f"HFDatasetPrompts: {self.where()} holds no rows")
        return rows

    def _row(self, record: dict, renames: dict[str, str], index: int) -> dict:
        # A mapped column takes its field's name, replacing a column already named like the field.
        row = {k: v for k, v in record.items() if k not in renames}
        row.update({field: record[column] for column, field in renames.items()})
        if isinstance(row.get("answer"), (int, float)) and not isinstance(row["answer"], bool):
            row["answer"] = str(row["answer"])  # numeric answer columns (e.g. 72) compare as text
        return check_row(row, f"{self.where()} row {index}")

    def where(self) -> str:
        """The data set as messages name it."""
        return f"{self.path if self.path is not None else 'dataset'} [{self.split}]"

    def location(self, index: int) -> str | None:
        return f"{self.where()} row {index}"

    def _open(self):  # noqa: ANN202 - a datasets.Dataset
        datasets = import_datasets()
        if self.dataset is not None:
            return self._pick_split(self.dataset, datasets)
        if isinstance(self.path, str) and Path(self.path).is_dir() and is_saved_dataset(Path(self.path)):
            return self._pick_split(datasets.load_from_disk(self.path), datasets)
        files = data_files(self.path)
        try:
            if files:
                named = {self.split.split("[")[0]: files}
                return datasets.load_dataset(builder_for(files), data_files=named, split=self.split)
            return datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
            raise MissingFile(f"HFDatasetPrompts.path={self.path!r} cannot be loaded "
                                    f"({first_line(err)}); give a hub id, a save_to_disk folder or data "
                                    "files") from None
        except ValueError as err:  # an unknown split or configuration
            raise SettingError(f"HFDatasetPrompts: {self.where()}: {first_line(err)}; check split and "
                             "name") from None

    def _pick_split(self, data: Any, datasets: Any) -> Any:
        if not isinstance(data, datasets.DatasetDict):
            if not isinstance(data, datasets.Dataset):
                raise SettingError(f"HFDatasetPrompts.dataset must be a datasets.Dataset or DatasetDict, got "
                                 f"{type(data).__name__}")
            return data
        base = self.split.split("[")[0]
        if base not in data:
            raise SettingError(f"HFDatasetPrompts.split={self.split!r}: the data set has splits {list(data)}")
        if base != self.split:  # a slice of a saved DatasetDict's split
            return data[base].select(range(*slice_bounds(self.split, len(data[base]))))
        return data[base]


def import_datasets():  # noqa: ANN201 - the datasets module
    try:
        import datasets
    except ImportError:
        raise MissingExtra("HFDatasetPrompts needs the datasets package: pip install "
                          "'lit_opd[data]'") from None
    return datasets


def is_saved_dataset(folder: Path) -> bool:
    """A ``save_to_disk`` folder: a Dataset (``state.json``) or a DatasetDict (``dataset_dict.json``)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def data_files(path: str | list[str]) -> list[str]:
    """The data files ``path`` names (a file, a glob or a list of them); [] for anything else (a hub
    id, or a folder of files that ``load_dataset`` reads itself)."""
    files = []
    for pattern in [path] if isinstance(path, str) else list(path):
        if not any(c in pattern for c in "*?["):  # hub ids never hold these
            files.append(pattern)
        elif not (matched := sorted(glob.glob(pattern))):
            raise MissingFile(f"HFDatasetPrompts.path={pattern!r} matches no file")
        else:
            files += matched
    if not files or not all(Path(f).suffix in BUILDERS for f in files):
        if not isinstance(path, str):
            raise SettingError(f"HFDatasetPrompts.path={path!r}: a list must hold data files ending in "
                             f"{', '.join(BUILDERS)}")
        return []
    absent = [f for f in files if not Path(f).is_file()]
    if absent:
        raise MissingFile(f"HFDatasetPrompts.path: {absent[0]!r} does not exist")
    return files


def builder_for(files: list[str]) -> str:
    kinds = {BUILDERS[Path(f).suffix] for f in files}
    if len(kinds) > 1:
        raise SettingError(f"HFDatasetPrompts.path mixes file kinds {sorted(kinds)}; give files of one kind")
    return kinds.pop()


def slice_bounds(split: str, length: int) -> tuple[int, int]:
    """``(start, stop)`` of a ``name[a:b]`` split on ``length`` rows (percentages not supported here)."""
    inner = split[split.index("[") + 1 : split.rindex("]")]
    try:
        start, stop = (int(x) if x.strip() else None for x in inner.split(":"))
    except ValueError:
        raise SettingError(f"HFDatasetPrompts.split={split!r}: slice a saved split as name[start:stop] with "
                         "integers") from None
    return slice(start, stop).indices(length)[:2]


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
