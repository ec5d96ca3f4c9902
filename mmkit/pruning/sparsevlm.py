"""SparseVLM (Zhang et al., ICML 2025): text-guided visual-token sparsification with token recycling.

Text raters. From the decoder's input embeddings, each text token after the image (the instruction and the chat
suffix) gets a relevance r_t = mean over visual tokens v of softmax_t(<h_v, h_t>); the raters are the text tokens
with r_t above the row's mean relevance (all text tokens if none is, the last prompt token if the row has no
text after its image).

Staged sparsification. At each scoring layer l (default 2, 6, 15 of 32), every visual token is scored by the
attention the raters give it in layer l (mean over heads and raters; only the rater rows are computed, exactly,
from that layer's own q/k while the layer runs its own attention). From layer l + 1 on only the top visual tokens stay: after
stage s a row keeps round(keep[s] * N) of its N original image tokens (the paper's 300/200/110-of-576 schedule,
i.e. its "192 tokens" average budget, is the default; its "128" and "64" settings are 303/110/36 and 66/30/17).

Recycling (as the official code). Of the visual tokens dropped at a stage, the int(0.3 n) + 1 best-scored are
clustered into int(k / 10) + 1 groups by density-peak clustering (DPC-KNN) on their hidden states, and each group
is merged into one token, the mean of its members. The merged token has to live at some position of the
sequence: it is written into the group's centre token (the density peak), which is kept instead of dropped.
Merged tokens count as visual tokens, so a row carries top-k plus the number of groups after a stage, and later
stages may drop or re-merge them. Clustering breaks ties by position instead of the official random noise, so
results are deterministic.

Rank-adaptive budget (`budget="rank"`, the paper's sparsification-level adaptation as the released v1 code runs it).
At each scoring layer the raters' head-mean attention over the row's current visual tokens is a matrix P (raters x
L_v); its rank measures how many independent directions the text asks of the image. A row keeps
min(int(rank_scale * rank(P) + rank_bias), L_v - 1) visual tokens, or all of them (no drop, no recycling) when P has
full column rank (rank = L_v). The official scripts use scale/bias 13.5/0 ("192" tokens, MME), 9/6 ("128", POPE) and
0.8/0 ("64", TextVQA); 13.5/0 are the defaults. The rank is torch.linalg.matrix_rank of P in float32 with its
default tolerance, as the official code calls it.

Differences from the official code: kept tokens keep their original positions (the official code renumbers them
after each drop); batches with different images and prompts are supported (the official code is batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.patching.token_drop import Selection, TokenDropper, keep_top_visual, layer_hidden, with_layer_hidden
from mmkit.registry import register_method

PAPER_LAYERS_32 = (2, 6, 15)  # scoring layers of the official code, for a 32-layer decoder
RECYCLE_SHARE = 0.3           # share of the dropped tokens that is recycled
TOKENS_PER_CLUSTER = 10
PAPER_KEEP = (300 / 576, 200 / 576, 110 / 576)
# Official v1 scripts: scale 13.5 / bias 0 for the "192 tokens" setting (9 / 6 for "128", 0.8 / 0 for "64").
PAPER_RANK_SCALE = 13.5
PAPER_RANK_BIAS = 0.0


@dataclass
class SparseVLMConfig:
    """SparseVLM: visual tokens ranked by text-rater attention at a few layers, with merged recycling."""

    layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "scoring layers, one per stage: the rater attention of layer l ranks the visual tokens "
                          "and layers > l see the kept ones; None = 2/6/15 scaled to the model depth (of 32)"},
    )
    keep: tuple[float, ...] = field(
        default=PAPER_KEEP,
        metadata={"help": "fraction of each row's original image tokens kept after each stage (before recycling); "
                          "paper budgets for 576 tokens: 192 = 300/200/110, 128 = 303/110/36, 64 = 66/30/17"},
    )
    recycle: bool = field(default=True, metadata={"help": "merge the best-scored dropped tokens into carriers"})
    budget: Literal["schedule", "rank"] = field(
        default="schedule",
        metadata={"help": "how many visual tokens a stage keeps: the fixed `keep` schedule, or rank-adaptive "
                          "(int(rank_scale * rank(P) + rank_bias), P the raters x visual-tokens attention)"},
    )
    rank_scale: float = field(default=PAPER_RANK_SCALE,
                              metadata={"help": "budget=rank: visual tokens kept per unit of rank (official 13.5 / "
                                                "9 / 0.8 for its 192 / 128 / 64 settings)"})
    rank_bias: float = field(default=PAPER_RANK_BIAS,
                             metadata={"help": "budget=rank: tokens added to rank_scale * rank (official 0 / 6 / 0)"})

    def __post_init__(self):
        if self.budget not in ("schedule", "rank"):
            raise ValueError(f"budget must be schedule or rank, got {self.budget!r}")
        for name in ("rank_scale", "rank_bias"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if self.rank_scale <= 0:
            raise ValueError(f"rank_scale must be > 0, got {self.rank_scale!r}")
        if self.rank_bias < 0:
            raise ValueError(f"rank_bias must be >= 0, got {self.rank_bias!r}")
        if self.budget == "schedule" and (self.rank_scale, self.rank_bias) != (PAPER_RANK_SCALE, PAPER_RANK_BIAS):
            raise ValueError("rank_scale and rank_bias only apply with budget=rank")
        keep = tuple(self.keep) if isinstance(self.keep, (tuple, list)) else (self.keep,)
        if not keep:
            raise ValueError("keep must give at least one stage fraction, e.g. keep=0.5/0.35/0.2")
        for k in keep:
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < float(k) <= 1.0:
                raise ValueError(f"keep fractions must be in (0, 1], got {self.keep!r}")
        keep = tuple(float(k) for k in keep)
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"keep fractions must not increase from stage to stage, got {self.keep!r}")
        self.keep = keep
        if not isinstance(self.recycle, bool):
            raise ValueError(f"recycle must be true or false, got {self.recycle!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ValueError(f"layers must be integers >= 0, got {self.layers!r}")
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"layers must be strictly increasing, got {self.layers!r}")
            self.layers = layers
        if self.budget == "rank":
            # The rank sets every stage's count; a schedule given alongside would be silently ignored.
            if keep != PAPER_KEEP:
                raise ValueError("keep is the fixed schedule; with budget=rank set rank_scale/rank_bias instead")
            return
        if self.layers is not None and len(self.layers) != len(keep):
            raise ValueError(f"layers ({len(self.layers)} stages) and keep ({len(keep)} stages) must have equal "
                             f"length")
        if self.layers is None and len(keep) != len(PAPER_LAYERS_32):
            raise ValueError(f"with {len(keep)} keep stages give layers=... too (the default has 3 stages)")

    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        """Scoring layers for an `num_layers`-deep decoder; each must leave a later layer to drop tokens at."""
        if self.layers is not None:
            if self.layers[-1] > num_layers - 2:
                raise ValueError(
                    f"sparsevlm layers={'/'.join(map(str, self.layers))}: the last scoring layer must be <= "
                    f"{num_layers - 2} for this {num_layers}-layer model (tokens are dropped after it)"
                )
            return self.layers
        layers = tuple(min(math.floor(l * num_layers / 32 + 0.5), num_layers - 2) for l in PAPER_LAYERS_32)
        if len(set(layers)) != len(layers) or layers[0] < 0:
            raise ValueError(f"a {num_layers}-layer decoder is too shallow for the default stages; set layers=...")
        return layers


def stage_keep_count(n_image: torch.Tensor, fraction: float) -> torch.Tensor:
    """round(fraction * n_image) per row (halves round up): 300/576 of 576 tokens is 300."""
    return torch.floor(n_image.double() * fraction + 0.5).long()


def rank_keep_count(rank: int, n_visual: int, scale: float, bias: float) -> int:
    """Visual tokens a row keeps under budget=rank: all of them when the rater attention has full column rank,
    else min(int(scale * rank + bias), n_visual - 1), as the official v1 code."""
    if rank >= n_visual:
        return n_visual
    return max(min(int(rank * scale + bias), n_visual - 1), 0)


def recycle_sizes(n_dropped: int) -> tuple[int, int]:
    """(tokens recycled, groups formed) for `n_dropped` tokens dropped at a stage, as the official code."""
    if n_dropped <= 0:
        return 0, 0
    pool = min(int(n_dropped * RECYCLE_SHARE) + 1, n_dropped)
    return pool, min(pool // TOKENS_PER_CLUSTER + 1, pool)


def _pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, ascending, padded to the longest row: (index (B, m), ok (B, m))."""
    counts = mask.sum(1)
    m = max(int(counts.max()), 1) if mask.shape[0] else 1
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m]
    ok = torch.arange(m, device=mask.device)[None, :] < counts[:, None]
    return order, ok


def text_raters(hidden: torch.Tensor, image_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool (B, n): the rater tokens of each row (see the module docstring).

    hidden: (B, n, d) input embeddings; image_mask: (B, n); attention_mask: (B, n) padding mask or None.
    """
    batch, n, _ = hidden.shape
    device = hidden.device
    real = torch.ones(batch, n, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    pos = torch.arange(n, device=device)
    last_image = torch.where(image_mask, pos, -1).max(1).values
    text = (pos[None, :] > last_image[:, None]) & real & ~image_mask
    vidx, vok = _pack(image_mask & real)
    tidx, tok = _pack(text)
    vis = hidden.gather(1, vidx[..., None].expand(*vidx.shape, hidden.shape[2])).float()
    txt = hidden.gather(1, tidx[..., None].expand(*tidx.shape, hidden.shape[2])).float()
    sim = (vis @ txt.transpose(1, 2)).masked_fill(~tok[:, None, :], float("-inf"))  # (B, Nv, Nt)
    prob = torch.nan_to_num(sim.softmax(-1), nan=0.0) * vok[..., None]
    relevance = prob.sum(1) / vok.sum(1, keepdim=True).clamp(min=1)                  # (B, Nt)
    mean = (relevance * tok).sum(1, keepdim=True) / tok.sum(1, keepdim=True).clamp(min=1)
    chosen = (relevance > mean) & tok
    chosen = torch.where(chosen.any(1, keepdim=True), chosen, tok)
    raters = torch.zeros(batch, n, dtype=torch.bool, device=device)
    raters.scatter_(1, tidx, chosen)
    # A row without text after its image still needs one rater: its last (real, left-padded) token.
    raters[:, -1] |= ~raters.any(1)
    return raters


def density_peak_clusters(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN as the official `cluster_and_merge`: (centres (k,), assignment (M,)) for points x (M, d).

    Ties are broken by position instead of random noise, so the result is deterministic.
    """
    m, dim = x.shape
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(dim)
    nearest = dist.topk(n_clusters, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    rank = torch.empty(m, dtype=torch.long, device=x.device)
    rank[torch.sort(density, stable=True).indices] = torch.arange(m, device=x.device)
    denser = rank[None, :] > rank[:, None]
    parent_dist = torch.where(denser, dist, dist.max()).min(-1).values
    centres = torch.sort(parent_dist * density, descending=True, stable=True).indices[:n_clusters]
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return centres, assign


class SparseVLMHandle:
    def __init__(self, session, config: SparseVLMConfig):
        self.config = config
        adapter = session.adapter
        self.layers = config.scoring_layers(adapter.num_layers)
        self._ctx = session.context
        self._raters: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, R) original positions, (B, R) ok
        self._scores: dict[int, torch.Tensor] = {}
        self._rank_keep: dict[int, torch.Tensor] = {}  # budget=rank: (B,) visual tokens each row keeps, per layer
        # budget=rank, last prefill: (B,) rank of each row's rater attention, per scoring layer (for inspection).
        self.last_ranks: dict[int, torch.Tensor] = {}
        self._carriers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        layers = adapter.decoder_layers
        self._handles = [layers[0].register_forward_pre_hook(self._find_raters, with_kwargs=True)]
        self._observers = [session.probe.observe(self.layers, self._observe)]
        schedule = {l + 1: self._make_selector(stage, l) for stage, l in enumerate(self.layers)}
        self.dropper = TokenDropper(session.context, layers, schedule)
        # Registered after the dropper's hooks, so they receive the already gathered hidden states.
        self._handles += [
            layers[l + 1].register_forward_pre_hook(self._make_writer(l + 1), with_kwargs=True) for l in self.layers
        ]
        session.context.on_prefill(id(self), self._reset)

    def _reset(self, ctx) -> None:
        self._raters = None
        self._scores.clear()
        self._rank_keep.clear()
        self.last_ranks.clear()
        self._carriers.clear()

    # -- raters and scores ---------------------------------------------------------------------------------
    def _find_raters(self, module, args, kwargs):
        if not self._ctx.prefill:
            return None
        hidden = layer_hidden(args, kwargs)
        attention_mask = self._ctx.attention_mask
        raters = text_raters(hidden, self._ctx.image_mask.to(hidden.device),
                             None if attention_mask is None else attention_mask.to(hidden.device))
        idx, ok = _pack(raters)
        # Padded rater slots repeat the row's last rater; the observer masks them to contribute nothing.
        last = idx.gather(1, (ok.sum(1, keepdim=True) - 1).clamp(min=0))
        idx = torch.where(ok, idx, last)
        if self._ctx.llm_positions is not None:  # a pre-LLM reduction shortened the sequence: prompt positions
            idx = self._ctx.llm_positions.to(idx.device).gather(1, idx)
        self._raters = (idx, ok)
        return None

    def _observe(self, view) -> None:
        if not view.prefill:
            return
        if self.config.budget == "rank":
            self._scores[view.layer] = self._rank_budget(view)
        else:
            self._scores[view.layer] = self._rater_attention(view)

    def _rater_rows(self, view) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rows (B, R) holding the raters in this layer's sequence, and which of them are real (B, R)."""
        if self._raters is None:
            raise RuntimeError("sparsevlm: text raters were not computed for this prefill")
        positions, ok = (t.to(view.query.device) for t in self._raters)
        # Raters are text tokens, which no method drops: find the rows that hold them in this layer's sequence.
        rows, found = view.rows_of_positions(positions)
        return rows, ok & found

    def _rater_attention(self, view) -> torch.Tensor:
        """Mean attention (B, n_cur) the raters give each current token (exact softmax over allowed keys)."""
        rows, ok = self._rater_rows(view)
        # A padded rater row adds nothing to any visual token.
        mass = view.mass(rows, row_valid=ok, reduce="sum")
        # Keys past the current sequence are empty slots of a static cache.
        return mass[:, : view.query.shape[2]] / ok.sum(1, keepdim=True).clamp(min=1)

    def _rank_budget(self, view) -> torch.Tensor:
        """budget=rank: the rater scores as `_rater_attention`, and each row's keep count from the rank of its
        (raters x current visual tokens) head-mean attention matrix."""
        rows, ok = self._rater_rows(view)
        n_cur = view.query.shape[2]
        # The individual rater rows are needed for the rank: (B, R, n_cur), mean over heads. R is a few dozen.
        probs = view.mass(rows, row_valid=ok, reduce="none").mean(1)[..., :n_cur]
        image = view.image_keys[:, :n_cur]
        ranks, keep = [], []
        for b in range(probs.shape[0]):  # rows differ in raters and visual tokens
            matrix = probs[b][ok[b]][:, image[b]]
            n_visual = int(matrix.shape[1])
            rank = int(torch.linalg.matrix_rank(matrix.float())) if matrix.numel() else 0
            ranks.append(rank)
            keep.append(rank_keep_count(rank, n_visual, self.config.rank_scale, self.config.rank_bias))
        device = probs.device
        self.last_ranks[view.layer] = torch.tensor(ranks, device=device)
        self._rank_keep[view.layer] = torch.tensor(keep, device=device)
        return probs.sum(1) / ok.sum(1, keepdim=True).clamp(min=1)

    # -- selection and recycling ---------------------------------------------------------------------------
    def _make_selector(self, stage: int, scoring_layer: int):
        def select(layer_idx: int, hidden: torch.Tensor, image_mask: torch.Tensor,
                   valid: torch.Tensor | None) -> Selection:
            scores = self._scores.pop(scoring_layer, None)
            if scores is None:
                raise RuntimeError(f"sparsevlm: no rater attention was recorded at layer {scoring_layer}")
            is_image = image_mask if valid is None else image_mask & valid
            if self.config.budget == "rank":
                keep = self._rank_keep.pop(scoring_layer).to(hidden.device)
            else:
                n_original = self._ctx.image_mask.to(hidden.device).sum(1)
                keep = stage_keep_count(n_original, self.config.keep[stage])
            keep = torch.minimum(keep, is_image.sum(1))
            if not self.config.recycle:
                return keep_top_visual(scores, image_mask, keep, valid)
            return self._select_and_recycle(layer_idx, hidden, scores, image_mask, is_image, keep, valid)

        return select

    def _select_and_recycle(self, layer_idx, hidden, scores, image_mask, is_image, keep, valid) -> Selection:
        batch = hidden.shape[0]
        carriers, merged = [], []
        for b, k in enumerate(keep.tolist()):  # rows differ in sizes; clustering is per row
            positions = is_image[b].nonzero().squeeze(1)
            # Same order and tie rule as keep_top_visual: score descending, earlier position first.
            order = torch.sort(scores[b, positions].float(), descending=True, stable=True).indices
            dropped = positions[order[k:]]
            pool, groups = recycle_sizes(dropped.numel())
            if groups == 0:
                carriers.append(dropped[:0])
                merged.append(hidden.new_zeros(0, hidden.shape[2]))
                continue
            members = dropped[:pool]
            x = hidden[b, members].float()
            centres, assign = density_peak_clusters(x, groups)
            # Group means as a (groups, M) averaging matrix: one small matmul, no scatter.
            onehot = (assign[None, :] == torch.arange(groups, device=x.device)[:, None]).float()
            means = (onehot / onehot.sum(1, keepdim=True).clamp(min=1)) @ x
            carriers.append(members[centres])
            merged.append(means.to(hidden.dtype))
        n_groups = torch.tensor([c.numel() for c in carriers], device=hidden.device)
        if int(n_groups.max()) == 0:
            return keep_top_visual(scores, image_mask, keep, valid)
        width = int(n_groups.max())
        carrier_idx = torch.zeros(batch, width, dtype=torch.long, device=hidden.device)
        carrier_ok = torch.arange(width, device=hidden.device)[None, :] < n_groups[:, None]
        values = hidden.new_zeros(batch, width, hidden.shape[2])
        for b, (c, v) in enumerate(zip(carriers, merged)):
            carrier_idx[b, : c.numel()] = c
            values[b, : c.numel()] = v
        # Carriers rank above every other visual token, so the top-k plus the carriers survive.
        boosted = scores.float().clone()
        rows = torch.arange(batch, device=hidden.device)[:, None].expand_as(carrier_idx)
        boosted[rows[carrier_ok], carrier_idx[carrier_ok]] = torch.finfo(torch.float32).max
        selection = keep_top_visual(boosted, image_mask, keep + n_groups, valid)
        # Where each carrier sits in the kept sequence, for the writer hook.
        m = selection.keep.shape[1]
        new_position = torch.full_like(scores, -1, dtype=torch.long)
        new_position.scatter_(1, selection.keep, torch.arange(m, device=hidden.device).expand(batch, m))
        self._carriers[layer_idx] = (new_position.gather(1, carrier_idx), values, carrier_ok)
        return selection

    def _make_writer(self, layer_idx: int):
        def write(module, args, kwargs):
            pending = self._carriers.pop(layer_idx, None) if self._ctx.prefill else None
            if pending is None:
                return None
            position, values, ok = pending
            hidden = layer_hidden(args, kwargs)
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(position)
            # Out of place: the dropper's gathered tensor is not shared, but a copy keeps that an implementation
            # detail of the dropper rather than an assumption here.
            hidden = hidden.index_put((rows[ok], position[ok]), values[ok])
            return with_layer_hidden(args, kwargs, hidden)

        return write

    def remove(self) -> None:
        self.dropper.remove()
        for handle in self._handles + self._observers:
            handle.remove()
        self._handles, self._observers = [], []
        self._ctx.drop_callback(id(self))
        self._reset(self._ctx)


def apply_sparsevlm(session, config: SparseVLMConfig) -> SparseVLMHandle:
    """Attach SparseVLM to a session's model; `remove()` on the result restores it exactly."""
    return SparseVLMHandle(session, config)


register_method(
    "sparsevlm", SparseVLMConfig, apply_sparsevlm, kind="pruning",
    description="Text-rater-guided visual-token pruning at three layers with merged recycling (ICML'25).",
    slots=("llm_token_drop",),
)
