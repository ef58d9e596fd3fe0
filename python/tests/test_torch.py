"""ferrofast with PyTorch CPU tensors: zero-copy exchange, the autograd functions against
PyTorch's own ops and autograd, gradcheck in float64, and a small model trained both ways.
Skipped where torch is not installed."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ferrofast as ff  # noqa: E402
import ferrofast.torch as fft  # noqa: E402
from ferrofast import _native  # noqa: E402

import torch.nn.functional as TF  # noqa: E402


def randn(*shape, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=dtype).requires_grad_(requires_grad)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ----- exchange -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_zero_copy_in(dtype):
    x = randn(4, 6).to(dtype)
    t = _native.from_dlpack(x.__dlpack__())
    assert t.data_ptr == x.data_ptr()
    xt = x.t()
    assert _native.from_dlpack(xt.__dlpack__()).data_ptr == xt.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_copy_out_and_caller_type(dtype):
    x = randn(3, 16, dtype=dtype)
    t = _native.rms_norm(_native.from_dlpack(x.__dlpack__()), None, 1e-5)
    p = t.data_ptr
    y = torch.from_dlpack(t)
    assert y.data_ptr() == p and y.dtype == dtype
    out = ff.fast.rms_norm(x, None, 1e-5)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype


def test_requires_grad_input_is_read():
    x = randn(2, 8, requires_grad=True)
    out = ff.fast.rms_norm(x, None, 1e-5)
    close(out, TF.rms_norm(x.detach(), (8,), eps=1e-5))


# ----- drop-ins against PyTorch's ops ---------------------------------------------------


def _grads(f, *xs):
    for x in xs:
        x.grad = None
    y = f()
    g = randn(*y.shape, seed=99)
    (y * g).sum().backward()
    return y.detach(), [x.grad.clone() for x in xs]


@pytest.mark.parametrize("shape", [(4, 5, 32), (3, 4, 6)])
def test_rms_norm(shape):
    x = randn(*shape, seed=1, requires_grad=True)
    w = randn(shape[-1], seed=2, requires_grad=True)
    ours = _grads(lambda: fft.rms_norm(x, (shape[-1],), w, 1e-5), x, w)
    theirs = _grads(lambda: TF.rms_norm(x, (shape[-1],), w, 1e-5), x, w)
    close(ours[0], theirs[0])
    for a, b in zip(ours[1], theirs[1]):
        close(a, b, 1e-4)
    # normalized_shape over two axes
    w2 = randn(4, 6, seed=3, requires_grad=True)
    x2 = randn(2, 4, 6, seed=4, requires_grad=True)
    ours = _grads(lambda: fft.rms_norm(x2, (4, 6), w2), x2, w2)
    theirs = _grads(lambda: TF.rms_norm(x2, (4, 6), w2), x2, w2)
    close(ours[0], theirs[0])
    for a, b in zip(ours[1], theirs[1]):
        close(a, b, 1e-4)


def test_layer_norm():
    x = randn(6, 7, 40, seed=5, requires_grad=True)
    w = randn(40, seed=6, requires_grad=True)
    b = randn(40, seed=7, requires_grad=True)
    ours = _grads(lambda: fft.layer_norm(x, (40,), w, b), x, w, b)
    theirs = _grads(lambda: TF.layer_norm(x, (40,), w, b), x, w, b)
    close(ours[0], theirs[0])
    for a, c in zip(ours[1], theirs[1]):
        close(a, c, 1e-4)


@pytest.mark.parametrize(
    "case", ["none", "causal_square", "causal_rect", "bool", "additive", "gqa"]
)
def test_scaled_dot_product_attention(case):
    b, hq, hkv, tq, tkv, e = 2, 4, 4, 6, 6, 16
    kw = {}
    if case == "causal_square":
        kw["is_causal"] = True
    elif case == "causal_rect":
        tq, kw["is_causal"] = 4, True
    elif case == "bool":
        m = torch.rand(b, 1, tq, tkv, generator=torch.Generator().manual_seed(8)) < 0.7
        m[..., 0] = True
        kw["attn_mask"] = m
    elif case == "additive":
        kw["attn_mask"] = randn(1, hq, tq, tkv, seed=9)
    elif case == "gqa":
        hkv, kw["enable_gqa"] = 2, True
    q = randn(b, hq, tq, e, seed=10, requires_grad=True)
    k = randn(b, hkv, tkv, e, seed=11, requires_grad=True)
    v = randn(b, hkv, tkv, e, seed=12, requires_grad=True)
    ours = _grads(lambda: fft.scaled_dot_product_attention(q, k, v, **kw), q, k, v)
    theirs = _grads(lambda: TF.scaled_dot_product_attention(q, k, v, **kw), q, k, v)
    close(ours[0], theirs[0])
    for a, c in zip(ours[1], theirs[1]):
        close(a, c, 1e-4)
    # Without gradients (inference) the plain forward runs: the same output, no graph.
    with torch.no_grad():
        plain = fft.scaled_dot_product_attention(q, k, v, **kw)
    assert plain.grad_fn is None
    close(plain, ours[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(reduction, smoothing):
    x = randn(8, 30, seed=13, requires_grad=True)
    t = torch.randint(0, 30, (8,), generator=torch.Generator().manual_seed(14))
    t[2] = -100
    kw = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=-100)
    ours = _grads(lambda: fft.cross_entropy(x, t, **kw), x)
    theirs = _grads(lambda: TF.cross_entropy(x, t, **kw), x)
    close(ours[0], theirs[0])
    close(ours[1][0], theirs[1][0])


def test_cross_entropy_class_axis_1():
    x = randn(3, 10, 4, 5, seed=15, requires_grad=True)
    t = torch.randint(0, 10, (3, 4, 5), generator=torch.Generator().manual_seed(16))
    ours = _grads(lambda: fft.cross_entropy(x, t).reshape(1), x)
    theirs = _grads(lambda: TF.cross_entropy(x, t).reshape(1), x)
    close(ours[0], theirs[0])
    close(ours[1][0], theirs[1][0])


def torch_rope(x, dims, traditional, base, scale, offset):
    """A plain PyTorch rope (MLX's definition), differentiable by torch."""
    t = x.shape[-2]
    half = dims // 2
    inv = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    pos = torch.arange(t, dtype=torch.float64, device=x.device) + offset
    theta = (scale * pos[:, None] * inv).to(x.dtype)
    cos, sin = theta.cos(), theta.sin()
    if traditional:
        x1, x2 = x[..., 0:dims:2], x[..., 1:dims:2]
        r = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., :half], x[..., half:dims]
        r = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([r, x[..., dims:]], dim=-1)


@pytest.mark.parametrize("traditional", [False, True])
def test_rope(traditional):
    x = randn(2, 3, 7, 16, dtype=torch.float64, seed=17, requires_grad=True)
    kw = dict(traditional=traditional, base=10000.0, scale=1.0, offset=3)
    ours = _grads(lambda: fft.rope(x, 12, **kw), x)
    theirs = _grads(lambda: torch_rope(x, 12, traditional, 10000.0, 1.0, 3), x)
    close(ours[0], theirs[0], 1e-12)
    close(ours[1][0], theirs[1][0], 1e-12)


# ----- gradcheck (float64) --------------------------------------------------------------


def test_gradcheck():
    gc = torch.autograd.gradcheck
    d = torch.float64
    x = randn(3, 8, dtype=d, seed=20, requires_grad=True)
    w = randn(8, dtype=d, seed=21, requires_grad=True)
    bias = randn(8, dtype=d, seed=22, requires_grad=True)
    assert gc(lambda x, w: fft.RMSNormFunction.apply(x, w, 1e-5), (x, w))
    assert gc(lambda x, w, b: fft.LayerNormFunction.apply(x, w, b, 1e-5), (x, w, bias))
    a = randn(2, 2, 5, 8, dtype=d, seed=23, requires_grad=True)
    assert gc(lambda a: fft.rope(a, 8, traditional=False, base=100.0, scale=1.0, offset=2), (a,))
    q = randn(1, 4, 3, 8, dtype=d, seed=24, requires_grad=True)
    k = randn(1, 2, 5, 8, dtype=d, seed=25, requires_grad=True)
    v = randn(1, 2, 5, 6, dtype=d, seed=26, requires_grad=True)
    s = randn(4, dtype=d, seed=27, requires_grad=True)
    fn = fft.ScaledDotProductAttentionFunction.apply
    assert gc(lambda q, k, v, s: fn(q, k, v, 0.5, "causal", s), (q, k, v, s))
    logits = randn(5, 9, dtype=d, seed=28, requires_grad=True)
    t = torch.tensor([1, 0, 8, 3, 3])
    # The loss is float32 whatever the logits' dtype (MLX's rule): a coarser numerical check.
    ce = lambda x: fft.CrossEntropyFunction.apply(x, t, None, 0.1, 1e-3, "none")  # noqa: E731
    assert gc(ce, (logits,), eps=1e-3, atol=2e-3)


# ----- a small model, trained with ferrofast's ops and with PyTorch's -----------------


class Block(torch.nn.Module):
    """Embedding, RMSNorm, causal grouped-query attention with rope, LayerNorm, a linear
    head and cross-entropy: written once, run on either implementation."""

    def __init__(self, vocab=50, dim=32, heads=4, kv_heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.norm1 = torch.nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = torch.nn.Linear(dim, dim)
        self.norm2_w = torch.nn.Parameter(torch.ones(dim))
        self.norm2_b = torch.nn.Parameter(torch.zeros(dim))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, targets, fast):
        b, t = tokens.shape
        h = self.emb(tokens)
        x = (fft.rms_norm if fast else TF.rms_norm)(h, (h.shape[-1],), self.norm1, 1e-5)
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.hd).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if fast:
            rope = lambda z: fft.rope(z, self.hd, traditional=False, base=10000.0, scale=1.0, offset=0)  # noqa: E731
            att = fft.scaled_dot_product_attention
        else:
            rope = lambda z: torch_rope(z, self.hd, False, 10000.0, 1.0, 0)  # noqa: E731
            att = TF.scaled_dot_product_attention
        a = att(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, t, -1))
        ln = fft.layer_norm if fast else TF.layer_norm
        h = ln(h, (h.shape[-1],), self.norm2_w, self.norm2_b)
        logits = self.head(h)
        ce = fft.cross_entropy if fast else TF.cross_entropy
        return ce(logits.reshape(b * t, -1), targets.reshape(-1))


def train_both_ways(device, steps=15):
    """15 Adam steps of :class:`Block` on ``device`` with ferrofast's ops and with
    PyTorch's, from the same weights: ``{True: losses, False: losses}``."""
    g = torch.Generator().manual_seed(30)
    tokens = torch.randint(0, 50, (4, 12), generator=g).to(device)
    targets = torch.roll(tokens, -1, dims=1)
    losses = {}
    for fast in (True, False):
        model = Block().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        run = []
        for _ in range(steps):
            opt.zero_grad()
            loss = model(tokens, targets, fast)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[fast] = np.array(run)
    return losses


def test_small_model_trains_like_pytorch():
    losses = train_both_ways("cpu")
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-4, atol=2e-4)
    assert losses[True][-1] < 0.7 * losses[True][0]


# ----- cross-entropy written over the logits ----------------------------------------------


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b.view(torch.int16 if b.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cross_entropy_fused_in_place_tensor(dtype, reduction):
    logits = randn(6, 301, seed=60).mul(4).to(dtype)
    t = torch.randint(0, 301, (6,), generator=torch.Generator().manual_seed(61))
    t[1] = -100
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    want_loss, want_dx = ff.fast.cross_entropy_fused(logits, t, **opts)
    ptr, version = logits.data_ptr(), logits._version
    loss, dx = ff.fast.cross_entropy_fused_in_place(logits, t, **opts)
    assert dx is logits and logits.data_ptr() == ptr
    assert logits._version > version  # autograd sees the write
    _same_bits(logits, want_dx)
    assert isinstance(loss, torch.Tensor)
    _same_bits(loss, want_loss)


def test_cross_entropy_fused_in_place_tensor_refusals():
    t = torch.zeros(4, dtype=torch.int64)
    x = randn(4, 16, seed=62, requires_grad=True)
    with pytest.raises(ValueError, match="require grad"):
        ff.fast.cross_entropy_fused_in_place(x, t)
    keep = x.detach().clone()
    with torch.no_grad():
        # Without grad mode, or detached, the caller takes the overwrite on themselves.
        ff.fast.cross_entropy_fused_in_place(x.detach(), t)
    assert not torch.equal(x.detach(), keep)
    wide = randn(16, 4, seed=63)
    with pytest.raises(ValueError, match="row-major contiguous"):
        ff.fast.cross_entropy_fused_in_place(wide.t(), t)
    with pytest.raises(ValueError, match="not float64"):
        ff.fast.cross_entropy_fused_in_place(randn(4, 16, seed=64).double(), t)
    with pytest.raises(ValueError, match=r"targets shape \(5\)"):
        ff.fast.cross_entropy_fused_in_place(randn(4, 16, seed=65), torch.zeros(5, dtype=torch.int64))


def _ce_model_grads(inplace, reduction, dtype=torch.float32):
    h = randn(12, 20, seed=66, dtype=dtype, requires_grad=True)
    w = randn(50, 20, seed=67, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(68))
    t[3] = -100
    logits = h @ w.t()  # a non-leaf nobody else needs (mm saves h and w)
    loss = fft.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1, inplace=inplace)
    g = randn(*loss.shape, seed=69, dtype=dtype) if reduction == "none" else torch.tensor(0.7, dtype=dtype)
    (loss * g).sum().backward()
    return loss.detach(), h.grad, w.grad, logits


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_inplace_autograd_matches(reduction, dtype):
    l0, h0, w0, logits0 = _ce_model_grads(False, reduction, dtype)
    l1, h1, w1, logits1 = _ce_model_grads(True, reduction, dtype)
    _same_bits(l1, l0)
    _same_bits(h1, h0)
    _same_bits(w1, w0)
    # The in-place run wrote the (scaled) gradient over its logits; the other kept them.
    assert not torch.equal(logits1.detach(), logits0.detach())


def test_cross_entropy_inplace_leaf_and_strided_fall_back():
    t = torch.randint(0, 30, (8,), generator=torch.Generator().manual_seed(70))
    leaf = randn(8, 30, seed=71, requires_grad=True)
    keep = leaf.detach().clone()
    ours = _grads(lambda: fft.cross_entropy(leaf, t, inplace=True), leaf)
    theirs = _grads(lambda: TF.cross_entropy(leaf, t), leaf)
    assert torch.equal(leaf.detach(), keep)  # a leaf is never overwritten
    close(ours[0], theirs[0])
    close(ours[1][0], theirs[1][0])
    # Classes on axis 1 of a 3-D input: a strided view, the ordinary pass.
    x = randn(2, 5, 3, seed=72, requires_grad=True)
    y = x * 1.0
    keep = y.detach().clone()
    t3 = torch.randint(0, 5, (2, 3), generator=torch.Generator().manual_seed(73))
    fft.cross_entropy(y, t3, inplace=True).backward()
    assert torch.equal(y.detach(), keep)
    x2 = x.detach().clone().requires_grad_()
    TF.cross_entropy(x2, t3).backward()
    close(x.grad, x2.grad)


def test_cross_entropy_inplace_saved_logits_raise():
    # exp's backward needs its output: overwriting it must fail loudly, not corrupt grads.
    z = randn(4, 10, seed=74, requires_grad=True)
    logits = z.exp()
    t = torch.zeros(4, dtype=torch.int64)
    loss = fft.cross_entropy(logits, t, inplace=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_cross_entropy_inplace_second_backward_raises():
    h = randn(4, 8, seed=75, requires_grad=True)
    logits = h * 2.0
    loss = fft.cross_entropy(logits, torch.zeros(4, dtype=torch.int64), inplace=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_cross_entropy_function_six_args_still_work():
    x = randn(3, 7, seed=76, requires_grad=True)
    t = torch.tensor([1, 2, 3])
    y = x * 1.0
    fft.CrossEntropyFunction.apply(y, t, -100, 0.0, 0.0, "mean").backward()
    x2 = x.detach().clone().requires_grad_()
    TF.cross_entropy(x2, t).backward()
    close(x.grad, x2.grad)
