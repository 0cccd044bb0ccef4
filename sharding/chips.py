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

# Accepted spellings of the generation in a topology string, e.g. "v5litepod:16x16".
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
  """Splits "v5p:4x4x8" into the chip and the chip-grid shape.

  Raises:
    ValueError: unknown generation or malformed shape, naming the valid forms.
  """
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", topology.strip())
  if not m:
    raise ValueError(f"topology={topology!r} is not of the form GEN:AxB or GEN:AxBxC (e.g. v5p:4x4x8, "
                     f"v5e:16x16); GEN is one of {sorted(CHIPS)}")
  gen = _ALIASES.get(m.group(1), m.group(1))
  if gen not in CHIPS:
    raise ValueError(f"topology={topology!r}: chip generation {m.group(1)!r} is not one of {sorted(CHIPS)}")
  shape = tuple(int(s) for s in m.group(2).split("x"))
  if any(s < 1 for s in shape):
    raise ValueError(f"topology={topology!r} has a zero dimension")
  return CHIPS[gen], shape


def chip_for_device_kind(device_kind: str) -> Chip:
  """The table entry whose device_kind matches a jax device's."""
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  raise ValueError(f"device_kind={device_kind!r} is not in the chip table "
                   f"{[c.device_kind for c in CHIPS.values()]}")
