#!/usr/bin/env python3
"""tau of the keyed GLIDE beam with and without the keyed noise in its ranking (reference path, CPU).

    python3 scripts/probes/keyed_beam_tau.py

The default model and GLIDE draft, 4 short code prompts x 5 seeds x 48 sampled tokens (sampling="keyed"),
temperature 1.0 and 0.7, the default tree and a 4-token chain. "without" ranks the beam by the processed
draft log-probs alone (``ref.glide.perturbed_logprobs`` replaced for the run); the output is keyed
vanilla's either way, so only acceptance (tau = tokens per target pass) changes.
"""

from __future__ import annotations

import time

import torch

import specdec.ref as ref
import specdec.ref.glide as ref_glide
from specdec.shared.sampling import process_logits
from specdec.shared.tokenizer import load_tokenizer

TEXTS = ["def fibonacci(n):\n    ", "import os\n\ndef read_lines(path):\n", "class Stack:\n    def __init__(self):\n",
         "for i in range(10):\n"]


def main() -> None:
    torch.set_num_threads(1)
    target = ref.load_model("default")
    glide = ref.load_glide("default-glide", target=target)
    tok = load_tokenizer("default")
    coupled_fn = ref_glide.perturbed_logprobs

    def without_noise(logits, t, k, p, seed, sid, pos):
        return torch.log_softmax(process_logits(logits.float(), t, k, p), -1)

    t0 = time.time()
    print("| T | shape | tau with the noise | tau without |\n|---|---|---|---|")
    for temperature in (1.0, 0.7):
        for shape in (None, (1, 1, 1, 1)):
            tau = {}
            for coupled in (True, False):
                ref_glide.perturbed_logprobs = coupled_fn if coupled else without_noise
                emitted = passes = 0
                for text in TEXTS:
                    ids = torch.tensor([tok(text).input_ids])
                    for seed in range(5):
                        r = ref.tree_spec_generate(target, glide, ids, ids.shape[1], tree_shape=shape, max_gen_len=48,
                                                   eos_id=[], temperature=temperature, sampling="keyed", seed=seed)
                        emitted, passes = emitted + r.output_ids.shape[1], passes + r.num
                tau[coupled] = emitted / passes
            ref_glide.perturbed_logprobs = coupled_fn
            print(f"| {temperature} | {'default tree' if shape is None else shape} | {tau[True]:.2f} | {tau[False]:.2f} |", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
