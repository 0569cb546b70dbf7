"""Memory-lean losses: the divergence computed from hidden states and the output layer in chunks.

The naive path materialises student and teacher logits for every completion token — two [B, T, V]
tensors, plus their log-softmaxes and gradients, which at V = 151k dominate a step's memory. Here
the models stop at their last hidden state ([B, T, H], H ≪ V); valid tokens are gathered and sent
through both output layers ``chunk_size`` rows at a time, and each chunk's gradient is folded into
dL/dh and dL/dW right away (a fused linear + divergence, as Liger fuses linear + cross-entropy), so
at most one chunk of [chunk, V] logits per model exists at any moment and nothing is recomputed.

Applies to models whose logits are exactly ``lm_head(hidden)`` (Llama, Qwen, Mistral, GPT-2 …);
models with logit soft-capping or scaling fall back to the logits path (``lit_opd.models.plain_head``
says which).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_opd.errors import SettingError
from lit_opd.objectives import divergences as D

@dataclass
class LeanTerms:
    """Per-token results on the (B, T) grid (zeros off the mask).

    loss: the reduced divergence (scalar, differentiable). student_logp_BT: log q of the completion
    tokens (differentiable only for ``kind=None``). teacher_logp_BT, entropy_BT: detached.
    """

    loss: Tensor
    student_logp_BT: Tensor
    teacher_logp_BT: Tensor
    entropy_BT: Tensor


def _row_weights(mask_BT: Tensor, idx_N: Tensor, reduction: str) -> Tensor:
    """w_i such that ``reduce_masked(values, mask, reduction) == Σ_i w_i · values_i`` over valid rows:
    every reduction is linear in the values, so the weights are its gradient (no second formula)."""
    values_BT = torch.zeros(mask_BT.shape, dtype=torch.float64, device=mask_BT.device, requires_grad=True)
    with torch.enable_grad():
        (weights_BT,) = torch.autograd.grad(D.reduce_masked(values_BT, mask_BT, reduction), values_BT)
    return weights_BT.reshape(-1).index_select(0, idx_N)


class _FusedHeadDivergence(torch.autograd.Function):
    """Σ_i w_i D(softmax(h_s,i W_sᵀ/τ), softmax(h_t,i W_tᵀ/τ)) with its gradient formed chunk by
    chunk in the forward pass (the fused-linear-loss idea of Liger's cross-entropy): per chunk,
    the [n, V] logits exist only long enough to give dL/dlogits, which is folded at once into
    dL/dh (rows of [N, H]) and accumulated into dL/dW ([V, H], what W's .grad needs anyway).
    No activations are kept for backward, so nothing is recomputed.

    Returns the scalar loss plus detached per-row student/teacher token log-probs and entropy.
    """

    @staticmethod
    def forward(ctx, s_h_NH, s_w_VH, t_h_NH, t_w_VH, ids_N, weights_N, options):  # noqa: ANN001, ANN205
        kind, beta, alpha, temperature, chunk_size = options
        dtype = torch.promote_types(s_h_NH.dtype, torch.float32)  # at least fp32 for the softmax
        grad_h_NH = torch.zeros_like(s_h_NH, dtype=dtype)
        grad_w_VH = torch.zeros_like(s_w_VH, dtype=dtype)
        total = torch.zeros((), dtype=dtype, device=s_h_NH.device)
        stats = [torch.zeros(s_h_NH.shape[0], dtype=dtype, device=s_h_NH.device) for _ in range(3)]
        for start in range(0, s_h_NH.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h_nH = s_h_NH[rows].detach()
            logits_nV = (h_nH @ s_w_VH.detach().T).to(dtype)
            t_logits_nV = (t_h_NH[rows].to(t_w_VH.dtype) @ t_w_VH.T).to(dtype)
            stats[0][rows] = D.token_logprobs(logits_nV[None], ids_N[rows][None])[0]
            stats[1][rows] = D.token_logprobs(t_logits_nV[None], ids_N[rows][None])[0]
            stats[2][rows] = D.entropy(logits_nV[None])[0]
            values_n, grad_logits_nV = D.rows_divergence_and_grad(
                logits_nV, t_logits_nV, kind, beta, alpha, temperature
            )
            del logits_nV, t_logits_nV  # before the next chunk's pair exists
            grad_logits_nV.mul_(weights_N[rows, None])
            grad_h_NH[rows] = grad_logits_nV @ s_w_VH.to(dtype)
            grad_w_VH.addmm_(grad_logits_nV.T, h_nH.to(dtype))
            total += (values_n * weights_N[rows]).sum()
        ctx.save_for_backward(grad_h_NH, grad_w_VH)
        ctx.dtypes = (s_h_NH.dtype, s_w_VH.dtype)
        ctx.consumed = False
        ctx.mark_non_differentiable(*stats)
        return (total, *stats)

    @staticmethod
    def backward(ctx, grad_total, *unused):  # noqa: ANN001, ANN205
        if ctx.consumed:
            raise RuntimeError("the fused lean loss supports one backward pass (no retain_graph reuse)")
        ctx.consumed = True
        grad_h_NH, grad_w_VH = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # Scaled in place: a second [V, H] buffer would double the peak this path exists to cut.
        grad_h = grad_h_NH.mul_(grad_total).to(h_dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w_VH.mul_(grad_total).to(w_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None, None


def _student_chunk(h_nH: Tensor, w_VH: Tensor, ids_n: Tensor) -> tuple[Tensor, Tensor]:
    """Token log-probs (differentiable) and entropy (no gradient) from one projection of the chunk."""
    logits_1nV = (h_nH @ w_VH.T)[None]
    entropy_n = D.entropy(logits_1nV.detach())[0]
    return D.token_logprobs(logits_1nV, ids_n[None])[0], entropy_n


def _sampled_terms(s_h_NH, s_w_VH, t_h_NH, t_w_VH, ids_N, chunk_size):  # noqa: ANN001, ANN202
    """Student token log-probs with gradient (checkpointed chunks), teacher token log-probs and
    student entropy, for sampled-token objectives."""
    grad = torch.is_grad_enabled() and (s_h_NH.requires_grad or s_w_VH.requires_grad)
    logp, teacher_logp, entropy = [], [], []
    for start in range(0, s_h_NH.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (s_h_NH[rows], s_w_VH, ids_N[rows])
        logp_n, entropy_n = (checkpoint(_student_chunk, *args, use_reentrant=False, preserve_rng_state=False)
                             if grad else _student_chunk(*args))
        logp.append(logp_n)
        entropy.append(entropy_n.detach())
        with torch.no_grad():
            t_logits = (t_h_NH[rows].to(t_w_VH.dtype) @ t_w_VH.T)[None]
            teacher_logp.append(D.token_logprobs(t_logits, ids_N[rows][None])[0])
    return torch.cat(logp), [torch.cat(teacher_logp), torch.cat(entropy)]


def hidden_divergence(
    student_hidden_BTH: Tensor,
    student_weight_VH: Tensor,
    teacher_hidden_BTH: Tensor,
    teacher_weight_VH: Tensor,
    ids_BT: Tensor,
    mask_BT: Tensor,
    kind: str | None = "jsd",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    chunk_size: int = 1024,
) -> LeanTerms:
    """``logits_divergence(h_s W_sᵀ, h_t W_tᵀ, ...)`` without either [B, T, V] logits tensor.

    With a ``kind`` the divergence is fused with its gradient (``_FusedHeadDivergence``) and the
    returned ``student_logp_BT`` is detached. ``kind=None`` skips the divergence (loss 0) and
    returns ``student_logp_BT`` with gradient, for sampled-token objectives.
    """
    if chunk_size < 1:
        raise SettingError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, H = student_hidden_BTH.shape
    idx_N = mask_BT.bool().reshape(-1).nonzero().squeeze(-1)
    s_h_NH = student_hidden_BTH.reshape(B * T, H).index_select(0, idx_N)
    t_h_NH = teacher_hidden_BTH.reshape(B * T, -1).index_select(0, idx_N)
    ids_N = ids_BT.reshape(-1).index_select(0, idx_N)
    if kind is None:
        logp_N, stats = _sampled_terms(s_h_NH, student_weight_VH, t_h_NH, teacher_weight_VH, ids_N, chunk_size)
        loss = logp_N.sum() * 0.0  # no divergence term, but connected to the graph
        stats = [logp_N, *stats]
    else:
        D._check_kind(kind)
        weights_N = _row_weights(mask_BT, idx_N, reduction).to(torch.promote_types(s_h_NH.dtype, torch.float32))
        options = (kind, beta, alpha, temperature, chunk_size)
        loss, *stats = _FusedHeadDivergence.apply(
            s_h_NH, student_weight_VH, t_h_NH, teacher_weight_VH, ids_N, weights_N, options
        )
    grid = [col.new_zeros(B * T).index_put((idx_N,), col).view(B, T) for col in stats]
    return LeanTerms(loss=loss, student_logp_BT=grid[0], teacher_logp_BT=grid[1], entropy_BT=grid[2])
