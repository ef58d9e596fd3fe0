"""ferrofast on CUDA tensors: zero-copy DLPack import of device memory, every op against the
same op on the CPU (the definition), streams (the producer's current stream is where the
work goes; consumers on other streams wait), the torch autograd functions on CUDA against
PyTorch's own ops, and CuPy / JAX arrays in and out. Skipped without a CUDA device."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import ferrofast as ff  # noqa: E402
import ferrofast.torch as fft  # noqa: E402
from ferrofast import _native  # noqa: E402

import torch.nn.functional as TF  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance of a GPU result against the CPU's, per dtype (both round to the
# dtype; the GPU kernels accumulate in a different order).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(tuple(shape), generator=g, dtype=torch.float32)).to(dtype)


def cuda(*xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


def close(got, want, dtype, factor=1.0):
    assert got.device.type == "cuda", got.device
    tol = TOL[dtype] * factor
    torch.testing.assert_close(got.cpu().double(), want.double(), rtol=tol, atol=tol)


def same_on_both(f, *args, dtype, factor=1.0):
    """``f`` on CUDA copies of ``args`` against ``f`` on the CPU tensors themselves."""
    got = f(*cuda(*args))
    want = f(*args)
    if isinstance(want, (tuple, list)):
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            else:
                close(g, w, dtype, factor)
    else:
        close(got, want, dtype, factor)


# ----- exchange -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool])
def test_zero_copy_in_and_out(dtype):
    x = randn(64, 96, seed=1).cuda()
    x = (x > 0) if dtype == torch.bool else x.to(dtype)
    t = ff._convert.to_tensor(x)
    assert t.device == "cuda:0"
    assert t.data_ptr == x.data_ptr()
    assert t.stream == torch.cuda.current_stream().cuda_stream
    xt = x.t()
    assert ff._convert.to_tensor(xt).data_ptr == xt.data_ptr()
    sliced = x[3:, 5::2]
    assert ff._convert.to_tensor(sliced).data_ptr == sliced.data_ptr()
    # Exported back, borrowed memory is handed over as a copy (a DLPack consumer may write
    # to what it receives; ferrofast never writes the producer's memory).
    back = torch.from_dlpack(t)
    assert back.data_ptr() != x.data_ptr() and back.device == x.device
    assert torch.equal(back, x)
    with pytest.raises(BufferError):
        ff._convert.to_tensor(x).__dlpack__(copy=False)


def test_results_are_torch_cuda_tensors_in_ferrofast_memory():
    x = randn(8, 256, dtype=torch.bfloat16, seed=2).cuda()
    t = _native.rms_norm(ff._convert.to_tensor(x), None, 1e-5)
    assert t.device == "cuda:0" and t.dtype == "bfloat16"
    p = t.data_ptr
    y = torch.from_dlpack(t)
    assert y.data_ptr() == p and y.is_cuda and y.dtype == torch.bfloat16
    out = ff.fast.rms_norm(x, None, 1e-5)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.bfloat16
    close(out, TF.rms_norm(x.float(), (256,), eps=1e-5).cpu(), torch.bfloat16)


def test_results_free_their_memory():
    x = randn(1024, 4096, seed=3).cuda()
    for _ in range(3):
        ff.fast.rms_norm(x, None, 1e-5)
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(200):
        y = ff.fast.rms_norm(x, None, 1e-5)
        del y
    torch.cuda.synchronize()
    # 200 results of 16 MiB each: all but a few of them must have been reused.
    assert free_before - torch.cuda.mem_get_info()[0] < 64 << 20


def test_mixed_devices_and_stream_names_are_errors():
    x = randn(4, 32, seed=4)
    w = randn(32, seed=5)
    with pytest.raises(Exception, match="(?i)device|cuda|cpu"):
        ff.fast.rms_norm(x.cuda(), w, 1e-5)
    with pytest.raises(ValueError, match="CPU"):
        ff.fast.rms_norm(x.cuda(), None, 1e-5, stream="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        ff.fast.rms_norm(x, None, 1e-5, stream="gpu")
    out = ff.fast.rms_norm(x.cuda(), w.cuda(), 1e-5, stream="gpu")
    assert out.is_cuda


# ----- every op against the CPU -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms(dtype):
    x = randn(5, 7, 1000, dtype=dtype, seed=10, scale=3.0)
    w = randn(1000, dtype=dtype, seed=11)
    b = randn(1000, dtype=dtype, seed=12)
    g = randn(5, 7, 1000, dtype=dtype, seed=13)
    same_on_both(lambda x, w: ff.fast.rms_norm(x, w, 1e-5), x, w, dtype=dtype)
    same_on_both(lambda x, w, b: ff.fast.layer_norm(x, w, b, 1e-5), x, w, b, dtype=dtype)
    same_on_both(lambda x, w, g: ff.fast.rms_norm_vjp(x, w, 1e-5, g), x, w, g, dtype=dtype, factor=4)
    same_on_both(
        lambda x, w, b, g: ff.fast.layer_norm_vjp(x, w, b, 1e-5, g), x, w, b, g, dtype=dtype, factor=4
    )
    # Strided input: a transposed view read in place.
    xt = randn(1000, 6, dtype=dtype, seed=14).t()
    same_on_both(lambda x: ff.fast.rms_norm(x, None, 1e-5), xt, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
def test_rope(dtype, traditional):
    x = randn(2, 4, 33, 128, dtype=dtype, seed=20)
    kw = dict(traditional=traditional, base=10000.0, scale=1.0)
    same_on_both(lambda a: ff.fast.rope(a, 96, offset=7, **kw), x, dtype=dtype)
    offsets = torch.tensor([3, 11], dtype=torch.int32)
    same_on_both(lambda a, o: ff.fast.rope(a, 128, offset=o, **kw), x, offsets, dtype=dtype)
    same_on_both(lambda g: ff.fast.rope_vjp(g, 128, offset=5, **kw), x, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
def test_attention(dtype, mask):
    q = randn(2, 8, 70, 128, dtype=dtype, seed=30)
    k = randn(2, 2, 90, 128, dtype=dtype, seed=31)
    v = randn(2, 2, 90, 128, dtype=dtype, seed=32)
    m = mask
    if mask == "bool":
        m = randn(70, 90, seed=33) > -0.5
    elif mask == "additive":
        m = randn(2, 1, 70, 90, dtype=dtype, seed=34)
    scale = 128**-0.5

    def fwd(q, k, v, m):
        return ff.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=m)

    same_on_both(fwd, q, k, v, m, dtype=dtype, factor=2)

    d_out = randn(2, 8, 70, 128, dtype=dtype, seed=35)

    def bwd(q, k, v, m, d_out):
        out, lse = ff.fast.scaled_dot_product_attention_with_lse(q, k, v, scale=scale, mask=m)
        return ff.fast.scaled_dot_product_attention_vjp(q, k, v, out, lse, d_out, scale=scale, mask=m)

    same_on_both(bwd, q, k, v, m, d_out, dtype=dtype, factor=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype):
    logits = randn(37, 5003, dtype=dtype, seed=40, scale=4.0)
    targets = torch.randint(0, 5003, (37,), generator=torch.Generator().manual_seed(41))
    targets[5] = -100
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4)
    same_on_both(lambda x, t: ff.fast.cross_entropy(x, t), logits, targets.clamp(min=0), dtype=torch.float32)
    for red in ("none", "mean"):
        same_on_both(
            lambda x, t: ff.fast.cross_entropy_with(x, t, reduction=red, **opts),
            logits, targets, dtype=torch.float32,
        )
        same_on_both(
            lambda x, t: ff.fast.cross_entropy_fused(x, t, reduction=red, **opts)[1],
            logits, targets, dtype=dtype, factor=2,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 200])
def test_gated_delta(dtype, steps):
    b, hk, hv, dk, dv = 2, 2, 4, 128, 128
    q = randn(b, steps, hk, dk, dtype=dtype, seed=50, scale=dk**-0.5)
    k = TF.normalize(randn(b, steps, hk, dk, seed=51), dim=-1).to(dtype)
    v = randn(b, steps, hv, dv, dtype=dtype, seed=52)
    gamma = torch.sigmoid(randn(b, steps, hv, seed=53) + 3.0).to(dtype)
    beta = torch.sigmoid(randn(b, steps, hv, seed=54)).to(dtype)
    state = randn(b, hv, dv, dk, seed=55, scale=0.1)

    def f(q, k, v, gamma, beta, state):
        return ff.fast.gated_delta_update(q, k, v, gamma, beta, state)

    same_on_both(f, q, k, v, gamma, beta, state, dtype=dtype, factor=2)


# ----- streams ------------------------------------------------------------------------


def test_work_goes_to_the_current_stream_and_waits_for_it():
    s = torch.cuda.Stream()
    a = randn(2048, 2048, seed=60).cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        # A long matmul queued on s; ferrofast reads its result on s, after it.
        y = a @ a
        t = ff._convert.to_tensor(y)
        assert t.stream == s.cuda_stream
        out = ff.fast.rms_norm(y, None, 1e-5)
        assert ff._convert.to_tensor(out).stream == s.cuda_stream
    s.synchronize()
    close(out, TF.rms_norm(y.cpu(), (2048,), eps=1e-5), torch.float32, factor=10)


def test_consumers_on_other_streams_wait():
    s = torch.cuda.Stream()
    a = randn(4096, 4096, seed=61).cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        out = ff.fast.rms_norm(a, None, 1e-5)
        t = ff._convert.to_tensor(out)
    # Taken on the default stream: __dlpack__(stream=default) makes it wait for s.
    z = torch.from_dlpack(t) * 2.0
    close(z, 2.0 * TF.rms_norm(a.cpu(), (4096,), eps=1e-5), torch.float32, factor=10)
    # The DLPack stream conventions: 1 legacy default, 2 per-thread default, -1 none, a
    # CUstream; 0 is ambiguous and refused. Each result exports once.
    with pytest.raises(BufferError):
        t.__dlpack__()
    for stream in (1, 2, -1, None, torch.cuda.Stream().cuda_stream):
        with torch.cuda.stream(s):
            u = ff._convert.to_tensor(ff.fast.rms_norm(a, None, 1e-5))
        u.__dlpack__(stream=stream)
    u = ff._convert.to_tensor(ff.fast.rms_norm(a, None, 1e-5))
    with pytest.raises(Exception):
        u.__dlpack__(stream=0)


# ----- torch autograd on CUDA -----------------------------------------------------------


def _grads(f, *xs):
    for x in xs:
        x.grad = None
    out = f()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(70)).to(out)
    out.backward(g)
    return out.detach(), [x.grad.clone() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_pytorch_on_cuda(dtype):
    f = TOL[dtype] * 4
    x = randn(4, 9, 512, dtype=dtype, seed=71).cuda().requires_grad_()
    w = randn(512, dtype=dtype, seed=72).cuda().requires_grad_()
    b = randn(512, dtype=dtype, seed=73).cuda().requires_grad_()
    ours = _grads(lambda: fft.rms_norm(x, (512,), w, 1e-5), x, w)
    theirs = _grads(lambda: TF.rms_norm(x.float(), (512,), w.float(), 1e-5), x, w)
    for o, t in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        torch.testing.assert_close(o.float(), t.float(), rtol=f, atol=f * 8)
    ours = _grads(lambda: fft.layer_norm(x, (512,), w, b), x, w, b)
    theirs = _grads(lambda: TF.layer_norm(x.float(), (512,), w.float(), b.float()), x, w, b)
    for o, t in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        torch.testing.assert_close(o.float(), t.float(), rtol=f, atol=f * 8)

    q = randn(2, 8, 100, 64, dtype=dtype, seed=74).cuda().requires_grad_()
    k = randn(2, 4, 100, 64, dtype=dtype, seed=75).cuda().requires_grad_()
    v = randn(2, 4, 100, 64, dtype=dtype, seed=76).cuda().requires_grad_()
    ours = _grads(lambda: fft.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), q, k, v)
    theirs = _grads(
        lambda: TF.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
        ),
        q, k, v,
    )
    for o, t in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        torch.testing.assert_close(o.float(), t.float(), rtol=f, atol=f * 4)

    logits = randn(64, 3000, dtype=dtype, seed=77, scale=3.0).cuda().requires_grad_()
    tgt = torch.randint(0, 3000, (64,), generator=torch.Generator().manual_seed(78)).cuda()
    ours = _grads(lambda: fft.cross_entropy(logits, tgt, label_smoothing=0.1), logits)
    theirs = _grads(lambda: TF.cross_entropy(logits.float(), tgt, label_smoothing=0.1), logits)
    torch.testing.assert_close(ours[0].float(), theirs[0].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1][0].float(), theirs[1][0].float(), rtol=f, atol=f * 1e-3)


def test_small_model_trains_like_pytorch_on_cuda():
    from test_torch import train_both_ways

    losses = train_both_ways("cuda")
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3, atol=1e-3)
    assert losses[True][-1] < 0.7 * losses[True][0]


# ----- other CUDA libraries -------------------------------------------------------------


def test_cupy_in_and_out():
    cupy = pytest.importorskip("cupy")
    x = randn(16, 300, seed=80)
    cx = cupy.asarray(x.numpy())
    out = ff.fast.rms_norm(cx, None, 1e-5)
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_allclose(
        cupy.asnumpy(out), ff.fast.rms_norm(x.numpy(), None, 1e-5), rtol=2e-5, atol=2e-5
    )
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        out = ff.fast.layer_norm(cx, None, None, 1e-5)
        assert ff._convert.to_tensor(cx).stream == s.ptr
    s.synchronize()
    np.testing.assert_allclose(
        cupy.asnumpy(out), ff.fast.layer_norm(x.numpy(), None, None, 1e-5), rtol=2e-5, atol=2e-5
    )


def test_jax_in_and_out():
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX sees no GPU")
    x = randn(16, 300, seed=81).numpy()
    jx = jax.device_put(x, gpu)
    out = ff.fast.rms_norm(jx, None, 1e-5)
    assert type(out).__module__.split(".")[0] in ("jax", "jaxlib")
    np.testing.assert_allclose(
        np.asarray(out), ff.fast.rms_norm(x, None, 1e-5), rtol=2e-5, atol=2e-5
    )


# ----- custom kernels -------------------------------------------------------------------

EXP_BODY = """
    uint elem = blockIdx.x * blockDim.x + threadIdx.x;
    if (elem < n) {
        out[elem] = static_cast<T>(exp(static_cast<float>(inp[elem])));
    }
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_on_torch_tensors(dtype):
    k = ff.fast.cuda_kernel("myexp", ["inp"], ["out"], EXP_BODY)
    x = randn(4, 1000, dtype=dtype, seed=90).cuda()
    (y,) = k(
        inputs=[x],
        output_shapes=[x.shape],
        output_dtypes=[dtype],
        grid=(4000, 1, 1),
        threadgroup=(256, 1, 1),
        template=[("T", dtype), ("n", 4000)],
    )
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.dtype == dtype
    close(y, torch.exp(x.float()).cpu(), dtype)
    # NumPy in, NumPy out (uploaded for the call, copied back).
    xn = randn(4, 1000, seed=91).numpy()
    (yn,) = k(
        inputs=[xn],
        output_shapes=[xn.shape],
        output_dtypes=["float32"],
        grid=(4000, 1, 1),
        threadgroup=(256, 1, 1),
        template=[("T", np.float32), ("n", 4000)],
    )
    assert isinstance(yn, np.ndarray)
    np.testing.assert_allclose(yn, np.exp(xn), rtol=1e-6)


def test_cuda_kernel_strided_scalar_and_init_value():
    src = """
    uint elem = blockIdx.x * blockDim.x + threadIdx.x;
    if (elem < a_shape[0] * a_shape[1]) {
        auto loc = elem_to_loc(elem, a_shape.data(), a_strides.data(), a_ndim);
        out[elem] = a[loc] * s[0];
        if (elem == 0) { count[0] += 1.0f; }
    }
    """
    k = ff.fast.cuda_kernel("strided", ["a", "s"], ["out", "count"], src, ensure_row_contiguous=False)
    base = randn(300, 7, seed=92).cuda()
    a = base.t()  # [7, 300], read in place through its strides
    out, count = k(
        inputs=[a, 2.5],
        output_shapes=[a.shape, (1,)],
        output_dtypes=[torch.float32, torch.float32],
        grid=(2100, 1, 1),
        threadgroup=(128, 1, 1),
        init_value=41.0,
    )
    close(out, (2.5 * a).cpu(), torch.float32)
    assert count.item() == 42.0


def test_metal_kernel_guide_examples():
    source = """
        uint elem = thread_position_in_grid.x;
        T tmp = inp[elem];
        out[elem] = metal::exp(tmp);
    """
    k = ff.fast.metal_kernel("myexp", ["inp"], ["out"], source)
    x = randn(4, 16, dtype=torch.float16, seed=93).cuda()
    (y,) = k(
        inputs=[x],
        template=[("T", torch.float32)],
        grid=(x.numel(), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    close(y, torch.exp(x.float()).cpu(), torch.float16)
    # Atomic outputs: a sum by atomic adds into an output filled with init_value.
    total = ff.fast.metal_kernel(
        "total",
        ["inp"],
        ["out"],
        """
        uint i = thread_position_in_grid.x;
        atomic_fetch_add_explicit(&out[0], inp[i], memory_order_relaxed);
        """,
        atomic_outputs=True,
    )
    v = randn(1000, seed=94).cuda()
    (s,) = total(
        inputs=[v], grid=(1000, 1, 1), threadgroup=(128, 1, 1), output_shapes=[(1,)],
        output_dtypes=[torch.float32], init_value=1.0,
    )
    torch.testing.assert_close(s.cpu().double(), 1.0 + v.cpu().double().sum().reshape(1), rtol=1e-5, atol=1e-4)


def test_precompiled_cuda_kernel_and_streams():
    src = (
        'extern "C" __global__ void scale(const float* x, float* y, float s, int n) {\n'
        "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  if (i < n) y[i] = s * x[i];\n}\n"
    )
    image, symbol = ff.fast.compile_to_cubin(src, "scale")
    x = randn(5000, seed=95).cuda()
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        big = x.repeat(6000, 1) @ torch.ones(5000, 1, device="cuda")  # [6000, 1], on s
        y0 = big[:5000, 0] * 0 + x  # x, produced on s after the long op
        (y,) = ff.fast.precompiled_cuda_kernel(
            name=symbol,
            compiled_source=image,
            inputs=[y0],
            output_shapes=[(5000,)],
            output_dtypes=[torch.float32],
            scalars=[2.5, 5000],
            grid=(5000, 1, 1),
            threadgroup=(256, 1, 1),
        )
    s.synchronize()
    close(y, (2.5 * x).cpu(), torch.float32)
    # An explicit stream object.
    (z,) = ff.fast.precompiled_cuda_kernel(
        name=symbol, compiled_source=image, inputs=[x], output_shapes=[(5000,)],
        output_dtypes=["float32"], scalars=[-1.0, 5000], grid=(5000, 1, 1),
        threadgroup=(256, 1, 1), stream=s,
    )
    s.synchronize()
    close(z, (-x).cpu(), torch.float32)


def test_kernel_compile_errors_carry_nvrtc_s_log():
    k = ff.fast.cuda_kernel("broken", ["a"], ["b"], "b[0] = a[0] +;")
    with pytest.raises(RuntimeError, match="(?i)compile"):
        k(inputs=[torch.ones(4, device="cuda")], output_shapes=[(4,)], output_dtypes=["float32"],
          grid=(4, 1, 1), threadgroup=(4, 1, 1))


def test_kernel_on_an_explicit_stream_is_ordered_after_the_inputs():
    k = ff.fast.cuda_kernel(
        "copy2", ["a"], ["b"],
        "uint i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) b[i] = 2.0f * a[i];",
    )
    producer, other = torch.cuda.Stream(), torch.cuda.Stream()
    a = randn(4096, 4096, seed=96).cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        y = (a @ a)[0].contiguous()  # written on `producer` by a long matmul
        (b,) = k(
            inputs=[y], output_shapes=[y.shape], output_dtypes=[torch.float32],
            grid=(4096, 1, 1), threadgroup=(256, 1, 1), template=[("n", 4096)], stream=other,
        )
        z = b + 0  # `producer` waited for the kernel on `other`
    torch.cuda.synchronize()
    close(z, 2.0 * (a.cpu() @ a.cpu())[0], torch.float32, factor=50)


# ----- cross-entropy written over CUDA logits --------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_fused_in_place(dtype, reduction):
    logits = randn(37, 5003, dtype=dtype, seed=90, scale=4.0).cuda()
    targets = torch.randint(0, 5003, (37,), generator=torch.Generator().manual_seed(91)).cuda()
    targets[5] = -100
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    want_loss, want_dx = ff.fast.cross_entropy_fused(logits, targets, **opts)
    ptr = logits.data_ptr()
    loss, dx = ff.fast.cross_entropy_fused_in_place(logits, targets, **opts)
    assert dx is logits and logits.data_ptr() == ptr and loss.is_cuda
    assert torch.equal(logits.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want_dx.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.equal(loss, want_loss)


def test_cross_entropy_fused_in_place_on_a_side_stream():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        logits = randn(64, 4096, seed=92, scale=3.0).cuda()
        targets = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(93)).cuda()
        want_loss, want_dx = ff.fast.cross_entropy_fused(logits, targets, reduction="sum")
        loss, _ = ff.fast.cross_entropy_fused_in_place(logits, targets, reduction="sum")
        # Queued on s after the write: sees the gradient with no host wait.
        same = torch.equal(logits, want_dx) and torch.equal(loss, want_loss)
    torch.cuda.synchronize()
    assert same


def test_cross_entropy_fused_in_place_cuda_refusals():
    t = torch.zeros(16, dtype=torch.int64, device="cuda")
    wide = randn(4, 16, seed=94).cuda()
    with pytest.raises(ValueError, match="row-major contiguous"):
        ff.fast.cross_entropy_fused_in_place(wide.t(), t)
    keep = wide.clone()
    with pytest.raises(ValueError, match=r"targets shape \(16\)"):
        ff.fast.cross_entropy_fused_in_place(wide, t)
    assert torch.equal(wide, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cross_entropy_inplace_cuda(dtype):
    def run(inplace):
        h = randn(48, 64, dtype=dtype, seed=95).cuda().requires_grad_()
        w = randn(3000, 64, dtype=dtype, seed=96).cuda().requires_grad_()
        t = torch.randint(0, 3000, (48,), generator=torch.Generator().manual_seed(97)).cuda()
        loss = fft.cross_entropy(h @ w.t(), t, label_smoothing=0.1, inplace=inplace)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)
