"""time_kernels runs end to end on CPU (tiny cases) and reports every column."""

from mmkit.kernels.speed import time_kernels


def test_time_kernels_cpu_tiny():
    rows = time_kernels("cpu", cases=[(1, 2, 16, 40, 2)], reps=2)
    attn, compaction = rows[0], rows[-1]
    assert attn["B"] == 1 and attn["Lk"] == 40 and attn["R"] == 2
    assert attn["sdpa_ms"] > 0 and attn["torch_ms"] > 0 and attn["overhead_torch"] > 1
    assert compaction["op"] == "topk_compact+gather" and compaction["ms"] > 0
