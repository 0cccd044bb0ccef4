"""Stateless random permutations of [0, n): row order for every epoch without storing it.

A permutation of a billion rows would take 8 GB as an index array; a keyed Feistel network with
cycle walking gives the same kind of pseudo-random bijection in O(1) memory, evaluated only at the
positions a process actually reads.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def derive_key(*parts: object) -> int:
  """A 64-bit key from any printable parts (seed, source name, epoch, ...)."""
  digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "little")


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
  """splitmix64 finaliser of x ^ key: a cheap, well-mixed round function."""
  z = x ^ key
  z = (z ^ (z >> np.uint64(30))) * _M1
  z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
  """Maps each `index` in [0, n) to its image under the permutation of [0, n) named by `key`."""
  index = np.asarray(index, dtype=np.int64)
  if n <= 0:
    raise ValueError(f"n={n}; a permutation needs a non-empty domain.")
  if index.size and (index.min() < 0 or index.max() >= n):
    raise ValueError(f"indices must be in [0, {n}); got [{index.min()}, {index.max()}].")
  if n == 1:
    return np.zeros_like(index)
  half = max(1, (int(n - 1).bit_length() + 1) // 2)  # 2 * half bits cover n
  mask = np.uint64((1 << half) - 1)
  shift = np.uint64(half)
  round_keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]
  with np.errstate(over="ignore"):
    x = index.astype(np.uint64)
    todo = np.ones(x.shape, dtype=bool)
    out = x.copy()
    # Cycle walking: the network permutes [0, 4^half) and 4^half < 4n, so re-applying it until
    # the value lands back in [0, n) ends after a few rounds on average.
    while todo.any():
      v = out[todo]
      left, right = v >> shift, v & mask
      for rk in round_keys:
        left, right = right, left ^ (_mix(right, rk) & mask)
      v = (left << shift) | right
      out[todo] = v
      todo[todo] = v >= np.uint64(n)
  return out.astype(np.int64)
