r"""Train-step throughput: tokens/s and MFU for Griffin, Hawk and MQA of the same size (Griffin Fig. 3).

  python benchmarks/train_step.py                         # 3 families x T in {2048, 8192}
  python benchmarks/train_step.py --design_target --reference   # the design's 21M Griffin
  python benchmarks/train_step.py --design_target --reference --num_microbatches=1,2

Each row times the real jitted train step (loss + grad + AdamW, donated state, the mesh of all local
devices) on random tokens after a compile/warm-up step. MFU counts model FLOPs
(`model.flops.training_flops_per_token`) against the chip table's peak on TPU and a measured matmul
peak on CPU. `--reference` also times the `recurrentgemma` package (if installed) on the same model
and prints the ratio, by wall time and by process CPU time (`cpu_s`, all threads; steadier than wall
time when other jobs share the CPU), timing the two alternately step by step. `faults` counts the
minor page faults of a step: on a CPU host each step's temporaries are fresh memory from the OS.
"""

import functools
import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import metrics as metrics_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.model import flops as flops_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import data as data_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import step_functions  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import trainer  # pylint: disable=wrong-import-position
from sharding import mesh as mesh_lib  # pylint: disable=wrong-import-position

_FAMILIES = flags.DEFINE_list("families", ["griffin", "hawk", "mqa"], "Block patterns to compare.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192"], "Sequence lengths T.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 8192, "Batch size is this divided by T (at least 1).")
_WIDTH = flags.DEFINE_integer("width", 512, "Model width D (heads = D / 128, as in the paper).")
_LAYERS = flags.DEFINE_integer("layers", 6, "Residual blocks.")
_VOCAB = flags.DEFINE_integer("vocab", 4096, "Vocabulary size.")
_WINDOW = flags.DEFINE_integer("window", 1024, "Local-attention window (the paper's 1024 at T=2048).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row and implementation (after one "
                              "compile/warm-up step each); the table shows their medians.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Compute dtype; auto = float32 on CPU, bfloat16 elsewhere.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy (model.remat).")
_SCAN_LAYERS = flags.DEFINE_enum(
    "scan_layers", "auto", ["auto", "true", "false"], "model.scan_layers; auto = unrolled on CPU, "
    "where the scan's stacked residuals cost ~6% of a 6-layer step and compiling 2 groups is quick.")
_DESIGN = flags.DEFINE_bool(
    "design_target", False, "Only the design's target config: Griffin, width 512, 6 layers, vocab "
    "4096, T=1024, batch 4 (lru_width = width and window = T, like the reference package's default).")
_REFERENCE = flags.DEFINE_bool("reference", False, "Also time the reference recurrentgemma package.")
_MICROBATCHES = flags.DEFINE_list(
    "num_microbatches", ["1"], "optimizer.num_microbatches of our step, one row per value (e.g. "
    "1,2): gradient accumulation, the same update with 1/n of the activations live at a time. "
    "The reference step has none.")


def experiment(family: str, seq_len: int, batch: int,
               microbatches: int = 1) -> experiment_lib.Experiment:
  """configs/base.py with this row's model and batch, validated like a training run."""
  dtype = _DTYPE.value
  if dtype == "auto":
    dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
  # The paper's D_RNN ~ 4D/3 (Table 2), rounded to a multiple of 128 so the gate blocks divide it.
  lru_width = _WIDTH.value if _DESIGN.value else max(round(4 * _WIDTH.value / 3 / 128), 1) * 128
  window = seq_len if _DESIGN.value else min(_WINDOW.value, seq_len)
  scan_layers = (jax.devices()[0].platform != "cpu" if _SCAN_LAYERS.value == "auto"
                 else _SCAN_LAYERS.value == "true")
  overrides = {
      "model.vocab_size": _VOCAB.value, "model.width": _WIDTH.value, "model.num_layers": _LAYERS.value,
      "model.block_pattern": family, "model.num_heads": max(_WIDTH.value // 128, 1),
      "model.lru_width": lru_width, "model.attention_window": window, "model.dtype": dtype,
      "model.remat": _REMAT.value, "model.scan_layers": scan_layers, "data.seq_len": seq_len,
      "data.global_batch_size": batch,
      "data.eval_batch_size": batch, "optimizer.warmup_steps": 10, "optimizer.decay_steps": 1000,
      "optimizer.num_microbatches": microbatches}
  config = experiment_lib.load_config(os.path.join(_ROOT, "configs", "base.py"),
                                      [f"{k}={v}" for k, v in overrides.items()])
  return experiment_lib.build(config)


def random_batch(batch: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
          "loss_weights": np.ones((batch, seq_len), np.float32)}


def _usage() -> tuple[float, float, int]:
  """(wall seconds, process CPU seconds of all threads, minor page faults) so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt


class Timed:
  """One implementation's jitted step, its (donated) state and batch, and the timed steps so far."""

  def __init__(self, name: str, step, state, batch):
    self.name, self.step, self.state, self.batch = name, step, state, batch
    self.samples = []  # (wall s, CPU s, minor faults) per timed step
    self.first_s = self.run()[0]  # compile + first step

  def run(self) -> tuple[float, float, int]:
    before = _usage()
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return tuple(b - a for a, b in zip(before, _usage()))

  def median(self, i: int) -> float:
    return float(np.median([s[i] for s in self.samples]))


def time_interleaved(impls: list[Timed], steps: int) -> None:
  """Times `steps` steps of each implementation, alternating them step by step (A B, B A, ...).

  Back-to-back blocks of steps let the host's drift (this VM's speed moves by 10-20% over
  minutes) land on one implementation; alternating spreads it over both, and the medians drop
  single outliers. CPU seconds are the whole process's (all its threads): with other jobs on
  the host they move far less than wall time.
  """
  for r in range(steps):
    for impl in (impls if r % 2 == 0 else impls[::-1]):
      impl.samples.append(impl.run())


def build_ours(exp: experiment_lib.Experiment, name: str = "ours") -> Timed:
  mesh = mesh_lib.create_mesh(exp.mesh)
  fns = step_functions.build_step_functions(exp.model, exp.optimizer, mesh, exp.mesh.strategy)
  state = fns.create_state(jax.random.key(0))
  batch = random_batch(exp.data.global_batch_size, exp.data.seq_len, exp.model.vocab_size)
  batch = data_lib.to_global_arrays(batch, fns.batch_shardings["inputs"], exp.data.global_batch_size)
  return Timed(name, fns.train_step, state, batch)


def build_reference(exp: experiment_lib.Experiment) -> Timed:
  """The same model in the reference package, with a plain jitted loss + grad + AdamW step."""
  mc, batch, seq_len = exp.model, exp.data.global_batch_size, exp.data.seq_len
  import recurrentgemma.jax as rg  # pylint: disable=g-import-not-at-top
  kinds = {"recurrent": rg.TemporalBlockType.RECURRENT,
           "local_attention": rg.TemporalBlockType.ATTENTION,
           "global_attention": rg.TemporalBlockType.ATTENTION}
  cfg = rg.GriffinConfig(
      vocab_size=mc.vocab_size, width=mc.width, mlp_expanded_width=mc.mlp_width,
      num_heads=mc.num_heads, block_types=tuple(kinds[b] for b in mc.block_types),
      embeddings_scale_by_sqrt_dim=mc.embeddings_scale_by_sqrt_dim,
      attention_window_size=mc.attention_window, logits_soft_cap=mc.logits_soft_cap,
      lru_width=mc.lru_width_)
  model = rg.Griffin(cfg, dtype=mc.compute_dtype)
  b = {k: jnp.asarray(v) for k, v in random_batch(batch, seq_len, mc.vocab_size).items()}
  params = model.init(jax.random.key(0), b["inputs"], b["positions"])
  tx = optax.adamw(1e-3)

  def loss_fn(p, b):
    logits, _ = model.apply(p, b["inputs"], b["positions"], return_cache=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), b["targets"]).mean()

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, b):
    p, o = state
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    u, o = tx.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  return Timed("reference", step, (params, tx.init(params)), b)


def main(argv):
  del argv
  if _DESIGN.value:
    rows = [("griffin", 1024, 4)]
  else:
    rows = [(f, int(t), max(_TOKENS.value // int(t), 1)) for t in _SEQ_LENS.value for f in _FAMILIES.value]
  peak = trainer.peak_flops_per_device() * jax.device_count()
  device = jax.devices()[0]
  print(f"# {jax.device_count()} x {device.device_kind} ({device.platform}); peak used for MFU "
        f"{peak / 1e9:.1f} GFLOP/s in total; jax {jax.__version__}; load average "
        f"{os.getloadavg()[0]:.1f}; medians of {_STEPS.value} timed steps"
        + (", ours and the reference alternating" if _REFERENCE.value else ""))
  print(f"{'impl':<10} {'family':<8} {'T':>6} {'B':>3} {'params':>9} {'compile_s':>9} {'step_s':>8} "
        f"{'tokens/s':>10} {'MFU':>6} {'cpu_s':>8} {'faults':>8}")
  microbatches = [int(n) for n in _MICROBATCHES.value]
  # Every row's configs are built (and so validated) before the first compile: a micro-batch count
  # that does not divide a row's batch fails now, not after the rows before it were timed.
  plans = [(family, seq_len, batch, {n: experiment(family, seq_len, batch, n) for n in microbatches})
           for family, seq_len, batch in rows]
  for family, seq_len, batch, exps in plans:
    exp = exps[microbatches[0]]  # the model is the same in each; the reference runs it in one pass
    n_params, _ = flops_lib.param_counts(exp.model)
    flops = flops_lib.training_flops_per_token(exp.model, seq_len)
    impls = [build_ours(exps[n], "ours" if microbatches == [1] else f"ours/mb{n}")
             for n in microbatches]
    if _REFERENCE.value:
      impls.append(build_reference(exp))
    time_interleaved(impls, _STEPS.value)
    for impl in impls:
      step_s = impl.median(0)
      tps = batch * seq_len / step_s
      mfu = metrics_lib.mfu(tps, flops, peak)
      print(f"{impl.name:<10} {family:<8} {seq_len:>6} {batch:>3} {n_params / 1e6:>8.1f}M "
            f"{impl.first_s:>9.1f} {step_s:>8.3f} {tps:>10.0f} {mfu:>6.1%} {impl.median(1):>8.2f} "
            f"{impl.median(2):>8.0f}", flush=True)
    if _REFERENCE.value:
      ref = impls[-1]
      for ours in impls[:-1]:
        print(f"{ours.name} vs reference: {ref.median(0) / ours.median(0):.2f}x tokens/s (wall), "
              f"{ref.median(1) / ours.median(1):.2f}x per process-CPU second (medians)", flush=True)
      print(f"# load average now {os.getloadavg()[0]:.1f}", flush=True)
    del impls  # frees this row's states before the next row builds its own


if __name__ == "__main__":
  app.run(main)
