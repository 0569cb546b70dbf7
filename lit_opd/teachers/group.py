"""TeacherGroup: K teachers (any mix of sizes and kinds) behind the one teacher protocol.

A group has no single distribution of its own: a method decides how its members combine (a teacher
per row, fixed weights, weights from a debate). What the group provides is the bookkeeping every
such method needs, done once: each member placed, connected and counted once, every identity in the
checkpoint, and two ways of scoring a batch:

* :meth:`TeacherGroup.score_each`: every member scores the whole batch (weighted mixtures).
* :meth:`TeacherGroup.score_rows`: each row goes to the member a route names; the members' outputs
  are stitched back in row order (a teacher per domain or data set).

A group given ``route_field`` (and optionally ``routes``) also has a plain :meth:`~TeacherGroup.score`:
each row is scored by the teacher its source field names, so even a single-teacher method (OPDModule)
can distill from a teacher per domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace

import torch
from torch import Tensor

from lit_opd.errors import SettingError
from lit_opd.teachers.base import Teacher
from lit_opd.types import RolloutBatch, TeacherOutput

OUTPUT_FIELDS = ("logits_BTV", "topk_logp_BTK", "topk_ids_BTK", "token_logp_BT")


class TeacherGroup(Teacher):
    """Named teachers behind the teacher protocol.

    Args:
        teachers: name → teacher; at least one. Names appear in logs, checkpoints and routes.
        route_field: the row field (e.g. ``domain``) that names each row's teacher; only needed for
            the plain :meth:`score` (a method that routes may pass its own).
        routes: row-field value → teacher name (e.g. ``{math: teacher_a, code: teacher_b}``); None =
            the field's value is itself the teacher's name.
    """

    def __init__(
        self,
        teachers: dict[str, Teacher],
        route_field: str | None = None,
        routes: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(teachers, dict) or not teachers:
            raise SettingError("TeacherGroup.teachers must be a non-empty mapping name -> teacher, e.g. "
                             "{teacher_a: HFTeacher(...), teacher_b: HFTeacher(...)}")
        for name, teacher in teachers.items():
            if not isinstance(name, str) or not name:
                raise SettingError(f"TeacherGroup.teachers: every name must be a non-empty string, "
                                 f"got {name!r}")
            if not isinstance(teacher, Teacher) or isinstance(teacher, TeacherGroup):
                raise SettingError(f"TeacherGroup.teachers[{name!r}] must be a single teacher (e.g. "
                                 f"HFTeacher), got {type(teacher).__name__}")
        self.teachers = dict(teachers)
        self.capability = min(t.capability for t in self.teachers.values())  # the weakest member's
        self.tokenizer = _shared_tokenizer(self.teachers)
        self.route_field = route_field
        self.routes = check_routes(routes, self.names, "TeacherGroup")

    @property
    def names(self) -> list[str]:
        return list(self.teachers)

    def __getitem__(self, name: str) -> Teacher:
        return self.teachers[name]

    def __len__(self) -> int:
        return len(self.teachers)

    def _distinct(self) -> list[Teacher]:
        """Each member object once, even when one teacher serves under two names."""
        seen: dict[int, Teacher] = {}
        for teacher in self.teachers.values():
            seen.setdefault(id(teacher), teacher)
        return list(seen.values())

    # ----- lifecycle --------------------------------------------------------------------------
    def identity(self) -> dict:
        return {name: teacher.identity() for name, teacher in self.teachers.items()}

    def to(self, device: torch.device | str) -> TeacherGroup:
        for teacher in self._distinct():
            teacher.to(device)
        return self

    def connect(self) -> None:
        for teacher in self._distinct():
            teacher.connect()

    def stats(self) -> dict[str, float]:
        """Every member's counters, as ``<name>/<key>``."""
        return {f"{name}/{key}": value for name, teacher in self.teachers.items()
                for key, value in teacher.stats().items()}

    def restore_stats(self, stats: dict[str, float]) -> None:
        for name, teacher in self.teachers.items():
            prefix = f"{name}/"
            teacher.restore_stats({k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)})

    # ----- scoring ----------------------------------------------------------------------------
    def score(self, batch: RolloutBatch) -> TeacherOutput:
        """Each row scored by the teacher its ``route_field`` names (see the class docstring)."""
        if self.route_field is None:
            raise SettingError(
                "A TeacherGroup has no single distribution to score with: its members are combined by a "
                "method. Use it through MADOPDModule (mode routed, fixed or debate), or give the group "
                "route_field (and routes) so that each row is scored by the teacher its field names."
            )
        return self.score_rows(batch, self.route(batch.rows, self.route_field, self.routes))

    def route(self, rows: Sequence[dict], field: str, routes: dict[str, str] | None) -> list[str]:
        """The teacher name of every row: ``routes[row[field]]`` (or the value itself without routes)."""
        if not rows:
            raise SettingError(f"routing needs the batch's source rows (field {field!r}), but the batch has "
                             "none")
        names = []
        for index, row in enumerate(rows):
            if field not in row:
                raise SettingError(
                    f"row {index} has no field {field!r} (its fields: {sorted(row)}), so it cannot be routed "
                    f"to a teacher; give every row a {field!r} or set route_field to a field the rows have"
                )
            value = row[field]
            name = value if routes is None else routes.get(str(value))
            if name not in self.teachers:
                known = sorted(routes) if routes is not None else self.names
                what = "routes has no entry for" if routes is not None else "no teacher is named"
                raise SettingError(
                    f"row {index}: {field}={value!r}, but {what} {value!r}; known {field} values: {known}. "
                    f"Add {value!r} to routes (teachers: {self.names}) or drop such rows from the source."
                )
            names.append(name)
        return names

    @torch.no_grad()
    def score_each(self, batch: RolloutBatch) -> dict[str, TeacherOutput]:
        """Every member's judgement of the whole batch, by name."""
        return {name: teacher.score(batch) for name, teacher in self.teachers.items()}

    @torch.no_grad()
    def score_rows(self, batch: RolloutBatch, route: Sequence[str]) -> TeacherOutput:
        """Row b scored by teacher ``route[b]`` (one call per teacher over its rows), stitched back
        in row order."""
        B = batch.completion_ids_BT.shape[0]
        if len(route) != B:
            raise SettingError(f"score_rows got {len(route)} route entries for a batch of {B} rows")
        parts: dict[str, tuple[Tensor, TeacherOutput]] = {}
        for name in dict.fromkeys(route):
            if name not in self.teachers:
                raise SettingError(f"score_rows: no teacher named {name!r}; teachers: {self.names}")
            idx_b = torch.tensor([i for i, n in enumerate(route) if n == name], dtype=torch.long)
            parts[name] = (idx_b, self.teachers[name].score(select_rows(batch, idx_b)))
        return stitch_outputs(parts, B)

    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[str | None]]:
        raise NotImplementedError(
            "a TeacherGroup does not generate text itself; ask one member (group[name].generate_text)"
        )


def check_routes(routes: dict[str, str] | None, names: Sequence[str], owner: str) -> dict[str, str] | None:
    """``routes`` with string keys, every target a known teacher name (else one error naming it)."""
    if routes is None:
        return None
    if not isinstance(routes, dict) or not routes:
        raise SettingError(f"{owner}.routes must be a non-empty mapping field value -> teacher name, or null")
    unknown = {value: name for value, name in routes.items() if name not in names}
    if unknown:
        raise SettingError(f"{owner}.routes sends {unknown} to teachers that do not exist; "
                         f"teachers: {list(names)}")
    return {str(value): name for value, name in routes.items()}


def select_rows(batch: RolloutBatch, idx_b: Tensor) -> RolloutBatch:
    """The rows ``idx_b`` of ``batch`` (every per-row tensor and list; padding widths kept)."""
    B, picks = batch.completion_ids_BT.shape[0], idx_b.tolist()
    changes = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == B:
            changes[f.name] = value.index_select(0, idx_b.to(value.device))
        elif isinstance(value, list) and len(value) == B:
            changes[f.name] = [value[i] for i in picks]
    return replace(batch, **changes)


def stitch_outputs(parts: dict[str, tuple[Tensor, TeacherOutput]], B: int) -> TeacherOutput:
    """One TeacherOutput of B rows from the members' outputs on their rows (``parts``: name →
    (row indices, output))."""
    present = {name: {f for f in OUTPUT_FIELDS if getattr(out, f) is not None}
               for name, (_, out) in parts.items()}
    kinds = {frozenset(p) for p in present.values()}
    if len(kinds) > 1:
        raise SettingError(
            f"the teachers routed in one batch return different fields ({present}), so their rows cannot "
            "be stitched into one output; route to teachers of one kind (e.g. all HFTeacher, or all "
            "ServerTeacher with the same k)"
        )
    stitched: dict[str, Tensor] = {}
    for f in next(iter(kinds)):
        shapes = {name: tuple(getattr(out, f).shape[1:]) for name, (_, out) in parts.items()}
        if len(set(shapes.values())) > 1:
            raise SettingError(f"the routed teachers' {f} shapes differ {shapes}; give them the same "
                             "vocabulary (and the same top-k)")
        first = getattr(next(iter(parts.values()))[1], f)
        full = first.new_zeros((B, *first.shape[1:]))
        for idx_b, out in parts.values():
            full[idx_b.to(full.device)] = getattr(out, f)
        stitched[f] = full
    answered_B = None
    if any(out.answered_B is not None for _, out in parts.values()):
        device = next(iter(stitched.values())).device if stitched else None
        answered_B = torch.ones(B, dtype=torch.bool, device=device)
        for idx_b, out in parts.values():
            if out.answered_B is not None:
                answered_B[idx_b.to(answered_B.device)] = out.answered_B.to(answered_B.device).bool()
    return TeacherOutput(**stitched, answered_B=answered_B)


def _shared_tokenizer(teachers: dict[str, Teacher]):  # noqa: ANN202 - any transformers tokenizer
    """The members' tokenizer when every member has one and all map tokens to the same ids (so a
    method can check it against the student's once), else None."""
    toks = [t.tokenizer for t in teachers.values()]
    if any(tok is None for tok in toks):
        return None
    vocab = toks[0].get_vocab()
    same = all(tok is toks[0] or tok.get_vocab() == vocab for tok in toks[1:])
    return toks[0] if same else None


__all__ = ["TeacherGroup", "check_routes", "select_rows", "stitch_outputs"]
