"""Tensor parallelism (fast/tp.py) on the CPU: two gloo processes, the Triton kernels under the interpreter.

Every decoder that runs tensor-parallel gives the same greedy tokens at TP = 2 as at TP = 1 (fp32, a
small model; bitwise equality of logits across TP degrees is not promised: the row-parallel sums are
added in another order), the ranks agree with each other, and bad configurations are clear errors.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from lossless import tiny_model

PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]
NEW = 6


KEYED = dict(temperature=1.0, sampling="keyed", seed=3)
BATCH = [[5, 6, 7, 8, 9, 5, 6, 7], [12, 13, 12, 13, 12]]


def _decoders(fast, draft):
    return {
        "vanilla": lambda m, kw: fast.vanilla_generate(m, **kw),
        "vanilla keyed": lambda m, kw: fast.vanilla_generate(m, **kw, **KEYED),
        "magicdec keyed": lambda m, kw: fast.magicdec_generate(m, gamma=3, sink_tokens=2, window=6, **kw, **KEYED),
        "pld batch": lambda m, kw: fast.pld_generate(m, BATCH, None, num_pred_tokens=4, max_gen_len=kw["max_gen_len"],
                                                     eos_id=[]),
        "speculative": lambda m, kw: fast.speculative_generate(m, draft, gamma=3, **kw),
        "pld": lambda m, kw: fast.pld_generate(m, num_pred_tokens=4, **kw),
        "logitspec": lambda m, kw: fast.logitspec_generate(m, draft_tree_capacity=8, num_pred_tokens=4, **kw),
        "magicdec": lambda m, kw: fast.magicdec_generate(m, gamma=3, sink_tokens=2, window=6, **kw),
    }


def _models():
    # 4 query heads, 2 KV heads, MLP 256: divisible by 2 ranks; qwen2 for the q/k/v biases
    target = tiny_model("qwen2", vocab=67, layers=2, hidden=128, heads=4, kv_heads=2, seed=1, init_std=0.3,
                        max_pos=256, intermediate=256)   # vocab 67: the lm_head shards are padded
    draft = tiny_model("llama", vocab=67, layers=1, hidden=128, heads=2, kv_heads=1, seed=2, init_std=0.3, max_pos=256)
    return target, draft


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    import specdec.fast as fast
    from specdec.fast.tp import TensorParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        target, draft = _models()
        tp = TensorParallel(rank=rank, world=world)
        fm = fast.as_fast_model(target, tp=tp)
        assert fm.w["layers.0.wqkv"].shape[0] == (4 + 2 * 2) * 32 // world      # this rank's heads only
        ids = torch.tensor([PROMPT])
        kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=NEW, eos_id=[])
        out = {name: run(fm, kw).output_ids for name, run in _decoders(fast, draft).items() if name != "vanilla keyed"}
        with pytest.raises(ValueError, match="tensor-parallel"):
            from specdec.shared.glide import init_glide_weights

            fast.tree_spec_generate(fm, init_glide_weights(target.config, seed=3), **kw)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp2_gives_tp1_tokens_for_every_decoder():
    import specdec.fast as fast

    target, draft = _models()
    ids = torch.tensor([PROMPT])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=NEW, eos_id=[])
    want = {name: run(target, kw).output_ids for name, run in _decoders(fast, draft).items()}
    assert all(torch.equal(want[k], want["vanilla"]) for k in ("speculative", "pld", "logitspec", "magicdec"))   # lossless
    assert torch.equal(want["magicdec keyed"], want["vanilla keyed"])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True, start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for name, tokens in want.items():
        if name == "vanilla keyed":   # the TP = 1 reference of "magicdec keyed" only
            continue
        assert torch.equal(ranks[0][name], tokens), name
        assert torch.equal(ranks[1][name], tokens), name


def test_head_counts_not_divisible_are_a_clear_error():
    import specdec.fast as fast
    from specdec.fast.tp import TensorParallel, init_tensor_parallel

    target, _ = _models()
    with pytest.raises(ValueError, match=r"attention heads \(4\) to be a multiple of 3"):
        fast.as_fast_model(target, tp=TensorParallel(rank=0, world=3))
    with pytest.raises(ValueError, match=r"KV heads \(2\) to be a multiple of 4"):   # GQA: 4 query heads split, 2 KV heads not
        fast.as_fast_model(target, tp=TensorParallel(rank=0, world=4))
    with pytest.raises(ValueError, match="tp must be an int >= 1"):
        init_tensor_parallel(0)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        init_tensor_parallel(2)   # this process is a world of 1


def test_cli_tp_errors(capsys):
    from specdec.cli import main

    assert main(["generate", "--tp", "0", "x"]) == 2
    assert "--tp must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--tp", "2", "--backend", "ref", "x"]) == 2
    assert "--backend fast" in capsys.readouterr().err
    assert main(["generate", "--tp", "2", "--backend", "fast", "--method", "tree_spec", "x"]) == 2
    assert "not sharded" in capsys.readouterr().err
    assert main(["generate", "--tp", "2", "--backend", "fast", "--method", "vanilla", "--force-interpreter", "x"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_bench_tp_errors(capsys, tmp_path):
    from specdec.bench import bench_main

    out = ["--out-dir", str(tmp_path)]
    assert bench_main(["--tp", "2", "--backend", "ref", "--methods", "vanilla", *out]) == 2
    assert "--backend fast" in capsys.readouterr().err
    assert bench_main(["--tp", "2", "--methods", "vanilla,tree_spec", *out]) == 2
    assert "tree_spec do not run tensor-parallel" in capsys.readouterr().err
    assert bench_main(["--tp", "2", "--methods", "vanilla,pld", *out]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
    assert bench_main(["--tp", "0", *out]) == 2
