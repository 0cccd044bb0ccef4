r"""Downstream-evaluation throughput: our lm-eval adapter against lm-eval's HF backend, same CPU.

  JAX_PLATFORMS=cpu python benchmarks/evaluate.py [--limit=100] [--width=128] [--layers=6] \
      [--batch_size=8] [--repeats=2]

Builds a Griffin that transformers expresses (the tiny preset's shape with the soft cap and the
embedding scale on, random weights, the 1024-piece embedded tokenizer), exports it with
`checkpoints.export_hf`, and times `loglikelihood` on the offline multiple-choice task
(`rg_stdlib_next_line`, 4 choices per question) three ways: ours with shared contexts, ours with
every request packed whole, and lm-eval's `HFLM` on the export (torch, float32). Each is run once
to warm up (compiles, caches), then timed `--repeats` times; the best time counts. Needs the
`eval` and `hf` extras.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_LIMIT = flags.DEFINE_integer("limit", 100, "Questions (4 requests each).")
_WIDTH = flags.DEFINE_integer("width", 128, "Model width.")
_LAYERS = flags.DEFINE_integer("layers", 6, "Residual blocks.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass (both backends).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per backend (best counts).")
TASK = "rg_stdlib_next_line"
ROW_LEN = 512
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir(path: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.checkpoints import manager as ckpt  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.vocab_size = 1024
  config.model.width = config.model.lru_width = _WIDTH.value
  config.model.num_layers = _LAYERS.value
  config.model.logits_soft_cap = 30.0
  config.model.embeddings_scale_by_sqrt_dim = True
  config.data.sources.default.max_documents = 400
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  cfg = model_lib.ModelConfig.from_config(config.model)
  params = jax.tree.map(np.asarray, model_lib.init_params(cfg, jax.random.key(0)))
  m = ckpt.CheckpointManager(os.path.join(path, "checkpoints"), ckpt.CheckpointOptions(1, 1, 0, False))
  m.save(1, params, {"step": np.int32(1)}, {})
  m.close()


def _time(fn, repeats: int) -> float:
  fn()  # warm-up: compiles (ours), allocator and caches (both)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main(argv: list[str]) -> None:
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.downstream import harness, loading, registry, scoring  # pylint: disable=g-import-not-at-top

  root = tempfile.mkdtemp(prefix="rg_eval_bench_")
  workdir, out = os.path.join(root, "run"), os.path.join(root, "hf")
  _workdir(workdir)
  subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.checkpoints.export_hf",
                  f"--workdir={workdir}", f"--output={out}"], cwd=REPO, check=True,
                 capture_output=True)
  task = registry.task_manager([TASK]).load([TASK])["tasks"][TASK]
  task.build_all_requests(limit=_LIMIT.value, rank=0, world_size=1)
  requests = task.instances
  exp = loading.load_experiment(workdir)
  fns, params = loading.load_params(exp, workdir, 1)
  vocab = loading.existing_vocabulary(exp)
  scorer = scoring.Scorer(fns, params, row_len=ROW_LEN, batch_rows=_BATCH.value)
  backends = {
      "ours, shared contexts": harness.JaxLM(scorer, vocab),
      "ours, every request packed": harness.JaxLM(scorer, vocab, shared_context=False),
      "lm-eval HFLM (torch)": HFLM(
          pretrained=transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32),
          tokenizer=transformers.AutoTokenizer.from_pretrained(out), add_bos_token=True,
          max_length=ROW_LEN, batch_size=_BATCH.value, device="cpu"),
  }
  print(f"{len(requests)} loglikelihood requests ({TASK}, {_LIMIT.value} questions), width "
        f"{_WIDTH.value}, {_LAYERS.value} layers, batch {_BATCH.value}, "
        f"torch threads {torch.get_num_threads()}")
  rates = {}
  for name, lm in backends.items():
    seconds = _time(lambda lm=lm: lm.loglikelihood(requests, disable_tqdm=True), _REPEATS.value)
    rates[name] = len(requests) / seconds
    print(f"{name:<30} {seconds:8.2f} s  {rates[name]:8.1f} requests/s", flush=True)
  hf = rates["lm-eval HFLM (torch)"]
  for name, rate in rates.items():
    print(f"{name:<30} {rate / hf:6.2f}x the HF backend")
  print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
  app.run(main)
