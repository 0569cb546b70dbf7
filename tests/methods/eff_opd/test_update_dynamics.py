"""UpdateDynamicsCallback: hand-checked update statistics and the callback on a toy module."""

from __future__ import annotations

import io
import math

import pytest
import torch
from lightning.pytorch.loggers import Logger

from lit_opd.methods.eff_opd.dynamics import UpdateDynamicsCallback, update_stats
from lit_opd.methods.eff_opd.callback import EffOPDCallback
from tests.methods.eff_opd.test_eff_opd import FILTERED, Rising, toy_fit

E = torch.eye(3)


def test_rank_one_update():
    """W0 = I, ΔW = 2·e0 e1ᵀ: ‖ΔW‖/‖W0‖ = 2/√3, all energy in σ₁, u₁ = ±e0."""
    w = E + 2 * torch.outer(E[0], E[1])
    stats, u1 = update_stats(E, w, u_ref=-E[0])
    assert stats["rel_update_norm"] == pytest.approx(2 / math.sqrt(3), rel=1e-6)
    assert stats["top1_energy"] == pytest.approx(1.0, rel=1e-6)
    assert stats["u1_cos"] == pytest.approx(1.0, rel=1e-6)  # |cos|: the sign of u₁ is arbitrary
    assert torch.allclose(u1.abs(), E[0], atol=1e-6)
    assert update_stats(E, w, u_ref=E[2])[0]["u1_cos"] == pytest.approx(0.0, abs=1e-6)


def test_rank_two_update():
    """ΔW = diag(3, 4, 0): σ = (4, 3, 0), energy 16/25, u₁ = ±e1; an unnormalised reference is fine."""
    w0 = 2 * E
    stats, u1 = update_stats(w0, w0 + torch.diag(torch.tensor([3.0, 4.0, 0.0])), u_ref=5 * E[1])
    assert stats["rel_update_norm"] == pytest.approx(5 / math.sqrt(12), rel=1e-6)
    assert stats["top1_energy"] == pytest.approx(16 / 25, rel=1e-6)
    assert stats["u1_cos"] == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(u1.abs(), E[1], atol=1e-6)


def test_no_update_has_no_direction():
    stats, _ = update_stats(E, E.clone(), u_ref=E[0])
    assert stats["rel_update_norm"] == 0.0
    assert math.isnan(stats["top1_energy"]) and math.isnan(stats["u1_cos"])


class ListLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        pass

    def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001
        self.rows.append((step, dict(metrics)))


def test_callback_tracks_2d_attention_and_mlp_weights():
    callback, logger = UpdateDynamicsCallback(every_n_steps=2, reference_step=1), ListLogger()
    module = toy_fit(4, [callback], logger=logger, log_every_n_steps=1)
    assert sorted(callback.w0) == sorted(FILTERED)  # embed (no match) and norm (1-D) are not tracked
    assert [(r["step"], r["module"]) for r in callback.history] == [
        (s, m) for s in (1, 2, 4) for m in FILTERED
    ]
    summary = callback.summary()
    assert sorted(summary) == sorted(FILTERED)
    for name in FILTERED:
        w0 = callback.w0[name]
        w = dict(module.named_parameters())[name].detach()
        assert summary[name]["step"] == 4
        assert summary[name]["rel_update_norm"] == pytest.approx(float((w - w0).norm() / w0.norm()), rel=1e-5)
        assert 0.0 < summary[name]["top1_energy"] <= 1.0
        assert 0.0 <= summary[name]["u1_cos"] <= 1.0 + 1e-6
    first = [r for r in callback.history if r["step"] == 1]
    assert all(r["u1_cos"] == 1.0 for r in first)  # the reference step compares u₁ with itself
    steps = [step for step, metrics in logger.rows if "dynamics/mean_rel_update_norm" in metrics]
    assert steps == [1, 2, 4]
    assert f"dynamics/{FILTERED[0]}/top1_energy" in logger.rows[-1][1]


def test_reference_file_and_state_round_trip(tmp_path):
    first = UpdateDynamicsCallback(every_n_steps=2)
    toy_fit(2, [first])
    assert all(math.isnan(r["u1_cos"]) for r in first.history)  # no reference given
    path = tmp_path / "u1.pt"
    first.save_directions(path)
    second = UpdateDynamicsCallback(every_n_steps=2, reference_path=str(path))
    toy_fit(2, [second])  # the same seeded run: the same u₁ at step 2
    assert [r["u1_cos"] for r in second.history] == pytest.approx([1.0, 1.0], abs=1e-5)

    buffer = io.BytesIO()
    torch.save(second.state_dict(), buffer)
    buffer.seek(0)
    restored = UpdateDynamicsCallback(every_n_steps=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.history == second.history and restored.last_step == 2
    assert all(torch.equal(restored.w0[k], second.w0[k]) for k in second.w0)
    assert restored.summary() == second.summary()


def test_sees_effopd_edits_whatever_the_callback_order():
    histories = []
    for order in (0, 1):
        dynamics, effopd = UpdateDynamicsCallback(every_n_steps=1), EffOPDCallback(score_fn=Rising())
        module = toy_fit(2, [dynamics, effopd] if order == 0 else [effopd, dynamics])
        histories.append([(r["step"], r["module"], r["rel_update_norm"], r["top1_energy"])
                          for r in dynamics.history])
        w, w0 = dict(module.named_parameters())[FILTERED[0]].detach(), dynamics.w0[FILTERED[0]]
        assert dynamics.summary()[FILTERED[0]]["rel_update_norm"] == pytest.approx(
            float((w - w0).norm() / w0.norm()), rel=1e-5
        )
    assert histories[0] == histories[1]


def test_bad_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        UpdateDynamicsCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="not both"):
        UpdateDynamicsCallback(reference_step=3, reference_path="u1.pt")
