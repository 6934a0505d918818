"""The exactness promise on the GPU (issue 18): in bf16, fp16 and fp32, every fast decoder's greedy output
is token for token fast vanilla's, on the embedded default model over 20 held-out stdlib prompts x 128
new tokens -- 100% of prompts, not a rate. (In fp32 on the CPU the same holds against the reference:
tests/fast/test_fast_decoders.py.)"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

N_PROMPTS, NEW_TOKENS, PROMPT_TOKENS = 20, 128, 192


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_decoder_equals_vanilla(dtype):
    import specdec.fast as fast
    from specdec.benchutil import exactness_prompts, fast_greedy_decoders

    target = fast.load_model("default", dtype=dtype, device="cuda")
    draft = fast.load_model("default-draft", dtype=dtype, device="cuda")
    glide = fast.load_glide("default-glide", target=target)
    methods = fast_greedy_decoders(target, draft, glide)
    kw = dict(max_gen_len=NEW_TOKENS, eos_id=[])
    diverged = {name: [] for name in methods}
    for p, ids in enumerate(exactness_prompts(N_PROMPTS, PROMPT_TOKENS)):
        want = fast.vanilla_generate(target, ids, ids.shape[1], **kw).output_ids
        assert want.shape[1] == NEW_TOKENS
        for name, run in methods.items():
            if not torch.equal(run(ids, kw).output_ids, want):
                diverged[name].append(p)
    assert diverged == {name: [] for name in methods}, f"{dtype}: prompts whose output differs from vanilla: {diverged}"
