"""Per-call cost of ferrofast's Python bridge on CUDA tensors against PyTorch's own ops, at
the shapes of a Llama layer (hidden 1024, 16 / 4 heads of 64; batch 4): prefill (1024
tokens) and decode (1 token over a 1088-token cache).

For each op two numbers, medians over repeats:
- host: the time the calling thread spends issuing one call (measured while the GPU is held
  busy by a sleep kernel, so nothing waits for it);
- total: the time per call of back-to-back calls, synchronised at the end (the larger of
  host and GPU time when the two overlap).

    python3 scripts/bridge_overhead.py [--json PATH]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as TF

import ferrofast as ff
import ferrofast.torch as fft


def per_call(fn, n, busy):
    torch.cuda.synchronize()
    if busy:
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time at 2 GHz
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / n
    return host if busy else total


def measure(fn, n=50, repeats=5):
    fn()
    torch.cuda.synchronize()
    host = statistics.median(per_call(fn, n, True) for _ in range(repeats))
    total = statistics.median(per_call(fn, n, False) for _ in range(repeats))
    return host * 1e6, total * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bf = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape):
        return torch.randn(shape, generator=g, device=dev, dtype=bf)

    b, h, hkv, d, hidden = 4, 16, 4, 64, 1024
    w = r(hidden)
    rows = []
    for phase, t, s in (("prefill", 1024, 1024), ("decode", 1, 1088)):
        x = r(b, t, hidden)
        q, k, v = r(b, h, t, d), r(b, hkv, s, d), r(b, hkv, s, d)
        offs = torch.full((b,), s - t, dtype=torch.int32, device=dev)
        cases = {
            "rms_norm": (
                lambda: ff.fast.rms_norm(x, w, 1e-5),
                lambda: fft.rms_norm(x, (hidden,), w, 1e-5),
                lambda: TF.rms_norm(x, (hidden,), w, 1e-5),
            ),
            "rope (int offset)": (
                lambda: ff.fast.rope(q, d, traditional=False, base=1e4, scale=1.0, offset=s - t),
                lambda: fft.rope(q, d, traditional=False, base=1e4, scale=1.0, offset=s - t),
                None,
            ),
            "rope (GPU offsets)": (
                lambda: ff.fast.rope(q, d, traditional=False, base=1e4, scale=1.0, offset=offs),
                lambda: fft.rope(q, d, traditional=False, base=1e4, scale=1.0, offset=offs),
                None,
            ),
            "sdpa causal gqa": (
                lambda: ff.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask="causal"),
                lambda: fft.ScaledDotProductAttentionFunction.apply(q, k, v, d**-0.5, "causal", None),
                lambda: TF.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True),
            ),
        }
        for name, (fast, autograd, peer) in cases.items():
            row = dict(phase=phase, op=name)
            row["ff.fast host_us"], row["ff.fast total_us"] = measure(fast)
            row["ferrofast.torch host_us"], row["ferrofast.torch total_us"] = measure(autograd)
            if peer is not None:
                row["torch host_us"], row["torch total_us"] = measure(peer)
            rows.append(row)
            cells = "  ".join(
                f"{k.replace('_us', '')} {v:7.1f}" for k, v in row.items() if k.endswith("_us")
            )
            print(f"{phase:7s} {name:20s} {cells}  (us per call)", flush=True)
    # Where the host time of one decode rms_norm goes, piece by piece.
    from ferrofast import _convert, _native

    x, w = r(b, 1, hidden), r(hidden)
    tx, tw = _convert.to_tensor(x), _convert.to_tensor(w)
    pieces = {
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream(0).cuda_stream,
        "raw current stream": lambda: _convert._torch_stream(0),
        "x.__dlpack__(stream=1) (torch's handshake)": lambda: x.__dlpack__(stream=1, max_version=(1, 0)),
        "capsule without handshake": lambda: _convert._torch_capsule(x),
        "capsule + import (from_dlpack)": lambda: _native.from_dlpack(_convert._torch_capsule(x), False, 0),
        "to_tensor(x)": lambda: _convert.to_tensor(x),
        "_native.rms_norm on imported tensors": lambda: _native.rms_norm(tx, tw, 1e-5),
        "_native.rms_norm + result to torch": lambda: _convert._torch_result(_native.rms_norm(tx, tw, 1e-5)),
        "ff.fast.rms_norm": lambda: ff.fast.rms_norm(x, w, 1e-5),
        "torch rms_norm": lambda: TF.rms_norm(x, (hidden,), w, 1e-5),
        "torch x * 2": lambda: x * 2,
    }
    breakdown = {}
    for name, fn in pieces.items():
        host, _ = measure(fn)
        breakdown[name] = host
        print(f"decode rms_norm piece: {name:45s} host {host:7.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=torch.cuda.get_device_name(), rows=rows, breakdown=breakdown),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
