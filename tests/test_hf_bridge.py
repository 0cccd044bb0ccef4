"""The Hugging Face bridge against transformers itself (torch on CPU, float32): export, load, logits,
greedy generation, tokenizer, import back, `--init_from=hf:DIR`, and the refusal of a ladder point."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from configs import ladder  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import recurrentgemma  # pylint: disable=g-import-not-at-top,wrong-import-position
from recurrentgemma_tpu import experiment as experiment_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import model as model_lib  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import sample  # pylint: disable=wrong-import-position
from recurrentgemma_tpu import trainer  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.checkpoints import export_hf  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.checkpoints import hf_bridge  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.checkpoints import manager as ckpt  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.data import config as data_config  # pylint: disable=wrong-import-position
from recurrentgemma_tpu.data import vocab as vocab_lib  # pylint: disable=wrong-import-position
from test_train_common import REPO, small_config, subprocess_env  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow

VOCAB = 1024
WINDOW = 16
_SHAPE_FIELDS = ("block_pattern", "num_heads", "head_dim", "lru_width", "num_gate_blocks",
                 "logits_soft_cap", "embeddings_scale_by_sqrt_dim", "mlp_expansion")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """The project's embedded-tokenizer recipe (BPE, byte fallback, dummy prefix), on a small corpus."""
  path = str(tmp_path_factory.mktemp("tok") / "sp.model")
  source = data_config.SourceConfig(
      name="default", kind="default", rate=1.0, default_root=os.path.join(REPO, "recurrentgemma_tpu"),
      tfds_name="", tfds_data_dir="", train_split="", eval_split="", pattern="", eval_pattern="",
      format="text", text_key="", validation_fraction=0.02, max_documents=0, num_shards=1)
  vocab_lib._train(source, VOCAB, path)  # pylint: disable=protected-access
  return path


def _shrunk(preset, divide: int, layers: int, tokenizer: str, **model):
  """A real preset's architecture choices at 1/`divide` of its widths, in the small training run."""
  m = preset.model
  fields = {f: m[f] for f in _SHAPE_FIELDS}
  fields.update(width=m.width // divide, head_dim=(m.head_dim // divide if m.head_dim else 0),
                lru_width=(m.lru_width // divide if m.lru_width else 0), num_layers=layers,
                attention_window=WINDOW, vocab_size=VOCAB, dtype="float32")
  fields.update(model)
  return small_config(data__tokenizer=tokenizer, **{f"model__{k}": v for k, v in fields.items()})


def _workdir(path, config, seed=0):
  """A training workdir (config.json + checkpoint step 3) holding sharpened random parameters."""
  exp = experiment_lib.build(config, num_devices=1)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(exp.to_json())
  # x3 sharpens the random model's distribution so greedy choices are not near-ties.
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0,
                        model_lib.init_params(exp.model, jax.random.key(seed)))
  m = ckpt.CheckpointManager(os.path.join(path, "checkpoints"), ckpt.CheckpointOptions(1, 3, 0, False))
  m.save(3, params, {"step": np.int32(3)}, {})
  m.close()
  return str(path), exp.model, params


def _griffin(tok):
  """Ladder griffin,100m shrunk 8x and made exportable with the ladder's own rule."""
  config = _shrunk(ladder.get_config("griffin,100m"), 8, 4, tok)
  ladder.make_exportable(config.model)
  return config


SHAPES = {
    "griffin": _griffin,
    # 200m: 16 gate blocks over 8 heads, densified on export; lru_width != width.
    "hawk": lambda tok: _shrunk(ladder.get_config("hawk,200m,hf"), 8, 2, tok),
    "mqa": lambda tok: _shrunk(ladder.get_config("mqa,1b,hf"), 16, 2, tok),
    # 5 layers = one (R, R, A) group + an (R, R) remainder, like 26 = 8 x 3 + 2.
    # (Heads 10 -> 2 keeps head_dim = width / heads whole at width 128.)
    "recurrentgemma_2b": lambda tok: _shrunk(recurrentgemma.get_config("2b"), 20, 5, tok,
                                             num_heads=2),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tokenizer, tmp_path_factory):
  root = tmp_path_factory.mktemp(request.param)
  workdir, cfg, params = _workdir(root / "wd", SHAPES[request.param](tokenizer))
  out = str(root / "hf")
  manifest = export_hf.export(workdir, out, max_shard_bytes=400_000, log=lambda _: None)
  return request.param, cfg, params, out, manifest


def test_transformers_loads_the_export_and_its_logits_equal_ours(exported):
  name, cfg, params, out, manifest = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(model).__name__ == "RecurrentGemmaForCausalLM"
  assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1  # sharded
  tokens = np.random.default_rng(1).integers(3, VOCAB, (2, 2 * WINDOW + 7))  # > the window
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens), use_cache=False).logits.numpy()
  ours = np.asarray(model_lib.apply(params, cfg, jnp.asarray(tokens, jnp.int32)))
  assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs)), name
  assert manifest["logits_check"]["relative_error"] <= 1e-4
  assert manifest["logits_check"]["tokens_per_sequence"] > WINDOW


def test_greedy_generate_equals_our_sampler(exported):
  name, cfg, params, out, _ = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # our sampler does not stop at EOS
  prompt = np.concatenate([[2], np.random.default_rng(2).integers(3, VOCAB, 9)])[None]
  new = 2 * WINDOW  # prompt + generated tokens run past the local window
  # transformers 5.25 cannot generate with its cache for a model without attention layers
  # (DynamicCache.get_mask_sizes raises), so Hawk generates without it (docs/model.md).
  use_cache = name != "hawk"
  with torch.no_grad():
    theirs = model.generate(torch.from_numpy(prompt), max_new_tokens=new, do_sample=False,
                            use_cache=use_cache)[0, prompt.shape[1]:].numpy()
  ours = np.asarray(sample.generate(params, jnp.asarray(prompt, jnp.int32), jax.random.key(0),
                                    model_config=cfg, max_new_tokens=new))[0]
  np.testing.assert_array_equal(theirs, ours)


def test_tokenizer_loads_and_encodes_like_ours(exported, tokenizer):
  _, _, _, out, manifest = exported
  tok = transformers.AutoTokenizer.from_pretrained(out)
  vocab = vocab_lib.Vocabulary(tokenizer, VOCAB)
  for text in ("def f(x):\n\treturn  x + 1", "  two leading spaces", "héllo 🙂"):
    assert tok(text)["input_ids"] == [vocab.bos_id] + vocab.encode(text)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
  assert manifest["tokenizer_class"] in ("GemmaTokenizer", "TokenizersBackend")


def test_export_then_import_round_trips_bitwise_and_the_manifest_checksums_hold(exported):
  _, cfg, params, out, manifest = exported
  back, figures = hf_bridge.import_params(out, cfg)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), back)
  assert figures["relative_error"] <= 1e-4
  tensors = hf_bridge.read_tensors(out)
  assert set(tensors) == set(manifest["tensors"])
  for key, value in tensors.items():
    assert hf_bridge.sha256(np.ascontiguousarray(value).tobytes()) == manifest["tensors"][key]["sha256"]
  for name, digest in manifest["files"].items():
    with open(os.path.join(out, name), "rb") as f:
      assert hf_bridge.sha256(f.read()) == digest


def test_init_from_hf_starts_training_from_the_exported_parameters(exported, tmp_path, tokenizer):
  name, cfg, params, out, _ = exported
  if name != "recurrentgemma_2b":
    pytest.skip("one shape is enough for the trainer path")
  config = SHAPES[name](tokenizer)
  config.checkpoint.init_from = f"hf:{out}"
  t = trainer.Trainer(experiment_lib.build(config), str(tmp_path / "work"))
  state, step = t.initial_state()
  t.ckpt.close()
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.tree.map(np.asarray, params))


def test_bfloat16_export_stores_bfloat16_and_still_agrees(tokenizer, tmp_path):
  workdir, cfg, params, = _workdir(tmp_path / "wd", SHAPES["recurrentgemma_2b"](tokenizer))
  manifest = export_hf.export(workdir, str(tmp_path / "hf"), dtype="bfloat16", log=lambda _: None)
  tensors = hf_bridge.read_tensors(str(tmp_path / "hf"))
  assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
  assert manifest["logits_check"]["relative_error"] <= 1e-4
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"


def test_a_ladder_point_is_refused_with_the_report_and_nothing_is_written(tokenizer, tmp_path):
  config = _shrunk(ladder.get_config("griffin,100m"), 8, 4, tokenizer)
  workdir, _, _ = _workdir(tmp_path / "wd", config)
  out = tmp_path / "hf"
  proc = subprocess.run([sys.executable, "-m", "recurrentgemma_tpu.checkpoints.export_hf",
                         f"--workdir={workdir}", f"--output={out}"], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  # One error line, last; TensorFlow's native start-up notice (oneDNN) may precede it.
  errors = [l for l in lines if l.startswith(("error", "Traceback"))]
  assert errors == lines[-1:] and errors[0].startswith("error: "), proc.stderr[-3000:]
  assert "logits_soft_cap=0.0" in errors[0] and "lru_width=128" in errors[0]
  report = proc.stdout
  assert "not expressible" in report and "logits_soft_cap = 0.0" in report
  assert "lru_width = 128: HF splits the RG-LRU gates into num_heads=6 blocks" in report
  assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_a_gemma_layout_tokenizer_without_dummy_prefix_is_written_as_gemma_tokenizer(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  text = tmp_path / "text.txt"
  with open(os.path.join(REPO, "recurrentgemma_tpu", "model", "rglru.py")) as f:
    text.write_text(f.read())
  # Gemma's own settings: BPE, byte fallback, no dummy prefix, pad/eos/bos/unk = 0/1/2/3.
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / "gemma"), vocab_size=600, model_type="bpe",
      byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
  with open(tmp_path / "gemma.model", "rb") as f:
    model_bytes = f.read()
  out = tmp_path / "tok"
  out.mkdir()
  assert hf_bridge.write_tokenizer(model_bytes, str(out)) == "GemmaTokenizer"
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert type(tok).__name__ == "GemmaTokenizer" and len(tok) == 600
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "gemma.model"))
  for t in ("def f(x):\n  return x", " leading", "héllo"):
    assert tok(t)["input_ids"] == [2] + sp.encode(t)
