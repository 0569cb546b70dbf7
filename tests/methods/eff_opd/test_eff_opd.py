"""EffOPDCallback (lit_opd/methods/eff_opd/README.md): line search by hand, rollback, name filter, the
schedule and the callback state, on 1-D tensors and a toy LightningModule."""

from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_opd.methods.eff_opd.callback import EffOPDCallback, extrapolation_search, multipliers
from lit_opd.methods.eff_opd.held_out import scoring_context
from lit_opd.methods.eff_opd.parameters import select_parameters

FILTERED = ["layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"]


# ----- the line search --------------------------------------------------------------------------
def test_multipliers_match_the_official_recursion():
    """θ ← θ + a(θ − θ_anc), a ← a/(1+a) from a = 2 visits θ_anc + (3, 5, 7, 9, 11)·d."""
    assert multipliers(5) == [3.0, 5.0, 7.0, 9.0, 11.0]
    theta, anchor, a, visited = 1.0, 0.0, 2.0, []
    for _ in range(5):
        theta = theta + a * (theta - anchor)
        visited.append(theta)
        a = a / (1 + a)
    assert visited == pytest.approx(multipliers(5), rel=1e-12)
    assert multipliers(3, initial_factor=1.0) == [2.0, 3.0, 4.0]


def test_hand_checked_line_search():
    """anchor 0, θ_s = 1, score −(θ−6)²: 3 (−9 > −25, accept), 5 (−1, accept), 7 (−1, reject)."""
    theta, anchor = torch.tensor([1.0]), torch.tensor([0.0])
    seen = []

    def score() -> float:
        seen.append(theta.item())
        return -((theta.item() - 6.0) ** 2)

    result = extrapolation_search([theta], [anchor], score)
    assert seen == [1.0, 3.0, 5.0, 7.0]
    assert result.trial_accepted == [True, True, False]
    assert result.trial_scores == [-9.0, -1.0, -1.0]
    assert (result.initial_score, result.best_score, result.multiplier) == (-25.0, -1.0, 5.0)
    assert result.num_accepted == 2
    assert theta.item() == 5.0 and anchor.item() == 5.0


def test_every_trial_accepted_ends_at_multiplier_eleven():
    theta, anchor = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0])
    scores = iter(range(100))
    result = extrapolation_search([theta], [anchor], lambda: float(next(scores)))
    assert result.trial_accepted == [True] * 5 and result.multiplier == 11.0
    assert torch.equal(theta, torch.tensor([5.5, -21.0]))
    assert torch.equal(anchor, theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rejected_first_trial_restores_the_exact_bits(dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 7, generator=gen).to(dtype), torch.randn(3, generator=gen).to(dtype)]
    anchor = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen)]
    before = [p.clone() for p in params]
    scores = iter([1.0, 1.0])  # the trial only ties: not strictly better
    result = extrapolation_search(params, anchor, lambda: next(scores))
    assert result.trial_accepted == [False] and result.multiplier == 1.0
    for p, b, a in zip(params, before, anchor):
        assert p.dtype == dtype and torch.equal(p, b)
        assert a.dtype == torch.float32 and torch.equal(a, b.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollback_to_an_accepted_trial_restores_the_exact_bits(dtype):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(4, 4, generator=gen).to(dtype)]
    anchor = [torch.randn(4, 4, generator=gen)]
    snapshots, scores = [], iter([0.0, 2.0, 1.0])  # trial 1 accepted, trial 2 worse

    def score() -> float:
        snapshots.append(params[0].clone())
        return next(scores)

    result = extrapolation_search(params, anchor, score)
    assert result.trial_accepted == [True, False] and result.multiplier == 3.0
    assert torch.equal(params[0], snapshots[1])  # the scored trial-1 weights, bit for bit
    assert not torch.equal(snapshots[2], snapshots[1])


# ----- which parameters move --------------------------------------------------------------------
class Toy(L.LightningModule):
    """Params named ``embed``, ``layers.0.self_attn.q_proj``, ``layers.0.mlp.up_proj``, ``norm``;
    a separable loss, so each parameter's SGD path does not depend on the others."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(6, 3, generator=gen))
        block = nn.Module()
        block.self_attn, block.mlp = nn.Module(), nn.Module()
        block.self_attn.q_proj = nn.Parameter(torch.randn(3, 3, generator=gen))
        block.mlp.up_proj = nn.Parameter(torch.randn(3, 4, generator=gen))
        self.layers = nn.ModuleList([block])
        self.norm = nn.Parameter(torch.ones(3))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return sum(((p - 2.0) ** 2).sum() for p in self.parameters())

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(16, 1), batch_size=1)


def toy_fit(max_steps: int, callbacks: list, **kwargs) -> Toy:  # noqa: ANN003
    """Fit a fresh :class:`Toy` for ``max_steps`` SGD steps (also used by test_update_dynamics)."""
    module = Toy()
    settings = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    settings.update(kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, **settings)
    trainer.fit(module)
    return module


class Rising:
    """A score that rises on every call: every trial is accepted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, trainer, pl_module) -> float:  # noqa: ANN001
        self.calls += 1
        return float(self.calls)


def test_name_filter_selects_attention_and_mlp():
    names = [n for n, _ in select_parameters(Toy())]
    assert names == FILTERED
    assert [n for n, _ in select_parameters(Toy(), include=["norm"])] == ["norm"]


def test_only_filtered_parameters_move():
    init = {k: v.detach().clone() for k, v in Toy().named_parameters()}
    plain = dict(toy_fit(1, []).named_parameters())
    callback = EffOPDCallback(score_fn=Rising())
    moved = dict(toy_fit(1, [callback]).named_parameters())
    assert [r["step"] for r in callback.history] == [1]
    assert callback.history[0]["multiplier"] == 11.0
    for name in ("embed", "norm"):
        assert torch.equal(moved[name], plain[name]), name
    for name in FILTERED:  # θ_anc + 11 (θ_1 − θ_anc), the anchor being the weights at fit start
        expected = init[name] + 11 * (plain[name] - init[name])
        assert torch.allclose(moved[name], expected, atol=1e-5), name
        assert torch.equal(callback.anchor[name], moved[name].detach())
    assert set(callback.anchor) == set(FILTERED)


def test_default_schedule_triggers_at_powers_of_two():
    callback = EffOPDCallback(score_fn=lambda trainer, module: 0.0)
    toy_fit(9, [callback])
    assert [r["step"] for r in callback.history] == [1, 2, 4, 8]
    assert all(r["trial_accepted"] == [False] and r["multiplier"] == 1.0 for r in callback.history)


def test_schedules():
    every3 = EffOPDCallback(schedule=3)
    assert [s for s in range(10) if every3.should_trigger(s)] == [3, 6, 9]
    listed = EffOPDCallback(schedule=[2, 5])
    assert [s for s in range(10) if listed.should_trigger(s)] == [2, 5]
    pow2 = EffOPDCallback()
    pow2.last_trigger_step = 4
    assert [s for s in range(20) if pow2.should_trigger(s)] == [8, 16]


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_trials=0), dict(initial_factor=0.0), dict(score="acc"), dict(schedule="exp"), dict(schedule=0)],
    ids=str,
)
def test_bad_settings_fail_at_construction(kwargs):
    with pytest.raises(ValueError, match="EffOPDCallback"):
        EffOPDCallback(**kwargs)


def test_include_that_matches_nothing_fails_with_the_names():
    with pytest.raises(ValueError, match="matches no trainable parameter.*embed"):
        toy_fit(1, [EffOPDCallback(include=["lm_head"], score_fn=Rising())])


# ----- state ------------------------------------------------------------------------------------
def test_state_dict_round_trip_through_a_weights_only_file():
    callback = EffOPDCallback(score_fn=Rising())
    toy_fit(2, [callback])
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    restored = EffOPDCallback()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.history == callback.history
    assert restored.last_trigger_step == 2 and not restored.should_trigger(2)
    assert restored.should_trigger(4)
    assert restored.anchor.keys() == callback.anchor.keys()
    for name, value in callback.anchor.items():
        assert torch.equal(restored.anchor[name], value)


def test_scoring_leaves_rng_and_train_modes_alone():
    module = Toy()
    child = nn.Dropout()
    module.layers[0].add_module("drop", child)
    module.train()
    rng = torch.get_rng_state()
    draws = []
    for _ in range(2):
        with scoring_context(module, seed=7):
            assert not module.training and not child.training
            draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])  # a fixed seed: stochastic scores repeat
    assert torch.equal(torch.get_rng_state(), rng)
    assert module.training and child.training
