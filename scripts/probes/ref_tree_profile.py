#!/usr/bin/env python3
"""cProfile of one reference tree_spec call (README command 1's method) on the CPU, ops sorted by own time.

    python3 scripts/probes/ref_tree_profile.py      # shipped model, stdlib_code question 4, tree (3, 2, 2), 128 tokens
"""
import torch, cProfile, pstats
from specdec import ref
from specdec.bench import load_questions
from specdec.shared.tokenizer import encode_prompt, load_tokenizer
torch.set_num_threads(2)
m = ref.load_model("default"); g = ref.load_glide("default-glide", target=m)
tok = load_tokenizer("default")
q = load_questions("stdlib_code", 4, 5)[0]
ids = torch.tensor([encode_prompt(tok, q["turns"][0])])
ref.tree_spec_generate(m, g, ids, ids.shape[1], tree_shape=(3,2,2), max_gen_len=16)
cProfile.run("ref.tree_spec_generate(m, g, ids, ids.shape[1], tree_shape=(3,2,2), max_gen_len=128)", "/tmp/t.out")
pstats.Stats("/tmp/t.out").sort_stats("tottime").print_stats(18)
