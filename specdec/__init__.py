"""specdec: speculative decoding for Llama- and Qwen2-family LLMs.

Two twin implementations with the same public API:

* :mod:`specdec.ref`  -- readable, pure PyTorch, step by step (read the algorithms here);
* :mod:`specdec.fast` -- Triton kernels, static caches and CUDA graphs (swap into production).

Rules both share (configs, weight loading, tree topology, sampling and acceptance) live in
:mod:`specdec.shared`.
"""

__version__ = "0.1.0"
