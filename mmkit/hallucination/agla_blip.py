"""AGLA's prompt-image matcher: Grad-CAM of BLIP's image-text matching (ITM) head (official `eval/augmentation.py`
with LAVIS's `compute_gradcam`).

For each (image, prompt) pair BLIP-ITM scores how well the prompt matches the image. The "match" logit is
back-propagated to the cross-attention probabilities of one block of BLIP's image-grounded text encoder (block 6 in
the official code). Per head, text token and image patch the relevance is attention x ReLU(gradient); it is averaged
over heads and over the prompt's real tokens (the first token and the closing [SEP] excluded), giving one value per
BLIP image patch (24 x 24 for BLIP ViT-L at 384 px). The ITC score (cosine of BLIP's unimodal image and text
embeddings) sets the official keep fraction 1 - ITC/2.

BLIP is an auxiliary model: it runs in float32 on the session's device with its own eager attention; the
cross-attention probabilities are read by a forward hook on that one attention module, registered for the
scoring call and removed right after. Nothing of the LVLM is touched.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from mmkit.hallucination.common import image_normalisation
from mmkit.pruning.cdpruner import FORMAT_SUFFIXES

logger = logging.getLogger(__name__)

BLIP_MAX_TEXT_TOKENS = 35  # LAVIS BlipITM max_txt_len: the text is truncated to this many tokens
BLIP_MAX_WORDS = 50  # LAVIS blip_caption text processor: max_words
# Answer-format instructions appended to the question for the LVLM only: the official code appends "Please answer
# this question with one word." to LLaVA's prompt and gives BLIP the bare question. The others are LLaVA's eval
# suffixes and mmkit's POPE one.
ANSWER_FORMAT_SUFFIXES = (*FORMAT_SUFFIXES, "Please answer this question with one word.", "Answer yes or no.")


def blip_caption(text: str) -> str:
    """LAVIS's `blip_caption` eval text processing: lower case, the characters .!"()*#:;~ become spaces, runs of
    spaces collapse, at most 50 words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:BLIP_MAX_WORDS])


def strip_answer_format(text: str) -> str:
    """`text` without trailing answer-format instructions (`ANSWER_FORMAT_SUFFIXES`)."""
    stripped = True
    while stripped:
        stripped = False
        for tail in ANSWER_FORMAT_SUFFIXES:
            if text.endswith(tail):
                text, stripped = text[: -len(tail)].strip(), True
    return text


def itm_first_token(tokenizer, vocab_size: int) -> int | None:
    """Id of BLIP's [ENC] token, which the official BLIP puts first in the image-grounded (ITM) text; None if this
    checkpoint has none (the tokenizer's own first token, [CLS], is then kept, as transformers' ITM forward does).

    LAVIS's tokenizer is BERT's vocabulary + [DEC] + [ENC], in that order. A transformers BLIP checkpoint may list
    [ENC] in its tokenizer, or only [DEC] while its text embedding still has the one extra row [ENC] was given."""
    token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and 0 <= token_id < vocab_size:
        return token_id
    if "[DEC]" in tokenizer.get_vocab() and len(tokenizer) == vocab_size - 1:
        return len(tokenizer)
    return None


def gradcam_map(probs: torch.Tensor, grads: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) Grad-CAM from cross-attention probabilities and their gradients, both (B, heads, T, 1 + P).

    The image's class-token column is dropped; relevance = probs x ReLU(grads) on the real text rows, mean over
    heads, then the mean over text rows 1 .. n where n = (real tokens) - 2, i.e. without the first token and the
    closing [SEP] (LAVIS `compute_gradcam`, its entry [1])."""
    mask = attention_mask[:, None, :, None].to(probs.dtype)
    cam = (probs[..., 1:] * grads[..., 1:].clamp(min=0) * mask).mean(1)  # (B, T, P)
    lengths = (attention_mask.sum(1) - 2).clamp(min=1)
    rows = torch.arange(cam.shape[1], device=cam.device)[None, :]
    inner = ((rows >= 1) & (rows <= lengths[:, None])).to(cam.dtype)  # (B, T)
    return (cam * inner[..., None]).sum(1) / lengths[:, None].to(cam.dtype)


def images_from_pixels(session, images) -> list:
    """The LVLM's processed images (each (3, H, W), normalised: a batch tensor or a list of canvases of any sizes)
    back as uint8 HWC arrays (undoing its normalisation)."""
    mean, std = image_normalisation(session)
    out = []
    for image in images:
        pixels = image.float().cpu() * std + mean
        out.append((pixels.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    return out


def user_prompts(session, input_ids: torch.Tensor, suffix: str) -> list[str]:
    """The user prompt of each row: the text after the image, without the chat template's answer header."""
    tokenizer = session.processor.tokenizer
    image = input_ids == session.adapter.image_token_id
    texts = []
    for row, mask in zip(input_ids, image):
        start = int(mask.nonzero().max()) + 1 if bool(mask.any()) else 0
        text = tokenizer.decode(row[start:].tolist(), skip_special_tokens=True).strip()
        if suffix and text.endswith(suffix):
            text = text[: -len(suffix)].strip()
        texts.append(text)
    return texts


def answer_header(session) -> str:
    """What the chat template puts after the user's prompt (the assistant header), stripped."""
    return session.chat_prompt("\x00").split("\x00", 1)[1].strip()


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class BlipMatcher:
    """Prompt-image relevance by Grad-CAM of BLIP's ITM "match" logit at one cross-attention block; ITC = BLIP's
    image-text cosine."""

    def __init__(self, session, path: str, block: int):
        local = Path(path).expanduser()
        if (local.is_absolute() or path.startswith((".", "~"))) and not local.exists():
            # Clearly a filesystem path: transformers would report it as a malformed hub id.
            raise ValueError(f"agla: blip={path!r} does not exist; give a BLIP image-text matching checkpoint "
                             "directory or a hub id")
        try:
            from transformers import BlipForImageTextRetrieval, BlipProcessor

            # from_pretrained takes a local directory or a hub id alike.
            model = BlipForImageTextRetrieval.from_pretrained(path, dtype=torch.float32)
            processor = BlipProcessor.from_pretrained(path)
        except Exception as err:  # any load failure: missing dir, unreachable hub, wrong checkpoint type
            raise ValueError(f"agla: could not load a BLIP image-text matching model and processor from "
                             f"blip={path!r}: {_one_line(err)}") from None
        blocks = model.text_encoder.encoder.layer
        if not 0 <= block < len(blocks) or not hasattr(blocks[block], "crossattention"):
            raise ValueError(f"agla: blip_layer={block} is not a cross-attention block of this BLIP text encoder "
                             f"(it has blocks 0..{len(blocks) - 1})")
        self.session = session
        self.model = model.to(session.device).eval().requires_grad_(False)
        self.processor = processor
        self.block = block
        self._attention = blocks[block].crossattention.self
        vision = model.config.vision_config
        self.grid = vision.image_size // vision.patch_size
        tokenizer = processor.tokenizer
        self.enc_token_id = itm_first_token(tokenizer, model.config.text_config.vocab_size)
        if self.enc_token_id is None:
            logger.warning("agla: BLIP checkpoint %s has no [ENC] token; its ITM text starts with %s instead, as in "
                           "transformers", path, tokenizer.cls_token)
        self._suffix = answer_header(session)

    def prompts(self, input_ids: torch.Tensor) -> list[str]:
        """The text given to BLIP for each row: the user's question without answer-format instructions, cleaned
        as LAVIS's caption processor does."""
        texts = user_prompts(self.session, input_ids, self._suffix)
        return [blip_caption(strip_answer_format(text)) for text in texts]

    def scores(self, images: list, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, g, g) Grad-CAM maps and (B,) ITC cosines of `images` (uint8 HWC arrays) against `texts`."""
        device = self.session.device
        with torch.inference_mode(False), torch.enable_grad():
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            # Right padding: the Grad-CAM averages text rows 1 .. n of each row.
            text = self.processor.tokenizer(texts, padding="longest", truncation=True, padding_side="right",
                                            max_length=BLIP_MAX_TEXT_TOKENS, return_tensors="pt")
            input_ids = text["input_ids"].to(device)
            attention_mask = text["attention_mask"].to(device)
            with torch.no_grad():
                image_embeds = self.model.vision_model(pixel_values=pixels.to(device, torch.float32)).last_hidden_state
            # Weights are frozen; the image embeddings carry the graph that reaches the cross-attention.
            image_embeds = image_embeds.detach().requires_grad_(True)
            itm_ids = input_ids.clone()
            if self.enc_token_id is not None:
                itm_ids[:, 0] = self.enc_token_id
            captured: list[torch.Tensor] = []
            hook = self._attention.register_forward_hook(lambda module, args, output: captured.append(output[1]))
            try:
                hidden = self.model.text_encoder(
                    input_ids=itm_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                    encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device),
                ).last_hidden_state
            finally:
                hook.remove()
            if len(captured) != 1:
                raise RuntimeError(f"agla: BLIP block {self.block} cross-attention ran {len(captured)} times")
            match = self.model.itm_head(hidden[:, 0])[:, 1]  # the "match" logit of each row
            (grads,) = torch.autograd.grad(match.sum(), captured[0])
            cam = gradcam_map(captured[0].detach().float(), grads.float(), attention_mask)
            with torch.no_grad():
                # ITC: BLIP's unimodal text encoder on the plain ([CLS]-first) text.
                text_only = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
                text_hidden = text_only.last_hidden_state
                image_feat = F.normalize(self.model.vision_proj(image_embeds[:, 0]), dim=-1)
                text_feat = F.normalize(self.model.text_proj(text_hidden[:, 0]), dim=-1)
                itc = (image_feat * text_feat).sum(-1)
        if cam.shape[1] != self.grid * self.grid:
            raise ValueError(f"agla: BLIP gave {cam.shape[1]} patches, not its {self.grid}x{self.grid} grid")
        return cam.view(-1, self.grid, self.grid), itc.detach()

    def relevance(self, inputs: dict[str, torch.Tensor], views) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's maps and ITC for each row's image as the LVLM sees it (`views.canvases`) and its user prompt."""
        images = images_from_pixels(self.session, views.canvases)
        return self.scores(images, self.prompts(inputs["input_ids"]))

    def remove(self) -> None:
        self.model = None
        self._attention = None
