"""The ``specdec`` command line (also ``python -m specdec``).

``specdec generate`` runs one decoder on one prompt and prints the completion -- accepted draft
tokens highlighted on a terminal (from the result's ``spec_mask``) -- and a table of tokens, tau,
tokens/s and time to first token::

    specdec generate "def read_config(path):"                  # GLIDE tree on the embedded default model
    echo "import os" | specdec generate --method speculative --max-new-tokens 32
    specdec generate --method pld --compare --json "class Stack:"
    specdec generate -t 0.8 --sampling keyed --seed 7 --compare "def f(x):"   # sampled, same tokens as vanilla
    specdec generate --target path/to/llama --glide path/to/glide --backend fast "..."

Methods (the table in :mod:`specdec.methods`): vanilla, speculative (draft LM chain), spec (GLIDE
chain), tree_spec (GLIDE beam tree), logitspec, magicdec, pld. ``--backend auto`` = ``fast`` when
CUDA is available and :mod:`specdec.fast` imports, else ``ref``. ``--backend fast`` on the CPU would run
the Triton kernels under the Triton interpreter (a test tool, minutes per call): it is refused unless
``--force-interpreter`` is given. Without ``--target`` the embedded default (a small Python-code
Llama, 8192 positions, trained on the standard library and packages' sources) is used, with its draft
LM and GLIDE draft. The prompt is used raw (a base code model has no chat template); ``--template`` picks one. Stdin is read
as UTF-8 bytes. ``--echo`` prints the prompt first (and adds ``prompt`` to ``--json``).

Long prompts: prompt tokens + ``--max-new-tokens`` must fit the model's context (its config's
``max_position_embeddings``). Past it, the default (``--truncate error``) is a one-line error;
``--truncate left`` keeps the prompt's last tokens that fit (the BOS kept) and says so on stderr;
``--max-context N`` sets the limit to N positions (above the trained length: RoPE extrapolation).

Errors (bad arguments, missing model directories, invalid tree shapes, ...) are one line on stderr
and exit code 2. A failure inside the library (e.g. a CUDA error) is one line too, with exit code 1;
``SPECDEC_DEBUG=1`` re-raises it with the full traceback.

Plugging in more subcommands
----------------------------
Other modules add subcommands without editing this file::

    # specdec/bench.py
    from specdec.cli import register_subcommand

    def add_args(parser):            # an argparse.ArgumentParser for "specdec bench"
        parser.add_argument("--methods", default="vanilla,tree_spec")

    def run(args) -> int:            # the parsed namespace; return the exit code
        ...
        return 0

    register_subcommand("bench", add_args, run, help="benchmark decoders")

:func:`main` imports the modules in :data:`PLUGIN_MODULES` (``specdec.bench``, ``specdec.draft_vocab``,
``specdec.report``; a missing module is skipped) and any listed in the environment
variable ``SPECDEC_CLI_PLUGINS`` (comma separated) before parsing, so their
``register_subcommand`` calls run. ``run`` may raise ValueError/TypeError/FileNotFoundError for a
one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from specdec.methods import DEFAULT_METHOD, METHODS, methods_taking

__all__ = ["main", "register_subcommand", "SUBCOMMANDS", "METHODS", "PLUGIN_MODULES", "CLIError", "resolve_backend", "parse_tree_shape",
           "check_fast_device", "fit_context"]

PLUGIN_MODULES = ("specdec.bench", "specdec.report", "specdec.draft_vocab")


class CLIError(ValueError):
    """A user error: printed as one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Subcommand registry
# ---------------------------------------------------------------------------------------------


@dataclass
class Subcommand:
    name: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    help: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, add_args: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int | None], help: str | None = None) -> None:
    """Add ``specdec <name>``: ``add_args(parser)`` declares its options, ``run(args)`` returns the exit code.

    Registering a name again replaces the earlier entry (so a module re-imported by tests is harmless).
    """
    if not isinstance(name, str) or not name or name.startswith("-"):
        raise ValueError(f"invalid subcommand name {name!r}")
    SUBCOMMANDS[name] = Subcommand(name, add_args, run, help)


def _load_plugins() -> None:
    names = list(PLUGIN_MODULES) + [m.strip() for m in os.environ.get("SPECDEC_CLI_PLUGINS", "").split(",") if m.strip()]
    for mod in names:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the plugin exists but one of its imports is missing
                print(f"specdec: warning: could not load CLI plugin {mod}: {e}", file=sys.stderr)
        except Exception as e:  # a broken plugin must not take `specdec generate` down
            print(f"specdec: warning: could not load CLI plugin {mod}: {type(e).__name__}: {e}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as ONE line (``specdec generate: error: ...``) and exit code 2."""

    def error(self, message: str):  # noqa: D401
        e = CLIError(f"{self.prog}: error: {message} (see {self.prog} --help)")
        e.formatted = True
        raise e


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

# METHODS (name -> decoder function, what it drafts with, knobs) and DEFAULT_METHOD: specdec.methods
_DTYPES = ("auto", "fp32", "bf16", "fp16")

_GREEN, _DIM, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def parse_tree_shape(text: str) -> tuple[int, ...] | str:
    """'4,16,16,16,16' -> (4, 16, 16, 16, 16); every level >= 1. 'auto' stays 'auto' (the decoder picks the
    shape with the most expected tokens per second on this device, docs/design.md §12)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        shape = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x != "")
    except ValueError:
        raise CLIError(f"--tree-shape must be comma-separated integers like 4,16,16,16,16, or auto, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise CLIError(f"--tree-shape needs one or more levels, each >= 1 node, got {text!r}")
    return shape


def _parse_opt(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise CLIError(f"-O/--opt takes key=value (a decoder keyword argument), got {text!r}")
    k, v = text.split("=", 1)
    k = k.strip().replace("-", "_")
    if not k.isidentifier():
        raise CLIError(f"-O/--opt: {k!r} is not a keyword argument name")
    low = v.strip().lower()
    if low in ("true", "false"):
        return k, low == "true"
    if low in ("none", "null"):
        return k, None
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    if "," in v:
        try:
            return k, tuple(int(x) for x in v.split(","))
        except ValueError:
            pass
    return k, v


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text; '-' or omitted: read it from stdin")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="several prompts decoded as ONE batch: a text file with one prompt per line, or JSONL with a "
                        "'prompt' (or Spec-Bench 'turns') field per line; prints each completion and tokens/s per "
                        "request and in total")
    p.add_argument("--method", "-m", default=DEFAULT_METHOD, choices=list(METHODS), help=f"decoder (default {DEFAULT_METHOD}: {METHODS[DEFAULT_METHOD].summary})")
    p.add_argument("--backend", default="auto", choices=["auto", "ref", "fast"], help="ref (readable PyTorch), fast (Triton + CUDA graphs), auto (fast when CUDA is available)")
    p.add_argument("--force-interpreter", action="store_true",
                   help="allow --backend fast without CUDA: its Triton kernels then run in the Triton interpreter (a test tool, minutes per call)")
    p.add_argument("--target", default="default", help="target model: a local HF-format dir (default: the embedded model)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism over N processes (fast backend; launch with torchrun --nproc-per-node N -m specdec generate --tp N ...)")
    p.add_argument("--draft", default=None, help="draft LM dir for --method speculative (default: the embedded draft with the embedded target)")
    p.add_argument("--glide", default=None, help="GLIDE draft dir or .pth for --method spec/tree_spec (default: the embedded GLIDE with the embedded target)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="context limit in positions for prompt + new tokens (default: the model's max_position_embeddings; "
                        "above it: RoPE past the trained length)")
    p.add_argument("--truncate", default="error", choices=["error", "left"],
                   help="a prompt too long for the context: error (default) or left (keep its last tokens that fit)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off; in (0, 1]")
    p.add_argument("--tree-shape", default=None,
                   help="GLIDE tree nodes per level, e.g. 4,16,16,16,16 (the Python API's default), or auto (the CLI's "
                        "default): the shape with the most expected tokens per second on this device, from the draft's "
                        "measured acceptance and a one-time cost calibration cached per device and model (printed)")
    p.add_argument("--gamma", type=_int_or_auto, default=None,
                   help="draft chain length (speculative, spec, magicdec; default: the decoder's, auto for spec); "
                        "auto: the GLIDE chain length with the most expected tokens per second (spec only)")
    p.add_argument("--draft-window", type=int, default=None, metavar="N",
                   help="speculative: the draft model reads only the last N prompt tokens (default: the whole prompt; "
                        "faster on long prompts, the output is unchanged)")
    p.add_argument("--draft-tree-capacity", type=_int_or_auto, default=None, metavar="N|auto",
                   help="logitspec: draft nodes per round (the Python API's default: 64), or auto (the CLI's default): the "
                        "capacity with the most expected tokens per second on this device, from the target's measured "
                        "acceptance and a one-time cost calibration cached per device and model (printed)")
    p.add_argument("--opt", "-O", action="append", default=[], metavar="KEY=VALUE", help="extra decoder keyword argument, e.g. -O num_pred_tokens=20 (repeatable)")
    p.add_argument("--eos", default=None, help="comma-separated EOS ids ('' = never stop; default: the model's)")
    p.add_argument("--sampling", default="rejection", choices=["rejection", "keyed"],
                   help="how to sample when --temperature > 0: rejection (default; generator draws + rejection sampling) or "
                        "keyed (position-keyed: every method emits exactly vanilla's tokens for the same --seed)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling, in [0, 2**63) (default 0; the key of --sampling keyed)")
    p.add_argument("--dtype", default="auto", choices=list(_DTYPES), help="auto = fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--template", default="raw", help="prompt format: raw (default: the text as is), auto (the tokenizer's chat template), or vicuna/llama2/llama3/qwen2")
    p.add_argument("--keep-newline", action="store_true",
                   help="keep a raw prompt's trailing newlines (dropped by default, with a note: a prompt ending in a bare "
                        "newline token steers a code model to column 0 or to the end of the file -- `echo 'def f(x):' |` "
                        "would get no function body; the model writes the newline and indentation itself)")
    p.add_argument("--system", default=None, help="system prompt (with --template other than raw)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on the fast backend on CUDA, else 0)")
    p.add_argument("--compare", action="store_true", help="also run vanilla decoding and print the speedup")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text and the table")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="highlight accepted draft tokens (auto: on a terminal, unless NO_COLOR is set)")
    p.add_argument("--echo", action="store_true", help="print the prompt (dimmed on a terminal) before the completion; --json: a 'prompt' field")


def _int_or_auto(text: str) -> int | str:
    """--gamma / --draft-tree-capacity: an int, or 'auto' (chosen for the most expected tokens per second)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None


def _check_generate_args(a: argparse.Namespace) -> None:
    if a.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if not a.temperature >= 0 or a.temperature != a.temperature or a.temperature == float("inf"):
        raise CLIError(f"--temperature must be a finite number >= 0, got {a.temperature}")
    if a.top_k < 0:
        raise CLIError(f"--top-k must be >= 0 (0 = off), got {a.top_k}")
    if not 0 < a.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.gamma is not None and a.gamma != "auto" and a.gamma < 1:
        raise CLIError(f"--gamma must be >= 1, got {a.gamma}")
    if a.draft_tree_capacity is not None and a.draft_tree_capacity != "auto" and a.draft_tree_capacity < 1:
        raise CLIError(f"--draft-tree-capacity must be >= 1, got {a.draft_tree_capacity}")
    if a.draft_window is not None and a.draft_window < 1:
        raise CLIError(f"--draft-window must be an integer >= 1 (prompt tokens the draft model reads), got {a.draft_window}")
    if a.gamma == "auto" and a.method != "spec":
        raise CLIError(f"--gamma auto applies to --method spec, not {a.method}")
    if a.warmup is not None and a.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {a.warmup}")
    if a.tp < 1:
        raise CLIError(f"--tp must be >= 1, got {a.tp}")
    if a.prompts_file is not None and a.prompt is not None:
        raise CLIError("give either a prompt or --prompts-file, not both")
    if a.tp > 1 and a.backend == "ref":
        raise CLIError("--tp needs --backend fast (the reference path is single-process)")
    if not 0 <= a.seed < 2**63:
        raise CLIError(f"--seed must be in [0, 2**63), got {a.seed}")
    if a.max_context is not None and a.max_context < 2:
        raise CLIError(f"--max-context must be >= 2 positions, got {a.max_context}")
    a.tree_shape = parse_tree_shape(a.tree_shape) if a.tree_shape is not None else None
    for flag, knob in (("--tree-shape", "tree_shape"), ("--gamma", "gamma"), ("--draft-tree-capacity", "draft_tree_capacity"),
                       ("--draft-window", "draft_window")):
        if getattr(a, knob) is not None and knob not in METHODS[a.method].options:
            raise CLIError(f"{flag} applies to --method {_or_list(methods_taking(knob))}, not {a.method}")
    # The CLI's default for the GLIDE decoders is the shape that fits this device (the Python API keeps
    # the seed's tree and gamma): "auto" for tree_spec's tree and spec's chain length -- on one process;
    # under --tp every rank must run the same shape, so there the API's fixed defaults apply.
    if a.method == "tree_spec" and a.tree_shape is None and a.tp == 1:
        a.tree_shape = "auto"
    if a.method == "spec" and a.gamma is None and a.tp == 1:
        a.gamma = "auto"
    if a.method == "logitspec" and a.draft_tree_capacity is None and a.tp == 1:
        a.draft_tree_capacity = "auto"
    if a.tp > 1 and "auto" in (a.tree_shape, a.gamma, a.draft_tree_capacity):
        raise CLIError("--tree-shape/--gamma/--draft-tree-capacity auto is not supported with --tp (every rank must run the "
                       "same shape); give an explicit shape, e.g. --tree-shape 4,16,16,16,16")
    a.opts = dict(_parse_opt(o) for o in a.opt)


def _or_list(names: list[str]) -> str:
    """['a'] -> 'a'; ['a', 'b', 'c'] -> 'a, b or c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_fast_device(device: str, force_interpreter: bool = False, flag: str = "--force-interpreter") -> None:
    """Refuse the fast path on the CPU unless ``force_interpreter``: its Triton kernels would run in the
    Triton interpreter (``TRITON_INTERPRET=1``, chosen by ``import specdec`` without CUDA), a test tool
    that takes minutes per call. On a CUDA machine without the interpreter they cannot run on the CPU at all."""
    if not str(device).startswith("cpu"):
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise CLIError("--backend fast cannot run on the CPU here: its Triton kernels need CUDA (the Triton interpreter, "
                       "TRITON_INTERPRET=1, is not active); use --backend ref, or a CUDA --device")
    if not force_interpreter:
        raise CLIError("--backend fast without CUDA would run its Triton kernels in the Triton interpreter (a test tool, "
                       f"minutes per call): use --backend ref (or auto), or pass {flag} to run it anyway")


def resolve_backend(name: str, device: str, force_interpreter: bool = False):
    """The decoder module for ``--backend`` (and the device): returns (name, module).

    ``auto`` is ``fast`` on a CUDA device (when :mod:`specdec.fast` imports), else ``ref``. ``fast`` on the
    CPU raises :class:`CLIError` unless ``force_interpreter`` (see :func:`check_fast_device`)."""
    import torch

    if name == "auto":
        name = "ref"
        if torch.cuda.is_available() and not str(device).startswith("cpu"):
            try:
                importlib.import_module("specdec.fast")
                name = "fast"
            except Exception:
                name = "ref"
    if name == "fast":
        check_fast_device(device, force_interpreter)
    try:
        return name, importlib.import_module(f"specdec.{name}")
    except ImportError as e:
        raise CLIError(f"backend {name!r} is not available: {e}") from None


def _with_context(model, max_context: int | None):
    """``--max-context`` above the model's trained length raises the limit the decoders check (RoPE extrapolation)."""
    if max_context is not None and max_context > model.config.max_position_embeddings:
        model.config.max_position_embeddings = int(max_context)
    return model


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: unknown device {device!r}") from None
    return device


def _check_dir(flag: str, path: str, kind: str = "dir") -> str:
    from specdec.shared.assets import EMBEDDED_MODELS, resolve_model_path

    if path in EMBEDDED_MODELS:
        return resolve_model_path(path)
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path!r} does not exist (expected a local Hugging Face-format model directory)")
    if kind == "dir" and not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is not a directory (expected a local Hugging Face-format model directory)")
    return path


_MODEL_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, load: Callable[[], Any]):
    """Models loaded once per process (``main`` may be called many times, e.g. by tests)."""
    if key not in _MODEL_CACHE:
        if len(_MODEL_CACHE) > 8:
            _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load()
    return _MODEL_CACHE[key]


def _model_key(path: str) -> tuple:
    p = os.path.abspath(path)
    try:
        stamp = max(os.path.getmtime(os.path.join(p, f)) for f in os.listdir(p)) if os.path.isdir(p) else os.path.getmtime(p)
    except (OSError, ValueError):
        stamp = 0
    return (p, stamp)


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} is invalid; "
                       "give the prompt as UTF-8 (e.g. iconv -f latin1 -t utf-8 prompt.txt | specdec generate)") from None


def _read_stdin(stdin) -> str:
    """The whole of stdin as text: bytes decoded as UTF-8 (strictly; one-line error otherwise), newlines
    normalised like text-mode reading (CRLF / CR -> LF). A stream without bytes (a StringIO) is read as is."""
    buf = getattr(stdin, "buffer", None)
    if buf is None:
        return stdin.read()
    text = _decode_utf8(buf.read(), "stdin")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_prompt(a: argparse.Namespace, stdin) -> str:
    if a.prompt is not None and a.prompt != "-":
        text = a.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates (surrogateescape)
            text = _decode_utf8(os.fsencode(text), "the prompt argument")
    else:
        if a.prompt is None and getattr(stdin, "isatty", lambda: False)():
            raise CLIError("no prompt: pass it as an argument or pipe it on stdin (e.g. echo 'def f(x):' | specdec generate)")
        text = _read_stdin(stdin)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a text stream opened with errors="surrogateescape"
            text = _decode_utf8(text.encode("utf-8", "surrogateescape"), "stdin")
    if not text:
        raise CLIError("empty prompt: give at least one character")
    return text


def _drop_trailing_newlines(texts: list[str], keep: bool) -> tuple[list[str], str | None]:
    """Raw prompts without their trailing newlines (unless ``keep``), and the stderr note that says so (None when
    nothing was dropped; printed once the run has succeeded, so an error stays one line).

    Byte-level BPE tokenizers merge a newline with the indentation after it ("\\n   " + " return"), so a
    prompt that ends in a bare newline token looks like a line followed by column-0 text or the end of a
    file: after ``def f(x):\\n`` the embedded model writes another ``def`` or stops. Without the newline it
    continues the function, emitting the newline and indentation as the tokens it was trained on. The
    same prompt then goes to every decoder, so vanilla and speculation still see identical inputs."""
    out = [t if keep else t.rstrip("\n") for t in texts]
    if any(not t for t in out):
        raise CLIError("empty prompt: it is only newlines (give some text, or --keep-newline)")
    changed = sum(a != b for a, b in zip(texts, out))
    if not changed:
        return out, None
    which = "the prompt's trailing newline" if len(texts) == 1 else f"the trailing newlines of {changed} prompt(s)"
    return out, f"specdec: note: dropped {which}: the model writes the newline and indentation itself (--keep-newline keeps it)"


def _read_prompts_file(path: str) -> list[str]:
    """The prompts of ``--prompts-file``: one per non-empty line, or per JSONL record ('prompt', 'text' or
    the first of Spec-Bench's 'turns')."""
    if not os.path.isfile(path):
        raise CLIError(f"--prompts-file: no such file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError:
        raise CLIError(f"--prompts-file: {path} is not UTF-8 text") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise CLIError(f"--prompts-file: {path} holds no prompt")
    if not all(line.lstrip().startswith("{") for line in lines):
        return lines
    prompts = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"--prompts-file: {path}:{i + 1}: not valid JSON ({e.msg})") from None
        turns = rec.get("turns")
        text = rec.get("prompt", rec.get("text", turns[0] if isinstance(turns, list) and turns else None))
        if not isinstance(text, str) or not text:
            raise CLIError(f"--prompts-file: {path}:{i + 1}: a record needs a non-empty 'prompt', 'text' or 'turns'")
        prompts.append(text)
    return prompts


def _generate_batch(a, texts: list[str], tok, decoder, mod, args, kwargs, limit: int, source: str, backend: str,
                    device: str, dtype_name: str, stdout) -> int:
    """``generate --prompts-file``: every prompt in one batched call of the decoder (and of vanilla with
    --compare); one completion per request, then tokens/s per request and in total."""
    import torch
    from tabulate import tabulate

    from specdec.shared.tokenizer import encode_prompt, format_prompt

    prompts = []
    for i, text in enumerate(texts):
        if a.template != "raw":
            text = format_prompt(tok, text, system=a.system, family=None if a.template == "auto" else a.template)
        ids, dropped = fit_context(encode_prompt(tok, text), a.max_new_tokens, limit, a.truncate,
                                   getattr(tok, "bos_token_id", None), source)
        if dropped:
            print(f"specdec: note: prompt {i + 1}: dropped {dropped} tokens from its start (--truncate left)", file=sys.stderr)
        prompts.append(torch.tensor(ids, dtype=torch.long, device=device))

    def run(fn, fargs, kw):
        gen = torch.Generator(device=device).manual_seed(a.seed) if a.temperature > 0 else None
        torch.manual_seed(a.seed)
        return fn(*fargs, prompts, None, generator=gen, **kw)

    warmup = a.warmup if a.warmup is not None else (1 if backend == "fast" and device.startswith("cuda") else 0)
    for _ in range(warmup):
        run(decoder, args, kwargs)
    res = run(decoder, args, kwargs)
    if a.newline_note:
        print(a.newline_note, file=sys.stderr)
    vanilla = None
    if a.compare and a.method != "vanilla":
        base_kw = {k: v for k, v in kwargs.items() if k in ("max_gen_len", "temperature", "top_k", "top_p", "eos_id", "sampling", "seed")}
        for _ in range(warmup):
            run(mod.vanilla_generate, [args[0]], base_kw)
        vanilla = run(mod.vanilla_generate, [args[0]], base_kw)
    elapsed = float(res.elapsed_time) + float(res.prefill_time)
    rows = []
    for b in range(len(prompts)):
        r = res.row(b)
        ids = r.output_ids[0].tolist()
        rows.append({"request": b + 1, "prompt_tokens": int(prompts[b].shape[0]), "tokens": len(ids),
                     "tau": round(res.row_taus[b], 3), "tokens_per_s": round(len(ids) / elapsed, 2) if elapsed > 0 else 0.0,
                     "completion": tok.decode(ids, skip_special_tokens=True), "output_ids": ids,
                     **({"same_output_as_vanilla": vanilla.row(b).output_ids[0].tolist() == ids} if vanilla is not None
                        else {"same_output_as_vanilla": True} if a.compare else {})})
    total = {"method": a.method, "backend": backend, "device": device, "dtype": dtype_name, "requests": len(rows),
             "tokens": sum(r["tokens"] for r in rows), "seconds": round(elapsed, 4),
             "tokens_per_s": round(sum(r["tokens"] for r in rows) / elapsed, 2) if elapsed > 0 else 0.0}
    if vanilla is not None:
        v_elapsed = float(vanilla.elapsed_time) + float(vanilla.prefill_time)
        total["vanilla_tokens_per_s"] = round(int(sum(vanilla.row_lengths)) / v_elapsed, 2) if v_elapsed > 0 else 0.0
        total["speedup"] = round(v_elapsed / elapsed, 3) if elapsed > 0 else None
    if a.json:
        for r in rows:
            stdout.write(json.dumps(r) + "\n")
        stdout.write(json.dumps({"total": total}) + "\n")
        return 0
    for r in rows:
        stdout.write(f"--- request {r['request']} ({r['prompt_tokens']} prompt tokens)\n{r['completion']}\n\n")
    headers = ["request", "prompt tokens", "tokens", "tau", "tokens/s"] + (["== vanilla"] if vanilla is not None else [])
    table = [[r["request"], r["prompt_tokens"], r["tokens"], f"{r['tau']:.2f}", f"{r['tokens_per_s']:.1f}"]
             + ([r["same_output_as_vanilla"]] if vanilla is not None else []) for r in rows]
    table.append(["total", "", total["tokens"], "", f"{total['tokens_per_s']:.1f}"] + ([""] if vanilla is not None else []))
    stdout.write(tabulate(table, headers=headers, tablefmt="simple") + "\n")
    stdout.write(f"{a.method} ({backend}, {device}, {dtype_name}): {len(rows)} requests in one batch, {total['seconds']:.2f} s\n")
    if vanilla is not None and total.get("speedup"):
        stdout.write(f"speedup over batched vanilla: {total['speedup']:.2f}x ({total['vanilla_tokens_per_s']:.1f} tokens/s)\n")
        note = batch_speedup_note(total["speedup"], len(rows))
        if note:
            print(note, file=sys.stderr)
    return 0


def batch_speedup_note(speedup: float, requests: int) -> str | None:
    """What ``specdec generate --prompts-file --compare`` adds when batched vanilla beat the batched speculative run
    (``speedup`` < 1 with ``requests`` > 1), else None: why, and what to run instead. A batched vanilla step costs
    little more than one row's (a few rows fill neither a CPU's nor a GPU's step), while a speculative batch verifies
    every request's drafts in each pass and runs until its slowest request is done (BENCHMARKS "The CLI's batched
    requests on a 2-core CPU")."""
    if requests < 2 or speedup >= 1.0:
        return None
    return (f"specdec: note: batched vanilla was faster here ({speedup:.2f}x): its step costs little more for "
            f"{requests} requests than for one, while each speculative pass verifies every request's drafts and the "
            f"batch runs until its slowest request is done; for a batch like this one, --method vanilla is the faster choice")


def fit_context(ids: list[int], max_new_tokens: int, limit: int, truncate: str = "error", bos_id: int | None = None,
                source: str = "the model's max_position_embeddings") -> tuple[list[int], int]:
    """``ids`` made to fit ``len(ids) + max_new_tokens <= limit``: returns (ids, tokens dropped).

    ``truncate="error"``: a :class:`CLIError` naming the limit, the prompt's token count, the new tokens and
    the flags. ``"left"``: keep the last tokens that fit (a leading ``bos_id`` stays first)."""
    n = len(ids)
    if n + max_new_tokens <= limit:
        return ids, 0
    room = limit - max_new_tokens
    keep_bos = bos_id is not None and n > 0 and ids[0] == bos_id
    if truncate != "left" or room < 1 + int(keep_bos):
        hint = (f"pass --truncate left to keep its last {room} tokens, " if room >= 1 + int(keep_bos) and truncate != "left"
                else "")
        raise CLIError(f"the prompt is {n} tokens and --max-new-tokens is {max_new_tokens}: {n + max_new_tokens} positions, "
                       f"over the model's context of {limit} ({source}); shorten the prompt, lower --max-new-tokens, "
                       f"{hint}or raise the limit with --max-context N (RoPE past the trained length)")
    kept = ([ids[0]] + ids[n - room + 1:]) if keep_bos else ids[n - room:]
    return kept, n - len(kept)


def _segments(tok, ids: list[int], mask: list[bool]) -> list[tuple[str, bool]]:
    """Split the decoded completion into (text, accepted) pieces that concatenate to the full decode."""
    full = tok.decode(ids, skip_special_tokens=True)
    pieces: list[tuple[str, bool]] = []
    prev = ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1], skip_special_tokens=True)
        if cur.startswith(prev) and "\ufffd" not in cur[len(prev):]:
            piece = cur[len(prev):]
            if piece:
                pieces.append((piece, bool(mask[i])))
            prev = cur
    if prev != full:  # undecodable boundary (split UTF-8): fall back to the rest unhighlighted
        pieces.append((full[len(prev):] if full.startswith(prev) else full, False))
        if not full.startswith(prev):
            pieces = [(full, False)]
    return pieces


def _render(tok, ids: list[int], mask: list[bool], color: bool) -> str:
    if not color:
        return tok.decode(ids, skip_special_tokens=True)
    out = []
    for text, acc in _segments(tok, ids, mask):
        out.append(f"{_GREEN}{text}{_RESET}" if acc else text)
    return "".join(out)


def _stats(method: str, backend: str, res) -> dict[str, Any]:
    n = int(res.output_ids.shape[-1])
    return {
        "method": method,
        "backend": backend,
        "tokens": n,
        "accepted_drafts": int(res.count),
        "target_passes": int(res.num),
        "tau": round(float(res.tau), 4),
        "tokens_per_s": round(float(res.tokens_per_second), 2),
        "ttft_ms": round(float(res.prefill_time) * 1000, 2),
        "decode_s": round(float(res.elapsed_time), 4),
        "total_s": round(float(res.elapsed_time) + float(res.prefill_time), 4),
        **({"tree_shape": list(res.tree_shape)} if res.tree_shape else {}),
        **({"draft_tree_capacity": res.draft_tree_capacity} if res.draft_tree_capacity is not None else {}),
    }


def run_generate(a: argparse.Namespace, stdin=None, stdout=None) -> int:
    import torch

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    _check_generate_args(a)
    tp = None
    if a.tp > 1:   # every rank runs this function; rank 0 prints
        from specdec.fast.tp import init_tensor_parallel

        try:
            tp = init_tensor_parallel(a.tp)
        except ValueError as e:
            raise CLIError(str(e)) from None
        if a.device == "auto" and torch.cuda.is_available():
            a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if tp.rank != 0:
            stdout = open(os.devnull, "w")
    device = _resolve_device(a.device)
    backend, mod = resolve_backend("fast" if tp is not None else a.backend, device, force_interpreter=a.force_interpreter)
    dtype_name = a.dtype if a.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    fn_name, needs = METHODS[a.method].function, METHODS[a.method].needs
    decoder = getattr(mod, fn_name, None)
    if decoder is None:
        raise CLIError(f"method {a.method!r} is not available in specdec.{backend} (no {fn_name})")

    # Inputs and models (read the prompt first: a missing prompt should not wait for model loading).
    texts = _read_prompts_file(a.prompts_file) if a.prompts_file is not None else None
    text = _read_prompt(a, stdin) if texts is None else texts[0]
    a.newline_note = None   # printed after a successful run (here and in _generate_batch)
    if a.template == "raw":   # (a chat template ends the prompt with its own assistant header)
        prompts, a.newline_note = _drop_trailing_newlines(texts if texts is not None else [text], a.keep_newline)
        text, texts = prompts[0], (prompts if texts is not None else None)
    embedded = a.target == "default"
    target_dir = _check_dir("--target", a.target)
    from specdec.shared.tokenizer import encode_prompt, format_prompt, load_tokenizer

    tok = _cached(("tok",) + _model_key(target_dir), lambda: load_tokenizer(target_dir))
    tok.model_max_length = 10**9  # the context is checked below (one line); silence transformers' long-sequence warning
    if a.template != "raw":
        text = format_prompt(tok, text, system=a.system, family=None if a.template == "auto" else a.template)
    ids = encode_prompt(tok, text)
    load_kw = {"tp": tp} if tp is not None else {}
    target = _cached((backend, "model", dtype_name, device, a.max_context, a.tp) + _model_key(target_dir),
                     lambda: _with_context(mod.load_model(target_dir, dtype=dtype, device=device, **load_kw), a.max_context))
    args: list[Any] = [target]
    limits = [(target.config.max_position_embeddings, "the target's max_position_embeddings")]
    if needs == "draft":
        if a.draft is None and not embedded:
            raise CLIError("--method speculative needs --draft DIR (a small LM with the target's tokenizer)")
        draft_dir = _check_dir("--draft", a.draft or "default-draft")
        args.append(_cached((backend, "model", dtype_name, device, a.max_context) + _model_key(draft_dir),
                            lambda: _with_context(mod.load_model(draft_dir, dtype=dtype, device=device), a.max_context)))
        draft_ctx = args[-1].config.max_position_embeddings
        # the draft reads min(prompt, --draft-window) + new tokens: a window that fits lifts its limit on the prompt
        if a.draft_window is None or a.draft_window + a.max_new_tokens > draft_ctx:
            limits.append((draft_ctx, "the draft model's max_position_embeddings"))
    elif needs == "glide":
        if a.glide is None and not embedded:
            raise CLIError(f"--method {a.method} needs --glide PATH (a GLIDE draft trained for this target)")
        glide_path = _check_dir("--glide", a.glide or "default-glide", kind="any")
        args.append(_cached((backend, "glide", dtype_name, device, id(target)) + _model_key(glide_path), lambda: mod.load_glide(glide_path, target)))
    kwargs: dict[str, Any] = dict(max_gen_len=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                  sampling=a.sampling, seed=a.seed)
    if a.eos is not None:
        try:
            kwargs["eos_id"] = [int(x) for x in a.eos.split(",") if x.strip()]
        except ValueError:
            raise CLIError(f"--eos must be comma-separated token ids, got {a.eos!r}") from None
    if a.gamma is not None:
        kwargs["gamma"] = a.gamma
    if a.tree_shape is not None:
        kwargs["tree_shape"] = a.tree_shape
    if a.draft_tree_capacity is not None:
        kwargs["draft_tree_capacity"] = a.draft_tree_capacity
    if a.draft_window is not None:
        kwargs["draft_window"] = a.draft_window
    kwargs.update(a.opts)
    limit, source = min(limits)
    if a.max_context is not None:
        limit, source = a.max_context, "--max-context"
    if texts is not None:
        return _generate_batch(a, texts, tok, decoder, mod, args, kwargs, limit, source, backend, device, dtype_name, stdout)
    n_prompt = len(ids)
    ids, dropped = fit_context(ids, a.max_new_tokens, limit, a.truncate, getattr(tok, "bos_token_id", None), source)
    if dropped:
        print(f"specdec: note: the prompt's {n_prompt} tokens + {a.max_new_tokens} new tokens exceed the context of {limit} "
              f"positions; dropped {dropped} tokens from its start, kept {len(ids)} (--truncate left)", file=sys.stderr)
        text = tok.decode(ids, skip_special_tokens=True)  # what the model sees, for --echo
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)

    def run(fn, fargs, kw):
        gen = torch.Generator(device=device).manual_seed(a.seed) if a.temperature > 0 else None
        torch.manual_seed(a.seed)
        return fn(*fargs, input_ids, input_ids.shape[1], generator=gen, **kw)

    warmup = a.warmup if a.warmup is not None else (1 if backend == "fast" and device.startswith("cuda") else 0)
    for _ in range(warmup):
        run(decoder, args, kwargs)
    res = run(decoder, args, kwargs)
    if a.newline_note:
        print(a.newline_note, file=sys.stderr)
    rows = [_stats(a.method, backend, res)]
    vanilla = None
    if a.compare and a.method == "vanilla":  # the baseline itself: run and print it once
        print("specdec: note: --compare with --method vanilla: vanilla is the baseline itself (run once)", file=sys.stderr)
    elif a.compare:
        base_kw = {k: v for k, v in kwargs.items() if k in ("max_gen_len", "temperature", "top_k", "top_p", "eos_id", "sampling", "seed")}
        for _ in range(warmup):
            run(mod.vanilla_generate, [target], base_kw)
        vanilla = run(mod.vanilla_generate, [target], base_kw)
        rows.append(_stats("vanilla", backend, vanilla))
    out_ids = res.output_ids[0].tolist()
    mask = res.spec_mask[0].tolist()
    completion = tok.decode(out_ids, skip_special_tokens=True)
    speedup = None
    same = vanilla.output_ids[0].tolist() == out_ids if vanilla is not None else None
    if vanilla is not None:
        v_tps, m_tps = rows[1]["tokens_per_s"], rows[0]["tokens_per_s"]
        if v_tps > 0 and m_tps > 0:
            speedup = round(m_tps / v_tps, 3)
        elif rows[0]["total_s"] > 0:
            speedup = round(rows[1]["total_s"] / rows[0]["total_s"], 3)

    if a.json:
        obj = dict(rows[0])
        obj.update({
            "device": device, "dtype": dtype_name, "target": os.path.abspath(target_dir) if not embedded else "default",
            "sampling": a.sampling, "seed": a.seed, "prompt_tokens": len(ids), "completion": completion, "output_ids": out_ids, "spec_mask": [bool(x) for x in mask],
        })
        if a.echo:
            obj["prompt"] = text
        if dropped:
            obj["prompt_tokens_dropped"] = dropped
        if vanilla is not None:
            obj["vanilla"] = rows[1]
            obj["speedup"] = speedup
            obj["same_output_as_vanilla"] = same
        elif a.compare:  # --method vanilla: it is its own baseline
            obj["speedup"] = 1.0
            obj["same_output_as_vanilla"] = True
        stdout.write(json.dumps(obj) + "\n")
        return 0

    from tabulate import tabulate

    is_tty = getattr(stdout, "isatty", lambda: False)()
    color = a.color == "always" or (a.color == "auto" and is_tty and not os.environ.get("NO_COLOR"))
    if a.echo:
        stdout.write(f"{_DIM}{text}{_RESET}" if color else text)
    stdout.write(_render(tok, out_ids, mask, color))
    stdout.write("\n\n")
    headers = ["method", "backend", "tokens", "tau", "tokens/s", "TTFT (ms)"]
    table = [[r["method"], r["backend"], r["tokens"], f"{r['tau']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['ttft_ms']:.1f}"] for r in rows]
    stdout.write(tabulate(table, headers=headers, tablefmt="simple") + "\n")
    if "tree_shape" in rows[0] and "auto" in (a.tree_shape, a.gamma):
        what = "gamma" if a.gamma == "auto" else "tree shape"
        shape = rows[0]["tree_shape"]
        chosen = str(len(shape)) if a.gamma == "auto" else ",".join(map(str, shape))
        stdout.write(f"{what} (auto, chosen for this device): {chosen}\n")
    if "draft_tree_capacity" in rows[0] and a.draft_tree_capacity == "auto":
        stdout.write(f"draft tree capacity (auto, chosen for this device): {rows[0]['draft_tree_capacity']}\n")
    if speedup is not None:
        stdout.write(f"speedup over vanilla: {speedup:.2f}x ({backend}, {device}, {dtype_name})\n")
    if same is not None:
        stdout.write(f"same output as vanilla: {_same_output_note(same, a)}\n")
    if color:
        stdout.write(f"{_GREEN}green{_RESET}: draft tokens the target accepted ({rows[0]['accepted_drafts']} of {rows[0]['tokens']})\n")
    return 0


def _same_output_note(same: bool, a) -> str:
    """``--compare``'s last line: whether the method's tokens are vanilla's, and why they may differ -- rejection
    sampling draws its own tokens (same distribution); greedy and keyed sampling must give vanilla's tokens."""
    if same:
        return "yes"
    if a.temperature > 0 and a.sampling != "keyed":
        return ("no (rejection sampling draws its own tokens from the same distribution; --sampling keyed gives "
                "vanilla's tokens)")
    return "NO -- greedy and keyed decoding must reproduce vanilla's tokens: please report this prompt"


register_subcommand("generate", _add_generate_args, run_generate, help="generate a completion with a speculative decoder")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="specdec", description="Speculative decoding for Llama/Qwen2 LLMs (embedded default: a small Python-code model).")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, sc in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=sc.help, description=sc.help)
        sc.add_args(sp)
        sp.set_defaults(_subcommand=name)
    return p


def _version() -> str:
    try:
        from specdec import __version__

        return f"specdec {__version__}"
    except Exception:
        return "specdec"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specdec`` console script; returns the exit code (0 ok, 2 user error)."""
    _load_plugins()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if not getattr(args, "_subcommand", None):
            parser.print_help(sys.stderr)
            return 2
        rc = SUBCOMMANDS[args._subcommand].run(args)
        return int(rc or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line
        print(msg if getattr(e, "formatted", False) else f"specdec: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a failure inside the library: still one line, unless SPECDEC_DEBUG is set
        if os.environ.get("SPECDEC_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:400] or "(no message)"
        print(f"specdec: internal error: {type(e).__name__}: {msg} (set SPECDEC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
