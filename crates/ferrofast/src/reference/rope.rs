//! Float64 oracle of `rope`.

use crate::ops::rope::{RopeArgs, RopeFreqs, RopeOffset, RopeOptions};
use crate::{Array, Result};

/// Rotary positional embedding in plain f64, following the definition of
/// [`fast::rope`](crate::fast::rope) (same arguments, same validation and errors): every input
/// value is widened to f64 and `theta = scale * (t + offset_b) * base^(-i / (dims/2))` (or
/// `/ freqs[i]`), its cosine, sine and the rotation are computed in f64 with no intermediate
/// rounding. Returns an `F64` array of `a`'s shape.
///
/// # Errors
/// As [`fast::rope`](crate::fast::rope).
pub fn rope(
    a: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offset: RopeOffset<'_>,
    freqs: Option<&Array>,
) -> Result<Array> {
    let options = RopeOptions {
        traditional,
        base,
        scale,
        offset,
        freqs,
    };
    let plan = RopeArgs::new(a, dims, &options)?;
    let shape = a.shape();
    let n = shape.len();
    let (seq, dim) = (shape[n - 2], shape[n - 1]);
    let heads: usize = shape[1..n - 2].iter().product();
    let half = plan.dims / 2;
    let inv_freq: Vec<f64> = match &plan.freqs {
        RopeFreqs::Base(b) => (0..half)
            .map(|i| f64::from(*b).powf(-(i as f64) / half as f64))
            .collect(),
        RopeFreqs::Periods(p) => p.iter().map(|&v| 1.0 / v).collect(),
        RopeFreqs::Device(f) => f.to_f64_vec()?.iter().map(|&v| 1.0 / v).collect(),
    };
    let x = a.to_f64_vec()?;
    let offsets = plan.offsets.to_host()?;
    let mut out = x.clone();
    if dim == 0 || seq == 0 {
        return Array::from_vec(out, shape);
    }
    for (row_index, (xr, orow)) in x.chunks(dim).zip(out.chunks_mut(dim)).enumerate() {
        let t = row_index % seq;
        let b = row_index / (seq * heads.max(1));
        let position = t as f64 + offsets.get(b) as f64;
        for (i, &f) in inv_freq.iter().enumerate() {
            let theta = f64::from(plan.scale) * position * f;
            let (j1, j2) = if plan.traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x1, x2) = (xr[j1], xr[j2]);
            orow[j1] = x1 * theta.cos() - x2 * theta.sin();
            orow[j2] = x1 * theta.sin() + x2 * theta.cos();
        }
    }
    Array::from_vec(out, shape)
}
