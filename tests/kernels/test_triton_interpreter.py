"""Triton kernels under Triton's CPU interpreter, against the float64 torch reference.

Triton reads TRITON_INTERPRET when it decorates kernels, including its own library functions at `import triton`;
a process that imported triton without it cannot switch later. So this module runs only when the variable was set
from the start (`TRITON_INTERPRET=1 pytest tests/kernels/test_triton_interpreter.py`); the normal suite runs it in a
fresh subprocess through test_interpreter_suite.py. bf16 is tested on GPU only (bf16 tl.dot is wrong in the
interpreter).
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start; run by test_interpreter_suite.py",
                allow_module_level=True)
pytest.importorskip("triton")

from kernels_testlib import CASES, case_id, check_close, make_inputs  # noqa: E402

from mmkit.kernels import choose_backend, subset_attention_mass  # noqa: E402
from mmkit.kernels.attention_mass import triton_impl  # noqa: E402


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("MMKIT_KERNEL_BACKEND", raising=False)


def test_dispatch_picks_triton_under_interpreter():
    assert choose_backend(torch.zeros(1), "subset_attention_mass") == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case, dtype):
    q, k, mask, scaling = make_inputs(case, dtype)
    # The op's path ("auto" method, scale folded into the kernel, head sum); other method explicitly below.
    for reduce, per_head in (("mean", False), ("mean", True)) if dtype == torch.float32 else (("sum", False),):
        out = subset_attention_mass(q, k, scaling=scaling, key_mask=mask, reduce=reduce, per_head=per_head)
        check_close(out, q, k, mask, scaling, reduce=reduce, per_head=per_head)
    # "auto" used single_read for R <= 16 above; here the other path, and two_pass for large R as well.
    for method in ("two_pass",) if case[3] <= triton_impl.SINGLE_READ_MAX_ROWS else ():
        sums = triton_impl.per_head_row_sums(q, k, scaling, mask, method=method)
        check_close(sums, q, k, mask, scaling, reduce="sum", per_head=True)


def test_rows_sum_to_one_and_empty_rows_give_zeros():
    q, k, mask, scaling = make_inputs(CASES[1], torch.float32)
    out = subset_attention_mass(q, k, scaling=scaling, key_mask=mask, reduce="sum", per_head=True)
    rows_with_keys = mask.any(-1).sum(-1).float()  # (B,)
    assert torch.allclose(out.sum(-1), rows_with_keys[:, None].expand(-1, q.shape[1]), atol=1e-5)
    none_allowed = torch.zeros_like(mask)
    zeros = subset_attention_mass(q, k, scaling=scaling, key_mask=none_allowed)
    assert torch.equal(zeros, torch.zeros_like(zeros))


def test_deterministic():
    q, k, mask, scaling = make_inputs(CASES[1], torch.float16)
    a = subset_attention_mass(q, k, scaling=scaling, key_mask=mask)
    assert torch.equal(a, subset_attention_mass(q, k, scaling=scaling, key_mask=mask))


def test_strided_inputs_and_mixed_dtypes():
    # q/k as a (B, L, H, D) projection viewed as (B, H, L, D): non-contiguous, used without a copy.
    q, k, mask, scaling = make_inputs(CASES[1], torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not kt.is_contiguous()
    check_close(subset_attention_mass(qt, kt, scaling=scaling, key_mask=mask, per_head=True), q, k, mask, scaling,
                per_head=True)
    mixed = subset_attention_mass(q.half(), k, scaling=scaling, key_mask=mask)  # promoted to float32
    check_close(mixed, q.half().float(), k, mask, scaling)
