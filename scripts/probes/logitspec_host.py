#!/usr/bin/env python3
"""LogitSpec's host-side drafting cost per round: the guess order from a full stable sort of the vocabulary
(the rule as first written) against :func:`specdec.shared.retrieval.guess_order` (only the first
``capacity + 1`` ids, :func:`specdec.shared.sampling.stable_topk`), and the host-side tree setup of the
fast engine per round (the ancestor mask per node vs from byte rows), measured in the same run (issue 20 item 4).

    python3 scripts/probes/logitspec_host.py --questions 3 --max-new-tokens 128 --out runs/logitspec_host.jsonl

Part 1 records the round states of real ``ref.logitspec_generate`` runs on the embedded model (the first
``--questions`` prompts of ``stdlib_code``), then replays them through fresh drafters, alternating the two
orders, and checks that every draft is identical. Part 2 times the guess order alone on random logits of the
embedded model's vocabulary (4096) and Llama-3's (128256), on this machine's CPU and, when there is one, a
CUDA device (the logits on the device, as the fast path holds them). Prints a table, writes JSONL.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import specdec.shared.retrieval as retrieval
from specdec import ref
from specdec.bench import load_questions
from specdec.benchutil import report
from specdec.shared.tokenizer import encode_prompt, load_tokenizer


def full_sort_order(last_logits: torch.Tensor, capacity: int) -> list[int]:
    """The first rule: every id by a stable descending sort of the whole vocabulary, on the host."""
    s = last_logits.float().cpu().reshape(-1)
    s = torch.where(torch.isnan(s), float("-inf"), s)
    return torch.sort(s, descending=True, stable=True).indices.tolist()


def record_states(questions: int, max_new_tokens: int) -> list:
    """The RoundStates (tokens and last logits copied) of logitspec_generate on the first prompts."""
    target, tok = ref.load_model("default"), load_tokenizer("default")
    states, orig = [], retrieval.LogitSpecDrafter.propose

    def recording(self, state):
        logits = None if state.last_logits is None else state.last_logits.clone()
        states.append(dataclasses.replace(state, tokens=list(state.tokens), last_logits=logits))
        return orig(self, state)

    retrieval.LogitSpecDrafter.propose = recording
    try:
        for q in load_questions("stdlib_code", 0, questions):
            ids = torch.tensor([encode_prompt(tok, q["turns"][0])])
            ref.logitspec_generate(target, ids, ids.shape[1], max_gen_len=max_new_tokens)
    finally:
        retrieval.LogitSpecDrafter.propose = orig
    return states


def replay(states: list, order_fn, reps: int) -> tuple[list[float], list]:
    """Median-of-``reps`` seconds per round through fresh drafters (one per call, as the decoder makes them)."""
    saved, retrieval.guess_order = retrieval.guess_order, order_fn
    try:
        per_round = [[] for _ in states]
        drafts = None
        for _ in range(reps):
            drafter, out = None, []
            for i, st in enumerate(states):
                if drafter is None or len(st.tokens) < len(drafter.pool.tokens):
                    drafter = retrieval.LogitSpecDrafter()        # a new call: a new pool
                t0 = time.perf_counter()
                out.append(drafter.propose(st))
                per_round[i].append(time.perf_counter() - t0)
            drafts = out
        return [statistics.median(t) for t in per_round], drafts
    finally:
        retrieval.guess_order = saved


def per_node_ancestor_mask(tree) -> torch.Tensor:
    """The first ``Tree.ancestor_mask``: two tensor ops per node (row i = its parent's row | column i)."""
    m = tree.size
    mask = torch.zeros(m, m, dtype=torch.bool)
    for i in range(m):
        mask[i, i] = True
        if tree.parents[i] >= 0:
            mask[i] |= mask[tree.parents[i]]
    return mask


def time_masks(drafts: list, reps: int) -> dict[str, float]:
    """Mean us per round of each tree's ancestor mask (before / now) and of the fast engine's
    whole host-side tree setup (``TreeTensors``: mask, depths, parents, padding)."""
    from specdec.fast.engine import TreeTensors

    out = {}
    for name, fn in (("mask, per node (before)", per_node_ancestor_mask), ("mask, byte rows (now)", lambda t: t.ancestor_mask()),
                     ("TreeTensors (now)", lambda t: TreeTensors(t, 65, torch.device("cpu")))):
        t0 = time.perf_counter()
        for _ in range(reps):
            for d in drafts:
                fn(d.tree)
        out[name] = (time.perf_counter() - t0) / (reps * len(drafts)) * 1e6
    assert all(torch.equal(per_node_ancestor_mask(d.tree), d.tree.ancestor_mask()) for d in drafts)
    return out


def time_order(fn, logits: torch.Tensor, capacity: int, reps: int) -> float:
    for _ in range(3):
        fn(logits, capacity)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(logits, capacity)
    return (time.perf_counter() - t0) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--capacity", type=int, default=64, help="draft_tree_capacity (LogitSpec's default)")
    ap.add_argument("--out", default=None, help="JSONL file")
    args = ap.parse_args()
    records, rows = [], []

    states = record_states(args.questions, args.max_new_tokens)
    t_full, d_full = replay(states, full_sort_order, args.reps)
    t_new, d_new = replay(states, retrieval.guess_order, args.reps)
    same = all(a.tokens.tolist() == b.tokens.tolist() and a.tree == b.tree for a, b in zip(d_full, d_new))
    for name, t in (("full sort", t_full), ("guess_order", t_new)):
        r = dict(part="propose", order=name, rounds=len(states), median_us=statistics.median(t) * 1e6,
                 mean_us=statistics.mean(t) * 1e6, same_drafts=same)
        records.append(r)
        rows.append(["propose (embedded model, V 4096)", name, "cpu", f"{r['median_us']:.0f}", f"{r['mean_us']:.0f}", same])

    for name, us in time_masks(d_new, args.reps).items():
        records.append(dict(part="tree", what=name, us=us, rounds=len(d_new)))
        rows.append([f"host tree setup per round: {name}", "", "cpu", f"{us:.0f}", "", True])

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(0)
    for vocab in (4096, 128256):
        for dev in devices:
            logits = torch.randn(vocab, generator=g).to(dev)
            same = full_sort_order(logits, args.capacity)[: args.capacity + 1] == retrieval.guess_order(logits, args.capacity)
            for name, fn in (("full sort", full_sort_order), ("guess_order", retrieval.guess_order)):
                us = time_order(fn, logits, args.capacity, 20 if vocab > 10000 else 200) * 1e6
                records.append(dict(part="order", order=name, vocab=vocab, device=dev, us=us, same_prefix=same))
                rows.append([f"guess order alone, V {vocab}", name, dev, f"{us:.0f}", "", same])

    report(rows, ["what", "order", "device", "median us / round", "mean us", "same drafts / prefix"], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
