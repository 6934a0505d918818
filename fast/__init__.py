"""specdec.fast -- the production path: Triton kernels, static KV caches, CUDA graphs.

Same public names and signatures as :mod:`specdec.ref` (switching is one import line) and
token-identical greedy output. On a machine without CUDA the fast path still runs: the Triton
kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` is set here, before the kernels
are imported, unless you set it yourself) and CUDA graphs are off.
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from specdec.fast.model import FastModel, as_fast_model, forward, load_model  # noqa: E402,F401
from specdec.fast.vanilla import vanilla_generate  # noqa: E402,F401
from specdec.fast.kernels import tree_attention  # noqa: E402,F401
from specdec.fast.engine import run_speculative_fast  # noqa: E402,F401
from specdec.fast.speculative import speculative_generate  # noqa: E402,F401
from specdec.fast.pld import pld_generate  # noqa: E402,F401
from specdec.fast.logitspec import logitspec_generate  # noqa: E402,F401
from specdec.fast.glide import load_glide, spec_generate, tree_spec_generate  # noqa: E402,F401
from specdec.fast.magicdec import magicdec_generate  # noqa: E402,F401
from specdec.fast.longspec import LlamaGlide, Qwen2Glide  # noqa: E402,F401
