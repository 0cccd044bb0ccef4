"""Compile once: the train step's executable, saved with what it was built for, loaded by the hosts.

The launcher's fit check (`python -m recurrentgemma_tpu.compile --save_executable=PATH`) already
compiles the real train step for the target on a CPU host; the launcher ships that file in the run
directory (`workdir.EXECUTABLE_FILE`), and each host of the job loads it instead of compiling.

An executable is only valid for the program, devices and software it was compiled for, so the file
carries a `Signature` and a host loads it only when its own matches field by field: the topology
(platform, device kind and count, process count, mesh, the device assignment), the jax, jaxlib and
libtpu versions, the compiler's environment (XLA_FLAGS, LIBTPU_INIT_ARGS), the experiment fingerprint
and the lowered program itself (input shapes, dtypes and shardings, donation, the computation). On any
difference, or a file that cannot be read, the host compiles (through the persistent compilation
cache) after a one-line warning that says why: a refused executable costs a compile, never a run.

File format: a magic line, one line of signature JSON, then the pickle of `serialize_executable`'s
payload and pytree definitions (readable only with the same jax, which the signature checks first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pickle
import re
from typing import Any, Callable

import jax
from jax.experimental import serialize_executable

from recurrentgemma_tpu import workdir as workdir_lib

MAGIC = b"recurrentgemma_tpu executable 1\n"
# Multi-process CPU (gloo) executables loaded from disk were measured not to reproduce fresh compiles
# bit for bit (docs/training.md, "Compilation cache"), so such jobs always compile.
GLOO_REASON = ("multi-process CPU (gloo) jobs always compile (loaded executables are not bitwise "
               "exact there)")


class Unreadable(ValueError):
  """The shipped file is not a readable executable (torn, truncated, another format)."""


@dataclasses.dataclass(frozen=True)
class Signature:
  """Everything that makes a compiled train step valid for a job; compared field by field."""

  topology: str  # platform, device kind x count, processes: "tpu TPU v5 x 128, 32 process(es)"
  mesh: str  # mesh axis sizes, e.g. "slice=1 data=1 fsdp=128 seq=1 model=1"
  device_assignment: str  # sha256 of the mesh's devices in order (ids, coordinates, cores, slices)
  jax: str
  jaxlib: str
  libtpu: str  # "" off TPU
  compiler_env: str  # XLA_FLAGS (less the host's CPU device count) and LIBTPU_INIT_ARGS
  fingerprint: str  # experiment.Experiment.fingerprint()
  program: str  # sha256 of the lowered StableHLO: shapes, dtypes, shardings, donation, computation

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Signature":
    d = json.loads(text)
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d, dict) or set(d) != names:
      raise ValueError(f"signature fields {sorted(d) if isinstance(d, dict) else d!r} are not "
                       f"{sorted(names)}")
    return cls(**{k: str(v) for k, v in d.items()})


# What a mismatch is called in the warning, in the order fields are compared.
_WHY = {"topology": "topology", "mesh": "mesh", "device_assignment": "device assignment",
        "jax": "jax version", "jaxlib": "jaxlib version", "libtpu": "libtpu version",
        "compiler_env": "compiler environment", "fingerprint": "experiment fingerprint",
        "program": "lowered program"}


def mismatch(shipped: Signature, here: Signature) -> str | None:
  """Why an executable built for `shipped` cannot run as `here`, in one line, or None if it can."""
  diffs = []
  for field, why in _WHY.items():
    a, b = getattr(shipped, field), getattr(here, field)
    if a != b:
      short = field in ("device_assignment", "fingerprint", "program")
      diffs.append(f"{why} {a[:12] if short else repr(a)} != {b[:12] if short else repr(b)} here")
  return "; ".join(diffs) or None


def _package_version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return ""


def compiler_env(environ: dict[str, str] | None = None) -> str:
  """The environment that changes what the compiler builds; the virtual CPU device count is left
  out (the topology names the devices)."""
  environ = os.environ if environ is None else environ
  xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", environ.get("XLA_FLAGS", ""))
  return f"XLA_FLAGS={' '.join(xla.split())!r} LIBTPU_INIT_ARGS={environ.get('LIBTPU_INIT_ARGS', '')!r}"


def _device_key(d: Any) -> list[Any]:
  return [d.id, d.platform, d.device_kind, list(getattr(d, "coords", ()) or ()),
          getattr(d, "core_on_chip", 0), getattr(d, "slice_index", 0)]


def signature(lowered: jax.stages.Lowered, mesh: jax.sharding.Mesh, fingerprint: str) -> Signature:
  """The signature of `lowered` (the train step lowered for `mesh`) in this process's software."""
  devices = list(mesh.devices.flat)
  d0 = devices[0]
  processes = len({d.process_index for d in devices})  # a topology's devices have theirs too
  assignment = hashlib.sha256(json.dumps([_device_key(d) for d in devices]).encode()).hexdigest()
  program = hashlib.sha256(lowered.as_text().encode()).hexdigest()
  return Signature(
      topology=f"{d0.platform} {d0.device_kind} x {len(devices)}, {processes} process(es)",
      mesh=" ".join(f"{k}={v}" for k, v in mesh.shape.items()), device_assignment=assignment,
      jax=jax.__version__, jaxlib=_package_version("jaxlib") or jax.__version__,
      libtpu=_package_version("libtpu") if d0.platform == "tpu" else "",
      compiler_env=compiler_env(), fingerprint=fingerprint, program=program)


def save(path: str, compiled: jax.stages.Compiled, sig: Signature) -> int:
  """Writes `compiled` with its signature to `path` (local or gs://) atomically; returns its bytes."""
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  data = MAGIC + sig.to_json().encode() + b"\n" + pickle.dumps((payload, in_tree, out_tree),
                                                                protocol=pickle.HIGHEST_PROTOCOL)
  workdir_lib.write_bytes(path, data)
  return len(data)


def read_signature(data: bytes) -> tuple[Signature, int]:
  """The signature at the head of a file's bytes and where the executable starts.

  Raises:
    Unreadable: not an executable file of this format.
  """
  if not data.startswith(MAGIC):
    raise Unreadable(f"it does not start with {MAGIC.strip().decode()!r}")
  end = data.find(b"\n", len(MAGIC))
  if end < 0:
    raise Unreadable("its signature line is cut off")
  try:
    return Signature.from_json(data[len(MAGIC):end].decode()), end + 1
  except (ValueError, UnicodeDecodeError) as e:
    raise Unreadable(f"its signature is not valid ({e})") from e


def load(data: bytes, offset: int) -> jax.stages.Compiled:
  """The executable in `data` from `offset`, loaded onto this process's devices.

  Raises:
    Unreadable: the payload cannot be unpickled or loaded.
  """
  try:
    payload, in_tree, out_tree = pickle.loads(data[offset:])
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
  except Exception as e:  # pylint: disable=broad-except
    # Unpickling a torn file or loading a damaged executable fails in many ways (pickle, EOF, XLA
    # status errors); each means the same here: compile instead.
    raise Unreadable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def load_or_compile(path: str, lowered: jax.stages.Lowered, here: Signature, *,
                    refuse: str | None = None,
                    warn: Callable[[str], None]) -> tuple[jax.stages.Compiled, str]:
  """The shipped executable at `path` if it matches `here`, else `lowered` compiled.

  Args:
    path: the shipped file (local or gs://); a missing file compiles silently.
    lowered: this job's train step, lowered.
    here: this job's signature (`signature(lowered, ...)`).
    refuse: a reason to compile even when the file matches (e.g. GLOO_REASON).
    warn: receives the one-line warning when a shipped file is not used.

  Returns:
    (the executable, how it was obtained: "shipped", "compiled" or "refused").
  """
  if not workdir_lib.exists(path):
    return lowered.compile(), "compiled"
  try:
    data = workdir_lib.read_bytes(path)
    shipped, offset = read_signature(data)
    why = refuse or mismatch(shipped, here)
    if why is None:
      return load(data, offset), "shipped"
    warn(f"shipped executable {path} not used ({why}); compiling the train step instead")
  except (Unreadable, OSError) as e:
    warn(f"shipped executable {path} is unreadable ({e}); compiling the train step instead")
  return lowered.compile(), "refused"


def compile_and_save(fns: Any, exp: Any, path: str) -> tuple[Signature, int]:
  """Lowers and compiles `exp`'s train step with `fns` (step_functions.StepFunctions) and saves it
  to `path`; returns its signature and size. For shipping from a host that has the job's devices."""
  lowered = fns.lower_train_step(exp.data.global_batch_size, exp.data.seq_len)
  sig = signature(lowered, fns.mesh, exp.fingerprint())
  return sig, save(path, lowered.compile(), sig)


def train_step(fns: Any, exp: Any, workdir: str, *,
               warn: Callable[[str], None]) -> tuple[Callable[..., Any], str]:
  """The training loop's train step: the shipped executable when it matches this job, else compiled.

  Args:
    fns: the job's step_functions.StepFunctions.
    exp: the job's experiment.Experiment.
    workdir: the run directory, where the launcher ships the executable (`EXECUTABLE_FILE`).
    warn: receives the one-line warning when a shipped file is not used.

  Returns:
    (a callable `(state, batch) -> (state, metrics)` that donates `state`, "shipped" / "compiled" /
    "refused").
  """
  lowered = fns.lower_train_step(exp.data.global_batch_size, exp.data.seq_len)
  here = signature(lowered, fns.mesh, exp.fingerprint())
  gloo = jax.process_count() > 1 and jax.default_backend() == "cpu"
  return load_or_compile(workdir_lib.join(workdir, workdir_lib.EXECUTABLE_FILE), lowered, here,
                         refuse=GLOO_REASON if gloo else None, warn=warn)
