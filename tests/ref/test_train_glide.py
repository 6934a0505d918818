"""train_glide: the LongSpec recipe lowers held-out loss and raises tau on a tiny real-text problem."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from specdec.ref.glide import load_glide, spec_generate, tree_spec_generate
from specdec.ref.model import forward_step, new_cache
from specdec.ref.train_glide import anchor_offset_positions, make_chunks, target_last_layer_kv, train_glide
from specdec.ref.vanilla import vanilla_generate
from specdec.shared.glide import init_glide_weights
from specdec.shared.weights import model_from_hf


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def byte_text():
    """A Python stdlib file at byte level: repetitive real text (vocab 256)."""
    data = torch.tensor(list(open(textwrap.__file__, "rb").read()), dtype=torch.long)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


@pytest.fixture(scope="module")
def byte_target(byte_text):
    """A tiny Llama trained for a few hundred steps on the bytes (so its greedy text is predictable)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    train, _ = byte_text
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, len(train) - 65, (16,), generator=g)
        x = torch.stack([train[j : j + 64] for j in i])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model_from_hf(model.eval())


def test_target_last_layer_kv_equals_cache(byte_target):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    pos = anchor_offset_positions(2, 20, 512, generator=torch.Generator().manual_seed(1))
    cache = new_cache(byte_target, 2)
    forward_step(byte_target, ids, cache, positions=pos)
    k, v = target_last_layer_kv(byte_target, ids, pos)
    torch.testing.assert_close(k, cache.k[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, cache.v[-1], atol=1e-5, rtol=1e-5)


def test_anchor_offset_positions_and_chunks():
    pos = anchor_offset_positions(64, 10, 100, max_anchor_tokens=4, generator=torch.Generator().manual_seed(0))
    assert pos.shape == (64, 10) and int(pos.max()) <= 99 and int(pos.min()) == 0
    for row in pos.tolist():
        k = next((i for i, p in enumerate(row) if p != i), 10)
        assert k <= 4 or row == list(range(10))  # anchors keep 0..k-1 (offset 0 keeps everything)
        off = row[-1] - 9
        assert row[k:] == [i + off for i in range(k, 10)]
    assert len({r[-1] for r in pos.tolist()}) > 10  # offsets vary
    chunks = make_chunks([torch.arange(5), torch.arange(7)], 4, sep_id=99)
    assert chunks.tolist() == [[0, 1, 2, 3], [4, 99, 0, 1], [2, 3, 4, 5]]


def test_train_glide_lowers_loss_and_raises_tau(byte_target, byte_text, tmp_path):
    train, held = byte_text
    out = tmp_path / "glide"
    res = train_glide(byte_target, [train], eval_data=[held], seq_len=64, batch_size=8, steps=120, lr=4e-3,
                      warmup_steps=10, window=32, init_std=0.05, eval_every=60, save_dir=out, save_every=60, progress=False)
    # Held-out loss drops a lot.
    assert res.final_eval_loss < res.initial_eval_loss - 1.5, (res.initial_eval_loss, res.final_eval_loss)
    assert len(res.eval_history) == 3
    # Saved in the layout load_glide reads; log and checkpoint written.
    glide = load_glide(out, byte_target)
    assert glide.window == 32
    assert os.path.isfile(out / "checkpoint-60" / "model.safetensors") and os.path.isfile(out / "checkpoint-60" / "trainer_state.pt")
    lines = [json.loads(x) for x in open(out / "train_log.jsonl")]
    assert sum("loss" in r for r in lines) == 120 and sum("eval_loss" in r for r in lines) == 3

    # tau over held-out prompts: trained draft >> untrained draft; outputs still equal vanilla.
    untrained = init_glide_weights(byte_target.config, window=32, std=0.05)
    taus = {"untrained": [], "trained": []}
    for k in range(3):
        prompt = held[k * 60 : k * 60 + 40][None]
        want = vanilla_generate(byte_target, prompt, 40, max_gen_len=32, eos_id=[]).tolist()
        for name, g in (("untrained", untrained), ("trained", glide)):
            r = spec_generate(byte_target, g, prompt, 40, gamma=4, max_gen_len=32, eos_id=[])
            assert r.tolist() == want
            taus[name].append(r.tau)
        r = tree_spec_generate(byte_target, glide, prompt, 40, tree_shape=(4, 8, 8, 8), max_gen_len=32, eos_id=[])
        assert r.tolist() == want
    mean = {k: sum(v) / len(v) for k, v in taus.items()}
    assert mean["trained"] > mean["untrained"] + 0.5, mean


def test_script_runs(byte_target, byte_text, tmp_path):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    try:
        import train_glide as script
    finally:
        sys.path.pop(0)
    # a target dir on disk + pre-tokenized data
    from safetensors.torch import save_file

    tdir = tmp_path / "target"
    os.makedirs(tdir)
    c = byte_target.config
    cfg = {"model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
           "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps}
    json.dump(cfg, open(tdir / "config.json", "w"))
    save_file({f"model.{k}" if k != "lm_head.weight" else k: v.contiguous() for k, v in byte_target.weights.items()}, str(tdir / "model.safetensors"))
    train, held = byte_text
    torch.save(train[:2000], tmp_path / "train.pt")
    torch.save(held[:300], tmp_path / "val.pt")
    rc = script.main(["--target", str(tdir), "--tokens", str(tmp_path / "train.pt"), "--eval-tokens", str(tmp_path / "val.pt"),
                      "--output", str(tmp_path / "out"), "--seq-len", "32", "--steps", "3", "--batch-size", "2", "--window", "16", "--device", "cpu"])
    assert rc == 0 and os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_distill_loss_is_the_mix_of_ce_and_kl(byte_target, byte_text):
    """glide_loss(distill=w) = (1 - w) CE(text) + w KL(p_target || p_draft), the teacher from a full target pass."""
    import torch.nn.functional as F

    from specdec.ref.glide import glide_full_forward
    from specdec.ref.model import forward
    from specdec.ref.train_glide import glide_loss

    train, _ = byte_text
    x = torch.stack([train[:48], train[100:148]])
    g = init_glide_weights(byte_target.config, window=32, std=0.05)
    tk, tv = target_last_layer_kv(byte_target, x)
    logp = torch.log_softmax(glide_full_forward(byte_target, g, x, tk, tv).float()[:, :-1], -1).reshape(-1, 256)
    teacher = torch.log_softmax(forward(byte_target, x).float()[:, :-1], -1).reshape(-1, 256)
    ce = F.nll_loss(logp, x[:, 1:].reshape(-1))
    kl = (teacher.exp() * (teacher - logp)).sum(-1).mean()
    torch.testing.assert_close(glide_loss(byte_target, g, x), ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(glide_loss(byte_target, g, x, distill=1.0), kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(glide_loss(byte_target, g, x, distill=0.25), 0.75 * ce + 0.25 * kl, atol=1e-5, rtol=1e-5)


def test_distillation_raises_agreement(byte_target, byte_text):
    from specdec.ref.train_glide import glide_agreement

    train, held = byte_text
    res = train_glide(byte_target, [train], eval_data=[held], seq_len=64, batch_size=8, steps=60, lr=4e-3, warmup_steps=10,
                      window=32, init_std=0.05, eval_every=None, distill=1.0, progress=False)
    first, last = res.eval_history[0], res.eval_history[-1]
    assert "eval_agree" in first and "eval_agree" in last
    assert last["eval_agree"] > first["eval_agree"] + 0.2, (first, last)
    chunks = make_chunks([held], 64)
    assert glide_agreement(byte_target, res.glide, chunks) == pytest.approx(last["eval_agree"])
    with pytest.raises(ValueError, match="distill"):
        train_glide(byte_target, [train], steps=1, distill=1.5, progress=False)
