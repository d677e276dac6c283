"""Test-session setup that must happen before any test module is imported."""
import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The variable is read when triton.language
# defines its own jit functions (tl.randn, ...), i.e. when triton is first imported, which torch may do
# for an earlier test module; so it is set here, before collection, not in the kernel tests' module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
