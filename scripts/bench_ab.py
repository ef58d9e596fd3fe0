#!/usr/bin/env python3
"""Compares `ferrofast bench --json` runs of two builds taken in the same call.

Usage: python3 scripts/bench_ab.py BASE.json OURS.json [BASE2.json OURS2.json ...]

Pairs are (base, ours) files from alternating runs. For every case both builds ran, prints
each pair's medians and the ratio ours / base (below 1: the new build is faster), then the
median ratio over the pairs. Cases one build could not run are listed with its message.
"""
import json
import statistics
import sys


def load(path):
    with open(path) as f:
        data = json.load(f)
    return data, {(r["op"], r["shape"], r["dtype"], r.get("threads")): r for r in data["results"]}


def main(paths):
    if len(paths) < 2 or len(paths) % 2:
        sys.exit(__doc__)
    pairs = [(load(paths[i]), load(paths[i + 1])) for i in range(0, len(paths), 2)]
    for n, ((db, _), (do, _)) in enumerate(pairs, 1):
        print(f"pair {n}: copy base {db['copy_gbs']:.0f} GB/s, ours {do['copy_gbs']:.0f} GB/s")
    keys = list(pairs[0][0][1])
    print(f"{'op':12} {'shape':28} {'dtype':9} {'base us':>22} {'ours us':>22} {'ratio':>6}")
    for k in keys:
        base, ours, ratios, missing = [], [], [], []
        for (_, b), (_, o) in pairs:
            rb, ro = b.get(k, {}), o.get(k, {})
            mb, mo = rb.get("median_s"), ro.get("median_s")
            if mb and mo:
                base.append(mb * 1e6)
                ours.append(mo * 1e6)
                ratios.append(mo / mb)
            else:
                missing.append(ro.get("error") or rb.get("error") or "not run")
        if ratios:
            fmt = lambda xs: "/".join(f"{x:.1f}" for x in xs)
            print(f"{k[0]:12} {k[1]:28} {k[2]:9} {fmt(base):>22} {fmt(ours):>22} "
                  f"{statistics.median(ratios):6.3f}")
        else:
            print(f"{k[0]:12} {k[1]:28} {k[2]:9} not compared: {missing[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
