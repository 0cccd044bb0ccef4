"""Every config field, declared and commented once; presets override a few.

Each group is built by its own function so the concerns stay separate:
`model`, `data`, `optimizer`, `train`, `checkpoint`, `mesh`, `eval`, `spikes`.
"""

import ml_collections


def model() -> ml_collections.ConfigDict:
  """Model architecture (converted to recurrentgemma_tpu.model.ModelConfig).

  Defaults describe a small Griffin; presets (configs/ladder.py, recurrentgemma_*.py) override.
  """
  c = ml_collections.ConfigDict()
  # Single source of truth for the vocabulary: the data pipeline trains/accepts a tokenizer of
  # at most this size.
  c.vocab_size = 4096
  c.width = 256  # D, model width
  c.num_layers = 6  # residual blocks
  # Temporal-mixing pattern, repeated over the layers: a family name ('griffin' = recurrent,
  # recurrent, local_attention; 'hawk' = recurrent; 'mqa' = global_attention) or a
  # comma-separated list of 'recurrent' | 'local_attention' | 'global_attention'.
  c.block_pattern = "griffin"
  c.mlp_expansion = 3  # MLP hidden width = mlp_expansion * width (the paper's M = 3)
  c.num_heads = 2  # query heads of the MQA blocks (one shared key/value head)
  c.head_dim = 0  # 0: width // num_heads (reference code); the paper's ladder uses 128
  c.lru_width = 0  # D_RNN, RG-LRU width; 0: width
  # Blocks of the block-diagonal RG-LRU gates (also the model-parallel unit of the recurrence);
  # 0: num_heads, like the reference code and the published checkpoints; the paper uses 16.
  c.num_gate_blocks = 0
  c.conv_width = 4  # temporal width of the recurrent block's Conv1D
  c.attention_window = 1024  # local attention: a token sees itself and this many before it
  c.logits_soft_cap = 0.0  # tanh(logits / cap) * cap; 0 disables (RecurrentGemma: 30)
  c.embeddings_scale_by_sqrt_dim = False  # multiply input embeddings by sqrt(width) (RG: True)
  # RG-LRU Lambda init: 'code' draws a in [0.9, 0.999] (released code and checkpoints);
  # 'paper' draws a^8 in [0.9, 0.999] (Griffin paper section 2.4).
  c.lambda_init = "code"
  c.rope_fraction = 0.5  # fraction of each head's dims RoPE rotates (reference code: half)
  c.rope_base = 10_000.0  # RoPE max wavelength
  c.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (TPU presets use bfloat16)
  c.param_dtype = "float32"  # parameter storage dtype
  c.scan_layers = True  # scan over repeated block_pattern groups (fast compiles for deep models)
  # Rematerialisation per residual block: 'none' | 'block' (save nothing) | 'dots' (save matmul
  # outputs) | 'dots_no_batch' (save matmul outputs without batch dims, i.e. weight-like ones).
  # The last block, when it sits after the scanned groups, is never rematerialised.
  c.remat = "none"
  # RG-LRU scan implementation for pallas_kernels.linear_scan: 'auto' | 'xla_linear' |
  # 'xla_associative' | 'pallas_tpu' | 'pallas_gpu'.
  c.scan_impl = "auto"
  return c


def data_source(kind: str = "default", rate: float = 1.0, **overrides) -> ml_collections.ConfigDict:
  """One data source (an entry of `config.data.sources`); every field declared here."""
  c = ml_collections.ConfigDict()
  c.kind = kind  # default (embedded stdlib corpus) | tfds | files
  c.rate = rate  # mixing rate; only ratios between sources matter
  # kind=default: directory whose *.py files are the corpus; "" = this interpreter's stdlib.
  c.default_root = ""
  # kind=tfds: builder name (optionally with config/version, e.g. "c4/en:3.0.1"), data_dir
  # (local or gs://), and the builder's splits used for training and evaluation ("" = none).
  c.tfds_name = ""
  c.tfds_data_dir = ""
  c.train_split = "train"
  c.eval_split = "validation"
  # kind=files: comma-separated globs on any tf.io.gfile filesystem; eval_pattern "" holds out
  # validation_fraction of the documents instead. format: text (a document per file) | lines
  # (a document per line) | jsonl | tfrecord (tf.train.Example) | parquet (column text_key).
  c.pattern = ""
  c.eval_pattern = ""
  c.format = "text"
  c.text_key = "text"  # text field of tfds / jsonl / tfrecord records, column of parquet files
  c.validation_fraction = 0.02  # kind=default/files: documents held out by hash of their id
  c.max_documents = 0  # documents read per split; 0 = all
  # Shards the source is prepared in: the unit of parallel work (Beam workers, or the local
  # processes of a job). Changing it changes the rows (it is part of the data definition).
  c.num_shards = 1
  for key, value in overrides.items():
    c[key] = value  # raises on an undeclared field
  return c


def data() -> ml_collections.ConfigDict:
  """Data pipeline (recurrentgemma_tpu/data); the vocabulary size is config.model.vocab_size."""
  c = ml_collections.ConfigDict()
  # Named sources; more than one makes a mixture with their rates.
  c.sources = ml_collections.ConfigDict({"default": data_source("default")})
  c.seq_len = 1024  # T: tokens per packed row
  c.global_batch_size = 8  # B: rows per step over all processes
  c.eval_batch_size = 8
  c.num_eval_batches = 0  # 0 = the whole validation split
  c.seed = 0  # document shuffle before packing, row order of every epoch, mixture pattern
  c.tokenizer = ""  # SentencePiece .model path; "" = train one on the embedded corpus, cached
  # Local directory for the tokenizer and prepared stores; "" = $RECURRENTGEMMA_TPU_DATA_CACHE
  # or ~/.cache/recurrentgemma_tpu/data.
  c.cache_dir = ""
  # Root of stores prepared ahead with `python -m recurrentgemma_tpu.data.prepare --store=ROOT`
  # (a local directory or gs://BUCKET/PATH), read by every host without a local copy; training
  # never prepares into it and fails at start-up if it is missing or made for other settings.
  # "" = <cache_dir>/stores, prepared at train start when missing.
  c.store = ""
  c.prefetch_steps = 8  # batches read ahead from a gs:// store (memory: steps x local rows)
  c.read_threads = 16  # parallel range reads per process from a gs:// store
  return c


def optimizer() -> ml_collections.ConfigDict:
  """AdamW, schedule and clipping (recurrentgemma_tpu/optimizer.py)."""
  c = ml_collections.ConfigDict()
  # Peak learning rate, reached at the end of the linear warmup.
  c.learning_rate = 3e-4
  # Linear warmup from 0 to `learning_rate` over this many steps.
  c.warmup_steps = 1000
  # Length of the whole schedule (warmup included); cosine decays to
  # `learning_rate * final_lr_ratio` at this step and stays there after it.
  # 0: follow the run: the length is `train.steps` and the warmup at most a tenth of it, so
  # --config.train.steps=N moves the whole schedule with the run (also when a finished run is
  # extended). A number: kept as set.
  c.decay_steps = 0
  c.final_lr_ratio = 0.1
  # AdamW moments. b2=0.95 is the usual large-LM choice (the papers give none).
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  # Decoupled weight decay; never applied to norms, biases or RG-LRU params.
  c.weight_decay = 0.1
  # Global-norm gradient clipping threshold; 0 disables clipping.
  c.grad_clip_norm = 1.0
  # Coefficient of the z-loss (log Z)^2 that keeps the softmax normaliser near 1;
  # 0 disables it.
  c.z_loss = 0.0
  # Gradient accumulation: the global batch is split into this many
  # micro-batches, processed sequentially inside one step. On a CPU host 2
  # can be faster than 1: fewer temporaries, fewer page faults per step.
  c.num_microbatches = 1
  # dtype of the Adam moments: "float32" or "bfloat16" (halves their memory).
  c.mu_dtype = "float32"
  return c


def train() -> ml_collections.ConfigDict:
  """Training loop (recurrentgemma_tpu/train.py)."""
  c = ml_collections.ConfigDict()
  # Number of optimizer steps to run in total (a resumed run continues up to it).
  c.steps = 10_000
  # Seed of parameter initialisation and of the per-step RNG key carried in the train state.
  c.seed = 0
  # Fetch, check (NaN/Inf) and write training metrics every this many steps.
  c.log_every = 50
  # Evaluate on the validation split every this many steps (0: only the final evaluation); the
  # batches are config.data.eval_batch_size x num_eval_batches.
  c.eval_every = 1000
  # Peak FLOP/s per device used for MFU; 0 takes the chip table in sharding/ on TPU/GPU and a
  # measured matmul peak on CPU (where no datasheet number applies).
  c.peak_flops_per_device = 0.0
  return c


def checkpoint() -> ml_collections.ConfigDict:
  """Orbax checkpointing (recurrentgemma_tpu/checkpoints)."""
  c = ml_collections.ConfigDict()
  # Save every this many steps (0: only on preemption and at the end of training).
  c.save_every = 1000
  # Keep the newest this many checkpoints ...
  c.keep_last = 3
  # ... plus, forever, every checkpoint whose step is a multiple of this (0: none); must be a
  # multiple of save_every.
  c.keep_every = 0
  # Write checkpoints in a background thread while training continues.
  c.async_save = True
  # Start from the parameters (not the optimizer state) of this checkpoint: a workdir, a training
  # checkpoint directory or step, or a parameters-only checkpoint (e.g. converted from the published
  # RecurrentGemma format). Ignored when the workdir already holds a checkpoint to resume from.
  c.init_from = ""
  return c


def mesh() -> ml_collections.ConfigDict:
  """Device mesh and partitioning strategy (sharding/)."""
  c = ml_collections.ConfigDict()
  # Partitioning strategy: one logical-axis rule table in sharding/rules.py.
  # "griffin": the paper's Megatron tensor parallelism on `model` + ZeRO-3 on
  # `fsdp` + sequence parallelism on `seq`; "fsdp": ZeRO-3 only; "dp": pure
  # data parallelism (replicated parameters).
  c.strategy = "griffin"
  # Mesh axis sizes within one slice (ICI). Exactly one may be -1, meaning
  # "all remaining devices"; their product must equal the devices per slice.
  c.data = 1
  c.fsdp = -1
  c.model = 1
  c.seq = 1
  # Number of TPU slices joined over DCN; the `slice` axis shards the batch.
  c.num_slices = 1
  return c


def eval_config() -> ml_collections.ConfigDict:
  """Downstream evaluation with lm-eval-harness (recurrentgemma_tpu/downstream, docs/evaluation.md).

  The same settings drive `python -m recurrentgemma_tpu.evaluate` (whose flags override them).
  """
  c = ml_collections.ConfigDict()
  # Evaluate the downstream tasks every this many training steps (0: never during training; the
  # evaluate command still works on any checkpoint). Needs the `eval` extra (lm-eval).
  c.every = 0
  # Comma-separated lm-eval task, group or tag names; "rg_stdlib" is the offline tasks shipped
  # with the package (next-line choice, line completion, perplexity on held-out stdlib modules).
  c.tasks = "rg_stdlib"
  c.limit = 0  # documents per task (0: all); a quick signal during training
  c.num_fewshot = -1  # few-shot examples per prompt; -1: each task's own default
  c.batch_size = 8  # rows per forward pass (rounded up to a multiple of the mesh's batch shards)
  c.max_length = 0  # tokens per packed row, and lm-eval's max_length; 0: data.seq_len
  # Start every context with BOS, as the training rows do (lm-eval has no BOS rule for this model).
  c.add_bos = True
  # Run a context shared by several continuations (multiple choice) once and branch its recurrent
  # state per continuation; False packs every request whole (same numbers, more work).
  c.shared_context = True
  return c


def spikes() -> ml_collections.ConfigDict:
  """Loss-spike recovery (recurrentgemma_tpu/spikes.py, docs/training.md "Loss spikes")."""
  c = ml_collections.ConfigDict()
  # Off: a NaN/Inf loss or gradient norm stops the run (exit 3) and nothing else is checked. On: a
  # spike rolls back to the newest checkpoint before it and skips the data trained on since then.
  c.enabled = False
  # A finite loss above factor x the median of the previous `window` losses is a spike candidate ...
  c.factor = 3.0
  # ... and this many candidates in a row make a spike (a NaN/Inf loss or gradient norm always does).
  c.consecutive = 5
  c.window = 100  # losses in the running median; no candidate before this many steps are known
  # Rollbacks allowed over the whole run; the spike after the last one stops the run with exit 3.
  c.max_rollbacks = 3
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model()
  config.data = data()
  config.optimizer = optimizer()
  config.train = train()
  config.checkpoint = checkpoint()
  config.mesh = mesh()
  config.eval = eval_config()
  config.spikes = spikes()
  return config
