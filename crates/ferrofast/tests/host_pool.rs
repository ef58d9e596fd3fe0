//! The host buffer pool: bounded in buffers and bytes whatever sizes go through it, reusing
//! buffers of a size class, never keeping a vector the user handed in, and the in-place
//! cross-entropy pass over lent memory allocating no logits-sized buffer. One test (the pool
//! is global to the process; parallel tests would see each other's buffers).

use ferrofast::array::{clear_host_cache, host_cache_stats};
use ferrofast::{fast, Array, DType, Device};

const MAX_BUFFERS: usize = 32;
const MAX_BYTES: usize = 256 << 20;

fn within_bounds(what: &str) -> (usize, usize) {
    let (n, bytes) = host_cache_stats();
    assert!(n <= MAX_BUFFERS, "{what}: {n} buffers kept");
    assert!(bytes <= MAX_BYTES, "{what}: {bytes} bytes kept");
    (n, bytes)
}

#[test]
fn the_host_pool_is_bounded_reuses_size_classes_and_keeps_no_user_vector() {
    let cpu = Device::Cpu;
    clear_host_cache();
    assert_eq!(host_cache_stats(), (0, 0));

    // A vector handed in is freed with its array, never kept.
    let user = Array::from_vec(vec![1.5f32; 1 << 20], &[1 << 20]).unwrap();
    drop(user);
    assert_eq!(host_cache_stats(), (0, 0), "a user's vector was kept");

    // A kernel output is kept when dropped, and a request of the same size class (here 5
    // rows fewer) takes it back.
    let x = Array::randn(&[70, 1024], DType::F32, 1, &cpu).unwrap();
    let x2 = Array::randn(&[65, 1024], DType::F32, 2, &cpu).unwrap();
    clear_host_cache();
    let y = fast::rms_norm(&x, None, 1e-5).unwrap();
    drop(y);
    let (n, bytes) = host_cache_stats();
    assert_eq!(n, 1);
    assert!(bytes >= 70 * 1024 * 4);
    let y2 = fast::rms_norm(&x2, None, 1e-5).unwrap();
    assert_eq!(
        host_cache_stats(),
        (0, 0),
        "the 65-row output reused the 70-row one"
    );
    drop((x, x2, y2));

    // 200 distinct output sizes: the pool stays within its bounds.
    for rows in 1..=200usize {
        let x = Array::randn(&[rows * 5, 1024], DType::F32, rows as u64, &cpu).unwrap();
        let y = fast::rms_norm(&x, None, 1e-5).unwrap();
        drop((x, y));
        within_bounds(&format!("200 sizes, step {rows}"));
    }

    // A decode loop: a cache growing by one position a step, rebuilt on the host (the
    // pattern of an application without an in-place cache), normed and attended to.
    let q = Array::randn(&[1, 8, 1, 64], DType::F32, 7, &cpu).unwrap();
    for t in 256..768usize {
        let k = Array::randn(&[1, 8, t, 64], DType::F32, t as u64, &cpu).unwrap();
        let kn = fast::rms_norm(&k, None, 1e-5).unwrap();
        let o = fast::scaled_dot_product_attention(&q, &kn, &kn, 0.125, fast::Mask::Causal, None)
            .unwrap();
        drop((k, kn, o));
        within_bounds(&format!("decode step {t}"));
    }
    // The in-place cross-entropy pass over lent memory (a NumPy array's, say) writes the
    // gradient there: no buffer the size of the logits passes through the pool.
    let (rows, vocab) = (64usize, 4096usize);
    let logits = Array::randn(&[rows, vocab], DType::F32, 11, &cpu).unwrap();
    let targets = Array::from_vec(
        (0..rows as i32).map(|r| (r * 61) % vocab as i32).collect(),
        &[rows],
    )
    .unwrap();
    let opts = fast::CrossEntropyOptions::default();
    let (want_loss, want_grad) = fast::cross_entropy_fused(&logits, &targets, &opts).unwrap();
    let (want_loss, want_grad) = (
        want_loss.to_vec::<f32>().unwrap(),
        want_grad.to_vec::<f32>().unwrap(),
    );
    let lent: Box<Vec<f32>> = Box::new(logits.to_vec::<f32>().unwrap());
    let ptr = lent.as_ptr().cast::<u8>();
    // SAFETY: `lent` holds rows * vocab initialised f32, aligned, kept alive by the array
    // that owns it, and lent for writing to the call below; nothing else touches it.
    let x = unsafe {
        Array::from_external(ptr, &[rows, vocab], &[vocab as isize, 1], DType::F32, lent)
    }
    .unwrap();
    drop(logits);
    clear_host_cache();
    // SAFETY: as above.
    let (loss, grad) =
        unsafe { fast::cross_entropy_fused_in_place_external(x, &targets, &opts) }.unwrap();
    assert_eq!(
        grad.host_ptr(),
        Some(ptr),
        "the gradient is in the lent memory"
    );
    let (_, bytes) = host_cache_stats();
    assert!(
        bytes < rows * vocab * 4,
        "a logits-sized buffer went through the pool: {bytes} bytes kept"
    );
    assert_eq!(loss.to_vec::<f32>().unwrap(), want_loss);
    assert_eq!(grad.to_vec::<f32>().unwrap(), want_grad);
    drop((loss, grad));
    let (_, bytes) = host_cache_stats();
    assert!(
        bytes < rows * vocab * 4,
        "a logits-sized buffer went through the pool: {bytes} bytes kept"
    );

    let (n, bytes) = within_bounds("after the loops");
    println!("host pool after the loops: {n} buffers, {bytes} bytes");
    clear_host_cache();
    assert_eq!(host_cache_stats(), (0, 0));
}
