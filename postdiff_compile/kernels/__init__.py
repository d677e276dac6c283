"""Kernels, each beside its torch reference: transition_ref (readable equations), transition_triton (the
fused Triton kernel), transition_op (the custom op that dispatches between them). Nothing here imports
triton at package import time."""
