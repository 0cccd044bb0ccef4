"""The Hugging Face bridge: export a training workdir to transformers, import a transformers checkpoint.

Export (`export`): the checkpoint's parameters are mapped exactly (`hf_mapping`), written into a
temporary directory beside the output (sharded safetensors, `config.json`, `generation_config.json`,
the run's tokenizer), loaded back with `AutoModelForCausalLM` / `AutoTokenizer` and run against our
JAX model on CPU in float32 on two sequences longer than the attention window. Only if the logits
agree (and the tokenizers encode a sample identically) is the manifest written and the directory
renamed into place (or uploaded, manifest last, for gs:// outputs).

Import (`load_params`, behind `--init_from=hf:DIR`): the tensors are mapped to the run's model
config, checked the same way against transformers' own forward pass, and placed on the run's mesh.

torch, transformers and safetensors (the `hf` extra) are imported only inside these functions.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Mapping

import numpy as np

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib
from recurrentgemma_tpu.checkpoints import hf_mapping
from recurrentgemma_tpu.model.config import LOCAL_ATTENTION, ModelConfig

MANIFEST = "export_manifest.json"
LOGITS_RTOL = 1e-4  # max |ours - HF| / max |HF| over the check's logits
SHARD_BYTES = 5 * 10**9  # safetensors shard size (transformers' long-standing default, "5GB")
CHECK_BATCH = 2
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_EXTRA_HINT = "pip install 'recurrentgemma_tpu[hf]' (torch, transformers, safetensors)"
# Texts the exported tokenizer must encode exactly like the SentencePiece model.
_TOKENIZER_PROBES = ("", " ", "  leading spaces", "trailing  ", "x\t\ty\n\n z", "\n\nstarts with newlines",
                     "héllo wörld 日本語 🙂", "def f(x):\n    return x + 1  # 42\n", "a  b   c")


class ExportRefused(exit_codes.UserError):
  """The export (or import) cannot be done exactly; nothing was written (exit 2)."""


def is_hf(init_from: str) -> bool:
  return init_from.startswith(hf_mapping.HF_PREFIX)


def hf_dir(init_from: str) -> str:
  return init_from[len(hf_mapping.HF_PREFIX):]


def _require_extra() -> None:
  """Exit 2 with the install hint when the hf extra is missing (found, not imported: cheap)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = [m for m in ("torch", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
  if missing:
    raise exit_codes.UserError(f"the Hugging Face bridge needs the hf extra ({', '.join(missing)} "
                               f"missing): {_EXTRA_HINT}")


# ------------------------------------------------------------------------------------ reading


def read_hf_config(directory: str) -> dict[str, Any]:
  """config.json of an HF checkpoint directory (local or gs://); FileNotFoundError if absent."""
  path = workdir_lib.join(directory, "config.json")
  if not workdir_lib.isdir(directory):
    raise FileNotFoundError(f"{directory!r} is not a directory")
  if not workdir_lib.exists(path):
    raise FileNotFoundError(f"{directory!r} has no config.json: not a transformers checkpoint")
  try:
    return json.loads(workdir_lib.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_importable(init_from: str, cfg: ModelConfig) -> None:
  """Config-only check of `--init_from=hf:DIR` against the run's model (no tensor read, no torch)."""
  _require_extra()
  try:
    hf_mapping.check_hf_config(read_hf_config(hf_dir(init_from)), cfg)
  except hf_mapping.NotExpressible as e:
    raise ValueError(f"init_from={init_from!r} cannot initialise this model exactly: {e}") from None
  except FileNotFoundError as e:
    raise FileNotFoundError(f"init_from={init_from!r}: {e}") from None


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of an HF checkpoint (single file or sharded with an index), as numpy arrays."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with _local_copy(directory) as local:
    index = os.path.join(local, _SAFETENSORS_INDEX)
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(local, "model.safetensors")):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"{directory!r} holds no model.safetensors or {_SAFETENSORS_INDEX}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
      tensors.update(load_file(os.path.join(local, name)))
    return tensors


class _local_copy:  # pylint: disable=invalid-name
  """A local path for a directory: itself, or a temporary download of a gs:// one."""

  def __init__(self, directory: str):
    self.directory = directory
    self._tmp: str | None = None

  def __enter__(self) -> str:
    if not workdir_lib.is_remote(self.directory):
      return self.directory
    from etils import epath  # pylint: disable=g-import-not-at-top
    self._tmp = tempfile.mkdtemp(prefix="hf-download-")
    for p in epath.Path(self.directory).iterdir():
      if p.is_file():
        (epath.Path(self._tmp) / p.name).write_bytes(p.read_bytes())
    return self._tmp

  def __exit__(self, *exc: Any) -> None:
    if self._tmp:
      shutil.rmtree(self._tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ the logits check


def check_length(cfg: ModelConfig) -> int:
  """Tokens per check sequence: past the local window (so window, cap and scale all act)."""
  if LOCAL_ATTENTION in cfg.block_types:
    return cfg.attention_window + 1 + 15
  return 64


def check_tokens(cfg: ModelConfig, seed: int = 0) -> np.ndarray:
  """Two seeded sequences of random token ids, [CHECK_BATCH, check_length(cfg)]."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, cfg.vocab_size, (CHECK_BATCH, check_length(cfg)), dtype=np.int64)


def our_logits(params: Any, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
  """Our model's float32 logits on the CPU backend (whatever the run's default devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  from recurrentgemma_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  f32 = cfg.replace(dtype="float32", param_dtype="float32", remat="none")
  cpu = jax.devices("cpu")[0]
  params32 = jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float32), cpu), params)
  with jax.default_device(cpu):
    return np.asarray(model_lib.apply(params32, f32, jax.device_put(tokens.astype(np.int32), cpu)))


def hf_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.from_numpy(tokens), use_cache=False).logits.float().numpy()


def load_hf_model(directory: str) -> Any:
  """transformers' model from `directory` in float32 on CPU, without remote code."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
  hf_logging.disable_progress_bar()
  model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                               trust_remote_code=False)
  return model.eval()


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
  """Figures of one logits comparison: errors, KL(HF || ours), argmax agreement."""
  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  lp, lq = log_softmax(theirs), log_softmax(ours)
  abs_err = float(np.max(np.abs(ours - theirs)))
  return {
      "max_abs_error": abs_err,
      "relative_error": abs_err / max(float(np.max(np.abs(theirs))), 1e-30),
      "max_kl": float(np.max(np.sum(np.exp(lp) * (lp - lq), -1))),
      "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
  }


def logits_check(model: Any, params: Any, cfg: ModelConfig) -> dict[str, Any]:
  """Runs both models on `check_tokens`; raises ExportRefused when they differ beyond LOGITS_RTOL."""
  tokens = check_tokens(cfg)
  figures = compare(our_logits(params, cfg, tokens), hf_logits(model, tokens))
  figures.update(sequences=int(tokens.shape[0]), tokens_per_sequence=int(tokens.shape[1]),
                 tolerance=LOGITS_RTOL)
  if not figures["relative_error"] <= LOGITS_RTOL:
    raise ExportRefused(
        f"transformers' logits differ from ours by {figures['relative_error']:.3g} relative "
        f"(max abs {figures['max_abs_error']:.3g}; tolerance {LOGITS_RTOL}) on {CHECK_BATCH} "
        f"sequences of {tokens.shape[1]} tokens; nothing was written")
  return figures


# ------------------------------------------------------------------------------------ writing


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def write_tensors(tensors: Mapping[str, np.ndarray], directory: str,
                  max_shard_bytes: int = SHARD_BYTES) -> list[str]:
  """Writes sharded safetensors (+ index when more than one shard); returns the file names."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in tensors:  # insertion order: embeddings, then layer by layer
    nbytes = tensors[key].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = tensors[key]
    size += nbytes
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    with open(os.path.join(directory, _SAFETENSORS_INDEX), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  return names


def _sp_proto(model_bytes: bytes) -> Any:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  return proto


def write_tokenizer(model_bytes: bytes, directory: str) -> str:
  """Writes the SentencePiece model as a transformers tokenizer; returns its tokenizer class.

  The tokenizer.json reproduces SentencePiece's BPE exactly (dummy prefix at the start of the text
  only, single-character user symbols as ordinary pieces, byte fallback); it is saved as a
  `GemmaTokenizer` when that class encodes the probes identically (Gemma's own layout: no dummy
  prefix), else as the generic `TokenizersBackend`. Raises ExportRefused if neither does.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from transformers.tokenization_utils_tokenizers import TokenizersBackend  # pylint: disable=g-import-not-at-top
  proto = _sp_proto(model_bytes)
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(model_bytes)
  piece = lambda i, default: sp.id_to_piece(i) if i >= 0 else default  # noqa: E731
  special = dict(bos_token=piece(sp.bos_id(), None), eos_token=piece(sp.eos_id(), None),
                 pad_token=piece(sp.pad_id(), None), unk_token=piece(sp.unk_id(), "<unk>"))
  with tempfile.TemporaryDirectory(prefix="spm-convert-") as tmp:
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
      f.write(model_bytes)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "GemmaTokenizer", "mask_token": None, **special}, f)
    converted = AutoTokenizer.from_pretrained(tmp)  # SentencePiece vocabulary and merges
    spec = json.loads(converted.backend_tokenizer.to_str())
  dummy = proto.normalizer_spec.add_dummy_prefix
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["special"] or len(t["content"]) > 1]
  spec["normalizer"] = {"type": "Sequence", "normalizers": (
      ([{"type": "Prepend", "prepend": "▁"}] if dummy else [])
      + [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}])}
  spec["pre_tokenizer"] = None
  spec["decoder"] = {"type": "Sequence", "decoders": (
      [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
       {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if dummy else []))}
  tokenizer = TokenizersBackend(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                add_bos_token=sp.bos_id() >= 0, add_eos_token=False,
                                **{k: v for k, v in special.items() if v is not None})
  tokenizer.save_pretrained(directory)
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(model_bytes)
  config_path = os.path.join(directory, "tokenizer_config.json")
  with open(config_path) as f:
    tokenizer_config = json.load(f)
  probes = tokenizer_probes()
  expected = [([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(t) for t in probes]
  for cls in ("GemmaTokenizer", "TokenizersBackend"):
    # No mask token: GemmaTokenizer would otherwise add one beyond the model's vocabulary.
    tokenizer_config.update(tokenizer_class=cls, add_bos_token=sp.bos_id() >= 0,
                            add_eos_token=False, mask_token=None)
    with open(config_path, "w") as f:
      json.dump(tokenizer_config, f, indent=2, sort_keys=True)
    loaded = AutoTokenizer.from_pretrained(directory)
    if len(loaded) == sp.vocab_size() and [loaded(t)["input_ids"] for t in probes] == expected:
      return cls
  raise ExportRefused("the run's SentencePiece tokenizer could not be written as a transformers "
                      "tokenizer that encodes identically; nothing was written")


def tokenizer_probes() -> list[str]:
  """Fixed edge cases plus the paragraphs of a few standard-library modules (code and prose)."""
  import json as json_module  # pylint: disable=g-import-not-at-top,reimported
  import textwrap  # pylint: disable=g-import-not-at-top
  texts = list(_TOKENIZER_PROBES)
  for module in (json_module, textwrap):
    with open(module.__file__, encoding="utf-8") as f:
      source = f.read()
    texts.append(source)
    texts += source.split("\n\n")[:40]
  return texts


# ------------------------------------------------------------------------------------ export


def check_export_args(workdir: str, output: str, step: int | None, dtype: str) -> int:
  """Every cheap check of an export request (exit 2 each); returns the step to export."""
  if dtype not in ("float32", "bfloat16"):
    raise exit_codes.UserError(f"--dtype={dtype!r} must be float32 or bfloat16")
  if not workdir_lib.exists(workdir_lib.join(workdir, workdir_lib.CONFIG_FILE)):
    raise exit_codes.UserError(f"--workdir={workdir} has no {workdir_lib.CONFIG_FILE}: not a "
                               "training workdir")
  steps = workdir_lib.checkpoint_steps(workdir)
  if not steps:
    raise exit_codes.UserError(f"--workdir={workdir} has no checkpoint to export "
                               f"({workdir_lib.join(workdir, workdir_lib.CHECKPOINT_DIR)} holds no step)")
  if step is not None and step not in steps:
    raise exit_codes.UserError(f"--step={step} is not a checkpoint of {workdir}; its steps are "
                               f"{steps}")
  if workdir_lib.exists(output):
    if not workdir_lib.isdir(output):
      raise exit_codes.UserError(f"--output={output} is a file; give a new or empty directory")
    entries = workdir_lib.listdir(output)
    if entries:
      raise exit_codes.UserError(f"--output={output} is not empty ({len(entries)} entries, e.g. "
                                 f"{sorted(entries)[0]!r}); give a new or empty directory")
  return steps[-1] if step is None else step


def export_params(params: Any, cfg: ModelConfig, vocab: Any, output: str, *, source: Mapping[str, Any],
                  dtype: str = "float32", max_shard_bytes: int = SHARD_BYTES,
                  log: Any = print) -> dict[str, Any]:
  """Exports `params` of `cfg` with tokenizer `vocab` (a data.vocab.Vocabulary) to `output`.

  `source` (e.g. workdir, step, config fingerprint) goes into the manifest. Raises ExportRefused
  (exit 2) for a model HF cannot express exactly (after logging the report) and for a failed
  logits or tokenizer check; in every such case `output` is left as it was.
  """
  report = hf_mapping.expressibility(cfg, dtype)
  if not report.exportable:
    for line in report.lines():
      log(line)
    raise ExportRefused("this model cannot be exported exactly to transformers' RecurrentGemma: "
                        + "; ".join(str(f) for f in report.findings))
  _require_extra()
  tensors = hf_mapping.to_hf(params, cfg, dtype)
  fields = hf_mapping.hf_config(cfg, pad_id=vocab.pad_id, eos_id=vocab.eos_id,
                                bos_id=vocab.bos_id, dtype=dtype)
  remote = workdir_lib.is_remote(output)
  parent = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(output.rstrip('/'))}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    files = _write_all(tmp, tensors, fields, vocab, max_shard_bytes)
    tokenizer_class = write_tokenizer(vocab.model_bytes, tmp)
    files += sorted(set(os.listdir(tmp)) - set(files))
    log(f"checking transformers against this model ({CHECK_BATCH} x {check_length(cfg)} tokens, "
        "CPU, float32) ...")
    # Ours with the values exactly as written (a bfloat16 export is compared at bfloat16 values).
    written = hf_mapping.from_hf(tensors, cfg)
    figures = logits_check(load_hf_model(tmp), written, cfg)
    manifest = _manifest(source, dtype, report, figures, tensors, tmp, files, tokenizer_class)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    _publish(tmp, output, files)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _write_all(directory: str, tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any],
               vocab: Any, max_shard_bytes: int) -> list[str]:
  from transformers import GenerationConfig, RecurrentGemmaConfig  # pylint: disable=g-import-not-at-top
  names = write_tensors(tensors, directory, max_shard_bytes)
  kwargs = {k: v for k, v in fields.items() if k not in ("model_type",)}
  RecurrentGemmaConfig(**kwargs).save_pretrained(directory)
  GenerationConfig(bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id,
                   pad_token_id=vocab.pad_id).save_pretrained(directory)
  return names + ([_SAFETENSORS_INDEX] if len(names) > 1 else []) + [
      "config.json", "generation_config.json"]


def _manifest(source: Mapping[str, Any], dtype: str, report: hf_mapping.Report,
              figures: Mapping[str, Any], tensors: Mapping[str, np.ndarray], directory: str,
              files: list[str], tokenizer_class: str) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  file_sums = {}
  for name in files:
    with open(os.path.join(directory, name), "rb") as f:
      file_sums[name] = sha256(f.read())
  return {
      "source": dict(source),
      "dtype": dtype,
      "rewrites": list(report.rewrites),
      "logits_check": dict(figures),
      "tokenizer_class": tokenizer_class,
      "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                      "sha256": sha256(np.ascontiguousarray(v).tobytes())}
                  for k, v in tensors.items()},
      "files": file_sums,
      "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
      "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _publish(tmp: str, output: str, files: list[str]) -> None:
  """Moves the verified directory into place: one rename locally, manifest last on object stores."""
  if not workdir_lib.is_remote(output):
    if os.path.isdir(output):
      os.rmdir(output)  # empty (checked); rename cannot replace a directory on every platform
    os.rename(tmp, output)
    return
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = epath.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  for name in files + [MANIFEST]:
    (out / name).write_bytes(open(os.path.join(tmp, name), "rb").read())


# ------------------------------------------------------------------------------------ import


def import_params(directory: str, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
  """(numpy params for `cfg`, check figures) from an HF checkpoint, certified by the logits check."""
  _require_extra()
  try:
    hf_mapping.check_hf_config(read_hf_config(directory), cfg)
    params = hf_mapping.from_hf(read_tensors(directory), cfg)
  except hf_mapping.NotExpressible as e:
    raise ExportRefused(f"hf:{directory} cannot initialise this model exactly: {e}") from None
  with _local_copy(directory) as local:
    figures = logits_check(load_hf_model(local), params, cfg)
  return params, figures


def load_params(init_from: str, cfg: ModelConfig, abstract_params: Any) -> Any:
  """`--init_from=hf:DIR`: the imported parameters laid out like `abstract_params` (dtype, sharding)."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  params, figures = import_params(hf_dir(init_from), cfg)
  logging.info("Imported %s: logits agree with transformers to %.3g relative (%d x %d tokens).",
               init_from, figures["relative_error"], figures["sequences"],
               figures["tokens_per_sequence"])

  def place(x: np.ndarray, target: Any) -> Any:
    x = np.asarray(x, target.dtype)
    return jax.make_array_from_callback(x.shape, target.sharding, lambda index: x[index])

  return jax.tree.map(place, params, abstract_params)
