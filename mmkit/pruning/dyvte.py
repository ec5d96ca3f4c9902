"""DyVTE (Dynamic Visual-Token Exit, arXiv 2411.19628): small learned gates decide, per sample and per layer, when
the text has taken in all it needs from the image; from then on every visual token is removed.

Gate l (one per candidate layer l >= 1) reads the hidden states at the *input* of decoder layer l (the output of
layer l-1, the paper's "after layer l-1") during prefill: the mean of the text tokens after the image (without the
last position) concatenated with the last position, both d-dim. A 2-layer MLP (GELU) gives one exit logit; the row
exits when sigmoid(logit) > threshold (0.5 = the paper's 2-class argmax). Gates are checked in layer order and stop
being checked for a row once it has exited; state resets on every prefill. Decoding uses the KV cache as prefill
left it (layers from the exit on cache text tokens only).

Batches: every row exits at its own layer. Rows that exited lose all their image tokens, rows that did not keep
all of theirs, so rows carry different token counts from the first exit on (padded slots, handled by the token
dropper). This keeps a batched call equal to single-sample calls, which a batch-wide exit rule (exit when all or
any row fires) would not.

Gates are trained per backbone with `mmkit train-gates` (see `mmkit.pruning.dyvte_train`); gates for the
reference model ship in `mmkit/models/weights/dyvte/reference/`.

Differences from the official code: gates read the input of layer l rather than the output (the same tensor, one
index apart); the gate head is one logit with a sigmoid instead of two-class logits (same decision rule) and is much
narrower (hidden 128 rather than 2048), with fixed input standardisation from the training features; image spans
come from the image-token mask instead of the hard-coded 35:611, so anyres layouts and batches work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from mmkit.errors import MmkitError
from mmkit.models.shipped import shipped_dir
from mmkit.patching.token_drop import Selection, TokenDropper, keep_top_visual
from mmkit.registry import register_method

logger = logging.getLogger(__name__)

SHIPPED_DIR = shipped_dir("dyvte")
GATES_FILE = "gates.safetensors"
GATES_INFO = "gates.json"
# `gates=` value of an exported model: the gates arrive through `load_state` from the export directory.
EXPORTED = "exported"
# Relative tolerance of the weight fingerprint that ties gates to the model they were trained on (survives casts
# to half precision, not retraining).
FINGERPRINT_RTOL = 1e-2


@dataclass
class DyVTEConfig:
    """DyVTE: learned per-layer gates remove all visual tokens of a sample once its text no longer needs them."""

    gates: str | None = field(
        default=None,
        metadata={"help": "gates file (.safetensors) or a `mmkit train-gates` output directory; None = the shipped "
                          "gates of the reference model; 'exported' = gates saved with an exported model"},
    )
    threshold: float = field(
        default=0.5, metadata={"help": "exit when sigmoid(gate logit) > threshold; > 1 never exits"}
    )
    min_layer: int = field(
        default=1, metadata={"help": "earliest decoder layer from which visual tokens may be removed (>= 1)"}
    )

    def __post_init__(self):
        if self.gates is not None and (not isinstance(self.gates, str) or not self.gates.strip()):
            raise ValueError(f"gates must be a path to gates or None, got {self.gates!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(float(self.threshold)) or float(self.threshold) < 0:
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if isinstance(self.min_layer, bool) or not isinstance(self.min_layer, int) or self.min_layer < 1:
            raise ValueError(f"min_layer must be an integer >= 1, got {self.min_layer!r}")


# ---------------------------------------------------------------------------------------------------------------
# Gates


class ExitGates(torch.nn.Module):
    """One 2-layer MLP exit gate per candidate layer, stacked: logit = w2 . GELU(W1 x' + b1) + b2, x' the
    standardised gate input (fixed mean/std of the training features)."""

    def __init__(self, layers: Sequence[int], hidden_size: int, num_layers: int, width: int = 128,
                 fingerprint: float = float("nan"), generator: torch.Generator | None = None):
        super().__init__()
        layers = tuple(int(l) for l in layers)
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1 or layers[-1] >= num_layers:
            raise ValueError(f"gate layers must be increasing within [1, {num_layers - 1}], got {list(layers)}")
        self.layers = layers
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.fingerprint = float(fingerprint)
        g, d_in = len(layers), 2 * hidden_size
        w1 = torch.empty(g, d_in, width)
        w2 = torch.empty(g, width)
        bound1, bound2 = math.sqrt(6.0 / (d_in + width)), math.sqrt(6.0 / (width + 1))  # xavier-uniform, as official
        w1.uniform_(-bound1, bound1, generator=generator)
        w2.uniform_(-bound2, bound2, generator=generator)
        self.w1 = torch.nn.Parameter(w1)
        self.b1 = torch.nn.Parameter(torch.zeros(g, width))
        self.w2 = torch.nn.Parameter(w2)
        self.b2 = torch.nn.Parameter(torch.zeros(g))
        self.register_buffer("mu", torch.zeros(g, d_in))
        self.register_buffer("sigma", torch.ones(g, d_in))

    @property
    def width(self) -> int:
        return int(self.w1.shape[2])

    def slot(self, layer_idx: int) -> int:
        return self.layers.index(layer_idx)

    def logits_at(self, slot: int, features: torch.Tensor) -> torch.Tensor:
        """Exit logits (B,) of gate `slot` for features (B, 2d)."""
        x = (features.float() - self.mu[slot]) / self.sigma[slot]
        h = torch.nn.functional.gelu(x @ self.w1[slot] + self.b1[slot])
        return h @ self.w2[slot] + self.b2[slot]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Exit logits (N, G) of every gate for features (N, G, 2d) (training)."""
        x = (features.float() - self.mu) / self.sigma
        h = torch.nn.functional.gelu(torch.einsum("ngi,gih->ngh", x, self.w1) + self.b1)
        return torch.einsum("ngh,gh->ng", h, self.w2) + self.b2

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the gates, as tensors (safetensors cannot hold other metadata here)."""
        out = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        out["meta.layers"] = torch.tensor(self.layers, dtype=torch.int64)
        out["meta.hidden_size"] = torch.tensor(self.hidden_size, dtype=torch.int64)
        out["meta.num_layers"] = torch.tensor(self.num_layers, dtype=torch.int64)
        out["meta.fingerprint"] = torch.tensor(self.fingerprint, dtype=torch.float64)
        return out

    @classmethod
    def from_state_tensors(cls, tensors: dict[str, torch.Tensor], where: str = "gates") -> "ExitGates":
        required = ("w1", "b1", "w2", "b2", "mu", "sigma", "meta.layers", "meta.hidden_size", "meta.num_layers")
        missing = [k for k in required if k not in tensors]
        if missing:
            raise MmkitError(f"{where} is not a DyVTE gates file (missing {', '.join(missing)}); "
                             "make one with `mmkit train-gates`")
        layers = tensors["meta.layers"].tolist()
        w1 = tensors["w1"]
        gates = cls(layers, int(tensors["meta.hidden_size"]), int(tensors["meta.num_layers"]), width=w1.shape[2],
                    fingerprint=float(tensors.get("meta.fingerprint", torch.tensor(float("nan")))))
        gates.load_state_dict({k: tensors[k] for k in ("w1", "b1", "w2", "b2", "mu", "sigma")})
        return gates


def gate_features(hidden: torch.Tensor, image_mask: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Gate input (B, 2d) float32: [mean of the text tokens after the last image token, last position excluded;
    the last position]. `real` (B, n) marks real tokens (not padding, not padded slots); None = all real.

    A row without text between the image and its last position gets a zero mean.
    """
    batch, n, _ = hidden.shape
    pos = torch.arange(n, device=hidden.device)
    if real is None:
        real = torch.ones(batch, n, dtype=torch.bool, device=hidden.device)
    last_image = torch.where(image_mask & real, pos, -1).max(1).values
    text = (pos[None, :] > last_image[:, None]) & (pos[None, :] < n - 1) & real
    count = text.sum(1).clamp(min=1)
    summed = torch.bmm(text.to(hidden.dtype)[:, None, :], hidden)[:, 0].float()
    return torch.cat([summed / count[:, None], hidden[:, -1].float()], dim=-1)


def model_fingerprint(model: torch.nn.Module) -> float:
    """Mean |w| of the input embedding matrix: cheap, identifies a trained model (not just its shape)."""
    weight = model.get_input_embeddings().weight
    return float(weight.detach().double().abs().mean())


def load_gates(path: str | Path) -> ExitGates:
    """Read gates from a `.safetensors` file or a directory holding `gates.safetensors`."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    file = path / GATES_FILE if path.is_dir() else path
    if not file.is_file():
        raise MmkitError(f"no DyVTE gates at {path}; train them with `mmkit train-gates --model MODEL --out DIR` "
                         "and pass dyvte:gates=DIR")
    try:
        tensors = load_file(str(file))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise MmkitError(f"{file} is not a readable safetensors file ({type(err).__name__}); re-run "
                         "`mmkit train-gates`") from None
    return ExitGates.from_state_tensors(tensors, where=str(file))


def shipped_gates_dir(name: str = "reference") -> Path:
    return SHIPPED_DIR / name


def check_gates_match(gates: ExitGates, session, where: str) -> None:
    """Raise unless `gates` were made for a backbone of this shape; warn if made for different weights."""
    adapter = session.adapter
    if gates.hidden_size != adapter.hidden_size or gates.num_layers != adapter.num_layers:
        raise MmkitError(
            f"DyVTE gates {where} were trained for a {gates.num_layers}-layer, hidden-{gates.hidden_size} model; "
            f"this one has {adapter.num_layers} layers, hidden {adapter.hidden_size}. Train gates for it with "
            f"`mmkit train-gates --model {session.source or 'MODEL'} --out DIR` and pass dyvte:gates=DIR"
        )
    if math.isfinite(gates.fingerprint) and not _fingerprint_matches(gates, session.model):
        logger.warning("DyVTE gates %s were trained on different weights of this architecture; exits may be poor",
                       where)


def _fingerprint_matches(gates: ExitGates, model) -> bool:
    return math.isclose(model_fingerprint(model), gates.fingerprint, rel_tol=FINGERPRINT_RTOL)


def default_gates(session) -> ExitGates:
    """The shipped gates, if this session's model is the model they were trained on."""
    directory = shipped_gates_dir()
    how = f"(`mmkit train-gates --model {session.source or 'MODEL'} --out DIR`, then dyvte:gates=DIR)"
    if not (directory / GATES_FILE).is_file():
        raise MmkitError(f"no shipped DyVTE gates in this install; train gates for this model {how}")
    gates = load_gates(directory)
    adapter = session.adapter
    same_shape = gates.hidden_size == adapter.hidden_size and gates.num_layers == adapter.num_layers
    if session.source == "reference" and not same_shape:
        raise MmkitError(f"the shipped DyVTE gates do not fit this reference model (hidden {gates.hidden_size}, "
                         f"{gates.num_layers} layers); train new ones {how}")
    if session.source != "reference" and not (same_shape and _fingerprint_matches(gates, session.model)):
        raise MmkitError(f"DyVTE gates ship only for the reference model; train gates for "
                         f"{session.source or 'this model'} {how}")
    return gates


# ---------------------------------------------------------------------------------------------------------------
# Method


class DyVTEHandle:
    """Per-row visual-token exit during prefill. `last_exit_layers[b]` is the layer from which row b of the last
    prefill ran without visual tokens (None: it never exited)."""

    def __init__(self, session, config: DyVTEConfig):
        from mmkit.patching.token_drop import TokenDropper

        self.config = config
        adapter = session.adapter
        if config.min_layer >= adapter.num_layers:
            raise ValueError(f"dyvte min_layer={config.min_layer} is past the last decoder layer; this model has "
                             f"{adapter.num_layers}")
        self._session = session
        self._ctx = session.context
        self.gates: ExitGates | None = None
        if config.gates is None:
            self._set_gates(default_gates(session), "shipped with mmkit")
        elif config.gates != EXPORTED:
            self._set_gates(load_gates(config.gates), f"from {config.gates}")
        # Exported models get their gates through `load_state`; until then the candidate layers are every layer the
        # gates could cover, and `_select` refuses to run without gates.
        layers = self.gates.layers if self.gates is not None else range(1, adapter.num_layers)
        self.candidates = tuple(l for l in layers if l >= config.min_layer)
        if not self.candidates:
            raise ValueError(f"dyvte min_layer={config.min_layer} leaves no gated layer (gates cover "
                             f"{'/'.join(map(str, layers))})")
        self._exit: torch.Tensor | None = None  # (B,) exit layer per row of the current prefill, -1 = none yet
        self.dropper = TokenDropper(session.context, adapter.decoder_layers,
                                          {l: self._select for l in self.candidates})
        self._ctx.on_prefill(id(self), self._reset)

    def _set_gates(self, gates: ExitGates, where: str) -> None:
        check_gates_match(gates, self._session, where)
        self.gates = gates.to(self._session.device).eval().requires_grad_(False)

    def _reset(self, ctx) -> None:
        self._exit = None

    @property
    def last_exit_layers(self) -> list[int | None]:
        if self._exit is None:
            return []
        return [None if e < 0 else int(e) for e in self._exit.tolist()]

    def _select(self, layer_idx: int, hidden: torch.Tensor, image_mask: torch.Tensor,
                valid: torch.Tensor | None) -> Selection:
        if self.gates is None:
            raise RuntimeError("dyvte: gates=exported but no gates were loaded; load the export with mmkit.load(DIR)")
        batch, n, _ = hidden.shape
        identity = Selection(keep=torch.arange(n, device=hidden.device).expand(batch, n))
        if self._exit is None:
            self._exit = torch.full((batch,), -1, dtype=torch.long, device=hidden.device)
        if layer_idx not in self.gates.layers:
            return identity  # exported placeholder layer the loaded gates do not cover
        real = self._real_tokens(batch, n, hidden.device, valid)
        n_image = (image_mask & real).sum(1)
        pending = (self._exit < 0) & (n_image > 0)
        if not bool(pending.any()):  # one host read per gated layer, as the official per-layer check
            return identity
        features = gate_features(hidden, image_mask, real)
        prob = torch.sigmoid(self.gates.logits_at(self.gates.slot(layer_idx), features))
        fire = pending & (prob > self.config.threshold)
        if not bool(fire.any()):
            return identity
        self._exit = torch.where(fire, torch.full_like(self._exit, layer_idx), self._exit)
        keep_counts = torch.where(self._exit >= 0, torch.zeros_like(n_image), n_image)
        return keep_top_visual(torch.zeros(batch, n, device=hidden.device), image_mask, keep_counts, valid)

    def _real_tokens(self, batch: int, n: int, device, valid: torch.Tensor | None) -> torch.Tensor:
        """(B, n) True on real tokens of the current sequence (not left padding, not padded slots)."""
        mask = self._ctx.attention_mask
        if mask is None:
            real = torch.ones(batch, n, dtype=torch.bool, device=device)
        else:
            real = mask.to(device).bool()
            if self.dropper.index is not None:
                real = real.gather(1, self.dropper.index)
        return real if valid is None else real & valid

    # -- persistence -----------------------------------------------------------------------------------------
    def export_config(self) -> DyVTEConfig:
        # The gates travel as method state, so the exported config must not point at a local path.
        return dataclasses.replace(self.config, gates=EXPORTED)

    def export_state(self) -> dict[str, torch.Tensor]:
        if self.gates is None:
            raise MmkitError("dyvte has no gates to export; load them first")
        return self.gates.state_tensors()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        gates = ExitGates.from_state_tensors({k: v.cpu() for k, v in tensors.items()}, where="exported state")
        missing = [l for l in gates.layers if l >= self.config.min_layer and l not in self.candidates]
        if missing:
            raise MmkitError(f"exported DyVTE gates cover layers {list(gates.layers)}, which this handle does not "
                             "schedule; re-apply dyvte with these gates")
        self._set_gates(gates, "from the exported model")

    def remove(self) -> None:
        self.dropper.remove()
        self._ctx.drop_callback(id(self))
        self._exit = None


def apply_dyvte(session, config: DyVTEConfig) -> DyVTEHandle:
    """Attach DyVTE gates to a session's model; `remove()` on the result restores it exactly."""
    return DyVTEHandle(session, config)


register_method(
    "dyvte", DyVTEConfig, apply_dyvte, kind="pruning",
    description="Learned per-layer gates drop all image tokens of a sample once its text no longer needs them "
                "(DyVTE).",
    slots=("llm_token_drop",),
)
