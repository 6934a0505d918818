"""The embedded default model (shared/assets/default): loads with specdec and with transformers to the
same logits, its tokenizer round-trips code, it is trained (low loss on held-out stdlib code), and the
shipped artifacts stay within the size budget."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import specdec.ref as R
from specdec.shared.assets import ASSETS_DIR, resolve_model_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<layer>/ -> the repository
DEFAULT = os.path.join(ASSETS_DIR, "default")

FALLBACK_SNIPPET = '''"""A small held-out style snippet (used when no held-out stdlib file is readable)."""
import os


def walk_sizes(root):
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                continue
    return total
'''


def _corpus_module():
    spec = importlib.util.spec_from_file_location("default_corpus", os.path.join(ROOT, "scripts", "default_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def heldout_texts(n: int = 3) -> list[str]:
    """The first ``n`` readable held-out stdlib files of this interpreter (same rule as the training split)."""
    try:
        corpus = _corpus_module()
        root = corpus.stdlib_root()
        out = []
        for rel in corpus.list_corpus(root):
            if corpus.is_heldout(rel):
                text = corpus.read_text(os.path.join(root, rel))
                if text and len(text) > 2000:
                    out.append(text)
            if len(out) >= n:
                break
        return out or [FALLBACK_SNIPPET]
    except Exception:
        return [FALLBACK_SNIPPET]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    from specdec.shared.tokenizer import load_tokenizer

    return load_tokenizer("default")


def test_embedded_names_resolve():
    for name, sub in (("default", "target"), ("default-draft", "draft"), ("default-glide", "glide")):
        path = resolve_model_path(name)
        assert os.path.isdir(path) and path.endswith(os.path.join("default", sub))
        assert os.path.isfile(os.path.join(path, "model.safetensors"))
        assert os.path.isfile(os.path.join(path, "config.json"))


def test_artifacts_within_budget():
    total = 0
    for dirpath, _, files in os.walk(DEFAULT):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    assert total <= 24 * 2**20, f"shipped default artifacts are {total / 2**20:.2f} MiB > 24 MiB"
    assert not any(f.endswith((".bin", ".pt", ".pth")) for _, _, fs in os.walk(DEFAULT) for f in fs)


def test_config_shapes_and_eos(tok):
    cfg = json.load(open(os.path.join(DEFAULT, "target", "config.json")))
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] >= 12
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["tie_word_embeddings"] is True
    gen = json.load(open(os.path.join(DEFAULT, "target", "generation_config.json")))
    assert gen["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert tok.bos_token == "<s>" and tok.pad_token == "<pad>"
    draft = json.load(open(os.path.join(DEFAULT, "draft", "config.json")))
    assert draft["vocab_size"] == cfg["vocab_size"] and draft["num_hidden_layers"] < cfg["num_hidden_layers"]


def test_specdec_and_transformers_logits_match(tok):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("default")
    ids = torch.tensor([tok(heldout_texts(1)[0])["input_ids"][:256]])
    ref_model = R.load_model("default", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        ours = R.forward(ref_model, ids)
        theirs = hf(input_ids=ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    # fp32 through 14 layers, two attention implementations: ~1e-5 of the logits' scale (|logit| ~ 20 here)
    bound = 2e-5 * max(1.0, theirs.abs().max().item())
    assert diff <= bound, f"max |logit diff| = {diff} > {bound}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # The model is trained: held-out next-token loss well under uniform (ln 4096 = 8.3 nats).
    loss = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:]).item()
    assert loss < 3.5, f"held-out loss {loss:.2f} nats/token: the shipped target looks untrained"


def test_draft_and_glide_load():
    target = R.load_model("default")
    draft = R.load_model("default-draft")
    assert draft.config.vocab_size == target.config.vocab_size
    glide = R.load_glide(resolve_model_path("default-glide"), target)
    assert glide.config.hidden_size == target.config.hidden_size


def test_tokenizer_round_trips_code(tok):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    samples = heldout_texts(3) + [FALLBACK_SNIPPET, "\tif x:\n\t\treturn 'é ü ∑ 🙂'  # tabs, unicode\r\n", "    \n\n  trailing   "]
    for text in samples:
        for t in (tok, hf_tok):
            ids = t(text)["input_ids"]
            assert ids[0] == t.bos_token_id and t.bos_token_id not in ids[1:]
            assert t.decode(ids, skip_special_tokens=True) == text
    # Byte-level BPE compresses code: > 2.5 bytes per token on real stdlib source.
    text = heldout_texts(1)[0]
    assert len(text.encode()) / len(tok(text)["input_ids"]) > 2.5
