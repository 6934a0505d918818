"""specdec: speculative decoding for Llama- and Qwen2-family LLMs.

Two twin implementations with the same public API:

* :mod:`specdec.ref`  -- readable, pure PyTorch, step by step (read the algorithms here);
* :mod:`specdec.fast` -- Triton kernels, static caches and CUDA graphs (swap into production).

Rules both share (configs, weight loading, tree topology, sampling and acceptance) live in
:mod:`specdec.shared`, the ground floor (it imports neither path). The app sits on top of both:
the ``specdec`` command line (:mod:`specdec.cli`; ``generate``, and ``bench`` / ``report`` from
:mod:`specdec.bench` and :mod:`specdec.report`), with one table of methods in :mod:`specdec.methods`.

On a machine without CUDA the fast path runs its Triton kernels under the Triton interpreter,
which must be chosen before Triton is first imported (``transformers`` imports it); importing
``specdec`` first therefore sets ``TRITON_INTERPRET=1`` when no GPU is present (set the variable
yourself to override).
"""

import os as _os
import sys as _sys

if "TRITON_INTERPRET" not in _os.environ and "triton" not in _sys.modules:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

__version__ = "0.1.0"
