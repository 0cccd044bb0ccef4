"""The one table of TPU chip figures the planner uses (per chip, not per TensorCore).

Sources: Cloud TPU system-architecture pages (peak bf16 FLOP/s, HBM capacity and bandwidth) and, for ICI
and DCN link bandwidths, the figures in "How to Scale Your Model" (Austin et al., 2025), which gives
one-way bandwidth per ICI link. v4 and v5p have a 3D torus (6 links per chip); v5e and v6e a 2D torus
(4 links per chip). HBM is the nominal capacity; XLA reserves a little of it, which is why the planner
targets a fraction of it (see `sharding/planner.py`).
"""

import dataclasses
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Figures of one TPU chip.

  Attributes:
    name: generation as used in topology names ("v5p").
    device_kind: what `jax.Device.device_kind` reports for it.
    hbm_bytes: HBM capacity per chip.
    hbm_bandwidth: HBM bandwidth per chip, bytes/s.
    peak_bf16_flops: dense bf16 matmul peak per chip, FLOP/s.
    ici_link_bandwidth: one-way bandwidth of one ICI link, bytes/s.
    ici_links: ICI links per chip (torus neighbours).
    dcn_bandwidth: DCN (data-centre network) bandwidth available per chip, bytes/s.
  """

  name: str
  device_kind: str
  hbm_bytes: int
  hbm_bandwidth: float
  peak_bf16_flops: float
  ici_link_bandwidth: float
  ici_links: int
  dcn_bandwidth: float

  @property
  def ici_bandwidth(self) -> float:
    """Total one-way ICI bandwidth out of one chip, bytes/s."""
    return self.ici_link_bandwidth * self.ici_links


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 1.2e12, 275e12, 4.5e10, 6, 6.25e9),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 8.1e11, 197e12, 4.5e10, 4, 6.25e9),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 2.76e12, 459e12, 9e10, 6, 6.25e9),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 1.64e12, 918e12, 9e10, 4, 6.25e9),
}

# Accepted spellings of the generation, in topologies and in Cloud TPU accelerator types.
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Slicing:
  """How Cloud TPU names and hosts slices of one generation.

  Attributes:
    accelerator_prefix: the accelerator-type prefix ("v5p" in "v5p-256", "v5litepod" for v5e).
    cores_per_chip: TensorCores per chip, the unit of the number in an accelerator type.
    devices_per_chip: jax devices per chip in a topology compile (v4: one per TensorCore).
    chips_per_host: chips per TPU VM host of a multi-host slice.
    single_host_max: the largest slice (chips) that is one host.
    default_topologies: chip count -> the topology Cloud TPU gives that accelerator type.
  """

  accelerator_prefix: str
  cores_per_chip: int
  devices_per_chip: int
  chips_per_host: int
  single_host_max: int
  default_topologies: dict[int, str]


_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
SLICING: dict[str, Slicing] = {
    "v4": Slicing("v4", 2, 2, 4, 4, _TORUS_3D),
    "v5e": Slicing("v5litepod", 1, 1, 4, 8, _TORUS_2D),
    "v5p": Slicing("v5p", 2, 1, 4, 4, _TORUS_3D),
    "v6e": Slicing("v6e", 1, 1, 4, 8, _TORUS_2D),
}

FORMS = "GEN:TOPOLOGY (v5p:4x4x8, v5e:16x16) or a Cloud TPU type GEN-N (v5p-256, v5litepod-16, v4-32)"


@dataclasses.dataclass(frozen=True)
class Target:
  """One TPU slice, however it was written ("v5p-8" or "v5p:2x2x1").

  Attributes:
    chip: the chip table entry.
    shape: the chip grid.
    accelerator_type: the Cloud TPU name, e.g. "v5p-256".
    hosts: TPU VM hosts of the slice.
  """

  chip: Chip
  shape: tuple[int, ...]
  accelerator_type: str
  hosts: int

  @property
  def chips(self) -> int:
    n = 1
    for d in self.shape:
      n *= d
    return n

  @property
  def topology(self) -> str:
    return "x".join(map(str, self.shape))

  @property
  def topology_name(self) -> str:
    """The name libtpu's topology compile takes, e.g. "v5p:4x4x8"."""
    return f"{self.chip.name}:{self.topology}"


def _generation(spelled: str, text: str) -> str:
  gen = _ALIASES.get(spelled, spelled)
  if gen not in CHIPS:
    raise ValueError(f"target={text!r}: chip generation {spelled!r} is not one of {sorted(CHIPS)} "
                     f"(or {sorted(_ALIASES)}); use {FORMS}")
  return gen


def parse_target(text: str) -> Target:
  """The one grammar of TPU slices, used by `compile --topology` and `launch.submit --target`.

  Raises:
    ValueError: naming the value and the accepted forms.
  """
  text = text.strip()
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if m:
    gen = _generation(m.group(1), text)
    slicing = SLICING[gen]
    number = int(m.group(2))
    chips = number // slicing.cores_per_chip
    if number % slicing.cores_per_chip or chips not in slicing.default_topologies:
      raise ValueError(f"target={text!r}: {number} is not a {slicing.accelerator_prefix} slice size; "
                       f"valid: {[c * slicing.cores_per_chip for c in sorted(slicing.default_topologies)]}")
    shape = tuple(int(d) for d in slicing.default_topologies[chips].split("x"))
  else:
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    if not m:
      raise ValueError(f"target={text!r} is not {FORMS}")
    gen = _generation(m.group(1), text)
    slicing = SLICING[gen]
    shape = tuple(int(d) for d in m.group(2).split("x"))
    if any(d < 1 for d in shape):
      raise ValueError(f"target={text!r} has a zero dimension")
  chips = 1
  for d in shape:
    chips *= d
  hosts = 1 if chips <= slicing.single_host_max else chips // slicing.chips_per_host
  return Target(CHIPS[gen], shape, f"{slicing.accelerator_prefix}-{chips * slicing.cores_per_chip}",
                hosts)


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
  """The chip and chip-grid shape of a slice, in any form `parse_target` accepts.

  Raises:
    ValueError: unknown generation or malformed shape, naming the valid forms.
  """
  target = parse_target(topology)
  return target.chip, target.shape


def chip_for_device_kind(device_kind: str) -> Chip:
  """The table entry whose device_kind matches a jax device's."""
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  raise ValueError(f"device_kind={device_kind!r} is not in the chip table "
                   f"{[c.device_kind for c in CHIPS.values()]}")
