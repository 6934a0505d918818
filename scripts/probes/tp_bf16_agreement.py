#!/usr/bin/env python3
"""Why TP = 2 and TP = 1 can disagree in bf16 (issue 23): the embedded default model in bf16 on the CPU
(Triton interpreter), two gloo ranks, against one process.

Prints, for one random-token prompt, the first token's top-3 logits at TP = 1 and TP = 2 and the largest
logit difference, then the greedy agreement on the code prompts of ``scripts/bench_tp.py`` (16 tokens each).
Minutes on a 2-core CPU:

    torchrun --nproc-per-node 2 scripts/probes/tp_bf16_agreement.py
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_tp import TEXT_PROMPTS  # noqa: E402

import specdec.fast as fast  # noqa: E402
from specdec.fast.model import prefill  # noqa: E402
from specdec.fast.tp import TensorParallel  # noqa: E402
from specdec.shared.assets import resolve_model_path  # noqa: E402
from specdec.shared.tokenizer import encode_prompt, load_tokenizer  # noqa: E402
from specdec.shared.weights import load_checkpoint  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    path = resolve_model_path("default")
    fm2 = fast.as_fast_model(load_checkpoint(path, dtype=torch.bfloat16, device="cpu"),
                             tp=TensorParallel(rank=rank, world=dist.get_world_size()))
    fm1 = fast.as_fast_model(load_checkpoint(path, dtype=torch.bfloat16, device="cpu")) if rank == 0 else None
    ids = torch.randint(0, fm2.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(7))
    l2 = prefill(fm2, fm2.ensure_cache(1, 80, name="probe"), ids)[0]
    if rank == 0:
        l1 = prefill(fm1, fm1.ensure_cache(1, 80, name="probe"), ids)[0]
        for name, logits in (("TP=1", l1), ("TP=2", l2)):
            top = torch.topk(logits, 3)
            print(f"random prompt, first token, {name}: top-3 logits {top.values.tolist()} ids {top.indices.tolist()}")
        print(f"max |logits TP=1 - TP=2| = {(l1 - l2).abs().max().item():.4f}", flush=True)
    tok = load_tokenizer("default")
    for text in TEXT_PROMPTS:
        p = torch.tensor([encode_prompt(tok, text)])
        o2 = fast.vanilla_generate(fm2, p, p.shape[1], max_gen_len=16, eos_id=[]).output_ids[0].tolist()
        if rank == 0:
            o1 = fast.vanilla_generate(fm1, p, p.shape[1], max_gen_len=16, eos_id=[]).output_ids[0].tolist()
            same = [a == b for a, b in zip(o1, o2)]
            print(f"{text[:24]!r}: {sum(same)} / {len(same)} tokens equal, first difference "
                  f"{same.index(False) if not all(same) else None}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
