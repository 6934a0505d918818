"""specdec.ref -- the readable reference: pure PyTorch, step by step.

Every decoder is one file you can read top to bottom. The fast path (:mod:`specdec.fast`) has
the same public names and must produce token-identical greedy output.
"""

from specdec.ref.attention import masked_attention, tree_attention, tree_attention_merged, tree_attention_full  # noqa: F401
from specdec.ref.model import KVCache, Model, as_model, forward, forward_step, load_model  # noqa: F401,E402
from specdec.ref.vanilla import vanilla_generate  # noqa: F401,E402
from specdec.ref.engine import Draft, RoundRecord, RoundState, run_speculative  # the round types live in specdec.shared.round  # noqa: F401,E402
from specdec.ref.speculative import speculative_generate  # noqa: F401,E402
from specdec.ref.pld import pld_generate  # noqa: F401,E402
from specdec.ref.logitspec import logitspec_generate  # noqa: F401,E402
from specdec.ref import romsto  # noqa: F401,E402  (romsto-compatible speculative_generate / autoregressive_generate)
from specdec.ref.glide import load_glide, spec_generate, tree_spec_generate  # noqa: F401,E402
from specdec.ref.magicdec import magicdec_generate  # noqa: F401,E402
from specdec.ref.longspec import LlamaGlide, Qwen2Glide  # noqa: F401,E402
from specdec.ref.train_glide import train_glide  # noqa: F401,E402
