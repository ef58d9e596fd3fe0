//! The op cases the demo and the benchmark run: inputs, the call, its cost model and its
//! oracle.

use ferrofast::fast::{self, CrossEntropyOptions, GatedDeltaGrads, Mask, Reduction, RopeOffset};
use ferrofast::parallel::{gather_sequence, ring_attention, shard_sequence, ThreadRing};
use ferrofast::{reference, Array, DType, Device, Result};

/// One op on one shape and dtype.
#[derive(Clone, Debug)]
pub enum Case {
    RmsNorm {
        rows: usize,
        dim: usize,
        dtype: DType,
    },
    LayerNorm {
        rows: usize,
        dim: usize,
        dtype: DType,
    },
    Rope {
        shape: [usize; 4],
        dtype: DType,
    },
    /// `rms_norm_vjp` with a weight: `dx` and `dweight`.
    RmsNormVjp {
        rows: usize,
        dim: usize,
        dtype: DType,
    },
    /// `layer_norm_vjp` with a weight and a bias: `dx`, `dweight` and `dbias`.
    LayerNormVjp {
        rows: usize,
        dim: usize,
        dtype: DType,
    },
    /// `rope_vjp` with the forward case's arguments.
    RopeVjp {
        shape: [usize; 4],
        dtype: DType,
    },
    /// `cross_entropy` over `[rows, vocab]` logits with int32 targets: the per-row losses.
    CrossEntropy {
        rows: usize,
        vocab: usize,
        dtype: DType,
    },
    /// `cross_entropy_vjp` with a per-row cotangent: `dlogits`.
    CrossEntropyVjp {
        rows: usize,
        vocab: usize,
        dtype: DType,
    },
    /// `cross_entropy_fused` with the mean reduction: the loss and `dlogits` in one pass.
    /// With `in_place`, `cross_entropy_fused_in_place`: each call takes the previous call's
    /// `dlogits` as its logits (the first the case's random logits), so every call writes
    /// over a buffer it owns and nothing is copied between calls.
    CrossEntropyFused {
        rows: usize,
        vocab: usize,
        dtype: DType,
        in_place: bool,
    },
    /// `gated_delta_update` over `[B, T, Hk, Dk]` keys, `[B, T, Hv, Dv]` values, a scalar
    /// decay per step and head, and an initial state: `out` and the final state.
    GatedDelta(Gdn),
    /// `gated_delta_update_vjp` with cotangents for `out` and the state: every gradient.
    GatedDeltaVjp(Gdn),
    Sdpa {
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        q_len: usize,
        kv_len: usize,
        head_dim: usize,
        dtype: DType,
        causal: bool,
    },
    /// `scaled_dot_product_attention_vjp` (dq, dk, dv) over the saved output and
    /// log-sum-exp of the forward, made with the inputs.
    SdpaVjp {
        batch: usize,
        heads: usize,
        len: usize,
        head_dim: usize,
        dtype: DType,
        causal: bool,
    },
    /// `merge_attention_states` of two `[B, H, T, D]` parts with their float32
    /// log-sum-exps: the merged output and log-sum-exp.
    MergeStates {
        batch: usize,
        heads: usize,
        len: usize,
        head_dim: usize,
        dtype: DType,
    },
    /// `parallel::ring_attention` with `world` threads as ranks (`ThreadRing`) over the
    /// shards of one sequence (load-balanced when causal): the gathered output. Timed on
    /// the CPU only.
    RingAttention {
        world: usize,
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        len: usize,
        head_dim: usize,
        dtype: DType,
        causal: bool,
    },
}

/// Context parallelism's rows: the merge of two attention parts (memory-bound, against the
/// copy bandwidth), and on the CPU ring attention over four threads as ranks, causal (and,
/// outside `quick`, without a mask) against the GEMM rate.
pub fn context_parallel_cases(quick: bool, gpu: bool) -> Vec<Case> {
    let mut v = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        v.push(Case::MergeStates {
            batch: 1,
            heads: 32,
            len: 4096,
            head_dim: 128,
            dtype,
        });
    }
    if !gpu {
        let causals: &[bool] = if quick { &[true] } else { &[true, false] };
        for &causal in causals {
            v.push(Case::RingAttention {
                world: 4,
                batch: 1,
                q_heads: 8,
                kv_heads: 2,
                len: 2048,
                head_dim: 64,
                dtype: DType::F32,
                causal,
            });
        }
    }
    v
}

/// The sizes of a `gated_delta_update` case.
#[derive(Clone, Copy, Debug)]
pub struct Gdn {
    pub batch: usize,
    pub len: usize,
    pub k_heads: usize,
    pub v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub dtype: DType,
}

impl Gdn {
    /// State elements of one sequence: `B * Hv * Dv * Dk`.
    fn state(&self) -> usize {
        self.batch * self.v_heads * self.v_dim * self.k_dim
    }

    /// Elements of q, k, v, gamma and beta read and of the output written, over every step.
    fn step_elements(&self) -> usize {
        let per_step =
            2 * self.k_heads * self.k_dim + 2 * self.v_heads * self.v_dim + 2 * self.v_heads;
        self.batch * self.len * per_step
    }
}

/// Attention prefill on the tensor cores, timed only on a GPU (far too slow for the CPU):
/// B=4, H=32, T=4096, D=128 in bf16, without a mask and causal.
pub fn gpu_prefill_cases() -> Vec<Case> {
    [false, true]
        .into_iter()
        .map(|causal| Case::Sdpa {
            batch: 4,
            q_heads: 32,
            kv_heads: 32,
            q_len: 4096,
            kv_len: 4096,
            head_dim: 128,
            dtype: DType::BF16,
            causal,
        })
        .collect()
}

type RmsNormFn = fn(&Array, Option<&Array>, f32) -> Result<Array>;
type LayerNormFn = fn(&Array, Option<&Array>, Option<&Array>, f32) -> Result<Array>;
type RopeFn =
    fn(&Array, i32, bool, Option<f32>, f32, RopeOffset<'_>, Option<&Array>) -> Result<Array>;
type SdpaFn = fn(&Array, &Array, &Array, f32, Mask<'_>, Option<&Array>) -> Result<Array>;
type RmsNormVjpFn = fn(&Array, Option<&Array>, f32, &Array) -> Result<(Array, Option<Array>)>;
/// The attention backward over a case's inputs `[q, k, v, d_out, out, lse]`.
type SdpaVjpFn = fn(&[Array], f32, Mask<'_>) -> Result<(Array, Array, Array, Option<Array>)>;
type CrossEntropyFn = fn(&Array, &Array) -> Result<Array>;
type CrossEntropyVjpFn = fn(&Array, &Array, &CrossEntropyOptions, &Array) -> Result<Array>;
type CrossEntropyFusedFn = fn(&Array, &Array, &CrossEntropyOptions) -> Result<(Array, Array)>;
type GatedDeltaFn = fn(
    &Array,
    &Array,
    &Array,
    &Array,
    &Array,
    Option<&Array>,
    Option<&Array>,
) -> Result<(Array, Array)>;
type GatedDeltaVjpFn = fn(
    &Array,
    &Array,
    &Array,
    &Array,
    &Array,
    Option<&Array>,
    Option<&Array>,
    &Array,
    Option<&Array>,
) -> Result<GatedDeltaGrads>;
type LayerNormVjpFn = fn(
    &Array,
    Option<&Array>,
    Option<&Array>,
    f32,
    &Array,
) -> Result<(Array, Option<Array>, Option<Array>)>;

/// One implementation of the ops: the library's `fast` functions or the float64 oracle.
struct Ops {
    rms_norm: RmsNormFn,
    layer_norm: LayerNormFn,
    rope: RopeFn,
    sdpa: SdpaFn,
    rms_norm_vjp: RmsNormVjpFn,
    layer_norm_vjp: LayerNormVjpFn,
    rope_vjp: RopeFn,
    sdpa_vjp: SdpaVjpFn,
    cross_entropy: CrossEntropyFn,
    cross_entropy_vjp: CrossEntropyVjpFn,
    cross_entropy_fused: CrossEntropyFusedFn,
    gated_delta: GatedDeltaFn,
    gated_delta_vjp: GatedDeltaVjpFn,
    merge: MergeFn,
    ring: RingFn,
}

/// `fast::scaled_dot_product_attention_vjp` over the saved output and log-sum-exp.
fn fast_sdpa_vjp(a: &[Array], scale: f32, mask: Mask<'_>) -> SdpaVjpResult {
    fast::scaled_dot_product_attention_vjp(
        &a[0], &a[1], &a[2], scale, mask, None, &a[4], &a[5], &a[3],
    )
}

/// The float64 oracle's backward (it recomputes the output and the probabilities).
fn reference_sdpa_vjp(a: &[Array], scale: f32, mask: Mask<'_>) -> SdpaVjpResult {
    reference::scaled_dot_product_attention_vjp(&a[0], &a[1], &a[2], scale, mask, None, &a[3])
}

type SdpaVjpResult = Result<(Array, Array, Array, Option<Array>)>;

type MergeFn = fn(&Array, &Array, &Array, &Array) -> Result<(Array, Array)>;
/// Ring attention over a case's inputs `[q, k, v, then q, k, v of each rank]`: `(world,
/// scale, causal)`, the gathered output.
type RingFn = fn(&[Array], usize, f32, bool) -> Result<Array>;

/// `parallel::ring_attention` on `world` threads, one per rank, each with its shards
/// (`a[3 + 3r..6 + 3r]`), the outputs gathered into sequence order.
fn fast_ring(a: &[Array], world: usize, scale: f32, causal: bool) -> Result<Array> {
    let ranks = ThreadRing::new(world)?;
    let outs = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let x = &a[3 + 3 * r..6 + 3 * r];
                s.spawn(move || {
                    ring_attention(&comm, &x[0], &x[1], &x[2], scale, causal, None).map(|o| o.0)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ferrofast::Error::InvalidArgument("a rank panicked".into()))
                })
            })
            .collect::<Result<Vec<_>>>()
    })?;
    gather_sequence(&outs, causal)
}

/// The float64 oracle's attention over the whole sequence.
fn reference_ring(a: &[Array], _world: usize, scale: f32, causal: bool) -> Result<Array> {
    let mask = if causal { Mask::Causal } else { Mask::None };
    reference::scaled_dot_product_attention(&a[0], &a[1], &a[2], scale, mask, None)
}

const FAST: Ops = Ops {
    rms_norm: fast::rms_norm,
    layer_norm: fast::layer_norm,
    rope: fast::rope,
    sdpa: fast::scaled_dot_product_attention,
    rms_norm_vjp: fast::rms_norm_vjp,
    layer_norm_vjp: fast::layer_norm_vjp,
    rope_vjp: fast::rope_vjp,
    sdpa_vjp: fast_sdpa_vjp,
    cross_entropy: fast::cross_entropy,
    cross_entropy_vjp: fast::cross_entropy_vjp,
    cross_entropy_fused: fast::cross_entropy_fused,
    gated_delta: fast::gated_delta_update,
    gated_delta_vjp: fast::gated_delta_update_vjp,
    merge: fast::merge_attention_states,
    ring: fast_ring,
};

const REFERENCE: Ops = Ops {
    rms_norm: reference::rms_norm,
    layer_norm: reference::layer_norm,
    rope: reference::rope,
    sdpa: reference::scaled_dot_product_attention,
    rms_norm_vjp: reference::rms_norm_vjp,
    layer_norm_vjp: reference::layer_norm_vjp,
    rope_vjp: reference::rope_vjp,
    sdpa_vjp: reference_sdpa_vjp,
    cross_entropy: reference::cross_entropy,
    cross_entropy_vjp: reference::cross_entropy_vjp,
    cross_entropy_fused: reference::cross_entropy_fused,
    gated_delta: reference::gated_delta_update,
    gated_delta_vjp: reference::gated_delta_update_vjp,
    merge: reference::merge_attention_states,
    ring: reference_ring,
};

/// The options of the training bench cases: PyTorch's defaults (`ignore_index = -100`,
/// mean over the rows not ignored).
const TRAINING: CrossEntropyOptions = CrossEntropyOptions {
    ignore_index: Some(-100),
    label_smoothing: 0.0,
    z_loss: 0.0,
    reduction: Reduction::Mean,
};

/// Seeded class indices in `[0, vocab)` (int32) on `device`.
fn class_targets(rows: usize, vocab: usize, seed: u64, device: &Device) -> Result<Array> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let t: Vec<i32> = (0..rows)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab.max(1) as u64) as i32
        })
        .collect();
    Array::from_vec(t, &[rows])?.to_device(device)
}

/// Inputs made once per case, reused across timed repetitions.
pub struct Inputs {
    arrays: Vec<Array>,
    /// The in-place cross-entropy case's logits for its next call (its last `dlogits`).
    carry: std::sync::Mutex<Option<Array>>,
}

/// Whether a case is limited by memory traffic or by arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Memory,
    Compute,
}

impl Case {
    /// Short op name.
    pub fn op(&self) -> &'static str {
        match self {
            Case::RmsNorm { .. } => "rms_norm",
            Case::LayerNorm { .. } => "layer_norm",
            Case::Rope { .. } => "rope",
            Case::RmsNormVjp { .. } => "rms_norm_vjp",
            Case::LayerNormVjp { .. } => "layer_norm_vjp",
            Case::RopeVjp { .. } => "rope_vjp",
            Case::CrossEntropy { .. } => "cross_entropy",
            Case::CrossEntropyVjp { .. } => "cross_entropy_vjp",
            Case::CrossEntropyFused {
                in_place: false, ..
            } => "cross_entropy_fused",
            Case::CrossEntropyFused { in_place: true, .. } => "cross_entropy_fused_in_place",
            Case::GatedDelta(_) => "gated_delta",
            Case::GatedDeltaVjp(_) => "gated_delta_vjp",
            Case::MergeStates { .. } => "merge_attention_states",
            Case::RingAttention { causal: false, .. } => "ring_attention",
            Case::RingAttention { causal: true, .. } => "ring_attention_causal",
            Case::SdpaVjp { causal: false, .. } => "sdpa_vjp",
            Case::SdpaVjp { causal: true, .. } => "sdpa_causal_vjp",
            Case::Sdpa {
                q_len, causal: c, ..
            } => match (*q_len <= 8, *c) {
                (true, _) => "sdpa_decode",
                (false, true) => "sdpa_causal",
                (false, false) => "sdpa",
            },
        }
    }

    /// Human-readable shape.
    pub fn shape(&self) -> String {
        match self {
            Case::RmsNorm { rows, dim, .. }
            | Case::LayerNorm { rows, dim, .. }
            | Case::RmsNormVjp { rows, dim, .. }
            | Case::LayerNormVjp { rows, dim, .. } => format!("[{rows},{dim}]"),
            Case::CrossEntropy { rows, vocab, .. }
            | Case::CrossEntropyVjp { rows, vocab, .. }
            | Case::CrossEntropyFused { rows, vocab, .. } => format!("[{rows},{vocab}]"),
            Case::Rope { shape, .. } | Case::RopeVjp { shape, .. } => {
                format!("{shape:?}").replace(' ', "")
            }
            Case::Sdpa {
                batch,
                q_heads,
                kv_heads,
                q_len,
                kv_len,
                head_dim,
                ..
            } => format!("B{batch} H{q_heads}/{kv_heads} T{q_len}x{kv_len} D{head_dim}"),
            Case::SdpaVjp {
                batch,
                heads,
                len,
                head_dim,
                ..
            } => format!("B{batch} H{heads}/{heads} T{len}x{len} D{head_dim}"),
            Case::GatedDelta(g) | Case::GatedDeltaVjp(g) => format!(
                "B{} T{} H{}/{} D{}x{}",
                g.batch, g.len, g.k_heads, g.v_heads, g.k_dim, g.v_dim
            ),
            Case::MergeStates {
                batch,
                heads,
                len,
                head_dim,
                ..
            } => format!("B{batch} H{heads} T{len} D{head_dim}"),
            Case::RingAttention {
                world,
                batch,
                q_heads,
                kv_heads,
                len,
                head_dim,
                ..
            } => format!("R{world} B{batch} H{q_heads}/{kv_heads} T{len} D{head_dim}"),
        }
    }

    /// Element type of the inputs.
    pub fn dtype(&self) -> DType {
        match self {
            Case::RmsNorm { dtype, .. }
            | Case::LayerNorm { dtype, .. }
            | Case::Rope { dtype, .. }
            | Case::RmsNormVjp { dtype, .. }
            | Case::LayerNormVjp { dtype, .. }
            | Case::RopeVjp { dtype, .. }
            | Case::CrossEntropy { dtype, .. }
            | Case::CrossEntropyVjp { dtype, .. }
            | Case::CrossEntropyFused { dtype, .. }
            | Case::Sdpa { dtype, .. }
            | Case::SdpaVjp { dtype, .. }
            | Case::MergeStates { dtype, .. }
            | Case::RingAttention { dtype, .. } => *dtype,
            Case::GatedDelta(g) | Case::GatedDeltaVjp(g) => g.dtype,
        }
    }

    /// Whether the case starts threads of its own (ring attention's ranks, which use the
    /// global rayon pool), so that a smaller installed pool would not limit it: such a case
    /// is timed at the machine's thread count only.
    pub fn runs_own_threads(&self) -> bool {
        matches!(self, Case::RingAttention { .. })
    }

    /// What limits the op.
    pub fn bound(&self) -> Bound {
        match self {
            Case::Sdpa { q_len, .. } if *q_len > 8 => Bound::Compute,
            Case::SdpaVjp { .. } | Case::RingAttention { .. } => Bound::Compute,
            Case::GatedDelta(g) | Case::GatedDeltaVjp(g) if g.len > 1 => Bound::Compute,
            _ => Bound::Memory,
        }
    }

    /// Bytes that must move: every input read once and the output written once (a norm's
    /// backward: `x` and the cotangent read, `dx` written; the weight-sized vectors are
    /// negligible). Cross-entropy: the logits read (and `dlogits` written by the backward and
    /// fused passes) plus the int32 targets and f32 losses. For decode attention, the K and
    /// V bytes (what the target counts).
    pub fn bytes(&self) -> f64 {
        let es = self.dtype().size() as f64;
        match self {
            Case::RmsNorm { rows, dim, .. } | Case::LayerNorm { rows, dim, .. } => {
                2.0 * (*rows * *dim) as f64 * es
            }
            Case::RmsNormVjp { rows, dim, .. } | Case::LayerNormVjp { rows, dim, .. } => {
                3.0 * (*rows * *dim) as f64 * es
            }
            Case::Rope { shape, .. } | Case::RopeVjp { shape, .. } => {
                2.0 * shape.iter().product::<usize>() as f64 * es
            }
            Case::CrossEntropy { rows, vocab, .. } => {
                (*rows * *vocab) as f64 * es + 8.0 * *rows as f64
            }
            Case::CrossEntropyVjp { rows, vocab, .. }
            | Case::CrossEntropyFused { rows, vocab, .. } => {
                2.0 * (*rows * *vocab) as f64 * es + 8.0 * *rows as f64
            }
            Case::Sdpa {
                batch,
                kv_heads,
                kv_len,
                head_dim,
                ..
            } => 2.0 * (*batch * *kv_heads * *kv_len * *head_dim) as f64 * es,
            // Compute-bound: q, k, v, out and d_out read, dq, dk, dv written.
            Case::SdpaVjp {
                batch,
                heads,
                len,
                head_dim,
                ..
            } => 8.0 * (*batch * *heads * *len * *head_dim) as f64 * es,
            // The f32 state read and written once; q, k, v, gamma, beta read, out written.
            Case::GatedDelta(g) => 8.0 * g.state() as f64 + g.step_elements() as f64 * es,
            // Both parts read and the result written; the three f32 log-sum-exps.
            Case::MergeStates {
                batch,
                heads,
                len,
                head_dim,
                ..
            } => {
                let rows = (*batch * *heads * *len) as f64;
                3.0 * rows * *head_dim as f64 * es + 3.0 * 4.0 * rows
            }
            // Compute-bound: q, k, v read and the output written once.
            Case::RingAttention {
                batch,
                q_heads,
                kv_heads,
                len,
                head_dim,
                ..
            } => 2.0 * ((*q_heads + *kv_heads) * *batch * *len * *head_dim) as f64 * es,
            // The state, its gradient and the initial state's gradient; the inputs and their
            // gradients.
            Case::GatedDeltaVjp(g) => 12.0 * g.state() as f64 + 2.0 * g.step_elements() as f64 * es,
        }
    }

    /// Floating-point operations (attention: 4·B·H·T_q·T_kv·D, halved for causal square; its
    /// backward 2.5 times its forward's, the usual count).
    pub fn flops(&self) -> f64 {
        match self {
            Case::SdpaVjp {
                batch,
                heads,
                len,
                head_dim,
                dtype,
                causal,
            } => {
                let fwd = Case::Sdpa {
                    batch: *batch,
                    q_heads: *heads,
                    kv_heads: *heads,
                    q_len: *len,
                    kv_len: *len,
                    head_dim: *head_dim,
                    dtype: *dtype,
                    causal: *causal,
                };
                2.5 * fwd.flops()
            }
            // The recurrence: 7 flops per state element and step forward (decay, two dot
            // products, the rank-one update); 17 for the backward's own arithmetic (the
            // recomputed forward not counted).
            Case::GatedDelta(g) => 7.0 * (g.state() * g.len) as f64,
            // The attention of the whole sequence, which the ranks share.
            Case::RingAttention {
                batch,
                q_heads,
                kv_heads,
                len,
                head_dim,
                dtype,
                causal,
                ..
            } => Case::Sdpa {
                batch: *batch,
                q_heads: *q_heads,
                kv_heads: *kv_heads,
                q_len: *len,
                kv_len: *len,
                head_dim: *head_dim,
                dtype: *dtype,
                causal: *causal,
            }
            .flops(),
            Case::GatedDeltaVjp(g) => 17.0 * (g.state() * g.len) as f64,
            Case::Sdpa {
                batch,
                q_heads,
                q_len,
                kv_len,
                head_dim,
                causal,
                ..
            } => {
                let full = 4.0 * (*batch * *q_heads * *q_len * *kv_len * *head_dim) as f64;
                if *causal && q_len == kv_len {
                    full / 2.0
                } else {
                    full
                }
            }
            _ => 0.0,
        }
    }

    /// Random inputs on `device` (seeded; never zeros).
    pub fn inputs(&self, device: &Device, seed: u64) -> Result<Inputs> {
        let dt = self.dtype();
        let arrays = match self {
            // Norms: x, weight, bias, and (backward) the cotangent.
            Case::RmsNorm { rows, dim, .. }
            | Case::LayerNorm { rows, dim, .. }
            | Case::RmsNormVjp { rows, dim, .. }
            | Case::LayerNormVjp { rows, dim, .. } => {
                let mut v = vec![
                    Array::randn(&[*rows, *dim], dt, seed, device)?,
                    Array::uniform(&[*dim], 0.5, 1.5, dt, seed + 1, device)?,
                    Array::randn(&[*dim], dt, seed + 2, device)?,
                ];
                if matches!(self, Case::RmsNormVjp { .. } | Case::LayerNormVjp { .. }) {
                    v.push(Array::randn(&[*rows, *dim], dt, seed + 3, device)?);
                }
                v
            }
            Case::Rope { shape, .. } | Case::RopeVjp { shape, .. } => {
                vec![Array::randn(shape, dt, seed, device)?]
            }
            // Logits, targets and (backward) a per-row cotangent.
            Case::CrossEntropy { rows, vocab, .. }
            | Case::CrossEntropyVjp { rows, vocab, .. }
            | Case::CrossEntropyFused { rows, vocab, .. } => vec![
                Array::randn(&[*rows, *vocab], dt, seed, device)?,
                class_targets(*rows, *vocab, seed + 1, device)?,
                Array::uniform(&[*rows], 0.5, 1.5, DType::F32, seed + 2, device)?,
            ],
            Case::Sdpa {
                batch,
                q_heads,
                kv_heads,
                q_len,
                kv_len,
                head_dim,
                ..
            } => vec![
                Array::randn(&[*batch, *q_heads, *q_len, *head_dim], dt, seed, device)?,
                Array::randn(
                    &[*batch, *kv_heads, *kv_len, *head_dim],
                    dt,
                    seed + 1,
                    device,
                )?,
                Array::randn(
                    &[*batch, *kv_heads, *kv_len, *head_dim],
                    dt,
                    seed + 2,
                    device,
                )?,
            ],
            // q, k (L2-normalised rows), v, gamma in (0.5, 1), beta in (0, 1), the initial
            // state, and (backward) the cotangents of out and the state.
            Case::GatedDelta(g) | Case::GatedDeltaVjp(g) => {
                let qk = [g.batch, g.len, g.k_heads, g.k_dim];
                let heads = [g.batch, g.len, g.v_heads];
                let vshape = [g.batch, g.len, g.v_heads, g.v_dim];
                let sshape = [g.batch, g.v_heads, g.v_dim, g.k_dim];
                let k = Array::randn(&qk, DType::F32, seed + 1, &Device::Cpu)?;
                let norm = 1.0 / (g.k_dim as f64).sqrt();
                let k = Array::from_vec(
                    k.to_vec::<f32>()?
                        .into_iter()
                        .map(|x| (f64::from(x) * norm) as f32)
                        .collect(),
                    &qk,
                )?;
                let mut v = vec![
                    Array::randn(&qk, dt, seed, device)?,
                    k.astype(dt)?.to_device(device)?,
                    Array::randn(&vshape, dt, seed + 2, device)?,
                    Array::uniform(&heads, 0.5, 1.0, dt, seed + 3, device)?,
                    Array::uniform(&heads, 0.05, 0.95, dt, seed + 4, device)?,
                    Array::randn(&sshape, DType::F32, seed + 5, device)?,
                ];
                if matches!(self, Case::GatedDeltaVjp(_)) {
                    v.push(Array::randn(&vshape, dt, seed + 6, device)?);
                    v.push(Array::randn(&sshape, DType::F32, seed + 7, device)?);
                }
                v
            }
            // Two parts' outputs, each followed by its log-sum-exp (uniform in [-4, 4)).
            Case::MergeStates {
                batch,
                heads,
                len,
                head_dim,
                ..
            } => {
                let shape = [*batch, *heads, *len, *head_dim];
                vec![
                    Array::randn(&shape, dt, seed, device)?,
                    Array::uniform(&shape[..3], -4.0, 4.0, DType::F32, seed + 1, device)?,
                    Array::randn(&shape, dt, seed + 2, device)?,
                    Array::uniform(&shape[..3], -4.0, 4.0, DType::F32, seed + 3, device)?,
                ]
            }
            // The whole q, k, v, then each rank's shards of them.
            Case::RingAttention {
                world,
                batch,
                q_heads,
                kv_heads,
                len,
                head_dim,
                causal,
                ..
            } => {
                let mut v = vec![
                    Array::randn(&[*batch, *q_heads, *len, *head_dim], dt, seed, device)?,
                    Array::randn(&[*batch, *kv_heads, *len, *head_dim], dt, seed + 1, device)?,
                    Array::randn(&[*batch, *kv_heads, *len, *head_dim], dt, seed + 2, device)?,
                ];
                for r in 0..*world {
                    for i in 0..3 {
                        v.push(shard_sequence(&v[i], *world, r, *causal)?);
                    }
                }
                v
            }
            // q, k, v, d_out, then the forward's output and log-sum-exp.
            Case::SdpaVjp {
                batch,
                heads,
                len,
                head_dim,
                causal,
                ..
            } => {
                let shape = [*batch, *heads, *len, *head_dim];
                let mut v = Vec::new();
                for i in 0..4 {
                    v.push(Array::randn(&shape, dt, seed + i, device)?);
                }
                let (out, lse) = fast::scaled_dot_product_attention_with_lse(
                    &v[0],
                    &v[1],
                    &v[2],
                    1.0 / (*head_dim as f32).sqrt(),
                    if *causal { Mask::Causal } else { Mask::None },
                    None,
                )?;
                v.push(out);
                v.push(lse);
                v
            }
        };
        Ok(Inputs {
            arrays,
            carry: std::sync::Mutex::new(None),
        })
    }

    /// Runs the op once; its outputs (one, or a backward pass's gradients).
    pub fn run(&self, inputs: &Inputs) -> Result<Vec<Array>> {
        if let Case::CrossEntropyFused { in_place: true, .. } = self {
            let a = &inputs.arrays;
            let mut carry = inputs.carry.lock().map_err(|_| {
                ferrofast::Error::InvalidArgument("the in-place case's state is poisoned".into())
            })?;
            let logits = match carry.take() {
                Some(x) => x,
                None => a[0].copy()?,
            };
            let (loss, dlogits) = fast::cross_entropy_fused_in_place(logits, &a[1], &TRAINING)?;
            // The caller drops the returned handle before the next call, so the carried one
            // is then the buffer's only handle again.
            *carry = Some(dlogits.clone());
            return Ok(vec![loss, dlogits]);
        }
        self.call(&FAST, &inputs.arrays)
    }

    /// The float64 oracle on the same inputs (brought to the CPU).
    pub fn reference(&self, inputs: &Inputs) -> Result<Vec<Array>> {
        let a: Vec<Array> = inputs
            .arrays
            .iter()
            .map(|x| x.to_device(&Device::Cpu))
            .collect::<Result<_>>()?;
        self.call(&REFERENCE, &a)
    }

    /// The case's call, made through one implementation of the ops.
    fn call(&self, ops: &Ops, a: &[Array]) -> Result<Vec<Array>> {
        let one = match self {
            Case::RmsNorm { .. } => (ops.rms_norm)(&a[0], Some(&a[1]), 1e-5),
            Case::LayerNorm { .. } => (ops.layer_norm)(&a[0], Some(&a[1]), Some(&a[2]), 1e-5),
            Case::RmsNormVjp { .. } => {
                let (dx, dw) = (ops.rms_norm_vjp)(&a[0], Some(&a[1]), 1e-5, &a[3])?;
                return Ok([Some(dx), dw].into_iter().flatten().collect());
            }
            Case::LayerNormVjp { .. } => {
                let (dx, dw, db) =
                    (ops.layer_norm_vjp)(&a[0], Some(&a[1]), Some(&a[2]), 1e-5, &a[3])?;
                return Ok([Some(dx), dw, db].into_iter().flatten().collect());
            }
            Case::SdpaVjp {
                head_dim, causal, ..
            } => {
                let mask = if *causal { Mask::Causal } else { Mask::None };
                let (dq, dk, dv, _) = (ops.sdpa_vjp)(a, 1.0 / (*head_dim as f32).sqrt(), mask)?;
                return Ok(vec![dq, dk, dv]);
            }
            Case::MergeStates { .. } => {
                let (out, lse) = (ops.merge)(&a[0], &a[1], &a[2], &a[3])?;
                return Ok(vec![out, lse]);
            }
            Case::RingAttention {
                world,
                head_dim,
                causal,
                ..
            } => (ops.ring)(a, *world, 1.0 / (*head_dim as f32).sqrt(), *causal),
            Case::CrossEntropy { .. } => (ops.cross_entropy)(&a[0], &a[1]),
            Case::CrossEntropyVjp { .. } => {
                (ops.cross_entropy_vjp)(&a[0], &a[1], &CrossEntropyOptions::default(), &a[2])
            }
            Case::CrossEntropyFused { .. } => {
                let (loss, dlogits) = (ops.cross_entropy_fused)(&a[0], &a[1], &TRAINING)?;
                return Ok(vec![loss, dlogits]);
            }
            Case::GatedDelta(_) => {
                let (out, state) =
                    (ops.gated_delta)(&a[0], &a[1], &a[2], &a[3], &a[4], Some(&a[5]), None)?;
                return Ok(vec![out, state]);
            }
            Case::GatedDeltaVjp(_) => {
                let g = (ops.gated_delta_vjp)(
                    &a[0],
                    &a[1],
                    &a[2],
                    &a[3],
                    &a[4],
                    Some(&a[5]),
                    None,
                    &a[6],
                    Some(&a[7]),
                )?;
                return Ok([g.dq, g.dk, g.dv, g.dgamma, g.dbeta]
                    .into_iter()
                    .chain(g.dstate0)
                    .collect());
            }
            Case::Rope { shape, .. } | Case::RopeVjp { shape, .. } => {
                let rope = if matches!(self, Case::Rope { .. }) {
                    ops.rope
                } else {
                    ops.rope_vjp
                };
                rope(
                    &a[0],
                    shape[3] as i32,
                    false,
                    Some(10000.0),
                    1.0,
                    RopeOffset::Int(7),
                    None,
                )
            }
            Case::Sdpa {
                head_dim, causal, ..
            } => (ops.sdpa)(
                &a[0],
                &a[1],
                &a[2],
                1.0 / (*head_dim as f32).sqrt(),
                if *causal { Mask::Causal } else { Mask::None },
                None,
            ),
        };
        one.map(|out| vec![out])
    }
}
