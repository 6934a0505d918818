#!/usr/bin/env python3
"""Pilot (session 25, CPU): would the draft-model chain pay on long prompts if its draft read only the last
``W`` prompt tokens? The reference ``DraftModelDrafter`` is patched here, NOT changed in the library: its prefill hook
feeds the last W tokens before the root at positions 0..W-1 (a fresh context, as the draft's random training
windows also start mid-file), and its catch-up rolls back relative to that offset. Verification is unchanged, so
every output must equal vanilla's (asserted). Three 7.4-7.7k-token held-out prompts, 64 new tokens; per prompt,
vanilla's total time and, per W (None = the whole prompt), tau, prefill, decode and total.

    python3 scripts/probes/draft_window_pilot.py
"""
import torch
import specdec.ref as ref
from specdec.ref.speculative import DraftModelDrafter
from specdec.ref.model import forward_step
from specdec.bench import load_questions
from specdec.shared.tokenizer import load_tokenizer, encode_prompt
from einops import rearrange
torch.set_grad_enabled(False)
tok = load_tokenizer("default"); target = ref.load_model("default"); draft = ref.load_model("default-draft")
W = None
orig_prefill, orig_catch = DraftModelDrafter.prefill, DraftModelDrafter._catch_up
def prefill(self, state):
    # the draft reads only the last W tokens before the root, at positions 0..W-1 (a fresh context)
    before = state.tokens[:-1]
    self.off = max(0, len(before) - W)
    self.cache.truncate(0)
    ids = torch.tensor(before[self.off:], dtype=torch.long)
    forward_step(self.model, rearrange(ids, "t -> 1 t"), self.cache, fused_attention=True)
    self.cached = list(before)
def catch_up(self, tokens):
    keep = 0
    for seen, real in zip(self.cached, tokens):
        if seen != real: break
        keep += 1
    keep = min(keep, len(tokens) - 1)
    self.cache.truncate(keep - self.off)
    new = torch.tensor(tokens[keep:], dtype=torch.long)
    logits = forward_step(self.model, rearrange(new, "t -> 1 t"), self.cache, fused_attention=True)
    self.cached = list(tokens)
    return logits[0, -1]
for q in load_questions("stdlib_long")[7:10]:
    ids = torch.tensor([encode_prompt(tok, q["turns"][0])])
    v = ref.vanilla_generate(target, ids, ids.shape[1], max_gen_len=64, eos_id=[])
    row = [ids.shape[1], f"van {v.prefill_time+v.elapsed_time:.2f}s"]
    for w in (None, 2048, 512):
        if w is None:
            DraftModelDrafter.prefill, DraftModelDrafter._catch_up = orig_prefill, orig_catch
        else:
            W = w; DraftModelDrafter.prefill, DraftModelDrafter._catch_up = prefill, catch_up
        r = ref.speculative_generate(target, draft, ids, ids.shape[1], max_gen_len=64, eos_id=[])
        assert torch.equal(r.output_ids, v.output_ids)
        row.append(f"W={w}: tau {r.tau:.2f} pre {r.prefill_time:.2f} dec {r.elapsed_time:.2f} tot {r.prefill_time+r.elapsed_time:.2f}")
    print(" | ".join(map(str,row)))
