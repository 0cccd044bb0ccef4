r"""Samples text from a training workdir's newest checkpoint with the recurrent decoding cache.

  python -m recurrentgemma_tpu.sample --workdir=workdirs/tiny --prompt="def main(" \
      [--max_new_tokens=128] [--temperature=0.8] [--top_k=40] [--seed=0] [--num_samples=1]

`--temperature=0` (the default) is greedy decoding. The prompt is processed in one prefill call;
each new token then costs one step of O(1) state per recurrent layer and a window of keys per
local-attention layer, whatever the length generated so far.
"""

from __future__ import annotations

import functools
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from recurrentgemma_tpu import experiment as experiment_lib
from recurrentgemma_tpu import workdir as workdir_lib

def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int, vocab_size: int) -> None:
  """Raises ValueError naming the bad argument."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
  if not 0 <= top_k <= vocab_size:
    raise ValueError(f"top_k={top_k} must be in [0, vocab_size={vocab_size}] (0 = no top-k filter).")


def choose_tokens(logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Next token per row: argmax when temperature is 0, else a (top-k) sample of softmax(logits/T)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth_BV = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model_config", "max_new_tokens", "temperature", "top_k"))
def generate(params: Any, prompt_BT: jax.Array, rng: jax.Array, *, model_config: Any,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0) -> jax.Array:
  """Continues each prompt row by `max_new_tokens` tokens.

  Args:
    params: model parameters.
    prompt_BT: int32 [B, T] prompt tokens (every row the same length, starting with BOS).
    rng: key for sampling (unused when greedy).
    model_config: the `recurrentgemma_tpu.model.ModelConfig` (hashable, static).
    max_new_tokens: how many tokens to generate.
    temperature, top_k: see `choose_tokens`.

  Returns:
    int32 [B, max_new_tokens] generated tokens.
  """
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  B, T = prompt_BT.shape
  cache = model_lib.init_cache(model_config, B, T + max_new_tokens)
  logits_BTV, cache = model_lib.decode(params, model_config, prompt_BT, cache)
  first = choose_tokens(logits_BTV[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)

  def step(carry, i):
    token_B, cache = carry
    logits_B1V, cache = model_lib.decode(params, model_config, token_B[:, None], cache)
    nxt = choose_tokens(logits_B1V[:, 0], jax.random.fold_in(rng, i), temperature, top_k)
    return (nxt, cache), token_B

  # Emits the token chosen in the previous step, so the last decode step is the only wasted one.
  (_, _), tokens_NB = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens + 1))
  return tokens_NB.T


def load_model(workdir: str) -> tuple[Any, Any]:
  """(Experiment, params of the newest checkpoint) of a training workdir."""
  import flax  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu.checkpoints import manager as ckpt_lib  # pylint: disable=g-import-not-at-top
  exp = experiment_lib.from_workdir(workdir, single_host=True)
  if not workdir_lib.checkpoint_steps(workdir):
    steps_dir = workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR)
    raise FileNotFoundError(f"--workdir={workdir} has no checkpoint yet ({steps_dir} holds no step): "
                            "sample once training has saved one.")
  abstract = jax.eval_shape(
      lambda: flax.core.meta.unbox(model_lib.init_params(exp.model, jax.random.key(0))))
  return exp, ckpt_lib.load_params(workdir, abstract)


def sample_text(workdir: str, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
                top_k: int = 0, seed: int = 0, num_samples: int = 1) -> list[str]:
  """Prompt continuations from the newest checkpoint of `workdir`, decoded to text."""
  from recurrentgemma_tpu.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  exp, params = load_model(workdir)
  model_config = exp.model
  check_sampling_args(max_new_tokens, temperature, top_k, model_config.vocab_size)
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1.")
  vocab = vocab_lib.Vocabulary(vocab_lib.existing_tokenizer_path(exp.data), model_config.vocab_size)
  # Documents start with BOS as their first input, exactly as the training rows do.
  ids = [vocab.bos_id] + vocab.encode(prompt)
  prompt_BT = jnp.asarray(np.tile(np.asarray(ids, np.int32), (num_samples, 1)))
  out = np.asarray(generate(params, prompt_BT, jax.random.key(seed), model_config=model_config,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k))
  texts = []
  for row in out.tolist():
    if vocab.eos_id in row:  # a finished document: drop what follows its end
      row = row[:row.index(vocab.eos_id)]
    texts.append(vocab.decode(row))
  return texts


def main(argv: list[str]) -> None:
  del argv  # cli.run refuses positional arguments
  f = flags.FLAGS
  texts = sample_text(f.workdir, f.prompt, max_new_tokens=f.max_new_tokens,
                      temperature=f.temperature, top_k=f.top_k, seed=f.seed,
                      num_samples=f.num_samples)
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f"--- sample {i}")
    print(f.prompt + text)


def run() -> None:
  """Console-script entry point (`rg-sample`)."""
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  # Defined here, not at import, so other commands (export_hf) can import this module's functions.
  flags.DEFINE_string("workdir", None, "Training workdir (written by the train command).")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate after the prompt.")
  flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 = greedy (argmax).")
  flags.DEFINE_integer("top_k", 0, "Sample only among the k most likely tokens; 0 = all.")
  flags.DEFINE_integer("seed", 0, "Sampling RNG seed.")
  flags.DEFINE_integer("num_samples", 1, "Independent continuations of the prompt.")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main, __doc__)


if __name__ == "__main__":
  run()
