//! A custom CUDA kernel from source (MLX's `mx.fast.cuda_kernel`): a strided element-wise
//! `exp` with a dtype template, compiled by NVRTC at the first call.
//!
//! Run with `cargo run --example cuda_kernel`. Needs a CUDA GPU, libnvrtc and the CUDA
//! headers (a CUDA toolkit, or `pip install 'nvidia-cuda-runtime==13.0.*'
//! 'nvidia-cuda-cccl==13.0.*'`); without them it says what is missing.

use ferrofast::fast::{CudaKernel, KernelCall};
use ferrofast::{Array, DType, Device};

const SOURCE: &str = r#"
  uint elem = blockIdx.x * blockDim.x + threadIdx.x;
  if (elem < inp_size) {
    int64_t loc = elem_to_loc(elem, inp_shape.data(), inp_strides.data(), inp_ndim);
    out[elem] = static_cast<T>(exp(static_cast<float>(inp[loc])));
  }
"#;

fn main() -> Result<(), ferrofast::Error> {
    let gpu = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("This example needs a CUDA GPU: {e}");
            return Ok(());
        }
    };
    // Built once, called many times: each distinct generated source compiles once.
    let kernel = CudaKernel::new("myexp_strided", &["inp"], &["out"], SOURCE, "", false, 0)?;

    // A transposed (non-contiguous) bf16 view: with ensure_row_contiguous = false the kernel
    // reads it in place through its shape and strides.
    let x = Array::randn(&[64, 48], DType::BF16, 7, &gpu)?.transpose(&[1, 0])?;
    let n = x.size();
    let call = KernelCall::new([n, 1, 1], [256, 1, 1])
        .input(&x)
        .output(x.shape(), DType::BF16)
        .template_arg("T", DType::BF16)
        .template_arg("inp_size", n as i32);
    // SAFETY: the body bounds-checks with inp_size, reads `inp` only at offsets its shape and
    // strides give, and writes `out` only below its size.
    let outputs = unsafe { kernel.call(&call) };
    let out = match outputs {
        Ok(mut o) => o.remove(0),
        Err(e) => {
            println!("The kernel could not run: {e}");
            return Ok(());
        }
    };

    let got = out.astype(DType::F32)?.to_vec::<f32>()?;
    let want: Vec<f32> = x.to_f64_vec()?.iter().map(|v| v.exp() as f32).collect();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| ((g - w) / w).abs())
        .fold(0.0f32, f32::max);
    println!(
        "exp of a {:?} bf16 view on {gpu}: worst relative error {worst:.2e} (bf16 rounding is 3.9e-3)",
        x.shape()
    );
    Ok(())
}
