"""ferrofast's kernels as PyTorch autograd functions (CPU and CUDA tensors).

The forward passes are ``ferrofast.fast``'s, the backward passes its ``*_vjp`` functions (and
the fused loss-and-gradient of cross-entropy), so a model built on these trains with
``loss.backward()``. Tensors cross to the kernels through DLPack without copying; CUDA work
runs on the current stream (``torch.cuda.current_stream()``), as PyTorch's own ops do.

Drop-ins with PyTorch's names and signatures:

- :func:`scaled_dot_product_attention` (``torch.nn.functional``'s): ``is_causal`` is
  PyTorch's upper-left aligned causal mask; ``dropout_p`` must be 0; fully masked rows give
  0 where PyTorch gives NaN.
- :func:`rms_norm`, :func:`layer_norm` (``normalized_shape`` may span several trailing axes).
- :func:`cross_entropy` (class indices as targets; ``ignore_index``, ``reduction``,
  ``label_smoothing``; no per-class ``weight``; ``inplace=True`` writes the gradient over
  logits nobody needs afterwards).

And :func:`rope`, MLX's signature (PyTorch has no rotary embedding op).
"""

import math

import torch

from . import fast as _fast

__all__ = [
    "RMSNormFunction",
    "LayerNormFunction",
    "RoPEFunction",
    "ScaledDotProductAttentionFunction",
    "CrossEntropyFunction",
    "rms_norm",
    "layer_norm",
    "rope",
    "scaled_dot_product_attention",
    "cross_entropy",
]


def _needs(ctx, i):
    return ctx.needs_input_grad[i]


class RMSNormFunction(torch.autograd.Function):
    """``apply(x, weight, eps)``: MLX's ``rms_norm`` over the last axis (``weight`` may be
    ``None``)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.eps = eps
        ctx.save_for_backward(x, weight)
        return _fast.rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        dx, dw = _fast.rms_norm_vjp(x, weight, ctx.eps, g)
        return dx, (dw if _needs(ctx, 1) else None), None


class LayerNormFunction(torch.autograd.Function):
    """``apply(x, weight, bias, eps)``: MLX's ``layer_norm`` over the last axis."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias)
        return _fast.layer_norm(x, weight, bias, eps)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = _fast.layer_norm_vjp(x, weight, bias, ctx.eps, g)
        return dx, (dw if _needs(ctx, 1) else None), (db if _needs(ctx, 2) else None), None


class RoPEFunction(torch.autograd.Function):
    """``apply(x, dims, traditional, base, scale, offset, freqs)``: MLX's ``rope``; the
    gradient flows to ``x`` only (none for ``offset`` or ``freqs``, as in MLX's fused
    path)."""

    @staticmethod
    def forward(ctx, x, dims, traditional, base, scale, offset, freqs):
        ctx.args = (dims, traditional, base, scale, offset, freqs)
        return _fast.rope(
            x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
        )

    @staticmethod
    def backward(ctx, g):
        dims, traditional, base, scale, offset, freqs = ctx.args
        dx = _fast.rope_vjp(
            g, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
        )
        return dx, None, None, None, None, None, None


class ScaledDotProductAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, scale, mask, sinks)``: MLX's ``scaled_dot_product_attention``
    (``mask``: ``None``, ``"causal"`` (lower-right) or a tensor; no gradient for the mask).
    The forward saves the float32 log-sum-exp; the backward is ferrofast's flash-style one
    (gradients for q, k, v and the sinks)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, mask, sinks):
        if not any(ctx.needs_input_grad):
            # Inference (no_grad, or no input needing a gradient): the plain forward, which
            # has the decode kernels, and nothing saved.
            return _fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
        out, lse = _fast.scaled_dot_product_attention_with_lse(
            q, k, v, scale=scale, mask=mask, sinks=sinks
        )
        ctx.scale = scale
        ctx.mask = mask
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        dq, dk, dv, ds = _fast.scaled_dot_product_attention_vjp(
            q, k, v, out, lse, g, scale=ctx.scale, mask=ctx.mask, sinks=sinks
        )
        return dq, dk, dv, None, None, (ds if _needs(ctx, 5) else None)


class CrossEntropyFunction(torch.autograd.Function):
    """``apply(logits, targets, ignore_index, label_smoothing, z_loss, reduction[, inplace])``:
    ``ferrofast.fast.cross_entropy_with`` over the last axis. When a gradient is needed the
    forward computes the loss and its gradient in one pass (``cross_entropy_fused``) and
    the backward scales the saved gradient by the incoming one.

    ``inplace=True`` says the logits are needed by nobody after this call: the gradient is
    written over them (``cross_entropy_fused_in_place``) and the backward scales it in place,
    so no second tensor of the logits' size is kept for the backward. The logits then hold
    the gradient, not the logits. Where that is not possible or not safe the ordinary fused
    pass runs instead: logits that are a leaf (a parameter or user data, which PyTorch's
    in-place ops refuse too), not row-major contiguous, or not float32 / float16 /
    bfloat16. The write bumps the logits' version counter as PyTorch's in-place ops do, so a
    backward that saved the logits themselves (an op whose gradient needs its output, such
    as ``exp``) raises PyTorch's "modified by an inplace operation" error instead of reading
    the gradient; a second backward through the same graph raises it too."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing, z_loss, reduction, *inplace):
        opts = dict(
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
        )
        ctx.set_materialize_grads(False)
        ctx.n_extra = len(inplace)
        if not _needs(ctx, 0):
            return _fast.cross_entropy_with(logits, targets, **opts)
        ctx.inplace = bool(inplace and inplace[0]) and _overwritable(logits)
        if ctx.inplace:
            loss, dlogits = _fast.cross_entropy_fused_in_place(logits.detach(), targets, **opts)
        else:
            loss, dlogits = _fast.cross_entropy_fused(logits, targets, **opts)
        ctx.reduction = reduction
        ctx.save_for_backward(dlogits)
        return loss

    @staticmethod
    def backward(ctx, g):
        rest = (None,) * (5 + ctx.n_extra)
        if g is None:
            return (None,) + rest
        (dlogits,) = ctx.saved_tensors
        g = g.to(dlogits.dtype)
        if ctx.reduction == "none":
            g = g.unsqueeze(-1)
        if ctx.inplace:
            return (dlogits.mul_(g),) + rest
        return (dlogits * g,) + rest


def _overwritable(logits):
    """Whether the in-place pass may write the gradient over ``logits`` (inside a forward):
    not a leaf, row-major contiguous, of a dtype the pass writes."""
    return (
        not logits.is_leaf
        and logits.is_contiguous()
        and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


# ----- drop-ins -------------------------------------------------------------------------


def _trailing(x, normalized_shape, *params):
    """Flattens the ``normalized_shape`` trailing axes of ``x`` (and the parameters) into
    one, as ferrofast normalizes over the last axis."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(d) for d in normalized_shape)
    n = len(normalized_shape)
    if n == 0 or tuple(x.shape[x.dim() - n :]) != normalized_shape:
        raise ValueError(
            f"normalized_shape {list(normalized_shape)} does not match the trailing "
            f"dimensions of an input of shape {list(x.shape)}"
        )
    if n == 1:
        return x, params, None
    lead = tuple(x.shape[: x.dim() - n])
    flat = x.reshape(lead + (-1,))
    return flat, tuple(None if p is None else p.reshape(-1) for p in params), x.shape


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: ``eps=None`` is ``torch.finfo(input.dtype).eps``."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    x, (w,), shape = _trailing(input, normalized_shape, weight)
    y = RMSNormFunction.apply(x, w, float(eps))
    return y if shape is None else y.reshape(shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``."""
    x, (w, b), shape = _trailing(input, normalized_shape, weight, bias)
    y = LayerNormFunction.apply(x, w, b, float(eps))
    return y if shape is None else y.reshape(shape)


def rope(a, dims, *, traditional, base, scale, offset, freqs=None):
    """MLX's ``rope`` (``mlx.core.fast.rope``) with a gradient for ``a``."""
    return RoPEFunction.apply(a, dims, traditional, base, scale, offset, freqs)


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    """``torch.nn.functional.scaled_dot_product_attention`` for ``[B, H, L, E]`` (or
    ``[H, L, E]``) tensors. ``attn_mask``: bool (``True`` attends) or additive, broadcasting
    to ``[B, H_q, L, S]``. ``is_causal`` is PyTorch's upper-left aligned mask. With
    ``enable_gqa``, ``H_q`` may be a multiple of ``H_kv`` (keys and values are not
    repeated). ``dropout_p`` must be 0."""
    if dropout_p != 0.0:
        raise ValueError("ferrofast.torch.scaled_dot_product_attention has no dropout: dropout_p must be 0")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be given")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "ferrofast.torch.scaled_dot_product_attention takes [B, H, L, E] or [H, L, E] tensors"
        )
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query has {query.shape[1]} heads and key {key.shape[1]}: pass enable_gqa=True "
            "for grouped-query attention"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    mask = attn_mask
    if is_causal:
        t_q, t_kv = query.shape[-2], key.shape[-2]
        if t_q == t_kv:
            mask = "causal"  # upper-left and lower-right alignments agree
        else:
            mask = torch.ones(t_q, t_kv, dtype=torch.bool, device=query.device).tril()
    out = ScaledDotProductAttentionFunction.apply(query, key, value, float(scale), mask, None)
    return out.squeeze(0) if squeeze else out


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    inplace=False,
):
    """``torch.nn.functional.cross_entropy`` with class-index targets: ``input`` is
    ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]`` (classes on axis 1, read in place).
    Per-class ``weight`` and the deprecated ``size_average`` / ``reduce`` are not
    available. ``inplace=True`` (not PyTorch's): the gradient is written over ``input``,
    which must not be needed afterwards (see :class:`CrossEntropyFunction`; ``[C]`` and
    ``[N, C]`` inputs qualify, ``[N, C, d1, ...]`` ones are a strided view and take the
    ordinary pass)."""
    if weight is not None:
        raise ValueError("ferrofast.torch.cross_entropy has no per-class weight")
    if size_average is not None or reduce is not None:
        raise ValueError("size_average and reduce are deprecated: use reduction")
    logits = input.movedim(1, -1) if input.dim() > 2 else input
    return CrossEntropyFunction.apply(
        logits,
        target,
        int(ignore_index),
        float(label_smoothing),
        0.0,
        str(reduction),
        bool(inplace),
    )
