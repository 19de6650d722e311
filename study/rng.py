"""Random streams: every draw is a pure function of (key, stream, indices), never of global state.

A stream's generator is seeded from a hash of the data key (the fields that fix the data
distribution), the trial seed, the stream name and block indices. Blocks make a prompt's draws
independent of how many prompts or examples are drawn beside it, so the evaluation prompts at
test length M are the same whatever the M grid or the chunking.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from study.config import canonical_json, stable_hash

STREAMS = ("task", "train", "eval", "init", "online", "batch")  # online: fresh training prompts per step; batch: minibatches of a fixed set
TRAIN_BLOCK = 1024  # training prompts per random block
EVAL_BLOCK = 64  # evaluation prompts per random block
EXAMPLE_BLOCK = 64  # context examples per random block (always drawn whole, then cut)
DRAWN_BYTES = 256 * 2**20  # what a process keeps of the training blocks it has drawn (`drawn_blocks`)


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


_drawn: OrderedDict[str, tuple[torch.Tensor | None, ...]] = OrderedDict()  # kept blocks, least recently used first
_drawn_bytes = 0  # their size, counted as they come and go (summed anew at every draw, it was quadratic in the blocks: 74k sums a quickstart trial)


def drawn_blocks(key: list[Any], total: int, size: int, draw: Callable[[int], tuple[torch.Tensor | None, ...]]) -> tuple[torch.Tensor | None, ...]:
    """The first `total` items of blocks of `size`, each tensor concatenated over the blocks (None stays None).

    Block b is `draw(b)`, a pure function of (`key`, b), drawn whole and then cut, so the stacks of a
    B sweep (B is part of a stack's shape) need the same blocks: the largest B's prompts include
    every smaller B's. The process keeps the blocks it draws, the most recently used up to
    DRAWN_BYTES, until `forget_drawn` (a trial calls it when it ends, `runner.execute_bundle`).
    """
    parts = [tuple(t[:n] if t is not None else None for t in _kept([*key, b], lambda b=b: draw(b))) for b, n in blocks(total, size)]
    return tuple(torch.cat(z) if z[0] is not None else None for z in zip(*parts))  # copies: the kept tensors stay as drawn


def _kept(key: list[Any], draw: Callable[[], tuple[torch.Tensor | None, ...]]) -> tuple[torch.Tensor | None, ...]:
    global _drawn_bytes
    name = canonical_json(key)
    if name in _drawn:
        _drawn.move_to_end(name)
        return _drawn[name]
    out = _drawn[name] = draw()
    _drawn_bytes += _nbytes(out)
    while _drawn and _drawn_bytes > DRAWN_BYTES:
        _drawn_bytes -= _nbytes(_drawn.popitem(last=False)[1])
    return out


def _nbytes(ts: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def forget_drawn() -> None:
    """Forget the kept blocks (a trial's end; timings that must not profit from earlier draws)."""
    global _drawn_bytes
    _drawn.clear()
    _drawn_bytes = 0
