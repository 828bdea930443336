"""The GPU engine: a streaming executor (``streaming.py``) that moves tensors from the memory map through pinned
staging buffers to the GPU and back under a hard ``--max-gpu-memory`` budget (``plan.py``), and fused merges
(``fused.py``) whose passes call one kernel backend (``kernels.py``: native CUDA, Triton, or the torch twins
that also run on CPU tensors, which is how the planning and chunk order are tested without a GPU)."""
