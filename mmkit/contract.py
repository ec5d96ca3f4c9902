"""What a method implementation provides: the contract between methods and the session, export and CLI.

A method is registered with a config dataclass and `apply_fn(session, config) -> implementation`. The
implementation always provides `MethodImpl` (removal, restoring the model bit-exactly). Optional parts are typed
protocols, checked with `isinstance`, never `hasattr`:

- `Branching`: decodes over several input branches (VCD, AGLA, VHR): `expand_inputs` returns k * B rows,
  branch-major (rows [j*B, (j+1)*B) are branch j, branch 0 the original input); `combine_logits` merges the
  branches' next-token logits (k*B, V) -> (B, V). All branches then receive the chosen token.
- `ExportsConfig`: the config to save instead of the one applied (e.g. with a shipped file resolved).
- `ExportsState`: learned or calibrated tensors saved with an export and loaded back.

What a method does to the model is declared on its registry entry (`mmkit.registry.Capabilities`: acts before the
LLM, drops tokens inside it, edits attention, branches logits, needs calibration). The session checks at `apply`
that an implementation provides the protocols its capabilities promise, and refuses pairs that cannot run together
before any forward.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class MethodImpl(Protocol):
    def remove(self) -> None:
        """Detach everything the method installed; the model is bit-exactly as before `apply`."""


@runtime_checkable
class Branching(Protocol):
    def expand_inputs(self, session, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The k branches of a batch, branch-major (k * B rows; branch 0 is `inputs`)."""

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Next-token logits of every branch (k*B, V) -> the logits to decode from (B, V)."""


@runtime_checkable
class ExportsConfig(Protocol):
    def export_config(self) -> Any:
        """The config object to write into an export."""


@runtime_checkable
class ExportsState(Protocol):
    def export_state(self) -> dict[str, torch.Tensor] | None:
        """Tensors to save with an export (None or empty: nothing to save)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore tensors saved by `export_state`."""


def check_implementation(name: str, capabilities, impl) -> None:
    """Raise TypeError when `impl` does not provide what the method's registry entry promises."""
    if not isinstance(impl, MethodImpl):
        raise TypeError(f"method {name}: its apply function returned {type(impl).__name__} without remove()")
    branches = isinstance(impl, Branching)
    if capabilities.branches_logits != branches:
        promise = "declares" if capabilities.branches_logits else "does not declare"
        raise TypeError(f"method {name} {promise} branches_logits but its implementation "
                        f"{'lacks' if not branches else 'has'} expand_inputs/combine_logits")
