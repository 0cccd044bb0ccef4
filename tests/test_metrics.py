"""metrics.py: one MFU peak per run (kept in the workdir across resumes), never an MFU above 1."""

import math

import jax.numpy as jnp

from recurrentgemma_tpu import metrics
from recurrentgemma_tpu import workdir as workdir_lib


def test_one_peak_per_run_survives_a_resume(tmp_path):
  workdir = str(tmp_path)
  calls = []

  def measure(value):
    return lambda: calls.append(value) or value

  assert metrics.run_peak_flops_per_device(workdir, measure(2e11), write=True) == 2e11
  # A resume measures nothing: the run's first figure, not a new one taken under other load.
  assert metrics.run_peak_flops_per_device(workdir, measure(5e10), write=True) == 2e11
  assert calls == [2e11]
  # A process that does not write (not process 0) leaves no file behind.
  other = tmp_path / "other"
  other.mkdir()
  assert metrics.run_peak_flops_per_device(str(other), measure(7.0), write=False) == 7.0
  assert not (other / metrics.PEAK_FILE).exists()
  # An unreadable file is measured again and replaced.
  workdir_lib.write_text(workdir_lib.join(workdir, metrics.PEAK_FILE), "{")
  assert metrics.run_peak_flops_per_device(workdir, measure(3e11), write=True) == 3e11
  assert metrics.run_peak_flops_per_device(workdir, measure(1.0), write=True) == 3e11


class _Records:
  """Keeps what StepLogger writes (MetricsWriter's files would need TensorFlow: slow to import)."""

  def __init__(self):
    self.records = []

  def write(self, step, scalars):
    self.records.append((step, dict(scalars)))

  def console(self, step, scalars, eta=None):
    pass

  def flush(self):
    pass


def _logged_mfu(peak_flops_total):
  writer = _Records()
  logger = metrics.StepLogger(writer, start_step=0, total_steps=4, log_every=1, tokens_per_step=1000,
                              flops_per_token=1e6, peak_flops_total=peak_flops_total)
  for step in range(1, 5):
    logger.push(step, {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0)})
  logger.finish()
  return [r["mfu"] for _, r in writer.records if not math.isnan(r["step_time"])]


def test_mfu_above_one_is_never_reported():
  # 1000 tokens x 1e6 FLOPs per step is 1e9 FLOPs: against a peak of 1 FLOP/s any step time gives
  # an MFU far above 1, which is a wrong peak, not a fast run.
  too_low = _logged_mfu(peak_flops_total=1.0)
  assert too_low and all(math.isnan(m) for m in too_low)
  fine = _logged_mfu(peak_flops_total=1e30)
  assert fine and all(0 < m < 1 for m in fine)
