#!/usr/bin/env python3
"""Weight arithmetic on checkpoints of one shape (issue 21: is the unlikelihood term's loss cost the CE drift?).

    python3 scripts/probes/task_vector.py --base shared/assets/default/target --out runs/s32/ta_sul03 \
        --add 1.0 runs/s29/ft_sul03_4k/target runs/s31/ft_ce_4k/target

Writes ``base + sum(coef * (a - b))`` over every weight tensor (fp32 arithmetic, stored in the base's dtypes) to
``--out``, with the base directory's other files (config, tokenizer) copied, so the result loads like the base.
With ``a`` a fine-tune that used a loss term and ``b`` the same fine-tune without it (same data, steps and lr), the
difference is that term's own "task vector": adding it to the base removes the drift both fine-tunes share.
Score the result with ``greedy_repetition.py`` and ``train_default.py eval``.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def _weights(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        raise SystemExit(f"task_vector: {path} does not exist (a model directory holds model.safetensors)")
    return load_file(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="model directory the vectors are added to")
    p.add_argument("--out", required=True, help="new model directory (created; must not exist)")
    p.add_argument("--add", nargs=3, action="append", metavar=("COEF", "A", "B"), required=True,
                   help="add COEF x (A - B); repeat for several vectors")
    args = p.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"task_vector: --out {args.out} already exists")
    base = _weights(args.base)
    merged = {k: v.float() for k, v in base.items()}
    for coef, a_dir, b_dir in args.add:
        a, b = _weights(a_dir), _weights(b_dir)
        if set(a) != set(base) or set(b) != set(base):
            raise SystemExit(f"task_vector: {a_dir} / {b_dir} do not hold the base's tensor names")
        for k in merged:
            if a[k].shape != base[k].shape or b[k].shape != base[k].shape:
                raise SystemExit(f"task_vector: tensor {k} differs in shape between the checkpoints")
            merged[k] += float(coef) * (a[k].float() - b[k].float())
    shutil.copytree(args.base, args.out)
    save_file({k: v.to(base[k].dtype).contiguous() for k, v in merged.items()},
              os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
