"""Load on the search service (`crossmatch serve`): N concurrent clients send text queries to GET /search for a
bounded time on 127.0.0.1; prints p50/p99 latency, queries/s, errors and the machine's load.

    python benchmarks/serve_load.py INDEX --clients 8 --seconds 10
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8   # a server already running

Without --url the script starts `crossmatch serve INDEX` in a subprocess on a free port (so the server
does not share this process's interpreter lock with the clients), waits for /healthz, drives it and stops
it. Each client is a thread with one keep-alive HTTP connection, sending the queries in turn; latency is
measured per request, from send to the last byte of the answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

QUERIES = [
    "a red circle",
    "a blue square left of a green triangle",
    "a small yellow star",
    "two circles above a square",
    "a green square",
    "a purple triangle right of a red circle",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, port: int, search_params: str | None, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crossmatch", "serve", index, "--port", str(port), "--device", "cpu"]
    cmd += ["--search-params", search_params] if search_params else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the server's torch threads
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"crossmatch serve exited: {proc.stderr.read().strip().splitlines()[-1:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("crossmatch serve did not answer /healthz within 120 s")


def client(host: str, port: int, k: int, stop_at: float, offset: int, out: list, errors: list) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    i = offset
    while time.monotonic() < stop_at:
        path = "/search?" + urllib.parse.urlencode({"q": QUERIES[i % len(QUERIES)], "k": k})
        t0 = time.perf_counter()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                errors.append(f"{r.status} {body[:80]!r}")
                continue
        except OSError as err:
            errors.append(type(err).__name__)
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            continue
        out.append(time.perf_counter() - t0)
        i += 1
    conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index", nargs="?", help="index folder to serve (or --url)")
    p.add_argument("--url", default=None, help="drive this running server instead of starting one")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the clients send queries")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--search-params", default=None, help="passed to crossmatch serve")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server (OMP_NUM_THREADS)")
    args = p.parse_args()
    if not (args.index or args.url):
        p.error("give an INDEX folder or --url")
    proc = None
    if args.url:
        u = urllib.parse.urlparse(args.url)
        host, port = u.hostname, u.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        proc = start_server(args.index, port, args.search_params, args.threads)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as r:
            health = json.loads(r.read())
        load_before = os.getloadavg()
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=client, args=(host, port, args.k, stop_at, c, latencies, errors))
            for c in range(args.clients)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    if not latencies:
        raise SystemExit(f"no query succeeded ({len(errors)} errors: {errors[:3]})")
    ms = sorted(1000 * x for x in latencies)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    print(f"index: {health['rows']} rows, key {health['index_key']}, model {health['model']}; k={args.k}")
    print(f"clients {args.clients}, {wall:.1f} s: {len(ms)} queries, {len(errors)} errors")
    print(f"latency ms: p50 {statistics.median(ms):.1f}  p99 {p99:.1f}  max {ms[-1]:.1f}")
    print(f"queries/s: {len(ms) / wall:.1f}")
    server_threads = "its own" if args.url else f"{args.threads} torch thread(s)"
    load = f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    print(f"machine: {os.cpu_count()} CPUs, server {server_threads}, {load}")


if __name__ == "__main__":
    main()
