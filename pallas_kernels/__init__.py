"""Linear-recurrence scans: XLA references and Pallas kernels behind one API.

`linear_scan` is the dispatcher (DESIGN.md's stable API); `sequence_parallel_linear_scan` runs it on
operands sharded over a device mesh, including along time. Kernel modules: `tpu` (Mosaic), `gpu`
(Triton), `reference` (XLA).
"""

from pallas_kernels.scan import IMPLS, linear_scan
from pallas_kernels.sequence_parallel import sequence_parallel_linear_scan

__all__ = ["IMPLS", "linear_scan", "sequence_parallel_linear_scan"]
