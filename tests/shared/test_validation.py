"""Bad input is rejected early with a clear ValueError / TypeError that names the problem."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from helpers import make_tiny_model_dir
from specdec.ref import forward, load_model, vanilla_generate
from specdec.shared.config import ModelConfig, load_config
from specdec.shared.result import GenerationResult, finalize_output, normalize_eos
from specdec.shared.validate import check_batch_one, check_generator, check_positive_int, check_prompt, check_same_vocab
from specdec.shared.weights import model_from_hf, resolve_device, resolve_dtype

VOCAB = 96
MAX_POS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("valid"), family="llama", vocab=VOCAB, max_pos=MAX_POS, eos=2)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture
def copy_dir(model_dir, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(model_dir, dst)
    return str(dst)


def _edit_config(path, **changes):
    f = os.path.join(path, "config.json")
    with open(f) as fh:
        cfg = json.load(fh)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(f, "w") as fh:
        json.dump(cfg, fh)


PROMPT = torch.arange(10, 18)[None]  # [1, 8]


# ---------------------------------------------------------------------------------------------
# vanilla_generate arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long), prompt_length=0), ValueError, "empty prompt"),
        (dict(input_ids=torch.zeros(0, 4, dtype=torch.long), prompt_length=1), ValueError, "empty prompt"),
        (dict(input_ids=[], prompt_length=0), ValueError, "empty prompt"),
        (dict(prompt_length=0), ValueError, r"prompt_length must be in \[1, 8\]"),
        (dict(prompt_length=9), ValueError, r"prompt_length must be in \[1, 8\]"),
        (dict(prompt_length=-3), ValueError, r"prompt_length must be in \[1, 8\]"),
        (dict(prompt_length=4.0), TypeError, "prompt_length must be an int"),
        (dict(prompt_length=True), TypeError, "prompt_length must be an int"),
        (dict(max_gen_len=MAX_POS - 7), ValueError, "exceeds the model's context of 64"),
        (dict(max_gen_len=0), ValueError, "max_gen_len must be >= 1"),
        (dict(max_gen_len=2.5), TypeError, "max_gen_len must be an int"),
        (dict(temperature=-0.5), ValueError, "temperature must be >= 0"),
        (dict(temperature=1.0, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.2), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(input_ids=PROMPT.float()), TypeError, "integer token ids"),
        (dict(input_ids=PROMPT[None]), ValueError, r"input_ids must be \[B, T\]"),
        (dict(input_ids="hello"), TypeError, "input_ids must be a tensor"),
        (dict(input_ids=PROMPT + 90), ValueError, r"token ids must be in \[0, 95\]"),
        (dict(input_ids=PROMPT - 20), ValueError, r"token ids must be in \[0, 95\]"),
        (dict(eos_id="2"), TypeError, "eos_id must be an int, a list of ints, or None"),
        (dict(eos_id=[2.5]), TypeError, "eos_id must be an int, a list of ints, or None"),
    ],
)
def test_vanilla_generate_rejects(model, kwargs, err, match):
    args = dict(input_ids=PROMPT, prompt_length=8, max_gen_len=4)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        vanilla_generate(model, **args)


def test_context_limit_is_inclusive(model):
    """prompt_length + max_gen_len == max_position_embeddings is allowed; one more is not."""
    res = vanilla_generate(model, PROMPT, 8, max_gen_len=MAX_POS - 8, eos_id=[])
    assert res.output_ids.shape == (1, MAX_POS - 8)
    with pytest.raises(ValueError, match="8 \\+ 57 exceeds"):
        vanilla_generate(model, PROMPT, 8, max_gen_len=MAX_POS - 7)


def test_accepts_1d_and_list_prompts(model):
    a = vanilla_generate(model, PROMPT, 8, max_gen_len=3, eos_id=[]).output_ids
    assert torch.equal(vanilla_generate(model, PROMPT[0], 8, max_gen_len=3, eos_id=[]).output_ids, a)
    assert torch.equal(vanilla_generate(model, PROMPT[0].tolist(), 8, max_gen_len=3, eos_id=[]).output_ids, a)
    assert torch.equal(vanilla_generate(model, PROMPT.int(), 8, max_gen_len=3, eos_id=torch.tensor([])).output_ids, a)


def test_forward_rejects_1d(model):
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        forward(model, PROMPT[0])


# ---------------------------------------------------------------------------------------------
# Checkpoints and configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "mistral", "qwen3", None])
def test_unsupported_architecture(copy_dir, model_type):
    _edit_config(copy_dir, model_type=model_type)
    with pytest.raises(ValueError, match=f"unsupported architecture: model_type={model_type!r}"):
        load_model(copy_dir)


def test_missing_weight_tensor(copy_dir):
    from safetensors.torch import load_file, save_file

    f = os.path.join(copy_dir, "model.safetensors")
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['layers.1.mlp.up_proj.weight'\]"):
        load_model(copy_dir)


def test_missing_lm_head_when_untied(copy_dir):
    from safetensors.torch import load_file, save_file

    f = os.path.join(copy_dir, "model.safetensors")
    sd = load_file(f)
    del sd["lm_head.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['lm_head.weight'\]"):
        load_model(copy_dir)


@pytest.mark.parametrize("keep", [0, 5, 100, "half", "minus10"])
def test_corrupt_safetensors(copy_dir, keep):
    f = os.path.join(copy_dir, "model.safetensors")
    size = os.path.getsize(f)
    n = {"half": size // 2, "minus10": size - 10}.get(keep, keep)
    with open(f, "rb") as fh:
        data = fh.read()
    with open(f, "wb") as fh:
        fh.write(data[:n])
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt or unreadable safetensors file"):
        load_model(copy_dir)


def test_shape_mismatch_names_file_and_tensor(copy_dir):
    from safetensors.torch import load_file, save_file

    f = os.path.join(copy_dir, "model.safetensors")
    sd = load_file(f)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, sd["model.layers.0.self_attn.k_proj.weight"].shape[1])
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(3, 32\)"):
        load_model(copy_dir)


def test_config_does_not_match_weights(copy_dir):
    _edit_config(copy_dir, intermediate_size=48)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"):
        load_model(copy_dir)


def test_missing_config_json(copy_dir):
    os.remove(os.path.join(copy_dir, "config.json"))
    with pytest.raises(ValueError, match="no config.json found"):
        load_model(copy_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="no config.json found"):
        load_model(str(tmp_path / "nope"))


def test_invalid_json_config(copy_dir):
    with open(os.path.join(copy_dir, "config.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(copy_dir)


def test_no_weight_files(copy_dir):
    os.remove(os.path.join(copy_dir, "model.safetensors"))
    with pytest.raises(ValueError, match="no weights found"):
        load_model(copy_dir)


def test_missing_shard(tmp_path):
    path = make_tiny_model_dir(tmp_path, shard="20KB")
    shards = sorted(f for f in os.listdir(path) if f.startswith("model-0"))
    assert len(shards) >= 3
    os.remove(os.path.join(path, shards[1]))
    with pytest.raises(ValueError, match=f"names shard '{shards[1]}', which is missing"):
        load_model(path)


def test_corrupt_bin(tmp_path):
    path = make_tiny_model_dir(tmp_path, fmt="bin")
    f = os.path.join(path, "pytorch_model.bin")
    with open(f, "rb") as fh:
        data = fh.read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: corrupt or unreadable \.bin checkpoint"):
        load_model(path)


def test_missing_required_config_keys(copy_dir):
    _edit_config(copy_dir, hidden_size=None)
    with pytest.raises(ValueError, match=r"config.json is missing required keys \['hidden_size'\]"):
        load_model(copy_dir)


def _cfg(**kw):
    d = dict(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8)
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads=3"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "unsupported rope_scaling type 'longrope'"),
        (dict(rope_scaling={"rope_type": "linear"}), "needs a 'factor'"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling of type 'llama3' needs"),
        (dict(vocab_size=0), "vocab_size must be >= 1"),
        (dict(head_dim=7), "head_dim must be even"),
    ],
)
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(_cfg(**kw))


def test_bad_dtype(model_dir):
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        resolve_dtype(torch.int32)
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(None) == torch.float32


def test_model_from_hf_rejects_non_models():
    with pytest.raises(TypeError, match="expected a transformers causal-LM model, got dict"):
        model_from_hf({})


def test_load_config_on_file_path(model_dir):
    assert load_config(os.path.join(model_dir, "config.json")).vocab_size == VOCAB


# ---------------------------------------------------------------------------------------------
# Shared validators and result helpers
# ---------------------------------------------------------------------------------------------


def test_check_helpers(model):
    c = model.config
    with pytest.raises(ValueError, match="supports batch size 1, got batch size 2"):
        check_batch_one(torch.zeros(2, 3, dtype=torch.long), "tree_spec_generate")
    other = ModelConfig(**{**c.to_dict(), "vocab_size": c.vocab_size + 1})
    with pytest.raises(ValueError, match="vocabulary mismatch: the target has 96 tokens, the draft model 97"):
        check_same_vocab(c, other)
    with pytest.raises(ValueError, match="gamma must be >= 1, got 0"):
        check_positive_int("gamma", 0)
    with pytest.raises(TypeError, match="gamma must be an int"):
        check_positive_int("gamma", True)
    p = check_prompt(PROMPT, 5, 4, c)
    assert p.shape == (1, 5) and p.dtype == torch.long


def test_normalize_eos_and_finalize():
    assert normalize_eos(None, [2, 3]) == [2, 3]
    assert normalize_eos(5, [2]) == [5] and normalize_eos([5, 6], [2]) == [5, 6] and normalize_eos([], [2]) == []
    assert normalize_eos(torch.tensor(7), []) == [7] and normalize_eos(torch.tensor([7, 8]), []) == [7, 8]
    with pytest.raises(TypeError, match="eos_id must be an int"):
        normalize_eos(True, [])
    assert finalize_output([1, 2, 3, 4], [False, True, True, False], [3], 10) == ([1, 2, 3], [False, True, True])
    assert finalize_output([1, 2, 3, 4], [False] * 4, [9], 2) == ([1, 2], [False, False])
    assert finalize_output([3, 2], [False, False], [2, 3], 5) == ([3], [False])  # first eos in position wins


def test_generation_result_unpacks_like_seed():
    out = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[False, True, True, False]])
    res = GenerationResult(out, 2, 2, 0.5, mask, prefill_time=0.1, accept_lengths=[1, 3])
    output_ids, count, num, elapsed, spec_mask = res
    assert output_ids is out and count == 2 and num == 2 and elapsed == 0.5 and spec_mask is mask
    assert len(res) == 5 and res[1] == 2 and res.tau == 2.0 and res.num_tokens == 4 and res.tolist() == [5, 6, 7, 8]
    assert res.tokens_per_second == pytest.approx(6.0) and res.prefill_time == 0.1


# ---------------------------------------------------------------------------------------------
# New-user review: every bad argument gets one clear error, on the ref and the fast decoders alike
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoders():
    """(name, call(**kw)) for ref and fast plain and speculative decoding on one tiny model (head_dim 64,
    as the fast path needs; vocabulary VOCAB, context MAX_POS). The checks run before any kernel does."""
    import specdec.fast as fast
    import specdec.ref as ref
    from lossless import tiny_model

    m = tiny_model("llama", vocab=VOCAB, layers=1, hidden=128, heads=2, kv_heads=1, max_pos=MAX_POS)
    fm = fast.as_fast_model(m)
    return [
        ("ref.vanilla", lambda **kw: ref.vanilla_generate(m, **kw)),
        ("fast.vanilla", lambda **kw: fast.vanilla_generate(fm, **kw)),
        ("ref.speculative", lambda **kw: ref.speculative_generate(m, m, gamma=2, **kw)),
        ("fast.speculative", lambda **kw: fast.speculative_generate(fm, fm, gamma=2, **kw)),
    ]


def _call_all(decoders, err, match, **kwargs):
    args = dict(input_ids=PROMPT, prompt_length=8, max_gen_len=2)
    args.update(kwargs)
    for name, call in decoders:
        with pytest.raises(err, match=match):
            call(**args)
            pytest.fail(f"{name} accepted {kwargs}")


@pytest.mark.parametrize(
    "prompt_length,err,match",
    [
        (torch.tensor([5.0]), TypeError, r"prompt_length must be an int or a 0-d / one-element integer tensor, got a torch.float32 tensor"),
        (torch.tensor([5, 5]), ValueError, r"prompt_length must be an int or a 0-d / one-element integer tensor, got a tensor of shape \(2,\)"),
        (torch.tensor([True]), TypeError, r"prompt_length must be .* got a torch.bool tensor"),
        (torch.tensor([9]), ValueError, r"prompt_length must be in \[1, 8\]"),
        ("8", TypeError, r"prompt_length must be an int .* got str"),
    ],
)
def test_prompt_length_tensor_rejects(decoders, prompt_length, err, match):
    _call_all(decoders, err, match, prompt_length=prompt_length)


def test_prompt_length_tensor_accepted(model):
    """A 0-d or one-element integer tensor (LongSpec's ``attention_mask.sum(-1)``) is the int it holds."""
    import numpy as np

    want = vanilla_generate(model, PROMPT, 5, max_gen_len=2, eos_id=[]).output_ids
    mask = torch.ones(1, 5, dtype=torch.long)
    for pl in (torch.tensor(5), torch.tensor([5]), torch.tensor([[5]], dtype=torch.int32), mask.sum(-1), np.int64(5)):
        assert torch.equal(vanilla_generate(model, PROMPT, pl, max_gen_len=2, eos_id=[]).output_ids, want), pl
    assert check_prompt(PROMPT, torch.tensor([5]), 4, model.config).shape == (1, 5)  # the one rule, fast path too


@pytest.mark.parametrize("generator", [42, "seed", torch.tensor(0)])
def test_generator_must_be_a_generator(decoders, generator):
    _call_all(decoders, TypeError, r"generator must be a torch.Generator or None, got", generator=generator, temperature=1.0)


def test_generator_int_hint_and_any_device_ok(model):
    with pytest.raises(TypeError, match=r"got int \(to seed, pass torch.Generator\(\).manual_seed\(n\)\)"):
        check_generator(42)
    check_generator(None)
    check_generator(torch.Generator())  # a CPU generator may drive a CUDA model: draws happen where it lives
    a = vanilla_generate(model, PROMPT, 8, max_gen_len=3, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = vanilla_generate(model, PROMPT, 8, max_gen_len=3, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.output_ids, b.output_ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(model_dir):
    import specdec.fast as fast
    import specdec.ref as ref
    from helpers import make_hf_model

    msg = r"device='cuda' but CUDA is not available on this machine"
    for load in (ref.load_model, fast.load_model):
        with pytest.raises(ValueError, match=msg):
            load(model_dir, device="cuda")
        with pytest.raises(ValueError, match=r"device='cuda:1' but CUDA is not available"):
            load(model_dir, device=torch.device("cuda", 1))
    with pytest.raises(ValueError, match=msg):
        model_from_hf(make_hf_model("llama", vocab=VOCAB, layers=1), device="cuda")


def test_bad_device_string(model_dir):
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got 'gpu'"):
        load_model(model_dir, device="gpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=float("inf")), r"temperature must be finite and >= 0 \(0 = greedy\), got inf"),
        (dict(temperature=float("-inf")), r"temperature must be finite and >= 0"),
        (dict(temperature=float("nan")), r"temperature must be finite and >= 0 \(0 = greedy\), got nan"),
        (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\] \(1 = off\), got nan"),
        (dict(temperature=1.0, top_p=float("inf")), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_k=-2), r"top_k must be >= 0 \(0 = off\), got -2"),
    ],
)
def test_non_finite_sampling_args(decoders, kwargs, match):
    _call_all(decoders, ValueError, match, **kwargs)


def test_non_int_top_k(decoders):
    _call_all(decoders, TypeError, r"top_k must be an int, got float", temperature=1.0, top_k=2.0)


@pytest.mark.parametrize("eos_id,bad", [(99999, 99999), (-1, -1), (VOCAB, VOCAB), ([2, 150000], 150000), (torch.tensor([-3]), -3)])
def test_eos_id_outside_vocabulary(decoders, eos_id, bad):
    _call_all(decoders, ValueError, rf"eos_id must be in \[0, {VOCAB}\) \(the model's vocabulary\), got {bad}", eos_id=eos_id)


def test_normalize_eos_vocab_range():
    assert normalize_eos(95, [], vocab_size=96) == [95] and normalize_eos([], [], vocab_size=96) == []
    assert normalize_eos(None, [151645], vocab_size=96) == [151645]  # the model's own ids are not second-guessed
    with pytest.raises(ValueError, match=r"eos_id must be in \[0, 4096\)"):
        normalize_eos(99999, [], vocab_size=4096)
