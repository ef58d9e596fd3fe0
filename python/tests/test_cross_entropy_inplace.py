"""``ferrofast.fast.cross_entropy_fused_in_place`` on NumPy arrays: the gradient written over
the caller's logits (same address) is ``cross_entropy_fused``'s, bit for bit, for every dtype
and option; what cannot be written is refused with a ``ValueError`` and left unchanged."""

import numpy as np
import pytest
from conftest import BF16, FLOATS, rand

import ferrofast as ff

F = ff.fast

OPTIONS = [
    {},
    {"ignore_index": -100},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"ignore_index": 3, "label_smoothing": 0.2, "z_loss": 1e-4},
]


def addr(a):
    return a.__array_interface__["data"][0]


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == BF16 else a.view(np.dtype(f"u{a.dtype.itemsize}"))


def targets_for(shape, v, seed, ignore=None):
    t = np.random.default_rng(seed).integers(0, v, size=shape).astype(np.int64)
    if ignore is not None and t.size:
        t.flat[:: 3] = ignore
    return t


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_matches_fused_bit_for_bit(dtype, reduction, opts):
    logits = rand((6, 37), dtype, 1, scale=4.0)
    targets = targets_for((6,), 37, 2, opts.get("ignore_index"))
    want_loss, want_dx = F.cross_entropy_fused(logits, targets, reduction=reduction, **opts)
    before = addr(logits)
    loss, dx = F.cross_entropy_fused_in_place(logits, targets, reduction=reduction, **opts)
    assert dx is logits
    assert addr(logits) == before
    assert logits.dtype == dtype and logits.shape == (6, 37)
    np.testing.assert_array_equal(bits(logits), bits(want_dx))
    assert loss.dtype == np.float32 and loss.shape == want_loss.shape
    np.testing.assert_array_equal(loss, want_loss)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(50,), (3, 4, 130), (2, 5000)])
def test_shapes_and_parallel_rows(dtype, shape):
    logits = rand(shape, dtype, 3, scale=6.0)
    targets = targets_for(shape[:-1], shape[-1], 4)
    want_loss, want_dx = F.cross_entropy_fused(logits, targets, reduction="mean")
    loss, _ = F.cross_entropy_fused_in_place(logits, targets, reduction="mean")
    np.testing.assert_array_equal(bits(logits), bits(want_dx))
    np.testing.assert_array_equal(loss, want_loss)


def test_big_rows_parallel_path():
    # Over the CPU kernel's threading threshold (2^15 logits).
    logits = rand((64, 2048), np.float32, 5, scale=3.0)
    targets = targets_for((64,), 2048, 6)
    want_loss, want_dx = F.cross_entropy_fused(logits, targets, reduction="sum")
    loss, _ = F.cross_entropy_fused_in_place(logits, targets, reduction="sum")
    np.testing.assert_array_equal(logits, want_dx)
    np.testing.assert_array_equal(loss, want_loss)


def test_contiguous_view_into_a_bigger_array():
    base = rand((8, 40), np.float32, 7)
    keep = base.copy()
    view = base[2:5]  # row-major contiguous, at an offset
    assert view.flags.c_contiguous
    targets = targets_for((3,), 40, 8)
    _, want = F.cross_entropy_fused(view.copy(), targets)
    F.cross_entropy_fused_in_place(view, targets)
    np.testing.assert_array_equal(base[2:5], want)
    np.testing.assert_array_equal(base[:2], keep[:2])
    np.testing.assert_array_equal(base[5:], keep[5:])


def test_empty_logits():
    logits = np.zeros((0, 8), np.float32)
    loss, dx = F.cross_entropy_fused_in_place(logits, np.zeros((0,), np.int32))
    assert dx is logits and loss.shape == (0,)


def test_out_of_range_target_and_nan_rows_as_fused():
    logits = rand((3, 9), np.float32, 9)
    logits[1, 4] = np.nan
    targets = np.array([1, 2, 40])
    _, want = F.cross_entropy_fused(logits, targets)
    F.cross_entropy_fused_in_place(logits, targets)
    np.testing.assert_array_equal(bits(logits), bits(want))


# ----- refused inputs: ValueError, nothing written ------------------------------------------


def refused(logits, targets, match, **kw):
    keep = np.array(logits, copy=True)
    with pytest.raises(ValueError, match=match):
        F.cross_entropy_fused_in_place(logits, targets, **kw)
    np.testing.assert_array_equal(bits(logits), bits(keep))


def test_read_only_refused():
    logits = rand((4, 16), np.float32, 10)
    logits.flags.writeable = False
    refused(logits, np.zeros(4, np.int32), "read-only")


def test_non_contiguous_refused():
    base = rand((16, 4), np.float32, 11)
    refused(base.T, np.zeros(4, np.int32), "row-major contiguous")
    wide = rand((4, 32), np.float32, 12)
    refused(wide[:, ::2], np.zeros(4, np.int32), "row-major contiguous")


def test_broadcast_refused():
    row = rand((16,), np.float32, 13)
    b = np.broadcast_to(row, (4, 16))  # read-only in NumPy
    with pytest.raises(ValueError):
        F.cross_entropy_fused_in_place(b, np.zeros(4, np.int32))


def test_float64_refused():
    refused(
        rand((4, 16), np.float64, 14),
        np.zeros(4, np.int32),
        r"\[cross_entropy\] The in-place pass writes float32, float16 or bfloat16 logits, not float64",
    )


def test_misaligned_refused():
    raw = np.zeros(4 * 16 * 4 + 1, np.uint8)
    logits = raw[1:].view(np.float32).reshape(4, 16)
    assert addr(logits) % 4 != 0
    refused(logits, np.zeros(4, np.int32), "copy")


def test_other_types_refused():
    with pytest.raises(ValueError, match="NumPy array, a PyTorch tensor or a CuPy array"):
        F.cross_entropy_fused_in_place([[1.0, 2.0]], np.zeros(1, np.int32))


# ----- MLX's messages for wrong shapes and dtypes, nothing written --------------------------


def test_mlx_errors():
    x = rand((4, 16), np.float32, 15)
    refused(
        x,
        np.zeros(5, np.int32),
        r"\[cross_entropy\] targets shape \(5\) does not match logits shape \(4,16\) with the "
        r"last axis removed\.",
    )
    refused(
        x,
        np.zeros(4, np.float32),
        r"\[cross_entropy\] targets must be integer class indices but got float32\.",
    )
    refused(
        np.ones((4, 16), np.int32),
        np.zeros(4, np.int32),
        r"\[cross_entropy\] Received unsupported logits type int32\.",
    )
    refused(x, np.zeros(4, np.int32), "reduction must be", reduction="avg")
    refused(x, np.zeros(4, np.int32), "label_smoothing", label_smoothing=1.5)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        F.cross_entropy_fused_in_place(np.array(1.0, np.float32), np.array(0))
