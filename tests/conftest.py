"""Test-wide setup.

Triton kernels run under the interpreter on machines without a GPU. TRITON_INTERPRET must be set
before any ``@triton.jit`` decorator runs, i.e. before megatron_vrft.ops modules are imported, which
is why it lives here rather than in the tests that need it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
