#!/usr/bin/env python3
"""Build the reading notebooks in ``notebooks/`` from the Python source cells below, and execute them.

Each notebook is written here in "percent" format (``# %%`` starts a code cell, ``# %% [markdown]``
a markdown cell whose lines start with ``# ``), turned into an ``.ipynb`` with ``nbformat`` and
executed top to bottom with ``nbclient``, so the committed notebooks carry their outputs and can be
reproduced with one command::

    python scripts/make_notebooks.py                 # build + execute all five (CPU: ~1-2 min)
    python scripts/make_notebooks.py 03 04           # only those whose name starts with 03 / 04
    python scripts/make_notebooks.py --no-execute    # write the cells only (no outputs)
    python scripts/make_notebooks.py --check         # exit 1 if a committed notebook's cells differ from here

The notebooks use only the public API (``specdec.ref``, ``specdec.fast`` and the public names of
``specdec.shared.*`` and of the app modules ``specdec.bench`` / ``specdec.report``); ``tests/app/test_notebooks.py``
executes every notebook and checks that.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT_S = 300

# ---------------------------------------------------------------------------------------------
# Shared snippets (substituted into the notebooks below, so each notebook stays self-contained)
# ---------------------------------------------------------------------------------------------

SETUP = r'''
%matplotlib inline
import os
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook check, harmless

import torch
import matplotlib
import matplotlib.pyplot as plt

import specdec  # import first: on a machine without CUDA it selects the Triton interpreter
from specdec import ref

torch.manual_seed(0)
torch.set_num_threads(1)  # small models: one CPU thread is as fast, and immune to oversubscription
plt.rcParams.update({"figure.dpi": 80, "axes.grid": True, "grid.alpha": 0.3})
print("specdec", specdec.__version__, "| torch", torch.__version__, "| matplotlib", matplotlib.__version__,
      "| CUDA:", torch.cuda.is_available())
'''

LOAD_MODELS = r'''
from specdec.shared.assets import ASSETS_DIR, EMBEDDED_MODELS, resolve_model_path
from specdec.shared.tokenizer import load_tokenizer

tok = load_tokenizer("default")       # the embedded byte-level BPE tokenizer (4096 tokens)
target = ref.load_model("default")    # the embedded target: a small Llama trained on Python code (stdlib + packages)
print(target)
'''

LOAD_GLIDE = r'''
if os.path.isfile(os.path.join(ASSETS_DIR, EMBEDDED_MODELS["default-glide"], "config.json")):
    glide = ref.load_glide(resolve_model_path("default-glide"), target=target)  # the GLIDE draft layer trained for it
else:
    # The trained GLIDE weights are not in this checkout yet: a random draft layer of the right shape
    # (every step below works the same; its drafts are just rarely right).
    from specdec.shared.glide import init_glide_weights

    glide = init_glide_weights(target.config, std=0.3)
    print("NOTE: embedded GLIDE draft not found, using a random stand-in")
print(glide)
'''

HELDOUT = r'''
import hashlib
import sysconfig


def heldout_snippet(rel_path, start_line, num_lines):
    """Lines of a stdlib file the default model never saw in training (the corpus's held-out rule:
    sha256 of the path relative to the stdlib root, as an integer, is 0 mod 16)."""
    assert int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 16 == 0, f"{rel_path} is not held out"
    with open(os.path.join(sysconfig.get_paths()["stdlib"], rel_path), encoding="utf-8") as f:
        return "".join(f.readlines()[start_line:start_line + num_lines])
'''


# ---------------------------------------------------------------------------------------------
# 01 -- tree attention
# ---------------------------------------------------------------------------------------------

NB01 = r'''
# %% [markdown]
# # 1. Tree attention
#
# Speculative decoding verifies a whole **tree** of drafted tokens in one target forward pass. Each
# tree node is a query; it must see the whole verified prefix (the KV cache, length `L`) plus its own
# ancestors in the tree, and nothing else. This notebook
#
# 1. builds the GLIDE beam tree of `tree_shape = [4, 16, 16, 16, 16]` (69 positions: the root + 68
#    drafts) with the library's beam rule on a toy draft distribution, and draws its ancestor mask;
# 2. shows, with numbers, that attention over `[prefix | tree]` computed as **one masked softmax**
#    equals two separate attentions (prefix, tree) **merged by their log-sum-exps** -- the split the
#    Triton kernel uses;
# 3. checks the Triton kernel `specdec.fast.tree_attention` against the reference (on a GPU, and on
#    this CPU under the Triton interpreter).

# %%
{SETUP}
from specdec import fast
from specdec.shared.glide import beam_level
from specdec.shared.tree import Tree, tree_shape_num_nodes

# %% [markdown]
# ## 1.1 The beam tree
#
# Level 1 holds the draft's top-4 tokens after the root. Level `k + 1` keeps the best `tree_shape[k]`
# *(node, token)* pairs over **all** nodes of level `k`, ranked by cumulative draft log-probability
# (`specdec.shared.glide.beam_level`): a beam, not "top-k children per node", so a confident node gets
# many children and a weak one none. A toy "draft" (peaked random distributions over 32 tokens)
# stands in for the GLIDE layer here.

# %%
TREE_SHAPE = (4, 16, 16, 16, 16)
V = 32
g = torch.Generator().manual_seed(0)


def toy_draft_logprobs(num_nodes):
    """Stand-in for the draft layer: a peaked next-token log-distribution after each node."""
    return torch.log_softmax(2.5 * torch.randn(num_nodes, V, generator=g), dim=-1)


tokens, parents, levels = [7], [-1], [[0]]  # node 0 = the root (the last emitted token, here id 7)
cum = torch.zeros(1)                         # cumulative draft log-prob of each node of the level
for width in TREE_SHAPE:
    parent_local, new_tokens, cum = beam_level(cum, toy_draft_logprobs(len(levels[-1])), width)
    first = len(tokens)
    parents += [levels[-1][int(i)] for i in parent_local]
    tokens += new_tokens.tolist()
    levels.append(list(range(first, len(tokens))))

tree = Tree.from_parents(parents)
print(f"{tree.size} nodes (tree_shape_num_nodes -> {tree_shape_num_nodes(TREE_SHAPE)}), depth {max(tree.depth)}")
for d, lvl in enumerate(levels[1:], start=1):
    counts = [len(tree.children(u)) for u in levels[d - 1]]
    print(f"level {d}: {len(lvl):2d} nodes; children per node of level {d - 1}: {counts}")

# %% [markdown]
# The ancestor-or-self mask `mask[i, j]` (True: node `i` may attend to node `j`) follows from
# `parents` alone (`Tree.ancestor_mask`); node `i`'s RoPE position is `L + depth[i]`.

# %%
mask = tree.ancestor_mask()
depth = tree.depth
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.25, 1]})
# left: the tree, one row per level
xpos = {0: 0.5}
for lvl in levels[1:]:  # within a level, order the nodes under their parents (the beam ranks them by score)
    for r, u in enumerate(sorted(lvl, key=lambda u: (xpos[parents[u]], u))):
        xpos[u] = (r + 0.5) / len(lvl)
for u in range(1, tree.size):
    p = parents[u]
    ax0.plot([xpos[p], xpos[u]], [-depth[p], -depth[u]], color="0.6", lw=0.8)
ax0.scatter([xpos[u] for u in range(tree.size)], [-d for d in depth], s=40, c=depth, cmap="viridis", zorder=3)
ax0.set_yticks([-d for d in range(len(levels))], [f"level {d}\n({len(l)})" for d, l in enumerate(levels)])
ax0.set_xticks([])
ax0.set_title(f"beam tree {list(TREE_SHAPE)}: {tree.size} nodes")
# right: the 69 x 69 ancestor mask
ax1.imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
bounds = [lvl[0] - 0.5 for lvl in levels[1:]]
for b in bounds:
    ax1.axhline(b, color="tab:red", lw=0.5)
    ax1.axvline(b, color="tab:red", lw=0.5)
ax1.set_title("ancestor-or-self mask (row i attends to column j)")
ax1.set_xlabel("key node j")
ax1.set_ylabel("query node i")
ax1.grid(False)
plt.tight_layout()
plt.show()
print("visible tree nodes per query: min", int(mask.sum(1).min()), "max", int(mask.sum(1).max()),
      f"-- {int(mask.sum())} of {tree.size ** 2} mask entries are True")

# %% [markdown]
# ## 1.2 One masked softmax = prefix attention + tree attention merged by log-sum-exp
#
# For one query, let `s` be its scores over the prefix keys (set `P`) and the visible tree keys (set
# `T`). With `lse1 = log sum_P exp(s)` and `lse2 = log sum_T exp(s)` (natural logs), the softmax over
# `P u T` splits exactly:
#
# `o = (e^lse1 * o1 + e^lse2 * o2) / (e^lse1 + e^lse2) = sigmoid(lse1 - lse2) * o1 + sigmoid(lse2 - lse1) * o2`
#
# where `o1`, `o2` are the softmax-weighted values over `P` and over `T` alone. The kernel computes the
# long prefix part in split-KV tiles (each returning `(o, lse)`) and the small tree part with the mask,
# then merges. First by hand, in float64, with grouped-query attention (8 query heads, 2 KV heads):

# %%
B, Hq, Hkv, D, L = 1, 8, 2, 64, 200  # batch, query heads, KV heads, head dim, verified prefix length
M = tree.size
gen = torch.Generator().manual_seed(1)
q = torch.randn(B, Hq, M, D, generator=gen, dtype=torch.float64)
k = torch.randn(B, Hkv, L + M, D, generator=gen, dtype=torch.float64)  # rows [0, L): prefix, [L, L+M): tree
v = torch.randn(B, Hkv, L + M, D, generator=gen, dtype=torch.float64)
tree_mask = mask[None]  # [B, M, M]

# GQA: query head h reads KV head h // (Hq // Hkv)
kk, vv = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
scores = torch.einsum("bhmd,bhnd->bhmn", q, kk) / D ** 0.5  # [B, Hq, M, L + M]

# (a) the definition: ONE softmax over [prefix | tree] with the full mask
full_mask = torch.cat([torch.ones(M, L, dtype=torch.bool), mask], dim=1)  # [M, L + M]
o_full = torch.softmax(scores.masked_fill(~full_mask, float("-inf")), dim=-1) @ vv

# (b) two partial attentions, each with its log-sum-exp, then the exact merge
s1 = scores[..., :L]                                                # prefix: no mask
s2 = scores[..., L:].masked_fill(~mask, float("-inf"))              # tree: ancestors-or-self only
lse1, lse2 = torch.logsumexp(s1, dim=-1), torch.logsumexp(s2, dim=-1)
o1 = torch.softmax(s1, dim=-1) @ vv[:, :, :L]
o2 = torch.softmax(s2, dim=-1) @ vv[:, :, L:]
o_merged = torch.sigmoid(lse1 - lse2)[..., None] * o1 + torch.sigmoid(lse2 - lse1)[..., None] * o2

print(f"max |one softmax - merged| = {(o_full - o_merged).abs().max().item():.2e}  (float64)")
print(f"weight of the prefix, sigmoid(lse1 - lse2): min {torch.sigmoid(lse1 - lse2).min():.3f}, "
      f"max {torch.sigmoid(lse1 - lse2).max():.3f}")

# %% [markdown]
# The library writes the same two formulations as `specdec.ref.tree_attention_full` (a) and
# `specdec.ref.tree_attention_merged` (b); `specdec.ref.tree_attention` is (b). Both compute the
# softmax in float32 and agree with the float64 hand computation to float32 rounding:

# %%
a = ref.tree_attention_full(q.float(), k.float(), v.float(), L, tree_mask)    # (a), softmax in fp32
b = ref.tree_attention_merged(q.float(), k.float(), v.float(), L, tree_mask)  # (b), softmax in fp32
print(f"max |full - merged| = {(a - b).abs().max().item():.1e}, max |library - by hand (fp64)| = "
      f"{(a.double() - o_full).abs().max().item():.1e}  (fp32 rounding)")

# %% [markdown]
# The mask really isolates branches: changing the value vectors of tree nodes that are **not**
# ancestors of a leaf leaves that leaf's output unchanged; changing one of its ancestors does not.

# %%
leaf = levels[-1][0]
path = tree.path(leaf)
others = [j for j in range(M) if j not in path]
out0 = ref.tree_attention(q, k, v, L, tree_mask)[0, :, leaf]
v_other = v.clone(); v_other[:, :, [L + j for j in others]] += 10.0
v_anc = v.clone(); v_anc[:, :, L + path[1]] += 10.0
print("leaf", leaf, "path from the root", path)
print(f"change {len(others)} non-ancestors -> leaf output moves by "
      f"{(ref.tree_attention(q, k, v_other, L, tree_mask)[0, :, leaf] - out0).abs().max().item():.1e}")
print(f"change ancestor {path[1]}        -> leaf output moves by "
      f"{(ref.tree_attention(q, k, v_anc, L, tree_mask)[0, :, leaf] - out0).abs().max().item():.1e}")

# %% [markdown]
# Where does each node's attention go? The share of the prefix is `sigmoid(lse1 - lse2)`; deeper nodes
# see more tree keys, so with random keys their tree share grows with depth:

# %%
w_tree = torch.sigmoid(lse2 - lse1)[0].mean(0)  # averaged over heads, [M]
fig, ax = plt.subplots(figsize=(8, 3))
ax.scatter(depth, w_tree.numpy(), s=15)
ax.set_xlabel("node depth")
ax.set_ylabel("attention mass on the tree")
ax.set_title(f"prefix of {L} random keys, tree of {M} nodes")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 1.3 The Triton kernel agrees
#
# `specdec.fast.tree_attention` (same signature) splits the prefix over the KV length, packs the
# query heads of a KV group into one program, handles the masked tree block, and merges all partial
# `(o, lse)` in a second small kernel. On a GPU it runs for real:

# %%
if torch.cuda.is_available():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        qc, kc, vc = (t.to("cuda", dtype) for t in (q, k, v))
        out = fast.tree_attention(qc, kc, vc, L, tree_mask.cuda())
        want = ref.tree_attention_full(q, k, v, L, tree_mask)
        print(f"GPU {str(dtype):15s} max |kernel - reference| = {(out.double().cpu() - want).abs().max().item():.2e}")
else:
    print("skipped: no GPU (the Triton kernel on CUDA is not run here; see the interpreter run below)")

# %% [markdown]
# (This cell's output on one NVIDIA H100, for reference: max |kernel - reference| = 3.7e-04 in float16,
# 2.5e-03 in bfloat16 and 4.2e-07 in float32, against the float64 definition.)

# %% [markdown]
# Without CUDA, `import specdec` set `TRITON_INTERPRET=1` before Triton was imported, so the **same
# kernel code** runs under the Triton interpreter (slow, numpy-backed). A smaller prefix keeps it quick:

# %%
if not torch.cuda.is_available():
    print("TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET"))
    L_small = 40
    q32 = q.float()
    k32 = torch.cat([k[:, :, :L_small], k[:, :, L:]], dim=2).float()  # 40 prefix rows + the 69 tree rows
    v32 = torch.cat([v[:, :, :L_small], v[:, :, L:]], dim=2).float()
    t0 = time.perf_counter()
    out = fast.tree_attention(q32, k32, v32, L_small, tree_mask)
    dt = time.perf_counter() - t0
    want = ref.tree_attention_full(q32.double(), k32.double(), v32.double(), L_small, tree_mask)
    print(f"interpreter, fp32, M={M}, prefix {L_small}, {Hq}/{Hkv} heads: max |kernel - reference| = "
          f"{(out.double() - want).abs().max().item():.2e}  ({dt:.1f} s)")
    # a ragged batch: two sequences with different prefix lengths in one call
    prefix_lens = torch.tensor([L_small, 17])
    q2, k2, v2 = (torch.cat([t, t.flip(-1)], dim=0) for t in (q32, k32, v32))
    out2 = fast.tree_attention(q2, k2, v2, prefix_lens, torch.cat([tree_mask, tree_mask]))
    want2 = ref.tree_attention_full(q2, k2, v2, prefix_lens, torch.cat([tree_mask, tree_mask]))
    print(f"interpreter, ragged batch prefix_len={prefix_lens.tolist()}: max diff {(out2 - want2).abs().max().item():.2e}")
'''

# ---------------------------------------------------------------------------------------------
# 02 -- lossless speculative sampling
# ---------------------------------------------------------------------------------------------

NB02 = r'''
# %% [markdown]
# # 2. Lossless speculative sampling
#
# With temperature > 0 a speculative decoder must emit tokens with **exactly** the target's
# distribution `p` (after temperature / top-k / top-p), whatever the draft proposes. The library has
# one rule per kind of draft, all in `specdec.shared.acceptance`:
#
# * `chain_rejection_accept` -- a chain *sampled* from a draft model with probabilities `q`
#   (Leviathan et al. / Chen et al.): accept `x` with probability `min(1, p(x)/q(x))`; at the first
#   rejection draw the correction from `norm(max(p - q, 0))`.
# * `tree_sampling_accept` -- *deterministic* candidates (GLIDE beam trees, LogitSpec, PLD): try the
#   children of a node in order, accept child `c` with probability `p(c)`, else set `p(c) = 0`,
#   renormalise and try the next; if none is accepted draw from what is left of `p`.
# * `greedy_accept` -- temperature 0: the deepest path that matches the target's argmax.
#
# Below: empirical histograms of the emitted tokens against the exact `p`, and what the well-known
# **lossy** shortcuts do (drawing the correction from `p` instead of the residual -- the
# `skip_sample_adjustment` option of the romsto seed, and LongSpec's sampling path).

# %%
{SETUP}
from specdec.shared.acceptance import chain_rejection_accept, greedy_accept, tree_sampling_accept
from specdec.shared.sampling import logits_to_probs, sample_from_probs
from specdec.shared.tree import Tree

V = 8
target_logits = torch.tensor([2.0, 1.6, 1.1, 0.9, 0.2, -0.3, -1.0, -3.0])
draft_logits = torch.tensor([0.3, 2.2, -0.5, 1.8, 0.9, -0.2, 0.4, -1.0])
p = logits_to_probs(target_logits, temperature=0.8, top_k=6)  # the PROCESSED target distribution
q = logits_to_probs(draft_logits, temperature=1.0)              # the draft's distribution
print("p =", [round(x, 3) for x in p.tolist()], "(top_k=6 zeroes the last two)")
print("q =", [round(x, 3) for x in q.tolist()])

N = 3000  # samples per experiment
CHI2_999 = {5: 20.52, 7: 24.32}  # 99.9% quantile of chi-square with V_eff - 1 degrees of freedom


def histogram(samples, size=V):
    return torch.bincount(torch.tensor(samples), minlength=size).double() / len(samples)


def report(name, freq, exact):
    """Total variation distance and Pearson chi-square of the empirical frequencies against `exact`."""
    support = exact > 0
    chi2 = (N * (freq - exact)[support] ** 2 / exact[support]).sum().item()
    if freq[~support].sum() > 0:  # a token p forbids was emitted
        chi2 = float("inf")
    tv = 0.5 * (freq - exact).abs().sum().item()
    dof = int(support.sum()) - 1
    verdict = "consistent with p" if chi2 < CHI2_999[dof] else "NOT p (rejected at 99.9%)"
    print(f"{name:38s} TV = {tv:.3f}   chi2 = {chi2:7.1f} (dof {dof}, 99.9% limit {CHI2_999[dof]})  -> {verdict}")
    return tv


def bars(ax, exact, series, title):
    width = 0.8 / (len(series) + 1)
    x = torch.arange(len(exact)).float()
    ax.bar(x - 0.4 + width / 2, exact.numpy(), width, color="black", label="exact target p")
    for i, (label, freq) in enumerate(series.items(), start=1):
        ax.bar(x - 0.4 + width / 2 + i * width, freq.numpy(), width, label=label)
    ax.set_xticks(range(len(exact)))
    ax.set_xlabel("token")
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(fontsize=8)

# %% [markdown]
# ## 2.1 A chain sampled from a draft model: rejection sampling with `q`
#
# Draft `gamma = 3` tokens from `q`, verify with `chain_rejection_accept` (here the target's
# distribution is the same `p` at every position, so every emitted token should be distributed as
# `p`). We look at the **first emitted token**: the first draft if it was accepted, else the
# correction. The lossy variant draws the correction from `p` itself (`skip_sample_adjustment=True`):
# it double-counts the tokens the draft already proposes too often.

# %%
gen = torch.Generator().manual_seed(0)
gamma = 3
P_chain = p.expand(gamma + 1, V)  # the target's distribution for x_1..x_gamma and the bonus
Q_chain = q.expand(gamma, V)


def chain_first_token(skip_sample_adjustment):
    drafts = sample_from_probs(Q_chain, gen).tolist()
    n, next_token = chain_rejection_accept(drafts, Q_chain, P_chain, gen, skip_sample_adjustment=skip_sample_adjustment)
    return (drafts + [next_token])[0] if n > 0 else next_token


t0 = time.perf_counter()
chain_ok = histogram([chain_first_token(False) for _ in range(N)])
chain_lossy = histogram([chain_first_token(True) for _ in range(N)])
print(f"{2 * N} chain rounds in {time.perf_counter() - t0:.1f} s")

# the exact law of the first emitted token under each rule
accept = torch.minimum(q, p)                       # q(x) * min(1, p(x)/q(x))
reject = 1 - accept.sum()
residual = (p - q).clamp(min=0) / (p - q).clamp(min=0).sum()
exact_ok, exact_lossy = accept + reject * residual, accept + reject * p
print(f"exact: lossless rule -> max |P - p| = {(exact_ok - p).abs().max():.1e};  lossy rule -> max |P - p| = {(exact_lossy - p).abs().max():.3f}")
report("chain rejection (residual)", chain_ok, p)
report("chain, correction from p (LOSSY)", chain_lossy, p)
fig, ax = plt.subplots(figsize=(10, 3.5))
bars(ax, p, {"rejection sampling, residual": chain_ok, "correction drawn from p (lossy)": chain_lossy},
     f"first emitted token, chain of {gamma} drafts from q, {N} samples each")
ax.plot(range(V), q.numpy(), "x", color="tab:red", label="draft q")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2.2 A tree of deterministic candidates
#
# GLIDE beam trees, LogitSpec and PLD propose tokens that were *not sampled* from any `q` (a beam, a
# lookup). The tree rule treats each child as a one-hot draft: accept it with the (residual) target
# probability of its token, otherwise remove it from `p` and move to the next sibling.
#
# To test more than the first position we use a toy **bigram target**: `p(. | previous token) =
# P[previous]`. A tiny decoder proposes a two-level tree each round (the 3 most likely tokens under
# a fixed toy draft, and the 2 best continuations of the first one), verifies it with
# `tree_sampling_accept`, and runs rounds until two tokens are out. The joint law of the first two
# tokens must be `p(x1) * P[x1](x2)`.

# %%
V2 = 6
gen = torch.Generator().manual_seed(1)
P_bigram = logits_to_probs(1.5 * torch.randn(V2, V2, generator=gen), temperature=1.0)  # row = previous token
draft_rank = torch.randn(V2, V2, generator=gen).argsort(dim=-1, descending=True)        # toy draft's preferences
START = 0
tree = Tree.from_parents([-1, 0, 0, 0, 1, 1])  # root; 3 children; 2 grandchildren under the first child
print("tree parents", tree.parents, "depth", tree.depth)


def propose(root):
    """Deterministic candidates: top-3 after the root, top-2 after the first of them."""
    a, b, c = draft_rank[root, :3].tolist()
    d, e = draft_rank[a, :2].tolist()
    return torch.tensor([root, a, b, c, d, e])


def lossy_tree_accept(tree, tokens, p_rows, generator):
    """LongSpec-style shortcut: try each child with p(c), but on rejection draw from the ORIGINAL p."""
    node, path = 0, [0]
    while True:
        for child in tree.children(node):
            if float(torch.rand((), generator=generator)) < float(p_rows[node, tokens[child]]):
                node = child
                path.append(child)
                break
        else:
            return path, int(sample_from_probs(p_rows[node], generator))


def decode_two(rule):
    out = []
    while len(out) < 2:
        tokens = propose(out[-1] if out else START)
        p_rows = P_bigram[tokens]                      # the target's distribution after every node
        path, next_token = rule(tree, tokens, p_rows, gen)
        out += [int(tokens[j]) for j in path[1:]] + [next_token]
    return out[0] * V2 + out[1]


t0 = time.perf_counter()
joint_ok = histogram([decode_two(tree_sampling_accept) for _ in range(N)], V2 * V2)
joint_lossy = histogram([decode_two(lossy_tree_accept) for _ in range(N)], V2 * V2)
print(f"{2 * N} two-token decodes in {time.perf_counter() - t0:.1f} s")
exact_joint = (P_bigram[START][:, None] * P_bigram).reshape(-1)
CHI2_999[V2 * V2 - 1] = 66.62
report("tree rule (library)", joint_ok, exact_joint)
report("tree, rejected -> draw from p (LOSSY)", joint_lossy, exact_joint)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, (title, grid) in zip(axes, [("exact p(x1) P[x1](x2)", exact_joint), ("tree rule, empirical", joint_ok),
                                    ("lossy shortcut, empirical", joint_lossy)]):
    im = ax.imshow(grid.reshape(V2, V2).numpy(), vmin=0, vmax=float(exact_joint.max()) * 1.3, cmap="viridis")
    ax.set_title(title)
    ax.set_xlabel("second token x2")
    ax.set_ylabel("first token x1")
    ax.grid(False)
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()

fig, ax = plt.subplots(figsize=(10, 3.5))
bars(ax, P_bigram[START], {"tree rule": joint_ok.reshape(V2, V2).sum(1), "lossy shortcut": joint_lossy.reshape(V2, V2).sum(1)},
     "first token x1 (marginal)")
plt.tight_layout()
plt.show()

# %% [markdown]
# The lossy shortcut over-produces the tokens the draft *already proposed*: they get their chance
# once as a candidate and again in the final draw from the unmodified `p`.
#
# ## 2.3 Greedy (temperature 0)
#
# With `temperature=0`, `p` is one-hot at the raw argmax and the rule reduces to "accept the deepest
# path whose every token is the target's argmax after its parent", then append the argmax there --
# which reproduces plain greedy decoding token for token:

# %%
logits_rows = torch.randn(tree.size, V2, generator=gen)  # target logits after each node
tokens = propose(START)
argmax = logits_rows.argmax(-1)
path, next_token = greedy_accept(tree, tokens, logits_rows)
print("node tokens     ", tokens.tolist())
print("argmax after    ", argmax.tolist(), "(a child is right when its token = argmax after its parent)")
print("accepted path   ", path, "tokens", [int(tokens[j]) for j in path[1:]], "+ next token", next_token)
assert next_token == int(argmax[path[-1]])
for j in path[1:]:
    assert int(tokens[j]) == int(argmax[tree.parents[j]])
'''

# ---------------------------------------------------------------------------------------------
# 03 -- one GLIDE tree round
# ---------------------------------------------------------------------------------------------

NB03 = r'''
# %% [markdown]
# # 3. One GLIDE tree round, step by step
#
# GLIDE (LongSpec's draft) is ONE decoder layer on top of the target's frozen embedding and lm_head;
# its cross-attention reads the target's last-layer KV cache. Each round it grows a **beam tree**
# (`tree_shape = (4, 16, 16, 16, 16)`: 68 drafts + the root), the target scores all 69 positions in
# one pass, the greedy rule accepts the deepest correct path, and the KV cache keeps only that path.
#
# We run `ref.tree_spec_generate` on the embedded model with an `on_round` callback (it hands us
# each round's `RoundRecord`: the draft tree, the accepted path, the next token), then **replay the
# first round by hand** with the public pieces -- `forward_step`, `KVCache`, `Tree`, `greedy_accept` --
# and check we land on the same path, the same token and the same cache.

# %%
{SETUP}
from specdec.shared.acceptance import greedy_accept
{LOAD_MODELS}
{LOAD_GLIDE}
{HELDOUT}
text = heldout_snippet("posixpath.py", 60, 14)
prompt = torch.tensor([tok(text)["input_ids"]])  # <s> + the snippet
print(text)
print(prompt.shape[1], "prompt tokens")

# %% [markdown]
# ## 3.1 The whole generation, recorded round by round

# %%
MAX_NEW = 40
TREE_SHAPE = (4, 16, 16, 16, 16)
records = []
res = ref.tree_spec_generate(target, glide, prompt, prompt.shape[1], tree_shape=TREE_SHAPE, max_gen_len=MAX_NEW,
                             on_round=records.append)
out, count, num, elapsed, spec_mask = res
plain = ref.vanilla_generate(target, prompt, prompt.shape[1], max_gen_len=MAX_NEW)
assert out.tolist() == plain.output_ids.tolist(), "tree speculation must reproduce greedy decoding"
print(f"{out.shape[1]} tokens in {num} target passes (prefill + {len(records)} rounds): tau = {res.tau:.2f}; "
      f"{count} accepted drafts; identical to vanilla greedy: True")
print("accepted drafts per round:", [r.accepted for r in records])


def show(ids, mask=None):
    """Decode tokens; accepted drafts in [brackets] when a spec mask is given."""
    if mask is None:
        return tok.decode(ids)
    pieces = []
    for t, m in zip(ids, mask):
        s = tok.decode([t])
        pieces.append(f"[{s}]" if m else s)
    return "".join(pieces)


print("--- output ([...] = draft tokens the target accepted) ---")
print(show(out[0].tolist(), spec_mask[0].tolist()))

# %% [markdown]
# ## 3.2 The draft's beam levels (round 1)
#
# Node 0 is the root: the token the target produced at the prefill, not yet in the KV cache. Level 1
# holds the draft's top-4 next tokens; each further level keeps the best 16 (node, token) pairs of the
# whole level by cumulative draft log-probability, so nodes are ranked best-first within a level.

# %%
rec = records[0]
draft, dtree = rec.draft, rec.draft.tree
d_tokens = draft.tokens.tolist()
depth = dtree.depth
print(f"root = {d_tokens[0]} {tok.decode([d_tokens[0]])!r};  {dtree.size} nodes")
for level in range(1, max(depth) + 1):
    nodes = [i for i in range(dtree.size) if depth[i] == level]
    parents_used = sorted({dtree.parents[i] for i in nodes})
    print(f"\nlevel {level}: {len(nodes)} nodes under {len(parents_used)} parent(s)")
    for i in nodes[:6]:
        branch = tok.decode([d_tokens[j] for j in dtree.path(i)[1:]])
        print(f"   node {i:2d} (parent {dtree.parents[i]:2d}) token {tok.decode([d_tokens[i]])!r:12s} branch {branch!r}")
    if len(nodes) > 6:
        print(f"   ... {len(nodes) - 6} more")

# %% [markdown]
# ## 3.3 Replaying round 1 by hand
#
# **Prefill.** The target reads the prompt into a fresh KV cache (every layer) and picks the first
# token -- the root of round 1.

# %%
cfg = target.config
empty = lambda: torch.empty(1, cfg.num_kv_heads, 0, cfg.head_dim, dtype=target.dtype)  # noqa: E731
cache = ref.KVCache(k=[empty() for _ in range(cfg.num_layers)], v=[empty() for _ in range(cfg.num_layers)])
logits = ref.forward_step(target, prompt, cache)
root = int(logits[0, -1].argmax())
L = cache.length
print(f"prefill: cache length L = {L} (= prompt length), root = {root} {tok.decode([root])!r}, "
      f"matches the record: {root == d_tokens[0]}")

# %% [markdown]
# **Verify.** All 69 nodes go through the target in ONE forward pass: RoPE positions `L + depth`,
# and a mask `[69, L + 69]` = the whole prefix + the tree's ancestor-or-self mask. The cache grows
# by 69 rows (one per node, in every layer).

# %%
positions = dtree.positions(L)
vmask = torch.cat([torch.ones(dtree.size, L, dtype=torch.bool), dtree.ancestor_mask()], dim=1)
t0 = time.perf_counter()
node_logits = ref.forward_step(target, draft.tokens[None], cache, positions=positions, mask=vmask)[0]  # [69, V]
print(f"verification pass over {dtree.size} nodes: {1e3 * (time.perf_counter() - t0):.0f} ms on this CPU; "
      f"positions {positions.min().item()}..{positions.max().item()}; cache length {L} -> {cache.length}")

# The target's choice after every node, and which drafts match it (node j is right when its token
# equals the target's argmax after its parent).
choice = node_logits.argmax(-1)
right = [j == 0 or d_tokens[j] == int(choice[dtree.parents[j]]) for j in range(dtree.size)]
print(f"{sum(right) - 1} of {dtree.size - 1} drafted nodes match the target's argmax after their parent")

# %% [markdown]
# **Accept.** `greedy_accept` picks the deepest node whose whole root path is right (lowest index on
# ties) and appends the target's argmax there (the bonus / correction token).

# %%
path, next_token = greedy_accept(dtree, draft.tokens, node_logits)
print("accepted path (node ids):", path, "-> tokens", [tok.decode([d_tokens[j]]) for j in path[1:]],
      "+ next", repr(tok.decode([next_token])))
print("same as the engine's record:", path == rec.path and next_token == rec.next_token)
print(f"{'node':>5} {'depth':>5} {'draft token':>14} {'target argmax after parent':>28}")
for j in path[1:]:
    print(f"{j:5d} {depth[j]:5d} {tok.decode([d_tokens[j]])!r:>14} {tok.decode([int(choice[dtree.parents[j]])])!r:>28}")

fig, ax = plt.subplots(figsize=(11, 4))
xs = {}
for level in range(max(depth) + 1):
    nodes = [i for i in range(dtree.size) if depth[i] == level]
    for r, i in enumerate(nodes):
        xs[i] = (r + 0.5) / len(nodes)
for j in range(1, dtree.size):
    pj = dtree.parents[j]
    on_path = j in path
    ax.plot([xs[pj], xs[j]], [-depth[pj], -depth[j]], color="tab:red" if on_path else "0.75", lw=2.5 if on_path else 0.8)
colors = ["tab:red" if j in path else ("tab:green" if right[j] else "0.6") for j in range(dtree.size)]
ax.scatter([xs[j] for j in range(dtree.size)], [-d for d in depth], c=colors, s=45, zorder=3)
for j in path:
    ax.annotate(repr(tok.decode([d_tokens[j]])), (xs[j], -depth[j]), textcoords="offset points", xytext=(6, 6), fontsize=9)
ax.set_yticks([-d for d in range(max(depth) + 1)], [f"level {d}" for d in range(max(depth) + 1)])
ax.set_xticks([])
ax.set_title("round 1: red = accepted path, green = draft matches the target after its parent, grey = wrong")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Compact.** The cache keeps rows `[0, L)` plus the rows of the accepted path (the root and the
# accepted drafts), moved into place in **every** layer; the other rows are dropped. The bonus token
# is not in the cache yet: it is the root of the next round.

# %%
before = cache.length
keep = torch.cat([torch.arange(L), L + torch.tensor(path)])
cache.keep(keep)
print(f"KV compaction: cache length {before} -> {cache.length} = L {L} + {len(path)} path rows (root + {len(path) - 1} accepted)")

# The compacted cache must equal the cache a plain prefill of prompt + root + accepted drafts builds.
check = ref.KVCache(k=[empty() for _ in range(cfg.num_layers)], v=[empty() for _ in range(cfg.num_layers)])
accepted_ids = torch.tensor([[d_tokens[j] for j in path]])
ref.forward_step(target, torch.cat([prompt, accepted_ids], dim=1), check)
diff = max(max((a - b).abs().max().item() for a, b in zip(cache.k, check.k)),
           max((a - b).abs().max().item() for a, b in zip(cache.v, check.v)))
print(f"max |compacted cache - cache of a plain prefill| over all {cfg.num_layers} layers: {diff:.1e}")

# %% [markdown]
# ## 3.4 All rounds
#
# Every round emits the accepted drafts plus one target token, so tokens per target pass is
# `1 + accepted`; tau = tokens / passes (the prefill counts as one pass).

# %%
acc = [r.accepted for r in records]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.5))
ax0.bar(range(1, len(acc) + 1), [a + 1 for a in acc], color="tab:blue", label="tokens emitted")
ax0.bar(range(1, len(acc) + 1), acc, color="tab:orange", label="of which accepted drafts")
ax0.set_xlabel("round")
ax0.set_ylabel("tokens")
ax0.set_ylim(0, len(TREE_SHAPE) + 1.5)
ax0.legend(fontsize=8)
ax0.set_title(f"tau = {res.tau:.2f} over {num} target passes")
depth_of_tree = len(TREE_SHAPE)
ax1.hist(acc, bins=range(depth_of_tree + 2), align="left", rwidth=0.8)
ax1.set_xlabel("accepted drafts in a round")
ax1.set_ylabel("rounds")
ax1.set_title("accept-length histogram")
plt.tight_layout()
plt.show()
'''

# ---------------------------------------------------------------------------------------------
# 04 -- LogitSpec
# ---------------------------------------------------------------------------------------------

NB04 = r'''
# %% [markdown]
# # 4. LogitSpec on a real prompt
#
# LogitSpec needs no draft model. Each round it builds a token **trie** from two sources:
#
# 1. **retrieval**: an n-gram pool over the prompt and the generated text maps every 1..3-gram to the
#    tokens that followed its latest occurrence; branch 0 continues the longest suffix of the text
#    found in the pool;
# 2. **next-next-token guesses**: the target's logit that produced the root also ranks candidates
#    for the token *after* the root (its runner-up tokens); each guess `g` becomes a branch `[g] +`
#    the pool's continuation of `text + root + g`, truncated by rank (4 tokens for ranks <= 8, 3 up to
#    32, then 1), until the trie holds `draft_tree_capacity` nodes.
#
# The target verifies the trie in one pass. Here we rebuild that drafter from the public pieces
# (`specdec.shared.ngram.NgramPool` / `Trie`, `ref.Draft`, `ref.run_speculative`), check it produces
# exactly what `ref.logitspec_generate` produces, and look inside a round. The prompt is a held-out
# stdlib file the embedded model never saw in training.

# %%
{SETUP}
from specdec.shared.ngram import NgramPool, Trie
from specdec.shared.tree import Tree
{LOAD_MODELS}
{HELDOUT}
text = heldout_snippet("poplib.py", 214, 34)
prompt_ids = tok(text)["input_ids"]
prompt = torch.tensor([prompt_ids])
print(text)
print(len(prompt_ids), "prompt tokens")

# %% [markdown]
# ## 4.1 The n-gram pool

# %%
MAX_NGRAM, NUM_PRED, CAPACITY, MAX_NEW = 3, 20, 64, 48
pool = NgramPool(MAX_NGRAM, NUM_PRED, prompt_ids)
print(f"pool over the prompt: {len(pool)} distinct 1..{MAX_NGRAM}-grams")
# a few 3-grams of the prompt and what followed their LATEST occurrence (up to 8 tokens shown)
for i in (40, 120, 200):
    ngram = prompt_ids[i - MAX_NGRAM:i]
    print(f"  {tok.decode(ngram)!r:24s} -> {tok.decode(pool.continuation(ngram, limit=8))!r}")
# lookup = the longest suffix of the text found in the pool (3-gram, else 2-gram, else 1-gram)
print(f"text ends with {tok.decode(prompt_ids[-MAX_NGRAM:])!r}: lookup -> {tok.decode(pool.lookup(prompt_ids, limit=8))!r}")
print("(the suffix never occurred before, so retrieval alone has nothing to propose for the first round)"
      if not pool.lookup(prompt_ids) else "")

# %% [markdown]
# ## 4.2 The drafter, in a few lines
#
# `propose` gets the engine's `RoundState`: `tokens` (prompt + emitted; `tokens[-1]` is the root) and
# `last_logits` (the target logits that produced the root).

# %%
def guess_branch_length(rank):
    return 4 if rank <= 8 else (3 if rank <= 32 else 1)


class MyLogitSpec:
    def __init__(self):
        self.pool = NgramPool(MAX_NGRAM, NUM_PRED)
        self.log = []  # what each round looked like, for the plots below

    def propose(self, state):
        tokens, root = state.tokens, state.tokens[-1]
        depth = max(0, state.budget - 1)              # deeper drafts could never be emitted
        capacity = CAPACITY if depth > 0 else 0
        self.pool.update(tokens)                       # 1. learn the newly emitted tokens
        trie = Trie(root)
        branch0 = self.pool.lookup(tokens, limit=depth)  # 2. retrieval branch
        trie.insert(branch0, max_new_nodes=capacity)
        guesses = []
        order = torch.sort(state.last_logits.float(), descending=True, stable=True).indices.tolist()
        rank = 0
        for g in order:                                # 3. next-next-token guesses, best first
            if trie.num_drafts >= capacity:
                break
            if g == root:
                continue
            rank += 1
            keep = min(guess_branch_length(rank), depth)
            branch = [g] + (self.pool.lookup(tokens + [g], limit=keep - 1) if keep > 1 else [])
            trie.insert(branch, max_new_nodes=capacity - trie.num_drafts)
            guesses.append(branch)
        node_tokens, parents = trie.bfs()              # 4. parents-first trie, shared prefixes merged
        self.log.append({"root": root, "branch0": branch0, "guesses": guesses, "logits": state.last_logits})
        return ref.Draft(tokens=torch.tensor(node_tokens), tree=Tree.from_parents(parents))


drafter, records = MyLogitSpec(), []
t0 = time.perf_counter()
mine = ref.run_speculative(target, drafter, prompt, prompt.shape[1], max_gen_len=MAX_NEW, on_round=records.append)
lib = ref.logitspec_generate(target, prompt, prompt.shape[1], max_ngram_size=MAX_NGRAM, num_pred_tokens=NUM_PRED,
                             draft_tree_capacity=CAPACITY, max_gen_len=MAX_NEW)
plain = ref.vanilla_generate(target, prompt, prompt.shape[1], max_gen_len=MAX_NEW)
print(f"three decodes in {time.perf_counter() - t0:.1f} s")
assert mine.output_ids.tolist() == lib.output_ids.tolist() and mine.spec_mask.tolist() == lib.spec_mask.tolist()
assert lib.output_ids.tolist() == plain.output_ids.tolist()
print(f"notebook drafter == ref.logitspec_generate (tokens and spec_mask) == vanilla greedy: True")
print(f"{lib.num_tokens} tokens in {lib.num} target passes: tau = {lib.tau:.2f} ({lib.count} accepted drafts)")
print("accepted drafts per round:", [r.accepted for r in records])

out, mask = lib.output_ids[0].tolist(), lib.spec_mask[0].tolist()
print("--- output ([...] = draft tokens the target accepted) ---")
print("".join(f"[{tok.decode([t])}]" if m else tok.decode([t]) for t, m in zip(out, mask)))

# %% [markdown]
# ## 4.3 Inside a round: guesses, trie, accepted path
#
# For every round: did the accepted path start with the retrieval branch (branch 0) or with a
# next-next-token guess? Then a close look at the round that accepted the most drafts, and at the
# best round won by a guess.

# %%
def first_source(rec, info):
    """Where the accepted path's first draft came from: 'retrieval', 'guess' or 'none'."""
    if rec.accepted == 0:
        return "none"
    return "retrieval" if info["branch0"][:1] == [int(rec.draft.tokens[rec.path[1]])] else "guess"


source = [first_source(rec, info) for rec, info in zip(records, drafter.log)]
print("first accepted draft from:", {k: source.count(k) for k in ("retrieval", "guess", "none")})


def show_round(i):
    rec, info = records[i], drafter.log[i]
    probs = torch.softmax(info["logits"].float(), dim=-1)
    print(f"=== round {i + 1}: root {tok.decode([info['root']])!r} (p = {probs[info['root']]:.2f} under the last logit)")
    print(f"branch 0 (retrieval):  {tok.decode(info['branch0'])!r}")
    print("next-next-token guesses (runner-ups of the same logit) and their branches:")
    for rank, branch in enumerate(info["guesses"][:8], start=1):
        print(f"  rank {rank:2d}  p = {probs[branch[0]]:.3f}  {tok.decode(branch[:1])!r:12s} -> branch {tok.decode(branch)!r}")
    print(f"  ... {len(info['guesses'])} guess branches in all")
    d_tokens = rec.draft.tokens.tolist()
    print(f"trie: {rec.draft.tree.size} nodes (root + {rec.draft.tree.size - 1} drafts), depth {max(rec.draft.tree.depth)}")
    print(f"accepted path {rec.path}: {tok.decode([d_tokens[j] for j in rec.path[1:]])!r} "
          f"+ next {tok.decode([rec.next_token])!r}  (first draft from: {source[i]})\n")


best = max(range(len(records)), key=lambda i: (records[i].accepted, -i))
show_round(best)
guess_rounds = [i for i in range(len(records)) if source[i] == "guess"]
if guess_rounds:
    show_round(max(guess_rounds, key=lambda i: (records[i].accepted, -i)))

# %%
rec = records[best]
dtree, d_tokens = rec.draft.tree, rec.draft.tokens.tolist()
depth = dtree.depth
fig, ax = plt.subplots(figsize=(12, 4.5))
xs = {}
for level in range(max(depth) + 1):
    nodes = [i for i in range(dtree.size) if depth[i] == level]
    for r, i in enumerate(nodes):
        xs[i] = (r + 0.5) / len(nodes)
for j in range(1, dtree.size):
    pj = dtree.parents[j]
    ax.plot([xs[pj], xs[j]], [-depth[pj], -depth[j]], color="tab:red" if j in rec.path else "0.75", lw=2.5 if j in rec.path else 0.8)
ax.scatter([xs[j] for j in range(dtree.size)], [-d for d in depth], s=40, zorder=3,
           c=["tab:red" if j in rec.path else "0.5" for j in range(dtree.size)])
for j in range(dtree.size):
    if depth[j] <= 1 and xs[j] < 0.35 or j in rec.path:
        ax.annotate(repr(tok.decode([d_tokens[j]])), (xs[j], -depth[j]), textcoords="offset points", xytext=(4, 6),
                    fontsize=8, rotation=30, color="tab:red" if j in rec.path else "black")
ax.set_yticks([-d for d in range(max(depth) + 1)], [f"depth {d}" for d in range(max(depth) + 1)])
ax.set_xticks([])
ax.set_title(f"round {best + 1}: the draft trie ({dtree.size} nodes; branch 0 first, then the guesses); red = accepted path")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4.4 Tokens per round, by source of the first accepted draft

# %%
kinds = ["retrieval", "guess", "none"]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.5), gridspec_kw={"width_ratios": [2.5, 1]})
colors = {"retrieval": "tab:blue", "guess": "tab:orange", "none": "0.7"}
ax0.bar(range(1, len(records) + 1), [r.accepted + 1 for r in records], color=[colors[s] for s in source])
for kind in kinds:
    ax0.bar([0], [0], color=colors[kind], label=kind)
ax0.set_xlabel("round")
ax0.set_ylabel("tokens emitted")
ax0.legend(fontsize=8, title="first accepted draft from")
ax0.set_title(f"LogitSpec, tau = {lib.tau:.2f}")
ax1.bar(kinds, [source.count(k) for k in kinds], color=[colors[k] for k in kinds])
ax1.set_ylabel("rounds")
plt.tight_layout()
plt.show()
'''

NB05 = r'''
# %% [markdown]
# # 5. Results: speedup and tau per method
#
# Every decoder is measured the same way by `specdec bench` (`specdec.bench`), which writes one
# Spec-Bench-style answer file per method (`<method>.jsonl`: per question the new tokens, wall time,
# prefill time, the tokens emitted by every target pass (`accept_lengths`) and the output ids), and
# summarised by `specdec report` (`specdec.report`):
#
# * **tau** (mean accepted length) = tokens emitted per target forward pass, pooled over all passes
#   (the prefill's pass included; vanilla = 1.0);
# * **speedup** = mean per-question throughput of a method / that of vanilla on the same questions.
#
# If benchmark answer files are committed, this notebook plots those (`ANSWER_DIR`). Otherwise it
# **produces them here**: the reference path on this CPU, the embedded model, a few held-out stdlib
# prompts (`--bench stdlib_code`) and a few dozen new tokens. **These are CPU timings of the readable
# reference, not GPU numbers**: on a CPU the 69-node tree verification costs several plain decode
# steps, so a high tau does not turn into the speedup it gives on a GPU, where one verification costs
# about as much as one decode step (`BENCHMARKS.md` holds measured GPU figures).

# %%
{SETUP}
import contextlib
import glob
import io
import tempfile

from specdec.shared.assets import ASSETS_DIR, EMBEDDED_MODELS, resolve_model_path
from specdec.bench import bench_main
from specdec.report import compare, format_report, load_answers

ANSWER_DIR = None  # a folder of committed `specdec bench` answer files (<method>.jsonl); None = run here
METHODS = ["vanilla", "speculative", "spec", "tree_spec", "logitspec", "magicdec", "pld"]

# %%
if ANSWER_DIR is None:
    have_glide = os.path.isfile(os.path.join(ASSETS_DIR, EMBEDDED_MODELS["default-glide"], "config.json"))
    methods = [m for m in METHODS if have_glide or m not in ("spec", "tree_spec")]
    if not have_glide:
        print("NOTE: the embedded GLIDE draft is not in this checkout: spec / tree_spec left out")
    ANSWER_DIR = tempfile.mkdtemp(prefix="specdec_answers_")
    argv = ["--bench", "stdlib_code", "--question-end", "2", "--max-new-tokens", "20", "--backend", "ref",
            "--device", "cpu", "--methods", ",".join(methods), "--out-dir", ANSWER_DIR, "--no-progress"]
    if have_glide:
        argv += ["--glide", resolve_model_path("default-glide")]
    # One short untimed run warms the process up; then the real run skips the per-method warm-up
    # generations (they size GPU caches and CUDA graphs; the CPU reference path has none).
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):  # the bench's progress lines
        assert bench_main(argv[:2] + ["--question-end", "1", "--max-new-tokens", "4", "--methods", "vanilla", "--out-dir",
                                      os.path.join(ANSWER_DIR, "warmup"), "--warmup", "0", "--no-progress"]) == 0, log.getvalue()
        argv += ["--warmup", "0"]
        t0 = time.perf_counter()
        assert bench_main(argv) == 0, log.getvalue()
    shown = {ANSWER_DIR: "<tmp dir>", resolve_model_path("default-glide"): "<default-glide>"}
    print("specdec bench " + " ".join(shown.get(a, a) for a in argv))
    print(f"bench: {time.perf_counter() - t0:.1f} s")
answers = {os.path.basename(p)[:-len(".jsonl")]: load_answers(p) for p in sorted(glob.glob(os.path.join(ANSWER_DIR, "*.jsonl")))}
print({m: len(recs) for m, recs in answers.items()}, "answer records")
rec = answers["vanilla"][0]
print("one record:", {k: rec[k] for k in ("question_id", "category", "method", "backend")},
      {k: v for k, v in rec["choices"][0].items() if k not in ("turns", "output_ids")})

# %% [markdown]
# ## 5.1 The report

# %%
base = answers.pop("vanilla")
order = [m for m in METHODS if m in answers] + [m for m in answers if m not in METHODS]
data = compare(base, {m: answers[m] for m in order}, base_name="vanilla")
print(format_report(data, per_category=False))
overall = data["categories"]["overall"]
meta = base[0].get("meta", {})
print("device:", meta.get("device"), "| backend:", meta.get("backend"), "| dtype:", meta.get("dtype"))

# %%
names = list(overall)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.8))
ax0.barh(names, [overall[m]["tau"] for m in names], color="tab:blue")
ax0.set_xlabel("tau (tokens per target pass)")
ax0.invert_yaxis()
ax0.set_title("mean accepted length")
ax1.barh(names, [overall[m]["speedup"] for m in names], color="tab:green")
ax1.axvline(1.0, color="black", lw=0.8)
ax1.set_xlabel(f"speedup over vanilla ({meta.get('backend')} path, {meta.get('device')})")
ax1.invert_yaxis()
ax1.set_yticklabels([])
ax1.set_title("speedup" + (" -- CPU timings, NOT GPU numbers" if "cpu" in str(meta.get("device", "")).lower() else ""))
plt.tight_layout()
plt.show()
assert all(overall[m]["same_output"] in (None, 1.0) for m in names), "a greedy method changed the output"
print("every method's greedy output equals vanilla's:", all(overall[m]["same_output"] == 1.0 for m in names))

# %% [markdown]
# ## 5.2 Accept lengths and categories
#
# Left: the share of target passes that emitted 1, 2, ... tokens (the prefill's pass, always 1, is
# included). Right: tau and speedup per prompt category of the set.

# %%
spec_names = [m for m in names if m != "vanilla"]
maxlen = max(max(overall[m]["hist"]) for m in spec_names)
width = 0.8 / len(spec_names)
cats = [c for c in data["categories"] if c != "overall"]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 3.8))
for i, m in enumerate(spec_names):
    hist = overall[m]["hist"]
    total = sum(hist.values())
    xs = torch.arange(1, maxlen + 1)
    ax0.bar(xs + (i - len(spec_names) / 2 + 0.5) * width, [hist.get(int(x), 0) / total for x in xs], width, label=m)
    ax1.bar(torch.arange(len(cats)) + (i - len(spec_names) / 2 + 0.5) * width,
            [data["categories"][c][m]["tau"] for c in cats], width, label=m)
ax0.set_xlabel("tokens emitted by a target pass")
ax0.set_ylabel("share of passes")
ax0.set_title("accept-length histogram (all prompts)")
ax0.legend(fontsize=8)
ax1.set_xticks(range(len(cats)), cats)
ax1.set_ylabel("tau")
ax1.set_title("tau per category")
plt.tight_layout()
plt.show()
'''

NOTEBOOKS = {
    "01_tree_attention": NB01,
    "02_lossless_sampling": NB02,
    "03_glide_tree_round": NB03,
    "04_logitspec": NB04,
    "05_results": NB05,
}
SNIPPETS = {"SETUP": SETUP, "LOAD_MODELS": LOAD_MODELS, "LOAD_GLIDE": LOAD_GLIDE, "HELDOUT": HELDOUT}


# ---------------------------------------------------------------------------------------------
# Percent format -> nbformat
# ---------------------------------------------------------------------------------------------


def expand(source: str) -> str:
    for key, snippet in SNIPPETS.items():
        source = source.replace("{" + key + "}", snippet.strip("\n"))
    return source


def parse_cells(source: str) -> list[tuple[str, str]]:
    """[(kind, text)] from percent-format source: '# %%' -> code, '# %% [markdown]' -> markdown."""
    cells: list[tuple[str, list[str]]] = []
    for line in expand(source).strip("\n").splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines]
        text = "\n".join(lines).strip("\n")
        if text:
            out.append((kind, text))
    return out


def build(name: str):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in parse_cells(NOTEBOOKS[name]):
        nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text))
    # stable cell ids (nbformat would draw random ones), so rebuilding gives small diffs
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"
    return nb


def execute(nb, cwd: str = NB_DIR, timeout: int = CELL_TIMEOUT_S):
    """Run every cell top to bottom with nbclient (kernel python3); raises on the first error."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}},
                   record_timing=False).execute()
    return nb


def main(argv=None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    ap.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    ap.add_argument("--check", action="store_true", help="compare committed notebooks' cells with this script")
    args = ap.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if not names:
        ap.error(f"no notebook matches {args.only}; have {list(NOTEBOOKS)}")
    if args.check:
        bad = []
        for name in names:
            path = os.path.join(NB_DIR, name + ".ipynb")
            want = [(c.cell_type, c.source) for c in build(name).cells]
            have = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells] if os.path.exists(path) else None
            if have != want:
                bad.append(name)
        print("out of date:" if bad else "all notebooks match the script", " ".join(bad))
        return 1 if bad else 0
    os.makedirs(NB_DIR, exist_ok=True)
    for name in names:
        nb = build(name)
        t0 = time.perf_counter()
        if not args.no_execute:
            execute(nb)
        path = os.path.join(NB_DIR, name + ".ipynb")
        nbformat.write(nb, path)
        print(f"{path}: {len(nb.cells)} cells" + ("" if args.no_execute else f", executed in {time.perf_counter() - t0:.1f} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
