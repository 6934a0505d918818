"""Issue 19, reference path: every decoder takes a batch of prompts of different lengths.

On the embedded default model (fp32, CPU): each row of a batch -- one prompt hits an EOS early, one
is a single token -- equals that prompt decoded alone (tokens, spec_mask, count, num, accept lengths)
and equals vanilla decoding; the per-row fields and totals of the result add up; keyed sampling gives
each row vanilla keyed sampling's tokens for its sequence id, whatever its batch-mates; bad batch
input is a ValueError / TypeError naming the argument.
"""

from __future__ import annotations

import pytest
import torch

import specdec.ref as ref
from specdec.ref.engine import run_speculative
from specdec.shared.retrieval import PromptLookupDrafter
from specdec.shared.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GEN = 12
TEXTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "import os\nimport sys\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
]
EOS_ROW = 1  # the row made to stop early (an EOS among its first 4 tokens)


@pytest.fixture(scope="module")
def setup():
    target = ref.load_model("default")
    draft = ref.load_model("default-draft")
    glide = ref.load_glide("default-glide", target)
    tok = load_tokenizer("default")
    prompts = [list(tok(t).input_ids) for t in TEXTS]
    prompts.append(prompts[0][:1])  # a prompt of length 1
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths) and min(lengths) == 1
    # The EOS: a token the EOS row emits early and no other row emits (so the others run to GEN).
    free = [ref.vanilla_generate(target, [p], None, max_gen_len=GEN, eos_id=[]).output_ids[0].tolist() for p in prompts]
    others = {t for b, f in enumerate(free) if b != EOS_ROW for t in f}
    eos = next(t for t in free[EOS_ROW][1:4] if t not in others)
    decoders = {
        "vanilla": lambda **kw: ref.vanilla_generate(target, **kw),
        "speculative": lambda **kw: ref.speculative_generate(target, draft, gamma=3, **kw),
        "spec": lambda **kw: ref.spec_generate(target, glide, gamma=3, **kw),
        "tree_spec": lambda **kw: ref.tree_spec_generate(target, glide, tree_shape=(4, 8, 8), **kw),
        "pld": lambda **kw: ref.pld_generate(target, num_pred_tokens=6, **kw),
        "logitspec": lambda **kw: ref.logitspec_generate(target, draft_tree_capacity=16, num_pred_tokens=6, **kw),
        "magicdec": lambda **kw: ref.magicdec_generate(target, gamma=3, sink_tokens=2, window=8, **kw),
    }
    vanilla = [ref.vanilla_generate(target, torch.tensor([p]), len(p), max_gen_len=GEN, eos_id=[eos]) for p in prompts]
    return dict(target=target, prompts=prompts, eos=eos, decoders=decoders, vanilla=vanilla)


def _padded(prompts, pad=0):
    t = max(len(p) for p in prompts)
    return torch.tensor([p + [pad] * (t - len(p)) for p in prompts]), [len(p) for p in prompts]


NAMES = ["vanilla", "speculative", "spec", "tree_spec", "pld", "logitspec", "magicdec"]


@pytest.mark.parametrize("name", NAMES)
def test_each_row_equals_the_prompt_alone_and_vanilla(setup, name):
    fn, prompts, eos = setup["decoders"][name], setup["prompts"], setup["eos"]
    ids, lengths = _padded(prompts, pad=4095)  # the padding is a real token id: it must never be read
    res = fn(input_ids=ids, prompt_length=lengths, max_gen_len=GEN, eos_id=[eos])
    B = len(prompts)
    assert res.output_ids.shape == (B, max(res.row_lengths)) and res.spec_mask.shape == res.output_ids.shape
    assert res.row_lengths[EOS_ROW] <= 4 and res.output_ids[EOS_ROW, res.row_lengths[EOS_ROW] - 1] == eos
    assert max(res.row_lengths) == GEN  # another row ran to max_gen_len
    for b, p in enumerate(prompts):
        alone = fn(input_ids=torch.tensor([p]), prompt_length=len(p), max_gen_len=GEN, eos_id=[eos])
        row = res.row(b)
        assert torch.equal(row.output_ids, alone.output_ids), (name, b)
        assert torch.equal(row.output_ids, setup["vanilla"][b].output_ids), (name, b)
        assert torch.equal(row.spec_mask, alone.spec_mask), (name, b)
        assert (row.count, row.num, row.accept_lengths) == (alone.count, alone.num, alone.accept_lengths), (name, b)
        assert res.row_taus[b] == alone.tau
        # padding after a short row: its EOS, never a spec token
        n = res.row_lengths[b]
        assert bool((res.output_ids[b, n:] == res.output_ids[b, n - 1]).all()) and not bool(res.spec_mask[b, n:].any())
    # totals
    assert res.count == int(res.spec_mask.sum()) == sum(res.row_counts)
    assert res.num == max(res.row_nums)  # one verification pass serves every unfinished row
    assert res.tau == sum(res.row_lengths) / sum(res.row_nums) and res.num_tokens == sum(res.row_lengths)
    assert sum(res.accept_lengths) == sum(sum(a) for a in res.row_accept_lengths)
    if name != "vanilla":
        assert res.count > 0  # the drafts did get accepted in the batch


@pytest.mark.parametrize("name", ["speculative", "logitspec"])
def test_every_input_form_gives_the_same_batch(setup, name):
    fn, prompts, eos = setup["decoders"][name], setup["prompts"], setup["eos"]
    ids, lengths = _padded(prompts)
    kw = dict(max_gen_len=6, eos_id=[eos])
    want = fn(input_ids=ids, prompt_length=lengths, **kw).output_ids
    for form in ((ids, torch.tensor(lengths)), (prompts, None), ([torch.tensor(p) for p in prompts], lengths)):
        assert torch.equal(fn(input_ids=form[0], prompt_length=form[1], **kw).output_ids, want)
    # a batch of equal-length rows with one int length (the old form)
    same = torch.tensor([prompts[0], prompts[0][::-1]])
    res = fn(input_ids=same, prompt_length=same.shape[1], **kw)
    for b in range(2):
        assert torch.equal(res.row(b).output_ids, fn(input_ids=same[b:b + 1], prompt_length=same.shape[1], **kw).output_ids)


KEYED = dict(temperature=0.8, top_k=50, top_p=0.95, sampling="keyed", seed=7)


@pytest.mark.parametrize("name", NAMES)
def test_keyed_rows_are_vanilla_keyed_whatever_the_batch(setup, name):
    """Row b is keyed sequence b: its tokens are vanilla keyed sampling's row b, alone (row 0) or next to
    other prompts (the same row of a batch whose other rows changed)."""
    fn, prompts, eos = setup["decoders"][name], setup["prompts"], setup["eos"]
    kw = dict(max_gen_len=8, eos_id=[eos], **KEYED)
    res = fn(input_ids=prompts, prompt_length=None, **kw)
    van = ref.vanilla_generate(setup["target"], prompts, None, **kw)
    for b in range(len(prompts)):
        assert torch.equal(res.row(b).output_ids, van.row(b).output_ids), (name, b)
    assert torch.equal(res.row(0).output_ids, fn(input_ids=[prompts[0]], prompt_length=None, **kw).output_ids)
    mates = [prompts[3], prompts[0], prompts[2], prompts[1][:4]]  # row 2 kept, its batch-mates changed
    assert torch.equal(fn(input_ids=mates, prompt_length=None, **kw).row(2).output_ids, res.row(2).output_ids)
    if name != "vanilla":
        assert res.count > 0


def test_keyed_output_depends_on_the_sequence_id_only(setup):
    """The engine's explicit ``seq_ids``: a prompt decoded alone as sequence b is row b of the batch, and
    a reordered batch with its ids reordered gives the same rows."""
    target, prompts, eos = setup["target"], setup["prompts"], setup["eos"]
    kw = dict(max_gen_len=8, eos_id=[eos], **KEYED)
    make = lambda: PromptLookupDrafter(3, 6)  # noqa: E731
    batch = run_speculative(target, make, prompts, None, **kw)
    van = ref.vanilla_generate(target, prompts, None, **kw)
    for b, p in enumerate(prompts):
        alone = run_speculative(target, make, [p], None, seq_ids=[b], **kw)
        assert torch.equal(alone.output_ids, batch.row(b).output_ids), b
        assert torch.equal(alone.output_ids, van.row(b).output_ids), b
    order = [2, 0, 3, 1]
    moved = run_speculative(target, make, [prompts[i] for i in order], None, seq_ids=order, **kw)
    for j, i in enumerate(order):
        assert torch.equal(moved.row(j).output_ids, batch.row(i).output_ids)
    other = run_speculative(target, make, [prompts[0]], None, seq_ids=[5], **kw)
    assert not torch.equal(other.output_ids, batch.row(0).output_ids)  # another id, other noise


def test_rejection_sampling_batch_runs_per_row(setup):
    """Rejection sampling (the default) batches too; a row's tokens come from the shared generator, so only
    their distribution (not their values) is batch-independent -- the first token of every row of a
    seeded batch is reproducible and every row ends at its EOS or max_gen_len."""
    fn, prompts, eos = setup["decoders"]["speculative"], setup["prompts"], setup["eos"]
    kw = dict(max_gen_len=8, eos_id=[eos], temperature=1.0, seed=3)
    a, b = fn(input_ids=prompts, prompt_length=None, **kw), fn(input_ids=prompts, prompt_length=None, **kw)
    assert torch.equal(a.output_ids, b.output_ids)
    for r in range(len(prompts)):
        n = a.row_lengths[r]
        assert n == 8 or a.output_ids[r, n - 1] == eos


# ---------------------------------------------------------------------------------------------
# Bad batch input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bad_batch_input_names_the_argument(setup, name):
    fn, prompts = setup["decoders"][name], setup["prompts"]
    ids, lengths = _padded(prompts[:3])
    t = ids.shape[1]
    cases = [
        (dict(input_ids=prompts[:3], prompt_length=len(prompts[0])), ValueError,
         rf"prompt_length = {len(prompts[0])} is longer than row 1 of input_ids \({len(prompts[1])} tokens\): prompts of "
         "different lengths need per-row lengths"),
        (dict(input_ids=ids, prompt_length=[lengths[0], 0, lengths[2]]), ValueError, rf"prompt_length\[1\] must be in \[1, {t}\]"),
        (dict(input_ids=ids, prompt_length=[lengths[0], t + 1, lengths[2]]), ValueError, rf"prompt_length\[1\] must be in \[1, {t}\]"),
        (dict(input_ids=ids, prompt_length=0), ValueError, rf"prompt_length must be in \[1, {t}\]"),
        (dict(input_ids=ids, prompt_length=lengths[:2]), ValueError, "got 2 lengths for 3 rows of input_ids"),
        (dict(input_ids=ids, prompt_length=torch.tensor(lengths[:2])), ValueError, r"got a tensor of shape \(2,\)"),
        (dict(input_ids=ids, prompt_length=[1.5, 2, 3]), TypeError, r"prompt_length\[0\] must be an int"),
        (dict(input_ids=[prompts[0], []], prompt_length=None), ValueError, "empty prompt: row 1 of input_ids has no tokens"),
        (dict(input_ids=[torch.tensor([1.0, 2.0])], prompt_length=None), TypeError, "input_ids must hold integer token ids"),
        (dict(input_ids=[prompts[0], [[1, 2]]], prompt_length=None), ValueError, "needs 1-D prompts, row 1"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            fn(max_gen_len=2, **kwargs)


def test_bad_drafters_and_sequence_ids(setup):
    target, prompts = setup["target"], setup["prompts"][:3]
    make = lambda: PromptLookupDrafter(3, 6)  # noqa: E731
    with pytest.raises(ValueError, match="drafter: got 2 drafters for a batch of 3 prompts"):
        run_speculative(target, [make(), make()], prompts, None, max_gen_len=2)
    with pytest.raises(ValueError, match="one drafter object supports batch size 1, got batch size 3"):
        run_speculative(target, make(), prompts, None, max_gen_len=2)
    with pytest.raises(TypeError, match="every entry of the list must be a drafter"):
        run_speculative(target, [make(), make(), 3], prompts, None, max_gen_len=2)
    with pytest.raises(ValueError, match=r"seq_ids must hold one id per row of input_ids \(3\), got 2"):
        run_speculative(target, make, prompts, None, max_gen_len=2, seq_ids=[0, 1])
    with pytest.raises(ValueError, match="seq_ids must be distinct"):
        run_speculative(target, make, prompts, None, max_gen_len=2, seq_ids=[0, 1, 1])
    with pytest.raises(ValueError, match=r"seq_ids\[2\] must be an int >= 0"):
        run_speculative(target, make, prompts, None, max_gen_len=2, seq_ids=[0, 1, -1])


# ---------------------------------------------------------------------------------------------
# Lossless sampling per row at B = 4 (rejection sampling, the default)
# ---------------------------------------------------------------------------------------------


def test_rejection_sampling_is_lossless_per_row_at_batch_4():
    """Every row of a batch of 4 prompts of different lengths follows the target's exact distribution of
    its first tokens (chi-square per row), for a chain with draft probabilities (speculative: the
    Leviathan/Chen rule) and deterministic candidates (PLD: the tree rule)."""
    from lossless import assert_matches, exact_sequence_distribution, tiny_model

    target = tiny_model("llama", vocab=8, seed=1)
    draft = tiny_model("llama", vocab=8, layers=1, seed=2)
    prompts = [[3, 1, 4, 1, 5], [7], [2, 7, 2, 7, 2, 7], [6, 0]]
    exact = [exact_sequence_distribution(target, torch.tensor([p]), 2, 1.0) for p in prompts]
    decoders = [lambda **kw: ref.speculative_generate(target, draft, gamma=2, **kw),
                lambda **kw: ref.pld_generate(target, max_ngram_size=2, num_pred_tokens=3, **kw)]
    for fn in decoders:
        gen = torch.Generator().manual_seed(0)
        samples = [[] for _ in prompts]
        for _ in range(150):
            res = fn(input_ids=prompts, prompt_length=None, max_gen_len=3, eos_id=[], temperature=1.0, generator=gen)
            for b in range(len(prompts)):
                samples[b].append(tuple(res.output_ids[b, :2].tolist()))
        for b in range(len(prompts)):
            assert_matches(samples[b], exact[b])
