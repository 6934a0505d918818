#!/usr/bin/env python3
"""Where a fast decoder's greedy output leaves fast vanilla's (the exactness contract, issue 18), row by row.

    python3 scripts/probes/exact_divergence.py --prompts 5 --methods speculative logitspec     # GPU, bf16

The prompts are tests/fast/test_exact_dtypes.py's (held-out stdlib prompts of >= 64 tokens, first 192 tokens,
128 new tokens, no EOS). For each diverging (prompt, method) it prints the first differing output index ``j``,
then re-runs both decoders eagerly (no CUDA graphs) with every ``step_forward`` call recorded, and compares the
row that decided token ``j`` (position ``P + j - 1``, fed token ``out[j - 1]``) with vanilla's one-token step at
the same position: bitwise equal or not, the largest difference, and the top two logits of each (a tie or a
near-tie at the top is where a last-bit difference changes the token). Before that it lists the first positions
along vanilla's path where no row of the method equals vanilla's step bitwise, with the call, its M, its prefix
length and the node -- the row where the arithmetic first parted, usually long before the token that flips.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Recorder:
    """Wraps every module-level ``step_forward`` of the fast path; records (positions, tokens, logits) per call."""

    MODULES = ("specdec.fast.model", "specdec.fast.engine", "specdec.fast.speculative", "specdec.fast.magicdec")

    def __init__(self) -> None:
        import importlib

        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.mods = [importlib.import_module(m) for m in self.MODULES]
        self.orig = self.mods[0].step_forward

    def __enter__(self) -> "Recorder":
        orig, calls = self.orig, self.calls

        def wrapped(fm, cache, tokens, positions, tree_mask, prefix_len, gather=True):
            logits = orig(fm, cache, tokens, positions, tree_mask, prefix_len, gather=gather)
            calls.append((positions.detach().clone(), tokens.detach().clone(), logits.detach().clone(), int(prefix_len[0])))
            return logits

        for m in self.mods:
            m.step_forward = wrapped
        return self

    def __exit__(self, *exc) -> None:
        for m in self.mods:
            m.step_forward = self.orig

    def rows(self, pos: int, token: int, where: bool = False) -> list:
        """Every recorded logits row of batch row 0 fed ``token`` at position ``pos``, in call order
        (with ``where``: ``(row, call index, M, prefix_len, node index)``)."""
        out = []
        for c, (positions, tokens, logits, plen) in enumerate(self.calls):
            hit = (positions[0] == pos) & (tokens[0] == token)
            for i in hit.nonzero().flatten().tolist():
                out.append((logits[0, i], c, tokens.shape[1], plen, i) if where else logits[0, i])
        return out


def top2(row: torch.Tensor) -> str:
    v, i = torch.topk(row.float(), 2)
    return f"top-2 {i[0].item()}:{v[0].item():.6g} {i[1].item()}:{v[1].item():.6g} (gap {(v[0] - v[1]).item():.3g})"


def first_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[1], b.shape[1])
    d = (a[0, :n] != b[0, :n]).nonzero()
    return int(d[0]) if len(d) else (-1 if a.shape == b.shape else n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--prompts", type=int, nargs="*", default=None, help="indices into the test's 20 prompts (default all)")
    ap.add_argument("--methods", nargs="+", default=["speculative", "logitspec"],
                    choices=["speculative", "spec", "tree_spec", "pld", "logitspec", "magicdec"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the contract it probes is the GPU's bf16/fp16 decode phase)")
    import specdec.fast as fast
    from specdec.benchutil import exactness_prompts, fast_greedy_decoders

    dt = DTYPES[args.dtype]
    target = fast.load_model("default", dtype=dt, device="cuda")
    draft = fast.load_model("default-draft", dtype=dt, device="cuda")
    glide = fast.load_glide("default-glide", target=target)
    methods = fast_greedy_decoders(target, draft, glide)
    kw = dict(max_gen_len=128, eos_id=[])
    prompts = exactness_prompts()
    todo = range(len(prompts)) if args.prompts is None else args.prompts
    for p in todo:
        ids = prompts[p]
        P = ids.shape[1]
        target.use_graphs = draft.use_graphs = True
        want = fast.vanilla_generate(target, ids, P, **kw).output_ids
        for name in args.methods:
            target.use_graphs = draft.use_graphs = True
            got = methods[name](ids, kw).output_ids
            j = first_diff(got, want)
            print(f"prompt {p} ({P} tokens) {name}: " + ("== vanilla" if j < 0 else
                  f"differs from output index {j}: got {got[0, j:j + 4].tolist()}, vanilla {want[0, j:j + 4].tolist()}"))
            if j < 0:
                continue
            # eager re-run of both, every scored row recorded
            target.use_graphs = draft.use_graphs = False
            with Recorder() as rv:
                want_e = fast.vanilla_generate(target, ids, P, **kw).output_ids
            with Recorder() as rm:
                got_e = methods[name](ids, kw).output_ids
            je = first_diff(got_e, want_e)
            print(f"  eager: vanilla eager == graphs: {torch.equal(want_e, want)}; {name} eager first diff {je}")
            if je < 1:
                continue
            # the first position along vanilla's path where no row of the method equals vanilla's step bitwise
            shown = 0
            for jj in range(1, je + 1):
                vr = rv.rows(P + jj - 1, int(want_e[0, jj - 1]))
                cands = rm.rows(P + jj - 1, int(want_e[0, jj - 1]), where=True)
                if vr and not any(torch.equal(r, vr[-1]) for r, *_ in cands):
                    info = [(c, m, plen, i, f"{(r - vr[-1]).abs().max().item():.3g}") for r, c, m, plen, i in cands]
                    print(f"  output {jj}: position {P + jj - 1}: no bitwise-equal row; (call, M, prefix_len, node, max|diff|): {info}")
                    shown += 1
                    if shown == 6:
                        break
            pos, fed = P + je - 1, int(want_e[0, je - 1])
            v_rows, m_rows = rv.rows(pos, fed), rm.rows(pos, fed)
            print(f"  position {pos}, fed token {fed}: vanilla rows {len(v_rows)}, {name} rows {len(m_rows)}")
            if v_rows:
                vr = v_rows[-1]
                print(f"  vanilla step: argmax {int(vr.argmax())}, {top2(vr)}")
                for k, r in enumerate(m_rows):
                    same = torch.equal(r, vr)
                    diff = (r.float() - vr.float()).abs().max().item()
                    print(f"  {name} row {k}: argmax {int(r.argmax())}, bitwise equal {same}, max |diff| {diff:.3g}, {top2(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
