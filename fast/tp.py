"""Tensor parallelism for the fast target model over ``torch.distributed`` (issue 23; gpt-fast's layout).

Every rank holds a slice of each layer and runs the same decoder loop on the same inputs; two
all-reduces per layer and one all-gather of the logits keep every rank's view of the sequence
identical, so the host-side logic of every decoder (drafting, acceptance, EOS) runs unchanged on
each rank and takes the same decisions. Nothing here is a home-made transport: the collectives are
``torch.distributed``'s (NCCL on CUDA, gloo on CPU), and CUDA graphs capture them like any kernel.

How a layer is split over ``world`` ranks (rank r of world W):

* ``wqkv`` (column-parallel): rank r keeps the q rows of query heads ``[r Hq/W, (r+1) Hq/W)`` and the
  k / v rows of KV heads ``[r Hkv/W, (r+1) Hkv/W)`` (GQA-aware: a query head's KV head lands on the
  same rank), so attention and the KV cache are local -- each rank caches ``Hkv / W`` heads.
* ``wo`` (row-parallel): the columns of rank r's query heads; the partial products are summed by an
  all-reduce, then added to the residual stream. Its bias is added once (rank 0 keeps it).
* ``w13`` (column-parallel): rank r's slice of the gate rows and of the up rows (``F / W`` each).
* ``w2`` (row-parallel): the matching columns; all-reduce, then the residual add.
* ``lm_head`` (vocab-parallel): rows ``[r V', (r+1) V')`` of the vocabulary padded to ``W V'``; the
  ranks' logits are all-gathered and the padding cut, so every rank sees the full logits.
* The embedding and the norms are replicated.

Needs ``Hq``, ``Hkv`` and the MLP width divisible by ``W`` (a clear error otherwise). The reference
path stays single-process; ``tests/fast/test_tensor_parallel.py`` checks TP = 2 against TP = 1 on the
CPU with gloo. The GLIDE draft is not sharded yet (it reads the target's lm_head and its last-layer
KV heads, which TP splits): the GLIDE decoders refuse a tensor-parallel target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from specdec.shared.config import ModelConfig

__all__ = ["TensorParallel", "init_tensor_parallel", "shard_weights", "check_divisible"]


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: ``rank`` of ``world`` in ``group``."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (returns it)."""
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dim, in rank order (same shape on every rank)."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, world={self.world})"


def init_tensor_parallel(world: int, backend: str | None = None) -> TensorParallel:
    """Join (or start) the default process group for TP over ``world`` ranks.

    Under ``torchrun --nproc-per-node N`` the environment names the rank and the world; ``world`` must
    equal it. Backend: NCCL when CUDA is available, else gloo. On CUDA each rank uses device
    ``LOCAL_RANK``.
    """
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tp must be an int >= 1, got {world!r}")
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != world:
        raise ValueError(f"tp={world} needs {world} processes; this one runs in a world of {env_world} "
                         f"(launch with: torchrun --nproc-per-node {world} -m specdec generate --tp {world} ...)")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return TensorParallel(rank=dist.get_rank(), world=dist.get_world_size())


def check_divisible(config: ModelConfig, world: int) -> None:
    """Raise a ValueError naming the first head count / width that ``world`` does not divide."""
    for name, value in (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
                        ("MLP width (intermediate_size)", config.intermediate_size)):
        if value % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs the model's {name} ({value}) to be a "
                             f"multiple of {world}; choose a tp that divides {value}")


def _rows(t: torch.Tensor, start: int, size: int) -> torch.Tensor:
    return t.narrow(0, start, size)


def shard_weights(w: dict[str, torch.Tensor], config: ModelConfig, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """Rank ``tp.rank``'s slice of the fused fast-path weights ``w`` (``specdec.fast.model._fuse``'s
    names: ``layers.i.wqkv/bqkv/wo/bo/w13/w2``, ``lm_head``, ``embed``, norms), as new contiguous tensors."""
    check_divisible(config, tp.world)
    r, W = tp.rank, tp.world
    d, hq, hkv, f = config.head_dim, config.num_heads, config.num_kv_heads, config.intermediate_size
    q_local, kv_local, f_local = hq // W * d, hkv // W * d, f // W
    out: dict[str, torch.Tensor] = {}
    for name, t in w.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("wqkv", "bqkv"):
            q, k, v = t.split([hq * d, hkv * d, hkv * d], dim=0)
            out[name] = torch.cat([_rows(q, r * q_local, q_local), _rows(k, r * kv_local, kv_local),
                                   _rows(v, r * kv_local, kv_local)], dim=0).contiguous()
        elif leaf == "wo":
            out[name] = t[:, r * q_local:(r + 1) * q_local].contiguous()
        elif leaf == "bo":
            out[name] = t.clone() if r == 0 else torch.zeros_like(t)   # added once by the all-reduce
        elif leaf == "w13":
            gate, up = t.split([f, f], dim=0)
            out[name] = torch.cat([_rows(gate, r * f_local, f_local), _rows(up, r * f_local, f_local)], dim=0).contiguous()
        elif leaf == "w2":
            out[name] = t[:, r * f_local:(r + 1) * f_local].contiguous()
        elif name == "lm_head":
            v_local = -(-t.shape[0] // W)                        # ceil(V / W) rows per rank, zero-padded
            rows = t[r * v_local:(r + 1) * v_local]
            if rows.shape[0] < v_local:
                rows = torch.cat([rows, rows.new_zeros(v_local - rows.shape[0], rows.shape[1])])
            out[name] = rows.contiguous()
        else:                                                    # embedding, norms: replicated
            out[name] = t
    return out
