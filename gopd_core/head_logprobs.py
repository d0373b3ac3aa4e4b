"""Log-probs of chosen tokens through a causal LM's head, never the (N, V) log-softmax.

Given the decoder's last hidden states h (N, H) and the chosen token ids (N,):
1. logits = lm_head(h), with the model's own logit transform (Gemma softcap, Granite/Cohere scaling);
2. log-prob = logit[chosen] - logsumexp(logits), in fp32 (for bf16 logits on AVX512-BF16 CPUs, the scorer's
   logsumexp is one fused native pass, `native.logsumexp_bf16`).
`chosen_logprobs` is the scorer's (chunked, no gradient needed); `sampled_token_logprobs` is the
update's, differentiable, with a hand-written backward for plain linear heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gopd_core.rollout import native


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's own forward does to `lm_head` output (Gemma softcap, Granite/Cohere scaling); None: nothing."""
    softcap = getattr(config, "final_logit_softcapping", None)
    divide = getattr(config, "logits_scaling", None)
    multiply = getattr(config, "logit_scale", None)
    if softcap is None and divide is None and multiply is None:
        return None

    def transform(logits_NV: torch.Tensor) -> torch.Tensor:
        if divide is not None:
            logits_NV = logits_NV / divide
        if multiply is not None:
            logits_NV = logits_NV * multiply
        if softcap is not None:
            logits_NV = torch.tanh(logits_NV / softcap) * softcap
        return logits_NV

    return transform


def chosen_logprobs(
    hidden_NH: torch.Tensor, targets_N: torch.Tensor, lm_head: torch.nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None, chunk_tokens: int,
) -> torch.Tensor:
    """log softmax(lm_head(h))[target] for each of N positions, fp32 (N,), chunk_tokens at a time."""
    pieces, in_place = [], not (torch.is_grad_enabled() and hidden_NH.requires_grad)
    for start in range(0, hidden_NH.shape[0], chunk_tokens):
        logits_nV = lm_head(hidden_NH[start:start + chunk_tokens])
        logits_nV = logits_nV if transform is None else transform(logits_nV)  # (n, V)
        if in_place and _native_logsumexp(logits_nV):  # bf16 scoring: no float32 copy, one fused pass per row
            chosen_n = logits_nV.gather(1, targets_N[start:start + chunk_tokens, None]).squeeze(1).float()
            pieces.append(chosen_n - native.logsumexp_bf16(logits_nV))
            continue
        logits_nV = logits_nV.float()
        chosen_n = logits_nV.gather(1, targets_N[start:start + chunk_tokens, None]).squeeze(1)
        if in_place:  # scoring: logsumexp without its (n, V) temporaries, over the chunk's own buffer
            top_n1, total_n1 = _exp_shifted_(logits_nV)
            pieces.append(chosen_n - (top_n1 + total_n1.log()).squeeze(1))
        else:
            pieces.append(chosen_n - torch.logsumexp(logits_nV, dim=-1))
    return torch.cat(pieces)


def _native_logsumexp(logits_NV: torch.Tensor) -> bool:
    """Whether `native.logsumexp_bf16` takes these logits: bf16 on a CPU with AVX512-BF16. The float32 way
    (copy, max, subtract, exp, sum: five passes over (n, V) float32) took 70-80 ms per 221 x 151,936 chunk,
    the fused kernel 6 ms, agreeing within 3e-5."""
    return logits_NV.dtype == torch.bfloat16 and logits_NV.device.type == "cpu" and native.bf16_available()


def _exp_shifted_(logits_NV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn logits into exp(logits - row max) in place; returns (row max, row sum), both (N, 1).

    logsumexp = max + log(sum), and the buffer divided by the sum is the softmax.
    """
    top_N1 = logits_NV.amax(dim=1, keepdim=True)
    total_N1 = logits_NV.sub_(top_N1).exp_().sum(dim=1, keepdim=True)
    return top_N1, total_N1


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The matmul dtype autocast gives `device_type` here, None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _SampledTokenLogprob(torch.autograd.Function):
    """log softmax(h W^T + b)[target] with a hand-written backward that keeps one (N, V) tensor.

    Autograd's version keeps the logits, a same-sized exp inside logsumexp, a zero-filled gather
    gradient and the sum of the two gradients: about 15 passes over (N, V) floats. Here the forward
    turns the logits into softmax probabilities in place and the backward turns those into the
    logit gradient g * (onehot - p) in place, then runs the two matmuls: ~6 passes and one buffer,
    which matters once V is a real vocabulary (151,936 x 512 tokens is 311 MB of fp32).
    With bf16 logits on an AVX512-BF16 CPU (the update under bf16 autocast) no float32 buffer at all: the
    forward keeps the bf16 logits and their log-sum-exp (`native.logsumexp_bf16`) and the backward writes the
    bf16 logit gradient in one native pass over them (`native.logprob_grad_bf16`), where the float32 way made
    ~9 passes over an (N, V) float32 buffer (copy, max, exp, sum, divide, scale, cast).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # under CUDA autocast, the backward's matmuls run in its dtype too
    def forward(ctx, hidden_NH, weight_VH, bias_V, targets_N):
        matmul_dtype = _autocast_dtype(hidden_NH.device.type) or hidden_NH.dtype
        # the weight cast once, kept for the backward: a second cast there cost 37 ms per update at a
        # 151,936-token vocabulary (fp32 weights under bf16 autocast)
        hidden_mm, weight_mm = hidden_NH.to(matmul_dtype), weight_VH.to(matmul_dtype)
        logits_NV = torch.nn.functional.linear(hidden_mm, weight_mm,
                                               None if bias_V is None else bias_V.to(matmul_dtype))
        ctx.matmul_dtype, ctx.hidden_dtype, ctx.weight_dtype = matmul_dtype, hidden_NH.dtype, weight_VH.dtype
        ctx.bias_dtype = None if bias_V is None else bias_V.dtype
        ctx.native = _native_logsumexp(logits_NV)
        if ctx.native:  # bf16 on AVX512-BF16: the logits stay bf16, the backward recomputes p from them in one pass
            lse_N = native.logsumexp_bf16(logits_NV)
            ctx.save_for_backward(hidden_mm, weight_mm, logits_NV, targets_N, lse_N)
            return logits_NV.gather(1, targets_N[:, None]).squeeze(1).float() - lse_N
        probs_NV = logits_NV.float()
        chosen_N = probs_NV.gather(1, targets_N[:, None]).squeeze(1)
        top_N1, total_N1 = _exp_shifted_(probs_NV)
        probs_NV.div_(total_N1)
        ctx.save_for_backward(hidden_mm, weight_mm, probs_NV, targets_N)
        return chosen_N - (top_N1 + total_N1.log()).squeeze(1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        if ctx.native:
            hidden_mm, weight_mm, logits_NV, targets_N, lse_N = ctx.saved_tensors
            grad_NV = native.logprob_grad_bf16(logits_NV, lse_N, grad_N, targets_N)  # grad * (onehot - p), bf16
        else:
            hidden_mm, weight_mm, probs_NV, targets_N = ctx.saved_tensors
            grad_NV = probs_NV.mul_(-grad_N.float()[:, None])  # d logprob / d logits = onehot - p
            grad_NV.scatter_add_(1, targets_N[:, None], grad_N.float()[:, None])
        # CPU autocast is off inside a backward pass (custom_bwd restores only CUDA's), so cast here: the two
        # matmuls at a 151,936-token vocabulary took 0.84 s per update in fp32 on an AVX512-BF16 CPU
        grad_NV = grad_NV.to(ctx.matmul_dtype)
        grad_hidden = (grad_NV @ weight_mm).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_NV.T @ hidden_mm).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad_NV.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None


def sampled_token_logprobs(model: torch.nn.Module, hidden_NH: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Differentiable log-prob (fp32, (N,)) of `targets_N` given the decoder's last hidden states.

    The update's loss needs only these N values, never the (N, V) log-softmax: a plain linear head
    takes `_SampledTokenLogprob`; heads with a logit transform (softcap, scaling) or of another kind
    take the same formula through autograd.
    """
    lm_head, transform = model.get_output_embeddings(), logit_transform(model.config)
    if transform is None and type(lm_head) is torch.nn.Linear:
        return _SampledTokenLogprob.apply(hidden_NH, lm_head.weight, lm_head.bias, targets_N)
    return chosen_logprobs(hidden_NH, targets_N, lm_head, transform, max(1, hidden_NH.shape[0]))
