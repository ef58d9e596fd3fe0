"""``mlx.core.fast`` for NumPy arrays, PyTorch tensors (CPU and CUDA) and any DLPack
producer.

Every function has MLX's Python signature (positional arguments, keyword-only arguments
after ``*``, defaults), MLX's output dtypes and MLX's ``ValueError`` messages; the kernels
are ferrofast's (Rust, run with the GIL released). Array arguments may be NumPy arrays
(bfloat16 through ``ml_dtypes``), PyTorch tensors on the CPU or a CUDA device, or any
DLPack producer (CuPy, JAX, ...); they are read in place (strided views included), never
copied. The result has the type of the first array argument (a NumPy array, a
``torch.Tensor``, or the producer's type through its ``from_dlpack``), on the same device.

CUDA inputs: the kernels run on the producer's current stream (``torch.cuda.current_stream()``
for PyTorch, CuPy's current stream, the legacy default stream for other producers), queued
after the producer's work there without synchronising the host, and the results are
allocated on that stream; PyTorch's ``with torch.cuda.stream(s):`` moves them to ``s``.

``stream``: ``None`` (run where the inputs live) or the device they live on (``"cpu"``,
``"gpu"``, ``"cuda:0"``, ``torch.device(...)``); another device is a ``ValueError``.

Inputs must not be written by another thread while a call reading them runs (the kernels
read them in place, without the GIL).

Custom kernels: ``cuda_kernel`` and ``metal_kernel`` build kernel objects (no GPU needed)
called with MLX's keywords (``inputs=``, ``output_shapes=``, ``output_dtypes=``, ``grid=``,
``threadgroup=``, ``template=``, ``init_value=``, ``verbose=``, ``stream=``);
``precompiled_cuda_kernel`` launches PTX / CUBIN. They run on a GPU: on the stream of the
first CUDA input, else on ``cuda:0`` (CPU inputs are uploaded and NumPy callers get NumPy
outputs back). Dtypes are given as MLX names (``"float32"``), NumPy / ml_dtypes dtypes or
PyTorch dtypes.

Beyond MLX, each op's backward pass is exposed (``*_vjp``), as are the training forward of
attention (``scaled_dot_product_attention_with_lse``), the merge of attention results over
disjoint key sets (``merge_attention_states``, for split-KV and context parallelism),
cross-entropy's options
(``cross_entropy_with``), its fused loss-and-gradient (``cross_entropy_fused``, and
``cross_entropy_fused_in_place``, which writes the gradient over the caller's logits) and
``compile_to_cubin`` (NVRTC, for ``precompiled_cuda_kernel``).
"""

import sys

import numpy as np

from . import _native
from ._convert import _is_torch, from_tensor, to_tensor, to_tensor_opt

__all__ = [
    "rms_norm",
    "rms_norm_vjp",
    "layer_norm",
    "layer_norm_vjp",
    "rope",
    "rope_vjp",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_with_lse",
    "scaled_dot_product_attention_vjp",
    "merge_attention_states",
    "cross_entropy",
    "cross_entropy_with",
    "cross_entropy_vjp",
    "cross_entropy_fused",
    "cross_entropy_fused_in_place",
    "gated_delta_update",
    "gated_delta_update_vjp",
    "cuda_kernel",
    "metal_kernel",
    "precompiled_cuda_kernel",
    "compile_to_cubin",
]


def _device_kind(x):
    """``"cuda"`` for an array on a CUDA device, else ``"cpu"``."""
    dev = getattr(x, "device", None)
    if dev is not None and "cuda" in str(dev).lower():
        return "cuda"
    if hasattr(x, "__dlpack_device__"):
        try:
            if x.__dlpack_device__()[0] == 2:
                return "cuda"
        except Exception:  # noqa: BLE001 - a producer that cannot say is on the host
            pass
    return "cpu"


def _named_device(stream):
    """The device a ``stream=`` value names: -1 for the CPU (``"cpu"``, MLX's
    ``Device(cpu, 0)``), N for ``"gpu"``, ``"cuda"``, ``"cuda:N"``, ``torch.device``
    (0 without an index); None when it names no device."""
    name = str(stream).lower()
    if name in ("cpu", "device(cpu, 0)"):
        return -1
    for prefix in ("cuda", "gpu", "device(gpu"):
        if name.startswith(prefix):
            rest = name[len(prefix):].strip(":, )")
            return int(rest) if rest.isdigit() else 0
    return None


def _check_stream(op, stream, first):
    """MLX's ``stream=``: ``None`` runs where the inputs live; a device (``"cpu"``,
    ``"gpu"``, ``"cuda"``, ``"cuda:N"``, ``torch.device``, ...) must be where they live
    (ferrofast does not move inputs). On CUDA the work goes to the stream the inputs were
    exported on: the producer's current stream (``torch.cuda.current_stream()``; pick
    another with ``with torch.cuda.stream(s):``)."""
    if stream is None:
        return
    device = _named_device(stream)
    if device is None:
        raise ValueError(
            f"[{op}] stream must be None or a device ('cpu', 'gpu', 'cuda:N'): ferrofast "
            f"runs where its inputs live; got {stream!r}."
        )
    want = "cpu" if device == -1 else "cuda"
    have = _device_kind(first)
    if want != have:
        raise ValueError(
            f"[{op}] stream {stream!r} names the {want.upper()} but the inputs live on the "
            f"{have.upper()}: ferrofast does not move inputs between devices."
        )


# ----- normalization ------------------------------------------------------------------------


def rms_norm(x, weight, eps, *, stream=None):
    """Root-mean-square normalization over the last axis: ``x * rsqrt(mean(x**2) + eps) *
    weight``. ``weight`` (1-D of ``x.shape[-1]``) may be ``None``. Output dtype
    ``result_type(x, weight)`` (``x.dtype`` without weight); float32 accumulation."""
    _check_stream("rms_norm", stream, x)
    t = _native.rms_norm(to_tensor(x), to_tensor_opt(weight), float(eps))
    return from_tensor(t, x)


def rms_norm_vjp(x, weight, eps, cotangent, *, stream=None):
    """The backward pass of :func:`rms_norm`: ``(dx, dweight)`` for the output's
    ``cotangent``; ``dweight`` is ``None`` without a weight."""
    _check_stream("rms_norm", stream, x)
    dx, dw = _native.rms_norm_vjp(
        to_tensor(x), to_tensor_opt(weight), float(eps), to_tensor(cotangent)
    )
    return from_tensor(dx, x), from_tensor(dw, x)


def layer_norm(x, weight, bias, eps, *, stream=None):
    """Layer normalization over the last axis: ``(x - mean) * rsqrt(var + eps) * weight +
    bias``; ``weight`` and ``bias`` (1-D) may be ``None``. Output dtype as MLX's: with a
    weight ``result_type(x, weight, bias)``, without one ``x.dtype``."""
    _check_stream("layer_norm", stream, x)
    t = _native.layer_norm(
        to_tensor(x), to_tensor_opt(weight), to_tensor_opt(bias), float(eps)
    )
    return from_tensor(t, x)


def layer_norm_vjp(x, weight, bias, eps, cotangent, *, stream=None):
    """The backward pass of :func:`layer_norm`: ``(dx, dweight, dbias)``, each of the last
    two ``None`` when that parameter is."""
    _check_stream("layer_norm", stream, x)
    dx, dw, db = _native.layer_norm_vjp(
        to_tensor(x),
        to_tensor_opt(weight),
        to_tensor_opt(bias),
        float(eps),
        to_tensor(cotangent),
    )
    return from_tensor(dx, x), from_tensor(dw, x), from_tensor(db, x)


# ----- rope ---------------------------------------------------------------------------------


def _offset(offset):
    if isinstance(offset, (int, np.integer)):
        return int(offset)
    if isinstance(offset, float):
        # As MLX: a Python float becomes a float32 array, which rope rejects.
        return to_tensor(np.asarray(offset, dtype=np.float32))
    return to_tensor(offset)


def _base(base):
    return None if base is None else float(base)


def _rope(native, x, dims, traditional, base, scale, offset, freqs):
    """Runs ``native`` (``_native.rope`` or ``_native.rope_vjp``) on ``x`` with rope's
    arguments converted; the result has ``x``'s type."""
    t = native(
        to_tensor(x),
        int(dims),
        bool(traditional),
        _base(base),
        float(scale),
        _offset(offset),
        to_tensor_opt(freqs),
    )
    return from_tensor(t, x)


def rope(a, dims, *, traditional, base, scale, offset, freqs=None, stream=None):
    """Rotary positional embedding of the first ``dims`` features of ``a`` (at least 3-D,
    positions along axis -2). ``traditional`` rotates adjacent pairs instead of the two
    halves; exactly one of ``base`` and ``freqs`` (periods, 1-D of ``dims // 2``) is given;
    ``offset`` is an int or an integer array of size 1 or ``a.shape[0]``."""
    _check_stream("rope", stream, a)
    return _rope(_native.rope, a, dims, traditional, base, scale, offset, freqs)


def rope_vjp(cotangent, dims, *, traditional, base, scale, offset, freqs=None, stream=None):
    """The backward pass of :func:`rope`: the gradient for ``a`` given the output's
    ``cotangent`` (the inverse rotation), with the forward's arguments."""
    _check_stream("rope", stream, cotangent)
    return _rope(_native.rope_vjp, cotangent, dims, traditional, base, scale, offset, freqs)


# ----- attention ----------------------------------------------------------------------------


def _mask(mask):
    if mask is None or isinstance(mask, str):
        return mask
    return to_tensor(mask)


def _attention_args(q, k, v, scale, mask, sinks):
    """The forward's arguments of attention as the extension takes them."""
    return (
        to_tensor(q),
        to_tensor(k),
        to_tensor(v),
        float(scale),
        _mask(mask),
        to_tensor_opt(sinks),
    )


def scaled_dot_product_attention(
    q, k, v, *, scale, mask=None, sinks=None, force_fused=False, stream=None
):
    """``softmax(scale * q @ k.T + mask) @ v`` over ``q [B, N_q, T_q, D]``,
    ``k [B, N_kv, T_kv, D]``, ``v [B, N_kv, T_kv, D_v]`` (``N_q`` a multiple of ``N_kv``).
    ``mask``: ``None``, ``"causal"`` (lower-right aligned) or a bool / additive array that
    broadcasts to ``[B, N_q, T_q, T_kv]``; ``sinks``: per-query-head logits ``(N_q,)``.
    ``force_fused`` is accepted for compatibility: ferrofast always runs a fused kernel."""
    _check_stream("scaled_dot_product_attention", stream, q)
    del force_fused
    t = _native.scaled_dot_product_attention(
        *_attention_args(q, k, v, scale, mask, sinks)
    )
    return from_tensor(t, q)


def scaled_dot_product_attention_with_lse(
    q, k, v, *, scale, mask=None, sinks=None, stream=None
):
    """The training forward of :func:`scaled_dot_product_attention`: ``(out, lse)`` with
    ``lse`` the float32 log-sum-exp of each row's scores, ``[B, N_q, T_q]``."""
    _check_stream("scaled_dot_product_attention", stream, q)
    out, lse = _native.scaled_dot_product_attention_with_lse(
        *_attention_args(q, k, v, scale, mask, sinks)
    )
    return from_tensor(out, q), from_tensor(lse, q)


def scaled_dot_product_attention_vjp(
    q, k, v, out, lse, d_out, *, scale, mask=None, sinks=None, stream=None
):
    """The backward pass of :func:`scaled_dot_product_attention`: ``(dq, dk, dv, dsinks)``
    from the forward's inputs, its ``out`` and ``lse`` (from
    :func:`scaled_dot_product_attention_with_lse`) and the output's cotangent ``d_out``;
    ``dsinks`` is ``None`` without sinks. There is no gradient for the mask."""
    _check_stream("scaled_dot_product_attention", stream, q)
    dq, dk, dv, ds = _native.scaled_dot_product_attention_vjp(
        *_attention_args(q, k, v, scale, mask, sinks),
        to_tensor(out),
        to_tensor(lse),
        to_tensor(d_out),
    )
    return (
        from_tensor(dq, q),
        from_tensor(dk, q),
        from_tensor(dv, q),
        from_tensor(ds, q),
    )


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, stream=None):
    """Merges two attention results over disjoint sets of the keys into the result over all
    of them: ``[out, lse]`` as :func:`scaled_dot_product_attention_with_lse` returns it over
    the union of the keys (up to rounding).

    ``out_a``, ``out_b``: the parts' outputs ``[B, N_q, T_q, D_v]`` (one floating dtype, one
    shape); ``lse_a``, ``lse_b``: their log-sum-exps ``[B, N_q, T_q]``, float32 (float64 for
    float64 outputs). Per row, with ``m = max(lse_a, lse_b)`` and ``w = exp(lse - m)``:
    ``lse = logaddexp(lse_a, lse_b)`` and ``out = (w_a out_a + w_b out_b) / (w_a + w_b)``,
    computed in float32 (float64 for float64) and rounded once to the parts' dtype. A part
    with ``lse = -inf`` (its rows saw no key) contributes nothing; both ``-inf`` give 0 and
    ``-inf``; a NaN ``lse`` makes the row NaN. Wrong shapes or dtypes are ``ValueError``s."""
    _check_stream("merge_attention_states", stream, out_a)
    out, lse = _native.merge_attention_states(
        to_tensor(out_a), to_tensor(lse_a), to_tensor(out_b), to_tensor(lse_b)
    )
    return [from_tensor(out, out_a), from_tensor(lse, out_a)]


# ----- cross-entropy ------------------------------------------------------------------------


def _ce_options(ignore_index, label_smoothing, z_loss, reduction):
    """Cross-entropy's options as the extension takes them (after the arrays)."""
    return (
        None if ignore_index is None else int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        str(reduction),
    )


def cross_entropy(logits, targets, *, stream=None):
    """``logsumexp(logits, -1) - logits[..., targets]``: float32, of ``targets``' shape
    (``logits.shape[:-1]``); ``targets`` are integer class indices (negative ones wrap)."""
    _check_stream("cross_entropy", stream, logits)
    t = _native.cross_entropy_with(
        to_tensor(logits), to_tensor(targets), None, 0.0, 0.0, "none"
    )
    return from_tensor(t, logits)


def cross_entropy_with(
    logits,
    targets,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="none",
    stream=None,
):
    """:func:`cross_entropy` with PyTorch's options: rows whose target is ``ignore_index``
    get loss 0 and are left out of the mean; ``label_smoothing`` in ``[0, 1]``; ``z_loss``
    adds ``z_loss * lse**2`` per row; ``reduction`` is ``"none"``, ``"sum"`` or ``"mean"``
    (0-d results for the last two)."""
    _check_stream("cross_entropy", stream, logits)
    t = _native.cross_entropy_with(
        to_tensor(logits),
        to_tensor(targets),
        *_ce_options(ignore_index, label_smoothing, z_loss, reduction),
    )
    return from_tensor(t, logits)


def cross_entropy_vjp(
    logits,
    targets,
    cotangent,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="none",
    stream=None,
):
    """The backward pass of :func:`cross_entropy_with`: ``dlogits`` (the logits' dtype)
    given the loss's ``cotangent`` (targets' shape for ``"none"``, 0-d otherwise)."""
    _check_stream("cross_entropy", stream, logits)
    t = _native.cross_entropy_vjp(
        to_tensor(logits),
        to_tensor(targets),
        to_tensor(cotangent),
        *_ce_options(ignore_index, label_smoothing, z_loss, reduction),
    )
    return from_tensor(t, logits)


def cross_entropy_fused(
    logits,
    targets,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="none",
    stream=None,
):
    """The training step of :func:`cross_entropy_with` in one pass over the logits:
    ``(loss, dlogits)``, the gradient of the (reduced) loss with cotangent 1."""
    _check_stream("cross_entropy", stream, logits)
    loss, dx = _native.cross_entropy_fused(
        to_tensor(logits),
        to_tensor(targets),
        *_ce_options(ignore_index, label_smoothing, z_loss, reduction),
    )
    return from_tensor(loss, logits), from_tensor(dx, logits)


def _address(x):
    """The address of the first element of a NumPy array, a PyTorch tensor or a CuPy array."""
    if isinstance(x, np.ndarray):
        return int(x.__array_interface__["data"][0])
    if _is_torch(x):
        return int(x.data_ptr())
    return int(x.data.ptr)  # CuPy


def _lendable(logits):
    """Checks that ``logits`` is an array whose memory the in-place pass may write (a
    writable NumPy array, a PyTorch tensor that needs no gradient, a CuPy array); raises the
    ``ValueError`` that says why not."""
    what = "[cross_entropy_fused_in_place]"
    if isinstance(logits, np.ndarray):
        if not logits.flags.writeable:
            raise ValueError(
                f"{what} The logits are a read-only NumPy array; the in-place pass writes "
                "the gradient over them (pass a writable array, e.g. a copy)."
            )
        return
    if _is_torch(logits):
        torch = sys.modules["torch"]
        if logits.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{what} The logits require grad: overwriting them would corrupt the autograd "
                "graph. Use ferrofast.torch.cross_entropy(..., inplace=True), or pass "
                "logits.detach() to overwrite them anyway."
            )
        if logits.is_conj() or logits.is_neg():
            raise ValueError(f"{what} The logits are a conjugate or negative view.")
        return
    if type(logits).__module__.split(".")[0] == "cupy":
        return
    raise ValueError(
        f"{what} The in-place pass writes the gradient over the logits, so they must be a "
        f"NumPy array, a PyTorch tensor or a CuPy array, not {type(logits).__name__} "
        "(JAX arrays are immutable): use cross_entropy_fused."
    )


def _bump_version(t):
    """Tells PyTorch's autograd that tensor ``t`` was written in place (its version counter),
    so a backward pass that saved it raises instead of reading the overwritten values."""
    torch = sys.modules["torch"]
    bump = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)
    if bump is None:
        bump = getattr(torch._C, "_increment_version", None)
    if bump is not None and not t.is_inference():
        # Inference tensors have no version counter.
        bump(t)


def cross_entropy_fused_in_place(
    logits,
    targets,
    *,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="none",
    stream=None,
):
    """:func:`cross_entropy_fused` writing ``dlogits`` over the caller's ``logits``:
    ``(loss, logits)``, where ``logits`` (the object passed in) now holds the gradient, the
    same bits :func:`cross_entropy_fused` returns. The options are
    :func:`cross_entropy_with`'s.

    ``logits``: a writable NumPy array (bfloat16 through ``ml_dtypes``), a PyTorch tensor
    (CPU or CUDA) or a CuPy array, of float32, float16 or bfloat16, row-major contiguous.
    Anything else is a ``ValueError``, nothing is written: read-only arrays, non-contiguous
    views (pass a contiguous copy and read the gradient there), float64, a PyTorch tensor
    that requires grad while grad mode is on (see ``ferrofast.torch.cross_entropy``'s
    ``inplace``), other producers (JAX arrays are immutable). Wrong shapes and dtypes give
    MLX's messages, as in :func:`cross_entropy_fused`. PyTorch's version counter of the
    tensor is bumped, as for PyTorch's own in-place ops.

    The logits are lent to the call: nothing else may read or write them until it returns
    (on a GPU: the write is queued on the producer's current stream, so work queued there
    afterwards sees the gradient). Each row's gradient is written over its logits in that
    memory: no buffer the size of the logits is allocated (on the GPU too), and the bits are
    :func:`cross_entropy_fused`'s."""
    _check_stream("cross_entropy", stream, logits)
    _lendable(logits)
    x = to_tensor(logits)
    if x.data_ptr != _address(logits) and np.prod(x.shape, dtype=np.int64) > 0:
        raise ValueError(
            "[cross_entropy_fused_in_place] The logits could not be shared without a copy "
            "(misaligned memory), so the gradient cannot be written over them."
        )
    loss = _native.cross_entropy_fused_in_place(
        x,
        to_tensor(targets),
        *_ce_options(ignore_index, label_smoothing, z_loss, reduction),
    )
    if _is_torch(logits):
        _bump_version(logits)
    return from_tensor(loss, logits), logits


def _gated_delta_args(q, k, v, gamma, beta, initial_state, mask):
    """The forward's arguments of the gated delta rule as the extension takes them."""
    return (
        to_tensor(q),
        to_tensor(k),
        to_tensor(v),
        to_tensor(gamma),
        to_tensor(beta),
        to_tensor_opt(initial_state),
        to_tensor_opt(mask),
    )


def gated_delta_update(q, k, v, gamma, beta, initial_state=None, mask=None, stream=None):
    """The gated delta rule over ``T`` steps: ``[out, state]``.

    ``q``, ``k``: ``[B, T, Hk, Dk]``; ``v``: ``[B, T, Hv, Dv]`` with ``Hv`` a multiple of
    ``Hk`` (value head ``j`` uses key head ``j // (Hv // Hk)``); ``gamma``: the decay in
    linear space, ``[B, T, Hv]`` or ``[B, T, Hv, Dk]``; ``beta``: ``[B, T, Hv]``;
    ``initial_state``: the state ``[B, Hv, Dv, Dk]`` (zeros when ``None``); ``mask``: ``[B, T]``, a
    masked-out step leaves the state unchanged and outputs 0. ``out`` has
    ``promote(q, k)``'s dtype, ``state`` is float32. Every shape is checked (MLX checks none).
    """
    _check_stream("gated_delta_update", stream, q)
    out, s = _native.gated_delta_update(
        *_gated_delta_args(q, k, v, gamma, beta, initial_state, mask)
    )
    return [from_tensor(out, q), from_tensor(s, q)]


def gated_delta_update_vjp(
    q, k, v, gamma, beta, initial_state, mask, d_out, d_state=None, *, stream=None
):
    """The backward pass of :func:`gated_delta_update` for the cotangents of ``out`` and
    (optionally) of the final state: ``(dq, dk, dv, dgamma, dbeta, dstate)``, each in its
    primal's dtype (``dstate`` float32, ``None`` when ``initial_state`` is ``None``)."""
    _check_stream("gated_delta_update", stream, q)
    grads = _native.gated_delta_update_vjp(
        *_gated_delta_args(q, k, v, gamma, beta, initial_state, mask),
        to_tensor(d_out),
        to_tensor_opt(d_state),
    )
    return tuple(from_tensor(t, q) for t in grads)


# ----- custom kernels -----------------------------------------------------------------------


def _dtype_name(d):
    """MLX's name of a dtype given as a string, a NumPy / ml_dtypes dtype, a PyTorch dtype
    or an MLX dtype (``"float32"``, ``"bfloat16"``, ...)."""
    if isinstance(d, str):
        return d
    text = str(d)
    for prefix in ("torch.", "mlx.core."):
        if text.startswith(prefix):
            return text[len(prefix):]
    try:
        return np.dtype(d).name
    except TypeError:
        return text


def _is_dtype(value):
    """Whether a template value names a type (rather than being a bad value)."""
    if isinstance(value, str):
        return True
    if str(type(value).__module__).split(".")[0] in ("torch", "mlx"):
        return "dtype" in type(value).__name__.lower()
    if isinstance(value, (np.dtype, type)):
        try:
            np.dtype(value)
        except TypeError:
            return False
        return True
    return False


def _template(op, template):
    """``(name, value)`` pairs with dtype values as MLX names; anything that is neither a
    bool, an int nor a dtype is passed on and refused with MLX's message."""
    if template is None:
        return []
    out = []
    for name, value in template:
        if not isinstance(value, (bool, int)) and _is_dtype(value):
            value = _dtype_name(value)
        out.append((str(name), value))
    return out


def _kernel_stream(op, stream):
    """``(device index, raw CUstream)`` for MLX's ``stream=`` of a custom kernel: ``None``
    runs where the first GPU input lives (else ``cuda:0``); ``"gpu"``, ``"cuda"``,
    ``"cuda:N"`` or a ``torch.device`` picks that device's default stream; a
    ``torch.cuda.Stream`` or ``cupy.cuda.Stream`` runs on that stream; the CPU is refused
    with MLX's message."""
    if stream is None:
        return None, None
    raw = getattr(stream, "cuda_stream", None)
    if raw is not None:  # torch.cuda.Stream
        return int(stream.device.index or 0), int(raw)
    ptr = getattr(stream, "ptr", None)
    if ptr is not None and hasattr(stream, "device_id"):  # cupy.cuda.Stream
        return int(stream.device_id), int(ptr)
    device = _named_device(stream)
    if device is not None:
        return device, None
    raise ValueError(
        f"[{op}] stream must be None, a device ('gpu', 'cuda:N') or a CUDA stream object; "
        f"got {stream!r}."
    )


def _torch_stream_order(stream, inputs):
    """For a kernel told to run on another stream than PyTorch's current one: ``(target,
    current)`` torch streams to order around the call (the target waits for the inputs'
    producer, the current stream then waits for the kernel, as ``record_stream`` would have
    it), or None when there is nothing to order."""
    torch = sys.modules.get("torch")
    if stream is None or torch is None:
        return None
    cuda_inputs = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda]
    if not cuda_inputs:
        return None
    index = cuda_inputs[0].device.index
    device = _named_device(stream)
    if getattr(stream, "cuda_stream", None) is not None:
        target = stream
    elif device is not None and device >= 0:
        target = torch.cuda.default_stream(device)
    else:
        return None
    current = torch.cuda.current_stream(index)
    if target.cuda_stream == current.cuda_stream:
        return None
    return target, current


def _launch_ordered(stream, inputs, launch):
    order = _torch_stream_order(stream, inputs)
    if order is None:
        return launch()
    target, current = order
    target.wait_stream(current)
    out = launch()
    current.wait_stream(target)
    return out


def _kernel_inputs(inputs):
    """Arrays as ``Tensor``s, Python scalars as they are; the first array (the type the
    outputs come back as) or None."""
    out, like = [], None
    for x in inputs:
        if isinstance(x, (bool, int, float)):
            out.append(x)
        else:
            out.append(to_tensor(x))
            if like is None:
                like = x
    return out, like


def _launch_args(output_shapes, output_dtypes, grid, threadgroup, init_value):
    """The launch arguments every kernel call shares, as the extension takes them."""
    return (
        [[int(d) for d in s] for s in output_shapes],
        [_dtype_name(d) for d in output_dtypes],
        tuple(int(g) for g in grid),
        tuple(int(t) for t in threadgroup),
        None if init_value is None else float(init_value),
    )


def _kernel_outputs(outputs, like):
    if like is None:
        return list(outputs)
    return [from_tensor(t, like) for t in outputs]


def _kernel_text(name, input_names, output_names, source, header):
    """The factory arguments both source kernels share, as strings."""
    return (
        str(name),
        [str(n) for n in input_names],
        [str(n) for n in output_names],
        str(source),
        str(header),
    )


class _CustomKernel:
    """A compiled-on-first-call kernel, called as MLX's: ``kernel(*, inputs, output_shapes,
    output_dtypes, grid, threadgroup, template=None, init_value=None, verbose=False,
    stream=None) -> list``."""

    def __init__(self, native, op):
        self._native = native
        self._op = op

    @property
    def name(self):
        return self._native.name

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        tensors, like = _kernel_inputs(inputs)
        device, raw = _kernel_stream(self._op, stream)
        shapes, dtypes, grid, threadgroup, init = _launch_args(
            output_shapes, output_dtypes, grid, threadgroup, init_value
        )
        args = (tensors, shapes, dtypes, grid, threadgroup, _template(self._op, template), init,
                bool(verbose), device, raw)
        outputs = _launch_ordered(stream, inputs, lambda: self._native.call(args))
        return _kernel_outputs(outputs, like)

    def __repr__(self):
        return f"<ferrofast {self._op} {self.name!r}>"


def cuda_kernel(
    name,
    input_names,
    output_names,
    source,
    header="",
    ensure_row_contiguous=True,
    shared_memory=0,
):
    """MLX's ``cuda_kernel``: a kernel from the body of a CUDA ``__global__`` function.
    ferrofast generates MLX's signature (a pointer per input and output; ``{input}_shape``,
    ``_strides``, ``_ndim`` when the source mentions them), compiles it with NVRTC on first
    call (cached) and launches it with ``grid`` and ``threadgroup`` in threads (blocks are
    ``ceil(grid / threadgroup)``: threads past the grid run, so bounds-check). Building the
    kernel needs no GPU; calling it runs on one (CPU inputs are uploaded; NumPy callers get
    NumPy outputs back). The kernel must read and write only inside its arrays' elements:
    ferrofast cannot check what user code does with its pointers."""
    common = _kernel_text(name, input_names, output_names, source, header)
    native = _native.cuda_kernel(common, bool(ensure_row_contiguous), int(shared_memory))
    return _CustomKernel(native, "cuda_kernel")


def metal_kernel(
    name,
    input_names,
    output_names,
    source,
    header="",
    ensure_row_contiguous=True,
    atomic_outputs=False,
    compile_options=None,
):
    """MLX's ``metal_kernel``: the body of a Metal kernel, unchanged, run on an NVIDIA GPU
    (MLX's generated Metal source translated to CUDA and compiled with NVRTC). Thread
    attributes, 0-d inputs by value, ``atomic_outputs``, ``init_value`` and
    ``compile_options={"math_mode": "safe" | "relaxed" | "fast"}`` as in MLX. The kernel
    must read and write only inside its arrays' elements."""
    if compile_options is None:
        mode = "safe"
    elif not isinstance(compile_options, dict):
        raise ValueError("[metal_kernel] Expected `compile_options` to be a dict.")
    else:
        for key in compile_options:
            if key != "math_mode":
                raise ValueError(f"[metal_kernel] Unknown compile option `{key}`.")
        mode = compile_options.get("math_mode", "safe")
        if mode not in ("safe", "relaxed", "fast"):
            raise ValueError(
                "[metal_kernel] Expected math_mode to be 'safe', 'relaxed', or 'fast'."
            )
    common = _kernel_text(name, input_names, output_names, source, header)
    native = _native.metal_kernel(
        common, bool(ensure_row_contiguous), bool(atomic_outputs), mode
    )
    return _CustomKernel(native, "metal_kernel")


def precompiled_cuda_kernel(
    *,
    name,
    compiled_source,
    inputs,
    output_shapes,
    output_dtypes,
    scalars,
    grid,
    threadgroup,
    shared_memory=0,
    init_value=None,
    ensure_row_contiguous=False,
    stream=None,
):
    """MLX's ``precompiled_cuda_kernel``: launch ``name`` from PTX / CUBIN / fatbin bytes
    (Triton, nvcc, ``compile_to_cubin``) with a pointer per input, a pointer per output, then
    ``scalars`` (``bool``, ``int``, ``float`` -> ``bool``, ``int32_t``, ``float``); grid and
    output rules as :func:`cuda_kernel`. The kernel must match that parameter list and stay
    inside its arrays' elements."""
    for s in scalars:
        if not isinstance(s, (bool, int, float)):
            raise ValueError(
                "[precompiled_cuda_kernel] Invalid scalar argument type. Received "
                f"{type(s).__name__} but must be one of bool, int or float"
            )
    tensors, like = _kernel_inputs(inputs)
    device, raw = _kernel_stream("precompiled_cuda_kernel", stream)
    shapes, dtypes, grid, threadgroup, init = _launch_args(
        output_shapes, output_dtypes, grid, threadgroup, init_value
    )
    outputs = _launch_ordered(
        stream,
        inputs,
        lambda: _native.precompiled_cuda_kernel(
            str(name), bytes(compiled_source), tensors, shapes, dtypes, list(scalars), grid,
            threadgroup, int(shared_memory), init, bool(ensure_row_contiguous), device, raw,
        ),
    )
    return _kernel_outputs(outputs, like)


def compile_to_cubin(source, name_expression, arch=None, options=()):
    """Compiles CUDA C++ ``source`` to CUBIN with NVRTC for ``arch`` (``"sm_90"``, ...;
    ``None``: the architecture of ``cuda:0``) and returns ``(image_bytes, symbol)``, the
    symbol being the mangled name of the kernel ``name_expression`` names (``"scale"``,
    ``"scale<float>"``), ready for :func:`precompiled_cuda_kernel`. Needs libnvrtc; a GPU
    only when ``arch`` is ``None``. Not part of MLX."""
    return _native.compile_to_cubin(
        str(source),
        str(name_expression),
        None if arch is None else str(arch),
        [str(o) for o in options],
    )
