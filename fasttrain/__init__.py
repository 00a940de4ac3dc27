"""fasttrain: a fast ImageNet-style classifier trainer."""
import os as _os

# Large CPU tensors (a float batch is 77 MB at 128 x 224 px; conv activations are bigger) on 2 MB
# transparent huge pages: PyTorch's CPU allocator madvises buffers >= 2 MB when this is set (torch >= 2.2;
# read once, at the first allocation, so it is set before torch is imported). Each fresh batch otherwise
# costs ~19k 4 KB page faults: 0.16 ms of CPU per image in the loader on the 2-core machine (fasttrain
# bench). An explicit THP_MEM_ALLOC_ENABLE=0 in the environment wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
