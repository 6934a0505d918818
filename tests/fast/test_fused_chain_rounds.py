"""The fused greedy rounds of the chain drafters: draft-model speculative decoding
(:meth:`FastDraftModelDrafter.fused_round`) and MagicDec (:meth:`FastMagicDecDrafter.fused_round`).

It must give exactly what the unfused round gives -- the same drafts (so the same accept lengths, round by
round) and the same tokens as the reference and vanilla -- through the prompt's first round (catch-up fed
before the round), short catch-ups inside the round (1 to gamma + 1 tokens), the last rounds (fewer tokens
left than gamma) and an EOS; MagicDec's while its StreamingLLM view still grows (run eagerly) and once it is
full (one shape). On CPU the body runs eagerly under the Triton interpreter; ``-m gpu`` runs it as
CUDA graphs in bf16.
"""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.ref as ref
from lossless import tiny_model
from specdec.fast.magicdec import FastMagicDecDrafter
from specdec.fast.speculative import FastDraftModelDrafter

VOCAB = 64
REPETITIVE = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]


def _model(family, seed, device="cpu", dtype=torch.float32):
    hidden = 64 if device == "cpu" else 128   # the Triton interpreter's work per pass halves at hidden 64 (head_dim 32)
    m = tiny_model(family, vocab=VOCAB, layers=1, hidden=hidden, heads=2, kv_heads=1, seed=seed, init_std=0.3, max_pos=2048)
    m.weights = {k: v.to(device=device, dtype=dtype) for k, v in m.weights.items()}
    return m


def _count_bodies(monkeypatch):
    """Turn fusing on and count the fused bodies run eagerly and the unfused proposals."""
    calls = {"body": 0, "propose": 0}
    body, propose = FastDraftModelDrafter._body, FastDraftModelDrafter.propose

    def counted_body(self, *a, **kw):
        calls["body"] += 1
        return body(self, *a, **kw)

    def counted_propose(self, *a, **kw):
        calls["propose"] += 1
        return propose(self, *a, **kw)

    monkeypatch.setattr(FastDraftModelDrafter, "fuse_rounds", True)
    monkeypatch.setattr(FastDraftModelDrafter, "_body", counted_body)
    monkeypatch.setattr(FastDraftModelDrafter, "propose", counted_propose)
    return calls


@pytest.mark.parametrize("family,prompt,gamma,max_gen_len", [("qwen2", REPETITIVE, 3, 11), ("llama", REPETITIVE[:3], 4, 9),
                                                              ("llama", REPETITIVE[:1], 2, 7)],
                         ids=["long-prompt-qwen2", "short-prompt", "one-token"])
def test_fused_round_equals_unfused_reference_and_vanilla(family, prompt, gamma, max_gen_len, monkeypatch):
    target, draft = _model(family, 1), _model(family, 2)
    ft, fd = fast.as_fast_model(target), fast.as_fast_model(draft)
    ids = torch.tensor([prompt])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=max_gen_len, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    want = ref.speculative_generate(target, draft, gamma=gamma, **kw)
    unfused = fast.speculative_generate(ft, fd, gamma=gamma, **kw)
    calls = _count_bodies(monkeypatch)
    fused = fast.speculative_generate(ft, fd, gamma=gamma, **kw)
    assert calls["propose"] == 0 and calls["body"] == fused.num - 1    # every round after the first token fused
    assert torch.equal(want.output_ids, vanilla) and torch.equal(unfused.output_ids, vanilla)
    assert torch.equal(fused.output_ids, vanilla)
    assert fused.accept_lengths == unfused.accept_lengths == want.accept_lengths   # the same drafts, round by round
    assert fused.count == unfused.count and fused.num == unfused.num


def test_fused_round_full_acceptance_and_eos(monkeypatch):
    """The target as its own draft: every draft is accepted, so each catch-up is gamma + 1 tokens (the
    longest one inside the round); an EOS emitted mid-chain stops the output exactly where vanilla stops."""
    target = _model("llama", 3)
    ft = fast.as_fast_model(target)
    ids = torch.tensor([REPETITIVE[:6]])
    kw = dict(input_ids=ids, prompt_length=6, max_gen_len=12, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    calls = _count_bodies(monkeypatch)
    res = fast.speculative_generate(ft, ft, gamma=3, **kw)
    assert torch.equal(res.output_ids, vanilla) and calls["body"] >= 2
    assert res.accept_lengths[1:-1] == [4] * (len(res.accept_lengths) - 2)   # rounds accept all 3 drafts + 1
    eos = int(vanilla[0, 6 + 5])
    kw_eos = dict(kw, eos_id=[eos])
    want = ref.vanilla_generate(target, **kw_eos).output_ids
    assert torch.equal(fast.speculative_generate(ft, ft, gamma=3, **kw_eos).output_ids, want)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "stepwise"])
def test_draft_model_reads_the_prompt_in_the_prefill(fuse, monkeypatch):
    """Both paths' draft-model drafters read the prompt in their ``prefill`` hook (timed with the prefill):
    called once, it leaves exactly the tokens before the first root in the draft cache, so the first round's
    catch-up feeds the root alone; outputs and accept lengths stay the reference's and vanilla's."""
    from specdec.ref.speculative import DraftModelDrafter

    target, draft = _model("llama", 1), _model("llama", 2)
    ft, fd = fast.as_fast_model(target), fast.as_fast_model(draft)
    ids = torch.tensor([REPETITIVE])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=9, eos_id=[], gamma=3)
    seen = {"fast prefill": [], "fast plans": [], "ref prefill": [], "ref feeds": []}
    f_prefill, f_plan = FastDraftModelDrafter.prefill, FastDraftModelDrafter._catch_up_plan
    r_prefill, r_catch_up = DraftModelDrafter.prefill, DraftModelDrafter._catch_up

    def fast_prefill(self, state):
        f_prefill(self, state)
        seen["fast prefill"].append((self.cache.length, list(self.cached)))

    def ref_prefill(self, state):
        r_prefill(self, state)
        seen["ref prefill"].append((self.cache.length, list(self.cached)))

    def ref_catch_up(self, tokens):
        before = self.cache.length
        out = r_catch_up(self, tokens)
        seen["ref feeds"].append(self.cache.length - before)
        return out

    monkeypatch.setattr(FastDraftModelDrafter, "fuse_rounds", fuse)
    monkeypatch.setattr(FastDraftModelDrafter, "prefill", fast_prefill)
    monkeypatch.setattr(FastDraftModelDrafter, "_catch_up_plan", lambda self, st: seen["fast plans"].append(f_plan(self, st)) or seen["fast plans"][-1])
    monkeypatch.setattr(DraftModelDrafter, "prefill", ref_prefill)
    monkeypatch.setattr(DraftModelDrafter, "_catch_up", ref_catch_up)
    got = fast.speculative_generate(ft, fd, **kw)
    want = ref.speculative_generate(target, draft, **kw)
    vanilla = ref.vanilla_generate(target, ids, ids.shape[1], max_gen_len=9, eos_id=[]).output_ids
    prompt = REPETITIVE
    assert seen["fast prefill"] == [(len(prompt), prompt)] and seen["ref prefill"] == [(len(prompt), prompt)]
    first_root = int(vanilla[0, 0])
    # (the reference's prefill hook is its catch-up on the prompt: its first feed is the prompt, then the root)
    assert seen["fast plans"][0] == [first_root] and seen["ref feeds"][:2] == [len(prompt), 1]
    assert torch.equal(got.output_ids, vanilla) and torch.equal(want.output_ids, vanilla)
    assert got.accept_lengths == want.accept_lengths


def test_fused_round_defaults_follow_the_gpu_measurement(monkeypatch):
    """Both chain drafters fuse by default (faster on the GPU); the flag is the only switch: off, no fused
    round is offered."""
    assert FastDraftModelDrafter.fuse_rounds is True and FastMagicDecDrafter.fuse_rounds is True
    ft = fast.as_fast_model(_model("llama", 4))
    monkeypatch.setattr(FastDraftModelDrafter, "fuse_rounds", False)
    monkeypatch.setattr(FastMagicDecDrafter, "fuse_rounds", False)
    assert FastDraftModelDrafter(ft, 3, 64).fused_round(None, 4) is None
    assert FastMagicDecDrafter(ft, 3, 2, 6).fused_round(None, 4) is None


def _round_lengths(prompt_len: int, accept_lengths: list[int]) -> list[int]:
    """The verified length L at the start of each round (the first accept length is the prefill's token)."""
    out, L = [], prompt_len
    for a in accept_lengths[1:]:
        out.append(L)
        L += a
    return out


@pytest.mark.parametrize("prompt,max_gen_len", [(REPETITIVE, 12), (REPETITIVE[:2], 10)], ids=["view-full", "view-growing"])
def test_fused_magicdec_round_equals_unfused_reference_and_vanilla(prompt, max_gen_len, monkeypatch):
    """sink 2 + window 6: a 17-token prompt has a full view from the first round (one shape, every round
    fused); a 2-token one grows its view round by round, those rounds stepwise, then fuses once it fills.
    Seed 20: the full view's rounds accept 3, 0, 1, 1, 0, 0 drafts (catch-ups of 4, 1 and 2 tokens)."""
    target = _model("llama", 20)
    ft = fast.as_fast_model(target)
    ids = torch.tensor([prompt])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=max_gen_len, eos_id=[], gamma=3, sink_tokens=2, window=6)
    vanilla = ref.vanilla_generate(target, ids, ids.shape[1], max_gen_len=max_gen_len, eos_id=[]).output_ids
    want = ref.magicdec_generate(target, **kw)
    unfused = fast.magicdec_generate(ft, **kw)
    calls = {"body": 0, "propose": 0}
    body, propose = FastMagicDecDrafter._body, FastMagicDecDrafter.propose
    monkeypatch.setattr(FastMagicDecDrafter, "fuse_rounds", True)
    monkeypatch.setattr(FastMagicDecDrafter, "_body", lambda self, *a: (calls.__setitem__("body", calls["body"] + 1), body(self, *a))[1])
    monkeypatch.setattr(FastMagicDecDrafter, "propose", lambda self, *a: (calls.__setitem__("propose", calls["propose"] + 1),
                                                                        propose(self, *a))[1])
    fused = fast.magicdec_generate(ft, **kw)
    growing = sum(1 for n in _round_lengths(ids.shape[1], unfused.accept_lengths) if n < 2 + 6)
    assert calls["propose"] == growing and calls["body"] == fused.num - 1 - growing
    assert calls["body"] > 0 and (growing > 0) == (ids.shape[1] < 8)
    assert torch.equal(want.output_ids, vanilla) and torch.equal(unfused.output_ids, vanilla)
    assert torch.equal(fused.output_ids, vanilla)
    assert fused.accept_lengths == unfused.accept_lengths == want.accept_lengths


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_round_graphs_equal_unfused(dtype, monkeypatch):
    """On CUDA the fused round is one graph per catch-up shape: same output and accept lengths as the unfused
    rounds (bf16 too: the decode phase is row-invariant), graphs reused by a second call."""
    target, draft = _model("llama", 1, "cuda", dtype), _model("llama", 2, "cuda", dtype)
    ft, fd = fast.as_fast_model(target), fast.as_fast_model(draft)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 300), generator=g).cuda()
    kw = dict(input_ids=ids, prompt_length=300, max_gen_len=64, eos_id=[])
    vanilla = fast.vanilla_generate(ft, **kw).output_ids
    unfused = fast.speculative_generate(ft, fd, gamma=4, **kw)
    monkeypatch.setattr(FastDraftModelDrafter, "fuse_rounds", True)
    fused = fast.speculative_generate(ft, fd, gamma=4, **kw)
    assert torch.equal(unfused.output_ids, vanilla) and torch.equal(fused.output_ids, vanilla)
    assert fused.accept_lengths == unfused.accept_lengths
    bodies = {key: b for key, b in fd.graphs.items() if isinstance(key, tuple) and "fused-draft-round" in key}
    assert bodies and all(b.graph is not None for b in bodies.values())
    again = fast.speculative_generate(ft, fd, gamma=4, **kw)
    assert torch.equal(again.output_ids, vanilla) and again.accept_lengths == fused.accept_lengths
    assert all(fd.graphs[key] is b for key, b in bodies.items())   # the first call's graphs replayed, not recaptured


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_magicdec_round_graph_equals_unfused(dtype, monkeypatch):
    """On CUDA the full-view MagicDec round is one graph: same output and accept lengths as unfused rounds."""
    ft = fast.as_fast_model(_model("llama", 5, "cuda", dtype))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 400), generator=g).cuda()
    kw = dict(input_ids=ids, prompt_length=400, max_gen_len=64, eos_id=[], gamma=3, sink_tokens=4, window=64)
    vanilla = fast.vanilla_generate(ft, ids, 400, max_gen_len=64, eos_id=[]).output_ids
    unfused = fast.magicdec_generate(ft, **kw)
    monkeypatch.setattr(FastMagicDecDrafter, "fuse_rounds", True)
    fused = fast.magicdec_generate(ft, **kw)
    assert torch.equal(unfused.output_ids, vanilla) and torch.equal(fused.output_ids, vanilla)
    assert fused.accept_lengths == unfused.accept_lengths
    bodies = [b for key, b in ft.graphs.items() if isinstance(key, tuple) and "fused-magicdec-round" in key]
    assert len(bodies) == 1 and bodies[0].graph is not None
