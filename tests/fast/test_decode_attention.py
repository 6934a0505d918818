"""The decode-phase attention (fast/kernels/decode_attention.py): right values, and a row's bits depend
only on its query and the keys it may see -- not on M, the tree, the batch or the tile size.

On CPU the kernel runs under the Triton interpreter (small shapes, CI); the GPU tests run the
tensor-core kernel at Llama-3-8B / Qwen2-7B head shapes and long prefixes.
"""

from __future__ import annotations

import pytest
import torch

import specdec  # noqa: F401  -- picks the Triton interpreter on CPU first
from specdec.fast.kernels import decode_attention
from specdec.fast.kernels._common import masked_attention_ref
from specdec.shared.tree import Tree
from specdec.fast.kernels.decode_attention import MAX_HEAD_DIM, SPLIT_KEYS, ancestor_table, num_splits_for, split_bounds

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def random_tree(m: int, gen: torch.Generator) -> list[int]:
    """Parents of a random tree of m nodes in topological order (node 0 the root, parent -1)."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, m)]


def tree_mask_of(parents: list[int]) -> torch.Tensor:
    return Tree.from_parents(parents).ancestor_mask()


def _case(b, hq, hkv, dim, prefix, parents_per_row, dtype, device, seed=0, capacity=None):
    g = torch.Generator().manual_seed(seed)
    m = len(parents_per_row[0])
    n = capacity or max(prefix) + m + 5
    q = torch.randn(b, hq, m, dim, generator=g).to(dtype).to(device)
    k = torch.randn(b, hkv, n, dim, generator=g).to(dtype).to(device)
    v = torch.randn(b, hkv, n, dim, generator=g).to(dtype).to(device)
    mask = torch.stack([tree_mask_of(p) for p in parents_per_row]).to(device)
    plen = torch.tensor(prefix, dtype=torch.int32, device=device)
    return q, k, v, mask, plen


def _dense_mask(mask, plen, n):
    b, m, _ = mask.shape
    full = torch.zeros(b, m, n, dtype=torch.bool, device=mask.device)
    for bi in range(b):
        L = int(plen[bi])
        full[bi, :, :L] = True
        full[bi, :, L:L + m] = mask[bi]
    return full


def _one_token_steps(q, k, v, mask, plen, bi, i, **kw):
    """Row i of batch entry bi as a one-token step: its ancestors moved into the cache at L..L+d-1
    (what acceptance + compaction does), itself at L+d, M = 1."""
    L = int(plen[bi])
    anc = [j for j in range(mask.shape[1]) if mask[bi, i, j]]   # index order = depth order
    k1, v1 = k[bi:bi + 1].clone(), v[bi:bi + 1].clone()
    for depth, j in enumerate(anc):
        k1[:, :, L + depth] = k[bi, :, L + j]
        v1[:, :, L + depth] = v[bi, :, L + j]
    one = torch.ones(1, 1, 1, dtype=torch.bool, device=q.device)
    p1 = torch.tensor([L + len(anc) - 1], dtype=torch.int32, device=q.device)
    return decode_attention(q[bi:bi + 1, :, i:i + 1], k1, v1, p1, one, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,dim", [(4, 2, 64), (3, 1, 48), (6, 2, 80)])
def test_matches_masked_attention(dtype, hq, hkv, dim):
    gen = torch.Generator().manual_seed(hq * dim)
    parents = [random_tree(7, gen), random_tree(7, gen)]
    q, k, v, mask, plen = _case(2, hq, hkv, dim, [37, 70], parents, dtype, "cpu")
    out = decode_attention(q, k, v, plen, mask)
    want = masked_attention_ref(q, k, v, _dense_mask(mask, plen, k.shape[2]))
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_equals_its_one_token_step(dtype):
    """The verification row of every tree node == the one-token step at its position after its
    ancestors are accepted, bitwise (prefixes chosen so trees straddle tile boundaries)."""
    gen = torch.Generator().manual_seed(5)
    parents = [random_tree(9, gen), [-1, 0, 1, 2, 3, 4, 5, 6, 7]]   # a tree and a chain
    q, k, v, mask, plen = _case(2, 4, 2, 64, [29, 60], parents, dtype, "cpu", seed=1)
    out = decode_attention(q, k, v, plen, mask)
    for bi in range(2):
        for i in range(9):
            assert torch.equal(out[bi:bi + 1, :, i:i + 1], _one_token_steps(q, k, v, mask, plen, bi, i)), (bi, i)


def test_row_does_not_depend_on_batch_mates_or_m():
    gen = torch.Generator().manual_seed(6)
    parents = [random_tree(6, gen) for _ in range(3)]
    q, k, v, mask, plen = _case(3, 4, 2, 64, [40, 7, 33], parents, torch.bfloat16, "cpu", seed=2)
    out = decode_attention(q, k, v, plen, mask)
    alone = decode_attention(q[1:2], k[1:2], v[1:2], plen[1:2], mask[1:2])
    assert torch.equal(out[1:2], alone)
    first3 = decode_attention(q[:, :, :3], k, v, plen, mask[:, :3, :3])   # a sub-tree: the first 3 nodes
    assert torch.equal(first3, out[:, :, :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_nodes_a_program_holds(dtype):
    """``program_rows`` (how many packed rows one program holds, padding the rest of its BLOCK_M tile) changes which
    nodes share a program's per-node loop, never a row's bits -- also when a node's rows straddle two programs."""
    gen = torch.Generator().manual_seed(11)
    parents = [random_tree(9, gen), [-1, 0, 1, 2, 3, 4, 5, 6, 7]]
    q, k, v, mask, plen = _case(2, 6, 2, 64, [29, 58], parents, dtype, "cpu", seed=12)
    out = decode_attention(q, k, v, plen, mask)
    for rows in (1, 3, 5, 6, 16):
        assert torch.equal(decode_attention(q, k, v, plen, mask, config=dict(program_rows=rows)), out), rows
    with pytest.raises(ValueError, match="program_rows=17 must be in"):
        decode_attention(q, k, v, plen, mask, config=dict(program_rows=17))


def test_narrow_programs_past_the_first_tier():
    """A prefix end at or past position 4096 (a 1024-key split holds it): the programs of that split hold whole
    tiles and the surplus ones idle; a batch whose rows straddle 4096 mixes both kinds in one launch. Every
    row == its one-token step, and == the whole-tile launch."""
    parents = [[-1, 0, 1, 1, 3], [-1, 0, 0, 1, 2]]
    q, k, v, mask, plen = _case(2, 4, 2, 16, [4100, 4090], parents, torch.float32, "cpu", seed=13)
    out = decode_attention(q, k, v, plen, mask, config=dict(program_rows=2))
    assert torch.equal(decode_attention(q, k, v, plen, mask, config=dict(program_rows=16)), out)
    want = masked_attention_ref(q, k, v, _dense_mask(mask, plen, k.shape[2]))
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    for bi in range(2):
        for i in range(5):
            assert torch.equal(out[bi:bi + 1, :, i:i + 1], _one_token_steps(q, k, v, mask, plen, bi, i)), (bi, i)


@pytest.mark.parametrize("L", [SPLIT_KEYS - 2, 4096 - 3])
def test_splits_by_absolute_position(L):
    """A prefix longer than one split: the row of a long verification still equals its one-token step
    (trees straddling the first split boundary and the first tier boundary)."""
    assert split_bounds(0) == (0, SPLIT_KEYS) and split_bounds(16) == (4096, 5120) and num_splits_for(4097) == 17
    parents = [[-1, 0, 1, 1, 3]]
    q, k, v, mask, plen = _case(1, 2, 1, 16, [L], parents, torch.float32, "cpu", seed=3)
    out = decode_attention(q, k, v, plen, mask)
    want = masked_attention_ref(q, k, v, _dense_mask(mask, plen, k.shape[2]))
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    for i in range(5):
        assert torch.equal(out[:, :, i:i + 1], _one_token_steps(q, k, v, mask, plen, 0, i)), i


def test_poisoned_memory_is_never_read():
    """Cache rows past prefix + M, and rows a node may not see, hold NaN: the output is unchanged."""
    gen = torch.Generator().manual_seed(8)
    parents = [random_tree(6, gen)]
    q, k, v, mask, plen = _case(1, 4, 2, 64, [21], parents, torch.float32, "cpu", seed=4, capacity=64)
    out = decode_attention(q, k, v, plen, mask)
    kp, vp = k.clone(), v.clone()
    kp[:, :, 21 + 6:] = float("nan")
    vp[:, :, 21 + 6:] = float("nan")
    bigk = torch.full((1, 2, 80, 96), float("nan"))
    bigv = torch.full((1, 2, 80, 96), float("nan"))
    bigk[:, :, :64, :64] = kp
    bigv[:, :, :64, :64] = vp
    assert torch.equal(decode_attention(q, bigk[:, :, :64, :64], bigv[:, :, :64, :64], plen, mask), out)


def test_ancestor_table():
    parents = [-1, 0, 0, 1, 3, 2]
    anc, depth = ancestor_table(tree_mask_of(parents)[None])
    assert depth[0].tolist() == list(Tree.from_parents(parents).depth)
    assert anc[0, 4, :4].tolist() == [0, 1, 3, 4]
    assert anc[0, 5, :3].tolist() == [0, 2, 5]


def test_gpu_block_m_follows_the_grid():
    """The GPU's 16-bit BLOCK_M (not part of any row's arithmetic: ``test_gpu_rows_equal_one_token_steps``
    checks every tile height gives the same bits) is the largest tile that keeps >= MIN_PROGRAMS programs.
    Llama-3-8B's 69-node verification (276 packed rows, 8 KV heads) gets the tiles session 29 measured fastest:
    16 at a 1k prefix (5 key splits), 32 at 4k (17), 64 at 32k (45); one row always 16; never above 64."""
    from specdec.fast.kernels.decode_attention import MIN_PROGRAMS, _gpu_block_m, num_splits_for

    assert [_gpu_block_m(69 * 4, num_splits_for(ctx + 69) * 8) for ctx in (1024, 4096, 32768)] == [16, 32, 64]
    assert _gpu_block_m(4, 10**6) == 16 and _gpu_block_m(4, 1) == 16
    for rows in (1, 4, 20, 64, 65, 276, 512):
        for per_tile in (1, 8, 40, 136, 360, 10**4):
            bm = _gpu_block_m(rows, per_tile)
            assert bm in (16, 32, 64)
            assert bm == 16 or -(-rows // bm) * per_tile >= MIN_PROGRAMS, (rows, per_tile, bm)
            assert bm == min(64, max(16, 1 << (rows - 1).bit_length())) or -(-rows // (2 * bm)) * per_tile < MIN_PROGRAMS


def test_gpu_program_rows_follow_the_heads():
    """At the smallest tile (16 rows) the programs of the split that holds L hold whole nodes, as few as keep B x
    Hkv x their row groups within FILL_PROGRAMS -- however many key splits the cache has (the other splits hold
    BLOCK_M rows); a larger tile is held whole (long prefixes: Llama-3-8B's 69 nodes at 4k and 32k keep the tiles
    session 29 measured)."""
    from specdec.fast.kernels.decode_attention import FILL_PROGRAMS, _gpu_block_m, _gpu_program_rows, num_splits_for

    assert _gpu_program_rows(32 * 2, 2, 16, 2) == 2      # the embedded model's 32-node tree: one node each
    assert _gpu_program_rows(1 * 2, 2, 16, 2) == 2       # a one-token step
    assert _gpu_program_rows(32 * 2, 2, 16, 8 * 2) == 4  # a batch of 8 rows of it: two nodes each
    assert _gpu_program_rows(69 * 4, 4, 16, 8) == 16     # Llama-3-8B's 69 nodes at 1k: the whole tile, as before
    for ctx in (4096, 32768):
        per_tile = num_splits_for(ctx + 69) * 8
        bm = _gpu_block_m(69 * 4, per_tile)
        assert _gpu_program_rows(69 * 4, 4, bm, 8) == bm
    for rows, group in ((2, 2), (64, 2), (138, 2), (276, 4), (7, 7), (40, 20)):
        for heads in (1, 2, 8, 64):
            pr = _gpu_program_rows(rows, group, 16, heads)
            assert 1 <= pr <= 16 and (pr % group == 0 or pr == 16), (rows, group, heads, pr)
            fewer = pr // 2 if (pr // group) % 2 == 0 else 0   # half as many nodes: over the fill, or not possible
            assert pr == group or pr == 16 and group > 16 or not fewer or \
                -(-rows // fewer) * heads > FILL_PROGRAMS, (rows, group, heads, pr)


def test_split_of_inverts_split_bounds():
    from specdec.fast.kernels.decode_attention import split_of

    for s in range(70):
        lo, hi = split_bounds(s)
        assert split_of(lo) == s and split_of(hi - 1) == s, s


def test_bad_input():
    q, k, v, mask, plen = _case(1, 4, 2, 64, [10], [[-1, 0]], torch.float32, "cpu")
    with pytest.raises(ValueError, match="head dim"):
        decode_attention(q[..., :40], k[..., :40], v[..., :40], plen, mask)
    with pytest.raises(ValueError, match="prefix_len"):
        decode_attention(q, k, v, plen + 100, mask)
    with pytest.raises(TypeError, match="tree_mask"):
        decode_attention(q, k, v, plen, mask.int())
    with pytest.raises(ValueError, match="Hq"):
        decode_attention(q[:, :3], k, v, plen, mask)
    assert MAX_HEAD_DIM == 256


# ------------------------------------------------------------------------------------------------
# GPU: tensor cores, real head shapes, long prefixes, tile sizes
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,dim", [(32, 8, 128), (28, 4, 128), (16, 16, 256), (12, 4, 80)])
def test_gpu_rows_equal_one_token_steps(dtype, hq, hkv, dim):
    gen = torch.Generator().manual_seed(dim + hq)
    parents = [random_tree(69, gen), random_tree(69, gen)]
    q, k, v, mask, plen = _case(2, hq, hkv, dim, [4100, 2070], parents, dtype, "cuda", seed=9)
    out = decode_attention(q, k, v, plen, mask)
    want = masked_attention_ref(q, k, v, _dense_mask(mask, plen, k.shape[2]))
    torch.testing.assert_close(out.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    for bi in range(2):
        for i in (0, 1, 5, 17, 40, 68):
            assert torch.equal(out[bi:bi + 1, :, i:i + 1], _one_token_steps(q, k, v, mask, plen, bi, i)), (bi, i)
    # the same rows whatever the tile height
    for block_m in (16, 32, 64):
        cfg = dict(block_m=block_m, num_warps=4)
        assert torch.equal(decode_attention(q, k, v, plen, mask, config=cfg), out), block_m
    # ... and whatever rows a program holds: one node, two, a node's rows split over two programs
    g = hq // hkv
    for rows in sorted({g, 2 * g, 3, 16}):
        if rows <= 16:
            assert torch.equal(decode_attention(q, k, v, plen, mask, config=dict(block_m=16, program_rows=rows)), out), rows


def _merged_want(o_part: torch.Tensor, l_part: torch.Tensor, hkv: int, group: int) -> torch.Tensor:
    """What ``merge_partials`` computes, eagerly: the partials [hkv, parts, rows, D] weighted by the softmax of their
    base-2 lse over the parts, as [1, hkv * group, rows // group, D] (row ``node * group + g``)."""
    w = torch.softmax(l_part * torch.log(torch.tensor(2.0)), dim=1)          # base-2 lse -> weights per part
    merged = (w[..., None] * o_part).sum(1)                                   # [hkv, rows, D]
    nodes, d = o_part.shape[2] // group, o_part.shape[3]
    return merged.reshape(1, hkv, nodes, group, d).permute(0, 1, 3, 2, 4).reshape(1, hkv * group, nodes, d)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_merge_order_is_fixed_by_the_partial_index(out_dtype):
    """``merge_partials``: the log-sum-exp merge's value, and a row's bits depend only on its own partials --
    not on how many rows the launch merges, and not on trailing partials that are empty for it (a deeper tree
    row at the same position has more splits than the one-token step). 21 parts: two iterations of the 16
    lanes; D 48: a partial column block. Inputs and output also as strided views into NaN-poisoned buffers."""
    from specdec.fast.kernels.tree_attention import merge_partials

    hkv, group, parts, nodes, d = 2, 4, 21, 3, 48
    rows = nodes * group
    g = torch.Generator().manual_seed(5)
    o_part = torch.randn(hkv, parts, rows, d, generator=g)
    l_part = torch.randn(hkv, parts, rows, generator=g) * 4
    o_part[:, 7, 2], l_part[:, 7, 2] = 0.0, float("-inf")        # a split empty for one row, as the kernel writes it

    def merge(o, lse):
        out = torch.full((1, hkv * group, o.shape[2] // group, d), float("nan"), dtype=out_dtype)
        return merge_partials(o.contiguous(), lse.contiguous(), out, hkv, group)

    out = merge(o_part, l_part)
    want = _merged_want(o_part, l_part, hkv, group)
    torch.testing.assert_close(out.float(), want, atol=TOL[out_dtype], rtol=TOL[out_dtype])
    for extra in (3, 17):   # trailing splits empty for every row: the same bits
        o2 = torch.cat([o_part, torch.zeros(hkv, extra, rows, d)], 1)
        l2 = torch.cat([l_part, torch.full((hkv, extra, rows), float("-inf"))], 1)
        assert torch.equal(merge(o2, l2), out), extra
    for node in range(nodes):   # each node's rows merged alone: the same bits
        sl = slice(node * group, (node + 1) * group)
        assert torch.equal(merge(o_part[:, :, sl], l_part[:, :, sl])[:, :, 0], out[:, :, node]), node
    # strided views into NaN-poisoned buffers: only the views may be read (a NaN partial past the count would
    # poison the row's max) or written (the padding stays NaN), and the bits are those of contiguous inputs
    nan = float("nan")
    o_buf = torch.full((hkv, parts + 2, rows + 3, d + 16), nan)
    l_buf = torch.full((hkv, parts + 2, rows + 3), nan)
    o_buf[:, :parts, :rows, :d], l_buf[:, :parts, :rows] = o_part, l_part
    out_buf = torch.full((1, hkv * group, nodes + 1, d + 16), nan, dtype=out_dtype)
    view = merge_partials(o_buf[:, :parts, :rows, :d], l_buf[:, :parts, :rows], out_buf[:, :, :nodes, :d], hkv, group)
    assert torch.equal(view, out)
    assert out_buf[:, :, nodes:].isnan().all() and out_buf[..., d:].isnan().all()


@pytest.mark.gpu
@pytest.mark.parametrize("parts,rows", [(45, 4), (69, 4), (69, 276)])
def test_gpu_merge_depth_is_not_part_of_the_bits(parts, rows):
    """The merge's pipeline depth (``merge_partials(stages=...)``) only changes when the partials' loads are
    issued: the same bits at every depth, empty partials (lse -inf) included. Only the GPU pipelines the loop;
    the interpreter ignores the depth, so this runs on CUDA only. 45 / 69 parts: a 32k / 128k step's splits."""
    from specdec.fast.kernels.tree_attention import merge_partials

    g = torch.Generator().manual_seed(parts + rows)
    o_part = torch.randn(8, parts, rows, 128, generator=g).cuda()
    l_part = (torch.randn(8, parts, rows, generator=g) * 4).cuda()
    l_part[:, -3:, : rows // 2] = float("-inf")   # trailing empty splits, as a shallow row of a deep tree sees
    outs = []
    for stages in (1, 3, 6, 10, 16):
        out = torch.full((1, 32, rows // 4, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
        outs.append(merge_partials(o_part, l_part, out, 8, 4, stages=stages))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    torch.testing.assert_close(outs[0].float(), _merged_want(o_part, l_part, 8, 4), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_128_rows_and_batch_of_8():
    gen = torch.Generator().manual_seed(11)
    parents = [random_tree(128, gen) for _ in range(8)]
    q, k, v, mask, plen = _case(8, 32, 8, 128, [33000 + 37 * i for i in range(8)], parents, torch.bfloat16, "cuda", seed=12)
    out = decode_attention(q, k, v, plen, mask)
    for bi in (0, 5):
        assert torch.equal(decode_attention(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], plen[bi:bi + 1], mask[bi:bi + 1]),
                           out[bi:bi + 1])
        for i in (0, 77, 127):
            assert torch.equal(out[bi:bi + 1, :, i:i + 1], _one_token_steps(q, k, v, mask, plen, bi, i)), (bi, i)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,dim", [(4, 2, 64), (32, 8, 128)])
def test_gpu_rows_across_a_split_boundary(dtype, hq, hkv, dim):
    """A tree that starts below a split boundary and reaches past it: its last tile below the boundary runs
    the per-node path, while the one-token step at a row's position runs the same tile on the shared path.
    Each row must still equal that step bitwise (with FMA contraction on, differences of a few ulp appeared --
    the embedded model's bf16 near-tie that made the draft-model chain and LogitSpec differ from vanilla)."""
    gen = torch.Generator().manual_seed(hq + dim)
    bad = []
    # the first split boundary (256), and the first tier boundary (4096: 256-key splits give way to 1024)
    for L in [*range(SPLIT_KEYS - 9, SPLIT_KEYS + 1), 4096 - 8, 4096 - 4, 4096 - 1]:
        for parents in ([-1, 0, 1, 2, 3, 4, 5, 6, 7], random_tree(9, gen)):
            q, k, v, mask, plen = _case(1, hq, hkv, dim, [L], [parents], dtype, "cuda", seed=L)
            out = decode_attention(q, k, v, plen, mask)
            bad += [(L, i) for i in range(9)
                    if not torch.equal(out[:, :, i:i + 1], _one_token_steps(q, k, v, mask, plen, 0, i))]
    assert bad == []


def test_compiled_without_fma_contraction(monkeypatch):
    """The GPU fix above, guarded where CI can see it: the kernel is launched with ``enable_fp_fusion=False``
    (the interpreter never contracts, so no CPU run can show the rounding difference itself)."""
    import importlib

    mod = importlib.import_module("specdec.fast.kernels.decode_attention")   # the module, not the function
    seen = []
    kernel = mod._decode_attention_kernel
    run = kernel.run

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enable_fp_fusion"))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", spy)
    q, k, v, mask, plen = _case(1, 4, 2, 64, [10], [[-1, 0, 1]], torch.float32, "cpu")
    out = decode_attention(q, k, v, plen, mask)
    assert seen == [False]
    torch.testing.assert_close(out, masked_attention_ref(q, k, v, _dense_mask(mask, plen, k.shape[2])), atol=2e-5, rtol=2e-5)
