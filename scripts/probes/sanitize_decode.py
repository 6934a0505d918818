#!/usr/bin/env python3
"""Run the decode-phase kernels once on small shapes, for ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck python3 scripts/probes/sanitize_decode.py

Covers :func:`specdec.fast.kernels.decode_attention` (a tree straddling a tile and a split boundary,
a ragged batch, head dims 80 and 256, K/V as views of a larger cache) and
:func:`specdec.fast.kernels.row_linear` (plain, norm + residual, SwiGLU, a fixed K split, TMA tiles),
:func:`specdec.fast.kernels.embed_gemv_qkv_rope` and :func:`~specdec.fast.kernels.gemv_q_rope` (the GLIDE draft's
rope GEMVs, session 37), :func:`specdec.fast.kernels.log_softmax_f32` (the beam's scores, session 38),
:func:`specdec.fast.kernels.keyed.keyed_noise` (issue 22), then one
decode step of a tiny model end to end, and a batched GLIDE beam tree over ragged rows (issue 19:
the draft layer's kernels with [B] key ranges, ``beam_select`` on row views; eager, then as captured fused rounds),
and :func:`specdec.fast.kernels.merge_attention` alone and inside the blocked (cuDNN) prefill attention, then the
layer-major prefill (its RoPE and norm kernels writing into whole-prompt buffers).
Prints one line per case; the sanitizer prints its summary.
"""

from __future__ import annotations

import torch

from specdec.fast.kernels import decode_attention, row_linear
from specdec.fast.kernels.decode_attention import SPLIT_KEYS
from specdec.shared.tree import Tree


def tree_mask(parents):
    return Tree.from_parents(parents).ancestor_mask()


def main() -> None:
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    for hq, hkv, d, dtype in ((8, 2, 80, torch.bfloat16), (4, 4, 256, torch.float16), (6, 2, 64, torch.float32)):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, 21)]
        m = len(parents)
        mask = torch.stack([tree_mask(parents)] * 2).to(dev)
        cap = SPLIT_KEYS + 96
        k = torch.randn(2, hkv, cap + 7, d + 16, generator=g).to(dtype).to(dev)[:, :, :cap, :d]   # strided views
        v = torch.randn(2, hkv, cap + 7, d + 16, generator=g).to(dtype).to(dev)[:, :, :cap, :d]
        q = torch.randn(2, hq, m, d, generator=g).to(dtype).to(dev)
        plen = torch.tensor([SPLIT_KEYS - 5, 40], dtype=torch.int32, device=dev)
        out = decode_attention(q, k, v, plen, mask)
        torch.cuda.synchronize()
        print(f"decode_attention hq={hq} hkv={hkv} d={d} {dtype}: finite={bool(torch.isfinite(out).all())}")
        for rows in (1, hq // hkv, 3):   # programs holding fewer rows than their tile (padded rows), session 37
            out_r = decode_attention(q, k, v, plen, mask, config=dict(block_m=16, program_rows=rows))
            torch.cuda.synchronize()
            print(f"  program_rows={rows}: == default {torch.equal(out_r, out)}")
    # narrow programs past the first split tier: the split holding L runs whole tiles and its surplus programs idle;
    # a batch whose prefixes straddle position 4096 mixes both kinds in one launch
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, 21)]
    mask = torch.stack([tree_mask(parents)] * 2).to(dev)
    k = torch.randn(2, 2, 4200, 64, generator=g).to(torch.bfloat16).to(dev)
    v = torch.randn(2, 2, 4200, 64, generator=g).to(torch.bfloat16).to(dev)
    q = torch.randn(2, 8, 21, 64, generator=g).to(torch.bfloat16).to(dev)
    plen = torch.tensor([4100, 4090], dtype=torch.int32, device=dev)
    whole = decode_attention(q, k, v, plen, mask, config=dict(block_m=16, program_rows=16))
    narrow = decode_attention(q, k, v, plen, mask, config=dict(block_m=16, program_rows=4))
    torch.cuda.synchronize()
    print(f"decode_attention across 4096, narrow == whole tiles: {torch.equal(narrow, whole)}")
    for n, k_, kw in ((96, 80, {}), (200, 64, {"norm": True, "resid": True}), (2 * 96, 128, {"silu": True})):
        x = torch.randn(37, k_, generator=g).to(torch.bfloat16).to(dev)
        w = (torch.randn(n, k_, generator=g) * 0.1).to(torch.bfloat16).to(dev)
        args = {}
        if kw.get("norm"):
            args.update(norm_weight=torch.ones(k_, dtype=torch.bfloat16, device=dev), eps=1e-6)
        if kw.get("resid"):
            args.update(residual=torch.randn(37, n, generator=g).to(torch.bfloat16).to(dev))
        if kw.get("silu"):
            args.update(silu=True)
        for cfg in (None, (16, 32, 32, 4, 2, 2), (16, 32, 32, 4, 2, 2, 1), (64, 32, 32, 4, 2, 2, 1, 1),
                    (128, 64, 64, 4, 3, 1, 1, 1),    # the last two: TMA tiles (a K tail, partial M tiles)
                    (32, 32, 32, 4, 2, 2, 1, 1, 16), (32, 32, 32, 4, 2, 1, 1, 0, 16)):   # TAIL tiles (TMA, pointers)
            y = row_linear(x, w, config=cfg, **args)
            torch.cuda.synchronize()
            print(f"row_linear n={n} k={k_} {kw} config={cfg}: finite={bool(torch.isfinite(y).all())}")
    # the GLIDE draft's rope GEMVs (session 37): query-only, and with the embedding lookup in the launch (a K that
    # is not a multiple of the K tile: the embedding copy's masked tail); the caches are views of larger buffers
    from specdec.fast.kernels import embed_gemv_qkv_rope, gemv_q_rope

    for hq, hkv, d, k_ in ((4, 2, 64, 256), (3, 1, 80, 200)):
        w = (torch.randn((hq + 2 * hkv) * d, k_, generator=g) * 0.1).to(torch.bfloat16).to(dev)
        embed = torch.randn(300, k_, generator=g).to(torch.bfloat16).to(dev)
        tokens = torch.tensor([[0, 299, 7]], device=dev)
        ang = torch.rand(1, 3, d // 2, generator=g)
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(torch.bfloat16).to(dev)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(torch.bfloat16).to(dev)
        kc = torch.zeros(1, hkv, 20, d + 16, dtype=torch.bfloat16, device=dev)[..., :d]
        vc = torch.zeros(1, hkv, 20, d + 16, dtype=torch.bfloat16, device=dev)[..., :d]
        rows = torch.tensor([[0, 19, 5]], dtype=torch.int32, device=dev)
        nw = torch.ones(k_, dtype=torch.bfloat16, device=dev)
        q, x_e = embed_gemv_qkv_rope(tokens, embed, w, None, cos, sin, kc, vc, rows, norm_weight=nw, eps=1e-6)
        q2 = gemv_q_rope(x_e, w[: hq * d], None, cos, sin, norm_weight=nw, eps=1e-6)
        torch.cuda.synchronize()
        print(f"embed_gemv_qkv_rope / gemv_q_rope hq={hq} hkv={hkv} d={d} k={k_}: "
              f"finite={bool(torch.isfinite(q).all() and torch.isfinite(q2).all())} q equal={torch.equal(q, q2)}")
    # the fp32 log-softmax of bf16 logits (the GLIDE beam's scores, session 38): one tile, several tiles with a
    # tail, rows of a wider buffer, the output a view of a larger one
    from specdec.fast.kernels import log_softmax_f32

    for p_, v_, block in ((7, 4096, None), (3, 5000, None), (2, 300, 64)):
        buf = torch.randn(p_, v_ + 24, generator=g).to(torch.bfloat16).to(dev)
        out = torch.empty(p_ + 1, v_ + 8, dtype=torch.float32, device=dev)[1:, 4 : 4 + v_]
        y = log_softmax_f32(buf[:, :v_], out=out, block=block)
        torch.cuda.synchronize()
        close = torch.allclose(y, torch.log_softmax(buf[:, :v_].float(), dim=-1), rtol=1e-6, atol=2e-5)
        print(f"log_softmax_f32 P={p_} V={v_} block={block}: finite={bool(torch.isfinite(y).all())} close to torch={close}")
    # the keyed-noise kernel (issue 22): a vocabulary over one block and not a multiple of it, token ids
    from specdec.fast.kernels.keyed import keyed_noise
    from specdec.shared.keyed import sequence_key

    pos = torch.randint(0, 2**31 - 1, (37,), generator=g).to(dev)
    for vocab, ids in ((1500, None), (128256, None), (4096, torch.tensor([0, 3, 4095, 77, 2**33 + 1], device=dev))):
        noise = keyed_noise(sequence_key(5, 1), pos, vocab, token_ids=ids)
        torch.cuda.synchronize()
        print(f"keyed_noise V={vocab} ids={ids is not None}: finite={bool(torch.isfinite(noise).all())}")
    # one tiny model: prefill, a 5-node tree verification, a one-token step
    from specdec.fast.model import as_fast_model, prefill, step_forward
    from specdec.shared.weights import model_from_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    fm = as_fast_model(model_from_hf(hf, dtype=torch.bfloat16, device=dev))
    fm.use_graphs = False
    cache = fm.ensure_cache(1, 200)
    prefill(fm, cache, torch.randint(0, 256, (1, 70), device=dev))
    mask = tree_mask([-1, 0, 0, 1, 2]).to(dev)[None]
    pos = cache.length + mask.sum(-1) - 1
    logits = step_forward(fm, cache, torch.randint(0, 256, (1, 5), device=dev), pos, mask, cache.length_t)
    torch.cuda.synchronize()
    print(f"step_forward tree of 5: finite={bool(torch.isfinite(logits).all())}")
    # a batched GLIDE round (fast/glide/batch.py): three ragged rows, one finishing early, eager (no graphs)
    import specdec.fast as fast
    from specdec.shared.glide import init_glide_weights

    glide = init_glide_weights(fm.config, seed=3, std=0.3, dtype=torch.bfloat16, device=dev)
    prompts = [torch.randint(0, 256, (n,)) for n in (70, 1, 33)]
    res = fast.tree_spec_generate(fm, glide, prompts, None, tree_shape=(3, 4, 2), max_gen_len=12, eos_id=[])
    torch.cuda.synchronize()
    print(f"batched GLIDE tree (3 rows): rows={res.output_ids.shape[0]} tokens={res.row_lengths}")
    # one row whose prompt is longer than the draft's window: the prompt catch-up writes only the draft K/V of the
    # last window positions (glide_kv_write), then the rounds read them
    glide16 = init_glide_weights(fm.config, window=16, seed=4, std=0.3, dtype=torch.bfloat16, device=dev)
    long_prompt = torch.randint(0, 256, (16 * 3 + 5,))
    one = fast.tree_spec_generate(fm, glide16, long_prompt, None, tree_shape=(3, 4, 2), max_gen_len=12, eos_id=[])
    torch.cuda.synchronize()
    print(f"GLIDE tree, prompt of {long_prompt.numel()} > window 16: tokens={one.output_ids.shape[-1]}")
    # the same rows drafting together with CUDA graphs: greedy rounds of the full tree fused into one graph
    # (draft + verification + acceptance + compaction), the last rounds the captured or eager draft
    from specdec.fast.glide.drafter import FastGlideDrafter

    fm.use_graphs, FastGlideDrafter.batch_rounds = True, True
    fused = fast.tree_spec_generate(fm, glide, prompts, None, tree_shape=(3, 4, 2), max_gen_len=12, eos_id=[])
    torch.cuda.synchronize()
    print(f"batched GLIDE tree, fused graphs: same tokens as eager={torch.equal(fused.output_ids, res.output_ids)}")
    FastGlideDrafter.batch_rounds = False
    # the blocked prefill's merge kernel (session 18): on cuDNN's [B, n, H, D] layout views, in place and into
    # bf16, n not a multiple of the row tile, head dims 80 and 128; then the blocked prefill attention itself
    from specdec.fast.kernels import merge_attention
    from specdec.fast.model import _prefill_attention

    for n, d in ((37, 80), (2048, 128)):
        acc = torch.randn(1, n, 8, d, device=dev).transpose(1, 2)
        out = torch.randn(1, n + 5, 8, d, device=dev, dtype=torch.bfloat16)[:, :n].transpose(1, 2)
        acc_lse, lse = (torch.randn(1, 8, n + 3, device=dev)[..., :n] for _ in range(2))
        merge_attention(acc, acc_lse, out, lse)
        res16 = merge_attention(acc, acc_lse, out, lse, torch.empty(1, 8, n, d, device=dev, dtype=torch.bfloat16),
                                torch.empty(1, 8, n, device=dev))[0]
        torch.cuda.synchronize()
        print(f"merge_attention n={n} d={d}: finite={bool(torch.isfinite(res16).all())}")
    import os

    os.environ["SPECDEC_PREFILL_ATTENTION"] = "cudnn-blocks"
    q = torch.randn(1, 8, 48, 128, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(2, 1, 2, 48 + 208, 128, device=dev, dtype=torch.bfloat16)   # p0 = 208: blocks 128, 64, 16
    o = _prefill_attention(q, kv[0], kv[1])
    torch.cuda.synchronize()
    print(f"blocked prefill attention p0=208 n=48: finite={bool(torch.isfinite(o).all())}")
    # the layer-major prefill (session 35): RoPE writes q into a token-major whole-prompt buffer, and each chunk's
    # norm writes h and x in place (the kernels' q_out / out / residual_out); 1500 tokens = 2 chunks of 1024 + 476,
    # padded to 2048 attention rows
    os.environ["SPECDEC_PREFILL_ATTENTION"] = "cudnn-prompt"
    fm.caches.clear()
    cache = fm.ensure_cache(1, 2100)
    logits = prefill(fm, cache, torch.randint(0, 256, (1, 1500), device=dev), chunk_size=1024)
    torch.cuda.synchronize()
    print(f"layer-major prefill of 1500 tokens: finite={bool(torch.isfinite(logits).all())}")


if __name__ == "__main__":
    main()
