"""Every op of ferrofast.fast on NumPy float32 / float16 / bfloat16 against float64
references written from MLX's definitions."""

import numpy as np
import pytest

import ferrofast as ff
import reference as ref
from conftest import BF16, FLOATS, close, rand

F = ff.fast


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("d", [31, 32, 256, 4099])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(dtype, d, with_weight):
    x = rand((3, 5, d), dtype, 1)
    w = rand((d,), dtype, 2) if with_weight else None
    out = F.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    close(out, ref.rms_norm(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("wb", [(True, True), (True, False), (False, True), (False, False)])
def test_layer_norm(dtype, wb):
    d = 33
    x = rand((4, 7, d), dtype, 3, scale=2.0) + np.asarray(0.5, dtype)
    w = rand((d,), dtype, 4) if wb[0] else None
    b = rand((d,), dtype, 5) if wb[1] else None
    out = F.layer_norm(x, w, b, 1e-5)
    assert out.dtype == dtype
    close(out, ref.layer_norm(x, w, b, 1e-5), dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [8, 6])
@pytest.mark.parametrize("offset", [0, 3, -2])
def test_rope(dtype, traditional, dims, offset):
    x = rand((2, 3, 5, 8), dtype, 6)
    out = F.rope(x, dims, traditional=traditional, base=10000.0, scale=1.5, offset=offset)
    assert out.dtype == dtype and out.shape == x.shape
    close(out, ref.rope(x, dims, traditional, 10000.0, 1.5, offset), dtype)
    # Features past dims pass through bit for bit.
    np.testing.assert_array_equal(
        np.asarray(out)[..., dims:].view(np.uint8), np.asarray(x)[..., dims:].view(np.uint8)
    )


@pytest.mark.parametrize("offset", [np.array(4, np.int32), np.array([5], np.int64), np.array([1, 7], np.int32), np.array([2, 9], np.uint32)])
def test_rope_array_offsets(offset):
    x = rand((2, 4, 3, 16), np.float32, 7)
    out = F.rope(x, 16, traditional=False, base=500.0, scale=1.0, offset=offset)
    close(out, ref.rope(x, 16, False, 500.0, 1.0, offset), np.float32)


def test_rope_freqs_and_3d():
    x = rand((2, 6, 8), np.float32, 8)
    freqs = np.abs(rand((4,), np.float32, 9)) * 10 + 1
    out = F.rope(x, 8, traditional=True, base=None, scale=1.0, offset=1, freqs=freqs)
    close(out, ref.rope(x, 8, True, None, 1.0, 1, freqs=freqs), np.float32)


def _sdpa_inputs(dtype, b=2, nq=4, nkv=2, tq=5, tkv=7, d=16, dv=16, seed=10):
    q = rand((b, nq, tq, d), dtype, seed)
    k = rand((b, nkv, tkv, d), dtype, seed + 1)
    v = rand((b, nkv, tkv, dv), dtype, seed + 2)
    return q, k, v


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_sdpa(dtype, mask_kind):
    q, k, v = _sdpa_inputs(dtype)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "causal":
        mask = "causal"
    elif mask_kind == "bool":
        rng = np.random.default_rng(11)
        mask = rng.random((2, 1, 5, 7)) < 0.7
        mask[..., 0] = True  # every row sees a key
    else:
        mask = rand((1, 4, 5, 7), dtype, 12)
    out = F.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert out.dtype == dtype and out.shape == (2, 4, 5, 16)
    expected, _ = ref.sdpa(q, k, v, 0.25, mask)
    close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=str)
def test_sdpa_sinks_and_value_dim(dtype):
    q, k, v = _sdpa_inputs(dtype, nq=6, nkv=3, tq=3, tkv=9, d=8, dv=12)
    sinks = rand((6,), dtype, 13)
    out = F.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal", sinks=sinks)
    expected, _ = ref.sdpa(q, k, v, 0.3, "causal", sinks)
    close(out, expected, dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("v", [7, 128, 1000])
def test_cross_entropy(dtype, v):
    logits = rand((4, 7, v), dtype, 14, scale=3.0)
    targets = np.random.default_rng(15).integers(0, v, (4, 7))
    out = F.cross_entropy(logits, targets)
    assert out.dtype == np.float32 and out.shape == (4, 7)
    # ferrofast computes in float32 on every device: the only rounding of note is the
    # logits' own, already in the reference's inputs.
    close(out, ref.cross_entropy(logits, targets), np.float32, factor=5)


@pytest.mark.parametrize("tdtype", [np.int8, np.int16, np.uint8, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_cross_entropy_target_dtypes(tdtype):
    logits = rand((6, 9), np.float32, 16)
    targets = np.array([0, 3, 8, 1, 2, 5], dtype=tdtype)
    close(F.cross_entropy(logits, targets), ref.cross_entropy(logits, targets), np.float32)


def test_cross_entropy_negative_targets_wrap_and_1d():
    logits = rand((9,), np.float32, 17)
    out = F.cross_entropy(logits, np.array(-1))
    assert out.shape == ()
    close(out, ref.cross_entropy(logits, np.array(8)), np.float32)


# ----- dtype rules (MLX's) ------------------------------------------------------------------


def test_norm_dtype_rules():
    x16 = rand((2, 8), np.float16, 20)
    w32 = rand((8,), np.float32, 21)
    assert F.rms_norm(x16, w32, 1e-5).dtype == np.float32
    assert F.rms_norm(rand((2, 8), BF16, 22), rand((8,), np.float16, 23), 1e-5).dtype == np.float32
    assert F.layer_norm(x16, None, w32, 1e-5).dtype == np.float16
    assert F.layer_norm(x16, w32, None, 1e-5).dtype == np.float32
    assert F.layer_norm(x16, x16[0], w32, 1e-5).dtype == np.float32
    xi = np.arange(16, dtype=np.int32).reshape(2, 8)
    assert F.rms_norm(xi, rand((8,), np.float16, 24), 1e-5).dtype == np.float16


def test_sdpa_dtype_rule():
    q = rand((1, 2, 3, 8), BF16, 25)
    k = rand((1, 2, 3, 8), np.float16, 26)
    assert F.scaled_dot_product_attention(q, k, k, scale=1.0).dtype == np.float32


# ----- non-contiguous inputs ----------------------------------------------------------------


def test_strided_inputs():
    base = rand((4, 6, 2 * 32), np.float32, 30)
    for x in (base[:, :, ::2], base[::-1, :, :32], np.swapaxes(base, 0, 1)[..., 5:37]):
        assert not x.flags.c_contiguous
        close(F.rms_norm(x, None, 1e-6), ref.rms_norm(x, None, 1e-6), np.float32)
        close(F.layer_norm(x, None, None, 1e-6), ref.layer_norm(x, None, None, 1e-6), np.float32)
    # [B, T, H, D] memory viewed as [B, H, T, D].
    q = np.swapaxes(rand((2, 5, 4, 16), np.float32, 31), 1, 2)
    k = np.swapaxes(rand((2, 7, 2, 16), np.float32, 32), 1, 2)
    v = np.swapaxes(rand((2, 7, 2, 16), np.float32, 33), 1, 2)
    close(F.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal"), ref.sdpa(q, k, v, 0.2, "causal")[0], np.float32)
    close(F.rope(q, 16, traditional=False, base=1e4, scale=1.0, offset=2), ref.rope(q, 16, False, 1e4, 1.0, 2), np.float32)
    logits = np.swapaxes(rand((50, 3), np.float32, 34), 0, 1)
    t = np.arange(6)[::2]
    close(F.cross_entropy(logits, t), ref.cross_entropy(logits, t), np.float32)


def test_read_only_and_python_inputs():
    x = rand((3, 8), np.float32, 35)
    x.flags.writeable = False
    close(F.rms_norm(x, None, 1e-5), ref.rms_norm(x, None, 1e-5), np.float32)
    out = F.rms_norm([[1.0, 2.0, 3.0]], None, 1e-5)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64


# ----- backward passes ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_vjp(dtype, with_weight):
    x = rand((3, 4, 24), dtype, 40)
    w = rand((24,), dtype, 41) if with_weight else None
    g = rand((3, 4, 24), dtype, 42)
    dx, dw = F.rms_norm_vjp(x, w, 1e-5, g)
    rdx, rdw = ref.rms_norm_vjp(x, w, 1e-5, g)
    close(dx, rdx, dtype, factor=5)
    if with_weight:
        close(dw, rdw, dtype, factor=5)
    else:
        assert dw is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
def test_layer_norm_vjp(dtype):
    x = rand((5, 20), dtype, 43)
    w, b, g = rand((20,), dtype, 44), rand((20,), dtype, 45), rand((5, 20), dtype, 46)
    got = F.layer_norm_vjp(x, w, b, 1e-5, g)
    for a, r in zip(got, ref.layer_norm_vjp(x, w, b, 1e-5, g)):
        close(a, r, dtype, factor=5)
    _, dw, db = F.layer_norm_vjp(x, None, None, 1e-5, g)
    assert dw is None and db is None


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_vjp_is_the_adjoint(traditional):
    x = rand((2, 3, 6, 16), np.float64, 47)
    g = rand((2, 3, 6, 16), np.float64, 48)
    kw = dict(traditional=traditional, base=1e4, scale=0.7, offset=np.array([1, 4]))
    y = F.rope(x, 12, **kw)
    dx = F.rope_vjp(g, 12, **kw)
    # <rope(x), g> == <x, rope_vjp(g)> for the linear map rope.
    np.testing.assert_allclose((y * g).sum(), (x * dx).sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "additive"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_sdpa_with_lse_and_vjp(dtype, mask_kind, with_sinks):
    q, k, v = _sdpa_inputs(dtype, nq=4, nkv=2, tq=6, tkv=6, d=8, dv=8, seed=50)
    mask = {"none": None, "causal": "causal", "additive": rand((1, 1, 6, 6), dtype, 53)}[mask_kind]
    sinks = rand((4,), dtype, 54) if with_sinks else None
    out, lse = F.scaled_dot_product_attention_with_lse(q, k, v, scale=0.375, mask=mask, sinks=sinks)
    rout, rlse = ref.sdpa(q, k, v, 0.375, mask, sinks)
    close(out, rout, dtype)
    assert lse.shape == (2, 4, 6)
    close(lse, rlse, np.float32 if dtype == np.float32 else dtype)
    d_out = rand(out.shape, dtype, 55)
    dq, dk, dv, ds = F.scaled_dot_product_attention_vjp(q, k, v, out, lse, d_out, scale=0.375, mask=mask, sinks=sinks)
    rdq, rdk, rdv, rds = ref.sdpa_vjp(q, k, v, 0.375, mask, sinks, d_out)
    for a, r in ((dq, rdq), (dk, rdk), (dv, rdv)):
        assert a.dtype == dtype
        close(a, r, dtype, factor=10)
    if with_sinks:
        close(ds, rds, dtype, factor=10)
    else:
        assert ds is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=str)
def test_cross_entropy_vjp_and_fused(dtype):
    logits = rand((5, 3, 40), dtype, 60, scale=2.0)
    targets = np.random.default_rng(61).integers(0, 40, (5, 3))
    g = rand((5, 3), np.float32, 62)
    dx = F.cross_entropy_vjp(logits, targets, g)
    assert dx.dtype == dtype
    close(dx, ref.cross_entropy_grad(logits, targets, g), dtype)
    loss, dx1 = F.cross_entropy_fused(logits, targets, reduction="mean")
    assert loss.shape == () and loss.dtype == np.float32
    close(loss, ref.cross_entropy(logits, targets).mean(), np.float32, factor=5)
    close(dx1, ref.cross_entropy_grad(logits, targets, np.full((5, 3), 1 / 15)), dtype)


def test_cross_entropy_with_options():
    logits = rand((6, 11), np.float32, 63)
    targets = np.array([1, -100, 3, 10, -100, 0])
    out = F.cross_entropy_with(logits, targets, ignore_index=-100, reduction="none")
    r = ref.cross_entropy(logits, np.where(targets == -100, 0, targets))
    r[targets == -100] = 0.0
    close(out, r, np.float32)
    total = F.cross_entropy_with(logits, targets, ignore_index=-100, reduction="sum")
    close(total, r.sum(), np.float32)
    mean = F.cross_entropy_with(logits, targets, ignore_index=-100, reduction="mean")
    close(mean, r.sum() / 4, np.float32)
    with pytest.raises(ValueError, match="reduction must be"):
        F.cross_entropy_with(logits, targets, reduction="avg")


def test_stream_argument():
    x = rand((2, 8), np.float32, 70)
    close(F.rms_norm(x, None, 1e-5, stream="cpu"), ref.rms_norm(x, None, 1e-5), np.float32)
    with pytest.raises(ValueError, match="names the CUDA but the inputs live on the CPU"):
        F.rms_norm(x, None, 1e-5, stream="gpu")
    with pytest.raises(ValueError, match="stream must be None or a device"):
        F.rms_norm(x, None, 1e-5, stream="tpu")


def _gdn_inputs(b, t, hk, hv, dk, dv, dtype, seed, per_key=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hk, dk))
    k = rng.standard_normal((b, t, hk, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True) + 1e-6
    v = rng.standard_normal((b, t, hv, dv))
    g = rng.uniform(0.5, 1.0, (b, t, hv, dk) if per_key else (b, t, hv))
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, hv))))
    state = rng.standard_normal((b, hv, dv, dk)).astype(np.float32)
    return [x.astype(dtype) for x in (q, k, v, g, beta)] + [state]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("heads", [(2, 2), (2, 4), (1, 3)])
@pytest.mark.parametrize("per_key", [False, True])
def test_gated_delta_update(dtype, heads, per_key):
    hk, hv = heads
    q, k, v, g, beta, state = _gdn_inputs(2, 9, hk, hv, 16, 24, dtype, 30, per_key)
    mask = np.array([[True] * 9, [True, False, True, True, False, True, True, True, False]])
    for s0, m in [(None, None), (state, None), (state, mask)]:
        out, s = F.gated_delta_update(q, k, v, g, beta, s0, m)
        assert out.dtype == dtype and out.shape == (2, 9, hv, 24)
        assert s.dtype == np.float32 and s.shape == (2, hv, 24, 16)
        ro, rs = ref.gated_delta_update(q, k, v, g, beta, s0, m)
        close(out, ro, dtype, factor=5)
        np.testing.assert_allclose(s, rs, rtol=1e-4, atol=1e-4)
    # MLX's keyword names.
    out, _ = F.gated_delta_update(
        q=q, k=k, v=v, gamma=g, beta=beta, initial_state=state, mask=mask, stream=None
    )
    close(out, ref.gated_delta_update(q, k, v, g, beta, state, mask)[0], dtype, factor=5)


def test_gated_delta_update_vjp_is_the_gradient():
    """The gradients against central differences of the float64 reference along a random
    direction per input (ferrofast computes in float32)."""
    q, k, v, g, beta, state = _gdn_inputs(1, 6, 1, 2, 8, 4, np.float64, 31, per_key=True)
    mask = np.array([[True, True, False, True, True, True]])
    rng = np.random.default_rng(32)
    d_out = rng.standard_normal((1, 6, 2, 4))
    d_state = rng.standard_normal((1, 2, 4, 8))
    grads = F.gated_delta_update_vjp(
        q, k, v, g, beta, state.astype(np.float64), mask, d_out, d_state
    )
    prims = [q, k, v, g, beta, state.astype(np.float64)]

    def loss(p):
        o, s = ref.gated_delta_update(*p[:5], p[5], mask)
        return (o * d_out).sum() + (s * d_state).sum()

    for i, (p, gr) in enumerate(zip(prims, grads)):
        assert gr.shape == p.shape
        u = rng.standard_normal(p.shape)
        h = 1e-5
        plus = [x if j != i else x + h * u for j, x in enumerate(prims)]
        minus = [x if j != i else x - h * u for j, x in enumerate(prims)]
        fd = (loss(plus) - loss(minus)) / (2 * h)
        np.testing.assert_allclose((np.asarray(gr) * u).sum(), fd, rtol=1e-4, atol=1e-4)


def test_gated_delta_update_errors():
    q, k, v, g, beta, _ = _gdn_inputs(1, 3, 2, 4, 8, 8, np.float32, 33)
    with pytest.raises(ValueError, match=r"beta must have shape \(1,3,4\) \[B, T, Hv\]"):
        F.gated_delta_update(q, k, v, g, beta[..., :2])
    with pytest.raises(ValueError, match=r"multiple of the number of key heads"):
        F.gated_delta_update(q, k, v[:, :, :3], g[..., :3], beta[..., :3])


# ----- merge_attention_states ---------------------------------------------------------------


def _np_merge(oa, la, ob, lb):
    """The merge in float64 NumPy: ``out = (w_a out_a + w_b out_b) / (w_a + w_b)`` with
    ``w = exp(lse - max(lse_a, lse_b))`` (a part whose ``lse`` is ``-inf`` is left out),
    ``lse = logaddexp(lse_a, lse_b)``; rows where both parts are ``-inf`` give 0 and ``-inf``."""
    oa, ob = ref.f64(oa), ref.f64(ob)
    la, lb = ref.f64(la), ref.f64(lb)
    m = np.maximum(la, lb)
    empty = np.isneginf(m)
    safe_m = np.where(empty, 0.0, m)
    wa = np.where(np.isneginf(la), 0.0, np.exp(la - safe_m))
    wb = np.where(np.isneginf(lb), 0.0, np.exp(lb - safe_m))
    total = np.where(empty, 1.0, wa + wb)
    ca, cb = (wa / total)[..., None], (wb / total)[..., None]
    with np.errstate(invalid="ignore"):
        out = np.where(ca == 0, 0.0, ca * oa) + np.where(cb == 0, 0.0, cb * ob)
        return out, np.logaddexp(la, lb)


def _merge_parts(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    lse_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    oa = rand(shape, dtype, seed + 1)
    ob = rand(shape, dtype, seed + 2)
    la = rng.uniform(-4.0, 4.0, shape[:3]).astype(lse_dtype)
    lb = rng.uniform(-4.0, 4.0, shape[:3]).astype(lse_dtype)
    return oa, la, ob, lb


@pytest.mark.parametrize("dtype", FLOATS + [np.dtype(np.float64)], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 17), (1, 2, 4, 64), (1, 1, 1, 1)])
def test_merge_attention_states_matches_numpy(dtype, shape):
    oa, la, ob, lb = _merge_parts(shape, dtype, 80)
    res = F.merge_attention_states(oa, la, ob, lb)
    assert isinstance(res, list) and len(res) == 2
    out, lse = res
    assert out.dtype == dtype and out.shape == shape
    assert lse.dtype == la.dtype and lse.shape == shape[:3]
    rout, rlse = _np_merge(oa, la, ob, lb)
    close(out, rout, dtype)
    close(lse, rlse, la.dtype)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=str)
def test_merge_attention_states_special_values(dtype):
    shape = (1, 2, 3, 8)
    oa, la, ob, lb = _merge_parts(shape, dtype, 81)
    # Row 0: part a saw no key (its output NaN, never read); row 1: neither part did;
    # row 2: part b saw no key; row 3: a NaN log-sum-exp.
    oa[0, 0, 0] = np.nan
    la[0, 0, 0] = -np.inf
    la[0, 0, 1] = lb[0, 0, 1] = -np.inf
    lb[0, 0, 2] = -np.inf
    la[0, 1, 0] = np.nan
    out, lse = F.merge_attention_states(oa, la, ob, lb)
    out, lse = np.asarray(out).astype(np.float64), np.asarray(lse)
    np.testing.assert_array_equal(out[0, 0, 0], ref.f64(ob)[0, 0, 0])
    np.testing.assert_array_equal(out[0, 0, 1], np.zeros(8))
    np.testing.assert_array_equal(out[0, 0, 2], ref.f64(oa)[0, 0, 2])
    assert lse[0, 0, 0] == lb[0, 0, 0] and lse[0, 0, 1] == -np.inf and lse[0, 0, 2] == la[0, 0, 2]
    assert np.isnan(out[0, 1, 0]).all() and np.isnan(lse[0, 1, 0])
    # Every other row as the NumPy merge.
    rout, rlse = _np_merge(oa, la, ob, lb)
    close(out[0, 1, 1:], rout[0, 1, 1:], dtype)
    close(lse[0, 1, 1:], rlse[0, 1, 1:], np.float32)


def _split_keys(mask, split):
    if mask is None or isinstance(mask, str):
        return mask, mask
    return mask[..., :split], mask[..., split:]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("sinks_in", [None, "a", "b"])
def test_merge_attention_states_of_two_key_halves_is_attention(dtype, mask_kind, sinks_in):
    q, k, v = _sdpa_inputs(dtype, nq=4, nkv=2, tq=5, tkv=13, d=16, dv=12, seed=90)
    if mask_kind == "bool":
        rng = np.random.default_rng(91)
        mask = rng.random((2, 1, 5, 13)) < 0.5
        mask[..., 0] = True  # every row sees a key overall (some see none in a half)
        mask[0, 0, 1, 1:] = False  # a row that sees no key in the second half
    elif mask_kind == "additive":
        mask = rand((1, 4, 5, 13), dtype, 92)
    else:
        mask = None
    sinks = rand((4,), dtype, 93) if sinks_in else None
    split = 6
    ma, mb = _split_keys(mask, split)
    out_a, lse_a = F.scaled_dot_product_attention_with_lse(
        q, k[:, :, :split], v[:, :, :split], scale=0.25, mask=ma,
        sinks=sinks if sinks_in == "a" else None,
    )
    out_b, lse_b = F.scaled_dot_product_attention_with_lse(
        q, k[:, :, split:], v[:, :, split:], scale=0.25, mask=mb,
        sinks=sinks if sinks_in == "b" else None,
    )
    out, lse = F.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and out.shape == (2, 4, 5, 12)
    # Against attention over all the keys: the float64 reference and ferrofast's own.
    rout, rlse = ref.sdpa(q, k, v, 0.25, mask, sinks)
    close(out, rout, dtype, factor=3)
    close(lse, rlse, np.float32, factor=3)
    full, full_lse = F.scaled_dot_product_attention_with_lse(q, k, v, scale=0.25, mask=mask, sinks=sinks)
    close(out, ref.f64(full), dtype, factor=3)
    close(lse, ref.f64(full_lse), np.float32, factor=3)


def test_merge_attention_states_strided_views_and_empty():
    # [B, T, H, D] memory seen as [B, H, T, D]; a reversed feature axis; a log-sum-exp
    # broadcast over heads.
    oa = np.swapaxes(rand((2, 5, 3, 16), np.float32, 94), 1, 2)
    ob = rand((2, 3, 5, 32), np.float32, 95)[..., ::-2]
    la = np.broadcast_to(rand((2, 1, 5), np.float32, 96), (2, 3, 5))
    lb = rand((2, 3, 10), np.float32, 97)[..., 1::2]
    assert not oa.flags.c_contiguous and not ob.flags.c_contiguous
    out, lse = F.merge_attention_states(oa, la, ob, lb)
    rout, rlse = _np_merge(oa, la, ob, lb)
    close(out, rout, np.float32)
    close(lse, rlse, np.float32)
    for shape in [(0, 2, 3, 4), (2, 3, 0, 4), (2, 3, 4, 0)]:
        oa, la, ob, lb = _merge_parts(shape, np.float32, 98)
        out, lse = F.merge_attention_states(oa, la, ob, lb, stream="cpu")
        assert out.shape == shape and lse.shape == shape[:3]


def test_merge_attention_states_errors():
    oa, la, ob, lb = _merge_parts((1, 2, 3, 4), np.float32, 99)
    with pytest.raises(ValueError, match=r"\[merge_attention_states\] out_a must be 4-dimensional"):
        F.merge_attention_states(oa[0], la, ob, lb)
    with pytest.raises(ValueError, match=r"out_a and out_b must have the same shape"):
        F.merge_attention_states(oa, la, ob[..., :3], lb)
    with pytest.raises(ValueError, match=r"out_a and out_b must have the same dtype"):
        F.merge_attention_states(oa, la, ob.astype(np.float16), lb)
    with pytest.raises(ValueError, match=r"lse_b must have the outputs' shape"):
        F.merge_attention_states(oa, la, ob, lb[..., :2])
    with pytest.raises(ValueError, match=r"lse_a must have type float32 for float32 outputs"):
        F.merge_attention_states(oa, la.astype(np.float64), ob, lb)
    with pytest.raises(ValueError, match="names the CUDA but the inputs live on the CPU"):
        F.merge_attention_states(oa, la, ob, lb, stream="gpu")
