"""The reference model against transformers: logits (fp32) and greedy decoding.

Ground truth for the architecture is ``transformers``' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``:
tiny random models (see ``helpers.make_tiny_model_dir``) are saved with ``save_pretrained``,
reloaded through ``specdec.ref.load_model`` and compared.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from helpers import make_hf_model, make_tiny_model_dir, save_hf_model
from specdec.ref import forward, forward_step, load_model, vanilla_generate
from specdec.ref.model import causal_mask, new_cache
from specdec.shared.config import ModelConfig, load_config
from specdec.shared.weights import list_checkpoint_files, model_from_hf

ATOL = 1e-4
VOCAB = 96


def _ids(b: int, t: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Logits: ref == transformers in fp32
# ---------------------------------------------------------------------------------------------

ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    # max_pos=16 and T=24 below: the sequence outgrows the context, so the dynamic branch runs
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
}

CASES = {
    # name: (family, make_tiny_model_dir kwargs)
    "llama-gqa1": ("llama", dict(heads=4, kv_heads=4)),
    "llama-gqa2": ("llama", dict(heads=4, kv_heads=2)),
    "llama-gqa4": ("llama", dict(heads=4, kv_heads=1)),
    "qwen2-gqa1": ("qwen2", dict(heads=4, kv_heads=4)),
    "qwen2-gqa2": ("qwen2", dict(heads=4, kv_heads=2)),
    "qwen2-gqa4": ("qwen2", dict(heads=8, kv_heads=2)),
    "llama-tied": ("llama", dict(tie=True)),
    "qwen2-tied": ("qwen2", dict(tie=True, kv_heads=1)),
    "llama-bias": ("llama", dict(bias=True)),  # attention_bias: q/k/v AND o_proj biases
    "llama-mlp-bias": ("llama", dict(mlp_bias=True)),
    "llama-theta5e5": ("llama", dict(rope_theta=500000.0)),
    # head_dim given explicitly and != hidden_size // heads
    "llama-headdim": ("llama", dict(hidden=40, head_dim=16, heads=2, kv_heads=1)),
    "llama-3layers-eps": ("llama", dict(layers=3, rms_norm_eps=1e-5)),
    **{f"llama-rope-{k}": ("llama", dict(rope_scaling=v, max_pos=16)) for k, v in ROPE.items()},
    **{f"qwen2-rope-{k}": ("qwen2", dict(rope_scaling=v, max_pos=16)) for k, v in ROPE.items()},
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    family, kw = CASES[case]
    path, hf = make_tiny_model_dir(tmp_path, family=family, vocab=VOCAB, return_model=True, **kw)
    model = load_model(path)
    assert model.config.model_type == family
    ids = _ids(2, 24)
    expected = _hf_logits(hf, ids)
    got = forward(model, ids)
    assert got.dtype == torch.float32
    assert _max_diff(got, expected) <= ATOL
    # the logits are not flat: a wrong model could not match by accident
    assert expected.std() > 0.5


@pytest.mark.parametrize("rope", list(ROPE))
def test_rope_scaling_changes_logits(tmp_path, rope):
    """The scaling tests above are meaningful: dropping the scaling changes the logits."""
    path, hf = make_tiny_model_dir(tmp_path, family="llama", rope_scaling=ROPE[rope], max_pos=16, return_model=True)
    model = load_model(path)
    assert model.config.rope_type == rope
    plain = copy.copy(model)
    plain.config = ModelConfig(**{**model.config.to_dict(), "rope_scaling": None})
    ids = _ids(1, 24)
    assert _max_diff(forward(plain, ids), _hf_logits(hf, ids)) > 1e-3


def test_dynamic_rope_short_sequence_is_default(tmp_path):
    """Dynamic NTK only kicks in past max_position_embeddings: short inputs use plain RoPE."""
    path, hf = make_tiny_model_dir(tmp_path, family="llama", rope_scaling=ROPE["dynamic"], max_pos=16, return_model=True)
    model = load_model(path)
    ids = _ids(1, 12)
    plain = copy.copy(model)
    plain.config = ModelConfig(**{**model.config.to_dict(), "rope_scaling": None})
    assert _max_diff(forward(model, ids), _hf_logits(hf, ids)) <= ATOL
    assert _max_diff(forward(plain, ids), forward(model, ids)) <= 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sharded_checkpoint(tmp_path, family):
    path, hf = make_tiny_model_dir(tmp_path, family=family, shard="20KB", return_model=True)
    fmt, files = list_checkpoint_files(path)
    assert fmt == "safetensors" and len(files) >= 3
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert not os.path.isfile(os.path.join(path, "model.safetensors"))
    ids = _ids(2, 10)
    assert _max_diff(forward(load_model(path), ids), _hf_logits(hf, ids)) <= ATOL


@pytest.mark.parametrize("tie", [False, True])
def test_bin_fallback(tmp_path, tie):
    path, hf = make_tiny_model_dir(tmp_path, family="llama", fmt="bin", tie=tie, return_model=True)
    assert fmt_of(path) == "bin"
    ids = _ids(1, 10)
    assert _max_diff(forward(load_model(path), ids), _hf_logits(hf, ids)) <= ATOL


def fmt_of(path):
    return list_checkpoint_files(path)[0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_from_hf_in_memory(family):
    hf = make_hf_model(family, seed=3, tie=(family == "qwen2"))
    model = model_from_hf(hf)
    ids = _ids(2, 12, seed=1)
    assert _max_diff(forward(model, ids), _hf_logits(hf, ids)) <= ATOL
    # weights are copies: changing the HF model afterwards does not change ours
    before = forward(model, ids)
    with torch.no_grad():
        hf.model.norm.weight.mul_(2.0)
    assert torch.equal(forward(model, ids), before)


def test_tied_embeddings_share_tensor(tmp_path):
    model = load_model(make_tiny_model_dir(tmp_path, tie=True))
    assert model.config.tie_word_embeddings
    assert model.weights["lm_head.weight"] is model.weights["embed_tokens.weight"]
    untied = load_model(make_tiny_model_dir(tmp_path, tie=False))
    assert not torch.equal(untied.weights["lm_head.weight"], untied.weights["embed_tokens.weight"])


def test_load_dtype_and_low_precision_close(tmp_path):
    path, hf = make_tiny_model_dir(tmp_path, return_model=True)
    ids = _ids(1, 10)
    m16 = load_model(path, dtype="bf16")
    assert m16.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in m16.weights.values())
    got = forward(m16, ids)
    assert got.dtype == torch.float32  # logits come back in fp32
    assert _max_diff(got, _hf_logits(hf, ids)) < 0.5


def test_cached_steps_equal_full_forward(tmp_path):
    """Prefill + one-token steps over the KV cache give the same logits as one full forward."""
    model = load_model(make_tiny_model_dir(tmp_path, family="qwen2"))
    ids = _ids(2, 14)
    full = forward(model, ids)
    cache = new_cache(model, 2)
    parts = [forward_step(model, ids[:, :6], cache)]
    for t in range(6, 14):
        parts.append(forward_step(model, ids[:, t : t + 1], cache))
    assert cache.length == 14
    assert _max_diff(torch.cat(parts, dim=1), full) <= 1e-5
    # truncate rolls back: recomputing the last 4 tokens reproduces their logits
    cache.truncate(10)
    assert _max_diff(forward_step(model, ids[:, 10:], cache), full[:, 10:]) <= 1e-5


def test_causal_mask():
    m = causal_mask(2, 3)
    assert m.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True, True, True, True, True]]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_reads_gqa_headdim_rope_eos(tmp_path):
    rope = ROPE["llama3"]
    path = make_tiny_model_dir(tmp_path, family="llama", heads=8, kv_heads=2, hidden=48, head_dim=8, rope_scaling=rope,
                               rope_theta=500000.0, eos=[2, 7], bos=1, max_pos=64, generation_eos=[7, 9], tie=True,
                               rms_norm_eps=1e-5)
    c = load_config(path)
    assert (c.model_type, c.num_heads, c.num_kv_heads, c.group_size, c.head_dim, c.hidden_size) == ("llama", 8, 2, 4, 8, 48)
    assert c.rope_theta == 500000.0 and c.rope_type == "llama3"
    assert c.rope_scaling["factor"] == 8.0 and c.rope_scaling["original_max_position_embeddings"] == 8
    assert c.eos_token_ids == [2, 7, 9]  # config.json's, then generation_config.json's new ones
    assert c.bos_token_id == 1
    assert c.max_position_embeddings == 64 and c.tie_word_embeddings and c.rms_norm_eps == 1e-5
    assert not c.attention_bias


def test_config_qwen2_defaults(tmp_path):
    path = make_tiny_model_dir(tmp_path, family="qwen2", eos=5)
    c = load_config(path)
    assert c.model_type == "qwen2" and c.attention_bias and c.eos_token_ids == [5]
    assert c.rope_scaling is None and c.rope_type == "default"


def _base_hf_dict(**kw):
    d = dict(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8)
    d.update(kw)
    return d


def test_config_legacy_rope_layout():
    """transformers 4.x config.json: rope_theta + rope_scaling with the old 'type' key."""
    c = ModelConfig.from_hf_dict(_base_hf_dict(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0}))
    assert c.rope_theta == 1e6 and c.rope_scaling == {"factor": 4.0, "rope_type": "linear"}
    # defaults: MHA, head_dim = hidden // heads, theta 10000
    c = ModelConfig.from_hf_dict(_base_hf_dict())
    assert c.num_kv_heads == 8 and c.head_dim == 8 and c.rope_theta == 10000.0 and c.rope_scaling is None
    # "default" scaling is no scaling
    c = ModelConfig.from_hf_dict(_base_hf_dict(rope_scaling={"rope_type": "default"}))
    assert c.rope_scaling is None


def test_config_new_rope_parameters_layout():
    """transformers 5.x config.json: rope_parameters holds rope_theta too."""
    c = ModelConfig.from_hf_dict(_base_hf_dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32}))
    assert c.rope_theta == 1e6 and c.rope_type == "yarn"
    assert c.rope_scaling == {"factor": 4.0, "original_max_position_embeddings": 32, "rope_type": "yarn"}
    c = ModelConfig.from_hf_dict(_base_hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert c.rope_theta == 5e5 and c.rope_scaling is None


def test_config_eos_lists():
    c = ModelConfig.from_hf_dict(_base_hf_dict(eos_token_id=[3, 4]), {"eos_token_id": 4})
    assert c.eos_token_ids == [3, 4]
    c = ModelConfig.from_hf_dict(_base_hf_dict(eos_token_id=None), {"eos_token_id": [10, 11]})
    assert c.eos_token_ids == [10, 11]
    assert ModelConfig.from_hf_dict(_base_hf_dict()).eos_token_ids == []


def test_config_written_by_transformers_roundtrip(tmp_path):
    """Whatever layout the installed transformers writes, we read the same rope settings back."""
    path = make_tiny_model_dir(tmp_path, family="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                               rope_theta=1e6, max_pos=128)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    assert "rope_parameters" in raw or "rope_scaling" in raw
    c = load_config(path)
    assert c.rope_theta == 1e6 and c.rope_type == "yarn" and c.rope_scaling["factor"] == 4.0
    assert c.rope_scaling["original_max_position_embeddings"] == 32


# ---------------------------------------------------------------------------------------------
# Greedy vanilla decoding == transformers generate(do_sample=False)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _hf_greedy(hf, ids: torch.Tensor, n: int, eos=None) -> torch.Tensor:
    """New tokens of ``hf.generate`` (greedy). ``eos``: None = never stop. Finished rows pad with eos."""
    kw = dict(max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    if eos is None:
        kw.update(eos_token_id=None, pad_token_id=VOCAB + 1000)  # a pad id that never occurs
    else:
        first = eos if isinstance(eos, int) else eos[0]
        kw.update(eos_token_id=eos, pad_token_id=first)
    out = hf.generate(ids, **kw)
    return out[:, ids.shape[1]:]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def greedy_pair(request, tmp_path_factory):
    family = request.param
    path, hf = make_tiny_model_dir(tmp_path_factory.mktemp(f"greedy-{family}"), family=family, seed=5, return_model=True)
    return family, load_model(path), hf


def test_greedy_matches_generate(greedy_pair):
    _, model, hf = greedy_pair
    ids = _ids(1, 7, seed=11)
    res = vanilla_generate(model, ids, 7, max_gen_len=40, eos_id=[])
    expected = _hf_greedy(hf, ids, 40)
    assert res.output_ids.shape == (1, 40)
    assert torch.equal(res.output_ids, expected)
    assert len(set(expected[0].tolist())) >= 8  # a real sequence, not one repeated token
    out, count, num, elapsed, spec_mask = res
    assert count == 0 and num == 40 and not spec_mask.any() and elapsed >= 0


def test_greedy_stops_at_eos_like_generate(greedy_pair):
    _, model, hf = greedy_pair
    ids = _ids(1, 7, seed=11)
    free = vanilla_generate(model, ids, 7, max_gen_len=40, eos_id=[]).output_ids[0].tolist()
    # pick an eos that greedy decoding produces mid-sequence, for the first time at index k >= 3
    k = next(i for i in range(3, 40) if free[i] not in free[:i])
    eos = free[k]
    res = vanilla_generate(model, ids, 7, max_gen_len=40, eos_id=eos)
    assert res.output_ids[0].tolist() == free[: k + 1]
    assert res.num == k + 1
    hf_out = _hf_greedy(hf, ids, 40, eos=eos)
    assert hf_out[0].tolist() == free[: k + 1]
    # an eos list works the same (the other id never appears)
    never = next(t for t in range(VOCAB) if t not in free)
    assert vanilla_generate(model, ids, 7, max_gen_len=40, eos_id=[never, eos]).output_ids[0].tolist() == free[: k + 1]


def test_greedy_default_eos_from_config(tmp_path):
    """eos_id=None uses the model's eos ids (config.json + generation_config.json)."""
    path, hf = make_tiny_model_dir(tmp_path, family="llama", seed=5, return_model=True)
    model = load_model(path)
    ids = _ids(1, 7, seed=11)
    free = vanilla_generate(model, ids, 7, max_gen_len=40, eos_id=[]).output_ids[0].tolist()
    k = next(i for i in range(3, 40) if free[i] not in free[:i])
    save_hf_model(hf, path, generation_eos=[free[k]])
    model = load_model(path)
    assert free[k] in model.config.eos_token_ids
    assert vanilla_generate(model, ids, 7, max_gen_len=40).output_ids[0].tolist() == free[: k + 1]


def test_greedy_batch_of_two(greedy_pair):
    _, model, hf = greedy_pair
    ids = _ids(2, 9, seed=21)
    res = vanilla_generate(model, ids, 9, max_gen_len=36, eos_id=[])
    assert torch.equal(res.output_ids, _hf_greedy(hf, ids, 36))
    # rows equal single-prompt runs
    for b in range(2):
        single = vanilla_generate(model, ids[b : b + 1], 9, max_gen_len=36, eos_id=[]).output_ids
        assert torch.equal(single[0], res.output_ids[b])


def test_greedy_batch_with_eos_pads_finished_row(greedy_pair):
    _, model, hf = greedy_pair
    ids = _ids(2, 9, seed=21)
    free = vanilla_generate(model, ids, 9, max_gen_len=36, eos_id=[]).output_ids.tolist()
    # an eos first produced by row 0 at k >= 3 and never by row 1 before k + 5: row 0 stops first
    k = next(i for i in range(3, 30) if free[0][i] not in free[0][:i] and free[0][i] not in free[1][: i + 5])
    eos = free[0][k]
    res = vanilla_generate(model, ids, 9, max_gen_len=36, eos_id=eos)
    expected = _hf_greedy(hf, ids, 36, eos=eos)
    assert torch.equal(res.output_ids, expected)
    assert res.output_ids[0, : k + 1].tolist() == free[0][: k + 1]
    assert (res.output_ids[0, k:] == eos).all()
    assert res.output_ids.shape[1] > k + 1


@pytest.mark.parametrize("n", [1, 2])
def test_greedy_tiny_max_gen_len(greedy_pair, n):
    _, model, hf = greedy_pair
    ids = _ids(2, 5, seed=2)
    res = vanilla_generate(model, ids, 5, max_gen_len=n, eos_id=[])
    assert res.output_ids.shape == (2, n) and res.num == n
    assert torch.equal(res.output_ids, _hf_greedy(hf, ids, n))


def test_greedy_uses_only_prompt_length_tokens(greedy_pair):
    """Tokens of input_ids after prompt_length are ignored."""
    _, model, _ = greedy_pair
    ids = _ids(1, 12, seed=4)
    a = vanilla_generate(model, ids, 6, max_gen_len=8, eos_id=[]).output_ids
    b = vanilla_generate(model, ids[:, :6], 6, max_gen_len=8, eos_id=[]).output_ids
    assert torch.equal(a, b)

