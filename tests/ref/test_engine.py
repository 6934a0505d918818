"""The speculative round engine (ref/engine.py) with hand-made drafters: bookkeeping, EOS, lengths, trees."""

from __future__ import annotations

import pytest
import torch

from lossless import chi_square_test, collect_samples, exact_sequence_distribution, lossless_check, tiny_model
import specdec.shared.round as round_rules  # accept_draft picks the rule there
from specdec.ref import vanilla_generate
from specdec.ref.engine import Draft, RoundState, run_speculative
from specdec.ref.model import forward
from specdec.shared.sampling import sample_from_probs
from specdec.shared.tree import Tree

V = 48


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab=V, seed=3, init_std=0.3)


class OracleDrafter:
    """Proposes the target's own greedy continuation (always right) -- optionally with wrong siblings."""

    def __init__(self, gamma: int, wrong_siblings: bool = False, vocab: int = V):
        self.gamma, self.wrong_siblings, self.vocab = gamma, wrong_siblings, vocab

    def propose(self, state: RoundState) -> Draft:
        seq = list(state.tokens)
        for _ in range(self.gamma):
            seq.append(int(forward(state.target, torch.tensor([seq]))[0, -1].argmax()))
        chain = seq[len(state.tokens):]
        if not self.wrong_siblings:
            return Draft(torch.tensor([state.tokens[-1]] + chain), Tree.chain(len(chain)))
        # root -> wrong, right -> wrong', right' ... : the right path is not the lowest-index child.
        tokens, parents, prev = [state.tokens[-1]], [-1], 0
        for t in chain:
            tokens += [(t + 1) % self.vocab, t]
            parents += [prev, prev]
            prev = len(tokens) - 1
        return Draft(torch.tensor(tokens), Tree.from_parents(parents))


class WrongDrafter:
    """Always proposes a token different from the target's argmax (never accepted when greedy)."""

    def __init__(self, gamma: int):
        self.gamma = gamma

    def propose(self, state: RoundState) -> Draft:
        nxt = int(forward(state.target, torch.tensor([state.tokens]))[0, -1].argmax())
        chain = [(nxt + 1) % V] * self.gamma
        return Draft(torch.tensor([state.tokens[-1]] + chain), Tree.chain(self.gamma))


def _prompt(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


def _check_bookkeeping(res, max_gen_len, first_target=True):
    assert res.count == int(res.spec_mask.sum())
    assert len(res.accept_lengths) == res.num
    if first_target:
        assert res.accept_lengths[0] == 1  # the prefill emits one token
    emitted = sum(res.accept_lengths)
    # accept lengths add up to what was emitted before the max_gen_len / EOS cut
    assert emitted >= res.num_tokens and emitted - max(res.accept_lengths) < res.num_tokens
    assert res.tau == pytest.approx(res.num_tokens / res.num)
    assert res.output_ids.shape == res.spec_mask.shape


@pytest.mark.parametrize("drafter", [OracleDrafter(4), OracleDrafter(3, wrong_siblings=True), WrongDrafter(3)], ids=["oracle", "tree", "wrong"])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_vanilla(target, drafter, seed):
    p = _prompt(seed)
    ref = vanilla_generate(target, p, p.shape[1], max_gen_len=17, eos_id=[])
    res = run_speculative(target, drafter, p, p.shape[1], max_gen_len=17, eos_id=[])
    assert res.tolist() == ref.tolist()
    _check_bookkeeping(res, 17)
    if isinstance(drafter, WrongDrafter):
        assert res.count == 0 and res.num == 17
    else:
        assert res.count > 0 and res.num < 17
        # spec_mask: the first token and every round's last token come from the target itself
        mask = res.spec_mask[0].tolist()
        assert mask[0] is False and sum(mask) == res.count


@pytest.mark.parametrize("first_target", [True, False])
@pytest.mark.parametrize("max_gen_len", [1, 2, 3])
def test_short_max_gen_len(target, max_gen_len, first_target):
    p = _prompt(5)
    ref = vanilla_generate(target, p, p.shape[1], max_gen_len=max_gen_len, eos_id=[]).tolist()
    res = run_speculative(target, OracleDrafter(4), p, p.shape[1], max_gen_len=max_gen_len, eos_id=[], first_target=first_target)
    assert res.tolist() == ref and res.num_tokens == max_gen_len
    _check_bookkeeping(res, max_gen_len, first_target)


def test_eos_inside_accepted_draft(target):
    p = _prompt(7)
    free = vanilla_generate(target, p, p.shape[1], max_gen_len=20, eos_id=[]).tolist()
    # pick as EOS a token first emitted in the middle of a round of fully accepted drafts
    res = run_speculative(target, OracleDrafter(5), p, p.shape[1], max_gen_len=20, eos_id=[])
    mask = res.spec_mask[0].tolist()
    pos = next(i for i in range(2, len(free)) if mask[i] and free[i] not in free[:i] and i + 1 < len(free) and mask[i + 1])
    eos = free[pos]
    ref = vanilla_generate(target, p, p.shape[1], max_gen_len=20, eos_id=eos).tolist()
    out = run_speculative(target, OracleDrafter(5), p, p.shape[1], max_gen_len=20, eos_id=eos)
    assert ref == free[: pos + 1]
    assert out.tolist() == ref  # cut right after the EOS, drafts after it dropped
    assert out.count == int(out.spec_mask.sum())
    # several EOS ids: the first one by position wins, whatever the list order
    later = next(t for t in free[pos + 1:] if t not in free[: pos + 1])
    out2 = run_speculative(target, OracleDrafter(5), p, p.shape[1], max_gen_len=20, eos_id=[later, eos])
    assert out2.tolist() == ref


def test_drafter_root_must_match(target):
    class Bad:
        def propose(self, state):
            return Draft(torch.tensor([(state.tokens[-1] + 1) % V]), Tree.chain(0))

    with pytest.raises(RuntimeError, match="root"):
        run_speculative(target, Bad(), _prompt(0), 8, max_gen_len=4)


def test_batch_size_one_only(target):
    with pytest.raises(ValueError, match="batch size"):
        run_speculative(target, OracleDrafter(2), torch.zeros(2, 4, dtype=torch.long), 4, max_gen_len=4)


def test_tree_sampling_lossless_and_test_has_power(monkeypatch):
    """Sampling with a tree of high-probability deterministic candidates (the target's argmax path, each
    node with a wrong sibling tried first) matches the exact distribution; breaking the tree rule (no
    renormalisation after rejected children) is caught by the same test."""
    t = tiny_model("llama", vocab=8, seed=0, init_std=0.4, layers=1)
    p = torch.tensor([[1, 2, 3, 1, 2]])
    exact = exact_sequence_distribution(t, p, 3, 1.0)
    decode = lambda **a: run_speculative(t, OracleDrafter(2, wrong_siblings=True, vocab=8), **a)  # noqa: E731
    lossless_check(decode, t, p, n_samples=400, seed=1, exact=exact)

    rule = round_rules.tree_sampling_accept

    def broken(tree, tokens, probs, generator=None):
        path, nxt = rule(tree, tokens, probs, generator)
        if len(path) == 1:  # all children rejected: draw from the full p instead of what is left of it
            nxt = int(sample_from_probs(probs[0], generator))
        return path, nxt

    monkeypatch.setattr(round_rules, "tree_sampling_accept", broken)
    res = chi_square_test(collect_samples(decode, p, 400, 3, 1.0, seed=1), exact)
    assert res.pvalue < 1e-6, res


def test_compact_batch_equals_a_gather_of_every_kept_column():
    """compact_batch moves each row's kept columns to its front in place (copying only those after the
    row's in-place prefix): every row's first len(keep[b]) columns equal a plain gather of its kept
    columns, in every layer, and the cache is cut to the longest row."""
    from specdec.ref.engine import compact_batch
    from specdec.ref.model import KVCache

    g = torch.Generator().manual_seed(0)
    layers, b, h, s, d = 2, 3, 2, 12, 4
    k = [torch.randn(b, h, s, d, generator=g) for _ in range(layers)]
    v = [torch.randn(b, h, s, d, generator=g) for _ in range(layers)]
    for keep in ([torch.tensor([0, 1, 2, 3, 8, 10]), torch.tensor([0, 1, 8, 9]), torch.tensor([0, 1, 2, 8])],   # ragged prefixes
                 [torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 11])] * 3,                                           # one long prefix
                 [torch.tensor([5, 6]), torch.tensor([0, 1]), torch.tensor([0])],                               # none in place
                 [torch.tensor([0, 3, 1, 2])] * 3):                                                             # a column moves back
        cache = KVCache(k=[t.clone() for t in k], v=[t.clone() for t in v])
        compact_batch(cache, keep)
        assert cache.length == max(len(x) for x in keep)
        for got, src in zip(cache.k + cache.v, k + v):
            for row, cols in enumerate(keep):
                assert torch.equal(got[row, :, : len(cols)], src[row, :, cols])
