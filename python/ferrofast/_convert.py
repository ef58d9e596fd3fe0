"""Array exchange between Python array libraries and ``ferrofast._native.Tensor``.

Inputs: NumPy arrays and any DLPack producer (PyTorch CPU and CUDA tensors, CuPy, JAX, ...)
are handed to the Rust side through ``__dlpack__`` (a DLPack 1.x versioned capsule when the
producer supports ``max_version``, else a legacy one) and read in place. NumPy bfloat16
(``ml_dtypes``) arrays travel as uint16 views of the same memory. Python scalars and
sequences go through ``numpy.asarray``.

CUDA producers are asked to make their data ready on their current stream (PyTorch's
``torch.cuda.current_stream()``, CuPy's current stream; the legacy default stream for any
other producer), and that stream is where ferrofast queues the op and allocates its
results, so nothing waits on the host.

Outputs: a result ``Tensor`` is handed to ``numpy.from_dlpack``, ``torch.from_dlpack`` or
the CUDA producer's own ``from_dlpack``, which take over its buffer (no copy; a consumer on
another stream is made to wait for the op on the GPU); bfloat16 results for NumPy come back
as ``ml_dtypes.bfloat16`` views.
"""

import sys

import numpy as np

from . import _native

Tensor = _native.Tensor


def _bfloat16():
    """ml_dtypes' bfloat16 NumPy dtype, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _is_torch(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _capsule(x, **kw):
    """``x.__dlpack__(**kw)``, asking for a versioned capsule first."""
    try:
        return x.__dlpack__(max_version=(1, 0), **kw)
    except TypeError:
        # Producers written before DLPack 1.0 take no max_version.
        return x.__dlpack__(**kw)


def _on_cuda(x):
    """The CUDA device index of a DLPack producer's data, or None for host memory."""
    try:
        kind, index = x.__dlpack_device__()
    except (AttributeError, TypeError, ValueError):
        return None
    return int(index) if int(kind) == 2 else None


def _torch_stream(index):
    """PyTorch's current CUDA stream on device ``index`` as a ``CUstream`` int (0 is the
    legacy default stream), through the raw query when this PyTorch has it."""
    torch = sys.modules["torch"]
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(index))
    return int(torch.cuda.current_stream(index).cuda_stream)


def _torch_capsule(t):
    """A capsule over PyTorch tensor ``t``'s memory, without the stream handshake: ferrofast
    reads a CUDA tensor on its current stream, where PyTorch's own next op would, so there
    is nothing to order. Versioned when this PyTorch writes DLPack 1.x."""
    C = sys.modules["torch"]._C
    versioned = getattr(C, "_to_dlpack_versioned", None)
    if versioned is not None:
        return versioned(t)
    to_dlpack = getattr(C, "_to_dlpack", None)
    if to_dlpack is not None:
        return to_dlpack(t)
    return _capsule(t)


def _current_stream(x, index):
    """The producer's current CUDA stream on device ``index`` as a ``CUstream`` int (0 is
    the legacy default stream)."""
    if _is_torch(x):
        return _torch_stream(index)
    top = type(x).__module__.split(".")[0]
    if top == "cupy":
        import cupy

        with cupy.cuda.Device(index):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _cuda_tensor(x, index):
    """A ``Tensor`` over a CUDA producer's memory, ready on its current stream."""
    stream = _current_stream(x, index)
    # DLPack names the legacy default stream 1 (0 is reserved as ambiguous).
    capsule = _capsule(x, stream=stream if stream != 0 else 1)
    return _native.from_dlpack(capsule, False, stream)


def to_tensor(x):
    """A ``Tensor`` reading ``x``'s memory (copying only what DLPack cannot share)."""
    if isinstance(x, Tensor):
        return x
    if _is_torch(x):
        # A tensor that requires grad cannot be exported; its data can.
        t = x.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        if t.is_cuda:
            return _native.from_dlpack(_torch_capsule(t), False, _torch_stream(t.device.index))
        return _native.from_dlpack(_torch_capsule(t))
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        index = _on_cuda(x)
        if index is not None:
            return _cuda_tensor(x, index)
        return _native.from_dlpack(_capsule(x))
    a = np.asarray(x)
    bf16 = _bfloat16()
    if bf16 is not None and a.dtype == bf16:
        return _native.from_dlpack(_numpy_capsule(a.view(np.uint16)), True)
    return _native.from_dlpack(_numpy_capsule(a))


def _numpy_capsule(a):
    try:
        return _capsule(a)
    except BufferError:
        # Read-only arrays cannot be exported by NumPy versions that cannot flag them
        # read-only: share a copy instead.
        return _capsule(np.array(a, copy=True))


def to_tensor_opt(x):
    return None if x is None else to_tensor(x)


class _Bits:
    """Exports a bfloat16 ``Tensor`` labelled uint16, for NumPy (which has no bfloat16)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        return self._t._dlpack_bits(max_version=max_version)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def from_tensor(t, like):
    """The result ``t`` as the type of ``like`` (the op's first array argument)."""
    if t is None:
        return None
    if _is_torch(like):
        return _torch_result(t)
    if t.device != "cpu":
        return _cuda_result(t, like)
    if t.dtype == "bfloat16":
        bf16 = _bfloat16()
        if bf16 is None:
            raise ImportError(
                "a bfloat16 result needs the ml_dtypes package for NumPy (pip install ml_dtypes)"
            )
        return np.from_dlpack(_Bits(t)).view(bf16)
    return np.from_dlpack(t)


def _torch_result(t):
    """A result ``Tensor`` as a PyTorch tensor over its buffer: made ready on PyTorch's
    current stream (a no-op when the op ran there, as it does for PyTorch inputs)."""
    torch = sys.modules["torch"]
    C = torch._C
    if getattr(C, "_to_dlpack_versioned", None) is None:
        # A PyTorch without DLPack 1.x: its own from_dlpack does the handshake.
        return torch.from_dlpack(t)
    kind, index = t.__dlpack_device__()
    if kind == 2:
        stream = _torch_stream(index)
        capsule = t.__dlpack__(stream=stream if stream != 0 else 1, max_version=(1, 0))
    else:
        capsule = t.__dlpack__(max_version=(1, 0))
    return C._from_dlpack(capsule)


def _cuda_result(t, like):
    """A CUDA result as the type of ``like``: the producer library's ``from_dlpack`` (CuPy,
    JAX), else the ``Tensor`` itself (a DLPack producer any library can take)."""
    if isinstance(like, np.ndarray):
        # A custom kernel's outputs for NumPy inputs (uploaded for the call): back to NumPy.
        return from_tensor(_native.to_cpu(t), like)
    top = type(like).__module__.split(".")[0]
    if top == "cupy":
        import cupy

        return cupy.from_dlpack(t)
    if top in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.from_dlpack(t)
    return t
