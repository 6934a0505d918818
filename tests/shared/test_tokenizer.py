"""Tokenizers and chat templates (shared/tokenizer.py), with tiny locally trained tokenizers."""

from __future__ import annotations

import os

import pytest

import specdec.shared.assets as assets
from helpers import CHAT_SPECIAL_TOKENS, make_tiny_tokenizer_dir
from specdec.shared.tokenizer import (
    FAMILIES,
    QWEN2_SYSTEM,
    VICUNA_SYSTEM,
    builtin_template,
    encode_prompt,
    format_prompt,
    guess_family,
    load_tokenizer,
)

SIMPLE_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('system role not supported') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"), name="plain")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    return load_tokenizer(make_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"), name="chat", chat_template=SIMPLE_TEMPLATE, specials=CHAT_SPECIAL_TOKENS))


def test_load_and_roundtrip(tok):
    text = "def add(a, b): return a + b"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text)  # BPE merged something
    assert tok.decode(ids) == text
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"


def test_load_default_resolves_embedded_name(monkeypatch, tok_dir):
    monkeypatch.setattr(assets, "ASSETS_DIR", os.path.dirname(tok_dir))
    monkeypatch.setitem(assets.EMBEDDED_MODELS, "default", os.path.basename(tok_dir))
    t = load_tokenizer("default")
    assert t.decode(t("hello world", add_special_tokens=False)["input_ids"]) == "hello world"


def test_load_errors(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="tokenizer directory .* does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no tokenizer files in"):
        load_tokenizer(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ this is not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ValueError, match="could not load the tokenizer in"):
        load_tokenizer(str(broken))


def test_chat_template_is_used(chat_tok):
    assert format_prompt(chat_tok, "hi") == "<user>hi</user><assistant>"
    assert format_prompt(chat_tok, "hi", system="be brief") == "<system>be brief</system><user>hi</user><assistant>"


def test_chat_template_without_system_role_folds_system(tmp_path):
    t = load_tokenizer(make_tiny_tokenizer_dir(tmp_path, chat_template=NO_SYSTEM_TEMPLATE))
    assert format_prompt(t, "hi") == "[user] hi\n[assistant]"
    assert format_prompt(t, "hi", system="be brief") == "[user] be brief\n\nhi\n[assistant]"


def test_explicit_family_overrides_chat_template(chat_tok):
    assert format_prompt(chat_tok, "hi", family="llama2") == "[INST] hi [/INST]"


def test_builtin_templates_exact():
    assert format_prompt(None, "hi", family="vicuna") == f"{VICUNA_SYSTEM} USER: hi ASSISTANT:"
    assert VICUNA_SYSTEM.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert format_prompt(None, "hi", system="Be terse.", family="vicuna") == "Be terse. USER: hi ASSISTANT:"
    assert format_prompt(None, "hi", system="", family="vicuna") == "USER: hi ASSISTANT:"
    assert format_prompt(None, "hi", family="llama2") == "[INST] hi [/INST]"
    assert format_prompt(None, "hi", system="Be terse.", family="llama2") == "[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nhi [/INST]"
    assert format_prompt(None, "hi", family="llama3") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert format_prompt(None, "hi", system="Be terse.", family="llama3") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert format_prompt(None, "hi", family="qwen2") == (
        f"<|im_start|>system\n{QWEN2_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt(None, "hi", system="Be terse.", family="qwen2") == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt(None, "hi", family="raw") == "hi"
    assert format_prompt(None, "hi", system="Be terse.", family="RAW") == "Be terse.\n\nhi"
    assert set(FAMILIES) == {"vicuna", "llama2", "llama3", "qwen2", "raw"}


def test_family_guessed_without_chat_template(tmp_path, tok):
    assert guess_family(tok) == "raw"
    assert format_prompt(tok, "hi") == "hi"
    qwen_like = load_tokenizer(make_tiny_tokenizer_dir(tmp_path, name="q", specials=["<|im_start|>", "<|im_end|>"]))
    assert guess_family(qwen_like) == "qwen2"
    assert format_prompt(qwen_like, "hi") == builtin_template("qwen2", "hi")
    llama3_like = load_tokenizer(make_tiny_tokenizer_dir(tmp_path, name="l3", specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]))
    assert guess_family(llama3_like) == "llama3"
    vic = load_tokenizer(make_tiny_tokenizer_dir(tmp_path, name="vicuna-7b-v1.5"))
    assert guess_family(vic) == "vicuna" and format_prompt(vic, "hi").endswith("USER: hi ASSISTANT:")
    l2 = load_tokenizer(make_tiny_tokenizer_dir(tmp_path, name="Llama-2-7b-chat-hf"))
    assert guess_family(l2) == "llama2"


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="unknown prompt family 'mistral'"):
        format_prompt(tok, "hi", family="mistral")
    with pytest.raises(ValueError, match="unknown prompt family"):
        builtin_template("chatml", "hi")
    with pytest.raises(ValueError, match="needs a tokenizer or an explicit family"):
        format_prompt(None, "hi")
    with pytest.raises(TypeError, match="user_message must be a str"):
        format_prompt(tok, ["hi"])
    with pytest.raises(TypeError, match="system must be a str or None"):
        format_prompt(tok, "hi", system=3)
    with pytest.raises(TypeError, match="text must be a str"):
        encode_prompt(tok, 5)


def test_encode_prompt_adds_bos_once(chat_tok):
    bos = chat_tok.bos_token_id
    plain = encode_prompt(chat_tok, "hello world")
    assert plain[0] == bos and plain.count(bos) == 1
    assert plain[1:] == chat_tok("hello world", add_special_tokens=False)["input_ids"]
    already = encode_prompt(chat_tok, "<s>hello world")
    assert already.count(bos) == 1 and already[0] == bos


def test_encode_prompt_special_tokens_are_single_ids(chat_tok):
    text = format_prompt(None, "hello", family="qwen2")
    ids = encode_prompt(chat_tok, text)
    assert ids.count(chat_tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(chat_tok.convert_tokens_to_ids("<|im_end|>")) == 2
    assert chat_tok.decode(ids, skip_special_tokens=False).replace("<s>", "", 1) == text
