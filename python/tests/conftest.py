import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float32), np.dtype(np.float16), BF16]

# (rtol, atol) of a result against the float64 reference of the same (rounded) inputs.
TOL = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float16): (4e-3, 4e-3),
    BF16: (3e-2, 3e-2),
}


def rand(shape, dtype, seed, scale=1.0):
    """Seeded standard-normal data (never zeros) in ``dtype``."""
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(dtype)


def close(out, ref, dtype, factor=1.0):
    rtol, atol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(
        np.asarray(out).astype(np.float64), ref, rtol=rtol * factor, atol=atol * factor
    )
