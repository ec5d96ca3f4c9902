"""topk_compact / gather_tokens against a per-row Python reference; determinism, padding, overflow."""

import pytest
import torch

from mmkit.kernels import gather_tokens, kept_count, topk_compact


def brute_force(scores, cand, keep):
    """Per row: sorted list of non-candidates + the `keep` best candidates (ties -> lower index)."""
    rows = []
    for b in range(scores.shape[0]):
        keep_b = int(keep[b]) if isinstance(keep, torch.Tensor) else keep
        c = [i for i in range(scores.shape[1]) if cand[b, i]]
        best = sorted(c, key=lambda i: (-float(scores[b, i]), i))[:keep_b]
        rows.append(sorted([i for i in range(scores.shape[1]) if not cand[b, i]] + best))
    return rows


def check(result, expected):
    for b, want in enumerate(expected):
        got = result.index[b][result.valid[b]].tolist()
        assert got == want
        assert result.valid[b].tolist() == [True] * len(want) + [False] * (result.index.shape[1] - len(want))
        assert int(result.kept[b]) == len(want)


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_with_ties_and_ragged_rows(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (3, 40), generator=g).float()  # many ties
    cand = torch.rand(3, 40, generator=g) > 0.4
    keep = torch.tensor([3, 0, 50])
    result = topk_compact(scores, cand, keep)
    check(result, brute_force(scores, cand, keep))
    assert not result.overflow.any()
    assert result.index.shape[1] == max(len(r) for r in brute_force(scores, cand, keep))


def test_equal_rows_need_no_padding_and_out_len_from_host_counts():
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.9, 0.2, 0.3], [1.0, 2, 3, 4, 5, 6]])
    cand = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out_len = kept_count(6, 4, 2)
    result = topk_compact(scores, cand, 2, out_len=out_len)
    assert result.index.tolist() == [[0, 2, 3, 5], [2, 3, 4, 5]]  # tie 0.9/0.9 keeps both; row 1 keeps 3, 4
    assert result.valid.all() and not result.overflow.any()


def test_nan_scores_rank_last_and_scores_of_non_candidates_are_ignored():
    scores = torch.tensor([[float("nan"), 0.1, 0.2, -5.0]])
    cand = torch.tensor([[True, True, True, False]])
    assert topk_compact(scores, cand, 2).index.tolist() == [[1, 2, 3]]


def test_overflow_drops_lowest_candidates_first():
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0]])
    cand = torch.tensor([[False, True, True, True, False]])
    result = topk_compact(scores, cand, 3, out_len=4)
    assert result.index.tolist() == [[0, 1, 3, 4]] and result.overflow.tolist() == [True]


def test_deterministic_and_stays_on_device():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 100), generator=g).half()
    cand = torch.rand(4, 100, generator=g) > 0.2
    a = topk_compact(scores, cand, 10, out_len=100)
    b = topk_compact(scores, cand, 10, out_len=100)
    assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)
    assert a.index.dtype == torch.long and a.index.device == scores.device


def test_gather_tokens_broadcasts_batch_one_tables():
    index = torch.tensor([[0, 2], [1, 3]])
    hidden = torch.arange(2 * 4 * 3).view(2, 4, 3)
    assert torch.equal(gather_tokens(hidden, index), torch.stack([hidden[0, [0, 2]], hidden[1, [1, 3]]]))
    pos = torch.arange(4)[None]
    assert gather_tokens(pos, index).tolist() == [[0, 2], [1, 3]]
    cos = torch.randn(1, 4, 8)
    assert torch.equal(gather_tokens(cos, index)[1], cos[0, [1, 3]])
    mask = torch.randn(2, 1, 4, 4)
    assert torch.equal(gather_tokens(mask, index, dim=-1)[0, 0], mask[0, 0][:, [0, 2]])


@pytest.mark.parametrize("call, match", [
    (lambda: topk_compact(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool), 1), r"must both be \(B, L\)"),
    (lambda: topk_compact(torch.zeros(2, 3), torch.zeros(2, 3), 1), "must be bool"),
    (lambda: topk_compact(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), -1), "keep must be >= 0"),
    (lambda: topk_compact(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), 1, out_len=4), "out_len"),
    (lambda: gather_tokens(torch.zeros(3, 4), torch.zeros(2, 2, dtype=torch.long)), "batch 3"),
    (lambda: kept_count(4, 5, 1), "num_candidates"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.gpu
def test_gpu_no_host_sync_and_matches_cpu():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 50, (8, 651), generator=g).float()
    cand = torch.zeros(8, 651, dtype=torch.bool)
    cand[:, 35:611] = True
    cpu = topk_compact(scores, cand, 58, out_len=kept_count(651, 576, 58))
    s, c = scores.cuda(), cand.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host read raises
    try:
        gpu = topk_compact(s, c, 58, out_len=kept_count(651, 576, 58))
        hidden = gather_tokens(torch.randn(8, 651, 64, device="cuda"), gpu.index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert hidden.shape == (8, 133, 64)
    assert torch.equal(gpu.index.cpu(), cpu.index) and torch.equal(gpu.valid.cpu(), cpu.valid)
