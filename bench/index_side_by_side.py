#!/usr/bin/env python3
"""The index benchmark's data and its faiss side (`make bench-index`).

    data   --dir D --n N [--dim 128 --clusters 1000 --queries 1000]
           writes D/base.f32, D/queries.f32 (row-major little-endian float32, unit rows),
           D/labels.u8 (per base row: 1 = in the 1 % set, 5 = 5 %, 10 = 10 %, 0 = neither),
           D/truth.json (exact top-10 per query, unfiltered and per filter) and D/data.json.
    emoji  --dir D --embeddings gen-dir/embeddings.safetensors
           the same files from a real generation's embeddings (queries: 1,000 of its rows).
    faiss  --dir D --m M --ef-construction E --threads T --out F
           faiss IndexHNSWFlat (inner product) over the same vectors: build seconds at T threads,
           resident memory, recall@10 and single-thread queries/s at ef 16..256, filtered queries.
    table  --out-md F.md --out-json F.json RESULT.json ...
           merges the hiercon and faiss results into one table.

The base vectors are unit-normalised `centre + 0.5 * noise / sqrt(dim)` around seeded random
centres (as in benches/index.rs). Ground truth is an exact inner-product scan (faiss IndexFlatIP).
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

K = 10
EFS = [16, 32, 64, 128, 256]
# Label codes in labels.u8 and the share of rows each filter allows.
SELECTIVITY = {"0.01": 1, "0.05": 5, "0.1": 10}


def rss_mib():
    """Current resident set (VmRSS) and its peak (VmHWM) in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                out[key.rstrip(":")] = int(kb) / 1024.0
    return out["VmRSS"], out["VmHWM"]


def unit_rows(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng, centres, n, dim):
    which = rng.integers(0, len(centres), size=n)
    rows = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        e = min(n, s + step)
        noise = rng.standard_normal((e - s, dim)).astype(np.float32)
        rows[s:e] = unit_rows(centres[which[s:e]] + 0.5 * noise / np.sqrt(dim))
    return rows


def write_truth(d, base, queries, labels):
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(base)
    _, ids = flat.search(queries, K)
    truth = {"all": ids.tolist()}
    for sel, code in SELECTIVITY.items():
        rows = np.nonzero(labels == code)[0]
        sub = faiss.IndexFlatIP(base.shape[1])
        sub.add(base[rows])
        _, sids = sub.search(queries, K)
        truth[sel] = rows[sids].tolist()
    with open(os.path.join(d, "truth.json"), "w") as f:
        json.dump(truth, f)


def write_labels(d, n, seed):
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    labels = np.zeros(n, dtype=np.uint8)
    labels[u < 0.16] = 10
    labels[u < 0.06] = 5
    labels[u < 0.01] = 1
    labels.tofile(os.path.join(d, "labels.u8"))
    return labels


def cmd_data(a):
    os.makedirs(a.dir, exist_ok=True)
    rng = np.random.default_rng(1234)
    centres = (rng.standard_normal((a.clusters, a.dim)) / np.sqrt(a.dim)).astype(np.float32)
    base = clustered(np.random.default_rng(1), centres, a.n, a.dim)
    queries = clustered(np.random.default_rng(2), centres, a.queries, a.dim)
    base.tofile(os.path.join(a.dir, "base.f32"))
    queries.tofile(os.path.join(a.dir, "queries.f32"))
    labels = write_labels(a.dir, a.n, 7)
    write_truth(a.dir, base, queries, labels)
    desc = {"source": f"clustered synthetic ({a.clusters} clusters, seeds 1234/1/2)", "n": a.n, "dim": a.dim,
            "queries": a.queries}
    with open(os.path.join(a.dir, "data.json"), "w") as f:
        json.dump(desc, f, indent=1)
    print(f"data: {a.n} x {a.dim} -> {a.dir}")


def read_safetensors(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        t = header["embeddings"]
        assert t["dtype"] == "F32", t
        s, e = t["data_offsets"]
        f.seek(8 + n + s)
        return np.frombuffer(f.read(e - s), dtype=np.float32).reshape(t["shape"]).copy()


def cmd_emoji(a):
    os.makedirs(a.dir, exist_ok=True)
    emb = unit_rows(read_safetensors(a.embeddings))
    rng = np.random.default_rng(3)
    q = rng.choice(len(emb), size=min(a.queries, len(emb)), replace=False)
    # A query is a stored row plus a little noise (a new photo of a known item).
    queries = unit_rows(emb[q] + 0.05 * rng.standard_normal(emb[q].shape).astype(np.float32) / np.sqrt(emb.shape[1]))
    emb.tofile(os.path.join(a.dir, "base.f32"))
    queries.tofile(os.path.join(a.dir, "queries.f32"))
    labels = write_labels(a.dir, len(emb), 7)
    write_truth(a.dir, emb, queries, labels)
    desc = {"source": f"embeddings of {a.embeddings}", "n": len(emb), "dim": emb.shape[1], "queries": len(queries)}
    with open(os.path.join(a.dir, "data.json"), "w") as f:
        json.dump(desc, f, indent=1)
    print(f"emoji: {len(emb)} x {emb.shape[1]} -> {a.dir}")


def load(d):
    with open(os.path.join(d, "data.json")) as f:
        desc = json.load(f)
    n, dim = desc["n"], desc["dim"]
    base = np.fromfile(os.path.join(d, "base.f32"), dtype=np.float32).reshape(n, dim)
    queries = np.fromfile(os.path.join(d, "queries.f32"), dtype=np.float32).reshape(-1, dim)
    labels = np.fromfile(os.path.join(d, "labels.u8"), dtype=np.uint8)
    with open(os.path.join(d, "truth.json")) as f:
        truth = json.load(f)
    return desc, base, queries, labels, truth


def recall(found, truth):
    return float(np.mean([len(set(f[:K]) & set(t[:K])) / K for f, t in zip(found, truth)]))


def cmd_faiss(a):
    import faiss

    desc, base, queries, labels, truth = load(a.dir)
    rss_data, _ = rss_mib()
    faiss.omp_set_num_threads(a.threads)
    index = faiss.IndexHNSWFlat(base.shape[1], a.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = a.ef_construction
    t = time.perf_counter()
    index.add(base)
    build_s = time.perf_counter() - t
    rss, hwm = rss_mib()
    faiss.omp_set_num_threads(1)
    out = {"engine": "faiss", "version": faiss.__version__, "m": a.m, "ef_construction": a.ef_construction,
           "threads": a.threads, "data": desc, "build_seconds": build_s,
           "rss_mib": rss, "peak_rss_mib": hwm, "rss_index_mib": rss - rss_data,
           "raw_vectors_mib": base.nbytes / 2**20, "recall": {}, "filtered": {}}
    # One untimed pass first (caches and pages warm, as in a running server), as hiercon's side does.
    index.hnsw.efSearch = 64
    for q in queries:
        index.search(q[None, :], K)
    for ef in EFS:
        index.hnsw.efSearch = ef
        # Single-thread, one query per call (as a server answers them).
        found, lat = [], []
        for q in queries:
            t = time.perf_counter()
            _, ids = index.search(q[None, :], K)
            lat.append(time.perf_counter() - t)
            found.append(ids[0].tolist())
        out["recall"][f"ef{ef}"] = {"recall_at_10": recall(found, truth["all"]), "qps_1_thread": len(lat) / sum(lat),
                                    "p50_us": 1e6 * float(np.percentile(lat, 50)),
                                    "p99_us": 1e6 * float(np.percentile(lat, 99))}
    ef = a.filter_ef
    for sel, code in SELECTIVITY.items():
        allowed = labels == code
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        found, lat = [], []
        for q in queries:
            t = time.perf_counter()
            _, ids = index.search(q[None, :], K, params=params)
            lat.append(time.perf_counter() - t)
            found.append([i for i in ids[0].tolist() if i >= 0])
        out["filtered"][sel] = {"allowed": int(allowed.sum()), "how": f"HNSW with IDSelectorBitmap, ef {ef}",
                                "recall_at_10": recall(found, truth[sel]),
                                "p50_us": 1e6 * float(np.percentile(lat, 50)),
                                "p99_us": 1e6 * float(np.percentile(lat, 99))}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("m", "ef_construction", "build_seconds", "rss_index_mib")}))


def at_recall(res, target):
    """Single-thread queries/s at the smallest ef reaching `target` recall (None if none does)."""
    for ef in EFS:
        r = res["recall"].get(f"ef{ef}")
        if r and r["recall_at_10"] >= target:
            return ef, r["qps_1_thread"]
    return None, None


def interpolated(res, target):
    """Single-thread queries/s at exactly `target` recall, interpolated linearly in recall between
    the two ef of the grid around it (None if no ef reaches it)."""
    pts = [(res["recall"][f"ef{ef}"]["recall_at_10"], res["recall"][f"ef{ef}"]["qps_1_thread"])
           for ef in EFS if f"ef{ef}" in res["recall"]]
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if r0 < target <= r1:
            return q0 + (q1 - q0) * (target - r0) / (r1 - r0)
    if pts and pts[0][0] >= target:
        return pts[0][1]
    return None


def cmd_table(a):
    results = []
    for p in a.results:
        with open(p) as f:
            results.append(json.load(f))
    lines = []
    by_data = {}
    for r in results:
        by_data.setdefault(r["data"]["source"], []).append(r)
    for source, rs in by_data.items():
        d = rs[0]["data"]
        lines += [f"### {d['n']:,} x {d['dim']} — {source}", "",
                  "| engine | M | efC | threads | build s | index RSS MiB | " +
                  " | ".join(f"ef {ef}: recall / q/s" for ef in EFS) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(EFS)]
        for r in sorted(rs, key=lambda r: (r["m"], r["engine"])):
            cells = []
            for ef in EFS:
                x = r["recall"].get(f"ef{ef}")
                cells.append(f"{x['recall_at_10']:.3f} / {x['qps_1_thread']:,.0f}" if x else "-")
            lines.append(f"| {r['engine']} | {r['m']} | {r['ef_construction']} | {r['threads']} | "
                         f"{r['build_seconds']:.1f} | {r['rss_index_mib']:,.0f} | " + " | ".join(cells) + " |")
        lines += ["", "| engine | M | filter | allowed | how | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (r["m"], r["engine"])):
            for sel, x in r["filtered"].items():
                lines.append(f"| {r['engine']} | {r['m']} | {float(sel):.0%} | {x['allowed']:,} | {x['how']} | "
                             f"{x['recall_at_10']:.3f} | {x['p50_us'] / 1000:.2f} | {x['p99_us'] / 1000:.2f} |")
        lines += ["", "| M | build hiercon / faiss | q/s at the first ef reaching recall 0.95: hiercon (ef) / faiss (ef) "
                  "| ratio | q/s interpolated to recall 0.95 exactly: hiercon / faiss | ratio | same at 0.98 | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in sorted({r["m"] for r in rs}):
            h = [r for r in rs if r["m"] == m and r["engine"] == "hiercon"]
            f_ = [r for r in rs if r["m"] == m and r["engine"] == "faiss"]
            if not h or not f_:
                continue
            h, f_ = h[0], f_[0]
            (he, hq), (fe, fq) = at_recall(h, 0.95), at_recall(f_, 0.95)
            ratio = f"{hq / fq:.2f}x" if hq and fq else "-"
            cells = []
            for target in (0.95, 0.98):
                hi, fi = interpolated(h, target), interpolated(f_, target)
                cells += [f"{hi or 0:,.0f} / {fi or 0:,.0f}", f"{hi / fi:.2f}x" if hi and fi else "-"]
            lines.append(f"| {m} | {h['build_seconds'] / f_['build_seconds']:.2f}x | "
                         f"{hq or 0:,.0f} ({he}) / {fq or 0:,.0f} ({fe}) | {ratio} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    with open(a.out_md, "w") as f:
        f.write(text + "\n")
    with open(a.out_json, "w") as f:
        json.dump(results, f, indent=1)
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--dir", required=True)
    d.add_argument("--n", type=int, required=True)
    d.add_argument("--dim", type=int, default=128)
    d.add_argument("--clusters", type=int, default=1000)
    d.add_argument("--queries", type=int, default=1000)
    e = sub.add_parser("emoji")
    e.add_argument("--dir", required=True)
    e.add_argument("--embeddings", required=True)
    e.add_argument("--queries", type=int, default=1000)
    f = sub.add_parser("faiss")
    f.add_argument("--dir", required=True)
    f.add_argument("--m", type=int, required=True)
    f.add_argument("--ef-construction", type=int, required=True)
    f.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    f.add_argument("--filter-ef", type=int, default=64)
    f.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("--out-md", required=True)
    t.add_argument("--out-json", required=True)
    t.add_argument("results", nargs="+")
    a = p.parse_args()
    {"data": cmd_data, "emoji": cmd_emoji, "faiss": cmd_faiss, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
