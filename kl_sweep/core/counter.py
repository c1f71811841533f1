r"""Counter-based random draws: Philox4x32-10 (Salmon, Moraes, Dror and Shaw, SC 2011), batched.

A stochastic fit (:mod:`kl_sweep.core.stochastic`) needs fresh draws at every step whose values
depend on the row (its 64-bit configuration hash and its replica ``seed``), the step and the draw's
index only: never on which batch, chunk, shard or process computes the row. A counter-based
generator gives exactly that: draw j of step t is a fixed function of (key, counter), with

- key (k0, k1): the low and high 32 bits of the row's configuration hash;
- counter (t mod 2^32, j | stream << 28, seed's low 32 bits, seed's high 32 bits), j < 2^28.

Each Philox call gives four 32-bit words x0..x3, made into two doubles in the open interval (0, 1),
u_a = ((x0 >> 5) 2^26 + (x1 >> 6) + 1/2) 2^-53 and u_b likewise from (x2, x3): uniform draws 2j and
2j + 1. Normal draws are Box-Muller on each pair: r = sqrt(-2 log u_a), (r cos 2 pi u_b, r sin 2 pi u_b).

Keys and seeds are int64 tensors [B] holding the 64-bit values (a uint64 hash viewed as int64). The
uint32 arithmetic is done in int64 tensors: a product of two 32-bit words wraps modulo 2^64 exactly
as uint64 would, so its high and low words come out right.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
#: Philox4x32's multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, W32_0/1).
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
#: Draws per row and step are at most 2^29 (j < 2^28 pairs); streams 0..15.
MAX_PAIRS = 1 << 28


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]) -> list[Tensor]:
    """Philox4x32-10 of broadcastable int64 tensors holding uint32 words: four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(ROUNDS):  # over the ten rounds, not over rows
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = c0 * M0, c2 * M1
        hi0, lo0 = (p0 >> 32) & MASK32, p0 & MASK32
        hi1, lo1 = (p1 >> 32) & MASK32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def split(values: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 32-bit words of int64 values (a uint64 viewed as int64)."""
    return values & MASK32, (values >> 32) & MASK32


def _words(key: Tensor, seed: Tensor, step: int, stream: int, n: int) -> list[Tensor]:
    pairs = (n + 1) // 2
    if pairs > MAX_PAIRS or not 0 <= stream < 16:
        raise ValueError(f"at most {2 * MAX_PAIRS} draws a row and streams 0..15 (got {n}, {stream})")
    j = torch.arange(pairs, dtype=torch.int64) | (stream << 28)
    k0, k1 = split(key.to(torch.int64).unsqueeze(-1))
    s0, s1 = split(seed.to(torch.int64).unsqueeze(-1))
    c0 = torch.full_like(j, step & MASK32)
    return philox4x32((c0, j, s0, s1), (k0, k1))


def _unit(hi: Tensor, lo: Tensor) -> Tensor:
    """A double in (0, 1) from 27 + 26 bits of two words."""
    bits = (hi >> 5) * (1 << 26) + (lo >> 6)
    return (bits.to(torch.float64) + 0.5) * 2.0**-53


def counter_uniforms(key: Tensor, seed: Tensor, step: int, stream: int, n: int) -> Tensor:
    """Uniform draws in (0, 1), [B, n], of rows with hash ``key`` and ``seed`` [B] at ``step``."""
    x0, x1, x2, x3 = _words(key, seed, step, stream, n)
    return torch.stack([_unit(x0, x1), _unit(x2, x3)], -1).flatten(-2)[..., :n]


def counter_normals(key: Tensor, seed: Tensor, step: int, stream: int, n: int) -> Tensor:
    """Standard normal draws, [B, n], by Box-Muller on :func:`counter_uniforms`' pairs."""
    x0, x1, x2, x3 = _words(key, seed, step, stream, n)
    r = torch.sqrt(-2.0 * torch.log(_unit(x0, x1)))
    angle = (2.0 * math.pi) * _unit(x2, x3)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], -1).flatten(-2)[..., :n]
