"""VAR: Visual Attention Redistribution ("See What You Are Told: Visual Attention Sink in Large Multimodal
Models", ICLR 2025).

Some tokens soak up attention without carrying much information ("sinks"). They are recognised by massive
activations: token t is a sink at layer l when |RMSNorm(h_t)| exceeds tau on one of the model's massive-activation
dimensions, h_t being layer l's input (the residual stream) and RMSNorm the plain normalisation h / rms(h) without
the layer's learned weight, as the official `DimProspector` computes it (eps 1e-6, float32). Sinks are found on the
prompt; generated tokens are never sinks (the official code runs the detection in the prefill only). VAR takes the
attention such heads waste on sinks and gives it back to the image:

1. Image-centric heads, per layer l in [start_layer, end_layer) and per query row: the row's attention to image
   tokens is >= `min_visual`, and the share of it that goes to visual sink tokens is <= `rho`. A sample with no
   visual sink token at layer l has no image-centric head there (the official `HeadFork` forks none), so its text
   sinks keep their attention too.
2. In those heads and rows, the probability of every sink key (visual and text) is multiplied by `p`; the freed
   (1 - p) mass is added to the non-sink image tokens in proportion to their attention. Rows keep summing to 1.

Massive-activation dimensions: LLaMA-2-7B has fixed ones ({1415, 2533}), LLaMA-2-13B {2100, 4743}. With `dims`
empty, a checkpoint the official code lists (LLaVA-1.5-7B / 13B, LLaVA-1.6-Vicuna-13B, recognised by its id or path
and hidden size) gets the official dims; any other model has them found per call, per sample and per layer: the
`num_dims` hidden dimensions with the largest |RMSNorm(h)| over the prompt's tokens (a massive activation dominates
its dimension, so these are the outlier dimensions when the model has them; when it has none, tau decides that no
token is a sink and VAR leaves that row alone).

Rows edited: `rows="text"` every text row after the image (prompt and generated tokens), `rows="last"` only the
current token. The edit is post-softmax, so the edited layers' attention is replaced through the attention probe by
the kernel op `mmkit.kernels.redistributed_attention` (exact float32 probabilities, chunks of query rows, one
chunk's probabilities in memory at a time; rows before the first edited one run plain SDPA). Image tokens, sinks and
rows are those of the sequence each layer sees, so VAR composes with token pruning before or inside the LLM. p = 1
is a no-op: nothing is installed and the logits are bit-identical to the baseline.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmkit.patching.probe import prefill_slots
from mmkit.hallucination.common import check_float
from mmkit.kernels import redistributed_attention
from mmkit.kernels.sink_redistribution.ref import redistribute  # noqa: F401  (VAR's edit, public here too)
from mmkit.registry import register_method

logger = logging.getLogger(__name__)


@dataclass
class VARConfig:
    """VAR: move attention from sink tokens to the image in image-centric heads."""

    p: float = field(default=0.6, metadata={"help": "factor kept on sink attention in image-centric heads; 1 = off"})
    tau: float = field(default=20.0, metadata={"help": "sink threshold on |RMSNorm(h)| at the massive dims"})
    rho: float = field(default=0.5, metadata={"help": "image-centric heads give at most this share of their image "
                                                      "attention to visual sinks"})
    min_visual: float = field(default=0.2, metadata={"help": "image-centric heads give the image at least this "
                                                             "attention"})
    start_layer: int = field(default=2, metadata={"help": "first decoder layer edited"})
    end_layer: int | None = field(default=None, metadata={"help": "decoder layer to stop before; None = all but "
                                                                  "the last layer"})
    dims: tuple[int, ...] = field(default=(), metadata={"help": "massive-activation hidden dims (e.g. 1415/2533 for "
                                                                "LLaMA-2-7B); empty = the official dims for the "
                                                                "LLaVA checkpoints it lists, else detected per call"})
    num_dims: int = field(default=2, metadata={"help": "dims detected per call when dims is empty"})
    rows: Literal["text", "last"] = field(
        default="text", metadata={"help": "query rows edited: every text/generated row after the image, or only "
                                          "the current (last) token"})

    def __post_init__(self):
        self.p = check_float("p", self.p, low=0.0, high=1.0)
        self.tau = check_float("tau", self.tau, low=0.0)
        self.rho = check_float("rho", self.rho, low=0.0, high=1.0, high_open=True)
        self.min_visual = check_float("min_visual", self.min_visual, low=0.0, high=1.0, low_open=True)
        for name in ("start_layer", "num_dims"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.num_dims < 1:
            raise ValueError("num_dims must be >= 1")
        if self.end_layer is not None:
            if isinstance(self.end_layer, bool) or not isinstance(self.end_layer, int):
                raise ValueError(f"end_layer must be an integer or None, got {self.end_layer!r}")
            if self.end_layer <= self.start_layer:
                raise ValueError(f"end_layer ({self.end_layer}) must be greater than start_layer ({self.start_layer})")
        dims = tuple(self.dims)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
            raise ValueError(f"dims must be hidden dimensions (integers >= 0), got {self.dims!r}")
        if len(set(dims)) != len(dims):
            raise ValueError(f"dims must not repeat, got {self.dims!r}")
        self.dims = dims
        if self.rows not in ("text", "last"):
            raise ValueError(f"rows must be text or last, got {self.rows!r}")


def detect_massive_dims(normed: torch.Tensor, valid: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, k) per row: the hidden dims with the largest |normed| (B, n, d) over the row's valid tokens."""
    mag = normed.abs().float()
    if valid is not None:
        mag = mag * valid[..., None].to(mag.dtype)
    return torch.topk(mag.amax(dim=1), min(k, mag.shape[-1]), dim=-1).indices


SINK_NORM_EPS = 1e-6  # the official DimProspector's epsilon

# The official massive-activation dims per language model (`DIM_SINK`), with the checkpoints it maps to them
# (`MODEL_LLM`) and the hidden size that identifies the backbone.
OFFICIAL_SINK_DIMS = (
    (("llava-v1.5-7b", "llava-1.5-7b"), 4096, (2533, 1415)),                             # LLaMA-2-7B
    (("llava-v1.5-13b", "llava-1.5-13b", "llava-v1.6-vicuna-13b"), 5120, (2100, 4743)),  # LLaMA-2-13B
)


def official_sink_dims(source: str, hidden_size: int) -> tuple[int, ...]:
    """The official code's massive dims for a checkpoint it names (by its id or path), or () when it names none."""
    name = (source or "").lower()
    for names, hidden, dims in OFFICIAL_SINK_DIMS:
        if hidden == hidden_size and any(n in name for n in names):
            return dims
    return ()


def sink_norm(hidden: torch.Tensor) -> torch.Tensor:
    """h / sqrt(mean(h^2) + eps) in float32: RMSNorm without a learned weight, the scale sinks are judged on."""
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + SINK_NORM_EPS)


def sink_flags(normed: torch.Tensor, dims: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool (B, q): tokens whose |normed| exceeds tau on any of their row's dims (B, k)."""
    picked = normed.abs().float().gather(2, dims[:, None, :].expand(-1, normed.shape[1], -1))
    return picked.amax(-1) > tau


@dataclass
class _LayerSinks:
    dims: torch.Tensor           # (B, k) massive dims of each row
    flags: list                  # bool (B, q) chunks, in cache order
    # Rows with a visual sink (B,), and whether that is every row: set at the prefill, fixed while decoding
    # (generated tokens are never sinks), so decoding steps need no host read to know it.
    visual_rows: torch.Tensor | None = None
    every_row_visual: bool = False


class VARHandle:
    def __init__(self, session, config: VARConfig, force_override: bool = False):
        self.config = config
        adapter = session.adapter
        num_layers = adapter.num_layers
        end = max(num_layers - 1, config.start_layer + 1) if config.end_layer is None else config.end_layer
        if config.start_layer >= num_layers or end > num_layers:
            raise ValueError(f"var layers [{config.start_layer}, {end}) do not fit this model's {num_layers} "
                             f"decoder layers")
        if config.dims and max(config.dims) >= adapter.hidden_size:
            raise ValueError(f"var dims {config.dims} exceed this model's hidden size {adapter.hidden_size}")
        # Fixed massive dims: the configured ones, else the official ones for the checkpoints it lists; with neither,
        # they are detected per call.
        source = getattr(session, "source", "") or getattr(session.model.config, "_name_or_path", "")
        self.dims = config.dims or official_sink_dims(str(source), adapter.hidden_size)
        self.layers = list(range(config.start_layer, end))
        self._session = session
        self._ctx = session.context
        self._handles: list = []
        self._sinks: dict[int, _LayerSinks] = {}
        # Image-centric (row, head) pairs edited since the last prefill, per layer (for inspection and tests).
        self.edited: dict[int, torch.Tensor] = {}
        # Sink tokens found per edited layer at the last prefill, summed over the batch (for inspection).
        self.sink_tokens: dict[int, int] = {}
        self._warned_no_sinks = False
        if config.p == 1.0 and not force_override:
            logger.info("var with p = 1 is a no-op; the model is left unchanged")
            return
        try:
            for layer in self.layers:
                block = adapter.decoder_layers[layer]
                self._handles.append(block.input_layernorm.register_forward_pre_hook(self._norm_hook(layer)))
            self._handles.append(session.probe.override(self.layers, self._attend))
        except Exception:
            self.remove()
            raise
        self._ctx.on_prefill(id(self), self._reset)

    def _reset(self, ctx) -> None:
        self._sinks = {}
        self.edited = {}
        self.sink_tokens = {}

    def _norm_hook(self, layer: int):
        # A pre-hook on the layer's input_layernorm: its input is the layer's input h (the residual stream).
        def hook(module, args):
            ctx = self._ctx
            hidden = args[0]
            if ctx.prefill:
                normed = sink_norm(hidden)
                # The real tokens of the sequence this layer sees (after any reduction or drop).
                valid = prefill_slots(ctx, layer, hidden.device)[1]
                valid = valid if valid.shape == hidden.shape[:2] else None
                if self.dims:
                    dims = torch.tensor(self.dims, device=hidden.device).expand(hidden.shape[0], -1)
                else:
                    dims = detect_massive_dims(normed, valid, self.config.num_dims)
                flags = sink_flags(normed, dims, self.config.tau)
                if valid is not None and valid.shape == flags.shape:
                    flags &= valid
                self._sinks[layer] = _LayerSinks(dims, [flags])
                self.sink_tokens[layer] = int(flags.sum())  # one host read per edited layer and prefill
                if layer == self.layers[-1]:
                    self._check_sinks(hidden.shape[-1])
            elif layer in self._sinks:
                # Generated tokens are keys of later steps but never sinks (detection is prefill-only).
                self._sinks[layer].flags.append(torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device))
            return None

        return hook

    def _check_sinks(self, hidden: int) -> None:
        """Say so, once, when a prefill finds no sink token in any edited layer: VAR then changes nothing."""
        if any(self.sink_tokens.values()) or self._warned_no_sinks:
            return
        self._warned_no_sinks = True
        dims = "/".join(map(str, self.dims)) or f"the {self.config.num_dims} largest of {hidden}"
        logger.warning("var: no sink tokens (|RMSNorm(h)| > tau=%g on dims %s) in layers %s of this prompt, so the "
                       "attention is left unchanged; this model may have no massive activations (set tau below "
                       "its outlier magnitude, or pass its massive dims with dims=...)", self.config.tau, dims,
                       self.layers)

    def _attend(self, view, value, **kwargs):
        layer = view.layer
        state = self._sinks.get(layer)
        query, key = view.query, view.key
        if state is None or not bool(view.image_keys.any()):
            return view.attend(query, key, value, view.attention_mask, **kwargs)
        k_len = key.shape[2]
        sink = torch.cat(state.flags, dim=1)
        if sink.shape[1] > k_len:
            raise RuntimeError(f"var: layer {layer} sees {k_len} keys but tracked {sink.shape[1]} tokens")
        sink_keys = torch.zeros_like(view.image_keys)
        sink_keys[:, : sink.shape[1]] = sink.to(sink_keys.device)
        sink_keys = sink_keys & view.real_keys
        if view.prefill:
            if self.config.rows == "text":
                rows = view.text_rows
            else:
                rows = torch.zeros_like(view.text_rows)
                rows[:, -1] = True
            # No visual sink in a sample: the official HeadFork selects no head there, text sinks included.
            state.visual_rows = (sink_keys & view.image_keys).any(1)
            state.every_row_visual = bool(state.visual_rows.all())
            rows = rows & state.visual_rows[:, None]
        elif state.every_row_visual:
            rows = None  # every generated token is a text row after the image
        else:
            visual = state.visual_rows if state.visual_rows is not None else (sink_keys & view.image_keys).any(1)
            rows = visual.to(query.device)[:, None].expand(view.batch, query.shape[2])
        out, edited = redistributed_attention(query, key, value, scaling=view.scaling,
                                              attn_mask=view.attention_mask, image_keys=view.image_keys,
                                              sink_keys=sink_keys, row_mask=rows,
                                              p=self.config.p, rho=self.config.rho,
                                              min_visual=self.config.min_visual)
        self.edited[layer] = self.edited.get(layer, 0) + edited
        return out.transpose(1, 2).contiguous(), None

    def export_config(self) -> VARConfig:
        # An export is loaded from a directory whose name need not identify the checkpoint: save the dims in use.
        return dataclasses.replace(self.config, dims=tuple(self.dims))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._ctx.drop_callback(id(self))
        self._sinks = {}


def apply_var(session, config: VARConfig) -> VARHandle:
    """Attach VAR to a session; `remove()` on the result restores the model exactly."""
    return VARHandle(session, config)


register_method(
    "var", VARConfig, apply_var, kind="hallucination",
    description="Redistribute sink-token attention to the image in image-centric heads (ICLR'25).",
    slots=("attention_scores",),
)
