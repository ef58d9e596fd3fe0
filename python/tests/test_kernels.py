"""The custom kernels' Python API without a GPU: factories (which need none), MLX's
argument errors and messages, the generated source of ``verbose=True``, and
``compile_to_cubin`` (NVRTC only). Calls that would launch are checked to fail cleanly
where there is no GPU; test_cuda.py runs them on one."""

import numpy as np
import pytest

import ferrofast as ff
from ferrofast import _native

HAS_GPU = _native.cuda_device_count() > 0

EXP = """
    uint elem = blockIdx.x * blockDim.x + threadIdx.x;
    if (elem < inp_shape[0] * inp_shape[1]) {
        out[elem] = static_cast<T>(exp(static_cast<float>(inp[elem])));
    }
"""

METAL_EXP = """
    uint elem = thread_position_in_grid.x;
    T tmp = inp[elem];
    out[elem] = metal::exp(tmp);
"""


def x():
    return np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)


def test_factories_need_no_gpu():
    k = ff.fast.cuda_kernel("myexp", ["inp"], ["out"], EXP)
    assert k.name == "myexp"
    m = ff.fast.metal_kernel("myexp", input_names=["inp"], output_names=["out"], source=METAL_EXP)
    assert m.name == "myexp"
    assert "metal_kernel" in repr(m)


def test_factory_errors_are_mlx_s():
    with pytest.raises(ValueError, match=r"\[custom_kernel\] Must specify at least one output\."):
        ff.fast.cuda_kernel("k", ["a"], [], "")
    with pytest.raises(ValueError, match=r"\[metal_kernel\] Must specify at least one output\."):
        ff.fast.metal_kernel("k", ["a"], [], "")
    with pytest.raises(ValueError, match=r"Expected `compile_options` to be a dict\."):
        ff.fast.metal_kernel("k", ["a"], ["b"], "", compile_options="fast")
    with pytest.raises(ValueError, match=r"Unknown compile option `fast_math`\."):
        ff.fast.metal_kernel("k", ["a"], ["b"], "", compile_options={"fast_math": True})
    with pytest.raises(ValueError, match=r"Expected math_mode to be 'safe', 'relaxed', or 'fast'\."):
        ff.fast.metal_kernel("k", ["a"], ["b"], "", compile_options={"math_mode": "quick"})
    for mode in ("safe", "relaxed", "fast"):
        ff.fast.metal_kernel("k", ["a"], ["b"], "", compile_options={"math_mode": mode})


def call(kernel, **kw):
    args = dict(
        inputs=[x()],
        output_shapes=[(4, 16)],
        output_dtypes=[np.float32],
        grid=(64, 1, 1),
        threadgroup=(32, 1, 1),
        template=[("T", np.float32)],
    )
    args.update(kw)
    return kernel(**args)


def test_call_errors_are_mlx_s():
    k = ff.fast.cuda_kernel("myexp", ["inp"], ["out"], EXP)
    with pytest.raises(ValueError, match=r"Expected `inputs` to have size 1 but got size 2\."):
        call(k, inputs=[x(), x()])
    with pytest.raises(ValueError, match=r"Expected `output_dtypes` to have size 1 but got size 2\."):
        call(k, output_dtypes=["float32", "float32"])
    with pytest.raises(
        ValueError,
        match=r"Invalid template argument\. Must be `mlx\.core\.Dtype`, `int` or `bool`\.",
    ):
        call(k, template=[("T", 1.5)])
    with pytest.raises(ValueError, match=r"Only supports the GPU\."):
        call(k, stream="cpu")
    with pytest.raises(ValueError, match=r"stream must be None"):
        call(k, stream=3.0)
    with pytest.raises(ValueError, match=r"Invalid scalar argument type\. Received str"):
        ff.fast.precompiled_cuda_kernel(
            name="k", compiled_source=b"x", inputs=[x()], output_shapes=[(1,)],
            output_dtypes=["float32"], scalars=[1, "two"], grid=(1, 1, 1), threadgroup=(1, 1, 1),
        )


def test_verbose_prints_mlx_s_generated_source(capsys):
    k = ff.fast.cuda_kernel("myexp", ["inp"], ["out"], EXP)
    if HAS_GPU:
        call(k, verbose=True)
    else:
        with pytest.raises(RuntimeError):
            call(k, verbose=True)
    out = capsys.readouterr().out
    assert "Generated source code for `custom_kernel_myexp_float`:" in out
    assert "using T = float;" in out
    assert "const __grid_constant__ Shape inp_shape" in out
    assert out.count("```") == 2
    m = ff.fast.metal_kernel("myexp", ["inp"], ["out"], METAL_EXP)
    if HAS_GPU:
        call(m, verbose=True, template=[("T", "float32")])
    else:
        with pytest.raises(RuntimeError):
            call(m, verbose=True, template=[("T", "float32")])
    out = capsys.readouterr().out
    assert "Generated source code for `myexp`:" in out
    assert "[[kernel]] void custom_kernel_myexp__float_float_float(" in out
    assert "uint3 thread_position_in_grid [[thread_position_in_grid]]" in out


@pytest.mark.skipif(HAS_GPU, reason="checks the error without a GPU")
def test_calls_without_a_gpu_are_runtime_errors():
    k = ff.fast.cuda_kernel("myexp", ["inp"], ["out"], EXP)
    with pytest.raises(RuntimeError):
        call(k)


def test_compile_to_cubin_needs_no_gpu():
    src = 'extern "C" __global__ void scale(const float* x, float* y, float s, int n) {\n' \
          "  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = s * x[i]; }\n"
    try:
        image, symbol = ff.fast.compile_to_cubin(src, "scale", "sm_90")
    except RuntimeError as e:
        if "nvrtc" in str(e).lower():
            pytest.skip(f"no libnvrtc: {e}")
        raise
    assert symbol == "scale"
    assert image[:4] == b"\x7fELF"
    with pytest.raises(RuntimeError, match="compile"):
        ff.fast.compile_to_cubin("this is not CUDA", "scale", "sm_90")
