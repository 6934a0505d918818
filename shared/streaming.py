"""The StreamingLLM view of a KV cache: attention sinks plus a recent window (docs/design.md §5).

MagicDec drafts with the target over only these rows of its verified cache. The rule is shared
by both paths so that the reference's and the fast path's drafts read exactly the same rows.
"""

from __future__ import annotations

import torch

__all__ = ["streaming_rows"]


def streaming_rows(length: int, sink_tokens: int, window: int, device=None) -> torch.Tensor:
    """Cache rows of the StreamingLLM view of a verified prefix of ``length`` positions:
    ``[0, sink_tokens)`` then ``[max(sink_tokens, length - window), length)`` (1-D long, ascending)."""
    sinks = torch.arange(min(sink_tokens, length), device=device)
    recent = torch.arange(min(max(sink_tokens, length - window), length), length, device=device)
    return torch.cat([sinks, recent])
