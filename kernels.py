"""
Optional Triton fast paths for nanoseek. The PyTorch code in mla.py / moe.py is the spec and the fallback;
nothing here is imported unless Triton is, and the model only calls in through usable(x).
"""
import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def usable(x):
    """Take the Triton path for this tensor? Only on CUDA with Triton importable (TRITON_INTERPRET tests call the
    kernels directly)."""
    return HAS_TRITON and x.is_cuda
