"""Issue 19's shared ground floor: the one input rule (shared/batch.py), the batch result's per-row
fields (shared/result.py) and keyed sampling per row (shared/keyed.py sample_next)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.shared.batch import PromptBatch, check_seq_ids, normalize_prompts
from specdec.shared.config import ModelConfig
from specdec.shared.keyed import keyed_choice, sample_next
from specdec.shared.result import GenerationResult
from specdec.shared.sampling import SamplingParams
from specdec.shared.validate import check_prompt

CFG = ModelConfig(model_type="llama", vocab_size=50, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=4, max_position_embeddings=32)
ROWS = [[5, 6, 7, 8], [9], [10, 11]]


def _lists(batch: PromptBatch):
    return batch.tolists()


def test_every_form_gives_the_same_prompts():
    padded = torch.tensor([[5, 6, 7, 8], [9, 0, 0, 0], [10, 11, -1, 99]])  # padding is never read (nor checked)
    forms = [
        (padded, [4, 1, 2]), (padded, (4, 1, 2)), (padded, torch.tensor([4, 1, 2])), (padded, np.array([4, 1, 2])),
        (ROWS, None), ([torch.tensor(r) for r in ROWS], None), ([torch.tensor(r) for r in ROWS], [4, 1, 2]),
        ([[5, 6, 7, 8, 1], [9, 3], [10, 11]], [4, 1, 2]),
    ]
    for ids, lengths in forms:
        b = normalize_prompts(ids, lengths, 4, CFG)
        assert _lists(b) == ROWS and b.lengths == [4, 1, 2] and not b.uniform, (ids, lengths)
    assert torch.equal(normalize_prompts(ROWS, None, 4, CFG).padded(7), torch.tensor([[5, 6, 7, 8], [9, 7, 7, 7], [10, 11, 7, 7]]))
    # the one-length forms of before: an int, a 0-d / one-element tensor, a list of ints, a [T] tensor, None
    one = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    for pl in (3, torch.tensor(3), torch.tensor([3]), np.int64(3)):
        assert _lists(normalize_prompts(one, pl, 4, CFG)) == [[1, 2, 3], [5, 6, 7]]
    assert _lists(normalize_prompts([1, 2, 3], 2, 4, CFG)) == [[1, 2]]
    assert _lists(normalize_prompts(torch.tensor([1, 2, 3]), None, 4, CFG)) == [[1, 2, 3]]
    assert _lists(normalize_prompts([[1, 2, 3], [4, 5]], 2, 4, CFG)) == [[1, 2], [4, 5]]  # an int no row is shorter than


def test_check_prompt_is_the_same_rule():
    assert torch.equal(check_prompt(torch.tensor([[1, 2, 3]]), 2, 4, CFG), torch.tensor([[1, 2]]))
    assert torch.equal(check_prompt(ROWS, None, 4, CFG), torch.tensor([[5, 6, 7, 8], [9, 0, 0, 0], [10, 11, 0, 0]]))


@pytest.mark.parametrize(
    "ids,pl,err,match",
    [
        (ROWS, 3, ValueError, r"prompt_length = 3 is longer than row 1 of input_ids \(1 tokens\): prompts of different lengths"),
        (torch.tensor([[1, 2], [3, 4]]), [2, 0], ValueError, r"prompt_length\[1\] must be in \[1, 2\] \(row 1 of input_ids has 2 tokens\), got 0"),
        (torch.tensor([[1, 2], [3, 4]]), [3, 2], ValueError, r"prompt_length\[0\] must be in \[1, 2\]"),
        (ROWS, [4, 2, 2], ValueError, r"prompt_length\[1\] must be in \[1, 1\]"),
        (torch.tensor([[1, 2], [3, 4]]), 0, ValueError, r"prompt_length must be in \[1, 2\] \(the length of input_ids\), got 0"),
        (torch.tensor([[1, 2], [3, 4]]), [1, 1, 1], ValueError, "got 3 lengths for 2 rows of input_ids"),
        (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1]]), ValueError, r"got a tensor of shape \(1, 2\)"),
        (torch.tensor([[1, 2], [3, 4]]), [1, True], TypeError, r"prompt_length\[1\] must be an int, got bool"),
        (torch.tensor([[1, 2], [3, 4]]), 1.0, TypeError, r"prompt_length must be an int or a 0-d / one-element integer tensor, got float; per-row"),
        ([[1, 2], []], None, ValueError, "empty prompt: row 1 of input_ids has no tokens"),
        ([], None, ValueError, r"empty prompt: input_ids has shape \(1, 0\)"),
        ([[1, 2], torch.tensor([0.5])], None, TypeError, "integer token ids, got dtype torch.float32 in row 1"),
        ([[1, 2], [[1]]], None, ValueError, "needs 1-D prompts, row 1 has shape"),
        ([[1, 2], [3, 50]], None, ValueError, r"token ids must be in \[0, 49\], got range \[1, 50\]"),
        ([[1] * 30, [1]], None, ValueError, "prompt_length \\+ max_gen_len = 30 \\+ 4 exceeds the model's context of 32"),
        ({1: 2}, None, TypeError, "input_ids must be a tensor"),
    ],
)
def test_bad_input_names_the_argument(ids, pl, err, match):
    with pytest.raises(err, match=match):
        normalize_prompts(ids, pl, 4, CFG)


def test_sequence_ids():
    assert check_seq_ids(None, 3) == [0, 1, 2]
    assert check_seq_ids(torch.tensor([4, 0, 9]), 3) == [4, 0, 9]
    for bad, err, match in [([0, 1], ValueError, r"one id per row of input_ids \(3\), got 2"), ([0, 0, 1], ValueError, "distinct"),
                            ([0, 1, -2], ValueError, r"seq_ids\[2\] must be an int >= 0"), (5, TypeError, "seq_ids must be None")]:
        with pytest.raises(err, match=match):
            check_seq_ids(bad, 3)


def test_sample_next_keys_each_row_by_its_sequence_and_position():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    p = SamplingParams(1.0, 0, 1.0, "keyed", 123)
    got = sample_next(logits, p, None, [4, 9, 2], seq_ids=[7, 0, 3])
    want = [keyed_choice(logits[i], 1.0, 0, 1.0, 123, s, torch.tensor(t)) for i, (s, t) in enumerate([(7, 4), (0, 9), (3, 2)])]
    assert got.tolist() == [int(w) for w in want]
    # defaults: row b is sequence b, one position for all; a [V] row is sequence 0
    assert sample_next(logits, p, None, 5).tolist() == [int(keyed_choice(logits[b], 1.0, 0, 1.0, 123, b, torch.tensor(5))) for b in range(3)]
    assert int(sample_next(logits[1], p, None, 5)) == int(keyed_choice(logits[1], 1.0, 0, 1.0, 123, 0, torch.tensor(5)))
    with pytest.raises(ValueError, match="3 rows need 3 seq_ids and positions"):
        sample_next(logits, p, None, [1, 2])


def test_batch_result_rows_and_totals():
    emitted = [[4, 5, 6, 7, 8], [9, 1, 3], [2, 2, 2, 2, 2, 2]]  # eos 1: row 1 stops after it; max_gen_len 5 cuts row 2
    spec = [[False, True, True, False, False], [False, False, True], [False, True, True, True, True, False]]
    acc = [[1, 3, 1], [1, 2], [1, 5]]
    res = GenerationResult.from_batch(emitted, spec, [1], 5, num=3, elapsed=2.0, prefill_time=0.5, accept_lengths=acc)
    assert res.output_ids.tolist() == [[4, 5, 6, 7, 8], [9, 1, 1, 1, 1], [2, 2, 2, 2, 2]]  # row 1 padded with its EOS
    assert res.spec_mask.tolist() == [[False, True, True, False, False], [False, False, False, False, False],
                                      [False, True, True, True, True]]
    assert res.row_lengths == [5, 2, 5] and res.row_counts == [2, 0, 4] and res.row_nums == [3, 2, 2]
    assert res.count == 6 == int(res.spec_mask.sum()) and res.num == 3
    assert res.accept_lengths == [3, 10, 1]  # per pass, summed over the rows it served
    assert res.tau == 12 / 7 and res.row_taus == [5 / 3, 1.0, 2.5] and res.num_tokens == 12
    assert res.tokens_per_second == (12 - 3) / 2.0
    r1 = res.row(1)
    assert r1.output_ids.tolist() == [[9, 1]] and (r1.count, r1.num, r1.accept_lengths) == (0, 2, [1, 2])
    assert res.tolist() == [4, 5, 6, 7, 8]
    out, count, num, elapsed, mask = res  # LongSpec's tuple
    assert out is res.output_ids and (count, num, elapsed) == (6, 3, 2.0)


def test_batch_of_one_result_is_the_old_one():
    res = GenerationResult.from_rounds([3, 4, 5, 1, 7], [False, True, True, False, True], [1], 10, 2, 1.0, 0.1, [1, 4])
    assert res.output_ids.tolist() == [[3, 4, 5, 1]] and res.count == 2 and res.num == 2 and res.accept_lengths == [1, 4]
    assert res.tau == 4 / 2 and res.row_lengths == [4] and res.row_nums == [2] and res.row_accept_lengths == [[1, 4]]
    direct = GenerationResult(torch.tensor([[1, 2, 3]]), 1, 2, 0.5, torch.tensor([[False, True, False]]), accept_lengths=[1, 2])
    assert direct.row_lengths == [3] and direct.row_counts == [1] and direct.tau == 1.5 and direct.row(0).accept_lengths == [1, 2]
