"""Fused kernels (Triton; optional compiled CUDA extension) and their torch references.

Each op lives in its own module with a torch reference, an autograd Function where it has a
backward, and a dispatcher choosing Triton (on CUDA, or under ``TRITON_INTERPRET=1``), the CUDA
extension (when built) or the reference. Import the op modules directly; this package imports
nothing heavy so that ``TRITON_INTERPRET`` can still be set before any kernel is decorated.
"""
