"""``specdec draft-vocab``: builds the N most frequent target tokens of a corpus / a prompt set / the target's
greedy continuations into a copy of the GLIDE checkpoint, which loads with its map and decodes losslessly;
bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.cli import main
from specdec.draft_vocab import count_tokens


def test_draft_vocab_from_text_and_prompts_loads_and_decodes_like_vanilla(tmp_path, capsys):
    import specdec.ref as ref
    from specdec.shared.assets import resolve_model_path
    from specdec.shared.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 20)
    out = tmp_path / "g"
    assert main(["draft-vocab", "--size", "64", "--text", str(corpus), "--prompts", "stdlib_code", "--begin", "70",
                 "--output", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == 64 and 0 < info["coverage"] <= 1 and (out / "draft_vocab.json").is_file()
    assert not (out / "acceptance.json").exists()  # the source's statistics were measured with the full vocabulary
    target = ref.load_model("default")
    glide = ref.load_glide(out, target)
    # the map is the 64 most frequent ids of exactly those sources, sorted
    tok = load_tokenizer(resolve_model_path("default"))
    from specdec.draft_vocab import read_prompt_set
    from specdec.shared.tokenizer import encode_prompt

    lists = [tok(corpus.read_text(), add_special_tokens=False)["input_ids"]]
    lists += [encode_prompt(tok, p) for p in read_prompt_set("stdlib_code", 70, None)]
    counts = count_tokens(lists, target.config.vocab_size)
    assert glide.vocab_map.tolist() == sorted(torch.sort(-counts, stable=True).indices[:64].tolist())
    ids = torch.tensor([encode_prompt(tok, "def list_files(root):\n")])
    want = ref.vanilla_generate(target, ids, ids.shape[1], max_gen_len=16).tolist()
    assert ref.tree_spec_generate(target, glide, ids, ids.shape[1], tree_shape=(4, 8), max_gen_len=16).tolist() == want


def test_draft_vocab_from_generations(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["draft-vocab", "-n", "32", "--prompts", "stdlib_code", "--begin", "77", "--end", "79", "--generate",
                 "--max-new-tokens", "8", "--output", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 0 < info["tokens_counted"] <= 16 and info["source"]["generate"] is True


@pytest.mark.parametrize("args,msg", [
    (["--size", "0", "--prompts", "stdlib_code"], "--size must be >= 1"),
    (["--size", "4097", "--prompts", "stdlib_code"], r"--size must be in [1, 4096]"),
    (["--size", "8", "--text", "/no/such/file.txt"], "--text: no such file"),
    (["--size", "8", "--prompts", "/no/such/set.jsonl"], "--prompts: no such file"),
    (["--size", "8"], "nothing to count"),
    (["--size", "8", "--text", "README.md", "--generate"], "--generate needs --prompts"),
    (["--size", "8", "--prompts", "stdlib_code", "--glide", "/no/such/glide"], "--glide: no such checkpoint"),
])
def test_draft_vocab_bad_input_is_one_line_exit_2(tmp_path, capsys, args, msg):
    assert main(["draft-vocab", *args, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err
    assert not (tmp_path / "x").exists()
