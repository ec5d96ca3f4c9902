"""Kernels with a torch reference each; Triton on CUDA, the reference elsewhere. Importing never needs CUDA."""

from mmkit.kernels.attention_mass.ref import subset_attention_mass_ref as subset_attention_mass

__all__ = ["subset_attention_mass"]
