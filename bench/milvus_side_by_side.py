#!/usr/bin/env python3
"""Merges `make bench-milvus`'s results into one table (bench/results/milvus-side-by-side.{md,json}).

    milvus_side_by_side.py --local L.json --milvus M.json [--load-local A.json --load-milvus B.json]
                           --out-md F.md --out-json F.json

L.json is examples/bench_index.rs `query` (hiercon's local index, queried in process, one thread);
M.json is examples/bench_milvus.rs (Milvus through hiercon's gRPC client, one query per call);
A/B.json are `hiercon bench-load` reports against `serve --index` and `serve --milvus`.
Only the standard library.
"""

import argparse
import json
import platform


def cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--local", required=True)
    ap.add_argument("--milvus", required=True)
    ap.add_argument("--load-local")
    ap.add_argument("--load-milvus")
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", required=True)
    a = ap.parse_args()
    local = json.load(open(a.local))
    milvus = json.load(open(a.milvus))
    loads = {}
    if a.load_local and a.load_milvus:
        loads = {"local": json.load(open(a.load_local)), "milvus": json.load(open(a.load_milvus))}
    n = milvus["n"]
    lines = [
        f"# Local index beside Milvus: {n:,} x {milvus['dim']} vectors, M {milvus['m']}, efConstruction {milvus['ef_construction']}",
        "",
        f"CPU: {cpu()}, {milvus['threads']} cores; one run. {milvus['engine']}. The local index is queried in",
        "process on one thread; Milvus through gRPC on loopback, one query per call (as `serve` sends them).",
        "",
        "| | hiercon local | Milvus |",
        "|---|---:|---:|",
        f"| build s (local: graph + orphans; Milvus: insert + index + load) | {local.get('build_seconds', 0) + local.get('orphan_seconds', 0):.1f} | "
        f"{milvus['build_s']:.1f} ({milvus['insert_s']:.1f} + {milvus['index_s']:.1f} + {milvus['load_s']:.1f}) |",
        f"| memory MiB (local: graph + vectors in the serving process; Milvus: server RSS growth) | "
        f"{local.get('rss_index_mib', float('nan')):.0f} | {milvus['milvus_rss_mib']['collection']:.0f} |",
    ]
    for ef in [16, 32, 64, 128, 256]:
        lr, mr = local["recall"][f"ef{ef}"], milvus["recall"][f"ef{ef}"]
        lines.append(f"| ef {ef}: recall@10 / q/s | {lr['recall_at_10']:.3f} / {lr['qps_1_thread']:,.0f} | "
                     f"{mr['recall_at_10']:.3f} / {mr['qps_1_client']:,.0f} |")
    for sel in ["0.01", "0.05", "0.1"]:
        lf, mf = local["filtered"][sel], milvus["filtered"][sel]
        lines.append(f"| filter {float(sel):.0%}: p50 / p99 ms, recall | {lf['p50_us'] / 1e3:.2f} / {lf['p99_us'] / 1e3:.2f}, "
                     f"{lf['recall_at_10']:.3f} | {mf['p50_ms']:.2f} / {mf['p99_ms']:.2f}, {mf['recall_at_10']:.3f} |")
    if loads:
        lines += ["", "## Emoji HTTP load (`hiercon bench-load`, same model and queries)", "",
                  "| concurrency | local: req/s, p50 / p99 ms, errors | Milvus: req/s, p50 / p99 ms, errors |",
                  "|---:|---:|---:|"]
        for lo, mi in zip(loads["local"]["levels"], loads["milvus"]["levels"]):
            lines.append(f"| {lo['concurrency']} | {lo['throughput_rps']:.0f}, {lo['p50_ms']:.2f} / {lo['p99_ms']:.2f}, {lo['errors']} | "
                         f"{mi['throughput_rps']:.0f}, {mi['p50_ms']:.2f} / {mi['p99_ms']:.2f}, {mi['errors']} |")
    with open(a.out_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(a.out_json, "w") as f:
        json.dump({"cpu": cpu(), "local": local, "milvus": milvus, "load": loads}, f, indent=1)
        f.write("\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
