"""A frozen-base approximation of VISOR (VISion On Request, arXiv 2603.23495): visual tokens are kept whole but take
part in only the first k decoder layers; in every later layer the text reads them through a small learned
cross-attention block. This is not the paper's design (a fine-tuned LLM with a few self-attention layers placed
through the depth and selected per sample, and cross-attention on a small set of layers); see "Differences" below.

Per sample, a budget k (1 <= k <= L, L decoder layers) sets how many decoder layers run self-attention over
image + text and so update the visual states: layers 0 .. k-1. From layer k on the decoder sequence carries text
tokens only, and before each of those layers every text token reads all visual states (as they left layer k-1)
through that layer's cross-attention block: RMSNorm, own q/k/v/o projections, rotary positions of the original
sequence, added to the residual stream through a tanh gate that starts at zero. The read is causal: a text token
reads only the visual tokens before it in the sequence, so the text before the image (system prompt) reads none. No visual token is discarded; the
image is read by cross-attention instead of being carried through the layer. k = L is the unmodified model.

The budget is either fixed (`budget=k`) or picked per sample by a light policy (`budget=policy`): a 2-layer MLP on
the text states at the input of layer 1 (mean of the text after the image, and the last position) gives, for each
k < L, the probability that budget k answers as the full model does; the smallest k above `threshold` is used,
else L. One set of cross-attention blocks serves every budget (trained with a budget sampled per step); blocks and
policy are trained with `mmkit train-visor` (see `mmkit.pruning.visor_train`) and ship for the reference model in
`mmkit/models/weights/visor/reference/`.

Mechanics: the text-only layers are TokenDropper layers that drop every visual token of a row at its budget layer
(so positions, masks and the KV cache of the remaining text are handled as for the other pruning methods); the
cross-attention blocks are forward pre-hooks that run after the dropper's. Each row's visual K/V are projected once
per block at prefill and cached for decoding. Rows of a batch keep their own budgets (padded slots, as DyVTE), so a
batched call equals single-sample calls.

Differences from the paper (why this is an approximation): the base model stays frozen (the paper fine-tunes the
LLM), so the self-attention layers are the first k rather than placed through the depth: with frozen weights a
layer must receive visual states from the layer below it, as in the model's own training. Cross-attention runs on
every layer after the budget, not on a small chosen set. The policy reads layer-1 text states (the paper's
policy input is not specified in detail here) and is fit on self-made labels (smallest budget whose teacher-forced
answer equals the full model's greedy answer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmkit.errors import MmkitError
from mmkit.models.shipped import shipped_dir
from mmkit.patching.token_drop import Selection, TokenDropper, keep_top_visual, layer_hidden, with_layer_hidden
from mmkit.registry import register_method

logger = logging.getLogger(__name__)

SHIPPED_DIR = shipped_dir("visor")
WEIGHTS_FILE = "visor.safetensors"
WEIGHTS_INFO = "visor.json"
POLICY = "policy"
# `weights=` value of an exported model: the weights arrive through `load_state` from the export directory.
EXPORTED = "exported"
# Relative tolerance of the weight fingerprint tying VISOR weights to the model they were trained on.
FINGERPRINT_RTOL = 1e-2
TRAIN_HINT = "train them with `mmkit train-visor --model {model} --out DIR` and pass visor:weights=DIR"


@dataclass
class VISORConfig:
    """VISOR: text reads all visual tokens through learned cross-attention; only k layers update visual tokens."""

    budget: int | str = field(
        default=POLICY,
        metadata={"help": "self-attention layers that update visual tokens (1..num_layers; num_layers = the full "
                          "model), or 'policy' to let the learned policy pick it per sample"},
    )
    threshold: float = field(
        default=0.5, metadata={"help": "policy: smallest budget whose sufficiency probability exceeds this"}
    )
    weights: str | None = field(
        default=None,
        metadata={"help": "VISOR weights (.safetensors) or a `mmkit train-visor` output directory; None = the "
                          "shipped weights of the reference model; 'exported' = weights saved with an export"},
    )

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, str)):
            raise ValueError(f"budget must be an integer >= 1 or 'policy', got {self.budget!r}")
        if isinstance(self.budget, str):
            text = self.budget.strip()
            if text.isdigit():
                self.budget = int(text)
            elif text == POLICY:
                self.budget = POLICY
            else:
                raise ValueError(f"budget must be an integer >= 1 or 'policy', got {self.budget!r}")
        if isinstance(self.budget, int) and self.budget < 1:
            raise ValueError(f"budget must be >= 1 (layer 0 always updates the visual tokens), got {self.budget}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights.strip()):
            raise ValueError(f"weights must be a path to VISOR weights or None, got {self.weights!r}")


# ---------------------------------------------------------------------------------------------------------------
# Learned parts


class CrossAttention(nn.Module):
    """Text -> visual cross-attention with a zero-initialised tanh gate: at init the block adds nothing."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.q_norm = nn.Parameter(torch.ones(hidden_size))
        self.k_norm = nn.Parameter(torch.ones(hidden_size))
        self.wq = nn.Linear(hidden_size, inner, bias=False)
        self.wk = nn.Linear(hidden_size, inner, bias=False)
        self.wv = nn.Linear(hidden_size, inner, bias=False)
        self.wo = nn.Linear(inner, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * weight

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        return x.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, visual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """K, V (B, H, V, hd) of visual states (B, V, d) at rotary angles cos/sin (B, V, hd)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        x = self._norm(visual, self.k_norm)
        k, v = self._heads(self.wk(x)), self._heads(self.wv(x))
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        return k, v

    def forward(self, text: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_ok: torch.Tensor) -> torch.Tensor:
        """Gated residual update (B, n, d) for text states (B, n, d).

        key_ok (B, n, V) says which visual keys each text token may read (causal order: only keys that precede it
        in the sequence); a (B, V) mask applies to every token. A token that may read no key gets no update.
        """
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if key_ok.dim() == 2:
            key_ok = key_ok[:, None, :].expand(-1, text.shape[1], -1)
        reads = key_ok.any(-1)                                              # (B, n)
        # SDPA needs one allowed key per query; tokens that read nothing get key 0 and their output is zeroed.
        mask = key_ok.clone()
        mask[..., 0] |= ~reads
        q = self._heads(self.wq(self._norm(text, self.q_norm)))
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        out = out.transpose(1, 2).reshape(text.shape[0], text.shape[1], -1)
        out = out * reads[..., None].to(out.dtype)
        return torch.tanh(self.gate).to(text.dtype) * self.wo(out)


class BudgetPolicy(nn.Module):
    """Per-sample budget: logit k-1 says "budget k answers as the full model does" (k = 1 .. L-1)."""

    def __init__(self, hidden_size: int, num_layers: int, width: int = 64):
        super().__init__()
        d_in = 2 * hidden_size
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, num_layers - 1)
        self.register_buffer("mu", torch.zeros(d_in))
        self.register_buffer("sigma", torch.ones(d_in))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.mu) / self.sigma
        return self.fc2(nn.functional.gelu(self.fc1(x)))

    def pick(self, features: torch.Tensor, threshold: float) -> torch.Tensor:
        """Budget per row (B,): the smallest sufficient k, or L when none is."""
        ok = torch.sigmoid(self(features)) > threshold
        num_layers = ok.shape[1] + 1
        ks = torch.arange(1, num_layers, device=ok.device)
        return torch.where(ok, ks, torch.full_like(ks, num_layers)).min(1).values


class VISORWeights(nn.Module):
    """Cross-attention blocks for decoder layers 1 .. L-1 and the budget policy of one backbone."""

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int, head_dim: int, eps: float = 1e-6,
                 policy_width: int = 64, fingerprint: float = float("nan")):
        super().__init__()
        if num_layers < 2:
            raise MmkitError(f"VISOR needs a decoder of at least 2 layers, this one has {num_layers}")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.num_heads, self.head_dim, self.eps = int(num_heads), int(head_dim), float(eps)
        self.fingerprint = float(fingerprint)
        self.blocks = nn.ModuleDict({str(l): CrossAttention(hidden_size, num_heads, head_dim, eps)
                                     for l in range(1, num_layers)})
        self.policy = BudgetPolicy(hidden_size, num_layers, policy_width)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim"):
            out[f"meta.{name}"] = torch.tensor(getattr(self, name), dtype=torch.int64)
        out["meta.policy_width"] = torch.tensor(self.policy.fc1.out_features, dtype=torch.int64)
        out["meta.eps"] = torch.tensor(self.eps, dtype=torch.float64)
        out["meta.fingerprint"] = torch.tensor(self.fingerprint, dtype=torch.float64)
        return out

    @classmethod
    def from_state_tensors(cls, tensors: dict[str, torch.Tensor], where: str = "weights") -> "VISORWeights":
        meta = ("hidden_size", "num_layers", "num_heads", "head_dim", "policy_width", "eps")
        missing = [f"meta.{m}" for m in meta if f"meta.{m}" not in tensors]
        if missing:
            raise MmkitError(f"{where} is not a VISOR weights file (missing {', '.join(missing)}); "
                             "make one with `mmkit train-visor`")
        weights = cls(int(tensors["meta.hidden_size"]), int(tensors["meta.num_layers"]),
                      int(tensors["meta.num_heads"]), int(tensors["meta.head_dim"]), float(tensors["meta.eps"]),
                      int(tensors["meta.policy_width"]),
                      float(tensors.get("meta.fingerprint", torch.tensor(float("nan")))))
        state = {k: v for k, v in tensors.items() if not k.startswith("meta.")}
        try:
            weights.load_state_dict(state)
        except RuntimeError:
            raise MmkitError(f"{where} does not hold a complete VISOR state; re-run `mmkit train-visor`") from None
        return weights.eval().requires_grad_(False)  # loaded weights are for inference


def model_fingerprint(model: torch.nn.Module) -> float:
    """Mean |w| of the input embeddings: identifies a trained model, not just its shape."""
    return float(model.get_input_embeddings().weight.detach().double().abs().mean())


def new_weights(session, policy_width: int = 64) -> VISORWeights:
    """Untrained VISOR weights sized for `session`'s backbone (gates at zero: the blocks add nothing yet)."""
    adapter = session.adapter
    text = adapter.text_config
    return VISORWeights(adapter.hidden_size, adapter.num_layers, int(text.num_attention_heads), adapter.head_dim,
                        float(getattr(text, "rms_norm_eps", 1e-6)), policy_width,
                        model_fingerprint(session.model))


def load_weights(path: str | Path, model: str = "MODEL") -> VISORWeights:
    """Read VISOR weights from a `.safetensors` file or a directory holding `visor.safetensors`."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise MmkitError(f"no VISOR weights at {path}; " + TRAIN_HINT.format(model=model))
    try:
        tensors = load_file(str(file))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise MmkitError(f"{file} is not a readable safetensors file ({type(err).__name__}); re-run "
                         "`mmkit train-visor`") from None
    return VISORWeights.from_state_tensors(tensors, where=str(file))


def _shape_matches(weights: VISORWeights, session) -> bool:
    adapter = session.adapter
    return (weights.hidden_size, weights.num_layers, weights.head_dim) == \
        (adapter.hidden_size, adapter.num_layers, adapter.head_dim)


def _fingerprint_matches(weights: VISORWeights, model) -> bool:
    return not math.isfinite(weights.fingerprint) or \
        math.isclose(model_fingerprint(model), weights.fingerprint, rel_tol=FINGERPRINT_RTOL)


def check_weights_match(weights: VISORWeights, session, where: str) -> None:
    adapter = session.adapter
    if not _shape_matches(weights, session):
        raise MmkitError(
            f"VISOR weights {where} were trained for a {weights.num_layers}-layer, hidden-{weights.hidden_size} "
            f"model; this one has {adapter.num_layers} layers, hidden {adapter.hidden_size}. VISOR weights for it: "
            + TRAIN_HINT.format(model=session.source or "MODEL"))
    if not _fingerprint_matches(weights, session.model):
        logger.warning("VISOR weights %s were trained on different weights of this architecture; answers may be "
                       "poor", where)


def default_weights(session) -> VISORWeights:
    """The shipped weights, if this session's model is the one they were trained on."""
    file = SHIPPED_DIR / "reference" / WEIGHTS_FILE
    hint = TRAIN_HINT.format(model=session.source or "MODEL")
    if not file.is_file():
        raise MmkitError(f"no shipped VISOR weights in this install; {hint}")
    weights = load_weights(file)
    if not (_shape_matches(weights, session) and
            (session.source == "reference" or _fingerprint_matches(weights, session.model)
             and math.isfinite(weights.fingerprint))):
        raise MmkitError(f"VISOR weights ship only for the reference model, not {session.source or 'this model'}; "
                         f"{hint}")
    return weights


def text_features(hidden: torch.Tensor, image_mask: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Policy input (B, 2d): mean of the text after the last image token (last position excluded), and the last
    position; `real` (B, n) marks non-padding tokens. The same reduction DyVTE's gates use."""
    from mmkit.pruning.dyvte import gate_features

    return gate_features(hidden, image_mask, real)


# ---------------------------------------------------------------------------------------------------------------
# Method


class VISORHandle:
    """VISOR on a session's model. `last_budgets` are the budgets of the rows of the last prefill."""

    def __init__(self, session, config: VISORConfig, weights: VISORWeights | None = None):
        adapter = session.adapter
        self.config = config
        self._session = session
        self._ctx = session.context
        self.num_layers = adapter.num_layers
        if isinstance(config.budget, int) and config.budget > self.num_layers:
            raise ValueError(f"visor budget={config.budget} exceeds the {self.num_layers} decoder layers")
        self.weights: VISORWeights | None = None
        if weights is not None:
            self._set_weights(weights, "given", keep_dtype=True)
        elif config.weights is None:
            self._set_weights(default_weights(session), "shipped with mmkit")
        elif config.weights != EXPORTED:
            self._set_weights(load_weights(config.weights, session.source or "MODEL"), f"from {config.weights}")
        # Set by training to run a chosen budget per row, overriding the config.
        self.force_budgets: torch.Tensor | None = None
        self._reset(self._ctx)
        layers = adapter.decoder_layers
        candidates = range(1, self.num_layers)
        # Registration order is run order: position stash, then the token dropper, then cross-attention.
        self._hooks = [layers[l].register_forward_pre_hook(self._stash_hook(l), with_kwargs=True) for l in candidates]
        self.dropper = TokenDropper(self._ctx, layers, {l: self._select for l in candidates})
        self._hooks += [layers[l].register_forward_pre_hook(self._cross_hook(l), with_kwargs=True)
                        for l in candidates]
        self._ctx.on_prefill(id(self), self._reset)

    def _set_weights(self, weights: VISORWeights, where: str, keep_dtype: bool = False) -> None:
        check_weights_match(weights, self._session, where)
        weights = weights.to(self._session.device)
        if not keep_dtype:
            weights = weights.to(self._session.dtype).eval().requires_grad_(False)
            weights.policy.float()  # the policy standardises features in float32
        self.weights = weights

    def _reset(self, ctx) -> None:
        self._budget: torch.Tensor | None = None       # (B,) budget per row of the current prefill
        self._budget_host: list[int] = []
        self._positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._key_ok: torch.Tensor | None = None        # (B, Vmax) real visual keys per row
        self._key_pos: torch.Tensor | None = None       # (B, Vmax) original sequence index of each visual key
        self._n_visual: torch.Tensor | None = None      # (B,) visual tokens each row reads by cross-attention

    @property
    def last_budgets(self) -> list[int]:
        return list(self._budget_host)

    # -- budgets -------------------------------------------------------------------------------------------------
    def _decide(self, hidden: torch.Tensor, image_mask: torch.Tensor, valid) -> None:
        batch = hidden.shape[0]
        if self.force_budgets is not None:
            budget = self.force_budgets.to(hidden.device).long()
        elif isinstance(self.config.budget, int):
            budget = torch.full((batch,), self.config.budget, dtype=torch.long, device=hidden.device)
        else:
            self._require_weights()
            real = self._ctx.attention_mask.to(hidden.device).bool() if self._ctx.attention_mask is not None else None
            if real is not None and self.dropper.index is not None:
                real = real.gather(1, self.dropper.index)
            if valid is not None:
                real = valid if real is None else real & valid
            with torch.no_grad():
                budget = self.weights.policy.pick(text_features(hidden, image_mask, real), self.config.threshold)
        self._budget = budget
        self._budget_host = budget.tolist()  # one host read per prefill; the selectors branch on it

    def _require_weights(self) -> None:
        if self.weights is None:
            raise RuntimeError("visor: weights=exported but none were loaded; load the export with mmkit.load(DIR)")

    # -- hooks -----------------------------------------------------------------------------------------------
    def _stash_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if self._ctx.prefill:
                # Full-length rotary angles of this layer's input: visual keys keep their original positions.
                self._positions[layer_idx] = kwargs["position_embeddings"]
            return None

        return hook

    def _select(self, layer_idx: int, hidden: torch.Tensor, image_mask: torch.Tensor, valid) -> Selection:
        batch, n, _ = hidden.shape
        if self._budget is None:
            self._decide(hidden, image_mask, valid)
        identity = Selection(keep=torch.arange(n, device=hidden.device).expand(batch, n))
        rows = [b for b, k in enumerate(self._budget_host) if k == layer_idx]
        if not rows:
            return identity
        self._capture(layer_idx, rows, hidden, image_mask, valid)
        n_image = image_mask.sum(1) if valid is None else (image_mask & valid).sum(1)
        keep_counts = torch.where(self._budget <= layer_idx, torch.zeros_like(n_image), n_image)
        return keep_top_visual(torch.zeros(batch, n, device=hidden.device), image_mask, keep_counts, valid)

    def _capture(self, layer_idx: int, rows: list[int], hidden, image_mask, valid) -> None:
        """Project the visual states of `rows` (entering their budget layer) to K/V of every later block."""
        self._require_weights()
        batch = hidden.shape[0]
        counts = self._ctx.image_counts
        v_max = max(max(counts), 1)
        if self._key_ok is None:
            self._key_ok = torch.zeros(batch, v_max, dtype=torch.bool, device=hidden.device)
            self._key_pos = torch.full((batch, v_max), torch.iinfo(torch.long).max, dtype=torch.long,
                                       device=hidden.device)
            self._n_visual = torch.zeros(batch, dtype=torch.long, device=hidden.device)
        cos_full, sin_full = self._positions[layer_idx]
        order = self.dropper.index
        for b in rows:
            is_image = image_mask[b] if valid is None else image_mask[b] & valid[b]
            cur = is_image.nonzero().flatten()
            if cur.numel() == 0:
                continue
            orig = cur if order is None else order[b, cur]
            src = 0 if cos_full.shape[0] == 1 else b
            cos, sin = cos_full[src, orig][None], sin_full[src, orig][None]
            visual = hidden[b, cur][None]
            m = cur.numel()
            self._key_ok[b, :m] = True
            self._key_pos[b, :m] = orig
            self._n_visual[b] = m
            for later in range(layer_idx, self.num_layers):
                k, v = self.weights.blocks[str(later)].keys_values(visual, cos, sin)
                if later not in self._kv:
                    shape = (batch, k.shape[1], v_max, k.shape[3])
                    self._kv[later] = (k.new_zeros(shape), v.new_zeros(shape))
                kb, vb = self._kv[later]
                # Out of place, so autograd (training) sees every row's keys.
                kb = torch.cat([kb[:b], torch.cat([k, kb[b:b + 1, :, m:]], 2), kb[b + 1:]], 0)
                vb = torch.cat([vb[:b], torch.cat([v, vb[b:b + 1, :, m:]], 2), vb[b + 1:]], 0)
                self._kv[later] = (kb, vb)

    def _cross_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if self._budget is None or layer_idx not in self._kv:
                return None  # no row reads the image by cross-attention at this layer
            active = (self._budget <= layer_idx) & (self._n_visual > 0)
            hidden = layer_hidden(args, kwargs)
            k, v = self._kv[layer_idx]
            key_ok = self._key_ok
            if self._ctx.prefill:
                # Causal order: a text token reads only the visual tokens before it in the original sequence
                # (the system prompt before the image reads nothing). Decoded tokens come after every image.
                n = hidden.shape[1]
                index = self.dropper.index
                query_pos = index if index is not None else torch.arange(n, device=hidden.device)[None]
                key_ok = key_ok[:, None, :] & (self._key_pos[:, None, :] < query_pos.to(hidden.device)[:, :, None])
            cos, sin = kwargs["position_embeddings"]
            block = self.weights.blocks[str(layer_idx)]
            update = block(hidden, cos, sin, k.to(hidden.dtype), v.to(hidden.dtype), key_ok)
            hidden = hidden + update * active[:, None, None].to(hidden.dtype)
            if self._ctx.prefill:
                self._ctx.record_cross(layer_idx, torch.where(active, self._n_visual, 0))
            return with_layer_hidden(args, kwargs, hidden)

        return hook

    # -- persistence -----------------------------------------------------------------------------------------
    def export_config(self) -> VISORConfig:
        # The weights travel as method state, so the exported config must not point at a local path.
        return dataclasses.replace(self.config, weights=EXPORTED)

    def export_state(self) -> dict[str, torch.Tensor]:
        self._require_weights()
        return self.weights.state_tensors()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        weights = VISORWeights.from_state_tensors({k: v.cpu() for k, v in tensors.items()}, where="exported state")
        self._set_weights(weights, "from the exported model")

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.dropper.remove()
        self._ctx.drop_callback(id(self))
        self._reset(self._ctx)


def apply_visor(session, config: VISORConfig) -> VISORHandle:
    """Attach VISOR to a session's model; `remove()` on the result restores it exactly."""
    return VISORHandle(session, config)


register_method(
    "visor", VISORConfig, apply_visor, kind="pruning",
    description="VISOR approximation on a frozen LLM: the first k layers (k per sample) self-attend over the image, "
                "later layers read it through learned causal cross-attention (the paper places a few self-attention "
                "layers through a fine-tuned LLM).",
    slots=("llm_token_drop",),
)
