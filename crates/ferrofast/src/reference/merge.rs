//! Float64 oracle of `merge_attention_states`.

use crate::error::Result;
use crate::ops::merge::{row_factors_f64, MergeArgs};
use crate::Array;

/// [`fast::merge_attention_states`](crate::fast::merge_attention_states) in plain f64:
/// per row, `c_a = w_a / (w_a + w_b)` and `c_b = w_b / (w_a + w_b)` with
/// `w = exp(lse - max(lse_a, lse_b))`, `out = c_a out_a + c_b out_b` where a part whose
/// factor is exactly 0 is not multiplied at all, and `lse = logaddexp(lse_a, lse_b)`; both
/// parts `-inf` give 0 and `-inf`; a NaN log-sum-exp gives NaN; a `+inf` one (and no NaN)
/// gives a NaN output and `+inf`. The inputs are
/// read as the op reads them (the outputs in their dtype, widened exactly). Returns `F64`
/// arrays of shapes `[B, H, T, D_v]` and `[B, H, T]`.
///
/// # Errors
/// As the fast function.
pub fn merge_attention_states(
    out_a: &Array,
    lse_a: &Array,
    out_b: &Array,
    lse_b: &Array,
) -> Result<(Array, Array)> {
    let args = MergeArgs::new(out_a, lse_a, out_b, lse_b)?;
    let (oa, ob) = (args.out_a.to_f64_vec()?, args.out_b.to_f64_vec()?);
    let (la, lb) = (args.lse_a.to_f64_vec()?, args.lse_b.to_f64_vec()?);
    let dv = args.shape[3];
    let mut out = vec![0.0f64; oa.len()];
    let mut lse = vec![0.0f64; la.len()];
    for (r, l) in lse.iter_mut().enumerate() {
        let (ca, cb, m) = row_factors_f64(la[r], lb[r]);
        *l = m;
        for j in r * dv..(r + 1) * dv {
            let pa = if ca == 0.0 { 0.0 } else { ca * oa[j] };
            let pb = if cb == 0.0 { 0.0 } else { cb * ob[j] };
            out[j] = pa + pb;
        }
    }
    Ok((
        Array::from_vec(out, &args.shape)?,
        Array::from_vec(lse, &args.shape[..3])?,
    ))
}
