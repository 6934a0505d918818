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
    # --- LongSpec's usage example, local paths (and no .cuda() on this CPU-only box) ---
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


def test_default_eos_outside_vocabulary_falls_back(tiny_dirs):
    """LongSpec's default eos_id=151645 on a 256-token model: the model's own EOS ids, with a warning;
    an explicit out-of-vocabulary eos_id is an error."""
    _, dirs = tiny_dirs
    target_path, glide_path = dirs["qwen2"]
    model = Qwen2Glide(None, target_path, glide_path)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with pytest.warns(UserWarning, match=r"default eos_id=151645 is outside this model's vocabulary of 256 tokens; "
                                         r"using the model's own EOS ids"):
        out = model.spec_generate(ids, 5, gamma=2, max_gen_len=4)[0]
    assert out.tolist() == model.spec_generate(ids, 5, gamma=2, max_gen_len=4, eos_id=None)[0].tolist()
    with pytest.warns(UserWarning, match="eos_id=151645"):
        model.vanilla_generate(ids, 5, max_gen_len=2)
    for eos in (151645, -1):
        for method in ("tree_spec_generate", "spec_generate", "magicdec_generate", "vanilla_generate"):
            with pytest.raises(ValueError, match=rf"eos_id must be in \[0, 256\) \(the model's vocabulary\), got {eos}"):
                getattr(model, method)(ids, 5, max_gen_len=2, eos_id=eos)


def test_default_eos_kept_when_in_vocabulary():
    from types import SimpleNamespace

    from specdec.shared.longspec import LONGSPEC_EOS, GlideModel

    qwen = SimpleNamespace(target=SimpleNamespace(config=SimpleNamespace(vocab_size=151936, eos_token_ids=[151643])))
    assert GlideModel._eos(qwen, LONGSPEC_EOS) == 151645 and type(GlideModel._eos(qwen, LONGSPEC_EOS)) is int
    assert GlideModel._eos(qwen, 7) == 7 and GlideModel._eos(qwen, None) is None


def test_fast_classes_same_eos_rules(tmp_path):
    import specdec.fast as fast

    target_dir = make_tiny_model_dir(tmp_path, family="llama", vocab=64, layers=1, heads=2, kv_heads=1, hidden=128, head_dim=64, seed=7)
    glide_dir = save_glide(init_glide_weights(load_model(target_dir).config, seed=8, std=0.3), tmp_path / "glide")
    model = fast.LlamaGlide(None, target_dir, str(glide_dir))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for method in ("tree_spec_generate", "spec_generate", "magicdec_generate", "vanilla_generate"):
        with pytest.raises(ValueError, match=r"eos_id must be in \[0, 64\) \(the model's vocabulary\), got 151645"):
            getattr(model, method)(ids, 5, max_gen_len=2, eos_id=151645)
    with pytest.warns(UserWarning, match="eos_id=151645 is outside this model's vocabulary of 64 tokens"):
        out, n, _ = model.vanilla_generate(ids, 5, max_gen_len=2)
    assert n == 2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_keyed_sampling_through_the_classes(tiny_dirs, family):
    """``sampling`` / ``seed`` / ``generator`` reach the decoders: with the same seed every method emits the
    class's keyed vanilla tokens (= the function decoder's); a generator's initial seed is the key; bad
    values raise the decoders' named errors."""
    import specdec.ref as ref

    _, dirs = tiny_dirs
    cls = {"llama": LlamaGlide, "qwen2": Qwen2Glide}[family]
    model = cls(None, *dirs[family])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 5, 6]])
    methods = {"tree_spec_generate": dict(tree_shape=[2, 2]), "spec_generate": dict(gamma=3),
               "magicdec_generate": dict(gamma=3, sink_tokens=1, window=4)}
    outputs = set()
    for seed, temperature in ((0, 1.0), (1, 0.7), (2, 1.0), (3, 0.7)):
        kw = dict(max_gen_len=8, eos_id=[], temperature=temperature, sampling="keyed", seed=seed)
        want, n, _ = model.vanilla_generate(ids, 9, **kw)
        assert n == 8 and torch.equal(want, ref.vanilla_generate(model.target, ids, 9, **kw).output_ids)
        for method, extra in methods.items():
            out = getattr(model, method)(ids, 9, **extra, **kw)
            assert len(out) == 5 and torch.equal(out[0], want), (method, seed)
        outputs.add(tuple(want[0].tolist()))
    assert len(outputs) > 1  # the seed matters
    # a generator's initial seed is the key; in rejection mode a seed seeds the draws
    kw = dict(max_gen_len=8, eos_id=[], temperature=1.0)
    keyed = model.spec_generate(ids, 9, gamma=3, sampling="keyed", seed=5, **kw)[0]
    assert torch.equal(model.spec_generate(ids, 9, gamma=3, sampling="keyed", generator=torch.Generator().manual_seed(5), **kw)[0], keyed)
    assert torch.equal(model.tree_spec_generate(ids, 9, tree_shape=[2], seed=9, **kw)[0],
                       model.tree_spec_generate(ids, 9, tree_shape=[2], generator=torch.Generator().manual_seed(9), **kw)[0])
    for method in ("tree_spec_generate", "spec_generate", "magicdec_generate", "vanilla_generate"):
        call = getattr(model, method)
        with pytest.raises(TypeError, match="seed"):
            call(ids, 9, max_gen_len=2, eos_id=[], temperature=1.0, sampling="keyed", seed="7")
        with pytest.raises(ValueError, match="seed"):
            call(ids, 9, max_gen_len=2, eos_id=[], temperature=1.0, sampling="keyed", seed=-1)
        with pytest.raises(ValueError, match="sampling"):
            call(ids, 9, max_gen_len=2, eos_id=[], temperature=1.0, sampling="gumbel")
        with pytest.raises(TypeError, match="generator"):
            call(ids, 9, max_gen_len=2, eos_id=[], temperature=1.0, generator=5)


def test_reference_classes_refuse_tensor_parallelism(tiny_dirs):
    target_dir, glide_dir = tiny_dirs[1]["llama"]
    with pytest.raises(ValueError, match=r"tp needs the fast path \(specdec.fast.LlamaGlide\)"):
        LlamaGlide(None, target_dir, glide_dir, tp=object())   # refused before anything is loaded
