"""CDPruner (Zhang et al., NeurIPS 2025): keep the visual tokens of maximal *conditional* diversity, before the LLM.

Per image:
1. relevance r (N,) of each visual token to the instruction, min-max normalised over the image's tokens;
2. similarity S (N, N): cosine of the projected features (the rows the language model receives), float32;
3. kernel L = diag(r) S diag(r) of a determinantal point process, whose log-det rewards subsets that are both
   relevant (large r) and diverse (dissimilar rows);
4. greedy MAP inference (Chen et al. 2018, fast greedy DPP with incremental Cholesky rows): each of k steps adds
   the token with the largest marginal gain d_j^2 = det(L_{S+j}) / det(L_S), batched over the images.
The picked tokens enter the LLM in their original order, numbered contiguously as a shorter image would be.

Relevance comes from one of two encoders (docs/cdpruner.md compares them):
- `clip=DIR`, a local CLIP checkpoint (the paper's choice: the text tower of the vision tower's own CLIP; an HF
  LLaVA checkpoint holds only the vision tower): the instruction is encoded by CLIP's text model + projection, the
  image tokens are LLaVA's vision features (the `vision_feature_layer` patches) through CLIP's post-layernorm and
  visual projection; relevance = -cos (the released code negates: for these penultimate-layer patches, low CLIP
  similarity marks the relevant ones), averaged over 77-token chunks of the instruction.
- default: the model's own embeddings. The instruction's tokens are embedded with the language model's input
  embedding table and compared with the projected image features (both live in the LLM's input space);
  relevance = cos averaged over the instruction's tokens (not negated: the inversion is a property of CLIP's
  penultimate-layer patches that nothing suggests carries over).
`invert` overrides either sign. The instruction is the user's prompt: the chat template around it and LLaVA's
answer-format suffixes are removed, as the paper feeds the raw question.

On LLaVA-NeXT / OneVision and Qwen-VL each image is selected alone over its patch tokens (anyres row newlines
dropped) with its row's instruction; `clip=` needs a CLIP tower (LLaVA-NeXT: each token scored by the CLIP patch it
was projected from), elsewhere relevance comes from the model's own embeddings (docs/cdpruner.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from mmkit.pruning.selection import (
    ImageBatch,
    Selection,
    SelectionHandle,
    check_budget_fields,
    check_positions,
    fixed_budget,
    identity_order,
    patch_tokens,
    per_image_layout,
)
from mmkit.registry import register_method

# Answer-format instructions LLaVA's eval scripts append; the paper strips them before encoding the question.
FORMAT_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)


@dataclass
class CDPrunerConfig:
    """CDPruner: keep the visual tokens of maximal conditional diversity (instruction-weighted DPP, greedy MAP)."""

    keep: float = field(default=0.111, metadata={"help": "share of each image's visual tokens kept (0.111 = 64 of "
                                                         "576, the README's setting)"})
    tokens: int = field(default=0, metadata={"help": "if > 0: visual tokens kept per image (overrides keep)"})
    clip: str = field(default="", metadata={"help": "local CLIP checkpoint directory for instruction relevance "
                                                    "(the paper's); empty: the model's own embeddings",
                                            # An export copies the checkpoint in, so it does not depend on this path.
                                            "export": "copy"})
    invert: bool | None = field(default=None, metadata={"help": "negate the similarity before normalising; "
                                                                "default: yes with CLIP (released code), no with "
                                                                "the model's embeddings"})
    positions: Literal["auto", "contiguous", "original"] = field(
        default="auto", metadata={"help": "position ids: auto = renumber the shorter sequence (paper) where "
                                          "positions are 1-D, keep the 3-D ones on Qwen-VL; or contiguous / original"})

    def __post_init__(self):
        self.keep = check_budget_fields(self.keep, self.tokens)
        check_positions(self.positions)
        if not isinstance(self.clip, str):
            raise ValueError(f"clip must be a directory path or empty, got {self.clip!r}")
        if self.clip and not (Path(self.clip).expanduser() / "config.json").is_file():
            raise ValueError(f"clip={self.clip!r} is not a local CLIP checkpoint directory (no config.json)")
        if self.invert is not None and not isinstance(self.invert, bool):
            raise ValueError(f"invert must be true, false or none, got {self.invert!r}")


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Per row of (I, N): (x - min) / (max - min); a constant row becomes all ones (relevance then says nothing)."""
    low = scores.min(dim=1, keepdim=True).values
    span = scores.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (scores - low) / span.clamp(min=1e-12), torch.ones_like(scores))


def dpp_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of the features; (I, N, D), (I, N) -> (I, N, N), float32
    (float64 for float64 inputs)."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    unit = torch.nn.functional.normalize(features.to(dtype), dim=-1)
    r = relevance.to(dtype)
    return r[:, :, None] * (unit @ unit.transpose(1, 2)) * r[:, None, :]


def greedy_dpp(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Fast greedy MAP inference for a DPP (Chen et al. 2018), batched: (I, N, N) PSD kernels -> (I, k) picks in
    pick order. Each step picks argmax of the marginal gain d^2 = det(L_{S+j}) / det(L_S), kept up to date with
    one new Cholesky row per step, in float64 (float32 loses the Cholesky rows' orthogonality after some tens of
    picks on real features). Runs exactly k steps. Once an image's kernel has no gain left above its own rounding
    level (every candidate's d^2 <= sqrt(N) x the kernel dtype's epsilon x the largest diagonal entry: the rank is
    exhausted), its remaining picks are the unpicked tokens with the largest L_jj (the most relevant), so the picks
    are always k distinct tokens, never NaN."""
    n_img, n, _ = kernel.shape
    eps = torch.finfo(kernel.dtype).eps if kernel.dtype.is_floating_point else torch.finfo(torch.float32).eps
    kernel = kernel.double()
    rows = torch.arange(n_img, device=kernel.device)
    diag = torch.diagonal(kernel, dim1=1, dim2=2)
    gains = diag.clone()                                           # d_j^2 with S empty: L_jj
    floor = (n ** 0.5) * eps * diag.max(dim=1).values.clamp(min=1e-300)
    chol = kernel.new_zeros(n_img, k, n)                           # rows of the incremental Cholesky factor
    picked = torch.zeros(n_img, n, dtype=torch.bool, device=kernel.device)
    picks = []
    for step in range(k):
        masked = gains.masked_fill(picked, float("-inf"))
        j = masked.argmax(dim=1)
        alive = masked[rows, j] > floor
        j = torch.where(alive, j, diag.masked_fill(picked, float("-inf")).argmax(dim=1))
        picks.append(j)
        picked[rows, j] = True
        if step == k - 1:
            break
        c_j = chol[rows, :step, j]                                 # (I, step)
        proj = torch.einsum("is,isn->in", c_j, chol[:, :step])
        denom = gains[rows, j].clamp(min=1e-300).sqrt()
        e = torch.where(alive[:, None], (kernel[rows, j] - proj) / denom[:, None], torch.zeros_like(proj))
        chol[:, step] = e
        gains = gains - e * e
    return torch.stack(picks, dim=1)


def instruction_texts(input_ids: torch.Tensor, image_mask: torch.Tensor, attention_mask, tokenizer,
                      template: str, image_token: str) -> list[str]:
    """Per batch row, the user's instruction: the row's text with the chat template and LLaVA's answer-format
    suffixes removed."""
    prefix, _, suffix = template.partition("{prompt}")

    def forms(part: str) -> list[str]:
        # As written, and as decoding shows it (special tokens such as Qwen-VL's <|vision_start|> vanish there).
        plain = part.replace(image_token, "").strip()
        decoded = tokenizer.decode(tokenizer(plain, add_special_tokens=False)["input_ids"],
                                   skip_special_tokens=True).strip()
        return [f for f in dict.fromkeys((plain, decoded)) if f]

    prefixes, suffixes = forms(prefix), forms(suffix)
    real = ~image_mask if attention_mask is None else (~image_mask) & attention_mask.bool()
    texts = []
    for ids, keep in zip(input_ids, real):
        text = tokenizer.decode(ids[keep], skip_special_tokens=True).strip()
        for form in prefixes:
            if text.startswith(form):
                text = text[len(form):].strip()
                break
        for form in suffixes:
            if text.endswith(form):
                text = text[:-len(form)].strip()
                break
        for tail in FORMAT_SUFFIXES:
            if text.endswith(tail):
                text = text[:-len(tail)].strip()
        texts.append(text)
    return texts


class EmbeddingRelevance:
    """Relevance from the language model's own input embeddings: mean cos(projected image token, instruction
    token embedding) over the instruction's tokens."""

    def __init__(self, session):
        self.tokenizer = session.processor.tokenizer
        self.embed = session.model.get_input_embeddings()

    def __call__(self, batch: ImageBatch, texts: list[str]) -> torch.Tensor:
        feats = torch.nn.functional.normalize(batch.features.float(), dim=-1)
        out = feats.new_full(feats.shape[:2], float("nan"))
        for row, text in enumerate(texts):
            images = (batch.rows == row).nonzero().flatten()
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if len(images) == 0 or not ids:
                continue
            words = self.embed(torch.tensor(ids, device=self.embed.weight.device)).float().to(feats.device)
            words = torch.nn.functional.normalize(words, dim=-1)
            out[images] = (feats[images] @ words.T).mean(-1)
        return out  # NaN rows: no instruction text


class ClipRelevance:
    """Relevance from a local CLIP checkpoint (the paper's): cos(CLIP-projected vision features, CLIP text
    embedding of each <=77-token chunk of the instruction), averaged over chunks."""

    def __init__(self, session, path: str):
        from transformers import AutoTokenizer, CLIPModel

        directory = Path(path).expanduser()
        try:
            self.model = CLIPModel.from_pretrained(str(directory), torch_dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a CLIP model and tokenizer from {directory}: {err}") from None
        self.model.eval().requires_grad_(False).to(session.device)
        width = int(self.model.config.vision_config.hidden_size)
        tower = int(session.model.config.vision_config.hidden_size)
        if width != tower:
            raise ValueError(f"the CLIP checkpoint's vision width {width} differs from this model's vision tower "
                             f"({tower}); give the CLIP the LLaVA vision tower was taken from")
        self.max_len = int(self.model.config.text_config.max_position_embeddings)

    def _chunks(self, text: str) -> list[list[int]]:
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        width = max(1, self.max_len - len(bos) - len(eos))
        return [bos + ids[i:i + width] + eos for i in range(0, len(ids), width)]

    @torch.no_grad()
    def __call__(self, batch: ImageBatch, texts: list[str]) -> torch.Tensor:
        if batch.vision_features is None:
            raise RuntimeError("CLIP relevance needs the vision features the projector received")
        device = self.model.device
        vision = batch.vision_features.to(device, torch.float32)
        patches = self.model.visual_projection(self.model.vision_model.post_layernorm(vision))
        patches = torch.nn.functional.normalize(patches, dim=-1)
        out = patches.new_full(patches.shape[:2], float("nan"))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for row, text in enumerate(texts):
            images = (batch.rows == row).nonzero().flatten().to(device)
            chunks = self._chunks(text) if text else []
            if len(images) == 0 or not chunks:
                continue
            longest = max(len(c) for c in chunks)
            ids = torch.tensor([c + [pad] * (longest - len(c)) for c in chunks], device=device)
            mask = torch.tensor([[1] * len(c) + [0] * (longest - len(c)) for c in chunks], device=device)
            text_emb = self.model.get_text_features(input_ids=ids, attention_mask=mask)
            text_emb = getattr(text_emb, "pooler_output", text_emb)
            text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
            out[images] = (patches[images] @ text_emb.T).mean(-1)
        return out.to(batch.features.device)


class CDPrunerHandle(SelectionHandle):
    def __init__(self, session, config: CDPrunerConfig):
        self.config = config
        if config.clip and per_image_layout(session) and not session.adapter.has_cls_token:
            # CLIP relevance scores the vision tower's own patches with the CLIP it came from; SigLIP (OneVision) and
            # the Qwen-VL towers have no CLIP text tower to pair with.
            raise ValueError(f"cdpruner clip= needs a CLIP vision tower (LLaVA-1.5, LLaVA-NeXT); "
                             f"{session.adapter.family.name}'s tower is not CLIP, leave clip empty (relevance from the "
                             f"model's own input embeddings)")
        self.k = fixed_budget(session, config, "cdpruner")
        if getattr(session.processor, "tokenizer", None) is None:
            raise ValueError("cdpruner reads the instruction with the model's tokenizer, and this session has none "
                             "(a shapes-only benchmark model); load a model with its processor")
        self.tokenizer = session.processor.tokenizer
        self.template = session.chat_prompt("{prompt}")
        self.image_token = getattr(session.processor, "image_token", "<image>")
        self.relevance = ClipRelevance(session, config.clip) if config.clip else EmbeddingRelevance(session)
        self.invert = bool(config.clip) if config.invert is None else config.invert
        super().__init__(session, self._select, positions=config.positions, keep_vision_features=bool(config.clip))

    def relevance_scores(self, batch: ImageBatch) -> torch.Tensor:
        """(I, N) relevance in [0, 1] of each image's tokens to its row's instruction."""
        if batch.input_ids is None:
            raise RuntimeError("cdpruner needs the prompt's token ids (call the model with input_ids)")
        texts = instruction_texts(batch.input_ids, batch.image_mask, batch.attention_mask, self.tokenizer,
                                  self.template, self.image_token)
        raw = self.relevance(batch, texts)
        raw = -raw if self.invert else raw
        # An image without instruction text gets uniform relevance: the DPP then selects for diversity alone.
        return torch.nan_to_num(minmax(raw), nan=1.0)

    def _select(self, batch: ImageBatch) -> Selection:
        n_img, n, _ = batch.features.shape
        k = self.kept(n)
        if k >= n:
            return Selection(order=identity_order(n_img, n, batch.features.device))
        patches = patch_tokens(batch)
        if patches is not None:
            # Anyres: the DPP runs over the patch tokens; row newlines are dropped, as the released LLaVA-1.6 path
            # feeds none.
            vision = batch.vision_features
            batch = replace(batch, features=batch.features[:, patches],
                            vision_features=None if vision is None else vision[:, patches])
            k = min(k, patches.numel())
        kernel = dpp_kernel(batch.features, self.relevance_scores(batch))
        picks = greedy_dpp(kernel, k)
        if patches is not None:
            picks = patches[picks]
        return Selection(order=picks.sort(dim=1).values)

    def remove(self) -> None:
        super().remove()
        if isinstance(self.relevance, ClipRelevance):
            self.relevance.model = None


def apply_cdpruner(session, config: CDPrunerConfig) -> CDPrunerHandle:
    """Attach CDPruner to a session; `remove()` on the result restores the model exactly."""
    return CDPrunerHandle(session, config)


register_method(
    "cdpruner", CDPrunerConfig, apply_cdpruner, kind="pruning",
    description="Keep the visual tokens of maximal instruction-conditioned diversity (DPP) before the LLM "
                "(NeurIPS'25).",
    slots=("pre_llm_token_drop",),
)
