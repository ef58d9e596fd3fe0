"""A HuggingFace Llama with ferrofast's attention, RMSNorm and rotary embedding, checked end
to end against transformers' own implementation (the same weights):

- logits (bf16): ferrofast's distance from a float32 reference is no larger than
  transformers' own bf16 distance from it (times a small factor), and the two bf16 runs
  agree within bf16 tolerance;
- greedy generation: the same tokens in float32; in bf16 the same tokens, or the first
  difference falls on a step where transformers' own top two logits are closer than the
  bf16 rounding noise measured above (a tie, which either implementation may break);
- one training step (float32, cross-entropy through ``ferrofast.torch.cross_entropy`` on
  the ferrofast side): every parameter's gradient agrees;
- prefill and decode tokens/s of both (bf16, KV cache), medians over repeats.

    python3 python/examples/llama_e2e.py                     # GPU, the issue's config
    python3 python/examples/llama_e2e.py --device cpu --small  # a quick run on the CPU

Prints one line per check and a JSON summary (``--json PATH`` also writes it); exits 1 if
a check fails. Random weights from a fixed seed; random token ids (never zeros).
"""

import argparse
import json
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as TF
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

import ferrofast
import ferrofast.torch as fft


# ----- the ferrofast modules ------------------------------------------------------------


def _rope_base(config):
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"only the default rotary embedding is replaced, not {kind!r}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    """LlamaAttention.forward with ferrofast's rope and attention (forward and backward)."""
    b, t = hidden_states.shape[:-1]
    hd = self.head_dim
    q = self.q_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
    k = self.k_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
    v = self.v_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        # One start position per sequence (the ids of a sequence are consecutive).
        offset = position_ids[:, 0].to(torch.int32).expand(b).contiguous()
    else:
        offset = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
    rope = dict(traditional=False, base=self._ff_base, scale=1.0, offset=offset)
    q = fft.rope(q, hd, **rope)
    k = fft.rope(k, hd, **rope)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    # No mask from transformers means plain causal attention; MLX's "causal" is aligned to
    # the last key, which is what a query block at the end of the cache needs.
    mask = "causal" if attention_mask is None else attention_mask
    out = fft.ScaledDotProductAttentionFunction.apply(q, k, v, float(self.scaling), mask, None)
    out = out.transpose(1, 2).reshape(b, t, -1)
    return self.o_proj(out), None


def _rms_norm_forward(self, x):
    return fft.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)


def use_ferrofast(model):
    """Replaces every attention's rope + attention and every RMSNorm of ``model`` by
    ferrofast's (in place); returns the number of modules replaced."""
    base = _rope_base(model.config)
    n = 0
    for m in model.modules():
        if isinstance(m, modeling_llama.LlamaAttention):
            m._ff_base = base
            m.forward = types.MethodType(_attention_forward, m)
            n += 1
        elif isinstance(m, modeling_llama.LlamaRMSNorm):
            m.forward = types.MethodType(_rms_norm_forward, m)
            n += 1
    return n


# ----- the model ----------------------------------------------------------------------


def make_config(small):
    size = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                num_attention_heads=16, num_key_value_heads=4)
    if small:
        size = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2)
    return LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **size,
    )


def make_models(config, device, dtype):
    """(transformers' model, ferrofast's model) with identical weights, in eval mode."""
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    ours = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(ref.state_dict())
    use_ferrofast(ours)
    return ref, ours


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- checks -------------------------------------------------------------------------


def check_logits(config, device, ids, report):
    ref32, ours32 = make_models(config, device, torch.float32)
    ref16, ours16 = make_models(config, device, torch.bfloat16)
    with torch.no_grad():
        exact = ref32(ids).logits.double()
        ours_exact = ours32(ids).logits.double()
        hf = ref16(ids).logits.double()
        ff = ours16(ids).logits.double()
    scale = exact.abs().max().item()
    f32_err = (ours_exact - exact).abs().max().item()
    hf_err = (hf - exact).abs().max().item()
    ff_err = (ff - exact).abs().max().item()
    pair_err = (ff - hf).abs().max().item()
    ok32 = f32_err <= 1e-4 * scale + 1e-5
    ok16 = ff_err <= 1.5 * hf_err + 1e-3 * scale
    okpair = pair_err <= 2.0 * hf_err + 1e-3 * scale
    report.check("logits float32: ferrofast vs transformers", ok32,
                 f"max |diff| {f32_err:.3g} (max |logit| {scale:.3g})")
    report.check("logits bf16: distance from float32, ferrofast vs transformers", ok16,
                 f"ferrofast {ff_err:.3g}, transformers {hf_err:.3g}")
    report.check("logits bf16: ferrofast vs transformers", okpair,
                 f"max |diff| {pair_err:.3g}")
    report.data["logits"] = dict(max_abs_logit=scale, f32_err=f32_err, bf16_hf_err=hf_err,
                                 bf16_ff_err=ff_err, bf16_pair_err=pair_err)
    return hf_err


def check_greedy(config, device, ids, new_tokens, tie, report):
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bf16")):
        ref, ours = make_models(config, device, dtype)
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        with torch.no_grad():
            a = ref.generate(ids, **gen)
            b = ours.generate(ids, **gen)
        ta = a.sequences[:, ids.shape[1]:]
        tb = b.sequences[:, ids.shape[1]:]
        same = torch.equal(ta, tb)
        detail = f"{ta.shape[0]} sequences x {ta.shape[1]} tokens"
        ok = same
        if not same:
            rows, cols = torch.nonzero(ta != tb, as_tuple=True)
            first = int(cols.min())
            r = int(rows[cols == first][0])
            top2 = a.logits[first][r].double().topk(2).values
            gap = float(top2[0] - top2[1])
            detail = (f"first difference at step {first} of {new_tokens} (row {r}); "
                      f"transformers' top-2 gap there {gap:.3g}")
            # A tie within the dtype's rounding noise may break either way (bf16 only).
            ok = dtype == torch.bfloat16 and gap <= 2.0 * tie
            detail += " (a tie within bf16 noise)" if ok else ""
        report.check(f"greedy {new_tokens} tokens {name}: same tokens", ok, detail)
        report.data[f"greedy_{name}_same"] = same


def check_training_step(config, device, ids, report):
    ref, ours = make_models(config, device, torch.float32)
    ref.train()
    ours.train()
    vocab = config.vocab_size
    inputs, labels = ids[:, :-1], ids[:, 1:]
    loss_ref = TF.cross_entropy(ref(inputs).logits.reshape(-1, vocab), labels.reshape(-1))
    loss_ours = fft.cross_entropy(ours(inputs).logits.reshape(-1, vocab), labels.reshape(-1))
    loss_ref.backward()
    loss_ours.backward()
    worst, worst_name = 0.0, ""
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        rel = ((q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-30)).item()
        if rel > worst:
            worst, worst_name = rel, name
    dloss = abs(loss_ours.item() - loss_ref.item())
    report.check("training step float32: loss", dloss <= 1e-4 * abs(loss_ref.item()),
                 f"{loss_ours.item():.6f} vs {loss_ref.item():.6f}")
    report.check("training step float32: every parameter's gradient", worst <= 1e-3,
                 f"largest relative error {worst:.3g} ({worst_name})")
    report.data["train"] = dict(loss_ref=loss_ref.item(), loss_ff=loss_ours.item(),
                                worst_grad_rel_err=worst, worst_param=worst_name)


def bench(config, device, batch, prompt, new_tokens, repeats, report):
    """Prefill (no cache) and decode (``new_tokens`` steps after a ``prompt``-token prefill)
    of both models, alternating between them in every repeat so that drift of the machine
    affects both alike; medians."""
    ref, ours = make_models(config, device, torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, config.vocab_size, (batch, prompt), generator=g).to(device)
    models = (("transformers-sdpa", ref), ("ferrofast", ours))

    def prefill(model):
        sync(device)
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        sync(device)
        return time.perf_counter() - t0

    def decode(model):
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        return time.perf_counter() - t0

    times = {name: dict(prefill=[], decode=[]) for name, _ in models}
    with torch.no_grad():
        for _, model in models:  # warm-up (kernels compiled and cached)
            prefill(model)
            decode(model)
        for _ in range(repeats):
            for name, model in models:
                times[name]["prefill"].append(prefill(model))
                times[name]["decode"].append(decode(model))
    rows = {}
    for name, t in times.items():
        p, d = statistics.median(t["prefill"]), statistics.median(t["decode"])
        rows[name] = dict(prefill_tok_s=batch * prompt / p, decode_tok_s=batch * new_tokens / d,
                          prefill_ms=p * 1e3, decode_ms=d * 1e3)
    ff, hf = rows["ferrofast"], rows["transformers-sdpa"]
    for name, r in rows.items():
        report.line(f"{name:18s} prefill {r['prefill_tok_s']:10.0f} tok/s ({r['prefill_ms']:.2f} ms)"
                    f"   decode {r['decode_tok_s']:8.0f} tok/s ({r['decode_ms']:.1f} ms / {new_tokens} steps)")
    report.line(f"ferrofast / transformers: prefill {ff['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x, "
                f"decode {ff['decode_tok_s'] / hf['decode_tok_s']:.2f}x "
                f"(bf16, batch {batch}, prompt {prompt}, {new_tokens} decode steps, median of {repeats})")
    report.data.setdefault("bench", []).append(
        dict(rows, batch=batch, prompt=prompt, new_tokens=new_tokens, repeats=repeats))


class Report:
    def __init__(self):
        self.failed = []
        self.data = {}

    def line(self, text):
        print(text, flush=True)

    def check(self, name, ok, detail):
        self.line(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            self.failed.append(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a 2-layer, 256-wide model")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="benchmark batches")
    ap.add_argument("--prompt", type=int, default=1024, help="benchmark prompt length")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = make_config(args.small)
    report = Report()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report.line(f"device {name}; torch {torch.__version__}; transformers "
                f"{transformers.__version__}; ferrofast {ferrofast.__version__}")
    report.line(f"config: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                f"{config.num_attention_heads}/{config.num_key_value_heads} heads, "
                f"vocab {config.vocab_size}")
    report.data.update(device=name, torch=torch.__version__,
                       transformers=transformers.__version__, ferrofast=ferrofast.__version__)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (2, 200), generator=g).to(device)
    tie = check_logits(config, device, ids, report)
    prompt = torch.randint(1, config.vocab_size, (2, 24), generator=g).to(device)
    check_greedy(config, device, prompt, args.new_tokens, tie, report)
    check_training_step(config, device, ids, report)
    if not args.no_bench:
        for batch in args.batch:
            bench(config, device, batch, args.prompt, args.new_tokens, args.repeats, report)
    report.data["failed"] = report.failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.data, f, indent=1)
    print(json.dumps(report.data))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
