"""UpdateDynamicsCallback: how OPD moves the student's weight matrices (README.md, "UpdateDynamicsCallback").

EffOPD (arXiv 2605.11739) motivates extrapolation by three observations about ΔW = W_s − W_0 of
each attention / MLP matrix, measured here against the weights when training starts:

    rel_update_norm = ‖ΔW‖_F / ‖W_0‖_F                 how much each module moves ("allocation")
    top1_energy     = σ₁² / Σ σ_i²   (σ of ΔW)          low-rank concentration of the update
    u1_cos          = |⟨u₁(s), u₁_ref⟩|                 whether the top left singular vector is
                                                         "foreseeable early" (sign is arbitrary)

u₁_ref is the u₁ recorded at ``reference_step``, or loaded from a file written by
:meth:`UpdateDynamicsCallback.save_directions` (e.g. the final u₁ of an earlier run).

Cost: one fp32 copy of the tracked matrices (W_0, also saved in the checkpoint so a resumed run
measures against the same start) and a full SVD of each ΔW every ``every_n_steps`` steps, on
every rank. Meant for small models and benchmarks; sharded (``DTensor``) matrices are gathered
whole for the SVD. Mirrors the official analysis scripts (``Analysis/eval/svd.py``,
``upd_rank.py``); the rank-1 reconstruction evaluation is left to the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lit_opd.errors import SettingError
from lit_opd.methods.eff_opd.parameters import DEFAULT_MODULES, policy_of, select_parameters


@torch.no_grad()
def update_stats(w0: Tensor, w: Tensor, u_ref: Tensor | None = None) -> tuple[dict[str, float], Tensor]:
    """Relative norm, top-1 energy and |cos(u₁, u_ref)| of ΔW = w − w0 (fp32), and u₁ itself.

    With ΔW = 0 the energy and the cosine are NaN (no direction yet).
    """
    w0 = w0.float()
    delta = w.float().to(w0.device) - w0
    U, S, _ = torch.linalg.svd(delta, full_matrices=False)
    total = float((S**2).sum())
    u1 = U[:, 0]
    stats = {
        "rel_update_norm": float(delta.norm() / w0.norm().clamp_min(1e-30)),
        "top1_energy": float(S[0] ** 2) / total if total > 0 else math.nan,
        "u1_cos": math.nan,
    }
    if u_ref is not None and total > 0:
        stats["u1_cos"] = abs(float(u1 @ u_ref.to(u1).flatten() / u_ref.norm().clamp_min(1e-30)))
    return stats, u1


def full_tensor(param: Tensor) -> Tensor:
    """The whole matrix (a sharded ``DTensor`` is gathered: every rank must call this)."""
    data = param.data
    return data.full_tensor() if isinstance(data, DTensor) else data


def _cpu(tensors: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if tensors is None else {k: v.detach().cpu().clone() for k, v in tensors.items()}


def module_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


class UpdateDynamicsCallback(L.Callback):
    """Logs per-module update statistics of the student's 2-D attention/MLP weights.

    After every ``every_n_steps`` optimizer steps (and ``reference_step``) it logs
    ``dynamics/{module}/{rel_update_norm,top1_energy,u1_cos}`` and their means
    ``dynamics/mean_{...}`` to the trainer's loggers at ``step = trainer.global_step``, and appends
    one record per module to :attr:`history`. :meth:`summary` gives the latest values per module.
    The weights after step s are read when step s+1 starts (or training ends), so edits made at the
    end of step s by other callbacks (EffOPDCallback) are included whatever the callback order.

    Args:
        every_n_steps: measure after every n optimizer steps.
        include: name substrings of the tracked weights (as ``EffOPDCallback``); only 2-D ones.
        reference_step: the step whose u₁ becomes the reference of ``u1_cos`` (None: no reference
            unless ``reference_path``).
        reference_path: a file from :meth:`save_directions` with reference u₁ per module.
        store_on_cpu: keep W_0 and the reference vectors in host memory.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        include: Sequence[str] = DEFAULT_MODULES,
        reference_step: int | None = None,
        reference_path: str | None = None,
        store_on_cpu: bool = False,
    ) -> None:
        if every_n_steps < 1:
            raise SettingError(f"UpdateDynamicsCallback.every_n_steps must be >= 1, got {every_n_steps}")
        if reference_step is not None and reference_path is not None:
            raise SettingError("UpdateDynamicsCallback: give reference_step or reference_path, not both")
        self.every_n_steps, self.include = every_n_steps, tuple(include)
        self.reference_step, self.reference_path = reference_step, reference_path
        self.store_on_cpu = store_on_cpu
        self._reset()

    def _reset(self) -> None:
        self.w0: dict[str, Tensor] | None = None
        self.u_ref: dict[str, Tensor] = {}
        self.u1: dict[str, Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self.last_step = 0

    def tracked(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The 2-D trainable weights whose name matches ``include``."""
        return [(n, p) for n, p in select_parameters(model, self.include) if p.dim() == 2]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self.tracked(policy_of(pl_module))
        if not params:
            raise SettingError(f"UpdateDynamicsCallback.include={list(self.include)} matches no 2-D weight")
        device = torch.device("cpu") if self.store_on_cpu else pl_module.device
        if self.w0 is None:  # fresh run: the start weights; a resumed run brought its own
            self.w0 = {
                module_name(n): full_tensor(p).detach().to(device=device, dtype=torch.float32, copy=True)
                for n, p in params
            }
        self.w0 = {k: v.to(device) for k, v in self.w0.items()}
        self.u_ref = {k: v.to(device) for k, v in self.u_ref.items()}
        if self.reference_path is not None and not self.u_ref:
            saved = torch.load(self.reference_path, map_location="cpu", weights_only=True)
            self.u_ref = {k: v.float().to(device) for k, v in saved.items()}
        missing = sorted({module_name(n) for n, _ in params} - set(self.w0))
        if missing:
            raise SettingError(f"UpdateDynamicsCallback: no start weights for {missing[:4]} (changed model?)")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_measure(trainer, pl_module)

    def _maybe_measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step > self.last_step and (step % self.every_n_steps == 0 or step == self.reference_step):
            self.measure(trainer, pl_module)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
        """Measure every tracked module now; log, record and return ``{module: stats}``."""
        assert self.w0 is not None, "UpdateDynamicsCallback.measure runs after on_train_start"
        step, self.last_step = trainer.global_step, trainer.global_step
        at_reference = step == self.reference_step
        results = {}
        for name, param in self.tracked(policy_of(pl_module)):
            key = module_name(name)
            reference = None if at_reference else self.u_ref.get(key)
            stats, u1 = update_stats(self.w0[key], full_tensor(param), reference)
            self.u1[key] = u1.to(self.w0[key].device)
            if at_reference:
                self.u_ref[key] = self.u1[key].clone()
                stats["u1_cos"] = 1.0 if not math.isnan(stats["top1_energy"]) else math.nan
            results[key] = stats
            self.history.append({"step": step, "module": key, **stats})
        self._log(trainer, results, step)
        return results

    @staticmethod
    def _log(trainer: L.Trainer, results: dict[str, dict[str, float]], step: int) -> None:
        metrics = {f"dynamics/{m}/{k}": v for m, stats in results.items() for k, v in stats.items()}
        for key in ("rel_update_norm", "top1_energy", "u1_cos"):
            values = [s[key] for s in results.values() if not math.isnan(s[key])]
            if values:
                metrics[f"dynamics/mean_{key}"] = sum(values) / len(values)
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def summary(self) -> dict[str, dict[str, float]]:
        """Latest measurement per module: ``{module: {step, rel_update_norm, top1_energy, u1_cos}}``."""
        latest: dict[str, dict[str, float]] = {}
        for record in self.history:
            latest[record["module"]] = {k: v for k, v in record.items() if k != "module"}
        return latest

    def save_directions(self, path: str | Path) -> None:
        """Write the latest u₁ per module; pass the file as ``reference_path`` to another run."""
        torch.save({k: v.detach().cpu() for k, v in self.u1.items()}, path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "w0": _cpu(self.w0), "u_ref": _cpu(self.u_ref), "u1": _cpu(self.u1),
            "history": [dict(r) for r in self.history], "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.w0, self.u_ref, self.u1 = state_dict["w0"], dict(state_dict["u_ref"]), dict(state_dict["u1"])
        self.history = [dict(r) for r in state_dict["history"]]
        self.last_step = int(state_dict["last_step"])
