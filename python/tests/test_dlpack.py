"""DLPack exchange: zero-copy in and out, capsule ownership, dtypes."""

import gc
import sys

import numpy as np
import pytest

import ferrofast as ff
from ferrofast import _native
from conftest import BF16, rand


def ptr(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int32, np.int64, np.uint32, np.uint8])
def test_input_is_shared(dtype):
    x = rand((3, 5), np.float32, 1).astype(dtype)
    t = _native.from_dlpack(x.__dlpack__(max_version=(1, 0)))
    assert t.data_ptr == ptr(x)
    assert t.shape == [3, 5] and t.dtype == np.dtype(dtype).name


def test_strided_input_is_shared():
    base = rand((6, 8), np.float32, 2)
    for view in (base[::2, 1::3], base[::-1], base.T):
        t = _native.from_dlpack(view.__dlpack__())
        assert t.data_ptr == ptr(view)
        assert t.strides == [s // 4 for s in view.strides]


def test_legacy_capsule():
    x = rand((4,), np.float32, 3)
    t = _native.from_dlpack(x.__dlpack__())  # no max_version: a legacy 'dltensor' capsule
    assert t.data_ptr == ptr(x)


def test_bfloat16_input_is_shared():
    x = rand((2, 8), BF16, 4)
    t = _native.from_dlpack(x.view(np.uint16).__dlpack__(), True)
    assert t.dtype == "bfloat16" and t.data_ptr == ptr(x)


def test_bool_is_converted():
    m = np.array([[True, False], [False, True]])
    t = _native.from_dlpack(m.__dlpack__())
    assert t.dtype == "bool" and t.data_ptr != ptr(m)


def test_output_is_handed_over_without_copy():
    x = rand((4, 16), np.float32, 5)
    for versioned in (True, False):
        t = _native.rms_norm(_native.from_dlpack(x.__dlpack__()), None, 1e-5)
        p = t.data_ptr
        y = np.from_dlpack(t if versioned else _Legacy(t))
        assert ptr(y) == p
        if versioned:
            # A versioned capsule flags the memory writable (NumPy treats legacy ones as
            # read-only): the consumer owns the buffer now.
            assert y.flags.writeable
            y[0, 0] = 42.0
            assert y[0, 0] == 42.0


class _Legacy:
    """A consumer's view that asks for a legacy capsule."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, **kw):
        return self.t.__dlpack__()

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


def test_bfloat16_output_is_handed_over_without_copy():
    from ferrofast._convert import _Bits

    x = rand((3, 8), BF16, 6)
    t = _native.rms_norm(_native.from_dlpack(x.view(np.uint16).__dlpack__(), True), None, 1e-5)
    p = t.data_ptr
    y = np.from_dlpack(_Bits(t)).view(BF16)
    assert ptr(y) == p and y.dtype == BF16


def test_export_once_and_device():
    t = _native.rms_norm(_native.from_dlpack(rand((2, 4), np.float32, 7).__dlpack__()), None, 1e-5)
    assert t.__dlpack_device__() == (1, 0)
    np.from_dlpack(t)
    with pytest.raises(BufferError, match="already exported"):
        np.from_dlpack(t)


def test_input_tensor_exports_a_copy():
    x = rand((2, 4), np.float32, 8)
    t = _native.from_dlpack(x.__dlpack__())
    with pytest.raises(BufferError, match="copy=False"):
        t.__dlpack__(copy=False)
    t = _native.from_dlpack(x.__dlpack__())
    y = np.from_dlpack(t)
    assert ptr(y) != ptr(x)
    np.testing.assert_array_equal(y, x)


def test_unconsumed_capsules_are_freed():
    x = rand((2, 4), np.float32, 9)
    before = sys.getrefcount(x)
    for _ in range(100):
        x.__dlpack__(max_version=(1, 0))  # dropped unconsumed: the producer frees it
        t = _native.rms_norm(_native.from_dlpack(x.__dlpack__()), None, 1e-5)
        t.__dlpack__(max_version=(1, 0))  # our capsule, dropped unconsumed
        del t
    gc.collect()
    assert sys.getrefcount(x) == before


def test_inputs_are_released_after_the_call():
    x = rand((64, 64), np.float32, 10)
    before = sys.getrefcount(x)
    for _ in range(50):
        ff.fast.rms_norm(x, x[0], 1e-5)
        ff.fast.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None], scale=0.1)
    gc.collect()
    assert sys.getrefcount(x) == before


def test_consumed_capsule_is_rejected():
    cap = rand((3,), np.float32, 11).__dlpack__()
    _native.from_dlpack(cap)
    with pytest.raises(ValueError, match="unconsumed DLPack capsule"):
        _native.from_dlpack(cap)


def test_empty_and_zero_dim():
    x = np.zeros((0, 8), np.float32)
    assert ff.fast.rms_norm(x, None, 1e-5).shape == (0, 8)
    loss = ff.fast.cross_entropy(rand((5,), np.float32, 12), np.array(2))
    assert loss.shape == () and np.isfinite(loss)
