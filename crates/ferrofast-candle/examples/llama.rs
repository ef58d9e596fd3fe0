//! candle-transformers' Llama against the same model with its RMS norms, rope and attention
//! on ferrofast (everything else, the projections and the MLP, stays candle's), with the
//! same seeded random weights: the logits of a prefill and of the decode steps after it
//! must agree within the dtype's tolerance, and both paths are timed.
//!
//! ```text
//! cargo run --release -p ferrofast-candle --features example --example llama            # CPU, f32
//! cargo run --release -p ferrofast-candle --features example,cuda --example llama -- --cuda # GPU, bf16
//! ```
//! Options: `--cuda`, `--dtype f32|bf16|f16`, `--prompt N` (prefill tokens, default 128),
//! `--decode N` (decode steps, default 32), `--layers N`, `--json PATH` (write the results).
//! Exits non-zero when the two paths disagree.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Embedding, Linear, VarBuilder};
use candle_transformers::models::llama as cl;
use ferrofast_candle as ffc;

struct Args {
    cuda: bool,
    dtype: DType,
    prompt: usize,
    decode: usize,
    layers: usize,
    json: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        cuda: false,
        dtype: DType::F32,
        prompt: 128,
        decode: 32,
        layers: 4,
        json: None,
    };
    let mut dtype_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| candle_core::Error::Msg(format!("{flag} needs a value")))
        };
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|e| candle_core::Error::Msg(format!("bad number {v}: {e}")))
        };
        match flag.as_str() {
            "--cuda" => a.cuda = true,
            "--dtype" => {
                dtype_given = true;
                a.dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => return Err(candle_core::Error::Msg(format!("unknown dtype {other}"))),
                }
            }
            "--prompt" => a.prompt = number(value()?)?,
            "--decode" => a.decode = number(value()?)?,
            "--layers" => a.layers = number(value()?)?,
            "--json" => a.json = Some(value()?),
            other => return Err(candle_core::Error::Msg(format!("unknown option {other}"))),
        }
    }
    if a.cuda && !dtype_given {
        a.dtype = DType::BF16;
    }
    Ok(a)
}

fn config(layers: usize) -> cl::Config {
    cl::LlamaConfig {
        hidden_size: 1024,
        intermediate_size: 2816,
        vocab_size: 8192,
        num_hidden_layers: layers,
        num_attention_heads: 16,
        num_key_value_heads: Some(4),
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 4096,
        tie_word_embeddings: Some(false),
    }
    .into_config(false)
}

/// Seeded values in [-scale, scale) (a 64-bit LCG).
fn seeded(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// The model's weights under candle-transformers' names: linear layers scaled by
/// `1/sqrt(fan_in)`, norm weights around 1 (so a wrong weight shows).
fn weights(cfg: &cl::Config, dtype: DType, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let hd = h / cfg.num_attention_heads;
    let kv = hd * cfg.num_key_value_heads;
    let mut shapes: Vec<(String, Vec<usize>, f32)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
            1.0,
        ),
        (
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
            1.0 / (h as f32).sqrt(),
        ),
        ("model.norm.weight".into(), vec![h], 0.0),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let lin = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        shapes.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![h, h], lin(h)),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h], lin(h)),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h], lin(h)),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, h], lin(h)),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h], lin(h)),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h], lin(h)),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i], lin(i)),
            (format!("{p}.input_layernorm.weight"), vec![h], 0.0),
            (format!("{p}.post_attention_layernorm.weight"), vec![h], 0.0),
        ]);
    }
    let mut out = HashMap::new();
    for (seed, (name, shape, scale)) in shapes.into_iter().enumerate() {
        let t = if scale == 0.0 {
            (seeded(&shape, seed as u64 + 1, 0.2)? + 1.0)?
        } else {
            seeded(&shape, seed as u64 + 1, scale)?
        };
        out.insert(name, t.to_dtype(dtype)?.to_device(dev)?);
    }
    Ok(out)
}

/// One decoder layer with ferrofast's norm, rope and attention.
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    norm_in: Tensor,
    norm_post: Tensor,
    cache: KvCache,
}

/// The Llama on ferrofast's ops, over the same weights as candle-transformers' model.
struct FerroLlama {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    theta: f32,
}

impl FerroLlama {
    fn new(cfg: &cl::Config, w: &HashMap<String, Tensor>) -> Result<Self> {
        let get = |n: &str| {
            w.get(n)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("missing weight {n}")))
        };
        let lin =
            |n: &str| -> Result<Linear> { Ok(Linear::new(get(&format!("{n}.weight"))?, None)) };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(Layer {
                    q: lin(&format!("{p}.self_attn.q_proj"))?,
                    k: lin(&format!("{p}.self_attn.k_proj"))?,
                    v: lin(&format!("{p}.self_attn.v_proj"))?,
                    o: lin(&format!("{p}.self_attn.o_proj"))?,
                    gate: lin(&format!("{p}.mlp.gate_proj"))?,
                    up: lin(&format!("{p}.mlp.up_proj"))?,
                    down: lin(&format!("{p}.mlp.down_proj"))?,
                    norm_in: get(&format!("{p}.input_layernorm.weight"))?,
                    norm_post: get(&format!("{p}.post_attention_layernorm.weight"))?,
                    cache: KvCache::new(2, 512),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FerroLlama {
            embed: Embedding::new(get("model.embed_tokens.weight")?, cfg.hidden_size),
            layers,
            norm: get("model.norm.weight")?,
            head: lin("lm_head")?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.hidden_size / cfg.num_attention_heads,
            eps: cfg.rms_norm_eps as f32,
            theta: cfg.rope_theta,
        })
    }

    /// Logits of the last position, float32 `[B, vocab]`.
    fn forward(&mut self, tokens: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let (hd, eps) = (self.head_dim, self.eps);
        let rope = ffc::RopeOptions {
            base: Some(self.theta),
            offset: ffc::Offset::Int(pos as i64),
            ..Default::default()
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let mut x = self.embed.forward(tokens)?;
        for layer in &mut self.layers {
            let h = ffc::rms_norm(&x, Some(&layer.norm_in), eps)?;
            // [B, T, H, D] projections seen as [B, H, T, D]: strided views, read in place.
            let q = layer
                .q
                .forward(&h)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?;
            let k = layer
                .k
                .forward(&h)?
                .reshape((b, t, self.kv_heads, hd))?
                .transpose(1, 2)?;
            let v = layer
                .v
                .forward(&h)?
                .reshape((b, t, self.kv_heads, hd))?
                .transpose(1, 2)?;
            let q = ffc::rope(&q, hd, &rope)?;
            let k = ffc::rope(&k, hd, &rope)?;
            // The cache is preallocated; the filled part is a strided view of it.
            let (k, v) = layer.cache.append(&k, &v.contiguous()?)?;
            let mask = if t > 1 {
                ffc::Mask::Causal
            } else {
                ffc::Mask::None
            };
            let y = ffc::scaled_dot_product_attention(&q, &k, &v, scale, mask, None)?;
            let y = y.transpose(1, 2)?.reshape((b, t, self.heads * hd))?;
            x = (layer.o.forward(&y)? + x)?;
            let h = ffc::rms_norm(&x, Some(&layer.norm_post), eps)?;
            let m = (candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (layer.down.forward(&m)? + x)?;
        }
        let x = ffc::rms_norm(&x, Some(&self.norm), eps)?;
        let x = x.i((.., t - 1, ..))?.contiguous()?;
        self.head.forward(&x)?.to_dtype(DType::F32)
    }
}

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dev = if args.cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let cfg = config(args.layers);
    let w = weights(&cfg, args.dtype, &dev)?;
    let reference = cl::Llama::load(VarBuilder::from_tensors(w.clone(), args.dtype, &dev), &cfg)?;
    let mut ours = FerroLlama::new(&cfg, &w)?;
    let b = 1;
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i * 7919 + 13) % 8192)
        .collect();
    let prompt = Tensor::from_vec(prompt, (b, args.prompt), &dev)?;
    // Tolerance on the logits (of magnitude ~1-5): the paths differ in rounding only.
    let tol = match args.dtype {
        DType::F32 => 2e-3,
        _ => 0.25,
    };

    // Warm-up (kernel compilation, allocator), on a fresh cache each.
    {
        let mut cache = cl::Cache::new(true, args.dtype, &cfg, &dev)?;
        reference.forward(&prompt.narrow(1, 0, 8)?, 0, &mut cache)?;
        ours.forward(&prompt.narrow(1, 0, 8)?, 0)?;
        for l in &mut ours.layers {
            l.cache.reset();
        }
        sync(&dev)?;
    }

    let mut cache = cl::Cache::new(true, args.dtype, &cfg, &dev)?;
    sync(&dev)?;
    let t0 = Instant::now();
    let want = reference.forward(&prompt, 0, &mut cache)?;
    sync(&dev)?;
    let ref_prefill = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let got = ours.forward(&prompt, 0)?;
    sync(&dev)?;
    let ours_prefill = t0.elapsed().as_secs_f64();
    let mut worst = max_diff(&got, &want)?;
    println!(
        "prefill {} tokens: max |logit difference| {worst:.3e}",
        args.prompt
    );

    // Greedy decode, each path fed the reference's token so both see the same sequence.
    let mut next = want.argmax(D::Minus1)?.unsqueeze(0)?;
    let (mut ref_decode, mut ours_decode) = (0.0, 0.0);
    for step in 0..args.decode {
        let pos = args.prompt + step;
        sync(&dev)?;
        let t0 = Instant::now();
        let want = reference.forward(&next, pos, &mut cache)?;
        sync(&dev)?;
        ref_decode += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let got = ours.forward(&next, pos)?;
        sync(&dev)?;
        ours_decode += t0.elapsed().as_secs_f64();
        worst = worst.max(max_diff(&got, &want)?);
        next = want.argmax(D::Minus1)?.unsqueeze(0)?;
    }
    let tps = |n: usize, s: f64| n as f64 / s;
    let report = format!(
        "{{\"device\": \"{}\", \"dtype\": \"{:?}\", \"layers\": {}, \"prompt\": {}, \"decode\": {}, \
         \"max_logit_diff\": {worst:.4e}, \"tolerance\": {tol:.1e}, \
         \"prefill_tok_s\": {{\"candle\": {:.1}, \"ferrofast\": {:.1}}}, \
         \"decode_tok_s\": {{\"candle\": {:.1}, \"ferrofast\": {:.1}}}}}",
        if args.cuda { "cuda:0" } else { "cpu" },
        args.dtype,
        args.layers,
        args.prompt,
        args.decode,
        tps(args.prompt, ref_prefill),
        tps(args.prompt, ours_prefill),
        tps(args.decode, ref_decode),
        tps(args.decode, ours_decode),
    );
    println!(
        "prefill: candle {:.1} tok/s, ferrofast {:.1} tok/s ({:.2}x)",
        tps(args.prompt, ref_prefill),
        tps(args.prompt, ours_prefill),
        ref_prefill / ours_prefill
    );
    if args.decode > 0 {
        println!(
            "decode:  candle {:.1} tok/s, ferrofast {:.1} tok/s ({:.2}x)",
            tps(args.decode, ref_decode),
            tps(args.decode, ours_decode),
            ref_decode / ours_decode
        );
    }
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, &report).map_err(candle_core::Error::wrap)?;
    }
    if worst.is_nan() || worst > tol {
        return Err(candle_core::Error::Msg(format!(
            "the paths disagree: max |logit difference| {worst} > {tol}"
        )));
    }
    Ok(())
}
