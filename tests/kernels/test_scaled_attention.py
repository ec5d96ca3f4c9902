"""scaled_attention: the reference against the PAINT definition, FlexAttention's mods (unfused, CPU) against the
reference, and (GPU) the compiled FlexAttention kernel under the 2x same-precision rule."""

import math

import pytest
import torch

from mmkit.kernels import scaled_attention
from mmkit.kernels.score_mod.ref import check_and_prepare, scaled_attention_ref


def make(b=2, h=4, hkv=2, lq=9, lk=21, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(device=device, dtype=dtype)
    rows = (torch.rand(b, lq, generator=g) > 0.5).to(device)
    keys = torch.zeros(b, lk, dtype=torch.bool)
    keys[:, 3:12] = True                         # the "visual tokens"
    alpha = torch.tensor([1.0, 2.0, 0.5, 4.0][:h]).to(device)
    return q, k, v, rows, keys.to(device), alpha, d ** -0.5


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("MMKIT_KERNEL_BACKEND", raising=False)


def test_reference_scales_unnormalised_weights_by_alpha():
    q, k, v, rows, keys, alpha, scaling = make()
    out = scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_mask=keys, head_scale=alpha)
    lq, lk = q.shape[2], k.shape[2]
    for b in range(2):
        for h in range(4):
            s = (q[b, h].double() @ k[b, h // 2].double().T) * scaling
            w = s.exp() * torch.where(rows[b, :, None] & keys[b, None, :], alpha[h].double(), 1.0)
            w = w * (torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None])  # causal, bottom-right
            expected = (w / w.sum(-1, keepdim=True)) @ v[b, h // 2].double()
            assert torch.allclose(out[b, h].double(), expected, atol=1e-5)


def test_no_head_scale_is_plain_causal_attention():
    q, k, v, rows, keys, _, scaling = make(hkv=4, lq=21)
    out = scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_mask=keys)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    assert torch.allclose(out, sdpa, atol=1e-5)
    ones = scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_mask=keys, head_scale=1.0)
    assert torch.allclose(ones, sdpa, atol=1e-5)


def test_masks_padding_and_empty_rows():
    q, k, v, rows, keys, alpha, scaling = make()
    mask = torch.ones(2, 1, 9, 21, dtype=torch.bool).tril(21 - 9)
    mask[1, :, :, :4] = False                    # left padding in batch row 1
    mask[1, :, 0] = False                        # a query row with no key at all
    out = scaled_attention(q, k, v, scaling=scaling, attn_mask=mask, row_mask=rows, key_mask=keys,
                           head_scale=alpha)
    assert torch.isfinite(out).all() and torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    same = scaled_attention(q, k, v, scaling=scaling, attn_mask=additive, row_mask=rows, key_mask=keys,
                            head_scale=alpha)
    assert torch.equal(out, same)


@pytest.mark.slow  # FlexAttention's first call on CPU sets up its tracing machinery: ~10 s
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("with_mask", [False, True])
def test_flex_mods_match_reference_on_cpu(with_mask):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from mmkit.kernels.score_mod.flex_impl import scaled_attention_flex

    q, k, v, rows, keys, alpha, scaling = make()
    mask = None
    if with_mask:
        mask = torch.ones(2, 1, 9, 21, dtype=torch.bool).tril(21 - 9)
        mask[1, :, :, :4] = False
    allowed, log_scale = check_and_prepare(q, k, v, mask, rows, keys, alpha)
    out = scaled_attention_flex(q, k, v, scaling=scaling, allowed=allowed, boost=(rows, keys), log_scale=log_scale,
                                compiled=False)
    ref = scaled_attention_ref(q, k, v, scaling=scaling, attn_mask=mask, row_mask=rows, key_mask=keys,
                               head_scale=alpha)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(row_mask=torch.ones(2, 8, dtype=torch.bool)), "row_mask must be bool"),
    (dict(key_mask=torch.ones(2, 21)), "key_mask must be bool"),
    (dict(head_scale=torch.ones(3)), "head_scale must be"),
    (dict(attn_mask=torch.ones(2, 9, 21, dtype=torch.bool)), "attn_mask must be"),
    (dict(attn_mask=torch.ones(2, 1, 9, 21, dtype=torch.long)), "attn_mask must be bool"),
])
def test_bad_arguments_raise(kwargs, match):
    q, k, v, _, _, _, scaling = make()
    with pytest.raises(ValueError, match=match):
        scaled_attention(q, k, v, scaling=scaling, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 9, 21, 16), (1, 32, 32, 651, 651, 128)])
def test_gpu_flex_matches_reference(monkeypatch, shape, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b, h, hkv, lq, lk, d = shape
    q, k, v, rows, keys, _, scaling = make(b, h, hkv, lq, lk, d, dtype=dtype, device="cuda")
    alpha = torch.linspace(0.5, 3.0, h, device="cuda")
    mask = torch.ones(b, 1, lq, lk, dtype=torch.bool, device="cuda").tril(lk - lq)
    mask[-1, :, :, :5] = False
    for attn_mask in (None, mask):
        out = scaled_attention(q, k, v, scaling=scaling, attn_mask=attn_mask, row_mask=rows, key_mask=keys,
                               head_scale=alpha)
        kw = dict(scaling=scaling, attn_mask=attn_mask, row_mask=rows, key_mask=keys, head_scale=alpha)
        exact = scaled_attention_ref(q, k, v, compute_dtype=torch.float64, **kw).double()
        same = scaled_attention_ref(q, k, v, compute_dtype=dtype, **kw).double()
        err, torch_err = (out.double() - exact).abs().max().item(), (same - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-5 * math.sqrt(d), (err, torch_err)


def _key_bias(b=2, h=4, lk=21, seed=1):
    """A per-head, per-key log-scale over two key sets (PAINT's local and summary tokens)."""
    g = torch.Generator().manual_seed(seed)
    local = torch.zeros(b, lk, dtype=torch.bool)
    local[:, 3:8] = True
    summary = torch.zeros(b, lk, dtype=torch.bool)
    summary[:, 9:11] = True
    alpha, beta = 1 + torch.rand(h, generator=g), 1 + 0.5 * torch.rand(h, generator=g)
    return local[:, None] * alpha.log()[None, :, None] + summary[:, None] * beta.log()[None, :, None]


def test_key_bias_matches_the_reference_and_the_single_set_form(monkeypatch):
    from mmkit.kernels.score_mod import sdpa_impl
    from mmkit.kernels.score_mod.ref import scaled_attention_ref

    q, k, v, rows, keys, alpha, scaling = make()
    bias = _key_bias()
    expected = scaled_attention_ref(q, k, v, scaling=scaling, row_mask=rows, key_bias=bias)
    out = scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_bias=bias)
    assert torch.allclose(out, expected, atol=1e-5)
    # The torch path processes query rows in chunks: one row per chunk gives the same result.
    monkeypatch.setattr(sdpa_impl, "CHUNK_ELEMENTS", 1)
    assert torch.allclose(scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_bias=bias), expected,
                          atol=1e-5)
    # One key set with one factor per head is the key_mask / head_scale form.
    single = keys[:, None, :] * alpha.log()[None, :, None]
    assert torch.allclose(scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_bias=single),
                          scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_mask=keys, head_scale=alpha),
                          atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        scaled_attention(q, k, v, scaling=scaling, key_mask=keys, key_bias=bias)
    with pytest.raises(ValueError, match="key_bias must be float"):
        scaled_attention(q, k, v, scaling=scaling, key_bias=bias[:, :2])


@pytest.mark.slow  # FlexAttention's first call on CPU sets up its tracing machinery
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_key_bias_mod_matches_reference_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from mmkit.kernels.score_mod.flex_impl import scaled_attention_flex

    q, k, v, rows, _, _, scaling = make()
    bias = _key_bias()
    out = scaled_attention_flex(q, k, v, scaling=scaling, allowed=None, boost=None, log_scale=None, compiled=False,
                                key_bias=(rows, bias))
    ref = scaled_attention_ref(q, k, v, scaling=scaling, row_mask=rows, key_bias=bias)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_flex_key_bias_matches_reference(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, rows, _, _, scaling = make(dtype=dtype, device="cuda")
    bias = _key_bias().cuda()
    out = scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_bias=bias)
    exact = scaled_attention_ref(q, k, v, scaling=scaling, row_mask=rows, key_bias=bias,
                                 compute_dtype=torch.float64).double()
    same = scaled_attention_ref(q, k, v, scaling=scaling, row_mask=rows, key_bias=bias, compute_dtype=dtype).double()
    err, torch_err = (out.double() - exact).abs().max().item(), (same - exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-5 * math.sqrt(q.shape[-1]), (err, torch_err)


def _key_gain(b=2, h=4, lk=21, seed=2):
    """A per-head gain over two key sets (PAINT's local tokens with alpha, summary tokens with beta)."""
    g = torch.Generator().manual_seed(seed)
    local = torch.zeros(b, lk, dtype=torch.bool)
    local[:, 3:8] = True
    summary = torch.zeros(b, lk, dtype=torch.bool)
    summary[:, 9:11] = True
    alpha, beta = 2 * torch.rand(h, generator=g), 0.5 * torch.rand(h, generator=g)
    return local[:, None] * alpha[None, :, None] + summary[:, None] * beta[None, :, None]


def test_key_gain_is_z_plus_gain_abs_z_on_the_selected_rows():
    """Against the edit written out per (row, key): z (1 + g) for z > 0, z (1 - g) for z < 0, then softmax."""
    q, k, v, rows, _, _, scaling = make()
    gain = _key_gain()
    mask = torch.ones(2, 1, 9, 21, dtype=torch.bool).tril(21 - 9)
    mask[1, :, :, :4] = False                    # left padding in batch row 1
    out = scaled_attention(q, k, v, scaling=scaling, attn_mask=mask, row_mask=rows, key_gain=gain)
    for b in range(2):
        for h in range(4):
            z = (q[b, h].double() @ k[b, h // 2].double().T) * scaling
            for i in range(9):
                if rows[b, i]:
                    g = gain[b, h].double()
                    z[i] = torch.where(z[i] > 0, z[i] * (1 + g), z[i] * (1 - g))
            z = z.masked_fill(~mask[b, 0], float("-inf"))
            expected = torch.softmax(z, -1) @ v[b, h // 2].double()
            assert torch.allclose(out[b, h].double(), expected, atol=1e-5)
    ref = scaled_attention_ref(q, k, v, scaling=scaling, attn_mask=mask, row_mask=rows, key_gain=gain)
    assert torch.allclose(out, ref, atol=1e-5)


def test_key_gain_zero_is_plain_attention_and_chunks_agree(monkeypatch):
    from mmkit.kernels.score_mod import sdpa_impl

    q, k, v, rows, _, _, scaling = make()
    zero = torch.zeros(2, 4, 21)
    causal = torch.ones(9, 21).tril(12).bool()  # queries are the last 9 of 21 positions
    plain = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             attn_mask=causal, scale=scaling)
    assert torch.allclose(scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_gain=zero), plain, atol=1e-5)
    gain = _key_gain()
    whole = scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_gain=gain)
    monkeypatch.setattr(sdpa_impl, "CHUNK_ELEMENTS", 1)  # one query row per explicit chunk
    assert torch.allclose(scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_gain=gain), whole, atol=1e-6)
    with pytest.raises(ValueError, match="key_gain alone"):
        scaled_attention(q, k, v, scaling=scaling, key_bias=_key_bias(), key_gain=gain)
    with pytest.raises(ValueError, match="key_gain must be float"):
        scaled_attention(q, k, v, scaling=scaling, key_gain=gain[:, :2])


@pytest.mark.slow  # FlexAttention's first call on CPU sets up its tracing machinery
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_key_gain_mod_matches_reference_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from mmkit.kernels.score_mod.flex_impl import scaled_attention_flex

    q, k, v, rows, _, _, scaling = make()
    gain = _key_gain()
    out = scaled_attention_flex(q, k, v, scaling=scaling, allowed=None, boost=None, log_scale=None, compiled=False,
                                key_gain=(rows, gain))
    ref = scaled_attention_ref(q, k, v, scaling=scaling, row_mask=rows, key_gain=gain)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_flex_key_gain_matches_reference(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, rows, _, _, scaling = make(dtype=dtype, device="cuda")
    gain = _key_gain().cuda()
    out = scaled_attention(q, k, v, scaling=scaling, row_mask=rows, key_gain=gain)
    exact = scaled_attention_ref(q, k, v, scaling=scaling, row_mask=rows, key_gain=gain,
                                 compute_dtype=torch.float64).double()
    same = scaled_attention_ref(q, k, v, scaling=scaling, row_mask=rows, key_gain=gain, compute_dtype=dtype).double()
    err, torch_err = (out.double() - exact).abs().max().item(), (same - exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-5 * math.sqrt(q.shape[-1]), (err, torch_err)
