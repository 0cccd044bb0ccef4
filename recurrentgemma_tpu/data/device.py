"""Device placement of batches: this process's rows of a global batch as global jax arrays.

`pipeline.py` decides which rows a step holds (numpy only); this module finds the rows whose shards
live on this process's devices and assembles the global `jax.Array`s the jitted steps take.
"""

from __future__ import annotations

import jax
import numpy as np

from recurrentgemma_tpu.data.pipeline import Batch, Pipeline


def process_rows(sharding, global_batch_size: int) -> slice:
  """The contiguous block of batch rows whose shards live on this process's devices.

  Raises:
    ValueError: if this process's rows are not one contiguous block (a sharding the process-local
      batch convention cannot express).
  """
  shape = (global_batch_size, 1)
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(shape).values():
    r = range(global_batch_size)[index[0]]
    starts.append(r.start)
    stops.append(r.stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(global_batch_size, bool)
  for a, b in zip(starts, stops):
    covered[a:b] = True
  if not covered[lo:hi].all():
    raise ValueError(f"this process's batch rows under {sharding} are not contiguous.")
  return slice(lo, hi)


def to_global_arrays(local_batch: Batch, sharding, global_batch_size: int) -> dict:
  """Turns this process's rows into global jax arrays [global_batch_size, T] with `sharding`."""
  return {
      k: jax.make_array_from_process_local_data(
          sharding, v, (global_batch_size,) + v.shape[1:])
      for k, v in local_batch.items()
  }


def global_batch(pipeline: Pipeline, step: int, sharding) -> dict:
  """The training batch at `step` as global jax arrays laid out by `sharding` (batch on axis 0).

  Each process reads only the rows its devices hold, whatever the mesh order of processes.
  """
  b = pipeline.config.global_batch_size
  return to_global_arrays(pipeline.batch(step, process_rows(sharding, b)), sharding, b)
