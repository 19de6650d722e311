"""Random streams: every draw is a pure function of (key, stream, indices), never of global state.

A stream's generator is seeded from a hash of the data key (the fields that fix the data
distribution), the trial seed, the stream name and block indices. Blocks make a prompt's draws
independent of how many prompts or examples are drawn beside it, so the evaluation prompts at
test length M are the same whatever the M grid or the chunking.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from study.config import stable_hash

STREAMS = ("task", "train", "eval", "init", "online", "batch")  # online: fresh training prompts per step; batch: minibatches of a fixed set
TRAIN_BLOCK = 1024  # training prompts per random block
EVAL_BLOCK = 64  # evaluation prompts per random block
EXAMPLE_BLOCK = 64  # context examples per random block (always drawn whole, then cut)


def generator(key: Any, stream: str, *indices: int) -> torch.Generator:
    """A CPU generator for one block of one stream."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; known: {', '.join(STREAMS)}")
    seed = int(stable_hash([key, stream, [int(i) for i in indices]], n=16), 16) & ((1 << 63) - 1)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def blocks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(block index, block length) of `total` items in blocks of `size`."""
    for b, start in enumerate(range(0, total, size)):
        yield b, min(size, total - start)
