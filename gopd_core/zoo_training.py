"""The small training loops that make the model zoo: SFT on demonstrations, RL with verifiable rewards.

These are deliberately minimal (the pipeline's own trainer lives elsewhere): they exist to give the
zoo a student with room to improve and teachers that clearly beat it.

1. `train_sft`: teacher forcing on (prompt, demonstration + EOS) pairs; loss on response tokens only.
2. `train_rl`: per step, sample a group of `group_size` responses for each of `prompts_per_step`
   prompts with the HF engine, reward them with the sandboxed verifiers, turn rewards into GRPO
   advantages (`objectives.group_advantages`), and take one on-policy step of
   `objectives.policy_loss` (old log-probs = current, detached; importance weights vs the engine).
3. `evaluate`: greedy accuracy on each domain's test prompts.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence

import torch

from gopd_core.models import render_prompt
from gopd_core.objectives import group_advantages, policy_loss
from gopd_core.rollout import SamplingParams
from gopd_core.rollout.hf import HFEngine
from gopd_core.tasks import demonstration_of, verify_batch

LOGGER = logging.getLogger(__name__)


class RewardCache:
    """Memoised `verify_batch`: the same (domain, response, ground truth) is checked once per build."""

    def __init__(self, max_workers: int = 8) -> None:
        self.max_workers = max_workers
        self.rewards: dict[tuple[str, str, str], float] = {}

    def __call__(self, domains: Sequence[str], responses: Sequence[str], ground_truths: Sequence[str]) -> list[float]:
        keys = list(zip(domains, responses, ground_truths))
        missing = sorted({key for key in keys if key not in self.rewards})
        if missing:
            fresh = verify_batch(*zip(*missing), max_workers=self.max_workers)
            self.rewards.update(zip(missing, fresh))
        return [self.rewards[key] for key in keys]


def sft_pairs(tokenizer, prompt_rows: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, demonstration token ids + EOS) for each prompt row."""
    pairs = []
    for row in prompt_rows:
        response_ids = tokenizer(demonstration_of(row), add_special_tokens=False)["input_ids"]
        pairs.append((render_prompt(tokenizer, row["messages"]), [*response_ids, tokenizer.eos_token_id]))
    return pairs


def right_pad(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Concatenate prompt+response and right-pad.

    Returns input_ids_BL, attention_mask_BL, and response_mask_BL (1 where position t+1 holds a
    response token, i.e. where the logits at t predict the response; last column always 0).
    """
    width = max(len(p) + len(r) for p, r in pairs)
    input_ids_BL = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((len(pairs), width), dtype=torch.long)
    response_mask_BL = torch.zeros((len(pairs), width), dtype=torch.float32)
    for row, (prompt, response) in enumerate(pairs):
        length = len(prompt) + len(response)
        input_ids_BL[row, :length] = torch.tensor([*prompt, *response])
        attention_mask_BL[row, :length] = 1
        response_mask_BL[row, len(prompt) - 1:length - 1] = 1.0
    return input_ids_BL, attention_mask_BL, response_mask_BL


def next_token_logprobs(model: torch.nn.Module, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for every position t, shape (B, L); the last column is 0."""
    logits_BLV = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL).logits.float()
    logprobs_BLV = torch.log_softmax(logits_BLV[:, :-1], dim=-1)
    taken_BL = logprobs_BLV.gather(-1, input_ids_BL[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(taken_BL, (0, 1))


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sft(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, steps: int,
    batch_size: int, lr: float, seed: int, log: Callable[[str], None] = LOGGER.info,
) -> dict[str, float]:
    """Teacher-forced cross-entropy on response tokens; returns {"final_loss", "tokens"}."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    order: list[int] = []
    losses, tokens = [], 0
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
        input_ids_BL, attention_mask_BL, response_mask_BL = right_pad(batch, pad_id)
        logprobs_BL = next_token_logprobs(model, input_ids_BL, attention_mask_BL)
        loss = -(logprobs_BL * response_mask_BL).sum() / response_mask_BL.sum()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens += int(attention_mask_BL.sum())
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"sft step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return {"final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "tokens": tokens}


def rl_batch(rollouts: Sequence[dict], advantages_N: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for the policy loss over rollout rows.

    input_ids_BL / attention_mask_BL over prompt+response; response_mask_BL as in `right_pad`;
    rollout_logprobs_BL and advantages_BL aligned with the logits that predict each response token.
    """
    pairs = [(row["prompt_token_ids"], row["response_token_ids"]) for row in rollouts]
    input_ids_BL, attention_mask_BL, response_mask_BL = right_pad(pairs, pad_id)
    rollout_logprobs_BL = torch.zeros_like(response_mask_BL)
    for b, row in enumerate(rollouts):
        start = len(row["prompt_token_ids"]) - 1
        rollout_logprobs_BL[b, start:start + len(row["rollout_logprobs"])] = torch.tensor(row["rollout_logprobs"])
    advantages_BL = advantages_N.float()[:, None] * response_mask_BL
    return {"input_ids": input_ids_BL, "attention_mask": attention_mask_BL, "mask": response_mask_BL,
            "rollout_logprobs": rollout_logprobs_BL, "advantages": advantages_BL}


def rl_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    """One on-policy PPO step (old = current log-probs, detached); returns the loss metrics."""
    logprobs_BL = next_token_logprobs(model, tensors["input_ids"], tensors["attention_mask"])
    mask_BL = tensors["mask"]
    loss, metrics = policy_loss(
        logprobs_BL, logprobs_BL.detach(), tensors["advantages"], mask_BL,
        rollout_logprobs=tensors["rollout_logprobs"] * mask_BL + logprobs_BL.detach() * (1 - mask_BL),
        aggregation="seq-mean-token-mean",
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    return metrics


def train_rl(
    model: torch.nn.Module, tokenizer, prompt_rows: Sequence[dict], rewards: RewardCache, steps: int,
    prompts_per_step: int, group_size: int, lr: float, seed: int, max_new_tokens: int,
    log: Callable[[str], None] = LOGGER.info, warmup: int = 3,
) -> dict[str, float]:
    """GRPO-style RL with verifiable rewards, lr warmed up over `warmup` steps.

    Returns {"mean_reward_first", "mean_reward_last"}: the mean sampled reward of the first and last
    (up to) five steps.
    """
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    engine = HFEngine.from_model(model, tokenizer, "policy", batch_size=prompts_per_step * group_size)
    history = []
    for step in range(steps):
        batch = rng.sample(list(prompt_rows), prompts_per_step)
        sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=group_size, seed=seed * 100_003 + step)
        model.eval()
        rollouts = engine.generate(batch, sampling, run_id="zoo", iteration=step)
        truth = {row["prompt_id"]: row["ground_truth"] for row in batch}
        reward_N = rewards([r["domain"] for r in rollouts], [r["response_text"] for r in rollouts],
                           [truth[r["prompt_id"]] for r in rollouts])
        history.append(sum(reward_N) / len(reward_N))
        advantages_N = group_advantages(torch.tensor(reward_N), [r["prompt_id"] for r in rollouts])
        informative = [i for i in range(len(rollouts)) if abs(float(advantages_N[i])) > 1e-6]
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        if informative:  # groups with equal rewards carry no signal: skip their compute
            model.train()
            tensors = rl_batch([rollouts[i] for i in informative], advantages_N[informative], tokenizer.pad_token_id)
            metrics = rl_step(model, optimizer, tensors)
            model.eval()
        else:
            metrics = {"grad_norm": 0.0}
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"rl step {step + 1}/{steps} reward {sum(history[-5:]) / len(history[-5:]):.3f} "
                f"grad_norm {metrics['grad_norm']:.3f}")
    model.eval()
    window = max(1, min(5, len(history)))
    return {"mean_reward_first": sum(history[:window]) / window, "mean_reward_last": sum(history[-window:]) / window}


def evaluate(
    model: torch.nn.Module, tokenizer, test_rows_by_domain: dict[str, Sequence[dict]], rewards: RewardCache,
    max_new_tokens: int, batch_size: int = 64,
) -> dict[str, float]:
    """Greedy accuracy (fraction of test prompts answered correctly) per domain."""
    engine = HFEngine.from_model(model, tokenizer, "eval", batch_size=batch_size)
    model.eval()
    accuracy = {}
    for domain, rows in test_rows_by_domain.items():
        rollouts = engine.generate(list(rows), SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                                   run_id="zoo-eval", iteration=0)
        truth = {row["prompt_id"]: row["ground_truth"] for row in rows}
        reward_N = rewards([r["domain"] for r in rollouts], [r["response_text"] for r in rollouts],
                           [truth[r["prompt_id"]] for r in rollouts])
        accuracy[domain] = sum(reward_N) / len(reward_N)
    return accuracy
