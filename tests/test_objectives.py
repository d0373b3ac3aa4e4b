"""Objective math against hand-computed numbers (torchtune style: expected values derived in comments)."""

import math

import pytest
import torch

from gopd_core.objectives import (
    NonFiniteInputError,
    UnknownDomainError,
    gopd_advantages,
    group_advantages,
    policy_loss,
    select_teacher_logprobs,
    sft_loss,
)


def test_advantage_hand_computed():
    # lam=1.5: A = 1.5*(t - r) - (s - r); t=-1, r=-2, s=-3 -> 1.5*1 - (-1) = 2.5
    student = torch.tensor([[-3.0, -0.5]])
    teacher = torch.tensor([[-1.0, -0.5]])
    reference = torch.tensor([[-2.0, -1.0]])
    # second token: 1.5*(0.5) - (0.5) = 0.25
    expected = torch.tensor([[2.5, 0.25]])
    torch.testing.assert_close(gopd_advantages(student, teacher, reference, reward_scale=1.5), expected)


def test_reward_scale_one_is_teacher_minus_student_exactly_and_needs_no_reference():
    generator = torch.Generator().manual_seed(0)
    student = -torch.rand(4, 7, generator=generator) * 5
    teacher = -torch.rand(4, 7, generator=generator) * 5
    reference = -torch.rand(4, 7, generator=generator) * 5
    assert torch.equal(gopd_advantages(student, teacher, None, 1.0), teacher - student)
    assert torch.equal(gopd_advantages(student, teacher, reference, 1.0), teacher - student)


def test_reward_scale_other_than_one_requires_reference():
    with pytest.raises(ValueError, match="needs reference_logprobs"):
        gopd_advantages(torch.zeros(1, 2), torch.zeros(1, 2), None, reward_scale=1.25)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_reward_scale_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="reward_scale"):
        gopd_advantages(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), reward_scale=bad)


def test_nan_input_is_an_error_naming_the_tensor_and_position():
    teacher = torch.zeros(2, 3)
    teacher[1, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"teacher_logprobs .* position \(1, 2\)"):
        gopd_advantages(torch.zeros(2, 3), teacher)


def test_multi_teacher_each_row_uses_its_own_domain():
    math_lp = torch.tensor([[-1.0, -1.0], [-9.0, -9.0], [-3.0, -3.0]])
    code_lp = torch.tensor([[-8.0, -8.0], [-2.0, -2.0], [-7.0, -7.0]])
    selected = select_teacher_logprobs({"math": math_lp, "code": code_lp}, ["math", "code", "math"])
    torch.testing.assert_close(selected, torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]]))


def test_multi_teacher_unknown_domain_names_label_and_row():
    lp = torch.zeros(2, 2)
    with pytest.raises(UnknownDomainError, match=r"row 1 has domain 'poetry'"):
        select_teacher_logprobs({"math": lp}, ["math", "poetry"])


def test_policy_loss_hand_computed_with_gradient():
    # One row, 3 tokens, ratio = exp(logprobs - old).
    # tok0: log-ratio 0    -> ratio 1,  A=+1: max(-1, -1) = -1
    # tok1: log-ratio 1    -> ratio e,  A=+1: max(-e, -1.2) = -1.2 (clipped, no gradient)
    # tok2: log-ratio -1   -> ratio 1/e, A=-2: max(2/e, 2*0.8) = 1.6 (clipped, no gradient)
    # row 2 is fully masked out.
    logprobs = torch.tensor([[-1.0, 0.0, -2.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    advantages = torch.tensor([[1.0, 1.0, -2.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss, metrics = policy_loss(logprobs, old, advantages, mask)
    assert loss.item() == pytest.approx((-1 - 1.2 + 1.6) / 3)
    loss.backward()
    # d/dlp of -A*exp(lp-old) at tok0 = -A*ratio = -1, divided by 3 tokens; clipped tokens get 0.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)
    assert metrics["advantage_mean"] == pytest.approx(0.0)
    assert metrics["is_weight_mean"] == pytest.approx(1.0)


def test_truncated_importance_weights():
    # old - rollout = log(10) -> weight min(10, 5) = 5; old - rollout = log(0.5) -> 0.5
    logprobs = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]])
    rollout = torch.tensor([[-1.0 - math.log(10), -1.0 - math.log(0.5)]])
    advantages = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, metrics = policy_loss(logprobs, old, advantages, mask, rollout_logprobs=rollout, is_threshold=5.0)
    # per-token loss -1 (ratio 1, A 1), weighted 5 and 0.5 -> mean (-5 - 0.5)/2
    assert loss.item() == pytest.approx(-2.75)
    assert metrics["is_weight_mean"] == pytest.approx(2.75)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.5, -0.25]]))


def test_aggregation_modes():
    # ratio 1 everywhere, so per-token loss = -A.
    logprobs = torch.zeros(2, 3)
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    token_mean, _ = policy_loss(logprobs, logprobs, advantages, mask, aggregation="token-mean")
    seq_sum, _ = policy_loss(logprobs, logprobs, advantages, mask, aggregation="seq-mean-token-sum")
    seq_mean, _ = policy_loss(logprobs, logprobs, advantages, mask, aggregation="seq-mean-token-mean")
    assert token_mean.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)  # -2.5
    assert seq_sum.item() == pytest.approx(-(6 + 4) / 2)  # -5
    assert seq_mean.item() == pytest.approx(-(2 + 4) / 2)  # -3
    with pytest.raises(ValueError, match="unknown aggregation"):
        policy_loss(logprobs, logprobs, advantages, mask, aggregation="sum")


def test_approx_kl_to_reference():
    # k3: exp(r - lp) - (r - lp) - 1 with r - lp = 1 -> e - 2
    logprobs = torch.tensor([[-2.0]])
    reference = torch.tensor([[-1.0]])
    _, metrics = policy_loss(logprobs, logprobs, torch.zeros(1, 1), torch.ones(1, 1), reference_logprobs=reference)
    assert metrics["approx_kl"] == pytest.approx(math.e - 2)


def test_policy_loss_rejects_nan():
    lp = torch.zeros(1, 2)
    adv = torch.tensor([[float("inf"), 0.0]])
    with pytest.raises(NonFiniteInputError, match="advantages"):
        policy_loss(lp, lp, adv, torch.ones(1, 2))


def test_group_advantages_hand_computed():
    # group a: rewards 1, 0 -> mean 0.5, unbiased std sqrt(0.5) -> +-0.5/0.7071 = +-0.7071
    # group b: rewards 1, 1, 1 -> std 0 -> 0 advantage; group c: lone sample -> 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.3])
    groups = ["a", "a", "b", "b", "b", "c"]
    adv = group_advantages(rewards, groups)
    torch.testing.assert_close(adv, torch.tensor([0.70710, -0.70710, 0.0, 0.0, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_group_advantages_trains_the_same_loss():
    rewards = torch.tensor([1.0, 0.0])
    adv = group_advantages(rewards, torch.tensor([7, 7]))
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    loss, _ = policy_loss(logprobs, logprobs.detach(), adv[:, None].expand(2, 2), torch.ones(2, 2))
    loss.backward()
    # the rewarded sample's log-probs are pushed up (negative gradient), the other's down
    assert (logprobs.grad[0] < 0).all() and (logprobs.grad[1] > 0).all()


def test_sft_loss_is_masked_negative_log_likelihood_with_gradient():
    # token-mean over the 3 unmasked tokens: -(-1 - 2 - 0.5) / 3 = 3.5 / 3; the masked -9 is ignored
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    zeros = torch.zeros(2, 2)
    loss, metrics = sft_loss(logprobs, zeros, zeros, mask)
    assert loss.item() == pytest.approx(3.5 / 3)
    loss.backward()
    # d loss / d logprob = -1/3 on each counted token, 0 under the mask
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3], [-1 / 3, 0.0]]))
    assert metrics["tokens"] == 3 and metrics["clip_fraction"] == 0.0


def test_sft_loss_ignores_advantages_and_ratios():
    logprobs = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    first, _ = sft_loss(logprobs, torch.zeros(1, 2), torch.zeros(1, 2), mask)
    second, _ = sft_loss(logprobs, torch.full((1, 2), -5.0), torch.full((1, 2), 3.0), mask)
    assert first.item() == second.item() == pytest.approx(1.5)
