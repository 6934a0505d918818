"""Where does a speculative round's time go? (fast path, CUDA)

For the embedded default model (or ``--target``/``--glide`` dirs) this measures, on the same
prompt set:

* vanilla fast decoding: wall time per token;
* ``tree_spec_generate`` / ``spec_generate``: wall time per round ("tree-sync": the tree rounds
  without run-ahead, each launched after the previous one was read), and an instrumented run that
  synchronises around the three phases (draft, verification, acceptance + compaction + read-back)
  to split the round's wall time between them;
* the GPU time of one replay of the greedy round's CUDA graph (draft + verification + acceptance,
  catch-up length 1) against the round's wall time: what is left is host work and launch latency;
* a ``torch.profiler`` trace of a few rounds: GPU kernels launched per round and GPU busy time per
  round against the round's wall time (the difference is host overhead the GPU waits on).

    python3 scripts/profile_round.py --out runs/profile_round.jsonl

``--frontier`` measures instead, for ``tree_spec_generate`` with each of ``--shapes`` (``auto`` and a spread of
shapes by default), the tokens per round tau on the prompts, the round's wall time, and the GPU time of one
replay of its fused round graph (draft + verification + acceptance, no host work): tau x vanilla's wall time per
token / the replay time is the speedup that shape would reach if every round cost only its kernels -- what is
left to gain on the host side; the largest over the shapes bounds the GLIDE tree with this draft and these kernels
(issue 20's 2.5x goal):

    python3 scripts/profile_round.py --frontier --prompts 10 --out runs/frontier.jsonl

Prints each measurement as it is taken (and the profiler's kernel tables); one JSONL line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tabulate import tabulate

import specdec.fast as F_
from specdec.fast import engine as fe
from specdec.cli import CLIError, parse_tree_shape
from specdec.fast.glide.decoders import device_cost_model, measure_cost_model
from specdec.shared.tree_search import CostModel, acceptance_of, best_tree_shape
import os

from specdec.shared.assets import ASSETS_DIR
from specdec.shared.tokenizer import load_tokenizer


def prompts(n: int, tok) -> list[list[int]]:
    rows = [json.loads(line) for line in open(os.path.join(ASSETS_DIR, "prompts", "stdlib_code.jsonl"))]
    return [tok.encode(r["turns"][0]) for r in rows[:n]]


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


@torch.inference_mode()
def graph_replay_ms(target, glide, shape, which="k1", reps: int = 50, kernels: bool = False) -> list[float]:
    """Sorted CUDA-event times (ms) of replaying a fused greedy round graph of ``shape`` on the target's
    current cache: ``which="k1"`` the host-packed round of catch-up length 1, ``"ahead"`` the
    device-driven round (its integers built on the device); [] when there is none. ``kernels``: also
    print the kernels of 5 replays under ``torch.profiler`` (count per replay, table by GPU time)."""
    cache = target.caches["main"]
    want = 1 if which == "k1" else "ahead"
    graphs = glide.runtime.graphs if glide.runtime is not None else {}
    rec = next(iter(g for key, g in graphs.items()
                    if key.k == want and key.shape == shape and key.target_k_ptr == cache.k[-1].data_ptr()
                    and key.fused and key.length_ptr == cache.length_t.data_ptr()), None)  # graphs of the current cache only
    if rec is None:
        return []
    length = cache.length_t.clone()
    times = []
    for _ in range(reps):
        cache.length_t.copy_(length)  # the replay compacts and advances the cache: start from the same row
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        rec.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    cache.length_t.copy_(length)
    if kernels:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                cache.length_t.copy_(length)
                rec.graph.replay()
            torch.cuda.synchronize()
        cache.length_t.copy_(length)
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"round graph {shape} ({which}): {len(evs) / 5:.0f} kernels per replay, "
              f"{sum(e.device_time for e in evs) / 5e3:.3f} ms of kernels per replay", flush=True)
        print(kernel_table(evs, 5), flush=True)
    return sorted(times)


def kernel_table(evs, replays: int, limit: int = 40) -> str:
    """The CUDA kernels of ``replays`` graph replays grouped by full name (torch's own table cuts names at 55
    characters, so PyTorch's elementwise kernels all look alike): calls and us per replay, us per call."""
    by_name: dict[str, list[float]] = {}
    for e in evs:
        by_name.setdefault(e.name, []).append(e.device_time)
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:limit]
    return tabulate([[name[:150], f"{len(t) / replays:g}", f"{sum(t) / replays:.1f}", f"{sum(t) / len(t):.2f}"]
                     for name, t in rows], headers=["kernel", "calls / replay", "us / replay", "us / call"],
                    tablefmt="github")


class PhaseTimer:
    """Wrap drafter.propose and run_step with synchronising timers."""

    def __init__(self):
        self.t = {"draft": 0.0, "verify": 0.0}
        self.rounds = 0

    def install(self):
        orig_step = fe.run_step
        orig_propose = F_.glide.FastGlideDrafter.propose
        timer = self

        def propose(self_, state):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = orig_propose(self_, state)
            torch.cuda.synchronize()
            timer.t["draft"] += time.perf_counter() - t
            timer.rounds += 1
            return out

        def step(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = orig_step(*a, **k)
            torch.cuda.synchronize()
            timer.t["verify"] += time.perf_counter() - t
            return out

        fe.run_step = step
        F_.glide.FastGlideDrafter.propose = propose
        return lambda: (setattr(fe, "run_step", orig_step), setattr(F_.glide.FastGlideDrafter, "propose", orig_propose))


FRONTIER_SHAPES = ("auto", "1", "3", "7", "15", "16", "31", "32", "63", "64", "1,1,1,1", "2,2,1", "2,2,2,1", "3,3,2,1", "2,2,2,1,1", "3,3,2,1,1,1", "4,4,4,3",
                   "4,8,8,8", "4,16,16,16,16")


def describe_cost(name: str, c, best) -> str:
    """One line for a cost model: its verify points, level terms and the shape it picks (``best``)."""
    return (f"cost model ({name}): verify {[(n, round(t * 1e3, 3)) for n, t in c.verify]} ms, level "
            f"{c.level_fixed * 1e3:.3f} ms + {c.level_per_node * 1e3:.4f} ms/node; its best shape {best}")


def round_replay_ms(target, glide, shape, **kw) -> list[float]:
    """:func:`graph_replay_ms` of the device-driven round graph of ``shape``, else of the host-packed one."""
    return graph_replay_ms(target, glide, shape, "ahead", **kw) or graph_replay_ms(target, glide, shape, "k1", **kw)


@torch.inference_mode()
def frontier(target, glide, ps, n: int, shapes) -> list[dict]:
    """Per shape: tau, wall ms per round, GPU ms of one fused round replay, and the speedups they give
    against vanilla's wall time per token on the same prompts (see the module docstring)."""
    stats = acceptance_of(glide)
    vocab = target.config.vocab_size
    longest = max(ps, key=len)

    def measure(shape):
        """(tokens, rounds, decode seconds, the shape that ran) over the prompts; ``shape`` None: vanilla."""
        def call(ids):
            x = torch.tensor([ids], device="cuda")
            if shape is None:
                return F_.vanilla_generate(target, x, len(ids), max_gen_len=n)
            return F_.tree_spec_generate(target, glide, x, len(ids), tree_shape=shape, max_gen_len=n)

        call(longest), call(longest)  # warm-up: caches and graphs sized for every prompt
        results = [call(ids) for ids in ps]
        ran = None if shape is None else tuple(results[-1].tree_shape)
        return (sum(r.num_tokens for r in results), sum(r.num for r in results),
                sum(r.elapsed_time for r in results), ran)

    v_tok, v_rounds, v_wall, _ = measure(None)
    t_v = v_wall / v_tok * 1e3
    # auto's cost model as `tree_shape="auto"` uses it (measured now, in this process), and one measured again with
    # longer calls and more passes: how much of auto's choice is calibration noise
    costs = {"auto": device_cost_model(target, glide),
             "auto, 96-token calls x 5": measure_cost_model(target, glide, reps=5, max_gen_len=96)}
    out = []
    for name, c in costs.items():
        out.append(dict(kind="cost_model", name=name, **c.to_dict()))
        print(describe_cost(name, c, best_tree_shape(stats, c, vocab_size=vocab) if stats else "-"), flush=True)
    out.append(dict(kind="frontier", shape="vanilla", tokens=v_tok, rounds=v_rounds, wall_s=v_wall, ms_per_token=t_v))
    print(out[-1], flush=True)

    rows = []
    for shape in shapes:
        toks, rounds, wall, ran = measure(shape)
        replay = round_replay_ms(target, glide, ran)
        replay_ms = replay[len(replay) // 2] if replay else None
        tau = toks / rounds
        line = dict(kind="frontier", shape="auto" if shape == "auto" else ",".join(map(str, ran)), ran=list(ran),
                    nodes=1 + sum(ran), tokens=toks, rounds=rounds, tau=tau, wall_ms_per_round=wall / rounds * 1e3,
                    replay_ms=replay_ms, speedup=(toks / wall) / (v_tok / v_wall),
                    speedup_if_kernels_only=tau * t_v / replay_ms if replay else None)
        if stats is not None:  # what `auto` predicts for this shape: its acceptance model and this device's cost models
            line["tau_model"] = stats.expected_tokens(ran)
            line["model_ms_per_round"] = {name: c.round_time(ran) * 1e3 for name, c in costs.items()}
        rows.append([line["shape"], ",".join(map(str, ran)), line["nodes"], f"{tau:.2f}",
                     f"{line.get('tau_model', float('nan')):.2f}",
                     " / ".join(f"{v:.3f}" for v in line.get("model_ms_per_round", {}).values()),
                     f"{line['wall_ms_per_round']:.3f}", f"{replay_ms:.3f}" if replay else "-",
                     f"{line['speedup']:.2f}x", f"{line['speedup_if_kernels_only']:.2f}x" if replay else "-"])
        out.append(line)
        print(line, flush=True)

    # a third cost model: fitted to the graph replays above (kernels only; the one-level shapes give verify(n))
    timed = [(tuple(x["ran"]), x["replay_ms"] / 1e3) for x in out if x.get("replay_ms")]
    if stats is not None and any(len(s) == 1 for s, _ in timed):
        c = CostModel.fit(timed, {"from": "graph replays"})
        shape = best_tree_shape(stats, c, vocab_size=vocab)
        e, t = stats.expected_tokens(shape), c.round_time(shape) * 1e3
        print(describe_cost("graph replays", c, shape) + f": tau (model) {e:.2f}, {t:.3f} ms/round, predicted "
              f"{e / t * t_v:.2f}x", flush=True)
        out.append(dict(kind="cost_model", name="graph replays", best=list(shape), **c.to_dict()))
    best = max((x for x in out if x.get("speedup_if_kernels_only")), key=lambda x: x["speedup"], default=None)
    if best is not None:  # where the best shape's round goes: its graph's kernels
        measure(tuple(best["ran"]))
        round_replay_ms(target, glide, tuple(best["ran"]), reps=5, kernels=True)
    print(f"\nvanilla: {t_v:.3f} ms per token (wall), {len(ps)} prompts x {n} new tokens")
    print(tabulate(rows, headers=["shape", "ran", "nodes", "tau", "tau (model)", "ms/round (cost models)",
                                  "wall ms/round", "GPU ms/round (replay)", "speedup", "speedup if kernels only"],
                   tablefmt="github"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--glide", default="default-glide")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ab-reps", type=int, default=5, help="repetitions of the run-ahead on/off comparison")
    ap.add_argument("--out", default=None)
    ap.add_argument("--frontier", action="store_true", help="measure the shapes' frontier (see above) and nothing else")
    ap.add_argument("--shapes", nargs="+", default=list(FRONTIER_SHAPES),
                    help="tree shapes for --frontier: 'auto' or comma-separated widths, e.g. 2,2,1")
    args = ap.parse_args()
    try:   # the CLI's own --tree-shape rule, checked before anything loads
        shapes = [parse_tree_shape(x) for x in args.shapes]
    except CLIError as err:
        ap.error(str(err))

    target = F_.load_model(args.target)
    glide = F_.load_glide(args.glide, target)
    tok = load_tokenizer(args.target)
    ps = prompts(args.prompts, tok)
    n = args.max_new_tokens
    lines = []
    if args.frontier:
        lines = frontier(target, glide, ps, n, shapes)
        if args.out:
            with open(args.out, "w") as fh:
                fh.writelines(json.dumps(line) + "\n" for line in lines)
        return

    def run(method, ids):
        x = torch.tensor([ids], device="cuda")
        if method == "vanilla":
            return F_.vanilla_generate(target, x, len(ids), max_gen_len=n)
        if method == "tree":
            return F_.tree_spec_generate(target, glide, x, len(ids), max_gen_len=n)
        return F_.spec_generate(target, glide, x, len(ids), max_gen_len=n)

    # "tree-sync": the same rounds, each launched only after the previous one was read (no run-ahead)
    for label in ("vanilla", "tree", "tree-sync", "chain"):
        method = "tree" if label == "tree-sync" else label
        F_.glide.FastGlideDrafter.ahead_rounds = label != "tree-sync"
        longest = max(ps, key=len)  # warm-up on the longest prompt: the cache (and its graphs) then fits all
        run(method, longest), run(method, longest)
        toks = rounds = 0
        wall = 0.0
        for ids in ps:
            r, dt = timed(lambda: run(method, ids))
            print(f"  {label}: prompt {len(ids)} tokens -> {r.num_tokens} tokens, {r.num} passes, "
                  f"decode {r.elapsed_time * 1e3:.1f} ms, call {dt * 1e3:.1f} ms", flush=True)
            toks += r.num_tokens
            rounds += r.num
            wall += r.elapsed_time
        lines.append(dict(kind="wall", method=label, tokens=toks, rounds=rounds, wall_s=wall))
        print(lines[-1], flush=True)
    F_.glide.FastGlideDrafter.ahead_rounds = True

    # the greedy GLIDE round's graph alone: GPU time of one replay (CUDA events, no host work in between)
    # against the round's wall time above -- the difference is host time per round plus launch latency
    for method, shape in (("tree", (4, 16, 16, 16, 16)), ("chain", (1, 1, 1, 1))):
        for which in ("k1", "ahead"):
            times = graph_replay_ms(target, glide, shape, which)
            if times:
                lines.append(dict(kind="graph", method=method, graph=which, replay_ms_median=times[len(times) // 2],
                                  replay_ms_min=times[0]))
                print(lines[-1], flush=True)

    # run-ahead on/off, interleaved (decode times of one call vary by ~20% from call to call): median ms per round
    per_round: dict[str, list[float]] = {"tree": [], "tree-sync": []}
    for _ in range(args.ab_reps):
        for label in per_round:
            F_.glide.FastGlideDrafter.ahead_rounds = label == "tree"
            for ids in ps:
                r = run("tree", ids)
                per_round[label].append(r.elapsed_time / r.num * 1e3)
    F_.glide.FastGlideDrafter.ahead_rounds = True
    for label, v in per_round.items():
        v.sort()
        lines.append(dict(kind="ab", method=label, calls=len(v), ms_per_round_median=v[len(v) // 2], ms_per_round_min=v[0]))
        print(lines[-1], flush=True)

    # instrumented phases (rounds unfused, so that the draft and the verification can be timed apart)
    for method in ("tree", "chain"):
        pt = PhaseTimer()
        undo = pt.install()
        F_.glide.FastGlideDrafter.fuse_rounds = False
        try:
            for ids in ps:
                run(method, ids)
        finally:
            undo()
            F_.glide.FastGlideDrafter.fuse_rounds = True
        lines.append(dict(kind="phases", method=method, rounds=pt.rounds, **{k: v for k, v in pt.t.items()}))
        print(lines[-1], flush=True)

    # profiler: kernels per round, GPU busy time
    from torch.profiler import ProfilerActivity, profile

    from torch.profiler import record_function

    from specdec.fast.graphs import CapturedFn

    def labelled(label, fn):
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapper

    patches = [(fe, "run_step", "phase:verify"), (F_.glide.FastGlideDrafter, "propose", "phase:draft"),
               (CapturedFn, "__call__", "phase:accept"), (F_.glide.FastGlideDrafter, "fused_round", "phase:fused-round")]
    for method in ("vanilla", "tree"):
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        for obj, name, label in patches:
            setattr(obj, name, labelled(label, getattr(obj, name)))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            r = run(method, ps[0])
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        for e in prof.key_averages():
            if e.key.startswith("phase:"):
                print(f"  {method} {e.key}: {e.count} calls, host {e.cpu_time_total / max(e.count, 1):.1f} us/call", flush=True)
                lines.append(dict(kind="host", method=method, phase=e.key, calls=e.count, host_us_per_call=e.cpu_time_total / max(e.count, 1)))
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in evs) / 1e6
        rounds = r.num
        lines.append(dict(kind="profile", method=method, kernels=len(evs), rounds=rounds, gpu_busy_s=busy, wall_s=wall))
        print(lines[-1], flush=True)
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=25), flush=True)

    if args.out:
        with open(args.out, "w") as fh:
            for line in lines:
                fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
