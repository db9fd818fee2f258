#!/usr/bin/env python3
"""A loopback-only Milvus standalone server from the PyPI `milvus` wheel (the real Milvus binary).

    scripts/milvus.py start  --data DIR [--port 19530] [--watch PID]   # prints 127.0.0.1:PORT once healthy
    scripts/milvus.py stop   --data DIR
    scripts/milvus.py status --data DIR

The wheel (`milvus==VERSION`, fetched with pip into .cache/wheels) carries the server binary and its
libraries xz-compressed; they are unpacked once into .cache/milvus/VERSION/bin. The wheel's own
launcher (`milvus-server`) leaves every component's `ip` empty, which makes Milvus register "the
first unicastable address" of the machine; this one writes DIR/configs/milvus.yaml from the
wheel's template with every component's `ip`, etcd, MinIO, Pulsar and the metrics server on
127.0.0.1. Ports are chosen free on 127.0.0.1 once and kept in DIR/ports.json, so a restart comes
back on the same address with the same data. With --watch PID the server is stopped when that
process exits (tests own their servers this way). Only the standard library is used.
"""

import argparse
import json
import lzma
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

VERSION = os.environ.get("MILVUS_VERSION", "2.3.5")
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HIERCON_CACHE", ROOT / ".cache"))
LOOPBACK = "127.0.0.1"
# Components whose `ip` Milvus would otherwise take from the first unicastable interface.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


def wheel() -> Path:
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob(f"milvus-{VERSION}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(wheels), f"milvus=={VERSION}"],
        check=True,
    )
    found = sorted(wheels.glob(f"milvus-{VERSION}-*.whl"))
    if not found:
        sys.exit(f"milvus: pip left no milvus-{VERSION} wheel in {wheels}")
    return found[0]


def install() -> Path:
    """The unpacked server: .cache/milvus/VERSION/{bin,template}."""
    home = CACHE / "milvus" / VERSION
    if (home / ".ok").exists():
        return home
    whl = wheel()
    (home / "bin").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name.startswith("milvus/data/bin/") and name.endswith(".lzma"):
                out = home / "bin" / Path(name[: -len(".lzma")]).name
                out.write_bytes(lzma.decompress(z.read(name)))
                out.chmod(0o755)
        (home / "milvus.yaml.template").write_bytes(z.read("milvus/data/config.yaml.template"))
        (home / "glog.conf").write_bytes(z.read("milvus/data/glog.conf"))
    (home / ".ok").write_text(whl.name + "\n")
    return home


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def ports(data: Path, proxy: int | None) -> dict:
    path = data / "ports.json"
    if path.exists():
        p = json.loads(path.read_text())
        if proxy is None or p["proxy_port"] == proxy:
            return p
    keys = ["etcd_port", "etcd_peer_port", "root_coord_port", "proxy_internal_port", "query_coord_port",
            "query_node_port", "index_coord_port", "index_node_port", "data_coord_port", "data_node_port",
            "metrics_port"]
    p = {k: free_port() for k in keys}
    p["proxy_port"] = proxy if proxy is not None else free_port()
    path.write_text(json.dumps(p, indent=1) + "\n")
    return p


def config(home: Path, data: Path, p: dict) -> Path:
    """DIR/configs/milvus.yaml: the wheel's template, filled in, everything on 127.0.0.1."""
    text = (home / "milvus.yaml.template").read_text()
    storage = data / "storage"
    values = {
        "etcd_log_level": "warn",
        "etcd_log_path": str(data / "logs" / "etcd.log"),
        "etcd_data_dir": str(storage / "etcd.data"),
        "local_storage_dir": str(storage),
        "rocksmq_data_dir": str(storage / "rocksmq"),
        "system_log_path": str(data / "logs"),
        "server_pem_path": "server.pem",
        "server_key_path": "server.key",
        "ca_pem_path": "ca.pem",
        "authorization_enabled": "false",
        "tls_mode": "0",
        **{k: str(v) for k, v in p.items()},
    }

    def fill(m: re.Match) -> str:
        key = m.group(1).split(":")[0].split("(")[0].strip()
        if key not in values:
            sys.exit(f"milvus: template key {key!r} has no value")
        return values[key]

    text = re.sub(r"\{\{(.*?)\}\}", fill, text)
    # `localhost` may resolve to ::1 as well; name the IPv4 loopback everywhere.
    text = text.replace("localhost", LOOPBACK)
    lines, section = [], None
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z]\w*):", line)
        if top:
            section = top.group(1)
        if section in COMPONENTS and re.match(r"^  ip:", line):
            line = f"  ip: {LOOPBACK} # pinned: never the first unicastable address"
        lines.append(line)
    text = "\n".join(lines) + "\n"
    # The embedded etcd: client and peer URLs on loopback (its defaults are localhost:2379/2380).
    etcd_cfg = data / "configs" / "embedEtcd.yaml"
    etcd_cfg.write_text(
        f"listen-client-urls: http://{LOOPBACK}:{p['etcd_port']}\n"
        f"advertise-client-urls: http://{LOOPBACK}:{p['etcd_port']}\n"
        f"listen-peer-urls: http://{LOOPBACK}:{p['etcd_peer_port']}\n"
        f"initial-advertise-peer-urls: http://{LOOPBACK}:{p['etcd_peer_port']}\n"
        f"initial-cluster: default=http://{LOOPBACK}:{p['etcd_peer_port']}\n"
        f"listen-metrics-urls: http://{LOOPBACK}:{free_port()}\n"
    )
    text = text.replace("  use:\n    embed: true", f"  use:\n    embed: true\n  config:\n    path: {etcd_cfg}", 1)
    out = data / "configs" / "milvus.yaml"
    out.write_text(text)
    (data / "configs" / "glog.conf").write_bytes((home / "glog.conf").read_bytes())
    return out


def healthy(p: dict) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{p['metrics_port']}/healthz", timeout=2) as r:
            return b"OK" in r.read()
    except OSError:
        return False


def pid_of(data: Path) -> int | None:
    """The launcher's pid (= its process group) while any process of the group lives."""
    try:
        pid = int((data / "milvus.pid").read_text())
        os.killpg(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start(a) -> None:
    data = Path(a.data).resolve()
    for d in ("configs", "logs", "storage", "run"):
        (data / d).mkdir(parents=True, exist_ok=True)
    home = install()
    p = ports(data, a.port)
    if pid_of(data) is None:
        config(home, data, p)
        env = dict(os.environ)
        env.update({
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(p["metrics_port"]),
            "MILVUSCONF": str(data / "configs") + "/",
            "MILVUS_RUN_DIR": str(data / "run"),
            "LD_LIBRARY_PATH": str(home / "bin") + ":" + env.get("LD_LIBRARY_PATH", ""),
        })
        # Milvus 2.3's gRPC and metrics servers listen on every interface (`:PORT`, not
        # configurable). So the server runs in a network namespace of its own that has only a
        # loopback interface, and socat bridges its two client ports (gRPC, metrics) through Unix
        # sockets to 127.0.0.1 of this machine: nothing of Milvus can listen on, or talk to,
        # another address.
        bridges = []
        for key in ("proxy_port", "metrics_port"):
            sock = data / "run" / f"{key}.sock"
            sock.unlink(missing_ok=True)
            bridges.append((p[key], sock))
        inside = "ip link set lo up && " + " ".join(
            f"socat UNIX-LISTEN:{sock},fork,unlink-early TCP:{LOOPBACK}:{port} &" for port, sock in bridges
        ) + f" exec {home / 'bin' / 'milvus'} run standalone"
        outside = " ".join(
            f"socat TCP-LISTEN:{port},bind={LOOPBACK},fork,reuseaddr UNIX-CONNECT:{sock} &" for port, sock in bridges
        )
        script = f"{outside} exec unshare --net --fork sh -c '{inside}'"
        log = open(data / "logs" / "milvus.out", "ab")
        # Its own process group (stopped as one); --watch stops it when the owner exits.
        proc = subprocess.Popen(["sh", "-c", script], cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        (data / "milvus.pid").write_text(f"{proc.pid}\n")
        if a.watch:
            watcher = [sys.executable, __file__, "watch", "--data", str(data), "--watch", str(a.watch),
                       "--pid", str(proc.pid)]
            subprocess.Popen(watcher, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + a.timeout
    while not healthy(p):
        if pid_of(data) is None:
            tail = (data / "logs" / "milvus.out").read_text(errors="replace")[-3000:]
            sys.exit(f"milvus: the server exited while starting; {data}/logs/milvus.out ends:\n{tail}")
        if time.time() > deadline:
            sys.exit(f"milvus: not healthy after {a.timeout} s (see {data}/logs)")
        time.sleep(0.2)
    print(f"{LOOPBACK}:{p['proxy_port']}", flush=True)


def stop(a) -> None:
    data = Path(a.data).resolve()
    pid = pid_of(data)
    if pid is None:
        return
    # The launcher leads the process group: socat bridges, unshare, Milvus.
    os.killpg(pid, signal.SIGTERM)
    for _ in range(200):
        try:
            os.killpg(pid, 0)
        except OSError:
            break
        time.sleep(0.1)
    else:
        os.killpg(pid, signal.SIGKILL)
        time.sleep(0.5)
    (data / "milvus.pid").unlink(missing_ok=True)


def watch(a) -> None:
    data = Path(a.data).resolve()
    while True:
        time.sleep(0.5)
        try:
            os.killpg(a.pid, 0)
        except OSError:
            return
        try:
            os.kill(a.watch, 0)
        except OSError:
            if pid_of(data) == a.pid:
                stop(a)
            return


def status(a) -> None:
    data = Path(a.data).resolve()
    pid = pid_of(data)
    p = json.loads((data / "ports.json").read_text()) if (data / "ports.json").exists() else None
    state = "healthy" if p and pid and healthy(p) else ("starting" if pid else "stopped")
    print(f"{state} pid={pid} address={LOOPBACK}:{p['proxy_port'] if p else '-'} data={data}")
    sys.exit(0 if state == "healthy" else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["install", "start", "stop", "status", "watch"])
    ap.add_argument("--data", default=str(CACHE / "milvus" / "data"))
    ap.add_argument("--port", type=int, help="the proxy's gRPC port (default: a free one, kept across restarts)")
    ap.add_argument("--watch", type=int, help="stop the server when this process exits")
    ap.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    if a.command == "install":
        print(install() / "bin" / "milvus")
    else:
        {"start": start, "stop": stop, "status": status, "watch": watch}[a.command](a)


if __name__ == "__main__":
    main()
