//! `Array::slice_update` (MLX's `slice_update`, in place when the array holds its buffer
//! alone) and `KvCache` (preallocated keys and values for decoding), against references
//! built element by element. GPU cases compare against the CPU and are ignored unless the
//! crate is built with the `gpu-tests` feature.

mod common;

use std::sync::Arc;

use ferrofast::fast::{self, Mask};
use ferrofast::{Array, DType, Device, Error, KvCache};

// ----- references -------------------------------------------------------------------------

/// The indices `range(*slice(start, stop, step).indices(n))` visits in Python.
fn py_range(start: isize, stop: isize, step: isize, n: usize) -> Vec<usize> {
    let n = n as isize;
    let (lo, hi) = if step > 0 { (0, n) } else { (-1, n - 1) };
    let norm = |v: isize| (if v < 0 { v + n } else { v }).clamp(lo, hi);
    let (mut i, end) = (norm(start), norm(stop));
    let mut out = Vec::new();
    while (step > 0 && i < end) || (step < 0 && i > end) {
        out.push(i as usize);
        i += step;
    }
    out
}

fn row_major(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `base` (row-major values of `shape`) with the slice replaced by `upd` (row-major values
/// of `upd_shape`, already in the destination's dtype), broadcast from the right, one
/// element at a time.
fn reference(
    base: &[f64],
    shape: &[usize],
    (starts, stops, steps): (&[isize], &[isize], &[isize]),
    upd: &[f64],
    upd_shape: &[usize],
) -> Vec<f64> {
    let nd = shape.len();
    let picks: Vec<Vec<usize>> = (0..nd)
        .map(|ax| {
            if ax < starts.len() {
                py_range(starts[ax], stops[ax], steps[ax], shape[ax])
            } else {
                (0..shape[ax]).collect()
            }
        })
        .collect();
    let region: Vec<usize> = picks.iter().map(Vec::len).collect();
    let mut out = base.to_vec();
    if region.contains(&0) {
        return out;
    }
    let (bs, us) = (row_major(shape), row_major(upd_shape));
    let pad = nd - upd_shape.len();
    let mut idx = vec![0usize; nd];
    loop {
        let dst: usize = (0..nd).map(|ax| picks[ax][idx[ax]] * bs[ax]).sum();
        let src: usize = (pad..nd)
            .map(|ax| {
                let u = ax - pad;
                if upd_shape[u] == 1 {
                    0
                } else {
                    idx[ax] * us[u]
                }
            })
            .sum();
        out[dst] = upd[src];
        let mut ax = nd;
        loop {
            if ax == 0 {
                return out;
            }
            ax -= 1;
            idx[ax] += 1;
            if idx[ax] < region[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
}

fn vals(a: &Array) -> Vec<f64> {
    a.to_f64_vec().expect("read")
}

/// Distinct, non-zero values `offset + 1, offset + 2, ...` (exact in every float dtype up to
/// 256 elements; integers wrap as `astype` wraps them).
fn counting(shape: &[usize], dtype: DType, offset: f64) -> Array {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| offset + 1.0 + i as f64).collect();
    Array::from_vec(v, shape).unwrap().astype(dtype).unwrap()
}

/// Runs `a.slice_update(update, ...)` and checks the result against [`reference`]; returns
/// whether the buffer was written in place (the first element's address unchanged).
fn check_update(
    a: &mut Array,
    update: &Array,
    starts: &[isize],
    stops: &[isize],
    steps: &[isize],
    what: &str,
) -> bool {
    let before = vals(a);
    let shape = a.shape().to_vec();
    let dtype = a.dtype();
    let ptr = a.host_ptr();
    let in_place = a.can_update_in_place();
    let upd = vals(&update.astype(dtype).unwrap());
    a.slice_update(update, starts, stops, steps)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = reference(
        &before,
        &shape,
        (starts, stops, steps),
        &upd,
        update.shape(),
    );
    assert_eq!(a.shape(), &shape[..], "{what}: shape");
    assert_eq!(a.dtype(), dtype, "{what}: dtype");
    let got = vals(a);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g == w || (g.is_nan() && w.is_nan()),
            "{what}: element {i} is {g}, want {w}"
        );
    }
    let region_empty = py_region(&shape, starts, stops, steps).contains(&0);
    if in_place && !region_empty {
        assert_eq!(a.host_ptr(), ptr, "{what}: expected an in-place write");
    }
    in_place
}

fn py_region(shape: &[usize], starts: &[isize], stops: &[isize], steps: &[isize]) -> Vec<usize> {
    (0..shape.len())
        .map(|ax| {
            if ax < starts.len() {
                py_range(starts[ax], stops[ax], steps[ax], shape[ax]).len()
            } else {
                shape[ax]
            }
        })
        .collect()
}

#[test]
fn python_ranges_are_pythons() {
    // list(range(10))[2:8:3], [::-1], [-3:], [5:2], [8:1:-3], [-100:100]
    assert_eq!(py_range(2, 8, 3, 10), vec![2, 5]);
    assert_eq!(py_range(-1, -11, -1, 10), (0..10).rev().collect::<Vec<_>>());
    assert_eq!(py_range(-3, 10, 1, 10), vec![7, 8, 9]);
    assert!(py_range(5, 2, 1, 10).is_empty());
    assert_eq!(py_range(8, 1, -3, 10), vec![8, 5, 2]);
    assert_eq!(py_range(-100, 100, 1, 3), vec![0, 1, 2]);
}

// ----- slice_update on the CPU --------------------------------------------------------------

/// An array shape and the starts, stops and steps of a slice of it.
type SliceCase = (Vec<usize>, Vec<isize>, Vec<isize>, Vec<isize>);
/// A [`SliceCase`] and the shape of the update written there.
#[cfg(feature = "cuda")]
type GpuCase = (Vec<usize>, Vec<isize>, Vec<isize>, Vec<isize>, Vec<usize>);

#[test]
fn slice_update_writes_the_slice_in_place() {
    let cases: Vec<SliceCase> = vec![
        (vec![10], vec![2], vec![8], vec![3]),
        (vec![10], vec![-1], vec![-11], vec![-1]),
        (vec![10], vec![-3], vec![100], vec![1]),
        (vec![4, 6], vec![1, 0], vec![3, 6], vec![1, 2]),
        (vec![4, 6], vec![3, 5], vec![-5, -7], vec![-2, -1]),
        (vec![4, 6], vec![1], vec![3], vec![1]),
        (
            vec![2, 3, 4, 5],
            vec![0, 1, 1, 0],
            vec![2, 3, 4, 5],
            vec![1, 1, 2, 1],
        ),
        (
            vec![2, 3, 4, 5],
            vec![1, -1, 3, 4],
            vec![-3, -4, -5, 0],
            vec![-1, -2, -1, -3],
        ),
        (
            vec![1, 8, 16, 4],
            vec![0, 0, 5, 0],
            vec![1, 8, 6, 4],
            vec![1, 1, 1, 1],
        ),
        (vec![], vec![], vec![], vec![]),
    ];
    for (k, (shape, starts, stops, steps)) in cases.into_iter().enumerate() {
        for dtype in [DType::F32, DType::BF16, DType::I32, DType::F64] {
            let mut a = counting(&shape, dtype, 0.0);
            let region = py_region(&shape, &starts, &stops, &steps);
            let update = counting(&region, dtype, 1000.0);
            let what = format!("case {k} {dtype} {shape:?}[{starts:?}:{stops:?}:{steps:?}]");
            let in_place = check_update(&mut a, &update, &starts, &stops, &steps, &what);
            assert!(
                in_place,
                "{what}: an op's output should be written in place"
            );
        }
    }
}

#[test]
fn slice_update_broadcasts_and_casts_the_update() {
    let shape = [3, 4, 5];
    let starts = [0, 1, -1];
    let stops = [3, 4, -6];
    let steps = [2, 1, -2];
    // The region is [2, 3, 3].
    assert_eq!(py_region(&shape, &starts, &stops, &steps), vec![2, 3, 3]);
    let updates: Vec<(Vec<usize>, DType)> = vec![
        (vec![], DType::F64),
        (vec![3], DType::F32),
        (vec![1, 3], DType::BF16),
        (vec![3, 1], DType::I32),
        (vec![2, 1, 3], DType::F16),
        (vec![1, 1, 1], DType::U8),
        (vec![2, 3, 3], DType::I64),
    ];
    for dst_dtype in [DType::F32, DType::BF16, DType::I32, DType::U8, DType::F64] {
        for (ushape, udtype) in &updates {
            let mut a = counting(&shape, dst_dtype, 0.0);
            let update = counting(ushape, *udtype, 40.5);
            let what = format!("{ushape:?} {udtype} into {dst_dtype}");
            check_update(&mut a, &update, &starts, &stops, &steps, &what);
        }
    }
    // Casts follow astype: f32 -> i32 truncates, -> bool is `!= 0`, bool -> f32 is 0 / 1.
    let mut ints = Array::from_vec(vec![7i32; 4], &[4]).unwrap();
    let f = Array::from_vec(vec![-2.75f32, 3.9], &[2]).unwrap();
    ints.slice_update(&f, &[1], &[3], &[1]).unwrap();
    assert_eq!(ints.to_vec::<i32>().unwrap(), vec![7, -2, 3, 7]);
    let mut bools = Array::from_vec(vec![true, true, false], &[3]).unwrap();
    bools
        .slice_update(&Array::scalar(0.0f32), &[0], &[2], &[1])
        .unwrap();
    assert_eq!(bools.to_vec::<bool>().unwrap(), vec![false, false, false]);
    let mut floats = Array::from_vec(vec![5.0f32; 3], &[3]).unwrap();
    let b = Array::from_vec(vec![true, false], &[2]).unwrap();
    floats.slice_update(&b, &[1], &[3], &[1]).unwrap();
    assert_eq!(floats.to_vec::<f32>().unwrap(), vec![5.0, 1.0, 0.0]);
}

#[test]
fn slice_update_takes_views_as_destination_and_source() {
    // Destination: a transposed view, alone on its buffer once the base is gone, is written
    // in place through its strides.
    let base = counting(&[4, 6], DType::F32, 0.0);
    let mut t = base.transpose(&[1, 0]).unwrap();
    drop(base);
    let update = counting(&[3, 2], DType::F32, 500.0);
    assert!(check_update(
        &mut t,
        &update,
        &[1, 0],
        &[6, 4],
        &[2, 2],
        "transposed dst"
    ));

    // Destination: a reversed, stepped slice of a larger buffer.
    let base = counting(&[8, 10], DType::BF16, 0.0);
    let mut r = base.slice(&[-1, 9], &[-9, 0], &[-2, -3]).unwrap();
    drop(base);
    assert_eq!(r.shape(), &[4, 3]);
    let update = counting(&[2, 3], DType::BF16, 200.0);
    assert!(check_update(
        &mut r,
        &update,
        &[1],
        &[4],
        &[2],
        "reversed dst"
    ));

    // Source: transposed, reversed and broadcast views.
    let src = counting(&[5, 3], DType::F32, 300.0);
    let views = [
        src.transpose(&[1, 0]).unwrap(),
        src.slice(&[-1, -1], &[-6, -4], &[-1, -1])
            .unwrap()
            .transpose(&[1, 0])
            .unwrap(),
        // Column 1 as a row, repeated: stride 0 along the first axis.
        src.slice(&[0, 1], &[5, 2], &[1, 1])
            .unwrap()
            .transpose(&[1, 0])
            .unwrap()
            .broadcast_to(&[3, 5])
            .unwrap(),
    ];
    for (k, view) in views.iter().enumerate() {
        let mut a = counting(&[6, 7], DType::F64, 0.0);
        assert_eq!(view.shape(), &[3, 5]);
        check_update(
            &mut a,
            view,
            &[0, 1],
            &[6, 6],
            &[2, 1],
            &format!("source view {k}"),
        );
    }
}

#[test]
fn slice_update_copies_on_write() {
    // Another handle on the buffer keeps the old values.
    let mut a = counting(&[4, 5], DType::F32, 0.0);
    let old = vals(&a);
    let other = a.clone();
    let row = a.slice(&[1], &[2], &[1]).unwrap();
    assert!(!a.can_update_in_place());
    let update = Array::full(&[5], -1.0, DType::F32, &Device::Cpu).unwrap();
    check_update(&mut a, &update, &[2], &[3], &[1], "shared");
    assert!(!a.shares_buffer_with(&other));
    assert_eq!(vals(&other), old);
    assert_eq!(vals(&row), old[5..10].to_vec());
    assert!(a.can_update_in_place(), "the copy is the array's own");

    // The functional form leaves its input alone.
    let b = counting(&[3, 3], DType::I32, 0.0);
    let c = b
        .slice_updated(&Array::scalar(0i32), &[0, 0], &[3, 3], &[2, 2])
        .unwrap();
    assert_eq!(b.to_vec::<i32>().unwrap(), (1..=9).collect::<Vec<i32>>());
    assert_eq!(c.to_vec::<i32>().unwrap(), vec![0, 2, 0, 4, 5, 6, 0, 8, 0]);

    // A broadcast view (repeated elements) is copied first: one row changes, not all.
    let mut bcast = counting(&[1, 3], DType::F32, 0.0)
        .broadcast_to(&[4, 3])
        .unwrap();
    assert!(!bcast.can_update_in_place());
    let update = counting(&[3], DType::F32, 10.0);
    check_update(&mut bcast, &update, &[2], &[3], &[1], "broadcast dst");
    assert_eq!(
        vals(&bcast),
        vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 11.0, 12.0, 13.0, 1.0, 2.0, 3.0]
    );
}

#[test]
fn slice_update_never_writes_external_memory() {
    let data: Arc<Vec<f32>> = Arc::new((0..12).map(|i| i as f32 + 0.5).collect());
    let ptr = data.as_ptr().cast::<u8>();
    // SAFETY: the Arc keeps the 12 f32 alive and nobody writes them while the owner lives.
    let mut e = unsafe {
        Array::from_external(
            ptr,
            &[3, 4],
            &[4, 1],
            DType::F32,
            Box::new(Arc::clone(&data)),
        )
    }
    .unwrap();
    assert!(!e.can_update_in_place());
    let update = Array::full(&[2], 99.0, DType::F32, &Device::Cpu).unwrap();
    check_update(&mut e, &update, &[1, 1], &[2, 4], &[1, 2], "external");
    assert_ne!(e.host_ptr(), Some(ptr));
    let want: Vec<f32> = (0..12).map(|i| i as f32 + 0.5).collect();
    assert_eq!(*data, want, "the external memory was written");
    assert_eq!(vals(&e)[5], 99.0);
    assert_eq!(vals(&e)[7], 99.0);
}

#[test]
fn slice_update_matches_the_reference_on_random_slices() {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let dtypes = [DType::F32, DType::F16, DType::BF16, DType::I32, DType::F64];
    for case in 0..400 {
        let nd = 1 + next(4) as usize;
        let shape: Vec<usize> = (0..nd).map(|_| next(6) as usize).collect();
        let nlists = next(nd as u64 + 1) as usize;
        let (mut starts, mut stops, mut steps) = (vec![], vec![], vec![]);
        for &n in &shape[..nlists] {
            let n = n as isize;
            starts.push(next(2 * n as u64 + 1) as isize - n);
            stops.push(next(2 * n as u64 + 5) as isize - n - 2);
            steps.push([-3, -2, -1, 1, 2, 3][next(6) as usize]);
        }
        let region = py_region(&shape, &starts, &stops, &steps);
        // Some axes of size 1 (broadcast), some leading axes dropped.
        let drop_lead = next(region.len() as u64 + 1) as usize;
        let ushape: Vec<usize> = region[drop_lead..]
            .iter()
            .map(|&d| if next(3) == 0 { 1 } else { d })
            .collect();
        let dtype = dtypes[next(5) as usize];
        let udtype = dtypes[next(5) as usize];
        let mut a = counting(&shape, dtype, 0.0);
        // Half the time the destination is a permuted view alone on its buffer.
        if next(2) == 0 && nd > 1 {
            let mut axes: Vec<isize> = (0..nd as isize).collect();
            axes.reverse();
            let t = counting(&shape.iter().rev().copied().collect::<Vec<_>>(), dtype, 0.0);
            a = t.transpose(&axes).unwrap();
        }
        let update = counting(&ushape, udtype, 100.0);
        let what = format!(
            "case {case}: {dtype} {shape:?} [{starts:?}:{stops:?}:{steps:?}] <- {udtype} {ushape:?}"
        );
        assert!(check_update(
            &mut a, &update, &starts, &stops, &steps, &what
        ));
    }
}

#[test]
fn slice_update_reports_bad_arguments() {
    let mut a = counting(&[4, 5], DType::F32, 0.0);
    let before = vals(&a);
    let one = Array::scalar(1.0f32);
    let err = |r: ferrofast::Result<()>| r.expect_err("should fail").to_string();

    let m = err(a.slice_update(&one, &[0, 0], &[1], &[1, 1]));
    assert!(m.contains("same length"), "{m}");
    let m = err(a.slice_update(&one, &[0, 0, 0], &[1, 1, 1], &[1, 1, 1]));
    assert!(m.contains("Too many indices (3)"), "{m}");
    let m = err(a.slice_update(&one, &[0], &[1], &[0]));
    assert!(m.contains("step cannot be zero"), "{m}");
    for start in [6, -6, -5, 100] {
        let r = a.slice_update(&one, &[0, start], &[1, 5], &[1, 1]);
        if start == -5 {
            r.expect("-5 is the first column");
            continue;
        }
        let m = err(r);
        assert!(
            m.contains(&format!(
                "start {start} is out of range for axis 1 of size 5"
            )),
            "{m}"
        );
    }
    let m = err(a.slice_update(&one, &[6], &[7], &[1]));
    assert!(m.contains("axis 0 of size 4"), "{m}");

    let wide = counting(&[2, 2, 3], DType::F32, 0.0);
    match a.slice_update(&wide, &[0], &[2], &[1]) {
        Err(Error::Shape(m)) => {
            assert!(m.contains("(2,2,3)") && m.contains("(2,5)"), "{m}");
            assert!(m.contains("more dimensions"), "{m}");
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    let bad = counting(&[3, 5], DType::F32, 0.0);
    match a.slice_update(&bad, &[0], &[2], &[1]) {
        Err(Error::Shape(m)) => {
            assert!(m.contains("(3,5)") && m.contains("(2,5)"), "{m}");
            assert!(m.contains("cannot be broadcast"), "{m}");
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // An empty slice takes an update that broadcasts to it and changes nothing; one that
    // does not is still an error.
    a.slice_update(&counting(&[1, 5], DType::F32, 9.0), &[4], &[4], &[1])
        .unwrap();
    assert!(a
        .slice_update(&counting(&[2, 5], DType::F32, 9.0), &[4], &[4], &[1])
        .is_err());
    // Only the successful -5 write above changed anything: row 0.
    let mut want = before;
    want[..5].fill(1.0);
    assert_eq!(vals(&a), want);
}

// ----- KvCache on the CPU -----------------------------------------------------------------

/// `[B, H, sum t, D]` from the pieces along axis 2, element by element.
fn concat_positions(pieces: &[Array]) -> Array {
    let s = pieces[0].shape().to_vec();
    let (b, h, d) = (s[0], s[1], s[3]);
    let total: usize = pieces.iter().map(|p| p.shape()[2]).sum();
    let mut out = vec![0.0f64; b * h * total * d];
    let mut at = 0;
    for p in pieces {
        let t = p.shape()[2];
        let v = vals(p);
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    for di in 0..d {
                        out[((bi * h + hi) * total + at + ti) * d + di] =
                            v[((bi * h + hi) * t + ti) * d + di];
                    }
                }
            }
        }
        at += t;
    }
    Array::from_vec(out, &[b, h, total, d])
        .unwrap()
        .astype(pieces[0].dtype())
        .unwrap()
}

/// Appends `prefill` positions, then decodes `steps` one at a time with a `[B, H_q, 1, D]`
/// query each, comparing the cache's views and the attention over them with K / V
/// concatenated independently. Returns the outputs.
fn decode_loop(
    dev: &Device,
    dtype: DType,
    capacity: usize,
    prefill: usize,
    steps: usize,
) -> Vec<Array> {
    let (b, hq, hkv, d, dv) = (2, 4, 2, 16, 8);
    let mut cache = KvCache::with_value_dim(b, hkv, d, dv, capacity, dtype, dev).unwrap();
    let (mut ks, mut vs, mut outs) = (Vec::new(), Vec::new(), Vec::new());
    let mut cap_seen = vec![cache.capacity()];
    for step in 0..=steps {
        let t = if step == 0 { prefill } else { 1 };
        let seed = 1000 * step as u64;
        // New entries in f32: the cache converts them.
        let k = Array::randn(&[b, hkv, t, d], DType::F32, seed + 1, &Device::Cpu).unwrap();
        let v = Array::randn(&[b, hkv, t, dv], DType::F32, seed + 2, &Device::Cpu).unwrap();
        ks.push(k.astype(dtype).unwrap());
        vs.push(v.astype(dtype).unwrap());
        let (keys, values) = cache
            .append(&common::on(&k, dev), &common::on(&v, dev))
            .unwrap();
        if !cap_seen.contains(&cache.capacity()) {
            cap_seen.push(cache.capacity());
        }
        assert_eq!(cache.len(), prefill + step);
        assert_eq!(keys.shape(), &[b, hkv, prefill + step, d]);
        assert_eq!(values.shape(), &[b, hkv, prefill + step, dv]);
        let (k_ref, v_ref) = (concat_positions(&ks), concat_positions(&vs));
        assert_eq!(vals(&keys), vals(&k_ref), "keys after step {step}");
        assert_eq!(vals(&values), vals(&v_ref), "values after step {step}");
        if step == 0 {
            continue;
        }
        let q = Array::randn(&[b, hq, 1, d], dtype, seed + 3, &Device::Cpu).unwrap();
        let scale = 0.25;
        let out = fast::scaled_dot_product_attention(
            &common::on(&q, dev),
            &keys,
            &values,
            scale,
            Mask::None,
            None,
        )
        .unwrap();
        let want = fast::scaled_dot_product_attention(&q, &k_ref, &v_ref, scale, Mask::None, None)
            .unwrap();
        let (atol, rtol) = common::default_tol(dtype);
        common::check_close(&out, &want, atol, rtol, &format!("{dtype} step {step}"));
        outs.push(out);
    }
    if prefill + steps > capacity {
        assert!(cap_seen.len() > 1, "the cache should have grown");
    }
    // Capacity at least doubles on each growth.
    for w in cap_seen.windows(2) {
        assert!(w[1] >= 2 * w[0], "capacities {cap_seen:?}");
    }
    outs
}

#[test]
fn kv_cache_decode_loop_matches_attention_over_concatenated_kv() {
    for dtype in [DType::F32, DType::BF16] {
        decode_loop(&Device::Cpu, dtype, 64, 5, 12);
    }
}

#[test]
fn kv_cache_grows_past_its_capacity() {
    decode_loop(&Device::Cpu, DType::F32, 3, 2, 20);
    decode_loop(&Device::Cpu, DType::F16, 0, 0, 9);
    // reserve grows ahead of time, at least doubling.
    let mut c = KvCache::new(1, 2, 4, 4, DType::F32, &Device::Cpu).unwrap();
    c.reserve(3).unwrap();
    assert_eq!(c.capacity(), 4);
    c.reserve(5).unwrap();
    assert_eq!(c.capacity(), 8);
    assert_eq!(c.nbytes(), 2 * 2 * 8 * 4 * 4);
}

#[test]
fn kv_cache_appends_in_place_unless_a_view_is_alive() {
    let cpu = Device::Cpu;
    let mut cache = KvCache::new(1, 2, 8, 32, DType::F32, &cpu).unwrap();
    let k = |s: u64| Array::randn(&[1, 2, 1, 8], DType::F32, s, &cpu).unwrap();
    drop(cache.append(&k(1), &k(2)).unwrap());
    let ptr = cache.keys().host_ptr();
    for s in 0..5 {
        let (keys, values) = cache.append(&k(10 + s), &k(20 + s)).unwrap();
        assert_eq!(keys.host_ptr(), ptr, "append {s} moved the buffer");
        drop((keys, values));
    }
    // A view held across an append keeps its contents; the append moves the filled part.
    let held = cache.keys();
    let held_vals = vals(&held);
    let (keys, _) = cache.append(&k(30), &k(31)).unwrap();
    assert_ne!(keys.host_ptr(), ptr);
    assert_eq!(vals(&held), held_vals);
    assert_eq!(cache.capacity(), 32, "a moved cache keeps its capacity");
    let old_part = keys.slice(&[0, 0, 0], &[1, 2, 6], &[1, 1, 1]).unwrap();
    assert_eq!(vals(&old_part), held_vals);
    drop(keys);
    // Trim and reset: later appends overwrite.
    assert_eq!(cache.trim(2), 2);
    assert_eq!(cache.len(), 5);
    let (keys, _) = cache.append(&k(40), &k(41)).unwrap();
    let last = keys.slice(&[0, 0, 5], &[1, 2, 6], &[1, 1, 1]).unwrap();
    assert_eq!(vals(&last), vals(&k(40)));
    drop(keys);
    assert_eq!(cache.trim(100), 6);
    assert!(cache.is_empty());
    cache.append(&k(50), &k(51)).unwrap();
    cache.reset();
    assert_eq!(cache.len(), 0);
    assert_eq!(cache.keys().shape(), &[1, 2, 0, 8]);
    // An empty append writes nothing.
    let none = Array::zeros(&[1, 2, 0, 8], DType::F32, &cpu).unwrap();
    let (kk, vv) = cache.append(&none, &none).unwrap();
    assert_eq!((kk.shape()[2], vv.shape()[2]), (0, 0));
}

#[test]
fn kv_cache_reports_bad_arguments() {
    let cpu = Device::Cpu;
    let mut cache = KvCache::with_value_dim(2, 4, 16, 8, 8, DType::BF16, &cpu).unwrap();
    let k = Array::zeros(&[2, 4, 1, 16], DType::F32, &cpu).unwrap();
    let v = Array::zeros(&[2, 4, 1, 8], DType::F32, &cpu).unwrap();
    let bad_heads = Array::zeros(&[2, 2, 1, 16], DType::F32, &cpu).unwrap();
    let btdh = Array::zeros(&[2, 1, 4, 16], DType::F32, &cpu).unwrap();
    for (kk, vv) in [(&bad_heads, &v), (&btdh, &v), (&k, &k)] {
        match cache.append(kk, vv) {
            Err(Error::Shape(m)) => {
                assert!(m.contains("[B, H_kv, T, D] = (2,4,T,"), "{m}");
            }
            other => panic!("expected a shape error, got {other:?}"),
        }
    }
    let v2 = Array::zeros(&[2, 4, 2, 8], DType::F32, &cpu).unwrap();
    match cache.append(&k, &v2) {
        Err(Error::Shape(m)) => assert!(m.contains("differ in the number of positions"), "{m}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert_eq!(cache.len(), 0, "a failed append changes nothing");
    match KvCache::new(1, 1, 4, 4, DType::I32, &cpu) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("floating"), "{m}"),
        other => panic!("expected an argument error, got {other:?}"),
    }
    // Sizes past memory are errors, not panics.
    assert!(KvCache::new(1, 1, 128, usize::MAX / 64, DType::F32, &cpu).is_err());
    assert!(KvCache::new(64, 64, 128, 1 << 40, DType::F32, &cpu).is_err());
    let mut small = KvCache::new(1, 1, 4, 4, DType::F32, &cpu).unwrap();
    assert!(matches!(small.reserve(usize::MAX), Err(Error::Shape(_))));
    assert!(small.reserve(1 << 50).is_err());
    assert_eq!(small.capacity(), 4);
}

// ----- GPU ----------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;

    /// Runs the same update on the CPU and on `gpu` and compares the results exactly.
    fn same_on_gpu(
        gpu: &Device,
        dst: &Array,
        update: &Array,
        (starts, stops, steps): (&[isize], &[isize], &[isize]),
        what: &str,
    ) {
        let mut host = dst.clone();
        host.slice_update(update, starts, stops, steps).unwrap();
        let mut dev = common::on(dst, gpu);
        let dev_update = common::on(update, gpu);
        dev.slice_update(&dev_update, starts, stops, steps)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(dev.device(), *gpu);
        let (g, h) = (vals(&dev), vals(&host));
        for (i, (a, b)) in g.iter().zip(&h).enumerate() {
            assert!(
                a == b || (a.is_nan() && b.is_nan()),
                "{what}: element {i} is {a} on the GPU, {b} on the CPU"
            );
        }
    }

    #[test]
    #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
    fn slice_update_on_the_gpu_matches_the_cpu() {
        let Some(gpu) = common::gpu() else { return };
        // (array shape, starts, stops, steps, update shape)
        let cases: Vec<GpuCase> = vec![
            (vec![10], vec![2], vec![8], vec![3], vec![2]),
            (
                vec![4, 6],
                vec![3, 5],
                vec![-5, -7],
                vec![-2, -1],
                vec![2, 6],
            ),
            (
                vec![2, 3, 4, 5],
                vec![1, -1, 3, 4],
                vec![-3, -4, -5, 0],
                vec![-1, -2, -1, -3],
                vec![1, 2, 1, 2],
            ),
            (
                vec![1, 8, 64, 128],
                vec![0, 0, 17, 0],
                vec![1, 8, 20, 128],
                vec![1, 1, 1, 1],
                vec![1, 8, 3, 128],
            ),
            (
                vec![1, 8, 64, 128],
                vec![0, 0, 5, 0],
                vec![1, 8, 6, 128],
                vec![1, 1, 1, 1],
                vec![1, 1, 128],
            ),
            (vec![33, 7], vec![0], vec![33], vec![1], vec![]),
            (vec![4096], vec![0], vec![4096], vec![1], vec![4096]),
            // Ten axes that do not merge: past the kernel's eight dimensions.
            (
                vec![3; 10],
                vec![0; 10],
                vec![3; 10],
                vec![2; 10],
                vec![2; 10],
            ),
        ];
        for (k, (shape, starts, stops, steps, ushape)) in cases.into_iter().enumerate() {
            for (dtype, udtype) in [
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::BF16, DType::F32),
                (DType::F16, DType::I32),
                (DType::I64, DType::I64),
                (DType::U8, DType::U8),
                (DType::F64, DType::F32),
            ] {
                let dst = Array::uniform(&shape, -50.0, 50.0, dtype, 7, &Device::Cpu).unwrap();
                let update = Array::uniform(&ushape, -50.0, 50.0, udtype, 8, &Device::Cpu).unwrap();
                let what = format!("case {k} {dtype} <- {udtype}");
                same_on_gpu(&gpu, &dst, &update, (&starts, &stops, &steps), &what);
            }
        }
        // A strided destination alone on its buffer is written in place.
        let base = Array::randn(&[6, 8], DType::F32, 3, &gpu).unwrap();
        let mut t = base.transpose(&[1, 0]).unwrap();
        drop(base);
        assert!(t.can_update_in_place());
        let ptr = t.cuda_ptr();
        let before = vals(&t);
        let update = Array::randn(&[4, 3], DType::F32, 4, &gpu).unwrap();
        t.slice_update(&update, &[0, 1], &[8, 6], &[2, 2]).unwrap();
        assert_eq!(t.cuda_ptr(), ptr);
        let want = reference(
            &before,
            &[8, 6],
            (&[0, 1], &[8, 6], &[2, 2]),
            &vals(&update),
            &[4, 3],
        );
        assert_eq!(vals(&t), want);
    }

    #[test]
    #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
    fn slice_update_on_the_gpu_copies_on_write() {
        let Some(gpu) = common::gpu() else { return };
        let mut a = Array::randn(&[4, 5], DType::BF16, 1, &gpu).unwrap();
        let old = vals(&a);
        let other = a.clone();
        let update = Array::full(&[5], 2.5, DType::F32, &gpu).unwrap();
        a.slice_update(&update, &[1], &[2], &[1]).unwrap();
        assert!(!a.shares_buffer_with(&other));
        assert_eq!(vals(&other), old);
        let got = vals(&a);
        assert_eq!(got[5..10], [2.5; 5]);
        assert_eq!(got[..5], old[..5]);
        // A CPU update for a GPU array is an error.
        let host = Array::full(&[5], 1.0, DType::BF16, &Device::Cpu).unwrap();
        match a.slice_update(&host, &[0], &[1], &[1]) {
            Err(Error::Device(m)) => assert!(m.contains("cpu"), "{m}"),
            other => panic!("expected a device error, got {other:?}"),
        }
    }

    #[test]
    #[cfg_attr(not(feature = "gpu-tests"), ignore = "needs a GPU (feature gpu-tests)")]
    fn kv_cache_decode_loop_on_the_gpu() {
        let Some(gpu) = common::gpu() else { return };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let dev_outs = decode_loop(&gpu, dtype, 8, 3, 12);
            let cpu_outs = decode_loop(&Device::Cpu, dtype, 8, 3, 12);
            for (i, (g, c)) in dev_outs.iter().zip(&cpu_outs).enumerate() {
                let (atol, rtol) = common::default_tol(dtype);
                common::check_close(g, c, 2.0 * atol, 2.0 * rtol, &format!("{dtype} step {i}"));
            }
        }
        // The tensor-core decode shape: bf16, 32 query heads over 8, D 128; appends stay in
        // place while the views are dropped.
        let mut cache = KvCache::new(1, 8, 128, 64, DType::BF16, &gpu).unwrap();
        let k0 = Array::randn(&[1, 8, 16, 128], DType::BF16, 5, &gpu).unwrap();
        drop(cache.append(&k0, &k0).unwrap());
        let ptr = cache.keys().cuda_ptr();
        for s in 0..8u64 {
            let k = Array::randn(&[1, 8, 1, 128], DType::BF16, 10 + s, &gpu).unwrap();
            let q = Array::randn(&[1, 32, 1, 128], DType::BF16, 20 + s, &gpu).unwrap();
            let (keys, values) = cache.append(&k, &k).unwrap();
            assert_eq!(keys.cuda_ptr(), ptr, "append {s} moved the buffer");
            let out =
                fast::scaled_dot_product_attention(&q, &keys, &values, 0.088, Mask::None, None)
                    .unwrap();
            let host = |a: &Array| a.to_device(&Device::Cpu).unwrap().contiguous().unwrap();
            let want = fast::scaled_dot_product_attention(
                &host(&q),
                &host(&keys),
                &host(&values),
                0.088,
                Mask::None,
                None,
            )
            .unwrap();
            common::check_close(&out, &want, 2e-2, 2e-2, &format!("bf16 D128 step {s}"));
        }
        // A cache made on another stream writes there.
        let stream = ferrofast::Stream::new(&gpu).unwrap();
        let mut on = KvCache::new_on(&stream, 1, 2, 8, 8, 4, DType::F32).unwrap();
        let k = Array::randn(&[1, 2, 6, 8], DType::F32, 9, &gpu).unwrap();
        let (keys, _) = on.append(&k, &k).unwrap();
        assert_eq!(keys.stream(), Some(stream));
        assert_eq!(vals(&keys), vals(&k));
    }
}
