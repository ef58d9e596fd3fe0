#!/usr/bin/env python3
"""Times PyTorch on the shapes of a `ferrofast bench --json` run and prints ours over theirs.

Usage (on the GPU machine, in the same call as the bench):
    ferrofast bench --device cuda --json ours.json
    python3 scripts/torch_peer.py ours.json [--out peer.json]

PyTorch ops: torch.nn.functional.rms_norm, layer_norm, scaled_dot_product_attention (its
default choice of backend, then forced to FlashAttention-2 and to cuDNN with
torch.nn.attention.sdpa_kernel, one row each), and a rotary reference (half-split, written with tensor ops as model code
does, plus its torch.compile'd form). Times are CUDA-event medians from
triton.testing.do_bench on fresh random inputs (never zeros). A ratio below 1 means
ferrofast is faster.

Backward rows (`*_vjp`) time PyTorch autograd's backward alone: the forward runs once with
requires_grad inputs, then torch.autograd.grad(out, inputs, cotangent, retain_graph=True) is
timed, for the eager op and for its torch.compile'd form (whose backward is compiled too).

Cross-entropy rows: torch.nn.functional.cross_entropy eager and compiled (`cross_entropy`:
reduction='none'; `cross_entropy_vjp`: its backward alone; `cross_entropy_fused`: the mean
loss and the logits' gradient, forward + backward), and Liger-Kernel's Triton
LigerCrossEntropyLoss when it can be imported (its forward writes the gradient into the
logits' buffer; the GPU bundle installs a packed wheel under $GPU_WORK/pylib, which is put
on the path here).

decode_step / decode_attention / decode_append rows (the bench's KvCache decode loop): a
preallocated [B, H_kv, 4096, D] cache per keys and values, one token written with a slice
copy at position T-1 (`cache[:, :, T-1:T].copy_(new)`) and F.scaled_dot_product_attention
(enable_gqa) with one query over the cache's first T positions (views, as ours); the step is
both, the other rows one part each.

merge_attention_states rows: the merge of two attention parts by their float32
log-sum-exps written with PyTorch tensor ops (max, exp, weighted sum in float32, one cast
back, log-sum-exp), eager and torch.compile'd. ring_attention rows are CPU-only (threads as
ranks) and have no peer here.

gated_delta rows: MLX's recurrence in PyTorch tensor ops (a loop over steps, eager and, for
short sequences, compiled), and flash-linear-attention's chunked (prefill, backward) and
fused-recurrent (decode) kernels when `fla` can be imported (carry its wheel as Liger's).
"""
import json
import os
import re
import sys

import torch
import torch.nn.functional as F

try:
    from triton.testing import do_bench
except ImportError:  # fall back to CUDA events by hand
    do_bench = None

# Wheels the GPU bundle installed (scripts/gpu packs .whl/*.whl; no network there).
_pylib = os.path.join(os.environ.get("GPU_WORK", "/tmp/ferrofast-gpu"), "pylib")
if os.path.isdir(_pylib):
    sys.path.insert(0, _pylib)


def liger_cross_entropy(**kwargs):
    """Liger-Kernel's LigerCrossEntropyLoss(**kwargs), or None when it cannot be imported."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception as e:  # not installed, or an incompatible torch / triton
        print(f"liger-kernel not available ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
        return None
    return LigerCrossEntropyLoss(**kwargs)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def median_ms(fn):
    if do_bench is not None:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    for _ in range(5):
        fn()
    times = []
    for _ in range(50):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def rope_half_split(x, offset, base=10000.0):
    d = x.shape[-1]
    half = d // 2
    inv = torch.exp(-torch.arange(half, device=x.device, dtype=torch.float32) * (torch.log(torch.tensor(base)) / half))
    pos = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32) + offset
    theta = pos[:, None] * inv[None, :]
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def backward_fn(fwd, inputs, cot):
    """Times only the backward: one forward with a kept graph, then grads of `inputs`."""
    out = fwd()
    return lambda: torch.autograd.grad(out, inputs, cot, retain_graph=True)


def gated_delta_ref(q, k, v, gamma, beta, state):
    """MLX's gated delta recurrence in PyTorch tensor ops (a loop over steps, state float32,
    [B, Hv, Dv, Dk]); q, k already repeated to the value heads. Returns (out, state)."""
    outs = []
    for t in range(q.shape[1]):
        s = state * gamma[:, t, :, None, None]
        kv = torch.einsum("bhvk,bhk->bhv", s, k[:, t].float())
        delta = (v[:, t].float() - kv) * beta[:, t, :, None].float()
        state = s + delta[..., None] * k[:, t, :, None, :].float()
        outs.append(torch.einsum("bhvk,bhk->bhv", state, q[:, t].float()))
    return torch.stack(outs, 1).to(q.dtype), state


def fla_gated_delta():
    """flash-linear-attention's chunked and fused-recurrent kernels, when importable."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def gated_delta_peers(op, shape, dt, dev, g):
    """PyTorch's eager and compiled recurrence, and fla's kernels (log-space decay, state
    [B, H, K, V]: converted here, outside the timed calls)."""
    m = re.match(r"B(\d+) T(\d+) H(\d+)/(\d+) D(\d+)x(\d+)", shape)
    b, t, hk, hv, dk, dv = (int(x) for x in m.groups())
    q = torch.randn(b, t, hk, dk, device=dev, dtype=dt, generator=g)
    k = F.normalize(torch.randn(b, t, hk, dk, device=dev, dtype=torch.float32, generator=g), dim=-1).to(dt)
    v = torch.randn(b, t, hv, dv, device=dev, dtype=dt, generator=g)
    gamma = torch.rand(b, t, hv, device=dev, generator=g) * 0.5 + 0.5
    beta = torch.rand(b, t, hv, device=dev, generator=g) * 0.9 + 0.05
    s0 = torch.randn(b, hv, dv, dk, device=dev, dtype=torch.float32, generator=g)
    qr, kr = q.repeat_interleave(hv // hk, 2), k.repeat_interleave(hv // hk, 2)
    f = lambda: gated_delta_ref(qr, kr, v, gamma, beta, s0)
    fns = []
    if op == "gated_delta":
        if t <= 64:  # a launch per op and step: 70 ms a call at T = 512
            fns += [("eager", f)]
        if t <= 64:  # compiling the unrolled loop of a long prefill takes minutes
            fns.append(("compiled", torch.compile(f)))
    kernels = fla_gated_delta()
    if kernels is not None:
        chunk, recurrent = kernels
        logg = gamma.log()
        s0_fla = s0.transpose(-1, -2).contiguous()
        if op == "gated_delta":
            fla = chunk if t > 64 else recurrent
            fns.append(("fla", lambda: fla(qr, kr, v, logg, beta.to(dt), scale=1.0,
                                           initial_state=s0_fla, output_final_state=True)))
        else:
            qg, kg, vg = (x.detach().clone().requires_grad_() for x in (qr, kr, v))
            cot = torch.randn(b, t, hv, dv, device=dev, dtype=dt, generator=g)
            fwd = lambda: chunk(qg, kg, vg, logg, beta.to(dt), scale=1.0, initial_state=s0_fla,
                                output_final_state=False)[0]
            fns.append(("fla", backward_fn(fwd, (qg, kg, vg), cot)))
    return fns


def merge_states(out_a, lse_a, out_b, lse_b):
    """Two attention parts merged by their float32 log-sum-exps: (out, lse)."""
    m = torch.maximum(lse_a, lse_b)
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    s = wa + wb
    out = out_a.float() * (wa / s).unsqueeze(-1) + out_b.float() * (wb / s).unsqueeze(-1)
    return out.to(out_a.dtype), m + torch.log(s)


def peer_fns(op, shape, dtype):
    """Returns [(name, fn)] of PyTorch versions of one bench row."""
    dt = DTYPES[dtype]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    if op in ("rms_norm", "layer_norm"):
        rows, dim = (int(v) for v in re.findall(r"\d+", shape))
        x = torch.randn(rows, dim, device=dev, dtype=dt, generator=g)
        w = torch.rand(dim, device=dev, dtype=dt, generator=g) + 0.5
        b = torch.randn(dim, device=dev, dtype=dt, generator=g)
        if op == "rms_norm":
            f = lambda: F.rms_norm(x, (dim,), w, 1e-5)
        else:
            f = lambda: F.layer_norm(x, (dim,), w, b, 1e-5)
        return [("eager", f), ("compiled", torch.compile(f))]
    if op in ("rms_norm_vjp", "layer_norm_vjp"):
        rows, dim = (int(v) for v in re.findall(r"\d+", shape))
        x = torch.randn(rows, dim, device=dev, dtype=dt, generator=g).requires_grad_()
        w = (torch.rand(dim, device=dev, dtype=dt, generator=g) + 0.5).requires_grad_()
        b = torch.randn(dim, device=dev, dtype=dt, generator=g).requires_grad_()
        cot = torch.randn(rows, dim, device=dev, dtype=dt, generator=g)
        if op == "rms_norm_vjp":
            f, inputs = (lambda: F.rms_norm(x, (dim,), w, 1e-5)), (x, w)
        else:
            f, inputs = (lambda: F.layer_norm(x, (dim,), w, b, 1e-5)), (x, w, b)
        return [("eager", backward_fn(f, inputs, cot)), ("compiled", backward_fn(torch.compile(f), inputs, cot))]
    if op.startswith("cross_entropy"):
        rows, vocab = (int(v) for v in re.findall(r"\d+", shape))
        x = torch.randn(rows, vocab, device=dev, dtype=dt, generator=g)
        t = torch.randint(0, vocab, (rows,), device=dev, generator=g)
        if op == "cross_entropy":
            f = lambda: F.cross_entropy(x, t, reduction="none")
            fns = [("eager", f), ("compiled", torch.compile(f))]
            liger = liger_cross_entropy(reduction="none")
            if liger is not None:
                fns.append(("liger", lambda: liger(x, t)))
            return fns
        xg = x.requires_grad_()
        if op == "cross_entropy_vjp":
            cot = torch.rand(rows, device=dev, dtype=torch.float32, generator=g) + 0.5
            f = lambda: F.cross_entropy(xg, t, reduction="none")
            return [("eager", backward_fn(f, (xg,), cot)), ("compiled", backward_fn(torch.compile(f), (xg,), cot))]
        # cross_entropy_fused: the mean loss and the logits' gradient.
        step = lambda loss_fn: (lambda: torch.autograd.grad(loss_fn(xg, t), (xg,)))
        fns = [("eager", step(F.cross_entropy)), ("compiled", step(torch.compile(F.cross_entropy)))]
        liger = liger_cross_entropy()
        if liger is not None:
            fns.append(("liger", step(liger)))
        return fns
    if op in ("gated_delta", "gated_delta_vjp"):
        return gated_delta_peers(op, shape, dt, dev, g)
    if op == "merge_attention_states":
        b, h, t, d = (int(v) for v in re.findall(r"\d+", shape))
        oa = torch.randn(b, h, t, d, device=dev, dtype=dt, generator=g)
        ob = torch.randn(b, h, t, d, device=dev, dtype=dt, generator=g)
        la = torch.rand(b, h, t, device=dev, generator=g) * 8 - 4
        lb = torch.rand(b, h, t, device=dev, generator=g) * 8 - 4
        f = lambda: merge_states(oa, la, ob, lb)
        return [("eager", f), ("compiled", torch.compile(lambda: merge_states(oa, la, ob, lb)))]
    if op in ("decode_step", "decode_attention", "decode_append"):
        m = re.match(r"B(\d+) H(\d+)/(\d+) T1x(\d+) D(\d+)", shape)
        b, hq, hkv, t, d = (int(v) for v in m.groups())
        cap = max(t, 4096)
        kc = torch.randn(b, hkv, cap, d, device=dev, dtype=dt, generator=g)
        vc = torch.randn(b, hkv, cap, d, device=dev, dtype=dt, generator=g)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=dt, generator=g)
        kn = torch.randn(b, hkv, 1, d, device=dev, dtype=dt, generator=g)
        vn = torch.randn(b, hkv, 1, d, device=dev, dtype=dt, generator=g)

        def append():
            kc[:, :, t - 1 : t].copy_(kn)
            vc[:, :, t - 1 : t].copy_(vn)

        attend = lambda: F.scaled_dot_product_attention(q, kc[:, :, :t], vc[:, :, :t], enable_gqa=hq != hkv)

        def step():
            append()
            return attend()

        return [("eager", {"decode_step": step, "decode_attention": attend, "decode_append": append}[op])]
    if op == "rope_vjp":
        dims = [int(v) for v in re.findall(r"\d+", shape)]
        x = torch.randn(*dims, device=dev, dtype=dt, generator=g).requires_grad_()
        cot = torch.randn(*dims, device=dev, dtype=dt, generator=g)
        f = lambda: rope_half_split(x, 7)
        return [("eager", backward_fn(f, (x,), cot)), ("compiled", backward_fn(torch.compile(f), (x,), cot))]
    if op == "rope":
        dims = [int(v) for v in re.findall(r"\d+", shape)]
        x = torch.randn(*dims, device=dev, dtype=dt, generator=g)
        f = lambda: rope_half_split(x, 7)
        return [("eager", f), ("compiled", torch.compile(f))]
    if op in ("sdpa_vjp", "sdpa_causal_vjp"):
        m = re.match(r"B(\d+) H(\d+)/(\d+) T(\d+)x(\d+) D(\d+)", shape)
        b, hq, hkv, tq, tkv, d = (int(v) for v in m.groups())
        q = torch.randn(b, hq, tq, d, device=dev, dtype=dt, generator=g).requires_grad_()
        k = torch.randn(b, hkv, tkv, d, device=dev, dtype=dt, generator=g).requires_grad_()
        v = torch.randn(b, hkv, tkv, d, device=dev, dtype=dt, generator=g).requires_grad_()
        cot = torch.randn(b, hq, tq, d, device=dev, dtype=dt, generator=g)
        causal = op == "sdpa_causal_vjp"
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        fns = [("sdpa", backward_fn(fwd, (q, k, v), cot))]
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            return fns
        for name, backend in (("flash2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fns.append((name, backward_fn(fwd, (q, k, v), cot)))
            except RuntimeError as e:
                print(f"{op} {shape} {dtype}: torch {name} not run ({str(e).splitlines()[0][:60]})")
        return fns
    if op.startswith("sdpa"):
        m = re.match(r"B(\d+) H(\d+)/(\d+) T(\d+)x(\d+) D(\d+)", shape)
        b, hq, hkv, tq, tkv, d = (int(v) for v in m.groups())
        q = torch.randn(b, hq, tq, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(b, hkv, tkv, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(b, hkv, tkv, d, device=dev, dtype=dt, generator=g)
        causal = op == "sdpa_causal"
        gqa = hq != hkv
        plain = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        fns = [("sdpa", plain)]
        # One row per named backend as well: FlashAttention-2 and cuDNN.
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            return fns
        for name, backend in (("flash2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def f(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            fns.append((name, f))
        return fns
    return []


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    ours = json.load(open(sys.argv[1]))
    out_path = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    print(f"peer: torch {torch.__version__} on {torch.cuda.get_device_name()}")
    print(f"{'op':<12} {'shape':<28} {'dtype':<9} {'ours':>10} {'torch':>10} {'variant':>9} {'ours/torch':>10}")
    rows = []
    # The copy ceiling seen by PyTorch: y.copy_(x) on the bench's 256 MiB f32 buffer.
    n = 64 << 20
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    t = median_ms(lambda: y.copy_(x)) * 1e-3
    torch_copy = 2.0 * n * 4 / t / 1e9
    print(f"copy (256 MiB f32, read + write): torch {torch_copy:.0f} GB/s, ours {ours.get('copy_gbs', 0.0):.0f} GB/s")
    del x, y
    # The tensor-core ceiling seen by PyTorch: a bf16 8192^3 matmul (cuBLAS), for the
    # fraction of it the attention rows reach.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = median_ms(lambda: a @ bm) * 1e-3
    gemm_tflops = 2.0 * 8192**3 / t / 1e12
    print(f"bf16 GEMM 8192^3 (cuBLAS via torch): {gemm_tflops:.0f} TFLOP/s")
    del a, bm
    for r in ours["results"]:
        for name, fn in peer_fns(r["op"], r["shape"], r["dtype"]):
            try:
                t = median_ms(fn) * 1e-3
            except RuntimeError as e:  # a backend that does not take this shape or dtype
                print(f"{r['op']:<12} {r['shape']:<28} {r['dtype']:<9} torch {name}: not run ({str(e).splitlines()[0][:60]})")
                continue
            ratio = r["median_s"] / t
            rows.append({**r, "peer": f"torch {name}", "peer_median_s": t, "ours_over_peer": ratio})
            extra = ""
            if r.get("unit") == "TFLOP/s":
                extra = (f"  ours {r['value']:.1f} TFLOP/s ({100 * r['value'] / gemm_tflops:.0f}% of GEMM), "
                         f"torch {r['value'] * ratio:.1f} TFLOP/s")
            print(f"{r['op']:<12} {r['shape']:<28} {r['dtype']:<9} {r['median_s']*1e3:>8.3f}ms {t*1e3:>8.3f}ms {name:>9} {ratio:>10.2f}{extra}")
    if out_path:
        json.dump({"ours": ours, "torch_copy_gbs": torch_copy, "gemm_tflops": gemm_tflops, "rows": rows}, open(out_path, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
