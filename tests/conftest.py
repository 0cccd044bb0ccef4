"""Test-wide setup: 8 CPU devices, CPU platform only (libtpu is only used to compile)."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Several processes (xdist workers, subprocess tests) may compile for TPU topologies at once;
# libtpu otherwise refuses the second one on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


import glob  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Every `python -m recurrentgemma_tpu.train` the tests start (directly or through launch/) shares one
# JAX persistent compilation cache per test session (trainer.COMPILATION_CACHE_ENV), so each distinct
# program compiles once per session instead of once per subprocess; nothing lands in ~/.cache. Set
# the variable yourself to keep a cache across sessions. The test process's own jax does not use it.
_CACHE_ENV = "RECURRENTGEMMA_TPU_COMPILATION_CACHE"
_SESSION_CACHE = None if _CACHE_ENV in os.environ else tempfile.mkdtemp(prefix="rg_jax_cache_")
if _SESSION_CACHE:
  os.environ[_CACHE_ENV] = _SESSION_CACHE


# Both tiers run on two pytest-xdist workers with `--dist loadfile --no-loadscope-reorder` (xdist
# would otherwise order files by their number of tests): each file runs whole on one worker (its
# module fixtures are built once), handed out in collection order. The longest files of the tier
# therefore go first, longest first, so the two workers end together instead of one finishing a long
# file alone at the end. Seconds per file and tier: docs/benchmarks.md, "Test suite" (how they were
# measured); every other file keeps its place after these.
LONGEST_FIRST = {
    # Measured 2026-12-07 in one process at load 10-14: ~175, 160, 140, 135, 115, 90, 65, 60, 55 s.
    "fast": ("test_official.py", "test_data.py", "test_scan.py", "test_model.py", "test_sample.py",
             "test_pallas_tpu_aot.py", "test_train_step.py", "test_train_loop.py", "test_cli.py",
             "test_scan_sequence_parallel.py", "test_compile.py"),
    # The end-to-end files, by their CPU time in the slow tier (2026-12-07, measured per file:
    # ~440, 420, 310, 290, 250 CPU-s, ...; the files added since, estimated), so that --dist
    # loadfile starts the longest first and no long file is left to run alone at the end.
    "slow": ("test_data_store.py", "test_launch_local.py", "test_train_loop.py", "test_sharding.py",
             "test_resume.py", "test_sweep.py", "test_compile.py",
             "test_evaluate.py", "test_spikes.py", "test_executable.py", "test_hf_bridge.py",
             "test_profiling.py", "test_evaluate_hf.py", "test_launch_cost.py",
             "test_train_families.py", "test_data.py", "test_model_memory.py"),
}


def _tier(config) -> str:
  """`slow` for `-m slow`, else `fast` (the README's `-m "not slow"`, or no selection at all)."""
  return "slow" if (config.getoption("markexpr") or "").strip() == "slow" else "fast"


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST[_tier(config)])}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _remove_empty_tfds_temp_dirs():
  """TFDS's DatasetInfo.initialize_from_bucket leaves an empty mkdtemp("tfds") per builder it opens
  (the TFDS tests open several); the session removes the empty ones it created."""
  pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
  before = set(glob.glob(pattern))
  yield
  for path in set(glob.glob(pattern)) - before:
    try:
      os.rmdir(path)  # only succeeds on an empty directory
    except OSError:
      pass
