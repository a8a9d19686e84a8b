"""Deployment backends: run a compressed sampler on real integer kernels, packed weights or bf16.

`lower(sampler, Backend(...))` turns the search's fake-quantized super-network sampler into a
`RuntimeSampler` that keeps only the widths in use and executes each layer on the fastest path the device
has; `plan` and `summary()` say which layer runs which way.
"""

from tmpq.runtime.kernels import kernel_available
from tmpq.runtime.lowering import MODES, Backend, RuntimeFallbackWarning, RuntimeSampler, load, lower

__all__ = ["MODES", "Backend", "RuntimeFallbackWarning", "RuntimeSampler", "kernel_available", "load", "lower"]
