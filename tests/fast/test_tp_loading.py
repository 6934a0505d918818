"""Loading a checkpoint for tensor parallelism (fast/model.py: load_model(..., tp=)) on the CPU.

Each rank reads the checkpoint tensor by tensor and keeps only its slice (fast/tp.py:
shard_canonical) -- it must end with exactly the weights that sharding the whole fused model gives
(shard_weights), bit for bit, for every checkpoint layout the loader reads: one safetensors file,
several shards with an index, a ``.bin``; tied embeddings; q/k/v and o biases (Llama's
attention_bias); a vocabulary that the ranks do not divide. No process group is needed: the loading
itself runs no collective.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_hf_model, save_hf_model

WORLD = 2


@pytest.mark.parametrize("case", [
    dict(family="llama", fmt="safetensors", shard=False, tie=False, bias=True, vocab=67),
    dict(family="qwen2", fmt="safetensors", shard=True, tie=True, bias=False, vocab=64),
    dict(family="llama", fmt="bin", shard=False, tie=True, bias=False, vocab=67),
])
def test_each_rank_loads_its_slice_of_the_checkpoint(tmp_path, case):
    import specdec.fast as fast
    from specdec.fast.tp import TensorParallel
    from specdec.shared.weights import model_from_hf

    hf = make_hf_model(case["family"], heads=4, kv_heads=2, head_dim=16, layers=2, intermediate=48,
                       vocab=case["vocab"], tie=case["tie"], bias=case["bias"])
    path = save_hf_model(hf, tmp_path / "m", shard=case["shard"], fmt=case["fmt"])
    whole = model_from_hf(hf)
    for rank in range(WORLD):
        tp = TensorParallel(rank=rank, world=WORLD)
        got = fast.load_model(path, dtype=torch.float32, device="cpu", tp=tp)
        want = fast.as_fast_model(whole, tp=tp)
        assert got.tp is tp and got.config == want.config
        assert got.w.keys() == want.w.keys()
        for key in want.w:
            assert torch.equal(got.w[key], want.w[key]), (rank, key)
            assert got.w[key].is_contiguous(), key
        assert got.w["lm_head"].shape[0] == -(-case["vocab"] // WORLD)         # the padded vocabulary slice


def test_loading_refuses_a_world_that_does_not_divide_the_heads(tmp_path):
    import specdec.fast as fast
    from specdec.fast.tp import TensorParallel

    hf = make_hf_model("llama", heads=4, kv_heads=2, head_dim=16, layers=1, intermediate=48, vocab=32)
    path = save_hf_model(hf, tmp_path / "m")
    with pytest.raises(ValueError, match=r"KV heads \(2\) to be a multiple of 4"):
        fast.load_model(path, dtype=torch.float32, device="cpu", tp=TensorParallel(rank=0, world=4))
