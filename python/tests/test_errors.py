"""MLX's validation cases raise ValueError with MLX's exact messages."""

import re

import numpy as np
import pytest

import ferrofast as ff
from conftest import rand

F = ff.fast
x3 = rand((2, 4, 8), np.float32, 1)


def raises(msg):
    return pytest.raises(ValueError, match="^" + re.escape(msg) + "$")


def test_rms_norm_errors():
    with raises("[rms_norm] Input must have at least 1 dimension but got input with 0 dimensions."):
        F.rms_norm(np.float32(1.0), None, 1e-5)
    with raises("[rms_norm] (*weight) must have 1 dimension but has 2 dimensions."):
        F.rms_norm(x3, np.ones((1, 8), np.float32), 1e-5)
    with raises("[rms_norm] (*weight) must have the same size as the last dimension of x but has 7 elements."):
        F.rms_norm(x3, np.ones(7, np.float32), 1e-5)
    with raises("[rms_norm] Received unsupported type int32."):
        F.rms_norm(np.ones((2, 3), np.int32), None, 1e-5)


def test_layer_norm_errors():
    with raises("[layer_norm] Input must have at least 1 dimension but got input with 0 dimensions."):
        F.layer_norm(np.float32(1.0), None, None, 1e-5)
    with raises("[layer_norm] weight must have 1 dimension but has 2 dimensions."):
        F.layer_norm(x3, np.ones((2, 8), np.float32), None, 1e-5)
    with raises("[layer_norm] weight must have the same size as the last dimension of x but has 129 elements."):
        F.layer_norm(np.ones((4, 128), np.int32), np.ones(129, np.float32), None, 1e-5)
    with raises("[layer_norm] bias must have 1 dimension but has 0 dimensions."):
        F.layer_norm(x3, None, np.float32(1.0), 1e-5)
    with raises("[layer_norm] bias must have the same size as the last dimension of x but has 129 elements."):
        F.layer_norm(np.ones((4, 128), np.int32), None, np.ones(129, np.float32), 1e-5)
    with raises("[layer_norm] Received unsupported type int32."):
        F.layer_norm(np.ones((4, 8), np.int32), None, np.ones(8, np.float32), 1e-5)


def rope(a, dims=8, **kw):
    args = dict(traditional=False, base=10000.0, scale=1.0, offset=0)
    args.update(kw)
    return F.rope(a, dims, **args)


def test_rope_errors():
    with raises("[rope] Input must have at least 3 dimensions but got input with 2 dimensions."):
        rope(np.ones((4, 8), np.float32))
    with raises("[rope] Input must be a floating type but got int32."):
        rope(np.ones((2, 4, 8), np.int32))
    with raises("[rope] offset must have at most one dimension but has shape (1,1)."):
        rope(x3, offset=np.ones((1, 1), np.int32))
    with raises("[rope] offset must be a scalar or vector with 2 elements but has shape (3)."):
        rope(x3, offset=np.ones(3, np.int32))
    with raises("[rope] offset must be an integer but got type float32."):
        rope(x3, offset=2.0)
    for dims in (0, -2):
        with raises(f"[rope] dims must be positive but got {dims}."):
            rope(x3, dims=dims)
    with raises("[rope] dims must be even but got 7."):
        rope(x3, dims=7)
    with raises("[rope] dims must not exceed the input's last dimension (8) but got 10."):
        rope(x3, dims=10)
    with raises("[rope] freqs must be one dimensional with size 4 but got shape (3)."):
        rope(x3, base=None, freqs=np.ones(3, np.float32))
    with raises("[rope] Only one of base or freqs can have a value."):
        rope(x3, freqs=np.ones(4, np.float32))
    with raises("[rope] Neither base nor freqs has a value."):
        rope(x3, base=None)


def test_rope_requires_keywords():
    with pytest.raises(TypeError):
        F.rope(x3, 8, False, 10000.0, 1.0, 0)
    with pytest.raises(TypeError):
        F.rope(x3, 8, traditional=False, base=10000.0, scale=1.0)


def test_sdpa_errors():
    P = "[scaled_dot_product_attention] "
    q = rand((1, 4, 3, 8), np.float32, 2)
    k = rand((1, 2, 5, 8), np.float32, 3)
    sdpa = F.scaled_dot_product_attention
    with raises(P + "invalid mask option 'upper'. Must be 'causal', or an array."):
        sdpa(q, k, k, scale=1.0, mask="upper")
    with raises(P + "input with shape (4,3,8) expected to be rank 4"):
        sdpa(q[0], k, k, scale=1.0)
    with raises(P + "the mask with shape (1,1,1,1,5) expected to have at most rank 4."):
        sdpa(q, k, k, scale=1.0, mask=np.ones((1, 1, 1, 1, 5), bool))
    with raises(P + "mismatching batch dimension for input with shape (2,2,5,8)."):
        sdpa(q, np.concatenate([k, k]), np.concatenate([k, k]), scale=1.0)
    with raises(P + "n_heads must be a multiple of n_kv_heads, found n_heads 4 for n_kv_heads 3."
                " (inputs are [B, H, T, D] with the heads on axis 1: N_q = 4 from q (1,4,3,8),"
                " N_kv = 3 from keys (1,3,5,8) and 3 from values (1,3,5,8))"):
        kk = rand((1, 3, 5, 8), np.float32, 4)
        sdpa(q, kk, kk, scale=1.0)
    with raises(P + "Mask type must promote to output type float16."
                " (the mask is float32: cast it with astype(float16) first; a bool mask selects keys instead)"):
        q16, k16 = q.astype(np.float16), k.astype(np.float16)
        sdpa(q16, k16, k16, scale=1.0, mask=np.zeros((3, 5), np.float32))
    with raises(P + "Received invalid shape for sinks (5)."):
        sdpa(q, k, k, scale=1.0, sinks=np.ones(5, np.float32))
    with raises(P + "Type of sinks must promote to output type float16."):
        sdpa(q16, k16, k16, scale=1.0, sinks=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"\[broadcast_shapes\] Shapes .* cannot be broadcast"):
        sdpa(q, k, k, scale=1.0, mask=np.ones((2, 5), bool))
    # The hints after MLX's text: the mask's and the scores' shapes; the [B, T, H, D] layout.
    with pytest.raises(ValueError, match=re.escape("the mask of shape (2,5) does not broadcast to the attention scores' shape [B, N_q, T_q, T_kv] = (1,4,3,5)")):
        sdpa(q, k, k, scale=1.0, mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match=re.escape("view q, k and v with swapaxes(1, 2)")):
        bthd = rand((1, 10, 2, 8), np.float32, 5)
        sdpa(rand((1, 1, 4, 8), np.float32, 6), bthd, bthd, scale=1.0)
    with pytest.raises(TypeError):
        sdpa(q, k, k)  # scale is required


def test_cross_entropy_errors():
    with raises("[cross_entropy] logits must have at least 1 dimension but got input with 0 dimensions."):
        F.cross_entropy(np.float32(1.0), np.int32(0))
    with raises("[cross_entropy] targets shape (5) does not match logits shape (4,16) with the last axis removed."):
        F.cross_entropy(np.ones((4, 16), np.float32), np.zeros(5, np.int32))
    with raises("[cross_entropy] Received unsupported logits type int32."):
        F.cross_entropy(np.ones((4, 16), np.int32), np.zeros(4, np.int32))
    with raises("[cross_entropy] targets must be integer class indices but got float32."):
        F.cross_entropy(np.ones((4, 16), np.float32), np.zeros(4, np.float32))
    with raises("[cross_entropy] targets must be integer class indices but got bool."):
        F.cross_entropy(np.ones((4, 16), np.float32), np.zeros(4, bool))


def test_unsupported_dtype_is_value_error():
    with pytest.raises(ValueError, match="complex"):
        F.rms_norm(np.ones((2, 3), np.complex64), None, 1e-5)
