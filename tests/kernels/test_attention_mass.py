"""subset_attention_mass: torch reference, argument checks, and (GPU only) the compiled Triton kernels.

The Triton kernels on CPU are tested under the interpreter in test_triton_interpreter.py.
"""

import pytest
import torch
from kernels_testlib import CASES, case_id, check_close, make_inputs

from mmkit.kernels import subset_attention_mass
from mmkit.kernels.attention_mass.ref import subset_attention_mass_ref


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("MMKIT_KERNEL_BACKEND", "torch")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_matches_explicit_softmax(torch_backend, case):
    q, k, mask, scaling = make_inputs(case, torch.float32)
    b, h, hkv, r, lk, _, _ = case
    probs = subset_attention_mass(q, k, scaling=scaling, key_mask=mask, reduce="none")
    assert probs.shape == (b, h, r, lk)
    group = h // hkv
    for bi in range(b):
        for hi in range(h):
            s = (q[bi, hi].double() @ k[bi, hi // group].double().T) * scaling  # GQA: head h reads kv head h // G
            if mask is not None:
                s = s.masked_fill(~mask[bi].expand(r, lk), float("-inf"))
            expected = torch.softmax(s, -1).nan_to_num(0.0)
            assert torch.allclose(probs[bi, hi].double(), expected, atol=1e-6)
    mean = subset_attention_mass(q, k, scaling=scaling, key_mask=mask)
    assert torch.allclose(mean, probs.sum((1, 2)) / (h * r), atol=1e-6)
    per_head = subset_attention_mass(q, k, scaling=scaling, key_mask=mask, reduce="sum", per_head=True)
    assert torch.allclose(per_head, probs.sum(2), atol=1e-6)


def test_reference_empty_rows_are_zero_and_fp16_within_rule(torch_backend):
    q, k, mask, scaling = make_inputs(CASES[1], torch.float16)
    out = subset_attention_mass(q, k, scaling=scaling, key_mask=torch.zeros_like(mask))
    assert torch.equal(out, torch.zeros_like(out))
    check_close(subset_attention_mass(q, k, scaling=scaling, key_mask=mask), q, k, mask, scaling)


@pytest.mark.parametrize("bad, match", [
    (dict(reduce="max"), "reduce must be"),
    (dict(reduce="none", per_head=True), "per_head=True needs"),
    (dict(key_mask=torch.ones(2, 4, 150, dtype=torch.bool)), r"key_mask must be \(B, R, Lk\)"),
    (dict(key_mask=torch.ones(2, 1, 150)), "key_mask must be bool"),
])
def test_bad_arguments_raise(bad, match):
    q, k, _, scaling = make_inputs(CASES[1], torch.float32)
    with pytest.raises(ValueError, match=match):
        subset_attention_mass(q, k, scaling=scaling, **bad)


def test_bad_shapes_raise():
    q = torch.randn(1, 3, 1, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        subset_attention_mass(q, torch.randn(1, 2, 5, 8), scaling=1.0)
    with pytest.raises(ValueError, match="differ in batch or head_dim"):
        subset_attention_mass(q, torch.randn(1, 3, 5, 4), scaling=1.0)
    with pytest.raises(ValueError, match="floating point"):
        subset_attention_mass(q.long(), torch.randn(1, 3, 5, 8).long(), scaling=1.0)


GPU_CASES = CASES + [(2, 32, 8, 64, 700, 128, "rows"), (1, 32, 32, 1, 2944, 128, None),
                     (8, 32, 32, 64, 651, 128, "shared")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_gpu_triton_matches_reference(monkeypatch, case, dtype):
    monkeypatch.delenv("MMKIT_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from mmkit.kernels import choose_backend

    q, k, mask, scaling = make_inputs(case, dtype, device="cuda")
    assert choose_backend(k, "subset_attention_mass") == "triton"
    for per_head in (False, True):
        out = subset_attention_mass(q, k, scaling=scaling, key_mask=mask, per_head=per_head)
        check_close(out, q, k, mask, scaling, per_head=per_head)
    first = subset_attention_mass(q, k, scaling=scaling, key_mask=mask)
    assert torch.equal(first, subset_attention_mass(q, k, scaling=scaling, key_mask=mask))
    ref = subset_attention_mass_ref(q, k, scaling=scaling, key_mask=mask)
    assert torch.allclose(first, ref, atol=1e-4)
    from mmkit.kernels.attention_mass import triton_impl

    methods = ("two_pass", "single_read") if case[3] <= triton_impl.SINGLE_READ_MAX_ROWS else ("two_pass",)
    for method in methods:
        sums = triton_impl.per_head_row_sums(q, k, scaling, mask, method=method)
        check_close(sums, q, k, mask, scaling, reduce="sum", per_head=True)
