"""``specdec bench``: Spec-Bench-style speed runs of every decoder (and ``transformers`` peers).

What it does, per method (``--methods``, vanilla included by default)::

    load target (+ draft model / GLIDE draft when the method needs one)
    warm up per method (untimed; --warmup 0 skips it): one short generation, then one at the longest
        prompt the run will see, so that caches, CUDA graphs and Triton kernels are built before the clock
        starts; then the method on every question's first-turn prompt with a few new tokens, so that the
        per-prompt-length setup of EVERY model the method runs (cuDNN attention plans of the target's and a
        draft model's prefills, kernel specialisations) is paid before timing -- without it the first
        method timed paid the target's alone (vanilla looked 2x slower) and a draft model's prefill paid
        its own inside the first round (the draft-model chain looked 2x slower; BENCHMARKS "Session 18")
    for each question of the prompt set (tqdm progress bar):
        for each turn: prompt = the conversation so far (turn k sees the model's own answers to
            turns < k), encoded once; synchronize; t0; generate; synchronize; wall = now - t0
            (--repeats N: the turn N times in a row, the median-wall run recorded, every wall kept and
            the N outputs compared)
    write <out-dir>/<method>.jsonl: one line per FINISHED question (a question whose prompt + new
        tokens would not fit the context is skipped, one stderr line each, and counted in the summary;
        a method that finishes no question leaves no file)

Prompt sets are Spec-Bench ``question.jsonl`` files: ``{"question_id", "category", "turns": [...]}``.
``--bench`` takes a file, a folder holding ``question.jsonl`` (e.g. ``../shared/data/spec_bench``),
or the name of a set shipped in ``specdec/shared/assets/prompts/`` (see :data:`SHIPPED_SETS`):

* ``stdlib_code``: code completion on Python standard-library files the embedded model did NOT
  train on (the held-out rule of ``scripts/default_corpus.py``): a file's opening lines, or the
  code before a ``def ...:`` line, to be continued;
* ``stdlib_long``: the held-out files concatenated (``# ===== path =====`` headers) into prompts of
  about 4k, 16k and 32k tokens (questions 0-6) and 7.5k (``long_8k``, questions 7-9), ending at a
  ``def ...:`` line. The embedded model has 8192
  positions (since session 22; the questions up to 7.7k tokens fit); for the 16k and 32k prompts use
  ``--max-context`` (RoPE past its training length; speed is still meaningful, acceptance falls).

Both are committed files, built once in a source checkout by ``scripts/build_prompt_sets.py``.

Answer file (Spec-Bench compatible: its ``evaluation/speed.py`` reads it), one line per question::

    {"question_id", "category", "model_id", "method", "backend", "tstamp",
     "choices": [{"index": 0,
                  "turns": [text per turn], "new_tokens": [...], "wall_time": [s, whole call],
                  "prefill_time": [s, time to first token], "decode_time": [s, wall - prefill],
                  "prompt_tokens": [...], "decoding_steps": [target passes per turn],
                  "accept_lengths": [tokens per target pass, all turns, prefill's 1 included],
                  "output_ids": [[token ids per turn]],
                  with --repeats N > 1 also "wall_time_repeats": [[N walls] per turn],
                  "repeats_equal": [bool per turn]}],
     "meta": {method, function, backend, device, dtype, target, draft, glide, options, sampling, ...}}

``accept_lengths`` are the decoder's own per-round counts, clipped so that they sum to
``new_tokens`` (a last round cut by ``max_new_tokens`` or EOS counts what was emitted); hence
``sum / len`` = tokens per target forward pass = :attr:`GenerationResult.tau`.

Peers (``--peers``), each written as a method of its own on the same prompts and model:

* ``hf_generate``: ``transformers`` ``model.generate`` (greedy, or sampling at ``--temperature``);
* ``hf_assisted``: assisted generation with the same draft model (``assistant_model=``);
* ``hf_pld``: prompt lookup decoding (``prompt_lookup_num_tokens=``, ``max_matching_ngram_size=``
  from ``--num-pred-tokens`` / ``--max-ngram-size``, defaults those of ``pld_generate``: 10 and 3).

The models are loaded with ``AutoModelForCausalLM.from_pretrained(dir, dtype=...)`` from the same
local directories. Their time to first token and per-round token counts come from a small
streamer (``transformers`` calls ``streamer.put`` once per round with the tokens it accepted).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from specdec import methods as _methods
from specdec.methods import METHODS, OPTIONS
from specdec.shared.assets import ASSETS_DIR

__all__ = [
    "SHIPPED_SETS",
    "METHODS",
    "PEERS",
    "PROMPTS_DIR",
    "resolve_bench",
    "load_questions",
    "conversation_prompt",
    "clip_accept_lengths",
    "TurnResult",
    "add_bench_args",
    "run_bench",
    "bench_main",
]

PROMPTS_DIR = os.path.join(ASSETS_DIR, "prompts")  # package data of specdec.shared
SHIPPED_SETS = {
    "stdlib_code": "stdlib_code.jsonl",
    "stdlib_long": "stdlib_long.jsonl",
}


# METHODS (name -> decoder function, what it drafts with, the knobs it takes): specdec.methods
PEERS = ("hf_generate", "hf_assisted", "hf_pld")


def canonical_method(name: str) -> str:
    """A method or peer name; a decoder function name maps to its method (``tree_spec_generate`` -> ``tree_spec``)."""
    try:
        return _methods.canonical_method(name, extra=PEERS)
    except ValueError as e:
        raise ValueError(f"{e} (or 'all')") from None


# ---------------------------------------------------------------------------------------------
# Prompt sets and conversations
# ---------------------------------------------------------------------------------------------


def resolve_bench(bench: str) -> str:
    """A ``question.jsonl`` path from a file, a folder, or a shipped set name."""
    if bench in SHIPPED_SETS:
        p = os.path.join(PROMPTS_DIR, SHIPPED_SETS[bench])
        if not os.path.isfile(p):
            raise ValueError(f"the shipped prompt set {bench!r} is missing from this installation ({p})")
        return p
    if os.path.isdir(bench):
        p = os.path.join(bench, "question.jsonl")
        if not os.path.isfile(p):
            raise ValueError(f"{bench!r} is a folder without question.jsonl")
        return p
    if os.path.isfile(bench):
        return bench
    raise ValueError(f"prompt set {bench!r} not found: pass a question.jsonl file, a folder holding one, "
                     f"or a shipped set ({', '.join(SHIPPED_SETS)})")


def load_questions(bench: str, begin: int | None = None, end: int | None = None) -> list[dict]:
    """Questions of a prompt set (Spec-Bench format), sliced ``[begin:end]`` like Spec-Bench."""
    path = resolve_bench(bench)
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            q = json.loads(line)
            if not isinstance(q.get("turns"), list) or not q["turns"] or not all(isinstance(t, str) for t in q["turns"]):
                raise ValueError(f"{path}:{i + 1}: a question needs 'turns', a non-empty list of strings")
            q.setdefault("question_id", i)
            q.setdefault("category", "default")
            out.append(q)
    return out[begin:end]


def conversation_prompt(tokenizer, turns: Sequence[str], answers: Sequence[str], family: str | None = None,
                        system: str | None = None) -> str:
    """The prompt text for user turn ``len(answers)`` (0-based) after the earlier turns and the
    model's answers to them (FastChat's conversation layout for the built-in templates)."""
    from specdec.shared.tokenizer import VICUNA_SYSTEM, QWEN2_SYSTEM, format_prompt, guess_family

    k = len(answers)
    if k >= len(turns):
        raise ValueError("conversation_prompt: no user turn left to answer")
    if k == 0:
        return format_prompt(tokenizer, turns[0], system=system, family=family)
    if family is None and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "system", "content": system}] if system is not None else []
        for q, a in zip(turns[:k], answers):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": turns[k]})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    fam = (family or guess_family(tokenizer)).lower()
    pairs = list(zip(turns[:k], answers))
    q_last = turns[k]
    if fam == "vicuna":
        s = VICUNA_SYSTEM if system is None else system
        out = f"{s} " if s else ""
        for q, a in pairs:
            out += f"USER: {q} ASSISTANT: {a}</s>"
        return out + f"USER: {q_last} ASSISTANT:"
    if fam == "llama2":
        out = ""
        for i, (q, a) in enumerate(pairs):
            q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}" if (i == 0 and system) else q
            out += f"[INST] {q} [/INST] {a} </s><s>"
        return out + f"[INST] {q_last} [/INST]"
    if fam == "llama3":
        out = "<|begin_of_text|>"
        if system:
            out += f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        for q, a in pairs:
            out += (f"<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                    f"<|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>")
        return out + f"<|start_header_id|>user<|end_header_id|>\n\n{q_last}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    if fam == "qwen2":
        s = QWEN2_SYSTEM if system is None else system
        out = f"<|im_start|>system\n{s}<|im_end|>\n" if s else ""
        for q, a in pairs:
            out += f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        return out + f"<|im_start|>user\n{q_last}<|im_end|>\n<|im_start|>assistant\n"
    # raw: a plain text continuation
    out = format_prompt(tokenizer, turns[0], system=system, family="raw")
    for i, a in enumerate(answers):
        out += a + "\n\n" + turns[i + 1]
    return out


def clip_accept_lengths(accept_lengths: Sequence[int] | None, new_tokens: int) -> list[int] | None:
    """Per-pass token counts cut so they sum to ``new_tokens`` (the tokens actually emitted)."""
    if accept_lengths is None:
        return None
    out, total = [], 0
    for a in accept_lengths:
        if total >= new_tokens:
            break
        a = min(int(a), new_tokens - total)
        out.append(a)
        total += a
    return out


# ---------------------------------------------------------------------------------------------
# Runners: one generation of one turn, timed
# ---------------------------------------------------------------------------------------------


@dataclass
class TurnResult:
    output_ids: list[int]
    wall_time: float
    prefill_time: float | None
    accept_lengths: list[int] | None


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class SpecdecRunner:
    """Calls one specdec decoder (ref or fast) on a prompt; times the whole call."""

    def __init__(self, method: str, lib, target, extra, options: dict, sampling: dict, eos_ids: list[int], device,
                 mode: str = "rejection"):
        self.method = method
        self.fn = getattr(lib, METHODS[method].function)
        self.target, self.extra = target, extra
        self.options, self.sampling, self.eos_ids, self.device = options, sampling, eos_ids, device
        self.mode = mode  # --sampling: "rejection" (generator draws) or "keyed" (the turn's seed is the key)


    def _call_args(self, seed: int) -> tuple[tuple, dict]:
        """The decoder's leading models and its keyword arguments for one call seeded with ``seed`` (a fresh
        generator when sampling; keyed sampling also passes the seed itself)."""
        import torch

        kwargs = dict(eos_id=self.eos_ids, generator=None, **self.sampling, **self.options)
        if self.sampling["temperature"] > 0:
            kwargs["generator"] = torch.Generator(device=self.device).manual_seed(seed)
            if self.mode == "keyed":
                kwargs.update(sampling="keyed", seed=seed)
        return ((self.target,) if self.extra is None else (self.target, self.extra)), kwargs
    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> TurnResult:
        import torch

        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        args, kwargs = self._call_args(seed)
        _sync(self.device)
        t0 = time.perf_counter()
        res = self.fn(*args, ids, len(prompt_ids), max_gen_len=max_new_tokens, **kwargs)
        _sync(self.device)
        wall = time.perf_counter() - t0
        out = res.tolist()
        return TurnResult(out, wall, float(res.prefill_time), clip_accept_lengths(res.accept_lengths, len(out)))

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[TurnResult]:
        """All ``prompts`` in one batched call of the decoder; one :class:`TurnResult` per row, each with the
        batch's wall and prefill time."""
        import torch

        rows = [torch.tensor(p, dtype=torch.long, device=self.device) for p in prompts]
        args, kwargs = self._call_args(seed)
        _sync(self.device)
        t0 = time.perf_counter()
        res = self.fn(*args, rows, None, max_gen_len=max_new_tokens, **kwargs)
        _sync(self.device)
        wall = time.perf_counter() - t0
        out = []
        for b in range(len(prompts)):
            ids = res.row(b).output_ids[0].tolist()
            acc = res.row_accept_lengths[b] if res.row_accept_lengths is not None else None
            out.append(TurnResult(ids, wall, float(res.prefill_time), clip_accept_lengths(acc, len(ids))))
        return out


class _RoundStreamer:
    """``transformers`` streamer recording the time of the first generated token and how many
    tokens each ``put`` (one per target pass: one token in ``generate``, the accepted drafts + one
    in assisted / prompt-lookup generation) delivered. The first ``put`` is the prompt."""

    def __init__(self):
        self.t0 = 0.0
        self.first_token_time: float | None = None
        self.rounds: list[int] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter() - self.t0
        self.rounds.append(int(value.numel()))

    def end(self) -> None:
        pass


class HFRunner:
    """``transformers`` ``generate`` (plain, assisted with a draft model, or prompt lookup)."""

    def __init__(self, method: str, model, gen_kwargs: dict, eos_ids: list[int], device):
        self.method, self.model, self.kw, self.eos_ids, self.device = method, model, gen_kwargs, eos_ids, device

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> TurnResult:
        import torch

        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        torch.manual_seed(seed)
        streamer = _RoundStreamer()
        _sync(self.device)
        t0 = time.perf_counter()
        streamer.t0 = t0
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, streamer=streamer, **self.kw)
        _sync(self.device)
        wall = time.perf_counter() - t0
        new = out[0, len(prompt_ids):].tolist()
        eos = set(self.eos_ids)
        for i, t in enumerate(new):  # generate stops at EOS; a batch of one has no padding after it
            if t in eos:
                new = new[: i + 1]
                break
        return TurnResult(new, wall, streamer.first_token_time, clip_accept_lengths(streamer.rounds, len(new)))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _resolve_dtype(name: str | None, device: str):
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown --dtype {name!r}: use one of {sorted(table)}")
    return table[name]


def _extend_context(model, max_context: int | None) -> None:
    """Let a model take prompts past its trained length (RoPE extrapolation): raise the context
    limit the decoders check. Used by the long-context runs of the small embedded model."""
    if max_context and model is not None and hasattr(model, "config"):
        if max_context > model.config.max_position_embeddings:
            model.config.max_position_embeddings = int(max_context)


def _hf_load(path: str, dtype, device):
    from transformers import AutoModelForCausalLM

    from specdec.shared.assets import resolve_model_path

    p = resolve_model_path(path)
    try:
        m = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
    except TypeError:  # older transformers
        m = AutoModelForCausalLM.from_pretrained(p, torch_dtype=dtype, local_files_only=True)
    return m.to(device).eval()


def _method_options(method: str, args) -> dict:
    """The options given on the command line that this method takes (others keep its defaults)."""
    opts = {}
    for name in METHODS[method].options:
        v = getattr(args, name, None)
        if name == "gamma" and v == "auto" and method not in GAMMA_AUTO_METHODS:
            continue   # --gamma auto chooses the GLIDE chain's length; the other chains keep their defaults
        if v is not None:
            opts[name] = tuple(v) if name == "tree_shape" and v != "auto" else v
    return opts


def _effective_options(fn: Callable, given: dict) -> dict:
    """Every method knob with the value used: the given ones, else the function's default."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in OPTIONS:
            v = given.get(p.name, p.default)
            out[p.name] = list(v) if isinstance(v, tuple) else v
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _tree_shape(text: str) -> tuple[int, ...] | str:
    """argparse type of ``--tree-shape``: '4,16,16' -> (4, 16, 16), 'auto' stays 'auto', a clear message otherwise."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        shape = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x != "")
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected comma-separated node counts >= 1 per level, like 4,16,16,16,16, or auto; got {text!r}")
    return shape


GAMMA_AUTO_METHODS = ("spec",)
"""The methods whose ``--gamma auto`` is chosen per device (the GLIDE chain); others keep their own default."""


def _positive_int(text: str) -> int:
    """argparse type of ``--draft-window``: an int >= 1."""
    try:
        n = int(str(text).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def _int_or_auto(text: str) -> int | str:
    """argparse type of ``--draft-tree-capacity`` and ``--gamma``: an int >= 1 or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None


def add_bench_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--bench", default="stdlib_code",
                    help="prompt set: question.jsonl file, folder holding one, or a shipped set "
                         f"({', '.join(SHIPPED_SETS)}); default stdlib_code")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated methods ('all' = every specdec decoder); vanilla is always added")
    ap.add_argument("--peers", nargs="?", const="all", default=None,
                    help="also run transformers peers: 'all' (hf_generate,hf_assisted,hf_pld) or a comma list")
    ap.add_argument("--target", default="default", help="target model dir (default: the embedded model)")
    ap.add_argument("--draft", default=None, help="draft LM dir for speculative / hf_assisted (default: default-draft with the embedded target)")
    ap.add_argument("--glide", default=None, help="GLIDE draft for spec / tree_spec (default: default-glide with the embedded target)")
    ap.add_argument("--backend", choices=("ref", "fast", "auto"), default="auto", help="auto = fast on CUDA, ref on CPU")
    ap.add_argument("--force-interpreter", action="store_true",
                    help="allow --backend fast on the CPU: its Triton kernels then run in the Triton interpreter (a test tool, minutes per call)")
    ap.add_argument("--device", default=None, help="default cuda when available, else cpu")
    ap.add_argument("--tp", type=int, default=1, metavar="N",
                    help="tensor parallelism over N processes (fast backend; torchrun --nproc-per-node N -m specdec bench --tp N ...; rank 0 writes the answers)")
    ap.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out-dir", default="bench_out", help="one <method>.jsonl per method goes here")
    ap.add_argument("--model-id", default=None, help="name recorded in the answer files (default: the target's folder name)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--sampling", choices=("rejection", "keyed"), default="rejection",
                    help="specdec methods at --temperature > 0: rejection (generator draws) or keyed (position-keyed: "
                         "every method emits vanilla's tokens for the turn's seed); the transformers peers always draw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--question-begin", type=int, default=None,
                    help="first question (0-based), as Spec-Bench slices the set: questions[begin:end]; a negative "
                         "value counts from the end")
    ap.add_argument("--question-end", type=int, default=None,
                    help="one past the last question (questions[begin:end]; negative counts from the end)")
    ap.add_argument("--min-prompt-tokens", type=int, default=0,
                    help="skip questions whose first-turn prompt is shorter (LongSpec's filter for long-context sets)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="raise the models' context limit to this many positions (RoPE past the trained length)")
    ap.add_argument("--family", default=None, help="prompt template family (vicuna, llama2, llama3, qwen2, raw); default: the tokenizer's")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method (0 = none, and no prompt warm-up: see the module docstring)")
    ap.add_argument("--repeats", type=int, default=1, metavar="N",
                    help="time every turn N times in a row and record the median-wall run (its wall, prefill and decode "
                         "times; all N walls in wall_time_repeats, which `specdec report` turns into a 'repeat spread' column). "
                         "The N outputs must be equal: a turn whose repeats differ is reported on stderr and counted in "
                         "the summary line")
    ap.add_argument("--batch-size", type=int, default=1, metavar="N",
                    help="decode N questions at once (each turn of a group of N questions in one batched call; specdec "
                         "methods only). A batched turn's wall time is the whole batch's; with --sampling keyed the "
                         "group shares one seed and row b is sequence b")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (it is shown only when stderr is a terminal)")
    g = ap.add_argument_group("method options (each method's own default when not given)")
    g.add_argument("--gamma", type=_int_or_auto, default=None, metavar="N|auto",
                   help="draft length: speculative (5), spec (4), magicdec (4); auto: spec's GLIDE chain length with the "
                        "most expected tokens per second on this device (as `specdec generate` picks it; the other "
                        "chains keep their defaults)")
    g.add_argument("--draft-window", type=_positive_int, default=None, metavar="N",
                   help="speculative: the draft model reads only the last N prompt tokens (default: the whole prompt)")
    g.add_argument("--tree-shape", type=_tree_shape, default=None, metavar="SHAPE|auto",
                   help="tree_spec beam shape, e.g. 4,16,16,16,16 (the Python API's default), or auto: the shape with the "
                        "most expected tokens per second on this device (`specdec generate`'s default), chosen once")
    g.add_argument("--max-ngram-size", type=int, default=None, help="logitspec / pld / hf_pld (3)")
    g.add_argument("--num-pred-tokens", type=int, default=None, help="logitspec (20), pld and hf_pld (10)")
    g.add_argument("--draft-tree-capacity", type=_int_or_auto, default=None, help="logitspec (64), or auto (chosen for this device)")
    g.add_argument("--sink-tokens", type=int, default=None, help="magicdec")
    g.add_argument("--window", type=int, default=None, help="magicdec")
    g.add_argument("--hf-assistant-tokens", type=int, default=None,
                   help="hf_assisted: fixed num_assistant_tokens (constant schedule); default: transformers' own heuristic")
    return ap


def _parse_methods(methods: str, peers: str | None) -> list[str]:
    names = list(METHODS) if methods.strip() == "all" else [canonical_method(m) for m in methods.split(",") if m.strip()]
    if peers:
        names += list(PEERS) if peers.strip() == "all" else [canonical_method(p) for p in peers.split(",") if p.strip()]
    names = ["vanilla"] + [n for n in names if n != "vanilla"]
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Models:
    """Lazily loaded models, shared by every method of the run."""

    def __init__(self, args, device: str, dtype, tp=None):
        self.args, self.device, self.dtype, self.tp = args, device, dtype, tp
        self.backend = args.backend if args.backend != "auto" else ("fast" if device.startswith("cuda") else "ref")
        self._cache: dict[str, Any] = {}
        embedded = args.target == "default"
        self.draft_path = args.draft or ("default-draft" if embedded else None)
        self.glide_path = args.glide or ("default-glide" if embedded else None)

    @property
    def lib(self):
        if self.backend == "fast":
            import specdec.fast as lib
        else:
            import specdec.ref as lib
        return lib

    def get(self, key: str):
        if key in self._cache:
            return self._cache[key]
        a, lib = self.args, self.lib
        if key == "target":
            tp_kw = {"tp": self.tp} if self.tp is not None else {}
            m = lib.load_model(a.target, dtype=self.dtype, device=self.device, **tp_kw)
            _extend_context(m, a.max_context)
        elif key == "draft":
            if not self.draft_path:
                raise ValueError("this method needs a draft model: pass --draft DIR")
            m = lib.load_model(self.draft_path, dtype=self.dtype, device=self.device)
            _extend_context(m, a.max_context)
        elif key == "glide":
            if not self.glide_path:
                raise ValueError("this method needs a GLIDE draft: pass --glide PATH")
            from specdec.shared.assets import resolve_model_path

            m = lib.load_glide(resolve_model_path(self.glide_path), self.get("target"))
        elif key == "hf_target":
            m = _hf_load(a.target, self.dtype, self.device)
        elif key == "hf_draft":
            if not self.draft_path:
                raise ValueError("hf_assisted needs a draft model: pass --draft DIR")
            m = _hf_load(self.draft_path, self.dtype, self.device)
        else:
            raise KeyError(key)
        self._cache[key] = m
        return m


def _make_runner(method: str, models: _Models, args, eos_ids: list[int], pad_id: int | None):
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if method in METHODS:
        spec = METHODS[method]
        extra = models.get(spec.needs) if spec.needs else None
        opts = _method_options(method, args)
        # "auto" knobs are resolved once (calibrating this device on first use) and every turn runs the choice
        auto = [name for name, v in opts.items() if v == "auto"]
        if "draft_tree_capacity" in auto:
            opts["draft_tree_capacity"] = importlib.import_module(models.lib.__name__ + ".logitspec").resolve_capacity(
                models.get("target"), "auto")
        if "tree_shape" in auto or "gamma" in auto:
            glide_lib = importlib.import_module(models.lib.__name__ + ".glide")
            if "tree_shape" in auto:
                opts["tree_shape"] = tuple(glide_lib.resolve_tree_shape(models.get("target"), extra, "auto"))
            if "gamma" in auto:
                opts["gamma"] = int(glide_lib.resolve_gamma(models.get("target"), extra, "auto"))
        runner = SpecdecRunner(method, models.lib, models.get("target"), extra, opts, sampling, eos_ids, models.device,
                               mode=args.sampling)
        meta = {"function": spec.function, "backend": models.backend, "options": _effective_options(runner.fn, opts),
                **({"auto": auto} if auto else {}),
                "draft": models.draft_path if spec.needs == "draft" else None,
                "glide": models.glide_path if spec.needs == "glide" else None}
        return runner, meta
    # transformers peers
    target = models.get("hf_target")
    kw: dict[str, Any] = {"eos_token_id": eos_ids or None, "pad_token_id": pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)}
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    meta: dict[str, Any] = {"function": "transformers.generate", "backend": "transformers",
                            "attn_implementation": getattr(target.config, "_attn_implementation", None)}
    options: dict[str, Any] = {}
    if method == "hf_assisted":
        draft = models.get("hf_draft")
        kw["assistant_model"] = draft
        if args.hf_assistant_tokens:
            draft.generation_config.num_assistant_tokens = int(args.hf_assistant_tokens)
            draft.generation_config.num_assistant_tokens_schedule = "constant"
        options = {"num_assistant_tokens": draft.generation_config.num_assistant_tokens,
                   "num_assistant_tokens_schedule": draft.generation_config.num_assistant_tokens_schedule}
        meta["draft"] = models.draft_path
    elif method == "hf_pld":
        options = {"prompt_lookup_num_tokens": args.num_pred_tokens or 10, "max_matching_ngram_size": args.max_ngram_size or 3}
        kw.update(options)
    meta["options"] = options
    return HFRunner(method, target, kw, eos_ids, models.device), meta


def _versions() -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers

        v["transformers"] = transformers.__version__
    except Exception:
        pass
    return v


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_bench(args) -> dict[str, str]:
    """Run the benchmark described by parsed ``args``; returns {method: answer file path}."""
    import torch

    from specdec.shared.assets import resolve_model_path
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    tp = None
    world = getattr(args, "tp", 1)
    if world < 1:
        raise ValueError(f"--tp must be >= 1, got {world}")
    if world > 1:   # every rank runs the benchmark; rank 0 writes the answer files
        if args.backend == "ref":
            raise ValueError("--tp needs --backend fast (the reference path is single-process)")
        from specdec.fast.tp import init_tensor_parallel

        tp = init_tensor_parallel(world)
        args.backend = "fast"
        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if tp.rank != 0:
            import tempfile

            args.out_dir = tempfile.mkdtemp(prefix=f"specdec-bench-rank{tp.rank}-")
            args.no_progress = True
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _resolve_dtype(args.dtype, device)
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if getattr(args, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    args.repeats = getattr(args, "repeats", 1)   # a namespace built before --repeats existed: one run per turn
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.sampling == "keyed" and args.seed < 0:
        raise ValueError(f"--seed must be >= 0 with --sampling keyed, got {args.seed}")
    if args.backend == "fast":
        from specdec.cli import check_fast_device

        check_fast_device(device, getattr(args, "force_interpreter", False))
    methods = _parse_methods(args.methods, args.peers)
    peers = [m for m in methods if m not in METHODS]
    if getattr(args, "batch_size", 1) > 1 and peers:
        raise ValueError(f"--batch-size > 1 batches the specdec methods only; {', '.join(peers)} run one prompt at a "
                         "time (drop --peers, or bench them in a run with --batch-size 1)")
    questions = load_questions(args.bench, args.question_begin, args.question_end)
    tok = load_tokenizer(args.target)
    tok.model_max_length = 10**9  # we check lengths ourselves; silence the long-sequence warning
    models = _Models(args, device, dtype, tp)
    model_id = args.model_id or os.path.basename(os.path.normpath(resolve_model_path(args.target)))
    if args.target == "default":
        model_id = "specdec-default"

    # the context limit and the too-short filter, on the first turn's prompt
    _log(f"[bench] loading the target {args.target} ({models.backend}, {device}, {str(dtype).replace('torch.', '')}) ...")
    target = models.get("target")
    eos_ids = list(target.config.eos_token_ids) or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    ctx = target.config.max_position_embeddings
    kept, first_ids, short, too_long = [], [], 0, 0   # first_ids[i]: kept question i's first-turn prompt
    for q in questions:
        ids = encode_prompt(tok, conversation_prompt(tok, q["turns"], [], args.family))
        n = len(ids)
        if n < args.min_prompt_tokens:
            short += 1
        elif n + args.max_new_tokens > ctx:
            too_long += 1
            _log(f"[bench] skipping question {q['question_id']}: {_too_long(n, args.max_new_tokens, ctx, args.max_context)}")
        else:
            kept.append(q)
            first_ids.append(ids)
    if short or too_long:
        _log(f"[bench] kept {len(kept)}/{len(questions)} questions: {short} shorter than --min-prompt-tokens "
             f"{args.min_prompt_tokens}, {too_long} longer than the context ({ctx} positions"
             f"{'' if args.max_context else '; raise it with --max-context'})")
    if not kept:
        raise ValueError("no question left to run (see the filters above)")
    questions = kept

    os.makedirs(args.out_dir, exist_ok=True)
    common = {"model_id": model_id, "target": args.target, "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "bench": args.bench, "max_new_tokens": args.max_new_tokens,
              "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "mode": args.sampling},
              "seed": args.seed, "repeats": args.repeats,
              "max_context": args.max_context, **_versions()}
    try:
        common["gpu_name"] = torch.cuda.get_device_name() if device.startswith("cuda") else None
    except Exception:
        pass

    # longest prompt the run can see (turn k also holds the earlier answers), for the warm-up
    i_longest = max(range(len(questions)), key=lambda i: len(first_ids[i]))
    longest, longest_ids = questions[i_longest], first_ids[i_longest]
    extra_turns = sum(len(tok(t)["input_ids"]) + args.max_new_tokens + 32 for t in longest["turns"][1:])
    warm_len = min(len(longest_ids) + extra_turns, ctx - args.max_new_tokens)


    paths, failed, nothing, skipped = {}, [], [], {}
    for method in methods:
        try:
            paths[method], skipped[method] = _run_method(method, models, args, tok, questions, eos_ids, model_id, common,
                                                         warm_len, ctx, first_ids)
        except _NothingRan as e:  # every question skipped (reasons logged one per line): no answer file
            if len(methods) == 1:
                raise
            _log(f"[bench] {method}: {e}")
            nothing.append(method)
        except Exception as e:  # one broken method must not lose the others' results (a long GPU run)
            if isinstance(e, ValueError) and len(methods) == 1:
                raise
            import traceback

            traceback.print_exc()
            _log(f"[bench] {method}: FAILED ({type(e).__name__}: {e}); continuing with the other methods")
            failed.append(method)
    if failed:
        _log(f"[bench] failed methods: {', '.join(failed)}")
    if not paths:
        if failed:
            raise ValueError(f"every method failed ({', '.join(failed + nothing)})")
        raise ValueError(f"no question finished: every question was skipped (see the lines above; methods {', '.join(nothing)})")
    notes = [f"{len(questions)} question(s) per method"]
    if too_long:
        notes.append(f"{too_long} skipped as longer than the context")
    if sum(skipped.values()):
        notes.append("skipped while running: " + ", ".join(f"{m} {n}" for m, n in skipped.items() if n))
    if failed or nothing:
        notes.append(f"no answers from {', '.join(failed + nothing)}")
    _log(f"[bench] done: {len(paths)} answer file(s) in {args.out_dir} ({'; '.join(notes)})")
    return paths


class _NothingRan(ValueError):
    """A method finished no question (each one skipped, with its reason logged)."""


class _Skip(Exception):
    """This question cannot run (the reason is the message); it gets no answer line."""


def _too_long(n: int, max_new: int, ctx: int, max_context: int | None, turn: int | None = None) -> str:
    what = "its prompt" if turn is None else f"turn {turn + 1}'s prompt (with the earlier turns and answers)"
    hint = "" if max_context else "; raise it with --max-context N"
    return f"{what} is {n} tokens + --max-new-tokens {max_new} = {n + max_new} > the context of {ctx} positions{hint}"


PROMPT_WARMUP_TOKENS = 8
"""New tokens per first-turn prompt in a method's prompt warm-up: enough for a speculative method's first
rounds, which prefill its draft model on the prompt (the target's prefill alone is one token)."""


def _warm_prompts(runner, prompts: list[list[int]], args) -> None:
    """A method's prompt warm-up (untimed): ``runner`` on every question's first-turn prompt (``prompts``, each
    known to fit the context) with :data:`PROMPT_WARMUP_TOKENS` new tokens (fewer if --max-new-tokens is smaller).

    Setup that depends on the prompt's length -- on CUDA the cuDNN attention plans of a prefill's blocks,
    Triton's specialisations of length arguments -- is per model and per length, and otherwise paid inside a
    timed call: by the first method that meets a length for the target (vanilla looked 2x slower on an H100,
    BENCHMARKS "Session 17"), and inside the first round for a draft model's own prefill of the prompt (the
    draft-model chain looked 2x slower, "Session 18"). Later turns' prompts hold the answers, so only the first
    turns are known before the run."""
    n_new = min(PROMPT_WARMUP_TOKENS, args.max_new_tokens)
    for ids in prompts:
        runner.generate(ids, n_new, args.seed)


def _run_method(method, models, args, tok, questions, eos_ids, model_id, common, warm_len, ctx,
                first_ids: list[list[int]]) -> str:
    runner, meta = _make_runner(method, models, args, eos_ids, tok.pad_token_id)
    meta = {"method": method, **meta, **common}
    t_warm = time.perf_counter()
    if args.warmup:
        _log(f"[bench] {method} ({meta['backend']}): warming up (untimed, {args.warmup} round(s), prompts up to {warm_len} tokens) ...")
    for _ in range(args.warmup):
        runner.generate(first_ids[0], min(args.max_new_tokens, 32), args.seed)
        if warm_len > len(first_ids[0]):
            # size the caches (and capture their CUDA graphs) for the longest prompt the run will see: a prompt
            # of warm_len + max_new - 16 tokens and 16 new ones needs the same capacity at a fraction of the cost
            n_new = min(16, args.max_new_tokens)
            n = min(warm_len + args.max_new_tokens - n_new, ctx - n_new)
            longest_ids = max(first_ids, key=len)
            ids = (longest_ids * (-(-n // len(longest_ids))))[:n]
            runner.generate(ids, n_new, args.seed)
    if args.warmup:
        _warm_prompts(runner, first_ids, args)
    _log(f"[bench] {method} ({meta['backend']}): warm-up {time.perf_counter() - t_warm:.1f}s")
    path = os.path.join(args.out_dir, f"{method}.jsonl")
    from tqdm import tqdm

    # on stderr, and only on a terminal (disable=None): logs and captured output get the summary lines alone
    bar = tqdm(total=len(questions), desc=method, unit="q", file=sys.stderr, dynamic_ncols=True,
               disable=True if args.no_progress else None)
    tokens = wall = 0.0
    passes = done = skipped = differ = 0
    try:
        with open(path, "w", encoding="utf-8") as f:
            size = max(1, getattr(args, "batch_size", 1))
            groups = [list(range(i, min(i + size, len(questions)))) for i in range(0, len(questions), size)]
            for group in groups:
                if size == 1:
                    qi = group[0]
                    try:
                        recs = [_run_question(runner, tok, questions[qi], args, qi, ctx)]
                    except _Skip as e:
                        recs = [e]
                else:
                    recs = _run_group(runner, tok, [questions[i] for i in group], args, group[0], ctx)
                bar.update(len(group))
                for q, rec in zip((questions[i] for i in group), recs):
                    if isinstance(rec, _Skip):
                        skipped += 1
                        tqdm.write(f"[bench] {method}: skipping question {q['question_id']}: {rec}", file=sys.stderr)
                        continue
                    rec.update({"model_id": model_id, "method": method, "backend": meta["backend"], "meta": meta})
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    done += 1
                    ch = rec["choices"][0]
                    for k, same in enumerate(ch.get("repeats_equal", [])):
                        if not same:
                            differ += 1
                            tqdm.write(f"[bench] {method}: question {q['question_id']} turn {k}: the {args.repeats} repeats "
                                       "gave different outputs (the recorded one is the median-wall run's)", file=sys.stderr)
                    tokens += sum(ch["new_tokens"])
                    passes += len(ch["accept_lengths"])
                    if size == 1:
                        wall += sum(ch["wall_time"])
                if size > 1:   # a batched turn's wall time is shared by its rows: count it once
                    wall += sum(_group_walls(recs))
    finally:
        bar.close()
        if not done and os.path.exists(path):
            os.remove(path)  # never leave an empty answer file
    if not done:
        raise _NothingRan(f"no question finished ({skipped} skipped, see above); no answer file written")
    if args.repeats > 1:
        _log(f"[bench] {method}: every turn timed {args.repeats} times (median-wall run recorded); "
             f"{'outputs equal across the repeats' if not differ else f'{differ} turn(s) with different outputs'}")
    _log(f"[bench] {method}: {done} question(s){f' ({skipped} skipped)' if skipped else ''}, {int(tokens)} tokens in {wall:.2f}s "
         f"({tokens / max(wall, 1e-9):.1f} tok/s pooled, tau {tokens / max(passes, 1):.2f}) -> {path}")
    return path, skipped


def _run_question(runner, tok, q: dict, args, qi: int, ctx: int | None = None) -> dict:
    """One question, every turn; raises :class:`_Skip` when a turn's prompt + new tokens exceed ``ctx``."""
    from specdec.shared.tokenizer import encode_prompt

    answers: list[str] = []
    ch = _new_choice()
    for k in range(len(q["turns"])):
        ids = encode_prompt(tok, conversation_prompt(tok, q["turns"], answers, args.family))
        if ctx is not None and len(ids) + args.max_new_tokens > ctx:
            raise _Skip(_too_long(len(ids), args.max_new_tokens, ctx, args.max_context, turn=k))
        seed = args.seed + 1000 * qi + k
        runs = [runner.generate(ids, args.max_new_tokens, seed) for _ in range(args.repeats)]
        answers.append(_add_turn(ch, tok, ids, *_median_run(runs)))
    return {"question_id": q["question_id"], "category": q["category"], "tstamp": time.time(),
            "choices": [{"index": 0, **ch}]}


def _new_choice() -> dict[str, list]:
    """An answer record's ``choices[0]`` fields, empty (one entry per turn is added by :func:`_add_turn`)."""
    return {k: [] for k in ("turns", "new_tokens", "wall_time", "prefill_time", "decode_time", "prompt_tokens",
                            "decoding_steps", "accept_lengths", "output_ids")}


def _median_run(runs: list[TurnResult]) -> tuple[TurnResult, list[float] | None, bool]:
    """``--repeats``: the run of ``runs`` (one turn, timed ``len(runs)`` times) with the median wall time (the lower
    median for an even count), every run's wall time (None for a single run), and whether all outputs are equal."""
    if len(runs) == 1:
        return runs[0], None, True
    order = sorted(range(len(runs)), key=lambda i: runs[i].wall_time)
    same = all(r.output_ids == runs[0].output_ids for r in runs[1:])
    return runs[order[(len(runs) - 1) // 2]], [r.wall_time for r in runs], same


def _add_turn(ch: dict[str, list], tok, ids: list[int], r: TurnResult, walls: list[float] | None = None,
              same: bool = True) -> str:
    """Record one answered turn (prompt ``ids``, result ``r``) in ``ch``; returns the answer for the next turn.
    With ``--repeats``: ``walls`` (every repeat's wall time, kept in ``wall_time_repeats``) and ``same`` (the
    repeats' outputs were equal; kept in ``repeats_equal``)."""
    if walls is not None:
        ch.setdefault("wall_time_repeats", []).append(walls)
        ch.setdefault("repeats_equal", []).append(same)
    text = tok.decode(r.output_ids, skip_special_tokens=True)
    ch["turns"].append(text)
    ch["new_tokens"].append(len(r.output_ids))
    ch["wall_time"].append(r.wall_time)
    ch["prefill_time"].append(r.prefill_time)
    ch["decode_time"].append(None if r.prefill_time is None else max(r.wall_time - r.prefill_time, 0.0))
    ch["prompt_tokens"].append(len(ids))
    ch["decoding_steps"].append(None if r.accept_lengths is None else len(r.accept_lengths))
    if r.accept_lengths is not None:
        ch["accept_lengths"].extend(r.accept_lengths)
    ch["output_ids"].append(r.output_ids)
    return text.strip()


def _group_walls(recs: list) -> list[float]:
    """The wall time of each batched turn of a group, once (every row of a turn records the same)."""
    walls: dict[int, float] = {}
    for rec in recs:
        if isinstance(rec, dict):
            for k, w in enumerate(rec["choices"][0]["wall_time"]):
                walls[k] = w
    return list(walls.values())


def _run_group(runner, tok, qs: list[dict], args, q0: int, ctx: int | None = None) -> list:
    """Questions ``qs`` together (``--batch-size``): turn k of every question that has one, in one batched call.
    Returns one record per question (as :func:`_run_question`), or the :class:`_Skip` that stopped it."""
    from specdec.shared.tokenizer import encode_prompt

    if not isinstance(runner, SpecdecRunner):
        raise ValueError("--batch-size > 1 batches the specdec methods only (the transformers peers run one prompt at a time)")
    answers: list[list[str]] = [[] for _ in qs]
    chs = [_new_choice() for _ in qs]
    out: list = [None] * len(qs)
    for k in range(max(len(q["turns"]) for q in qs)):
        rows, prompts = [], []
        for i, q in enumerate(qs):
            if out[i] is not None or k >= len(q["turns"]):
                continue
            ids = encode_prompt(tok, conversation_prompt(tok, q["turns"], answers[i], args.family))
            if ctx is not None and len(ids) + args.max_new_tokens > ctx:
                out[i] = _Skip(_too_long(len(ids), args.max_new_tokens, ctx, args.max_context, turn=k))
                continue
            rows.append(i)
            prompts.append(ids)
        if not rows:
            continue
        seed = args.seed + 1000 * q0 + k
        runs = [runner.generate_batch(prompts, args.max_new_tokens, seed) for _ in range(args.repeats)]
        for j, (i, ids) in enumerate(zip(rows, prompts)):
            answers[i].append(_add_turn(chs[i], tok, ids, *_median_run([run[j] for run in runs])))
    return [o if o is not None else {"question_id": q["question_id"], "category": q["category"], "tstamp": time.time(),
                                     "batch_size": len(qs), "choices": [{"index": 0, **ch}]}
            for q, o, ch in zip(qs, out, chs)]


def bench_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specdec bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_args(ap)
    args = ap.parse_args(argv)
    try:
        paths = run_bench(args)
    except ValueError as e:
        print(f"specdec bench: error: {e}", file=sys.stderr)
        return 2
    for m, p in paths.items():
        print(f"{m}\t{p}")
    return 0


def _cli_run(args) -> int:
    for m, p in run_bench(args).items():
        print(f"{m}\t{p}")
    return 0


try:  # `specdec bench` (specdec/cli.py imports this module and calls the registered entry)
    from specdec.cli import register_subcommand

    register_subcommand("bench", add_bench_args, _cli_run, help="Spec-Bench-style speed runs of decoders and transformers peers")
except ImportError:  # pragma: no cover - a build without the CLI module
    pass


if __name__ == "__main__":
    raise SystemExit(bench_main())
