"""Method registry: a name maps to a config dataclass and an apply function.

`parse_spec("fastv:layer=2,keep=0.25")` builds the config from a string, checking field names and types against the
dataclass, so the CLI, the Python API and saved configs share one parser.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from mmkit.errors import MmkitError

KINDS = ("pruning", "hallucination")

# Modules that register built-in methods when imported. Imported on first registry lookup, not at `import mmkit`.
BUILTIN_METHOD_MODULES = (
    "mmkit.pruning.fastv",
    "mmkit.pruning.pyramiddrop",
    "mmkit.pruning.sparsevlm",
    "mmkit.pruning.visionzip",
    "mmkit.pruning.vflowopt",
    "mmkit.pruning.dyvte",
    "mmkit.pruning.visor",
    "mmkit.pruning.divprune",
    "mmkit.pruning.cdpruner",
    "mmkit.pruning.random_prune",
    "mmkit.pruning.pooling",
    "mmkit.hallucination.vcd",
    "mmkit.hallucination.agla",
    "mmkit.hallucination.paint",
    "mmkit.hallucination.var",
    "mmkit.hallucination.vhr",
)


@dataclass(frozen=True)
class Capabilities:
    """What a method does to the model (see `mmkit.contract`)."""

    acts_before_llm: bool = False     # reduces or merges visual tokens before the language model
    drops_tokens: bool = False        # removes tokens between decoder layers
    edits_attention: bool = False     # replaces some decoder layers' attention computation
    branches_logits: bool = False     # decodes over several input branches (implements `contract.Branching`)
    needs_calibration: bool = False   # measures the model once when applied (state exported with the session)

    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]


# A slot is one thing in the model a single method may own; each implies a capability. Two methods in the same
# slot cannot be active together, for the reason given.
SLOTS = {
    "pre_llm_token_drop": ("acts_before_llm", "both choose which visual tokens enter the language model"),
    "llm_token_drop": ("drops_tokens", "both drop tokens between the same decoder layers"),
    "attention_scores": ("edits_attention", "both replace the attention computation of the same decoder layers"),
    "logit_branches": ("branches_logits", "both decide the next token from their own set of input branches"),
}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config_cls: type
    apply_fn: Callable
    kind: str
    description: str
    # Methods sharing a slot cannot be active together (e.g. two methods that both drop visual tokens inside the
    # LLM would fight over the same layers). Empty = composes with anything.
    slots: frozenset[str] = field(default_factory=frozenset)
    capabilities: Capabilities = field(default_factory=Capabilities)

    def conflict_with(self, other: "MethodInfo") -> str | None:
        """Why this method cannot be active together with `other`, or None when they compose."""
        shared = sorted(self.slots & other.slots)
        if not shared:
            return None
        reasons = "; ".join(SLOTS[s][1] for s in shared)
        return f"cannot combine {self.name} with {other.name}: {reasons}; remove one first"


_REGISTRY: dict[str, MethodInfo] = {}
_builtins_loaded = False


def register_method(
    name: str,
    config_cls: type,
    apply_fn: Callable,
    kind: str,
    description: str = "",
    slots: tuple[str, ...] = (),
    needs_calibration: bool = False,
) -> MethodInfo:
    """Register a method. `apply_fn(session, config) -> implementation` returns an object providing
    `mmkit.contract.MethodImpl` (and the protocols its capabilities promise). Capabilities follow from the slots
    (see `SLOTS`) plus `needs_calibration`."""
    if not name or not name.replace("_", "").isalnum() or name.lower() != name:
        raise ValueError(f"method name {name!r} must be lowercase letters, digits and underscores")
    if kind not in KINDS:
        raise ValueError(f"method kind {kind!r} must be one of {KINDS}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls for {name!r} must be a dataclass")
    if name in _REGISTRY and _REGISTRY[name].apply_fn is not apply_fn:
        raise ValueError(f"a different method is already registered as {name!r}")
    if not description:
        description = (config_cls.__doc__ or "").strip().splitlines()[0] if config_cls.__doc__ else ""
    unknown = set(slots) - set(SLOTS)
    if unknown:
        raise ValueError(f"unknown slots {sorted(unknown)} for {name!r}; known: {', '.join(SLOTS)}")
    flags = {SLOTS[s][0]: True for s in slots}
    capabilities = Capabilities(needs_calibration=needs_calibration, **flags)
    info = MethodInfo(name, config_cls, apply_fn, kind, description, frozenset(slots), capabilities)
    _REGISTRY[name] = info
    return info


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_METHOD_MODULES:
            # A listed module that is not part of this install is skipped; one that exists must import cleanly.
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)


def list_methods() -> list[MethodInfo]:
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda m: (KINDS.index(m.kind), m.name))


def get_method(name: str) -> MethodInfo:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise MmkitError(f"unknown method {name!r}; known methods: {known}") from None


def method_for_config(config: Any) -> MethodInfo:
    _load_builtins()
    for info in _REGISTRY.values():
        if type(config) is info.config_cls:
            return info
    raise MmkitError(f"{type(config).__name__} is not the config of a registered method")


def _convert(value: str, annotation: Any, where: str) -> Any:
    """Convert one spec string to the annotated field type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for candidate in non_none:
            try:
                return _convert(value, candidate, where)
            except MmkitError as err:
                errors.append(str(err))
        raise MmkitError(errors[0])
    if origin is typing.Literal:
        if value not in [str(a) for a in args]:
            raise MmkitError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
        return next(a for a in args if str(a) == value)
    if origin in (tuple, list):
        items = [v for v in value.replace("/", " ").replace("+", " ").split()] if value else []
        item_type = args[0] if args else str
        converted = [_convert(v, item_type, where) for v in items]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool:
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise MmkitError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        try:
            return int(value)
        except ValueError:
            raise MmkitError(f"{where} must be an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except ValueError:
            raise MmkitError(f"{where} must be a number, got {value!r}") from None
    if annotation is str:
        return value
    raise MmkitError(f"{where} cannot be set from a string")


def parse_spec(spec: str) -> Any:
    """Parse `name[:field=value,field=value]` into the method's config dataclass (validated)."""
    if not isinstance(spec, str) or not spec.strip():
        raise MmkitError("method spec is empty; use NAME or NAME:field=value,...")
    name, _, rest = spec.strip().partition(":")
    info = get_method(name.strip())
    hints = typing.get_type_hints(info.config_cls)
    fields = {f.name for f in dataclasses.fields(info.config_cls) if f.init}
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq:
            raise MmkitError(f"in method spec {spec!r}: {part!r} must look like field=value")
        if key not in fields:
            raise MmkitError(
                f"method {info.name!r} has no field {key!r}; fields: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(value.strip(), hints[key], f"{info.name}.{key}")
    return build_config(info, kwargs)


def build_config(info: MethodInfo, kwargs: dict[str, Any]) -> Any:
    """Instantiate a config, turning validation errors into user-facing ones."""
    try:
        return info.config_cls(**kwargs)
    except MmkitError:
        raise
    except (TypeError, ValueError) as err:
        raise MmkitError(f"bad {info.name} setting: {err}") from None


def config_to_spec(config: Any) -> str:
    """Inverse of `parse_spec` for fields that differ from their defaults."""
    info = method_for_config(config)
    # A config whose fields come from a file (vflowopt's tuned `config=`) names the file, not every value it set.
    default = config.spec_baseline() if hasattr(config, "spec_baseline") else info.config_cls()
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.init and value != getattr(default, f.name):
            if isinstance(value, (tuple, list)):
                value = "/".join(str(v) for v in value)
            parts.append(f"{f.name}={value}")
    return info.name + (":" + ",".join(parts) if parts else "")


def config_to_dict(config: Any) -> dict[str, Any]:
    info = method_for_config(config)
    return {"method": info.name, "config": dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    info = get_method(data["method"])
    cfg = dict(data.get("config", {}))
    hints = typing.get_type_hints(info.config_cls)
    for key, value in cfg.items():
        if isinstance(value, list) and typing.get_origin(hints.get(key)) is tuple:
            cfg[key] = tuple(value)
    return build_config(info, cfg)
