"""Linear-recurrence scans: XLA references and Pallas kernels behind one API.

`linear_scan` is the dispatcher (the design's stable API); `sequence_parallel_linear_scan` runs it on
operands sharded over a device mesh, including along time (a `ScanPlacement` names the mesh and the
axes). Kernel modules: `tpu` (Mosaic), `gpu` (Triton), `reference` (XLA).
"""

from pallas_kernels._common import platform_dependent, tracing_for
from pallas_kernels.scan import IMPLS, linear_scan
from pallas_kernels.sequence_parallel import ScanPlacement, sequence_parallel_linear_scan

__all__ = ["IMPLS", "ScanPlacement", "linear_scan", "platform_dependent",
           "sequence_parallel_linear_scan", "tracing_for"]
