"""Linear-recurrence scans: XLA references and Pallas kernels behind one API."""

from pallas_kernels.scan import linear_scan

__all__ = ["linear_scan"]
