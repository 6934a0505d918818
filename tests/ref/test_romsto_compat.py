"""romsto compatibility (ref/romsto.py): romsto's usage example, its signature, its bugs fixed."""

from __future__ import annotations

import pytest
import torch

from helpers import make_hf_model, make_tiny_tokenizer_dir
from specdec.ref import romsto, vanilla_generate
from specdec.ref.romsto import autoregressive_generate, speculative_generate

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    tok_dir = make_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok"), vocab_size=200, chat_template=CHAT)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    # LlamaForCausalLM from tiny configs: a 2-layer target and a 1-layer drafter, same vocabulary
    target = make_hf_model("llama", seed=0, vocab=256, layers=2, std=0.3)
    drafter = make_hf_model("llama", seed=1, vocab=256, layers=1, heads=2, kv_heads=1, std=0.3)
    return target, drafter, tokenizer


def test_seed_usage_example(setup, capsys):
    target, drafter, tokenizer = setup
    # ---- romsto's example, steps 2-4, verbatim (only the import line changed) ----
    from specdec.ref.romsto import speculative_generate
    from specdec.ref.romsto import GreedyProcessor

    prompt = "Explain quantum computing in simple terms."
    chat = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, return_tensors="pt").input_ids[0].tolist()

    output_ids, accept_rate = speculative_generate(
        inputs,
        drafter,
        target,
        tokenizer=tokenizer,
        gamma=5,
        logits_processor=GreedyProcessor(),
        max_gen_len=100,
        eos_tokens_id=[tokenizer.eos_token_id],
    )

    output_text = tokenizer.decode(output_ids, skip_special_tokens=True)
    print(f"Output: {output_text}")
    print(f"Acceptance rate: {accept_rate:.3f}")
    # ---- the second example: KV cache + nucleus sampling ----
    from specdec.ref.romsto import NucleusProcessor

    output_ids2, accept_rate2 = speculative_generate(
        inputs,
        drafter,
        target,
        gamma=4,
        logits_processor=NucleusProcessor(temperature=0.7, top_p=0.9),
        max_gen_len=50,
        eos_tokens_id=[tokenizer.eos_token_id],
        use_cache=True,
        first_target=True,
    )
    # ---- checks ----
    assert "Output:" in capsys.readouterr().out
    ref = autoregressive_generate(inputs, target, max_gen_len=100, eos_tokens_id=[tokenizer.eos_token_id])
    assert output_ids == ref  # greedy speculative == greedy decoding, token for token
    assert isinstance(output_ids, list) and all(isinstance(t, int) for t in output_ids)
    assert 0.0 <= accept_rate <= 1.0 and 0.0 <= accept_rate2 <= 1.0
    assert 1 <= len(output_ids2) <= 50


def test_debug_shows_accepted_and_rejected(setup, capsys):
    target, drafter, tokenizer = setup
    inputs = tokenizer("def add(a, b): return a + b").input_ids
    speculative_generate(inputs, drafter, target, tokenizer=tokenizer, gamma=3, max_gen_len=12, eos_tokens_id=[], debug=True)
    out = capsys.readouterr().out
    assert "round 1:" in out and romsto.GREEN in out and romsto.RED in out
    speculative_generate(inputs, target, target, gamma=3, max_gen_len=6, eos_tokens_id=[], debug=True)  # ids, no tokenizer
    assert "round 1:" in capsys.readouterr().out


def test_acceptance_rate_and_short_lengths(setup):
    target, drafter, _ = setup
    inputs = [5, 17, 33, 4, 90, 12]
    out, rate = speculative_generate(inputs, target, target, gamma=4, max_gen_len=21, eos_tokens_id=[])
    assert rate == 1.0 and len(out) == 21  # the target as its own drafter: every draft accepted
    for n in (1, 2):  # romsto divides by zero here
        for first in (True, False):
            out, rate = speculative_generate(inputs, drafter, target, max_gen_len=n, eos_tokens_id=[], first_target=first)
            assert out == autoregressive_generate(inputs, target, max_gen_len=n, eos_tokens_id=[])
            assert 0.0 <= rate <= 1.0
    out, rate = speculative_generate(inputs, drafter, target, max_gen_len=1, eos_tokens_id=[])
    assert rate == 0.0  # nothing drafted


def test_multiple_eos_by_position(setup):
    target, drafter, _ = setup
    inputs = [3, 1, 4, 1, 5, 9, 2, 6]
    free = autoregressive_generate(inputs, target, max_gen_len=20, eos_tokens_id=[])
    first = free[3]
    later = next(t for t in free[4:] if t not in free[:4])
    cut = free[: free.index(first) + 1]
    for eos in ([later, first], [first, later]):
        out, _ = speculative_generate(inputs, drafter, target, gamma=3, max_gen_len=20, eos_tokens_id=eos)
        assert out == cut
        assert autoregressive_generate(inputs, target, max_gen_len=20, eos_tokens_id=eos) == cut


def test_models_and_conversion_cache(setup):
    target, drafter, _ = setup
    conv = romsto._to_model(target)
    assert romsto._to_model(target) is conv  # converted once per object
    inputs = [7, 8, 9, 10]
    a, _ = speculative_generate(inputs, drafter, target, max_gen_len=10, eos_tokens_id=[])
    b, _ = speculative_generate(inputs, romsto._to_model(drafter), conv, max_gen_len=10, eos_tokens_id=[])  # our Models
    assert a == b == vanilla_generate(conv, torch.tensor([inputs]), 4, max_gen_len=10, eos_id=[]).tolist()
    assert autoregressive_generate(torch.tensor(inputs), conv, max_gen_len=10, eos_tokens_id=[]) == a


def test_processors_do_not_mutate_logits():
    logits = torch.randn(2, 50)
    before = logits.clone()
    for proc in (romsto.GreedyProcessor(), romsto.TopKProcessor(0.7, 5), romsto.NucleusProcessor(0.7, 0.9),
                 romsto.TopKNucleusProcessor(0.7, 5, 0.9), romsto.MultinomialProcessor(1.3)):
        probs = proc(logits)
        assert torch.equal(logits, before) and torch.allclose(probs.sum(-1), torch.ones(2))


def test_bad_input(setup):
    target, drafter, _ = setup
    other = make_hf_model("llama", seed=2, vocab=300, layers=1, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        speculative_generate([1, 2, 3], other, target)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        speculative_generate([1, 2, 3], drafter, target, gamma=0)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate([[1, 2, 3], [4, 5, 6]], drafter, target)
    with pytest.raises(ValueError, match="batch size 1"):
        autoregressive_generate([[1, 2, 3], [4, 5, 6]], target)
    with pytest.raises(TypeError, match="logits_processor"):
        speculative_generate([1, 2, 3], drafter, target, logits_processor=lambda x: x)


@pytest.mark.parametrize(
    "inputs,err,match",
    [
        ("import os", TypeError, r"inputs must be a list of token ids \(ints\) or a 1-D integer tensor, got str"),
        (b"\x01\x02", TypeError, r"inputs must be a list of token ids \(ints\) or a 1-D integer tensor, got bytes"),
        (42, TypeError, r"inputs must be a list of token ids \(ints\) or a 1-D integer tensor, got int"),
        ([1.5, 2.0], TypeError, r"inputs must be .* got torch.float32 values"),
        (torch.tensor([1.0, 2.0]), TypeError, r"inputs must be .* got torch.float32 values"),
        (["a", "b"], TypeError, r"inputs must be .* got a list holding other values"),
        (torch.tensor(3), ValueError, r"inputs must be .* got shape \(\)"),
    ],
)
def test_inputs_must_be_token_ids(setup, inputs, err, match):
    target, drafter, _ = setup
    with pytest.raises(err, match=match):
        speculative_generate(inputs, drafter, target, max_gen_len=2)
    with pytest.raises(err, match=match):
        autoregressive_generate(inputs, target, max_gen_len=2)


def test_inputs_int_tensor_and_tuple_accepted(setup):
    target, drafter, _ = setup
    want, _ = speculative_generate([5, 17, 33], drafter, target, max_gen_len=3, eos_tokens_id=[])
    assert speculative_generate(torch.tensor([5, 17, 33], dtype=torch.int32), drafter, target, max_gen_len=3, eos_tokens_id=[])[0] == want
    assert speculative_generate((5, 17, 33), drafter, target, max_gen_len=3, eos_tokens_id=[])[0] == want


def test_eos_tokens_id_outside_vocabulary(setup):
    target, drafter, _ = setup
    with pytest.raises(ValueError, match=r"eos_id must be in \[0, 256\)"):
        speculative_generate([1, 2, 3], drafter, target, max_gen_len=2, eos_tokens_id=[99999])


def test_keyed_sampling_seed_and_generator(setup):
    """``sampling`` / ``seed`` / ``generator`` reach the decoders: keyed speculative decoding emits exactly
    keyed autoregressive decoding's tokens for the same seed and processor (first_target either way); a
    generator's initial seed is the key; in rejection mode a generator (or a seed) makes a call
    reproducible; bad values raise the decoders' named errors."""
    from specdec.ref.romsto import MultinomialProcessor, NucleusProcessor, TopKNucleusProcessor, TopKProcessor

    target, drafter, _ = setup
    inputs = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7]
    processors = [MultinomialProcessor(temperature=1.0), NucleusProcessor(temperature=0.7, top_p=0.9),
                  TopKProcessor(temperature=1.0, top_k=8), TopKNucleusProcessor(temperature=0.8, top_k=20, top_p=0.95)]
    rates = []
    for seed in range(10):
        proc = processors[seed % len(processors)]
        kw = dict(max_gen_len=12, logits_processor=proc, eos_tokens_id=[], sampling="keyed", seed=seed)
        want = autoregressive_generate(inputs, target, **kw)
        p = proc.params
        fn = vanilla_generate(romsto._to_model(target), torch.tensor([inputs]), len(inputs), 12, [], p.temperature, p.top_k,
                              p.top_p, sampling="keyed", seed=seed)
        assert want == fn.output_ids[0].tolist()
        out, rate = speculative_generate(inputs, drafter, target, gamma=4, first_target=seed % 2 == 0, **kw)
        assert out == want, seed
        rates.append(rate)
    assert any(r > 0 for r in rates)  # the drafter's keyed guesses do get accepted
    # the generator's initial seed is the key (keyed); a seeded generator or a seed repeats a rejection-mode call
    kw = dict(max_gen_len=12, logits_processor=MultinomialProcessor(temperature=1.0), eos_tokens_id=[])
    assert speculative_generate(inputs, drafter, target, sampling="keyed", generator=torch.Generator().manual_seed(3), **kw)[0] \
        == speculative_generate(inputs, drafter, target, sampling="keyed", seed=3, **kw)[0]
    a = speculative_generate(inputs, drafter, target, generator=torch.Generator().manual_seed(4), **kw)
    assert a == speculative_generate(inputs, drafter, target, generator=torch.Generator().manual_seed(4), **kw)
    assert a == speculative_generate(inputs, drafter, target, seed=4, **kw)
    assert autoregressive_generate(inputs, target, seed=4, **kw) == \
        autoregressive_generate(inputs, target, generator=torch.Generator().manual_seed(4), **kw)
    for call in (lambda **k: speculative_generate(inputs, drafter, target, **kw, **k),
                 lambda **k: autoregressive_generate(inputs, target, **kw, **k)):
        with pytest.raises(TypeError, match="seed"):
            call(sampling="keyed", seed="1")
        with pytest.raises(ValueError, match="seed"):
            call(sampling="keyed", seed=-3)
        with pytest.raises(ValueError, match="sampling"):
            call(sampling="bogus")
        with pytest.raises(TypeError, match="generator"):
            call(generator="g")
