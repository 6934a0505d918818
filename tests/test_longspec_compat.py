"""Seed 000's usage example through LlamaGlide / Qwen2Glide on tiny saved checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model_dir, make_tiny_tokenizer_dir

from specdec.ref import LlamaGlide, Qwen2Glide, load_model
from specdec.shared.glide import init_glide_weights, save_glide


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("longspec")
    tok_dir = make_tiny_tokenizer_dir(root, vocab_size=200)
    dirs = {}
    for family in ("llama", "qwen2"):
        target_dir = make_tiny_model_dir(root, family=family, vocab=256, seed=3)
        target = load_model(target_dir)
        glide_dir = save_glide(init_glide_weights(target.config, seed=4, std=0.3), root / f"glide-{family}")
        dirs[family] = (target_dir, str(glide_dir))
    return tok_dir, dirs


@pytest.mark.parametrize("cls", [LlamaGlide, Qwen2Glide])
def test_seed_000_usage_example(tiny_dirs, cls):
    from transformers import AutoConfig, AutoTokenizer

    tok_dir, dirs = tiny_dirs
    target_path, glide_path = dirs[cls.model_type]
    # --- seed 000's example, local paths (and no .cuda() on this CPU-only box) ---
    config = AutoConfig.from_pretrained(target_path)
    model = cls(config, target_path, glide_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)

    prompt = "Summarize the following document: the quick brown fox jumps over the lazy dog"
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids

    output_ids, count, num, elapsed, mask = model.tree_spec_generate(
        input_ids=input_ids,
        prompt_length=input_ids.shape[1],
        tree_shape=[4, 16, 16, 16, 16],
        max_gen_len=24,
        temperature=0.0,
    )
    text = tokenizer.decode(output_ids[0], skip_special_tokens=True)
    throughput = num / elapsed
    print(f"Generated {num} tokens at {throughput:.1f} tok/s")
    print(f"Acceptance rate: {count}/{num} = {count/num:.2%}")

    output_ids2, count2, num2, elapsed2, mask2 = model.spec_generate(
        input_ids=input_ids,
        prompt_length=input_ids.shape[1],
        gamma=4,
        max_gen_len=24,
    )
    # --- end of the example ---
    assert isinstance(text, str)
    van_ids, num_tokens, van_time = model.vanilla_generate(input_ids, prompt_length=input_ids.shape[1], max_gen_len=24)
    assert output_ids.tolist() == van_ids.tolist() == output_ids2.tolist()
    assert num_tokens == van_ids.shape[1] == 24
    assert count == int(mask.sum()) and mask.dtype == torch.bool and mask.shape == output_ids.shape
    assert van_time >= 0 and elapsed >= 0

    # LongSpec's scripts pass prompt_length as a one-element tensor (attention_mask.sum(-1)), and
    # right-padded input_ids.
    padded = torch.cat([input_ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    out3 = model.tree_spec_generate(padded, prompt_length=torch.tensor([input_ids.shape[1]]), max_gen_len=24)[0]
    assert out3.tolist() == output_ids.tolist()
    out4 = model.magicdec_generate(input_ids, prompt_length=input_ids.shape[1], max_gen_len=24)[0]
    assert out4.tolist() == output_ids.tolist()


def test_config_as_path_and_checks(tiny_dirs):
    _, dirs = tiny_dirs
    target_path, glide_path = dirs["llama"]
    model = LlamaGlide(target_path, target_path, glide_path)
    assert model.target.config.model_type == "llama" and "LlamaGlide" in repr(model)
    with pytest.raises(ValueError, match="needs a 'qwen2' target"):
        Qwen2Glide(target_path, target_path, glide_path)
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaGlide({"vocab_size": 1000}, target_path, glide_path)
    with pytest.raises(ValueError, match="GLIDE"):
        # a glide made for the qwen2 target has the same sizes -> loads; a target dir is not a glide
        LlamaGlide(None, target_path, target_path)
