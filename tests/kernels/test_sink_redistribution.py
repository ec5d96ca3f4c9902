"""`redistributed_attention` (VAR's edit): the chunked op against the explicit reference and the formula."""

import pytest
import torch

from mmkit.kernels import redistributed_attention
from mmkit.kernels.sink_redistribution import op
from mmkit.kernels.sink_redistribution.ref import redistributed_attention_ref


def make(seed=0, b=2, h=4, hkv=2, n=9, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, n, d, generator=g) for x in (h, hkv, hkv))
    image = torch.zeros(b, n, dtype=torch.bool)
    image[:, 1:6] = True
    sink = torch.zeros(b, n, dtype=torch.bool)
    sink[:, 0] = True
    sink[:, 2] = True
    rows = torch.zeros(b, n, dtype=torch.bool)
    rows[:, 6:] = True
    return q, k, v, image, sink, rows


@pytest.mark.parametrize("chunk", [1 << 24, 1])
def test_op_matches_reference(monkeypatch, chunk):
    monkeypatch.setattr(op, "CHUNK_ELEMENTS", chunk)
    q, k, v, image, sink, rows = make()
    kwargs = dict(scaling=8 ** -0.5, image_keys=image, sink_keys=sink, row_mask=rows, p=0.5, rho=0.9,
                  min_visual=0.05)
    out, edited = redistributed_attention(q, k, v, attn_mask=None, **kwargs)
    ref, centric = redistributed_attention_ref(q, k, v, allowed=None, **kwargs)
    assert torch.allclose(out, ref, atol=1e-5)
    assert int(edited) == int(centric.sum()) > 0


def test_p_one_is_plain_attention():
    q, k, v, image, sink, rows = make(1)
    out, _ = redistributed_attention(q, k, v, scaling=8 ** -0.5, attn_mask=None, image_keys=image, sink_keys=sink,
                                     row_mask=rows, p=1.0, rho=0.9, min_visual=0.05)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, plain, atol=1e-5)


def test_bad_shapes_raise():
    q, k, v, image, sink, rows = make()
    with pytest.raises(ValueError, match="image_keys and sink_keys"):
        redistributed_attention(q, k, v, scaling=1.0, attn_mask=None, image_keys=image[:, :3], sink_keys=sink,
                                row_mask=rows, p=0.5, rho=0.5, min_visual=0.1)
