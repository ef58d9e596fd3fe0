"""ferrofast: MLX's ``mlx.core.fast`` kernels for NumPy and PyTorch arrays.

``ferrofast.fast`` mirrors ``mlx.core.fast`` (same signatures, keyword names, defaults,
output dtypes and ``ValueError`` messages) over NumPy arrays and PyTorch CPU tensors, shared
with the Rust kernels through DLPack without copying. Results come back as the caller's
type: a NumPy array for NumPy inputs, a ``torch.Tensor`` for torch inputs.
"""

from . import fast
from ._native import __version__

__all__ = ["fast", "__version__"]
