//! [`MergeArgs`]: a validated `merge_attention_states` call.
//!
//! The op combines two attention results over disjoint sets of keys, each given as its
//! output `[B, H, T, D_v]` and its log-sum-exp `[B, H, T]`, into the result over the union
//! of the keys. Per row, with `m = max(lse_a, lse_b)`, `w_a = exp(lse_a - m)` and
//! `w_b = exp(lse_b - m)`:
//!
//! - `lse = m + ln(w_a + w_b)` (`logaddexp(lse_a, lse_b)`), and
//! - `out = (w_a out_a + w_b out_b) / (w_a + w_b)`,
//!
//! in float32 (float64 for float64 outputs), the output rounded once to the parts' dtype.
//! Special values follow attention's rules (`docs/architecture.md`, "Special values"): a
//! part whose weight is exactly 0 (`lse = -inf`, a row that saw no key, or an `lse` more
//! than 87.3 below the other's, [`MIN_LOG_WEIGHT`]) contributes nothing, its output row
//! never multiplied; both parts `-inf` give output 0 and `lse = -inf`; a NaN in either `lse` makes the row's output and `lse`
//! NaN; a `+inf` one (and no NaN) makes the output NaN (`inf / inf`) and `lse = +inf`; a NaN
//! or infinity in the output row of a part with non-zero weight reaches that column as the
//! arithmetic gives.

use crate::array::fmt_shape;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::{Array, Device};

/// The op's name as its messages print it.
pub(crate) const OP: &str = "[merge_attention_states]";

/// A validated `merge_attention_states` call: two parts of one attention row set.
#[derive(Clone, Debug)]
pub(crate) struct MergeArgs {
    /// The first part's output, `[B, H, T, D_v]`, floating, any strides.
    pub(crate) out_a: Array,
    /// The first part's log-sum-exp, `[B, H, T]`, float32 (float64 for float64 outputs),
    /// any strides.
    pub(crate) lse_a: Array,
    /// The second part's output: `out_a`'s shape and dtype, any strides.
    pub(crate) out_b: Array,
    /// The second part's log-sum-exp: `lse_a`'s shape and dtype, any strides.
    pub(crate) lse_b: Array,
    /// The outputs' dtype, which the merged output gets.
    pub(crate) dtype: DType,
    /// `[B, H, T, D_v]`.
    pub(crate) shape: [usize; 4],
    /// Where every input lives.
    pub(crate) device: Device,
}

impl MergeArgs {
    /// Validates a `merge_attention_states` call.
    ///
    /// # Errors
    /// `Error::InvalidArgument` (prefix `[merge_attention_states] `), checked in this order:
    /// an output that is not 4-D; outputs of different shapes; outputs of different dtypes;
    /// a non-floating output dtype; a log-sum-exp whose shape is not the outputs' first
    /// three axes; a log-sum-exp that is not float32 (float64 for float64 outputs).
    /// `Error::Device` for inputs on different devices.
    pub(crate) fn new(
        out_a: &Array,
        lse_a: &Array,
        out_b: &Array,
        lse_b: &Array,
    ) -> Result<MergeArgs> {
        for (name, o) in [("out_a", out_a), ("out_b", out_b)] {
            if o.ndim() != 4 {
                return Err(Error::invalid(format!(
                    "{OP} {name} must be 4-dimensional [B, H, T, D_v] but has shape {} ({} \
                     dimensions).",
                    fmt_shape(o.shape()),
                    o.ndim()
                )));
            }
        }
        if out_a.shape() != out_b.shape() {
            return Err(Error::invalid(format!(
                "{OP} out_a and out_b must have the same shape but have shapes {} and {}.",
                fmt_shape(out_a.shape()),
                fmt_shape(out_b.shape())
            )));
        }
        if out_a.dtype() != out_b.dtype() {
            return Err(Error::invalid(format!(
                "{OP} out_a and out_b must have the same dtype but have types {} and {}.",
                out_a.dtype(),
                out_b.dtype()
            )));
        }
        let dtype = out_a.dtype();
        if !dtype.is_floating() {
            return Err(Error::invalid(format!(
                "{OP} Received unsupported type {dtype}."
            )));
        }
        let s = out_a.shape();
        let shape = [s[0], s[1], s[2], s[3]];
        let lse_dtype = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        for (name, l) in [("lse_a", lse_a), ("lse_b", lse_b)] {
            if l.shape() != &s[..3] {
                return Err(Error::invalid(format!(
                    "{OP} {name} must have the outputs' shape without its last axis, [B, H, \
                     T] = {}, but has shape {}.",
                    fmt_shape(&s[..3]),
                    fmt_shape(l.shape())
                )));
            }
            if l.dtype() != lse_dtype {
                return Err(Error::invalid(format!(
                    "{OP} {name} must have type {lse_dtype} for {dtype} outputs (as \
                     scaled_dot_product_attention_with_lse returns it) but has type {}.",
                    l.dtype()
                )));
            }
        }
        let device = super::same_device(
            OP,
            &[
                ("out_a", out_a),
                ("lse_a", lse_a),
                ("out_b", out_b),
                ("lse_b", lse_b),
            ],
        )?;
        Ok(MergeArgs {
            out_a: out_a.clone(),
            lse_a: lse_a.clone(),
            out_b: out_b.clone(),
            lse_b: lse_b.clone(),
            dtype,
            shape,
            device,
        })
    }
}

/// A part whose log-sum-exp is further than this below the other's gets weight exactly 0
/// (`e^-87.3` is about f32's smallest normal number): it contributes nothing, as an
/// attention weight that underflows. The same bound in every back end and the oracle.
pub(crate) const MIN_LOG_WEIGHT: f32 = -87.3;

/// Defines a per-row merge-factor function on the float type `$t` (see
/// [`row_factors_f64`]), with the same sequence of operations for every type.
macro_rules! row_factors {
    ($(#[$doc:meta])* $name:ident, $t:ident) => {
        $(#[$doc])*
        pub(crate) fn $name(la: $t, lb: $t) -> ($t, $t, $t) {
            let m = if la.is_nan() || lb.is_nan() {
                $t::NAN
            } else {
                la.max(lb)
            };
            if m == $t::NEG_INFINITY {
                return (0.0, 0.0, $t::NEG_INFINITY);
            }
            if m == $t::INFINITY {
                return ($t::NAN, $t::NAN, $t::INFINITY);
            }
            let w = |l: $t| {
                if l - m < $t::from(MIN_LOG_WEIGHT) {
                    0.0
                } else {
                    (l - m).exp()
                }
            };
            let (wa, wb) = (w(la), w(lb));
            let s = wa + wb;
            let lse = m + if la >= lb { wb.ln_1p() } else { wa.ln_1p() };
            (wa / s, wb / s, lse)
        }
    };
}

row_factors!(
    /// The per-row factors of a merge in f64 (the oracle's and the f64 kernel's arithmetic):
    /// `(c_a, c_b, lse)` with `out = c_a out_a + c_b out_b`, where a factor of exactly 0 means
    /// the part is not multiplied at all. Both parts `-inf` give `(0, 0, -inf)`; a NaN gives
    /// NaN everywhere; otherwise a `+inf` gives `(NaN, NaN, +inf)`.
    row_factors_f64,
    f64
);
row_factors!(
    /// [`row_factors_f64`] in f32, the arithmetic of the f32 / f16 / bf16 kernels (the CUDA
    /// kernel's `ff_merge_factors` is the same sequence of operations).
    row_factors_f32,
    f32
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_follow_the_special_value_rules() {
        let inf = f32::INFINITY;
        assert_eq!(row_factors_f32(-inf, -inf), (0.0, 0.0, -inf));
        assert_eq!(row_factors_f32(-inf, 2.0), (0.0, 1.0, 2.0));
        assert_eq!(row_factors_f32(3.0, -inf), (1.0, 0.0, 3.0));
        let (a, b, l) = row_factors_f32(1.0, 1.0);
        assert_eq!((a, b), (0.5, 0.5));
        assert!((l - (1.0 + 2f32.ln())).abs() < 1e-6);
        for (la, lb) in [
            (f32::NAN, 1.0),
            (1.0, f32::NAN),
            (f32::NAN, -inf),
            (inf, f32::NAN),
        ] {
            let (a, b, l) = row_factors_f32(la, lb);
            assert!(a.is_nan() && b.is_nan() && l.is_nan(), "{la} {lb}");
        }
        for (la, lb) in [(inf, 1.0), (-inf, inf), (inf, inf)] {
            let (a, b, l) = row_factors_f32(la, lb);
            assert!(a.is_nan() && b.is_nan() && l == inf, "{la} {lb}");
        }
        // A weight that underflows is exactly 0: that part is skipped.
        assert_eq!(row_factors_f32(0.0, -200.0).1, 0.0);
        assert_eq!(row_factors_f64(-f64::INFINITY, 0.5), (0.0, 1.0, 0.5));
    }
}
