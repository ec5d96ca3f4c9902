import pytest

from mmkit.evals.flops import kv_cache_bytes, layer_flops, prefill_tflops

# LLaVA-1.5-7B: hidden 4096, MLP 11008, 32 layers, n = 35 system/text + 576 image + 40 question tokens.
D, M, LAYERS, N, N_IMG = 4096, 11008, 32, 651, 576


def test_layer_flops_terms():
    # 4nd^2 + 2n^2d + ffn_mats*ndm with n=3, d=2, m=5: 48 + 36 + 60 (2 mats) or 90 (3 mats).
    assert layer_flops(3, 2, 5, ffn_mats=2) == 48 + 36 + 60
    assert layer_flops(3, 2, 5) == 48 + 36 + 90  # SwiGLU's 3 matrices by default
    assert layer_flops(0, 2, 5) == 0


def test_full_prefill_matches_fastv_reference_numbers():
    assert prefill_tflops([N] * LAYERS, D, M, ffn_mats=2) == pytest.approx(3.39, abs=0.005)
    assert prefill_tflops([N] * LAYERS, D, M, ffn_mats=3) == pytest.approx(4.33, abs=0.005)
    # Text only (~75 tokens) is the floor of an early exit: about 0.38 TFLOPs with FastV's count.
    assert prefill_tflops([75] * LAYERS, D, M, ffn_mats=2) == pytest.approx(0.38, abs=0.01)


def test_fastv_k2_r50_ratio():
    k, r = 2, 0.5
    pruned = [N] * k + [N - r * N_IMG] * (LAYERS - k)
    ratio = prefill_tflops(pruned, D, M, ffn_mats=2) / prefill_tflops([N] * LAYERS, D, M, ffn_mats=2)
    assert ratio == pytest.approx(0.578, abs=0.002)


def test_kv_cache_bytes():
    # K and V, 2 heads of dim 4, fp16: 2 * (10 + 5) * 2 * 4 * 2 bytes.
    assert kv_cache_bytes([10, 5], num_kv_heads=2, head_dim=4, bytes_per_el=2) == 480
    # LLaVA-1.5-7B fp16 full prefill: 32 layers * 651 tokens * 2 * 32 heads * 128 * 2 bytes ~ 341 MB.
    assert kv_cache_bytes([N] * LAYERS, 32, 128, 2) == 32 * N * 2 * 32 * 128 * 2


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="ffn_mats"):
        layer_flops(1, 1, 1, ffn_mats=0)
    with pytest.raises(ValueError, match="empty"):
        prefill_tflops([], D, M)
    with pytest.raises(ValueError):
        layer_flops(-1, D, M)
    with pytest.raises(ValueError):
        kv_cache_bytes([1], 0, 128, 2)
