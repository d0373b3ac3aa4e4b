"""The G-OPD objective: per-token advantages and the clipped policy-gradient loss.

Pure torch, no I/O. Shape suffixes: `_B` rows (sequences), `_T` response tokens, `_D` domains.

1. Advantage (G-OPD, Yang et al. 2026), per sampled token y_t:
       A_t = lam * (log p_teacher - log p_ref) - (log p_student - log p_ref)
   lam = 1 is OPD (the reference cancels: A_t = log p_teacher - log p_student), lam > 1 is ExOPD.
2. Multi-teacher: each row takes the teacher log-probs of its own domain (`select_teacher_logprobs`).
3. Loss: PPO clipped surrogate on ratio = exp(logprobs - old_logprobs), each token weighted by the
   truncated importance weight min(exp(old - rollout), threshold) between trainer and rollout engine,
   then aggregated over the response mask by one of `AGGREGATIONS`.
4. `group_advantages`: GRPO-style rewards normalised within each prompt's group, so the same loss
   trains teachers with verifiable rewards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch


class NonFiniteInputError(ValueError):
    """A log-prob, advantage or reward tensor holds NaN or inf."""


class UnknownDomainError(KeyError):
    """A row names a domain that has no teacher log-probs."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise `NonFiniteInputError` naming `name` and the first bad position if `tensor` has NaN/inf."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = tensor[position].item()
        raise NonFiniteInputError(f"{name} holds a non-finite value ({value}) at position {position}")


def _check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)} like {reference_name}")


def gopd_advantages(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    reference_logprobs_BT: torch.Tensor | None = None,
    reward_scale: float = 1.0,
) -> torch.Tensor:
    """Per-token G-OPD advantages, shape (B, T), no gradient.

    reward_scale (lam) = 1 returns exactly teacher - student and needs no reference.
    """
    if not (isinstance(reward_scale, (int, float)) and math.isfinite(reward_scale) and reward_scale > 0):
        raise ValueError(f"reward_scale (lam) must be a finite number > 0, got {reward_scale!r}")
    _check_same_shape("student_logprobs", student_logprobs_BT, teacher_logprobs=teacher_logprobs_BT,
                      reference_logprobs=reference_logprobs_BT)
    check_finite("student_logprobs", student_logprobs_BT)
    check_finite("teacher_logprobs", teacher_logprobs_BT)
    student_BT = student_logprobs_BT.detach()
    teacher_BT = teacher_logprobs_BT.detach()
    if reward_scale == 1:
        return teacher_BT - student_BT
    if reference_logprobs_BT is None:
        raise ValueError(f"reward_scale={reward_scale} != 1 needs reference_logprobs (the reference no longer cancels)")
    check_finite("reference_logprobs", reference_logprobs_BT)
    reference_BT = reference_logprobs_BT.detach()
    advantages_BT = reward_scale * (teacher_BT - reference_BT) - (student_BT - reference_BT)
    check_finite(f"advantages at reward_scale={reward_scale}", advantages_BT)  # a huge lam overflows the dtype
    return advantages_BT


def select_teacher_logprobs(
    teacher_logprobs_by_domain: Mapping[str, torch.Tensor], row_domains: Sequence[str]
) -> torch.Tensor:
    """Pick, for every row, the log-probs of its own domain's teacher. Returns (B, T).

    teacher_logprobs_by_domain: domain -> (B, T) tensor scored by that domain's teacher (rows of
    other domains may hold anything finite). row_domains: B labels.
    """
    if not teacher_logprobs_by_domain:
        raise ValueError("teacher_logprobs_by_domain is empty: no teacher was scored")
    domains = list(teacher_logprobs_by_domain)
    index_of = {domain: i for i, domain in enumerate(domains)}
    row_index = []
    for row, domain in enumerate(row_domains):
        if domain not in index_of:
            raise UnknownDomainError(
                f"row {row} has domain {domain!r}, which has no teacher; known domains: {sorted(index_of)}"
            )
        row_index.append(index_of[domain])
    stacked_DBT = torch.stack([teacher_logprobs_by_domain[d] for d in domains])
    if stacked_DBT.shape[1] != len(row_index):
        raise ValueError(f"{len(row_index)} domain labels for {stacked_DBT.shape[1]} rows")
    rows_B = torch.arange(len(row_index), device=stacked_DBT.device)
    domain_B = torch.tensor(row_index, device=stacked_DBT.device)
    return stacked_DBT[domain_B, rows_B]  # (B, T)


def _token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return (loss_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def _seq_mean_token_sum(loss_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    has_tokens_B = mask_BT.sum(-1) > 0
    per_seq_B = (loss_BT * mask_BT).sum(-1)
    return per_seq_B[has_tokens_B].sum() / has_tokens_B.sum().clamp(min=1)


def _seq_mean_token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    lengths_B = mask_BT.sum(-1)
    has_tokens_B = lengths_B > 0
    per_seq_B = (loss_BT * mask_BT).sum(-1) / lengths_B.clamp(min=1)
    return per_seq_B[has_tokens_B].sum() / has_tokens_B.sum().clamp(min=1)


MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: far past any clip range, far below float32 overflow

AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
}


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    rollout_logprobs: torch.Tensor | None = None,
    is_threshold: float = 5.0,
    aggregation: str = "token-mean",
    reference_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with truncated importance weights. All tensors (B, T).

    logprobs carry the gradient (trainer, current weights); old_logprobs are the trainer's log-probs
    at the start of the update; rollout_logprobs the rollout engine's. The importance weight
    min(exp(old - rollout), is_threshold) is detached. Returns (scalar loss, metrics), where metrics
    hold clip_fraction, is_weight_mean, advantage_mean and approx_kl (k3 estimator of KL(student ||
    reference) when reference_logprobs is given, else of KL(student || old)).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}")
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                      rollout_logprobs=rollout_logprobs, reference_logprobs=reference_logprobs)
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
                         ("rollout_logprobs", rollout_logprobs), ("reference_logprobs", reference_logprobs)):
        if tensor is not None:
            check_finite(name, tensor.detach())
    mask_BT = mask.to(logprobs.dtype)
    advantages_BT = advantages.detach()
    # Clamped so that far-apart log-probs (or junk under the mask) give a huge, finite ratio, not inf/NaN.
    log_ratio_BT = (logprobs - old_logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    if rollout_logprobs is not None:
        is_weight_BT = torch.exp(old_logprobs.detach() - rollout_logprobs.detach()).clamp(max=is_threshold)
    else:
        is_weight_BT = torch.ones_like(loss_BT)
    loss = AGGREGATIONS[aggregation](loss_BT * is_weight_BT, mask_BT)

    with torch.no_grad():
        kl_base_BT = reference_logprobs.detach() if reference_logprobs is not None else old_logprobs.detach()
        delta_BT = (kl_base_BT - logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        approx_kl_BT = torch.exp(delta_BT) - delta_BT - 1.0
        metrics = {
            "clip_fraction": _token_mean((clipped_BT > unclipped_BT).to(mask_BT.dtype), mask_BT).item(),
            "is_weight_mean": _token_mean(is_weight_BT, mask_BT).item(),
            "advantage_mean": _token_mean(advantages_BT, mask_BT).item(),
            "approx_kl": _token_mean(approx_kl_BT, mask_BT).item(),
            "tokens": mask_BT.sum().item(),
        }
    return loss, metrics


def sft_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *ppo_settings: object,
    aggregation: str = "token-mean",
    reference_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning (negative log-likelihood) on the sampled tokens. All tensors (B, T).

    The off-policy baseline: trained on the teacher's samples it is plain distillation by SFT. Same
    signature and metrics as `policy_loss` so the trainer can swap them; the clip, importance-weight
    and advantage arguments (`ppo_settings`: clip_low, clip_high, rollout_logprobs, is_threshold) are
    ignored; advantage_mean is still reported, for comparison.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {sorted(AGGREGATIONS)}")
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                      reference_logprobs=reference_logprobs)
    check_finite("logprobs", logprobs.detach())
    mask_BT = mask.to(logprobs.dtype)
    loss = AGGREGATIONS[aggregation](-logprobs, mask_BT)
    with torch.no_grad():
        kl_base_BT = reference_logprobs if reference_logprobs is not None else old_logprobs
        delta_BT = (kl_base_BT.detach() - logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        metrics = {
            "clip_fraction": 0.0,
            "is_weight_mean": 1.0,
            "advantage_mean": _token_mean(advantages.detach(), mask_BT).item(),
            "approx_kl": _token_mean(torch.exp(delta_BT) - delta_BT - 1.0, mask_BT).item(),
            "tokens": mask_BT.sum().item(),
        }
    return loss, metrics


# update.objective -> loss function (same signature): on-policy G-OPD, or SFT on teacher samples.
OBJECTIVES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, float]]]] = {
    "gopd": policy_loss,
    "sft": sft_loss,
}


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor | Sequence, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (reward - group mean) / (group std + eps), std unbiased; a lone sample gets 0.

    rewards: (N,) one scalar per sampled response; group_ids: (N,) the prompt each belongs to.
    """
    rewards_N = torch.as_tensor(rewards, dtype=torch.float64)
    check_finite("rewards", rewards_N)
    if isinstance(group_ids, torch.Tensor):
        keys = group_ids.tolist()
    else:
        keys = list(group_ids)
    if len(keys) != rewards_N.numel():
        raise ValueError(f"{len(keys)} group ids for {rewards_N.numel()} rewards")
    index_of: dict = {}
    group_N = torch.tensor([index_of.setdefault(k, len(index_of)) for k in keys], dtype=torch.long)
    n_groups = len(index_of)
    counts_G = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group_N, torch.ones_like(rewards_N))
    means_G = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group_N, rewards_N) / counts_G
    centred_N = rewards_N - means_G[group_N]
    sq_G = torch.zeros(n_groups, dtype=torch.float64).scatter_add_(0, group_N, centred_N**2)
    std_G = torch.sqrt(sq_G / (counts_G - 1).clamp(min=1))
    return (centred_N / (std_G[group_N] + eps)).to(torch.as_tensor(rewards).dtype if torch.is_tensor(rewards)
                                                   and rewards.is_floating_point() else torch.float32)
