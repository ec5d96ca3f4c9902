"""Reduce visual tokens before the language model (vision-side pruning and merging, e.g. VisionZip, VFlowOpt).

How it works on LLaVA (no copied forward, no module swaps):

1. Vision side. `VisionLayerCapture` puts scoped forward hooks on one CLIP encoder layer and records, for the
   latest image encoding (`generate` encodes images before its prefill forward), that layer's q/k projections and its output (the hidden states LLaVA selects as image
   features when the layer is `vision_feature_layer`). A method ranks/merges tokens from these.
2. Projector. A forward pre-hook on `multi_modal_projector` hands the image features (I, N, C) about to be
   projected to the method's `plan_fn`, which returns a `ReductionPlan`: per image, which of its N tokens enter
   the LLM and in what order, plus optionally edited features (merged tokens are written into the slots they
   will occupy, so merging happens in the vision feature space, before the projector, as the papers do). The
   token count is unchanged here, so LLaVA's placeholder check still holds.
3. Language model. A forward pre-hook on `language_model` receives the `inputs_embeds` with the projected image
   features already scattered into the image-token positions, and replaces them (with the 2-D attention mask
   and position ids) by the reduced sequence: every text token, and each image's kept tokens in the plan's
   order inside that image's span. Rows that keep different numbers of tokens are left padded, so the reduced
   batch looks like an ordinary left-padded batch to the decoder.

Anyres models (LLaVA-NeXT, LLaVA-OneVision): the projector sees every tile of every image, and an image's tokens
are its tiles packed with unpadding and row newlines; a method plans per tile and says where each kept token goes
in the packed image (`ReductionPlan.placement`, built with `mmkit.patching.anyres`).

Qwen-VL (native resolution, `mmkit.patching.native`): there is no projector call per image grid to plan at, so
the plan is made in the language model's pre-hook, from the visual tokens already scattered into `inputs_embeds`
(the merger's output, images in prompt order; Qwen3-VL's DeepStack features ride along as extra channels so a
merge treats them like the tokens). Kept tokens keep their 3-D rotary positions from the prompt's rope index
(positions "original" only), and Qwen3-VL's `visual_pos_masks` / DeepStack rows follow the kept tokens.

Positions: "contiguous" renumbers the reduced sequence 0..m-1 (what feeding a shorter image to the LLM does,
VisionZip); "original" keeps each kept token's original position id (VFlowOpt).

Decoding: the generate loop keeps growing the original 2-D mask (prompt length n), while the KV cache holds the
m reduced prefill tokens. Each decoding step the mask is re-indexed to the reduced prefill mask followed by the
decoded part, and position ids are shifted by each row's number of removed positions ("contiguous"), so the
cache, mask and positions agree token for token. Static caches (4-D masks built by `generate`) are refused with
a clear error.

Context: while the decoder runs on the reduced sequence, `session.context.image_mask` / `.attention_mask` are
those of the reduced sequence (so LLM-side methods such as `TokenDropper` work in the coordinates they see) and
the context's per-prefill callbacks are run again; after the language model returns they are restored to the
prompt's, so statistics compare kept tokens with the prompt's visual tokens. Kept-token counts are recorded for
every decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from mmkit.patching.context import ForwardContext
from mmkit.patching.native import is_native

Positions = Literal["contiguous", "original"]


@dataclass
class ReductionPlan:
    """What enters the LLM for each image of the batch (images in feature order).

    order: (I, k) long, indices into each image's N feature tokens, in the order they take in the sequence.
    valid: (I, k) bool or None; False marks unused slots of images that keep fewer than k tokens.
    features: (I, N, C) edited pre-projector features (merged tokens written into their slots) or None.
    placement: for packed layouts (LLaVA-NeXT anyres: several tiles and row newlines per image), where the kept
        tokens go, as flat per-image-token tensors in prompt order (key, within, image, rank): see
        `sequence_selection_from_keys`. None: each image is one run of its N feature tokens in `order`.
    """

    order: torch.Tensor
    valid: torch.Tensor | None = None
    features: torch.Tensor | None = None
    placement: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


# plan_fn(features (I, N, C) about to be projected) -> ReductionPlan
PlanFn = Callable[[torch.Tensor], ReductionPlan]


ANYRES = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")


def check_supported(adapter, anyres: bool = False) -> None:
    """Raise a clear error for models whose image-token layout the pre-LLM reduction cannot map. `anyres`: the
    method places its tokens in LLaVA-NeXT's packed tiles itself (`ReductionPlan.placement`)."""
    allowed = ("LlavaForConditionalGeneration", *ANYRES) if anyres else ("LlavaForConditionalGeneration",)
    if adapter.architecture not in allowed:
        raise ValueError(
            f"vision-side token reduction supports LlavaForConditionalGeneration (LLaVA-1.5 layout) only; "
            f"{adapter.architecture} packs tiles and row newlines into its image tokens, use an LLM-side method "
            f"(fastv, pyramiddrop, sparsevlm) instead"
        )
    layer = adapter.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision-side token reduction needs a single vision_feature_layer, this model uses {layer}")


def vision_encoder_layers(adapter) -> torch.nn.ModuleList:
    tower = adapter.vision_tower
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "k_proj"):
        raise ValueError(f"vision tower {type(tower).__name__} has no CLIP-style encoder layers with q/k projections")
    return layers


def feature_layer_index(adapter) -> int:
    """Index of the vision encoder layer whose output LLaVA uses as image features (`vision_feature_layer`).

    `hidden_states[0]` is the embedding output and `hidden_states[i]` the output of layer i-1.
    """
    num = len(vision_encoder_layers(adapter))
    layer = adapter.vision_feature_layer
    hs_index = layer if layer >= 0 else num + 1 + layer
    if not 1 <= hs_index <= num:
        raise ValueError(f"vision_feature_layer={layer} does not select an encoder layer output (encoder has {num})")
    return hs_index - 1


def visual_tokens_per_image(adapter) -> int:
    """Image tokens one image (one tile, for anyres models) contributes: the patch grid, plus CLS for the "full"
    feature strategy of a tower that has one."""
    vc = adapter.config.vision_config
    n = (int(vc.image_size) // int(vc.patch_size)) ** 2
    return n if adapter.vision_feature_select_strategy == "default" or not adapter.has_cls_token else n + 1


class VisionLayerCapture:
    """Scoped hooks recording one vision encoder layer's q/k projections and output, and the pixel values, of
    the latest image encoding. `remove()` detaches them."""

    def __init__(self, adapter, layer_index: int, pixels: bool = False):
        layers = vision_encoder_layers(adapter)
        self.layer = layers[layer_index]
        self.attn = self.layer.self_attn
        self.num_heads = int(self.attn.num_heads)
        self.scale = float(self.attn.scale)
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.pixel_values: torch.Tensor | None = None
        self._handles = [
            self.attn.q_proj.register_forward_hook(self._store("q")),
            self.attn.k_proj.register_forward_hook(self._store("k")),
            self.layer.register_forward_hook(self._store("out")),
        ]
        if pixels:
            self._handles.append(adapter.vision_tower.register_forward_pre_hook(self._store_pixels, with_kwargs=True))

    def _store(self, name: str):
        def hook(module, args, output):
            setattr(self, name, output[0] if isinstance(output, tuple) else output)

        return hook

    def _store_pixels(self, module, args, kwargs):
        self.pixel_values = args[0] if args else kwargs.get("pixel_values")

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured (q, k, out), each (I, T, C), cleared so a stale capture is never reused."""
        if self.q is None or self.k is None or self.out is None:
            raise RuntimeError("the vision layer was not run in this prefill; cannot rank its tokens")
        q, k, out = self.q, self.k, self.out
        self.q = self.k = self.out = None
        return q, k, out

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(I, T, C) -> (I, H, T, D) float32."""
        i, t, c = x.shape
        return x.float().view(i, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def query_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention probabilities (I, H, Lq, T) of queries q (I, H, Lq, D) over keys k (I, H, T, D).

    CLIP's vision attention is unmasked, so this is exactly the row the layer computed (in float32).
    """
    return torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, dim=-1)


@dataclass
class ReducedPrefill:
    """What decode steps need to know about a prefill whose image tokens were reduced before the LLM."""

    keep: torch.Tensor           # (B, m) original positions of the reduced sequence
    mask: torch.Tensor           # (B, m) 2-D padding mask of the reduced prefill
    prompt_len: int              # n
    shift: torch.Tensor | None   # (B,) original - reduced position of the last prefill token (None: 3-D rotary)

    @property
    def removed(self) -> int:
        """How many fewer tokens the cache holds than the unreduced model's would."""
        return self.prompt_len - self.keep.shape[1]


def record_reduced_prefill(ctx, reduced_image: torch.Tensor, new_mask: torch.Tensor, keep: torch.Tensor,
                           has_mask: bool, num_layers: int):
    """Give the shared context the reduced prefill, so LLM-side methods reset their per-prefill state from the
    sequence they will see, and record its token counts on every layer. Returns what `ctx.restore_prefill` takes."""
    saved = ctx.replace_prefill(reduced_image, new_mask.long() if has_mask else None, positions=keep)
    visual, tokens = reduced_image.sum(1), new_mask.sum(1)
    for layer in range(num_layers):
        ctx.record_layer(layer, visual, tokens)
    return saved


def reduced_decode_kwargs(kwargs: dict, state: ReducedPrefill, rope3d: bool = False,
                          caller_positions: bool = False) -> dict:
    """A decode step's decoder kwargs after a reduced prefill: the mask continues the reduced prefill's, and the
    positions are those the unreduced model would use (`rope3d`: Qwen-VL's 3-D positions, which the model
    derives itself; `caller_positions`: the caller passed the prefill's positions, so decode ones are original)."""
    kwargs = dict(kwargs)
    embeds = kwargs["inputs_embeds"]
    q = embeds.shape[1]
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.shape[1] != state.prompt_len + past - state.keep.shape[1] + q:
            raise RuntimeError(f"decoding mask of length {mask.shape[1]} does not extend the {state.prompt_len}-token "
                               f"prompt by the cached and new tokens")
        kwargs["attention_mask"] = torch.cat([state.mask.to(mask.dtype), mask[:, state.prompt_len:]], dim=1)
    elif not bool(state.mask.bool().all()):
        extra = past + q - state.mask.shape[1]
        kwargs["attention_mask"] = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], extra)], 1)
    pos = kwargs.get("position_ids")
    if rope3d:
        if pos is not None and mask is None and not caller_positions:
            # The model numbered these tokens from the cache length, which holds `removed` fewer tokens than the
            # unreduced model's; with a mask (or positions from the caller) they are already the original ones.
            kwargs["position_ids"] = pos + state.removed
        return kwargs
    if pos is None:
        pos = (torch.arange(q, device=embeds.device) + past + state.removed)[None]
    kwargs["position_ids"] = pos.to(embeds.device) - state.shift[:, None]
    return kwargs


class PreLLMReducer:
    """Hooks that reduce the image tokens of every prefill per the plans of `plan_fn`; `remove()` detaches them.

    `after_reduce(reducer)` callbacks run once the reduced sequence is known (before the first decoder layer).
    """

    def __init__(self, session, plan_fn: PlanFn, positions: Positions = "contiguous", anyres: bool = False):
        if positions not in ("contiguous", "original"):
            raise ValueError(f"positions must be 'contiguous' or 'original', got {positions!r}")
        # Qwen-VL (native resolution): the plan is made in the language model's pre-hook from the visual tokens
        # already in `inputs_embeds` (see the module docstring); positions are the 3-D rotary ones of the prompt.
        self.native = is_native(session.adapter)
        if self.native and positions != "original":
            raise ValueError("on Qwen-VL models kept visual tokens keep their 3-D rotary positions (positions="
                             "'original')")
        if not self.native:
            check_supported(session.adapter, anyres=anyres)
        self.ctx: ForwardContext = session.context
        self.plan_fn = plan_fn
        self.positions = positions
        self.num_layers = session.adapter.num_layers
        self._plan: ReductionPlan | None = None
        self._tokens_per_image = 0
        self._decode: ReducedPrefill | None = None
        self._saved: tuple | None = None
        # Per slot of the reduced prefill: image index (-1 for text) and rank in that image's plan order.
        self.slot_image: torch.Tensor | None = None
        self.slot_rank: torch.Tensor | None = None
        self.after_reduce: list[Callable[["PreLLMReducer"], None]] = []
        model = session.model.model
        lm = session.adapter.language_model
        self._handles = [
            lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True),
            lm.register_forward_hook(self._lm_post_hook, with_kwargs=True),
        ]
        if not self.native:
            self._handles.append(model.multi_modal_projector.register_forward_pre_hook(self._projector_hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore_context()

    # -- projector ---------------------------------------------------------------------------------------------
    def _projector_hook(self, module, args):
        # Not gated on `ctx.prefill`: `generate` encodes the images before its prefill forward and passes them in
        # as `mm_encoder_outputs`. The plan waits for the next prefill of the language model.
        features = args[0]
        plan = self.plan_fn(features)
        if plan.order.dim() != 2 or plan.order.shape[0] != features.shape[0]:
            raise RuntimeError(f"plan order must be (images, k), got {tuple(plan.order.shape)}")
        self._plan = plan
        self._tokens_per_image = int(features.shape[1])
        if plan.features is not None:
            return (plan.features.to(features.dtype),) + tuple(args[1:])
        return None

    # -- language model ------------------------------------------------------------------------------------------
    def _lm_pre_hook(self, module, args, kwargs):
        if args:
            raise RuntimeError("the language model was called with positional inputs; pass inputs_embeds by keyword")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise RuntimeError(
                "vision-side token reduction does not support static KV caches or 4-D attention masks; "
                "use the default dynamic cache"
            )
        if self.ctx.prefill:
            self._decode = None
            plan, self._plan = self._plan, None
            image_mask = self.ctx.image_mask
            if image_mask is None or not bool(image_mask.any()):
                return None
            if self.native:
                plan, kwargs = self._native_plan(kwargs, image_mask)
            if plan is None:
                raise RuntimeError("image tokens reached the language model without a reduction plan "
                                   "(their features were not computed by this model's projector)")
            return args, self._reduce_prefill(kwargs, plan, image_mask)
        if self._decode is not None:
            return args, reduced_decode_kwargs(kwargs, self._decode)
        return None

    def _native_plan(self, kwargs: dict, image_mask: torch.Tensor) -> tuple[ReductionPlan, dict]:
        """Qwen-VL: plan from the batch's visual tokens (T, C) in prompt order, with Qwen3-VL's DeepStack features
        of the same tokens appended along the channels (a merge mixes them exactly as it mixes the tokens)."""
        embeds = kwargs["inputs_embeds"]
        mask = image_mask.to(embeds.device)
        deep = kwargs.get("deepstack_visual_embeds")
        visual = kwargs.get("visual_pos_masks")
        if visual is not None and not torch.equal(visual.to(mask.device), mask):
            raise RuntimeError("vision-side token reduction on Qwen-VL supports image inputs only, not videos")
        parts = [embeds[mask]] + [d.to(embeds.device) for d in (deep or [])]
        joined = torch.cat([p.to(embeds.dtype) for p in parts], dim=-1)
        plan = self.plan_fn(joined)
        if plan.placement is None:
            raise RuntimeError("a Qwen-VL reduction plan must place its tokens (ReductionPlan.placement)")
        if plan.features is not None:
            edited = torch.split(plan.features.to(embeds.dtype), [p.shape[-1] for p in parts], dim=-1)
            kwargs = dict(kwargs)
            embeds = embeds.clone()
            embeds[mask] = edited[0]
            kwargs["inputs_embeds"] = embeds
            if deep is not None:
                kwargs["deepstack_visual_embeds"] = [e.to(d.dtype) for e, d in zip(edited[1:], deep)]
        return plan, kwargs

    def _lm_post_hook(self, module, args, kwargs, output):
        self._restore_context()
        return None

    def _restore_context(self) -> None:
        if self._saved is not None:
            self.ctx.restore_prefill(self._saved)
            self._saved = None

    def _reduce_prefill(self, kwargs: dict, plan: ReductionPlan, image_mask: torch.Tensor) -> dict:
        embeds = kwargs["inputs_embeds"]
        device = embeds.device
        batch, n, d = embeds.shape
        image_mask = image_mask.to(device)
        if plan.placement is not None:
            keep, valid, slot_image, slot_rank = sequence_selection_from_keys(image_mask, *plan.placement)
        else:
            keep, valid, slot_image, slot_rank = sequence_selection(
                image_mask, plan.order.to(device), None if plan.valid is None else plan.valid.to(device),
                self._tokens_per_image,
            )
        m = keep.shape[1]
        mask2d = kwargs.get("attention_mask")
        had_mask = mask2d is not None
        full = mask2d.to(device).bool() if had_mask else torch.ones(batch, n, dtype=torch.bool, device=device)
        new_mask = full.gather(1, keep)
        if valid is not None:
            new_mask = new_mask & valid
        pos = kwargs.get("position_ids")
        pos_3d = None
        if pos is not None and pos.dim() == 3:
            # Qwen-VL's (3 or 4, B, n) rotary positions (4: text positions first, as `generate` passes them): every
            # kept token keeps its position on every axis ("original" is enforced for these models).
            pos = pos.to(device)
            pos_3d = pos.gather(2, keep[None].expand(pos.shape[0], batch, m))
            pos = pos[-1]
        pos = torch.arange(n, device=device)[None].expand(batch, n) if pos is None else pos.to(device).expand(batch, n)
        kept_pos = pos.gather(1, keep)
        if self.positions == "original":
            new_pos = kept_pos
        else:
            # Real kept tokens are renumbered consecutively from the row's first real position; padding keeps
            # whatever it had (it is masked).
            start = torch.where(full, pos, torch.full_like(pos, torch.iinfo(pos.dtype).max)).min(1).values
            new_pos = torch.where(new_mask, start[:, None] + new_mask.long().cumsum(1) - 1, kept_pos)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = embeds.gather(1, keep[..., None].expand(batch, m, d))
        # Always pass a 2-D mask: with gaps in the position ids and no mask, transformers would take the rows for
        # packed sequences. An all-ones mask is turned into SDPA's is_causal path exactly like no mask.
        kwargs["attention_mask"] = new_mask.to(mask2d.dtype) if had_mask else new_mask.long()
        kwargs["position_ids"] = new_pos if pos_3d is None else pos_3d
        if self.native and kwargs.get("deepstack_visual_embeds") is not None:
            # Qwen3-VL adds each visual token's DeepStack features at its position after the first decoder layers:
            # keep the kept tokens' rows, in the reduced sequence's order.
            flat_index = (image_mask.reshape(-1).long().cumsum(0) - 1).view(batch, n)
            visual_slots = image_mask.gather(1, keep) & new_mask
            rows = flat_index.gather(1, keep)[visual_slots]
            kwargs["deepstack_visual_embeds"] = [d[rows.to(d.device)] for d in kwargs["deepstack_visual_embeds"]]
            kwargs["visual_pos_masks"] = visual_slots
        self._decode = ReducedPrefill(keep=keep, mask=kwargs["attention_mask"], prompt_len=n,
                                      shift=pos[:, -1] - new_pos[:, -1])
        self.slot_image, self.slot_rank = slot_image, slot_rank
        self._saved = record_reduced_prefill(self.ctx, image_mask.gather(1, keep) & new_mask, new_mask, keep,
                                             had_mask or valid is not None, self.num_layers)
        for callback in list(self.after_reduce):
            callback(self)
        return kwargs

    # -- helpers for methods ---------------------------------------------------------------------------------------
    def gather_image_values(self, values: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
        """Map per-image values (I, k), aligned with the last plan's order, to the reduced prefill (B, m);
        text and padding slots get `fill`."""
        if self.slot_image is None:
            raise RuntimeError("no reduced prefill yet")
        img = self.slot_image.clamp(min=0)
        rank = self.slot_rank.clamp(min=0)
        out = values.to(img.device)[img, rank].float()
        return torch.where(self.slot_image >= 0, out, torch.full_like(out, fill))


def sequence_selection(image_mask: torch.Tensor, order: torch.Tensor, valid: torch.Tensor | None,
                       tokens_per_image: int):
    """Reduced-sequence layout from per-image plans.

    image_mask (B, n): image-token positions (each image is a run of `tokens_per_image` tokens, images in
    row-major order). Returns keep (B, m) original positions (left padded: padded slots first), valid (B, m) or
    None, and per slot the image index and plan rank (-1 for non-image slots).
    """
    device = image_mask.device
    n_images, k = order.shape
    total = int(image_mask.sum())
    if total != n_images * tokens_per_image:
        raise RuntimeError(
            f"{total} image tokens in the prompt but {n_images} images of {tokens_per_image} features; "
            f"each image must be one run of {tokens_per_image} tokens"
        )
    # rank_table[i, j] = slot of token j of image i in the plan order, -1 if dropped.
    plan_ok = torch.ones_like(order, dtype=torch.bool) if valid is None else valid
    # Unused plan slots scatter into a spare last column, dropped afterwards.
    rank_table = torch.full((n_images, tokens_per_image + 1), -1, dtype=torch.long, device=device)
    ranks = torch.arange(k, device=device).expand(n_images, k)
    rank_table.scatter_(1, torch.where(plan_ok, order, tokens_per_image), ranks)
    rank_table = rank_table[:, :tokens_per_image]
    key = rank_table.reshape(-1)
    span = torch.arange(n_images, device=device).repeat_interleave(tokens_per_image)
    within = torch.arange(tokens_per_image, device=device).repeat(n_images)
    return sequence_selection_from_keys(image_mask, key, within, span, key)


def sequence_selection_from_keys(image_mask: torch.Tensor, key: torch.Tensor, within: torch.Tensor,
                                 token_image: torch.Tensor, token_rank: torch.Tensor):
    """Reduced-sequence layout from a key per image token.

    The image tokens of the batch are taken in row-major order; for each: `key` its place among its image's kept
    tokens (0, 1, ... distinct within an image; -1 = dropped), `within` its offset in its image's run of tokens,
    and the image index / plan rank reported for its slot (-1 for none). Kept tokens stay inside their image's
    span (text order and the image's place in the prompt are kept). Returns keep (B, m) original positions (left
    padded: padded slots first), valid (B, m) or None, and per slot the image index and plan rank (-1 for
    non-image slots).
    """
    batch, n = image_mask.shape
    device = image_mask.device
    flat = image_mask.reshape(-1)
    if int(flat.sum()) != key.numel():
        raise RuntimeError(f"{int(flat.sum())} image tokens in the prompt but the plan places {key.numel()}")

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((batch * n,), fill, dtype=torch.long, device=device)
        out[flat] = values.to(device)
        return out.view(batch, n)

    rank = scatter(key, -1)
    within_pos = scatter(within, 0)
    image_id = scatter(token_image, -1)
    plan_rank = scatter(token_rank, -1)
    pos = torch.arange(n, device=device)[None].expand(batch, n)
    big = torch.iinfo(torch.long).max
    # Kept image token: placed at its image's start + its key.
    sort_key = torch.where(image_mask, torch.where(rank >= 0, pos - within_pos + rank, big), pos)
    order_idx = torch.sort(sort_key, dim=1, stable=True).indices
    per_row = (sort_key != big).sum(1)
    m = int(per_row.max())  # one host read per prefill: the reduced length sets tensor shapes
    chosen = order_idx[:, :m]
    slot_ok = torch.arange(m, device=device)[None, :] < per_row[:, None]
    # Padded slots first, like left padding: the last slot stays each row's last real token.
    perm = torch.sort(torch.where(slot_ok, torch.arange(m, device=device), torch.arange(m, device=device) - m),
                      dim=1).indices
    keep = chosen.gather(1, perm)
    slot_ok = slot_ok.gather(1, perm)
    is_image = image_mask.gather(1, keep) & slot_ok
    slot_image = torch.where(is_image, image_id.gather(1, keep), -1)
    slot_rank = torch.where(is_image, plan_rank.gather(1, keep), -1)
    return keep, (None if bool(slot_ok.all()) else slot_ok), slot_image, slot_rank
