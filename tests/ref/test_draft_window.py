"""``speculative_generate(draft_window=W)`` on the reference path: the draft model reads only the last ``W``
prompt tokens (at draft positions 0..W-1) and every token after them; verification is unchanged, so greedy
output is exactly vanilla's. Also: a window at least as long as the prompt is no window at all (the same
drafts), a short one changes the drafts, each batch row keeps its own offset, and bad values raise."""

from __future__ import annotations

import pytest
import torch

import specdec.ref as ref
from lossless import tiny_model
from specdec.ref.engine import run_speculative
from specdec.ref.speculative import DraftModelDrafter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V = 64


@pytest.fixture(scope="module")
def default_models():
    """The embedded default target and its draft LM (a real draft: most drafts are accepted)."""
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer("default")
    text = ("import os\nimport sys\n\n\ndef list_files(root, pattern=None):\n    \"\"\"Every file under root.\"\"\"\n"
            "    out = []\n    for dirpath, dirnames, filenames in os.walk(root):\n        for name in filenames:\n"
            "            if pattern is None or name.endswith(pattern):\n                out.append(os.path.join(dirpath, name))\n"
            "    return out\n\n\ndef count_lines(path):\n    with open(path) as f:\n        return sum(1 for _ in f)\n\n\n"
            "def main(argv):\n    root = argv[1] if len(argv) > 1 else '.'\n    for path in list_files(root, '.py'):\n")
    ids = torch.tensor([encode_prompt(tok, text)])
    return ref.load_model("default"), ref.load_model("default-draft"), ids


@pytest.fixture(scope="module")
def tiny():
    target = tiny_model("llama", vocab=V, seed=0, init_std=0.3)
    draft = tiny_model("llama", vocab=V, seed=2, layers=1, hidden=16, heads=2, kv_heads=1, init_std=0.3)
    return target, draft


def test_greedy_with_a_window_equals_vanilla_and_a_long_window_is_no_window(default_models):
    target, draft, ids = default_models
    n = ids.shape[1]
    assert n > 64
    kw = dict(input_ids=ids, prompt_length=n, max_gen_len=20, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    whole = ref.speculative_generate(target, draft, **kw)
    assert torch.equal(whole.output_ids, vanilla)
    for w in (8, 32):
        res = ref.speculative_generate(target, draft, draft_window=w, **kw)
        assert torch.equal(res.output_ids, vanilla), w
        assert res.count == int(res.spec_mask.sum())
    # W >= the tokens before the root (n - 1 with first_target): offset 0, the same drafts as no window
    for w in (n - 1, n, 10 * n):
        res = ref.speculative_generate(target, draft, draft_window=w, **kw)
        assert torch.equal(res.output_ids, vanilla) and res.accept_lengths == whole.accept_lengths, w
    # a short window changes what the draft sees, so its drafts (the real draft loses most of its context)
    short = ref.speculative_generate(target, draft, draft_window=8, **kw)
    assert short.accept_lengths != whole.accept_lengths


@pytest.mark.parametrize("first_target", [True, False])
def test_draft_cache_holds_the_window_at_positions_from_zero(tiny, first_target):
    """After the prefill the draft cache holds exactly W rows (the last W tokens before the root), and every
    chain is the draft model's own greedy continuation of the windowed context -- run as a fresh sequence, so
    at positions 0, 1, ... -- through rollbacks."""
    target, draft = tiny
    p = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(3))
    w = 7
    drafter = DraftModelDrafter(draft, gamma=3, draft_window=w)
    prefill = drafter.prefill
    after_prefill = []

    def spy(state):
        prefill(state)
        after_prefill.append((drafter.cache.length, drafter.offset, len(state.tokens)))

    drafter.prefill = spy
    rounds = []
    res = run_speculative(target, drafter, p, 30, max_gen_len=16, eos_id=[], first_target=first_target,
                          on_round=lambda rec: rounds.append(rec))
    before_root = 30 if first_target else 29   # first_target: the target's first token is the first root
    assert after_prefill == [(w, before_root - w, before_root + 1)]
    seq = p[0].tolist() + res.output_ids[0].tolist()
    emitted = 30 + (1 if first_target else 0)
    for rec in rounds:
        context = seq[:emitted]
        window = context[before_root - w:]           # the draft's view: the window, then everything after it
        expect, s = [], list(window)
        for _ in range(len(rec.draft.tokens) - 1):
            s.append(int(ref.forward(draft, torch.tensor([s]))[0, -1].argmax()))
            expect.append(s[-1])
        assert rec.draft.tokens[0].item() == context[-1]
        assert rec.draft.tokens[1:].tolist() == expect
        emitted += rec.accepted + 1
    assert drafter.cache.length == len(drafter.cached) - drafter.offset
    assert torch.equal(res.output_ids, ref.vanilla_generate(target, p, 30, max_gen_len=16, eos_id=[]).output_ids)


def test_batch_rows_keep_their_own_offsets(tiny):
    target, draft = tiny
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (23, 9)]
    kw = dict(max_gen_len=12, eos_id=[])
    batch = ref.speculative_generate(target, draft, prompts, None, gamma=3, draft_window=6, **kw)
    batch_self = ref.speculative_generate(target, target, prompts, None, gamma=3, draft_window=6, **kw)
    for b, p in enumerate(prompts):
        vanilla = ref.vanilla_generate(target, p[None], p.numel(), **kw).output_ids
        alone = ref.speculative_generate(target, target, p[None], p.numel(), gamma=3, draft_window=6, **kw)
        assert torch.equal(batch.row(b).output_ids, vanilla), b
        assert torch.equal(batch_self.row(b).output_ids, vanilla), b
        # each row drafts exactly as it would alone (its own window offset)
        assert batch_self.row(b).accept_lengths == alone.accept_lengths, b


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                                     ("8", TypeError)])
def test_bad_draft_window_raises_naming_it(tiny, bad, err):
    target, draft = tiny
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(err, match=r"draft_window must be None .*an int >= 1"):
        ref.speculative_generate(target, draft, ids, 4, max_gen_len=2, draft_window=bad)
