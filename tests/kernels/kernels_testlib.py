"""Shared inputs and the tolerance rule for the kernel tests (kernel error <= 2x same-precision torch error)."""

import torch

from mmkit.kernels.attention_mass.ref import subset_attention_mass_ref

# (B, H, Hkv, R, Lk, D, mask kind)
CASES = [
    (1, 2, 2, 1, 40, 16, None),          # one row, MHA, no mask
    (2, 4, 2, 5, 150, 32, "rows"),       # GQA, several key blocks, per-row mask with padding + an all-masked row
    (2, 2, 1, 3, 33, 24, "shared"),      # (B, 1, Lk) mask, head_dim not a power of two
    (1, 2, 2, 70, 20, 16, "rows"),       # more rows than one row block
]
ATOL = 1e-6  # float32 output: sums of O(1) probabilities carry ~1e-7 rounding whatever the input precision


def make_inputs(case, dtype, device="cpu", seed=0):
    b, h, hkv, r, lk, d, kind = case
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, r, d, generator=g) * 2).to(device=device, dtype=dtype)
    k = (torch.randn(b, hkv, lk, d, generator=g) * 2).to(device=device, dtype=dtype)
    mask = None
    if kind == "rows":
        mask = torch.rand(b, r, lk, generator=g) > 0.3
        mask[0, :, lk - 3:] = False          # padding keys
        mask[-1, r - 1] = False              # a row with no allowed key
        mask = mask.to(device)
    elif kind == "shared":
        lengths = lk - 7 * torch.arange(b)  # right padding, a different length per batch row
        mask = (torch.arange(lk)[None, None, :] < lengths[:, None, None]).to(device)
    return q, k, mask, d ** -0.5


def check_close(out, q, k, mask, scaling, **kw):
    """Assert |out - float64 ref| <= 2 x |same-precision torch - float64 ref| + ATOL."""
    exact = subset_attention_mass_ref(q, k, scaling=scaling, key_mask=mask, compute_dtype=torch.float64, **kw)
    same = subset_attention_mass_ref(q, k, scaling=scaling, key_mask=mask, compute_dtype=q.dtype, **kw)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - exact.cpu()).abs().max().item()
    torch_err = (same.double().cpu() - exact.cpu()).abs().max().item()
    assert err <= 2 * torch_err + ATOL, (err, torch_err)


def case_id(c):
    return "x".join(map(str, c[:6])) + f"-{c[6]}"
