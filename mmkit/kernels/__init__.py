"""mmkit kernels: each op has a torch reference and, where it pays, a Triton kernel picked on CUDA.

Importing this package never imports triton and never touches CUDA; `dispatch.choose_backend` decides per call
(`MMKIT_KERNEL_BACKEND=torch|triton` overrides it).
"""

from mmkit.kernels.attention_mass.op import subset_attention_mass
from mmkit.kernels.compaction.op import Compaction, gather_tokens, kept_count, topk_compact
from mmkit.kernels.dispatch import choose_backend
from mmkit.kernels.score_mod.op import scaled_attention
from mmkit.kernels.sink_redistribution.op import redistributed_attention

__all__ = ["Compaction", "choose_backend", "gather_tokens", "kept_count", "redistributed_attention",
           "scaled_attention",
           "subset_attention_mass", "topk_compact"]
