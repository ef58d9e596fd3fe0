//! Float64 oracles for `cross_entropy`, its backward and the fused training pass.

use crate::array::Array;
use crate::error::Result;
use crate::ops::cross_entropy::{
    CrossEntropyArgs, CrossEntropyOptions, CrossEntropyVjpArgs, Reduction, RowParams, Target,
};

/// MLX's `cross_entropy(logits, targets)` in plain f64 over the values as given: returns an
/// `F64` array of `targets`' shape (see [`cross_entropy_with`]).
///
/// # Errors
/// The validation errors of [`fast::cross_entropy`](crate::fast::cross_entropy).
pub fn cross_entropy(logits: &Array, targets: &Array) -> Result<Array> {
    cross_entropy_with(logits, targets, &CrossEntropyOptions::default())
}

/// [`fast::cross_entropy_with`](crate::fast::cross_entropy_with) in plain f64 (the formulas
/// of the op's documentation, no intermediate rounding): an `F64` array of the loss's shape.
///
/// # Errors
/// The validation errors of [`fast::cross_entropy_with`](crate::fast::cross_entropy_with).
pub fn cross_entropy_with(
    logits: &Array,
    targets: &Array,
    opts: &CrossEntropyOptions,
) -> Result<Array> {
    let args = CrossEntropyArgs::new(logits, targets, opts)?;
    let rows = rows_f64(&args)?;
    let losses: Vec<f64> = rows.iter().map(|r| r.loss).collect();
    reduce(&args, &losses, &rows)
}

/// [`fast::cross_entropy_vjp`](crate::fast::cross_entropy_vjp) in plain f64: the gradient
/// of the (reduced) loss with respect to the logits, times `cotangent`, as an `F64` array of
/// the logits' shape.
///
/// # Errors
/// The validation errors of [`fast::cross_entropy_vjp`](crate::fast::cross_entropy_vjp).
pub fn cross_entropy_vjp(
    logits: &Array,
    targets: &Array,
    opts: &CrossEntropyOptions,
    cotangent: &Array,
) -> Result<Array> {
    let args = CrossEntropyVjpArgs::new(CrossEntropyArgs::new(logits, targets, opts)?, cotangent)?;
    let rows = rows_f64(&args.fwd)?;
    let g = args.cotangent.to_f64_vec()?;
    let n_valid = valid_rows(&rows);
    let scale: Vec<f64> = match args.fwd.opts.reduction {
        Reduction::None => g,
        Reduction::Sum => vec![g[0]; rows.len()],
        Reduction::Mean => vec![g[0] / n_valid as f64; rows.len()],
    };
    grads(&args.fwd, &rows, &scale)
}

/// [`fast::cross_entropy_fused`](crate::fast::cross_entropy_fused) in plain f64: the loss
/// (reduced) and the gradient of the reduced loss (the cotangent implied: 1 per row for
/// `None` and `Sum`, `1 / n_valid` for `Mean`), as `F64` arrays.
///
/// # Errors
/// The validation errors of [`fast::cross_entropy_with`](crate::fast::cross_entropy_with).
pub fn cross_entropy_fused(
    logits: &Array,
    targets: &Array,
    opts: &CrossEntropyOptions,
) -> Result<(Array, Array)> {
    let args = CrossEntropyArgs::new(logits, targets, opts)?;
    let rows = rows_f64(&args)?;
    let losses: Vec<f64> = rows.iter().map(|r| r.loss).collect();
    let loss = reduce(&args, &losses, &rows)?;
    let g = match opts.reduction {
        Reduction::Mean => 1.0 / valid_rows(&rows) as f64,
        Reduction::None | Reduction::Sum => 1.0,
    };
    let dlogits = grads(&args, &rows, &vec![g; rows.len()])?;
    Ok((loss, dlogits))
}

/// One row's statistics in f64.
struct Row {
    target: Target,
    x: Vec<f64>,
    lse: f64,
    loss: f64,
}

fn valid_rows(rows: &[Row]) -> usize {
    rows.iter().filter(|r| r.target != Target::Ignored).count()
}

fn rows_f64(args: &CrossEntropyArgs) -> Result<Vec<Row>> {
    let p = args.row_params();
    let xs = args.logits.to_f64_vec()?;
    let ts = args.targets.to_f64_vec()?;
    let v = args.vocab;
    Ok((0..args.rows)
        .map(|r| {
            // Every integer dtype's values are exact in f64 except i64 beyond 2^53, which
            // the tests do not use as targets.
            let target = p.target(ts[r] as i64);
            let x = xs[r * v..(r + 1) * v].to_vec();
            let (lse, loss) = row_loss(&p, &x, target);
            Row {
                target,
                x,
                lse,
                loss,
            }
        })
        .collect())
}

/// `(lse, loss)` of one row (the module docs of `ops::cross_entropy`).
fn row_loss(p: &RowParams, x: &[f64], target: Target) -> (f64, f64) {
    let t = match target {
        Target::Ignored => return (0.0, 0.0),
        Target::OutOfRange => return (f64::NAN, f64::NAN),
        Target::Class(t) => t,
    };
    if x.iter().any(|v| v.is_nan()) {
        return (f64::NAN, f64::NAN);
    }
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let eps = f64::from(p.eps);
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let smooth = |log_s: f64| {
        let mut l = (1.0 - eps) * (m - x[t]) + log_s;
        if eps != 0.0 {
            l += eps * (m - mean);
        }
        l
    };
    let (lse, mut loss) = if m.is_infinite() {
        (m, smooth(0.0))
    } else {
        let s: f64 = x.iter().map(|v| (v - m).exp()).sum();
        (m + s.ln(), smooth(s.ln()))
    };
    if p.z != 0.0 {
        loss += f64::from(p.z) * lse * lse;
    }
    (lse, loss)
}

fn reduce(args: &CrossEntropyArgs, losses: &[f64], rows: &[Row]) -> Result<Array> {
    match args.opts.reduction {
        Reduction::None => Array::from_vec(losses.to_vec(), args.targets.shape()),
        Reduction::Sum => Array::from_vec(vec![losses.iter().sum::<f64>()], &[]),
        Reduction::Mean => Array::from_vec(
            vec![losses.iter().sum::<f64>() / valid_rows(rows) as f64],
            &[],
        ),
    }
}

fn grads(args: &CrossEntropyArgs, rows: &[Row], scale: &[f64]) -> Result<Array> {
    let p = args.row_params();
    let (eps, z) = (f64::from(p.eps), f64::from(p.z));
    let v = args.vocab;
    let mut out = Vec::with_capacity(rows.len() * v);
    for (row, &g) in rows.iter().zip(scale) {
        match row.target {
            Target::Ignored => out.extend(std::iter::repeat_n(0.0, v)),
            Target::OutOfRange => out.extend(std::iter::repeat_n(f64::NAN, v)),
            Target::Class(t) => {
                let a = 1.0 + 2.0 * z * row.lse;
                for (j, &xj) in row.x.iter().enumerate() {
                    let onehot = if j == t { 1.0 - eps } else { 0.0 };
                    out.push(g * (a * (xj - row.lse).exp() - eps / v as f64 - onehot));
                }
            }
        }
    }
    Array::from_vec(out, args.logits.shape())
}
