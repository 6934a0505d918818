"""The GLIDE beam-level kernel (:mod:`specdec.fast.kernels.beam`) against :func:`specdec.shared.glide.beam_level`.

Exact equality is required (parents, tokens and fp32 scores): both implement the same total order
(score descending, flat index ascending). Without CUDA the kernel runs under the Triton interpreter
on small shapes; ``@pytest.mark.gpu`` tests add real vocabulary sizes (32k, 128k) and CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_device

from specdec.fast import kernels as K
from specdec.shared.glide import beam_level

DEV = kernel_device()


def _inputs(n: int, v: int, seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1)
    cum = torch.randn(n, generator=g).clamp_max(0) * 2
    if ties:  # quantised: many pairs share the k-th score
        lp, cum = (lp * 2).round() / 2, (cum * 2).round() / 2
    return cum, lp


def _check(cum: torch.Tensor, lp: torch.Tensor, k: int) -> None:
    want = beam_level(cum, lp, k)
    got = K.beam_topk(cum.to(DEV), lp.to(DEV), k)
    for name, a, b in zip(("parent", "token", "score"), got, want):
        assert torch.equal(a.cpu(), b), f"{name}: kernel {a.cpu().tolist()[:8]} vs reference {b.tolist()[:8]}"


@pytest.mark.parametrize("n,v,k", [(1, 300, 4), (1, 257, 1), (6, 200, 16), (2, 3, 10), (3, 1000, 33), (16, 600, 16)])
@pytest.mark.parametrize("ties", [False, True])
def test_beam_topk_matches_reference(n, v, k, ties):
    """Single-program (n * V <= 8192) and two-pass (larger) paths, k not a power of two, k clamped to n * V."""
    cum, lp = _inputs(n, v, seed=n * 7 + v + k, ties=ties)
    _check(cum, lp, k)


def test_beam_topk_all_tied_and_special_values():
    """Every score equal -> flat order; -inf entries rank last (by index); NaN counts as -inf."""
    _check(torch.zeros(4), torch.zeros(4, 100), 16)
    lp = torch.full((3, 5), float("-inf"))
    lp[1, 3], lp[2, 0] = -1.0, -2.0
    lp[0, 1] = float("nan")
    parent, tok, score = K.beam_topk(torch.zeros(3, device=DEV), lp.to(DEV), 5)
    assert list(zip(parent.tolist(), tok.tolist())) == [(1, 3), (2, 0), (0, 0), (0, 1), (0, 2)]
    assert score[:2].tolist() == [-1.0, -2.0] and torch.isinf(score[2:]).all()
    _check(torch.zeros(3), lp, 5)


def test_beam_select_writes_the_tree():
    """Two levels into one set of tree buffers: tokens, global parents, ancestor-or-self rows, root entries."""
    cum, lp0 = _inputs(1, 50, seed=3, ties=False)
    _, lp1 = _inputs(3, 50, seed=4, ties=False)
    m = 1 + 3 + 4
    tokens = torch.full((m,), -7, dtype=torch.long, device=DEV)
    parents = torch.full((m,), -7, dtype=torch.long, device=DEV)
    anc = torch.ones(m, m, dtype=torch.bool, device=DEV)  # garbage: every row must be overwritten
    c = torch.empty(4, device=DEV)
    K.beam_select(None, lp0.to(DEV), 3, tokens, parents, c, node_offset=1, parent_offset=0, ancestor=anc,
                  root_token=torch.tensor([42], dtype=torch.int32, device=DEV))
    p0, t0, s0 = beam_level(torch.zeros(1), lp0, 3)
    assert torch.equal(c[:3].cpu(), s0)
    K.beam_select(c[:3].clone(), lp1.to(DEV), 4, tokens, parents, c, node_offset=4, parent_offset=1, ancestor=anc)
    p1, t1, s1 = beam_level(s0, lp1, 4)
    assert tokens.tolist() == [42] + t0.tolist() + t1.tolist()
    assert parents.tolist() == [-1] + [0, 0, 0] + (p1 + 1).tolist()
    assert torch.equal(c[:4].cpu(), s1)
    want = torch.zeros(m, m, dtype=torch.bool)
    par = parents.tolist()
    for node in range(m):
        a = node
        while a >= 0:
            want[node, a] = True
            a = par[a]
    assert torch.equal(anc.cpu(), want)


def test_beam_select_rejects_bad_input():
    lp = torch.zeros(2, 10, device=DEV)
    tok = torch.zeros(8, dtype=torch.long, device=DEV)
    c = torch.zeros(8, device=DEV)
    with pytest.raises(ValueError, match="k must be"):
        K.beam_select(None, lp, 21, tok, tok.clone(), c, node_offset=2, parent_offset=0)
    with pytest.raises(ValueError, match="node_offset"):
        K.beam_select(None, lp, 7, tok, tok.clone(), c, node_offset=2, parent_offset=0)
    with pytest.raises(ValueError, match="float32"):
        K.beam_select(None, lp.half(), 2, tok, tok.clone(), c, node_offset=2, parent_offset=0)
    with pytest.raises(ValueError, match="int64"):
        K.beam_select(None, lp, 2, tok.int(), tok.clone(), c, node_offset=2, parent_offset=0)
    with pytest.raises(ValueError, match="cum must be"):
        K.beam_select(torch.zeros(3, device=DEV), lp, 2, tok, tok.clone(), c, node_offset=3, parent_offset=0)
    with pytest.raises(ValueError, match="ancestor"):
        K.beam_select(None, lp, 2, tok, tok.clone(), c, node_offset=2, parent_offset=0, ancestor=torch.zeros(8, 8, device=DEV))
    with pytest.raises(ValueError, match="k must be an int"):
        K.beam_topk(torch.zeros(2, device=DEV), lp, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("n,v,k", [(1, 128256, 4), (16, 128256, 16), (16, 32000, 16), (16, 4096, 16), (16, 32000, 100),
                                   (127, 32000, 127)])
@pytest.mark.parametrize("ties", [False, True])
def test_beam_topk_matches_reference_gpu(n, v, k, ties):
    """Real vocabularies, including the multi-pass path (127 x 32000 x K_PAD 128 candidates)."""
    cum, lp = _inputs(n, v, seed=n + v + k, ties=ties)
    _check(cum, lp, k)


@pytest.mark.gpu
def test_beam_select_in_a_cuda_graph():
    """Captured once, replayed on new inputs: the result follows the inputs."""
    n, v, k = 16, 32000, 16
    lp = torch.zeros(n, v, device="cuda")
    cum = torch.zeros(n, device="cuda")
    tok = torch.zeros(n + k, dtype=torch.long, device="cuda")
    par = torch.zeros_like(tok)
    c = torch.zeros(k, device="cuda")
    K.beam_select(cum, lp, k, tok, par, c, node_offset=n, parent_offset=0)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        K.beam_select(cum, lp, k, tok, par, c, node_offset=n, parent_offset=0)
    for seed in range(3):
        cum_h, lp_h = _inputs(n, v, seed=seed, ties=bool(seed % 2))
        lp.copy_(lp_h)
        cum.copy_(cum_h)
        g.replay()
        p, t, s = beam_level(cum_h, lp_h, k)
        assert torch.equal(tok[n:].cpu(), t) and torch.equal(par[n:].cpu(), p) and torch.equal(c.cpu(), s)
