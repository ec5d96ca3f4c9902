"""See what a pruning method keeps: the image patches each decoder layer read for one prompt, drawn over the image.

Method-agnostic: scoped hooks (removed before returning) watch one prefill.
- At the language model's input, before any method's hook (`prepend`), the prompt's embeddings; after them, the
  (possibly reduced) sequence the decoder gets and its position ids. A reduced-sequence row that equals a prompt
  image row exactly is that patch (pruned methods); one that equals no prompt row is a merged token (VisionZip's
  contextual tokens when merged after the projector, pooling), and the patches whose most similar token (cosine)
  among those the layer reads is a merged one are drawn as represented through a merge. (VisionZip merges before
  the projector, so its contextual tokens show as the slot they occupy.)
- At every decoder layer, after the methods' hooks, the position ids the layer runs on: in-LLM methods drop tokens
  but keep their positions, so a layer's positions say which of the decoder's input tokens it still reads.
For multi-branch methods (VCD, AGLA) the original branch (row 0) is shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmkit.atomic import atomic_path

DROPPED, KEPT, MERGED = 0, 1, 2


@dataclass
class KeptPatches:
    """image: the model's view of the image (PIL, what the vision tower saw); grid: patches per side;
    layers: per decoder layer, (grid * grid,) status of each patch (DROPPED, KEPT, MERGED)."""

    image: object
    grid: int
    layers: list[torch.Tensor]
    methods: list[str]
    prompt: str

    def kept_counts(self) -> list[int]:
        """Patches each layer reads as themselves (merged tokens not counted)."""
        return [int((s == KEPT).sum()) for s in self.layers]


def _model_view(session, pixel_values: torch.Tensor):
    """The image as the vision tower saw it (pixel values de-normalised), as a PIL image."""
    from PIL import Image

    proc = getattr(session.processor, "image_processor", None)
    mean = torch.tensor(getattr(proc, "image_mean", [0.5, 0.5, 0.5])).view(3, 1, 1)
    std = torch.tensor(getattr(proc, "image_std", [0.5, 0.5, 0.5])).view(3, 1, 1)
    pixels = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def kept_patches(session, image, prompt: str) -> KeptPatches:
    """Run one prefill of `prompt` on `image` with the session's methods and report the patches each decoder
    layer read."""
    from mmkit.images import load_image

    adapter = session.adapter
    if adapter.architecture != "LlavaForConditionalGeneration":
        raise ValueError("--show-kept draws the LLaVA-1.5 patch grid; this model tiles its image (LLaVA-NeXT)")
    picture = load_image(image)
    lm = adapter.language_model
    seen: dict = {"layers": {}}
    ctx = session.context

    def before(module, args, kwargs):
        if ctx.prefill:
            seen.update(prompt=kwargs["inputs_embeds"][0].detach().clone(), image_mask=ctx.image_mask[0].clone(),
                        layers={})
        return None

    def after(module, args, kwargs):
        if ctx.prefill:
            embeds = kwargs["inputs_embeds"][0]
            pos = kwargs.get("position_ids")
            pos = torch.arange(embeds.shape[0], device=embeds.device) if pos is None else pos[0]
            seen.update(reduced=embeds.detach().clone(), positions=pos.detach().clone())
        return None

    def layer_hook(index):
        def hook(module, args, kwargs):
            if ctx.prefill and kwargs.get("position_ids") is not None:
                seen["layers"][index] = kwargs["position_ids"][0].detach().clone()
            return None
        return hook

    handles = [lm.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
               lm.register_forward_pre_hook(after, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True)
                for i, layer in enumerate(adapter.decoder_layers)]
    try:
        session.generate([picture], [prompt], max_new_tokens=1)
    finally:
        for handle in handles:
            handle.remove()
    if "reduced" not in seen:
        raise RuntimeError("the prompt reached no language-model prefill; nothing to draw")
    prompt_rows, image_mask = seen["prompt"], seen["image_mask"].to(seen["prompt"].device)
    image_pos = image_mask.nonzero().flatten()
    n_patches = int(image_pos.numel())
    grid = int(round(n_patches ** 0.5))
    offset = n_patches - grid * grid  # 1 when the CLS token is fed too ("full" strategy): not on the grid
    slot_patch, slot_status = _match_slots(seen["reduced"], prompt_rows, image_pos)
    positions = seen["positions"].cpu()
    image_rows = torch.nn.functional.normalize(prompt_rows[image_pos].float(), dim=-1).cpu()
    slot_rows = torch.nn.functional.normalize(seen["reduced"].float(), dim=-1).cpu()
    layers = []
    for index in range(len(adapter.decoder_layers)):
        read = seen["layers"].get(index)
        alive = torch.ones_like(slot_patch, dtype=torch.bool) if read is None else torch.isin(positions, read.cpu())
        status = torch.zeros(n_patches, dtype=torch.long)
        kept = alive & (slot_status == KEPT)
        status[slot_patch[kept]] = KEPT
        visual = alive & (slot_status != DROPPED)
        if bool((alive & (slot_status == MERGED)).any()):
            # A patch whose closest token the layer reads is a merged one is represented through that merge.
            closest = (image_rows @ slot_rows[visual].T).argmax(1)
            through_merge = (slot_status[visual][closest] == MERGED) & (status != KEPT)
            status[through_merge] = MERGED
        layers.append(status[offset:])
    inputs = session.prepare([picture], [prompt])
    view = _model_view(session, inputs["pixel_values"][0])
    return KeptPatches(view, grid, layers, [h.spec for h in session.methods], prompt)


def _match_slots(reduced: torch.Tensor, prompt_rows: torch.Tensor, image_pos: torch.Tensor):
    """Per reduced-sequence slot: the image patch it carries (index into the prompt's image tokens) and whether it
    is that patch (KEPT), a merged token drawn at its most similar patch (MERGED), or text (DROPPED = no patch)."""
    # (m, n) exact row equality, a few rows at a time (the full (m, n, d) comparison would be gigabytes).
    exact = torch.cat([(chunk[:, None, :] == prompt_rows[None, :, :]).all(-1) for chunk in reduced.split(16)])
    has = exact.any(1)
    first = exact.float().argmax(1)
    is_image = torch.zeros(prompt_rows.shape[0], dtype=torch.bool, device=reduced.device)
    is_image[image_pos] = True
    patch_of = torch.full((prompt_rows.shape[0],), -1, dtype=torch.long, device=reduced.device)
    patch_of[image_pos] = torch.arange(image_pos.numel(), device=reduced.device)
    images = torch.nn.functional.normalize(prompt_rows[image_pos].float(), dim=-1)
    nearest = (torch.nn.functional.normalize(reduced.float(), dim=-1) @ images.T).argmax(1)
    patch = torch.where(has, patch_of[first], nearest)
    status = torch.where(has, torch.where(is_image[first], KEPT, DROPPED), MERGED)
    return patch.cpu(), status.cpu()


# -- drawing ----------------------------------------------------------------------------------------------------
def render(view, grid: int, status: torch.Tensor, title: str, size: int = 240):
    """One panel: kept patches in colour, dropped ones greyed out, patches represented through a merged token in
    colour under an orange tint."""
    from PIL import Image, ImageDraw

    image = view.convert("RGB").resize((size, size), Image.BICUBIC)
    grey = image.convert("L").point(lambda v: 40 + v // 4).convert("RGB")
    cell = size / grid
    tinted = Image.blend(image, Image.new("RGB", (size, size), (255, 140, 0)), 0.35)
    kept_mask, merged_mask = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    for index, kind in enumerate(status.tolist()):
        r, c = divmod(index, grid)
        box = (round(c * cell), round(r * cell), round((c + 1) * cell) - 1, round((r + 1) * cell) - 1)
        if kind != DROPPED:
            ImageDraw.Draw(kept_mask if kind == KEPT else merged_mask).rectangle(box, fill=255)
    panel = Image.composite(tinted, grey, merged_mask)
    panel = Image.composite(image, panel, kept_mask)
    out = Image.new("RGB", (size, size + 18), (255, 255, 255))
    out.paste(panel, (0, 18))
    ImageDraw.Draw(out).text((3, 3), title, fill=(0, 0, 0))
    return out


def save_panels(panels: list, path: str | os.PathLike, columns: int = 4) -> Path:
    """Tile panels into one PNG, written to a temporary file and renamed into place."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path} must end in .png")
    if not path.parent.is_dir():
        raise ValueError(f"directory {path.parent} does not exist")
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    w, h = panels[0].size
    sheet = Image.new("RGB", (columns * w + (columns - 1) * 4, rows * h + (rows - 1) * 4), (255, 255, 255))
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        sheet.paste(panel, (c * (w + 4), r * (h + 4)))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _caption(status: torch.Tensor, grid: int) -> str:
    kept, merged = int((status == KEPT).sum()), int((status == MERGED).sum())
    return f"{kept} of {grid * grid} kept" + (f", {merged} merged" if merged else "")


def draw_kept(session, image, prompt: str, path: str | os.PathLike, columns: int = 4) -> KeptPatches:
    """Draw, over the model's view of `image`, the patches each decoder layer read for `prompt` (one panel per
    layer) and save the PNG at `path`. Returns what was drawn."""
    kept = kept_patches(session, image, prompt)
    panels = [render(kept.image, kept.grid, status, f"layer {i}: {_caption(status, kept.grid)}")
              for i, status in enumerate(kept.layers)]
    save_panels(panels, path, columns)
    return kept
