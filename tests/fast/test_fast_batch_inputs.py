"""Issue 19 on the fast path: the same input forms as the reference (shared/batch.py), one public API.

Fast ``vanilla_generate`` decodes a batch of prompts of different lengths (row by row equal to the
reference's batch and to each prompt alone, keyed sampling too); every other fast decoder refuses
B > 1 with one ValueError pointing at the reference path (issue 19), and still takes a batch of
one in any form. CPU: the kernels run under the Triton interpreter, so the models are tiny.
"""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.ref as ref
from lossless import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 64
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6], [3], [12, 13, 14, 15, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.fixture(scope="module")
def pair():
    m = tiny_model("llama", vocab=VOCAB, layers=1, hidden=128, heads=2, kv_heads=1, seed=1, init_std=0.3, max_pos=256)
    return m, fast.as_fast_model(m)


def _padded(prompts):
    t = max(len(p) for p in prompts)
    return torch.tensor([p + [0] * (t - len(p)) for p in prompts]), [len(p) for p in prompts]


def test_fast_vanilla_ragged_batch_equals_ref_and_alone(pair):
    target, ftarget = pair
    ids, lengths = _padded(PROMPTS)
    alone = [ref.vanilla_generate(target, [p], None, max_gen_len=6, eos_id=[]).output_ids for p in PROMPTS]
    eos = int(alone[2][0, 2])  # row 2 stops at its third token (or earlier if it emitted that token before)
    kw = dict(max_gen_len=6, eos_id=[eos])
    rr = ref.vanilla_generate(target, ids, lengths, **kw)
    for form in ((ids, lengths), (ids, torch.tensor(lengths)), (PROMPTS, None), ([torch.tensor(p) for p in PROMPTS], lengths)):
        ff = fast.vanilla_generate(ftarget, *form, **kw)
        assert torch.equal(ff.output_ids, rr.output_ids), form
        assert ff.row_lengths == rr.row_lengths and ff.row_nums == rr.row_nums
    assert rr.row_lengths[2] <= 3 and rr.output_ids[2, rr.row_lengths[2] - 1] == eos
    for b, p in enumerate(PROMPTS):
        one = ref.vanilla_generate(target, [p], len(p), **kw)
        assert torch.equal(rr.row(b).output_ids, one.output_ids), b


def test_fast_vanilla_keyed_rows_keep_their_sequence_ids(pair):
    target, ftarget = pair
    kw = dict(max_gen_len=5, eos_id=[], temperature=1.0, sampling="keyed", seed=11)
    rr = ref.vanilla_generate(target, PROMPTS, None, **kw)
    ff = fast.vanilla_generate(ftarget, PROMPTS, None, **kw)
    assert torch.equal(ff.output_ids, rr.output_ids)  # groups by length, but row b is still sequence b
    assert torch.equal(ff.row(0).output_ids, fast.vanilla_generate(ftarget, [PROMPTS[0]], None, **kw).output_ids)


def test_fast_speculative_decoders_refuse_batches_with_one_message(pair):
    target, ftarget = pair
    calls = [
        ("speculative decoding", lambda **kw: fast.speculative_generate(ftarget, ftarget, gamma=2, **kw)),
        ("prompt lookup decoding", lambda **kw: fast.pld_generate(ftarget, num_pred_tokens=3, **kw)),
        ("LogitSpec", lambda **kw: fast.logitspec_generate(ftarget, draft_tree_capacity=4, num_pred_tokens=3, **kw)),
        ("magicdec_generate", lambda **kw: fast.magicdec_generate(ftarget, gamma=2, sink_tokens=1, window=4, **kw)),
    ]
    ids, lengths = _padded(PROMPTS[:2])
    for method, call in calls:
        for form in (dict(input_ids=ids, prompt_length=lengths), dict(input_ids=PROMPTS[:2], prompt_length=None)):
            with pytest.raises(ValueError, match=rf"{method} supports batch size 1, got batch size 2: batching of this "
                                                 r"method is in the reference path only for now \(specdec.ref, issue 19\)"):
                call(max_gen_len=3, eos_id=[], **form)
        # a batch of one in any accepted form still runs, and equals the reference
        one = call(input_ids=[PROMPTS[0]], prompt_length=[len(PROMPTS[0])], max_gen_len=3, eos_id=[])
        assert torch.equal(one.output_ids, ref.vanilla_generate(target, PROMPTS[0], len(PROMPTS[0]), max_gen_len=3, eos_id=[]).output_ids), method


def test_fast_bad_lengths_name_the_argument(pair):
    _, ftarget = pair
    ids, _ = _padded(PROMPTS[:2])
    with pytest.raises(ValueError, match=r"prompt_length\[1\] must be in \[1, 9\]"):
        fast.vanilla_generate(ftarget, ids, [9, 0], max_gen_len=2)
    with pytest.raises(ValueError, match=r"prompt_length = 9 is longer than row 1 of input_ids \(1 tokens\)"):
        fast.vanilla_generate(ftarget, PROMPTS[:2], 9, max_gen_len=2)
