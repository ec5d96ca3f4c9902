"""Prefill FLOPs and KV-cache size of a decoder, counted from the tokens each layer actually processed.

FastV's per-layer count for n tokens, hidden size d and MLP size m is

    f(n) = 4 n d^2  (q, k, v, o projections)  +  2 n^2 d  (scores and weighted sum)  +  2 n d m  (MLP)

with one multiply-add counted as one FLOP. FastV's MLP term assumes two matrices; LLaMA's SwiGLU MLP (gate, up,
down) has three, so `ffn_mats` defaults to 3 (as SwiGLU-aware counters such as SparseVLM's do); pass
``ffn_mats=2`` to reproduce numbers quoted with FastV's formula. For LLaVA-1.5-7B (d=4096, m=11008, 32 layers,
n=651) the full prefill is about 3.39 TFLOPs with 2 matrices and 4.33 with 3. Only the prefill is counted: the
decode steps' FLOPs are not. Pruning shows up as a smaller n in the layers after the pruning point.

Methods that let text read visual tokens through a cross-attention block instead of carrying them through a layer
(VISOR) add, for n text queries and v visual keys at that layer, with inner width d as the decoder's attention,

    c(n, v) = 2 n d^2  (q, o projections)  +  2 v d^2  (k, v projections, once per prefill)  +  2 n v d  (scores
              and weighted sum)

which `prefill_tflops` includes when given the visual tokens each layer read that way (zero for other methods).
"""

from __future__ import annotations

from typing import Sequence


def _check_dims(d: int, m: int, ffn_mats: int) -> None:
    if d < 1 or m < 1:
        raise ValueError(f"hidden size d and MLP size m must be positive, got d={d}, m={m}")
    if ffn_mats < 1 or int(ffn_mats) != ffn_mats:
        raise ValueError(f"ffn_mats is the number of MLP matrices (2 for FastV's count, 3 for SwiGLU), got {ffn_mats}")


def layer_flops(n: float, d: int, m: int, ffn_mats: int = 3) -> float:
    """FLOPs of one decoder layer over n tokens: 4nd^2 + 2n^2 d + ffn_mats * n d m (see the module docstring)."""
    _check_dims(d, m, ffn_mats)
    if n < 0:
        raise ValueError(f"token count must be >= 0, got {n}")
    return 4.0 * n * d * d + 2.0 * n * n * d + float(ffn_mats) * n * d * m


def cross_attention_flops(n: float, v: float, d: int) -> float:
    """FLOPs of one text -> visual cross-attention block: 2nd^2 + 2vd^2 + 2nvd (see the module docstring)."""
    if n < 0 or v < 0:
        raise ValueError(f"token counts must be >= 0, got n={n}, v={v}")
    if v == 0:
        return 0.0
    return 2.0 * n * d * d + 2.0 * v * d * d + 2.0 * n * v * d


def prefill_tflops(tokens_per_layer: Sequence[float], d: int, m: int, ffn_mats: int = 3,
                   cross_visual: Sequence[float] | None = None) -> float:
    """Prefill TFLOPs (1e12) of the decoder: the sum of `layer_flops` over layers, given each layer's token count
    (a mean over samples may be fractional), plus `cross_attention_flops` where `cross_visual` (visual tokens read
    by cross-attention per layer; None or empty = none) is non-zero, with that layer's tokens as queries."""
    if len(tokens_per_layer) == 0:
        raise ValueError("tokens_per_layer is empty; give the token count of every decoder layer")
    total = sum(layer_flops(n, d, m, ffn_mats) for n in tokens_per_layer)
    if cross_visual:
        if len(cross_visual) != len(tokens_per_layer):
            raise ValueError(f"cross_visual has {len(cross_visual)} layers, tokens_per_layer {len(tokens_per_layer)}")
        _check_dims(d, m, ffn_mats)
        total += sum(cross_attention_flops(n, v, d) for n, v in zip(tokens_per_layer, cross_visual))
    return total / 1e12


def kv_cache_bytes(tokens_per_layer: Sequence[float], num_kv_heads: int, head_dim: int, bytes_per_el: int) -> int:
    """Bytes of the K and V cache of one sequence, summed over layers: 2 * n_l * num_kv_heads * head_dim *
    bytes_per_el per layer (layers that dropped tokens cache fewer)."""
    if num_kv_heads < 1 or head_dim < 1 or bytes_per_el < 1:
        raise ValueError(f"num_kv_heads, head_dim and bytes_per_el must be positive, got {num_kv_heads}, "
                         f"{head_dim}, {bytes_per_el}")
    if any(n < 0 for n in tokens_per_layer):
        raise ValueError("token counts must be >= 0")
    return int(round(sum(2 * n * num_kv_heads * head_dim * bytes_per_el for n in tokens_per_layer)))
