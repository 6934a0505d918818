#!/usr/bin/env python3
"""How stable is the shape ``tree_shape="auto"`` picks? Calibrate the round costs several times and search each
time (issue 21; BENCHMARKS "Session 14: calibrating `auto`").

    python3 scripts/probes/calibration_stability.py --runs 3 [--backend ref] [--out runs/calibration_stability.jsonl]
    python3 scripts/probes/calibration_stability.py --runs 5 --ab     # the library's rule vs the session-14 one

Each run calls the path's ``measure_cost_model`` (no cache) on the default model and draft, then
:func:`specdec.shared.tree_search.best_tree_shape` under the draft's shipped acceptance statistics. Prints the
fitted verify curve, the level cost and the shape per run, and the predicted tokens/s of the shape picked and of
(4, 4, 4, 3) under that run's costs. ``--ab`` (reference path): each run also fits the session-14 rule -- a
shape's repeats back to back instead of passes over all shapes, the fastest kept either way -- on the same
timer, the two alternating, so both see the same machine.
"""

from __future__ import annotations

import argparse
import time

from specdec.benchutil import report
from specdec.shared import tree_search as ts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backend", choices=["ref", "fast"], default="ref")
    ap.add_argument("--ab", action="store_true", help="also the session-14 rule (repeats back to back), reference path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.ab and args.backend != "ref":
        ap.error("--ab: reference path only")
    if args.backend == "ref":
        from specdec import ref

        target = ref.load_model("default")
        glide = ref.load_glide("default-glide", target=target)
        from specdec.ref.glide import measure_cost_model

        measure = lambda: measure_cost_model(target, glide)                    # noqa: E731
        rules = {"passes (library)": measure}
        if args.ab:
            from specdec.ref.glide import tree_spec_generate

            c = target.config
            timer = ts.round_timer(lambda *a, **kw: tree_spec_generate(target, glide, *a, **kw), c.vocab_size,
                                   c.max_position_embeddings, stamps=True, max_gen_len=24, prompt_length=512)
            shapes = ts.calibration_shapes(c.vocab_size)

            def back_to_back(reps: int = 2):   # session 14: each shape's repeats one after another
                timer((1,))
                return ts.CostModel.fit([(s, min(timer(s) for _ in range(reps))) for s in shapes])

            rules["back to back (session 14)"] = back_to_back
    else:
        import specdec.fast as fast
        from specdec.fast.glide import decoders

        target = fast.load_model("default")
        glide = fast.load_glide("default-glide", target)
        rules = {"passes (library)": lambda: decoders.measure_cost_model(target, glide)}
    stats = ts.acceptance_of(glide)
    rows, records = [], []
    for i in range(args.runs):
        for rule, measure in rules.items():
            t0 = time.perf_counter()
            cost = measure()
            seconds = time.perf_counter() - t0
            shape = ts.best_tree_shape(stats, cost, vocab_size=glide.draft_vocab_size)
            verify = [round(t * 1e3, 1) for _, t in cost.verify]
            rec = {"run": i, "rule": rule, "seconds": seconds, "verify_ms": verify, "level_fixed_ms": cost.level_fixed * 1e3,
                   "level_per_node_ms": cost.level_per_node * 1e3, "shape": list(shape),
                   "tok_s_auto": ts.tokens_per_second(stats, cost, shape),
                   "tok_s_4443": ts.tokens_per_second(stats, cost, (4, 4, 4, 3))}
            records.append(rec)
            rows.append([i, rule, f"{seconds:.1f}", verify, f"{rec['level_fixed_ms']:.2f} + {rec['level_per_node_ms']:.3f}",
                         shape, f"{rec['tok_s_auto']:.1f}", f"{rec['tok_s_4443']:.1f}"])
            print(rows[-1], flush=True)
    report(rows, ["run", "rule", "s", "verify ms (n = 2 ... 128)", "level ms (+ per node)", "shape", "pred tok/s", "pred (4,4,4,3)"],
           records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
