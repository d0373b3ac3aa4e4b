"""RMSNorm and SwiGLU of Llama-family models in one native pass each, for the bf16 scorer.

Inside `fused_layers(model)`, on a CPU with AVX512-BF16 (`native.bf16_available`) and without gradients: a norm
over bf16 with a bf16 weight runs `native.rms_norm_bf16`, and the MLP's silu(gate) * up over the bf16 outputs of
its gate and up projections runs `native.swiglu_bf16`, each keeping the roundings of the module it replaces
(`rollout/fused_ops.c`). torch ran a norm as ~6 ops over (tokens, hidden) buffers and SwiGLU as 2: for the perf
zoo's 14-layer teacher over 8 rows (~760 tokens), 0.32 -> 0.09 ms a norm, 0.63 -> 0.43 ms an MLP's SwiGLU, and
0.483 -> 0.474 s and 0.445 -> 0.432 s for the whole scoring pass (two runs, each the medians of 20
alternating passes). Anything else (gradients, float32,
other architectures, GPUs, CPUs without AVX512-BF16, non-contiguous inputs) runs the modules as they are. The
update keeps torch's ops: the same fusion with native backward passes measured 0.465 against 0.468 s for the
student's forward and backward, within noise, and was not kept.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from gopd_core.rollout import native

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # norms weight * normed, MLPs down(silu(gate) * up)


def _inference(*tensors: torch.Tensor) -> bool:
    """bf16, contiguous, on the CPU, and no gradient wanted through them."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not grads and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _norm_forward(module: torch.nn.Module, original, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.numel() and _inference(hidden, module.weight):
        return native.rms_norm_bf16(hidden, module.weight, module.variance_epsilon)
    return original(hidden)


def _mlp_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = module.gate_proj(x), module.up_proj(x)
    if gate.shape == up.shape and _inference(gate, up):
        return module.down_proj(native.swiglu_bf16(gate, up))
    return module.down_proj(module.act_fn(gate) * up)  # the module's own formula


def _fusable_norm(module: torch.nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "variance_epsilon", None), float)
            and isinstance(getattr(module, "weight", None), torch.nn.Parameter) and module.weight.dim() == 1)


def _fusable_mlp(module: torch.nn.Module) -> bool:
    return (all(isinstance(getattr(module, name, None), torch.nn.Linear) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def applies(model: torch.nn.Module) -> bool:
    """Whether `fused_layers` changes anything for `model`: a Llama-family model on a CPU with AVX512-BF16."""
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    return (config is not None and getattr(config, "model_type", None) in ARCHITECTURES
            and getattr(config, "hidden_act", None) == "silu" and parameter is not None
            and parameter.device.type == "cpu" and native.bf16_available())


@contextlib.contextmanager
def fused_layers(model: torch.nn.Module) -> Iterator[bool]:
    """Inside, `model`'s RMSNorms and MLPs take the native passes where they apply (see the module docstring);
    yields whether it switched any. Nothing outlives the block."""
    patched = []
    if applies(model):
        for module in model.modules():
            if "forward" in module.__dict__:  # already switched (a nested block) or someone else's
                continue
            if _fusable_norm(module):
                module.forward = functools.partial(_norm_forward, module, module.forward)  # shadows the class's
                patched.append(module)
            elif _fusable_mlp(module):
                module.forward = functools.partial(_mlp_forward, module)
                patched.append(module)
    try:
        yield bool(patched)
    finally:
        for module in patched:
            del module.forward
