"""Timing of the kernels at LLaVA-1.5-7B attention sizes: Triton vs torch reference vs SDPA alone.

`time_kernels()` returns one dict per case. "triton_ms"/"torch_ms" time `subset_attention_mass` (R selected rows
against all Lk keys); "sdpa_ms" times the layer's own full causal attention (Lk queries) that the scoring rides
along with; "overhead_triton" = (sdpa + triton) / sdpa, the cost of scoring one layer relative to its attention.
GPU timing uses CUDA events around a loop of calls (launch overhead included, as in real use), after warm-up,
median over repeats.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# (batch, heads, head_dim, keys, rows): LLaVA-1.5-7B is 32 heads x 128; 651 tokens = 576 image + text
# (LLaVA-1.5), 2944 = 2880 image + text (LLaVA-NeXT size). R=1: last-token scoring (FastV/PDrop); R=64: text raters.
LLAVA_CASES = [(b, 32, 128, n, r) for b in (1, 8) for n in (651, 2944) for r in (1, 64)]
TINY_CASES = [(1, 4, 32, 96, 1), (2, 4, 32, 96, 8)]


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int, inner: int) -> float:
    """Median milliseconds per call of `fn` (each sample = `inner` back-to-back calls)."""
    for _ in range(3):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / inner)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(samples)


def _graph_ms(fn: Callable[[], object], device: torch.device, reps: int, inner: int) -> float:
    """Median GPU milliseconds per call of `fn`, replaying `inner` captured calls from one CUDA graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (Triton compiles here) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    ms = _time_ms(graph.replay, device, reps, 1) / inner
    del graph
    return ms


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _rows_mask(batch: int, rows: int, n_keys: int, device: torch.device) -> torch.Tensor | None:
    """Causal key mask of the last `rows` positions (None for a single last row: it sees every key)."""
    if rows == 1:
        return None
    pos = torch.arange(n_keys - rows, n_keys, device=device)
    return (torch.arange(n_keys, device=device)[None, :] <= pos[:, None]).expand(batch, rows, n_keys)


def time_kernels(device: str = "cuda", cases: list[tuple[int, int, int, int, int]] | None = None,
                  dtype: torch.dtype = torch.bfloat16, reps: int = 30, inner: int = 10) -> list[dict]:
    """Time subset_attention_mass (Triton and torch) and SDPA at each (B, H, D, Lk, R) case.

    Defaults: LLaVA-1.5-7B sizes in bf16 on CUDA; on CPU, tiny cases in float32 (the Triton column is None
    unless Triton can run there).
    """
    from mmkit.kernels.attention_mass.ref import subset_attention_mass_ref
    from mmkit.kernels.dispatch import can_run_triton

    dev = torch.device(device)
    if cases is None:
        cases = LLAVA_CASES if dev.type == "cuda" else TINY_CASES
    if dev.type != "cuda":
        dtype, reps, inner = torch.float32, min(reps, 5), 1
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows_out = []
    for batch, heads, dim, n_keys, rows in cases:
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(batch, heads, n_keys, dim, device=dev, dtype=dtype, generator=gen)
        k = torch.randn(batch, heads, n_keys, dim, device=dev, dtype=dtype, generator=gen)
        v = torch.randn(batch, heads, n_keys, dim, device=dev, dtype=dtype, generator=gen)
        q_rows = q[:, :, n_keys - rows:]
        mask = _rows_mask(batch, rows, n_keys, dev)
        scaling = dim ** -0.5
        sdpa_ms = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                           dev, reps, inner)
        torch_ms = _time_ms(lambda: subset_attention_mass_ref(q_rows, k, scaling=scaling, key_mask=mask),
                            dev, reps, inner)
        triton_ms, graph_extra = None, {}
        if can_run_triton(k):
            from mmkit.kernels.attention_mass.triton_impl import SINGLE_READ_MAX_ROWS, per_head_row_sums

            def run_triton():  # what subset_attention_mass runs on CUDA, minus argument checks and dispatch
                return per_head_row_sums(q_rows, k, scaling, mask, out_scale=1.0 / (heads * rows)).sum(1)

            diff = (run_triton() - subset_attention_mass_ref(q_rows, k, scaling=scaling, key_mask=mask)).abs().max()
            triton_ms = _time_ms(run_triton, dev, reps, inner)
            if dev.type == "cuda" and rows <= SINGLE_READ_MAX_ROWS:  # the path "auto" does not take, for comparison
                graph_extra["triton_two_pass_graph_ms"] = _graph_ms(
                    lambda: per_head_row_sums(q_rows, k, scaling, mask, method="two_pass").sum(1), dev, reps, inner)
        else:
            diff = None
        graph = dict(graph_extra)
        if dev.type == "cuda":  # GPU time alone: the calls replayed from a CUDA graph, no Python launch cost
            graph["sdpa_graph_ms"] = _graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True), dev, reps, inner)
            graph["torch_graph_ms"] = _graph_ms(
                lambda: subset_attention_mass_ref(q_rows, k, scaling=scaling, key_mask=mask), dev, reps, inner)
            if triton_ms is not None:
                graph["triton_graph_ms"] = _graph_ms(run_triton, dev, reps, inner)
                graph["overhead_triton_graph"] = (graph["sdpa_graph_ms"] + graph["triton_graph_ms"]) / graph[
                    "sdpa_graph_ms"]
        row = dict(device=gpu_name, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                   triton=_triton_version(), B=batch, H=heads, D=dim, Lk=n_keys, R=rows,
                   sdpa_ms=round(sdpa_ms, 4), torch_ms=round(torch_ms, 4),
                   triton_ms=None if triton_ms is None else round(triton_ms, 4),
                   overhead_torch=round((sdpa_ms + torch_ms) / sdpa_ms, 3),
                   overhead_triton=None if triton_ms is None else round((sdpa_ms + triton_ms) / sdpa_ms, 3),
                   max_abs_diff_vs_torch=None if diff is None else float(diff),
                   **{key: round(val, 4) for key, val in graph.items()})
        logger.info("kernel timing %s", row)
        rows_out.append(row)
        del q, k, v
    rows_out += _time_compaction(dev, reps, inner)
    return rows_out


def _time_compaction(dev: torch.device, reps: int, inner: int) -> list[dict]:
    """topk_compact + gather of hidden states: FastV-style drop of 90 % of the image tokens."""
    from mmkit.kernels.compaction.ref import gather_tokens, kept_count, topk_compact

    out = []
    for batch, n_tokens, n_image in ((1, 651, 576), (8, 651, 576), (8, 2944, 2880)):
        if dev.type != "cuda":
            batch, n_tokens, n_image = 1, 96, 64
        scores = torch.rand(batch, n_tokens, device=dev)
        cand = torch.zeros(batch, n_tokens, dtype=torch.bool, device=dev)
        cand[:, 35:35 + n_image] = True
        hidden = torch.randn(batch, n_tokens, 4096 if dev.type == "cuda" else 64, device=dev,
                             dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        keep = n_image // 10
        out_len = kept_count(n_tokens, n_image, keep)

        def run():
            return gather_tokens(hidden, topk_compact(scores, cand, keep, out_len=out_len).index)

        out.append(dict(op="topk_compact+gather", device=str(dev), B=batch, L=n_tokens, keep=keep,
                        ms=round(_time_ms(run, dev, reps, inner), 4)))
        if dev.type != "cuda":
            break
    return out
