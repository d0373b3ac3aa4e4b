"""One decode step of a Llama-family model without the transformers module stack (CPU, float32).

A decode step multiplies a few rows by every weight; on a CPU the matmuls are bound by reading the
weights, and transformers' layer-by-layer Python (masks rebuilt each step, one call per projection,
seven linears per layer) adds as much again. `LeanDecoder` runs the same arithmetic with less around it:
1. At the start of a rollout, per layer, q/k/v are concatenated into one weight and gate/up into
   another (four linears per layer instead of seven), each stored once for the native small-batch
   kernel (`native.BlockedLinear`), or reordered for oneDNN where that kernel cannot run here
   (`models.prepacked_linears` does the same for the stock modules).
2. Each step: embed the new tokens; rotary cos/sin from the model's own rotary module (so every
   RoPE variant it implements applies); per layer, the RMSNorms (and Qwen3's per-head q/k norms) as
   one fused `F.rms_norm` each where that reproduces the model's module (`_fused_norm`, else the
   module itself), the fused projections, rotate-half RoPE on queries and keys together in three
   ops, the new key/value written in place into the rollout's `ReservedLayer`, attention over the
   cache with the left-padding mask (`native.decode_attention`, else SDPA), and the SwiGLU MLP; then
   the final norm and the LM head. Where the native kernels run and every norm has the plain RMSNorm
   form, each layer is instead one native call doing all of that (`native.DecodeLayer`): around
   four linears the Python layer ran ~100 small torch ops per step. Those calls keep the KV cache in
   bf16 where their linears are bf16 (`cache_dtype`), else float32.
3. Models it does not cover decode through transformers as before (`LeanDecoder.supports`): other
   architectures, sliding-window layers, non-SiLU MLPs, partial rotary, logit transforms, anything
   off the CPU or not float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gopd_core.hardware import computes_in_bf16
from gopd_core.head_logprobs import logit_transform
from gopd_core.models import onednn_packable, pack_linear_weight, packed_linear
from gopd_core.rollout import native

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def _fused_bias(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    """Concatenated biases of `linears` (zeros for one without), None when none has a bias."""
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias.detach() if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
                      for linear in linears])


def _bf16_linears() -> bool:
    """Whether `_decode_linear` builds bf16 linears here (AVX512-BF16 and bf16 precision)."""
    return native.available() and native.bf16_available() and computes_in_bf16("cpu")


def _decode_linear(weights: list[torch.Tensor], biases: torch.Tensor | None):
    """x @ cat(weights).T + biases for decode steps: the native small-batch kernel where it runs
    (`native.BlockedLinear`; its bf16 form where the CPU has AVX512-BF16 and the precision is bf16,
    `hardware.computes_in_bf16`), else oneDNN's prepacked one."""
    weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
    if native.available():
        return native.BlockedLinear(weight, biases, bf16=_bf16_linears())
    packed = pack_linear_weight(weight)
    return lambda inputs: packed_linear(packed, biases, inputs)


def _rotate(states_B1XD: torch.Tensor, cos_B11D: torch.Tensor, signed_sin_B11D: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of queries and keys at once, in three ops: x * cos + swap_halves(x) * signed_sin.

    signed_sin is sin with its first half negated (`_signed_sin`), so the swapped halves need no negation.
    """
    *lead, dim = states_B1XD.shape
    swapped_B1XD = states_B1XD.view(*lead, 2, dim // 2).flip(-2).view(*lead, dim)
    return torch.addcmul(states_B1XD * cos_B11D, swapped_B1XD, signed_sin_B11D)


def _signed_sin(sin_B11D: torch.Tensor) -> torch.Tensor:
    half = sin_B11D.shape[-1] // 2
    return torch.cat((-sin_B11D[..., :half], sin_B11D[..., half:]), dim=-1)


def _norm_parameters(norm: torch.nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) when one `F.rms_norm` call gives `norm`'s own output on a probe, else None.

    The Llama-family RMSNorm runs six ops (cast, pow, mean, rsqrt, two muls); the fused kernel one pass.
    """
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    shape = (weight.shape[0],)
    probe = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype) * 3
    with torch.no_grad():
        same = torch.allclose(F.rms_norm(probe, shape, weight, eps), norm(probe), rtol=1e-5, atol=1e-6)
    return (weight.detach(), eps) if same else None


def _fused_norm(norm: torch.nn.Module):
    """`norm` as one fused `F.rms_norm` call when that gives the module's own output (`_norm_parameters`), else `norm`."""
    return _fused(norm, _norm_parameters(norm))


def _fused(norm: torch.nn.Module, parameters: tuple[torch.Tensor, float] | None):
    """`_fused_norm` given `norm`'s `_norm_parameters`."""
    if parameters is None:
        return norm
    weight, eps = parameters

    def fused(hidden: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden, (weight.shape[0],), weight, eps)

    return fused


def _native_layer(norms: list, linears: list, head_dim: int, heads: int, kv_heads: int,
                  scaling: float) -> native.DecodeLayer | None:
    """The whole layer as one native call (`native.DecodeLayer`) where every part of it has a native form:
    the native linears and attention, and norms of the plain RMSNorm form. norms: `_norm_parameters` of the
    input and post-attention norms, then of the per-head q and k norms where the layer has them (Qwen3)."""
    if not all(isinstance(linear, native.BlockedLinear) for linear in linears) or not native.attention_supported(head_dim):
        return None
    if None in norms:
        return None
    head_norms = None
    if len(norms) == 4:
        q_norm, k_norm = norms[2:]
        if q_norm[1] != k_norm[1]:
            return None
        head_norms = (q_norm[0], k_norm[0], q_norm[1])
    qkv, out, gate_up, down = linears
    return native.DecodeLayer(input_norm=norms[0], post_norm=norms[1], head_norms=head_norms, qkv=qkv, out=out,
                              gate_up=gate_up, down=down, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                              scale=scaling)


class _Layer:
    """One decoder layer's packed weights and the modules it reuses as they are (norms)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        self.q_norm, self.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        if self.q_norm is not None:
            norms += [self.q_norm, self.k_norm]
        norm_parameters = [_norm_parameters(norm) for norm in norms]  # probed once, for both decode paths
        fused = [_fused(norm, parameters) for norm, parameters in zip(norms, norm_parameters)]
        self.input_norm, self.post_norm = fused[:2]
        if self.q_norm is not None:
            self.q_norm, self.k_norm = fused[2:]
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.qkv = _decode_linear([linear.weight for linear in qkv], _fused_bias(qkv))
        self.out = _decode_linear([attention.o_proj.weight], _fused_bias([attention.o_proj]))
        self.gate_up = _decode_linear([mlp.gate_proj.weight, mlp.up_proj.weight], _fused_bias([mlp.gate_proj, mlp.up_proj]))
        self.down = _decode_linear([mlp.down_proj.weight], _fused_bias([mlp.down_proj]))
        self.native_attention = native.attention_supported(self.head_dim)
        self.native = _native_layer(norm_parameters, [self.qkv, self.out, self.gate_up, self.down], self.head_dim,
                                    self.heads, self.kv_heads, self.scaling)

    def __call__(self, hidden_B1H: torch.Tensor, cos_B11D: torch.Tensor, signed_sin_B11D: torch.Tensor,
                 attend_BL: torch.Tensor | None, cache_layer) -> torch.Tensor:
        batch, dim, heads = hidden_B1H.shape[0], self.head_dim, self.heads
        qkv_B1X = self.qkv(self.input_norm(hidden_B1H))
        qk_B1X, v_B1X = qkv_B1X.split([(heads + self.kv_heads) * dim, self.kv_heads * dim], dim=-1)
        qk_B1QD = qk_B1X.view(batch, 1, heads + self.kv_heads, dim)  # Q = query heads then key heads
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
            qk_B1QD = torch.cat((self.q_norm(qk_B1QD[:, :, :heads]), self.k_norm(qk_B1QD[:, :, heads:])), dim=2)
        qk_B1QD = _rotate(qk_B1QD, cos_B11D, signed_sin_B11D)
        values_BK1D = v_B1X.view(batch, 1, self.kv_heads, dim).transpose(1, 2)
        keys_BKLD, values_BKLD = cache_layer.update(qk_B1QD[:, :, heads:].transpose(1, 2), values_BK1D)
        if self.native_attention:
            attended_B1X = native.decode_attention(qk_B1QD[:, 0, :heads], keys_BKLD, values_BKLD, attend_BL,
                                                   self.scaling)[:, None]
        else:
            attend_B11L = None if attend_BL is None else attend_BL[:, None, None, :]
            attended_BH1D = F.scaled_dot_product_attention(qk_B1QD[:, :, :heads].transpose(1, 2), keys_BKLD,
                                                           values_BKLD, attn_mask=attend_B11L, scale=self.scaling,
                                                           enable_gqa=self.kv_heads != heads)
            attended_B1X = attended_BH1D.transpose(1, 2).reshape(batch, 1, -1)
        hidden_B1H = hidden_B1H + self.out(attended_B1X)
        gate_B1I, up_B1I = self.gate_up(self.post_norm(hidden_B1H)).chunk(2, dim=-1)
        return hidden_B1H.add_(self.down(F.silu(gate_B1I).mul_(up_B1I)))


class LeanDecoder:
    """Decode steps of a supported model (see `supports`) over a cache of `ReservedLayer`s."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not self.supports(model):
            raise ValueError(f"LeanDecoder does not cover {type(model).__name__}: decode it with transformers")
        body = model.model
        self.embed, self.rotary, self.norm = body.embed_tokens, body.rotary_emb, _fused_norm(body.norm)
        self.layers = [_Layer(layer) for layer in body.layers]
        self.head = _decode_linear([model.lm_head.weight], _fused_bias([model.lm_head]))
        self.bf16 = _bf16_linears()
        self.native = all(layer.native is not None for layer in self.layers)
        # the KV cache's dtype for `reserve_cache`: bf16 where the layers are native bf16 calls, halving the bytes
        # each step's attention reads (the update's keys and values come out of bf16 matmuls too); else float32
        self.cache_dtype = torch.bfloat16 if self.native and self.bf16 else torch.float32

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether `model` is a float32 CPU Llama-family LM whose decode step this class reproduces."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in ARCHITECTURES:
            return False
        if not onednn_packable(model.get_input_embeddings().weight) or logit_transform(config) is not None:
            return False
        sliding = getattr(config, "use_sliding_window", getattr(config, "sliding_window", None) is not None)
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if sliding or layer_types != {"full_attention"} or getattr(config, "hidden_act", None) != "silu":
            return False
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0 or not isinstance(model.lm_head, torch.nn.Linear):
            return False
        return all(_standard_layer(layer) for layer in model.model.layers)

    def prefill(self, model: torch.nn.Module, input_ids_BL: torch.Tensor, mask_BL: torch.Tensor,
                positions_BL: torch.Tensor) -> tuple[object, torch.Tensor]:
        """(cache, last-position logits (B, V) float32) after left-padded prompts.

        The transformers body runs the prompts, under bf16 autocast where the decode linears are bf16
        (its matmuls at the bf16 rate: 0.12 -> 0.075 s for 8 x 35 tokens of the 25.8M zoo student); the
        last position goes through the decode head, whose packed weights are at hand (an autocast head
        would cast all its weights for B rows: 60 ms at a 151,936 x 512 head). The cache may hold bf16
        values: `reserve_cache` takes them in `cache_dtype`.
        """
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = model.model(input_ids=input_ids_BL, attention_mask=mask_BL, position_ids=positions_BL,
                              use_cache=True)
        return out.past_key_values, self.head(out.last_hidden_state[:, -1:].float())[:, -1]

    def step(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, attend_BL: torch.Tensor | None,
             cache) -> torch.Tensor:
        """Logits (B, V) of the next token after `tokens_B` at `positions_B`, appending to `cache`.

        attend_BL: True where a row may attend (its real tokens, this one included), None if all may.
        """
        hidden_B1H = self.embed(tokens_B[:, None])
        cos_B1D, sin_B1D = self.rotary(hidden_B1H, positions_B[:, None])
        if self.native:  # each layer one native call, on the hidden states in place
            hidden_BH = hidden_B1H.reshape(hidden_B1H.shape[0], -1).contiguous()
            cos_BD, sin_BD = cos_B1D[:, 0].contiguous(), sin_B1D[:, 0].contiguous()
            for layer, cache_layer in zip(self.layers, cache.layers):
                layer.native(hidden_BH, cos_BD, sin_BD, *cache_layer.append_slot(), attend_BL)
            return self.head(self.norm(hidden_BH))
        cos_B11D, signed_sin_B11D = cos_B1D[:, None], _signed_sin(sin_B1D[:, None])
        for layer, cache_layer in zip(self.layers, cache.layers):
            hidden_B1H = layer(hidden_B1H, cos_B11D, signed_sin_B11D, attend_BL, cache_layer)
        return self.head(self.norm(hidden_B1H))[:, -1]


def _standard_layer(layer: torch.nn.Module) -> bool:
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    names = {"q_proj", "k_proj", "v_proj", "o_proj"}
    if attention is None or mlp is None or not all(type(getattr(attention, n, None)) is torch.nn.Linear for n in names):
        return False
    if not all(type(getattr(mlp, n, None)) is torch.nn.Linear for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
    activation = type(getattr(mlp, "act_fn", None)).__name__
    return (all(type(n).__name__.endswith("RMSNorm") for n in norms) and activation in ("SiLU", "SiLUActivation")
            and isinstance(getattr(attention, "scaling", None), float))
