#!/usr/bin/env python3
"""Helpers for benches/macro/run.sh (Python 3 standard library only).

    helpers.py ports N                      N free TCP ports on 127.0.0.1, one per line
    helpers.py join URL SIZE JOINERS FIRST INTERVAL TIMEOUT
                                            one client starts a cold GET of URL at t=0, then
                                            JOINERS more start at FIRST, FIRST+INTERVAL, ...;
                                            prints one JSON object per client
    helpers.py rss STOPFILE PID...          samples the summed VmRSS of PIDs every 50 ms until
                                            STOPFILE exists, then prints JSON with the largest
                                            sample and each PID's (and the sum of) VmHWM
    helpers.py hashtime FILE                seconds one core takes to sha256 FILE, read into
                                            memory first (best of 3; hashlib is OpenSSL's,
                                            SHA-NI where the CPU has it)
    helpers.py report RESULTS.tsv           the results table (Markdown) from run.sh's samples
    helpers.py report-pair DEFAULT.tsv TUNED.tsv
                                            both tables of a --tuned run, default settings first

Every network wait has a timeout; nothing here runs unbounded.
"""

import http.client
import json
import os
import socket
import statistics
import sys
import threading
import time
import urllib.parse


def ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    for s in socks:
        print(s.getsockname()[1])
    for s in socks:
        s.close()


# === join: time to first byte of clients that join a running cold fill ===


def one_client(url, size, start_at, t0, timeout, out, idx):
    delay = t0 + start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    u = urllib.parse.urlsplit(url)
    rec = {"client": idx, "start": round(time.monotonic() - t0, 4)}
    began = time.monotonic()
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request("GET", u.path)
        resp = conn.getresponse()
        rec["status"] = resp.status
        rec["headers_s"] = round(time.monotonic() - began, 4)
        first = resp.read(1)
        rec["ttfb_s"] = round(time.monotonic() - began, 4)
        got = len(first)
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        rec["bytes"] = got
        rec["total_s"] = round(time.monotonic() - began, 4)
        rec["ok"] = resp.status == 200 and got == size
        conn.close()
    except Exception as e:  # a failed client is a result, not a crash
        rec["error"] = repr(e)
        rec["ok"] = False
    out[idx] = rec


def join(url, size, joiners, first, interval, timeout):
    size, joiners = int(size), int(joiners)
    first, interval, timeout = float(first), float(interval), float(timeout)
    out = [None] * (joiners + 1)
    t0 = time.monotonic()
    starts = [0.0] + [first + i * interval for i in range(joiners)]
    threads = [
        threading.Thread(target=one_client, args=(url, size, s, t0, timeout, out, i))
        for i, s in enumerate(starts)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + first + joiners * interval + 10)
    for i, rec in enumerate(out):
        print(json.dumps(rec if rec is not None else {"client": i, "ok": False, "error": "hung"}))


# === rss: peak memory of a set of processes ===


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(stopfile, *pids):
    peak = 0
    threads = 0
    samples = 0
    while not os.path.exists(stopfile):
        peak = max(peak, sum(status_kib(p, "VmRSS") for p in pids))
        # "Threads:" is a count, not KiB, but it has the same shape.
        threads = max(threads, sum(status_kib(p, "Threads") for p in pids))
        samples += 1
        time.sleep(0.05)
    hwm = {p: status_kib(p, "VmHWM") for p in pids}
    print(json.dumps({
        "peak_sampled_rss_kib": peak,
        "peak_threads": threads,
        "samples": samples,
        "vmhwm_kib": hwm,
        "vmhwm_sum_kib": sum(hwm.values()),
    }))


# === report ===

SERVERS = [
    ("cistern", "cistern"),
    ("distribution", "distribution proxy"),
    ("nginx-cache", "nginx proxy_cache"),
]


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            measure, server, value = line.split("\t")[:3]
            rows.setdefault((measure, server), []).append(value)
    return rows


def median(rows, measure, server):
    vals = [float(v) for v in rows.get((measure, server), [])]
    return statistics.median(vals) if vals else None


def hashtime(path):
    import hashlib

    with open(path, "rb") as f:
        data = f.read()
    best = None
    for _ in range(3):
        start = time.perf_counter()
        hashlib.sha256(data).digest()
        took = time.perf_counter() - start
        best = took if best is None else min(best, took)
    print(f"{best:.4f}")


def first(rows, measure, server):
    vals = rows.get((measure, server), [])
    return vals[0] if vals else None


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}×"


def verdict(ok):
    return "" if ok is None else (" ✅" if ok else " ❌")


def report(path):
    rows = load(path)
    out = []

    def row(measure, target, cells):
        out.append(f"| {measure} | {target} | " + " | ".join(cells) + " |")

    out.append("| measure | target | " + " | ".join(label for _, label in SERVERS) + " |")
    out.append("|---|---|" + "---|" * len(SERVERS))

    def ratio_cells(measure, base_measure, base_server, unit, fmt, target_ok, invert=False):
        base = median(rows, base_measure, base_server)
        cells = []
        for key, _ in SERVERS:
            v = median(rows, measure, key)
            if v is None or base is None or base == 0:
                cells.append("n/a")
                continue
            r = (base / v) if invert else (v / base)
            cells.append(f"{fmt_ratio(r)}{verdict(target_ok(r))} ({fmt(v)} vs {fmt(base)}{unit})")
        return cells

    secs = lambda v: f"{v:.3f}"  # noqa: E731
    rps = lambda v: f"{v:,.0f}"  # noqa: E731

    blob = first(rows, "param_blob_mib", "all") or "?"
    burst_mib = first(rows, "param_burst_mib", "all") or "?"
    burst_n = first(rows, "param_burst_clients", "all") or "?"
    big_mib = first(rows, "param_big_mib", "all") or "?"
    big_n = first(rows, "param_big_clients", "all") or "?"
    slow = first(rows, "param_slow_rate", "all") or "?"
    conns = first(rows, "param_wrk_conns", "all") or "?"

    row(
        f"warm {blob} MiB blob GET, 1 client: wall time vs nginx serving the file (medians)",
        "≤ 1.00×",
        ratio_cells("warm_blob_s", "static_blob_s", "nginx-static", " s", secs, lambda r: r <= 1.00),
    )
    # The spread is what users notice: the slowest round against nginx's median.
    cells = []
    static = median(rows, "static_blob_s", "nginx-static")
    for key, _ in SERVERS:
        vals = [float(v) for v in rows.get(("warm_blob_s", key), [])]
        if not vals or not static:
            cells.append("n/a")
            continue
        r = max(vals) / static
        cells.append(f"{fmt_ratio(r)}{verdict(r <= 1.00)} ({max(vals):.3f} vs {static:.3f} s)")
    row(f"the same, slowest of {len(rows.get(('static_blob_s', 'nginx-static'), []))} rounds", "≤ 1.00×", cells)
    row(
        f"warm manifest-by-digest GET req/s (wrk, {conns} connections) vs nginx serving the file",
        "≥ 0.6×",
        ratio_cells("manifest_rps", "manifest_rps", "nginx-static", " req/s", rps,
                    lambda r: r >= 0.6, invert=False),
    )
    row(
        f"cold {blob} MiB blob: wall time vs straight from the upstream",
        "≤ 1.10×",
        ratio_cells("cold_blob_s", "direct_blob_s", "upstream", " s", secs, lambda r: r <= 1.10),
    )
    floor = median(rows, "hash_floor_s", "sha256")
    direct = median(rows, "direct_blob_s", "upstream")
    if floor is not None and direct:
        # Not a proxy's measure: the CPU any proxy that checks the digest before it sends the
        # last byte spends on top of moving the bytes. On a machine with few cores, shared by
        # the client and the upstream, it adds to the wall time.
        row(
            f"(for scale, not a proxy: one core's sha256 of the {blob} MiB blob, which a verifying proxy adds to the transfer's CPU, vs straight from the upstream)",
            "",
            [f"{fmt_ratio(floor / direct)} ({floor:.3f} vs {direct:.3f} s)"] + [""] * (len(SERVERS) - 1),
        )
    cells = []
    for key, _ in SERVERS:
        gets = [int(float(g)) for g in rows.get(("burst_upstream_gets", key), [])]
        oks = rows.get(("burst_cold_ok", key), [])
        if not gets:
            cells.append("n/a")
        else:
            shown = ", ".join(str(g) for g in gets)
            cells.append(
                f"{shown}{verdict(all(g == 1 for g in gets))} "
                f"(per round; clients with the whole blob: {', '.join(oks)})"
            )
    row(f"{burst_n} concurrent cold GETs of one {burst_mib} MiB blob: upstream GETs", "exactly 1", cells)
    cells = []
    for key, _ in SERVERS:
        c, w = median(rows, "burst_cold_s", key), median(rows, "burst_warm_s", key)
        if c is None or w is None or w == 0:
            cells.append("n/a")
        else:
            r = c / w
            n = len(rows.get(("burst_cold_s", key), []))
            cells.append(
                f"{fmt_ratio(r)}{verdict(r <= 1.05)} ({c:.2f} s cold vs {w:.2f} s warm"
                + (f", medians of {n} rounds)" if n > 1 else ")")
            )
    row("that cold burst's wall time vs the same burst once cached", "≤ 1.05×", cells)
    row(
        f"{burst_n} concurrent warm GETs of one {burst_mib} MiB blob vs the same burst from nginx serving the file",
        "≤ 1.05×",
        ratio_cells("burst_warm_s", "burst_static_s", "nginx-static", " s", secs, lambda r: r <= 1.05),
    )
    cells = []
    for key, _ in SERVERS:
        vals = [float(v) for v in rows.get(("join_ttfb_s", key), [])]
        oks = first(rows, "join_ok", key)
        gets = first(rows, "join_upstream_gets", key)
        during = first(rows, "join_during_fill", key)
        if not vals:
            cells.append("n/a")
            continue
        m = statistics.median(vals)
        cells.append(
            f"{m * 1000:.0f} ms{verdict(m <= 0.100)} (max {max(vals) * 1000:.0f} ms; "
            + (f"{during} joined during the fill; " if during else "")
            + f"{oks} complete; {gets} upstream GETs)"
        )
    row(f"clients joining a cold fill from a slow ({slow}/s) upstream: time to first byte", "median ≤ 100 ms", cells)
    cells = []
    for key, _ in SERVERS:
        v = first(rows, "rss_hwm_kib", key)
        ok = first(rows, "rss_wall_ok", key)
        secs_ = first(rows, "rss_wall_s", key)
        if v is None:
            cells.append("n/a")
            continue
        mib = float(v) / 1024
        cells.append(f"{mib:.1f} MiB{verdict(mib <= 20)} ({ok} complete in {float(secs_):.0f} s)")
    row(f"peak RSS while {big_n} clients stream one cold {big_mib} MiB blob", "≤ 20 MiB", cells)
    return "\n".join(out)


def report_pair(default_path, tuned_path):
    return "\n".join([
        "Default settings (nothing about the kernel or the VM changed):",
        "",
        report(default_path),
        "",
        "Tuned (free page reporting held off, memory touched before the sections that fill caches):",
        "",
        report(tuned_path),
    ])


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"ports": lambda: ports(int(args[0])),
     "join": lambda: join(*args),
     "rss": lambda: rss(*args),
     "hashtime": lambda: hashtime(*args),
     "report": lambda: print(report(*args)),
     "report-pair": lambda: print(report_pair(*args))}[cmd]()


if __name__ == "__main__":
    main()
