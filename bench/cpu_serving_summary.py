#!/usr/bin/env python3
"""The summary of scripts/bench_cpu.sh: reads its results.jsonl (one JSON object per run) and
writes bench/results/cpu-serving.json and cpu-serving.md.

    cpu_serving_summary.py RESULTS.jsonl BASE_REV MODEL PHOTOS PHOTO_MB
"""
import json, statistics, subprocess, sys
results, base_rev, model, photos, photo_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rows = [json.loads(l) for l in open(results)]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
machine = f"{cpu}, {len(__import__('os').sched_getaffinity(0))} cores, VNNI {'yes' if 'avx512_vnni' in flags or 'avx_vnni' in flags else 'no'}, AMX-int8 {'yes' if 'amx_int8' in flags else 'no'}"
# The embedding rate: images embedded / the embedding phase (read, hash, decode, preprocess,
# embed; what bench/results/index-emoji.json has always reported) for `hiercon index`; images /
# the whole run for the Python anchor (it does nothing else). `command` adds the whole command
# (graph, verification, writing) for hiercon.
index, command = {}, {}
for r in rows:
    if r["kind"] != "index":
        continue
    key = (r["catalogue"], r["config"])
    if "python" in r:
        index.setdefault(key, []).append(r["python"]["images_per_s"])
    else:
        index.setdefault(key, []).append(r["embedded"] / r["embed_seconds"])
        command.setdefault(key, []).append(r["images"] / r["seconds"])
best = {k: max(v) for k, v in index.items()}
out = {"bench": "cpu-serving", "machine": machine, "base_rev": base_rev, "model": model,
       "photos": {"count": photos, "megabytes": photo_mb, "megapixels": "2-8"},
       "index_images_per_s": {}, "load": {}}
for cat in ("emoji", "photos"):
    row = {cfg: {"best": best[(cat, cfg)], "rounds": index[(cat, cfg)],
                 "whole_command_items_per_s": command.get((cat, cfg))} for (c, cfg) in best if c == cat}
    b = best[(cat, "base-float")]
    row["int8_over_base_float"] = best[(cat, "int8")] / b
    row["float_over_base_float"] = best[(cat, "float")] / b
    row["int8_over_python_ort_int8"] = best[(cat, "int8")] / best[(cat, "python-ort-int8")]
    out["index_images_per_s"][cat] = row
loads = {}
for r in rows:
    if r["kind"] == "load":
        loads.setdefault(r["config"], []).append(r["result"])
def levels(res):
    return {str(l["concurrency"]): l for l in res["levels"]}
for cfg, results in loads.items():
    per = {}
    for c in ("1", "8", "32"):
        ls = [levels(x)[c] for x in results]
        per[f"c{c}"] = {"p50_ms": statistics.median(l["p50_ms"] for l in ls),
                        "throughput_rps": statistics.median(l["throughput_rps"] for l in ls),
                        "errors": sum(l["errors"] for l in ls)}
    out["load"][cfg] = per
ratios = {}
for c in ("c1", "c8", "c32"):
    b, i = out["load"]["base-float"][c], out["load"]["int8"][c]
    ratios[c] = {"p50_int8_over_base_float": i["p50_ms"] / b["p50_ms"],
                 "throughput_int8_over_base_float": i["throughput_rps"] / b["throughput_rps"]}
out["load_ratios"] = ratios
open("bench/results/cpu-serving.json", "w").write(json.dumps(out, indent=1) + "\n")
e, p = out["index_images_per_s"]["emoji"], out["index_images_per_s"]["photos"]
md = [f"# Embedding at the CPU's speed ({machine})", "",
      f"Base: main at {base_rev} (float). Model: {model} and its int8 copy (`hiercon model quantize`, defaults).",
      f"Photos: {photos} JPEGs of 2-8 MP ({photo_mb} MB) from bench/make_photos.py. Best of the rounds.", "",
      "Images/s: `hiercon index`'s embedding phase end to end (read, hash, decode, preprocess, embed);",
      "the Python rows do the same in a plain loop. Whole `hiercon index` runs (graph, verification) in the JSON.", "",
      "| images/s | emoji | photos |", "|---|---:|---:|"]
for cfg in ("base-float", "float", "int8", "python-float", "python-ort-int8"):
    md.append(f"| {cfg} | {e[cfg]['best']:.0f} | {p[cfg]['best']:.0f} |")
md += [f"| int8 / base float | {e['int8_over_base_float']:.2f}x | {p['int8_over_base_float']:.2f}x |",
       f"| int8 / Python ORT int8 | {e['int8_over_python_ort_int8']:.2f}x | {p['int8_over_python_ort_int8']:.2f}x |", "",
       "| served (emoji, k=10) | c=1 p50 ms | c=8 p50 ms | c=32 p50 ms | c=1 req/s | c=32 req/s | errors |",
       "|---|---:|---:|---:|---:|---:|---:|"]
for cfg in ("base-float", "float", "int8"):
    l = out["load"][cfg]
    md.append(f"| {cfg} | {l['c1']['p50_ms']:.2f} | {l['c8']['p50_ms']:.1f} | {l['c32']['p50_ms']:.1f} | "
              f"{l['c1']['throughput_rps']:.0f} | {l['c32']['throughput_rps']:.0f} | "
              f"{sum(l[c]['errors'] for c in ('c1', 'c8', 'c32'))} |")
md += ["", f"int8 against base float: c=1 p50 {ratios['c1']['p50_int8_over_base_float']:.2f}x, "
       f"c=32 throughput {ratios['c32']['throughput_int8_over_base_float']:.2f}x."]
open("bench/results/cpu-serving.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
