"""Kernels with a torch reference each; Triton on CUDA, the reference elsewhere. Importing never needs CUDA."""
