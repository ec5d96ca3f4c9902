"""FLOPs and KV-cache accounting for pruned LVLMs (FastV's formula, counted from the tokens each layer kept)."""

from __future__ import annotations

from typing import Sequence


def layer_flops(n: float, d: int, m: int, ffn_mats: int = 3) -> float:
    """FLOPs of one decoder layer over n tokens: 4nd^2 (q, k, v, o projections) + 2n^2 d (scores and weighted
    sum) + ffn_mats * n d m (MLP). FastV counts 2 FFN matrices; LLaMA's SwiGLU MLP has 3, the default here."""
    return 4 * n * d * d + 2 * n * n * d + ffn_mats * n * d * m


def prefill_tflops(tokens_per_layer: Sequence[float], d: int, m: int, ffn_mats: int = 3) -> float:
    """Prefill TFLOPs of the decoder given the number of tokens each layer processed."""
    return sum(layer_flops(n, d, m, ffn_mats) for n in tokens_per_layer) / 1e12


def kv_cache_bytes(tokens_per_layer: Sequence[float], num_kv_heads: int, head_dim: int, bytes_per_el: int) -> int:
    """Bytes of K and V cached over all layers."""
    return int(sum(2 * n * num_kv_heads * head_dim * bytes_per_el for n in tokens_per_layer))
