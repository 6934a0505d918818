"""``fast.speculative_generate(draft_window=W)`` must match the reference's rule exactly: the same drafts (so
the same accept lengths, round by round) and the same tokens as ``ref`` with the same window and as vanilla --
through the fused greedy rounds (their body run eagerly on the CPU, under the Triton interpreter) and the
stepwise ones, where every position comes from the draft cache's length, not the token's index."""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.ref as ref
from lossless import tiny_model
from specdec.fast.speculative import FastDraftModelDrafter

VOCAB = 64
REPETITIVE = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]


def _model(seed: int):
    # 1 layer, hidden 64 (head_dim 32): the Triton interpreter's work per pass stays small
    return tiny_model("llama", vocab=VOCAB, layers=1, hidden=64, heads=2, kv_heads=1, seed=seed, init_std=0.3, max_pos=2048)


@pytest.fixture(scope="module")
def models():
    target, draft = _model(1), _model(2)
    return target, draft, fast.as_fast_model(target), fast.as_fast_model(draft)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "stepwise"])
def test_fast_window_equals_ref_window_and_vanilla(models, fuse, monkeypatch):
    target, _, ft, _ = models
    ids = torch.tensor([REPETITIVE])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=6, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    monkeypatch.setattr(FastDraftModelDrafter, "fuse_rounds", fuse)
    prefill, seen = FastDraftModelDrafter.prefill, []

    def spy(self, state):
        prefill(self, state)
        seen.append((self.cache.length, self.offset))

    monkeypatch.setattr(FastDraftModelDrafter, "prefill", spy)
    body, bodies = FastDraftModelDrafter._body, []
    monkeypatch.setattr(FastDraftModelDrafter, "_body", lambda self, *a: bodies.append(1) or body(self, *a))
    # the target as its own draft, windowed: it accepts some drafts and not others (rounds of 1, 2, 2, 1 tokens),
    # so the rollbacks keep keep - offset rows and the catch-ups feed several tokens (inside the fused round)
    w = 8
    want = ref.speculative_generate(target, target, gamma=3, draft_window=w, **kw)
    got = fast.speculative_generate(ft, ft, gamma=3, draft_window=w, **kw)
    assert torch.equal(want.output_ids, vanilla) and torch.equal(got.output_ids, want.output_ids)
    assert got.accept_lengths == want.accept_lengths   # the same drafts, round by round
    assert 1 < max(want.accept_lengths) < 4            # some drafts accepted, some rejected
    assert got.count == int(got.spec_mask.sum())
    assert seen == [(w, len(REPETITIVE) - w)]          # the window only, at draft rows (= positions) 0..W-1
    assert (len(bodies) == got.num - 1) if fuse else not bodies   # fused: every round after the first token


def test_fast_window_batch_equals_rows_alone(models):
    target, _, ft, _ = models
    prompts = [torch.tensor(REPETITIVE), torch.tensor(REPETITIVE[3:9])]
    kw = dict(max_gen_len=6, eos_id=[])
    batch = fast.speculative_generate(ft, ft, prompts, None, gamma=2, draft_window=4, **kw)
    want = ref.speculative_generate(target, target, prompts, None, gamma=2, draft_window=4, **kw)
    for b, p in enumerate(prompts):
        vanilla = ref.vanilla_generate(target, p[None], p.numel(), **kw).output_ids
        assert torch.equal(batch.row(b).output_ids, vanilla), b
        assert batch.row(b).accept_lengths == want.row(b).accept_lengths, b


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_fast_bad_draft_window_raises(models, bad):
    _, _, ft, fd = models
    with pytest.raises((ValueError, TypeError), match="draft_window"):
        fast.speculative_generate(ft, fd, torch.tensor([[1, 2, 3]]), 3, max_gen_len=2, draft_window=bad)


@pytest.mark.gpu
def test_gpu_bf16_window_equals_vanilla_on_the_default_model():
    """CUDA, bf16, the embedded models, fused greedy rounds on CUDA graphs: with the draft reading only the last
    256 prompt tokens, every output is fast vanilla's token for token (the exactness contract, docs/design.md §8),
    on held-out prompts longer than the window, and the draft still gets drafts accepted."""
    from specdec.bench import load_questions
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer("default")
    target = fast.load_model("default", dtype=torch.bfloat16, device="cuda")
    draft = fast.load_model("default-draft", dtype=torch.bfloat16, device="cuda")
    taus = []
    for q in load_questions("stdlib_long")[:3]:
        ids = torch.tensor([encode_prompt(tok, q["turns"][0])], device="cuda")
        assert ids.shape[1] > 256
        kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=64, eos_id=[])
        want = fast.vanilla_generate(target, **kw).output_ids
        got = fast.speculative_generate(target, draft, gamma=4, draft_window=256, **kw)
        assert torch.equal(got.output_ids, want)
        taus.append(got.tau)
    assert max(taus) > 1.5, taus
