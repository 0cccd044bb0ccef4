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
