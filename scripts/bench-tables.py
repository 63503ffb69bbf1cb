#!/usr/bin/env python3
"""Render the Markdown tables of BENCHMARKS.md from a bench results file (JSON lines,
as written by `bench --record`, e.g. by scripts/bench-report)."""

import json
import sys

MIB = 1 << 20


def size(b):
    return f"{b // 1024} KiB" if b < MIB else f"{b // MIB} MiB"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def others(r):
    """Answers that are not 2xx, by status."""
    bad = {k: v for k, v in r["statuses"].items() if not k.startswith("2")}
    return ", ".join(f"{k}: {v}" for k, v in bad.items()) or "0"


def ops(r):
    return ", ".join(f"{k} {v:.2f}" for k, v in r["blob_ops_per_message"].items()) or "–"


def rss(r):
    return "–" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.1f}"


def collapse(runs):
    """Repeated runs of one measurement become their median run (by requests/s), with
    the range of requests/s noted."""
    groups = {}
    for r in runs:
        groups.setdefault((r["label"], r["scenario"], r["clients"], r["size"]), []).append(r)
    out = []
    for g in groups.values():
        g.sort(key=lambda r: r["per_second"])
        median = dict(g[len(g) // 2])
        median["runs"] = len(g)
        median["range"] = (g[0]["per_second"], g[-1]["per_second"])
        out.append(median)
    return out


def rate(r):
    if r["runs"] == 1:
        return f"{r['per_second']:.0f}"
    lo, hi = r["range"]
    return f"{r['per_second']:.0f} (median of {r['runs']}: {lo:.0f}–{hi:.0f})"


def main(path):
    runs = collapse([json.loads(line) for line in open(path) if line.strip()])
    configs = [c for c in ("embedded", "production") if any(r["label"] == c for r in runs)]

    for c in configs:
        print(f"\n### {c}: every scenario\n")
        rows = [
            (r["scenario"], r["clients"], size(r["size"]), rate(r),
             f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}",
             others(r), ops(r), rss(r))
            for r in runs if r["label"] == c
        ]
        print(table(["scenario", "clients", "payload", "requests/s", "p50 ms", "p90 ms", "p99 ms",
                     "max ms", "not 2xx", "blob ops per message sent", "server peak RSS MiB"], rows))

    print("\n### send against the backend floor (1 KiB)\n")
    rows = []
    for c in configs:
        for floor in (r for r in runs if r["label"] == c and r["scenario"] == "floor"):
            send = next((r for r in runs if r["label"] == c and r["scenario"] == "send"
                         and r["size"] == 1024 and r["clients"] == floor["clients"]), None)
            if send is None:
                continue
            rows.append((c, floor["clients"], rate(floor), rate(send),
                         f"{send['per_second'] / floor['per_second']:.2f}",
                         f"{floor['p50_ms']:.1f} / {floor['p99_ms']:.1f}",
                         f"{send['p50_ms']:.1f} / {send['p99_ms']:.1f}"))
    print(table(["configuration", "clients", "floor sends/s", "server sends/s", "server / floor",
                 "floor p50 / p99 ms", "server p50 / p99 ms"], rows))

    print("\n### where the CPU went: milliseconds per send, by process (64 clients, 1 KiB)\n")
    print("In `floor` runs the bench program does the server's storage work itself; in `send`")
    print("runs it is only the HTTP client. `idle` is the share of both CPUs left unused.\n")
    names = ["catbird-server", "bench", "postgres", "s3_server", "kworker"]
    rows = []
    for c in configs:
        for r in runs:
            if (r["label"] == c and r["scenario"] in ("floor", "send") and r["size"] == 1024
                    and r["clients"] == 64 and r.get("cpu_ms_per_request")):
                cpu = r["cpu_ms_per_request"]
                known = [cpu.get(n, 0.0) for n in names]
                rest = sum(cpu.values()) - sum(known)
                idle = r.get("idle_percent")
                rows.append((c, r["scenario"], *(f"{v:.3f}" if v >= 0.0005 else "–" for v in known),
                             f"{rest:.3f}", f"{sum(cpu.values()):.3f}",
                             "–" if idle is None else f"{idle:.0f} %"))
    print(table(["configuration", "run", *names, "other", "total", "idle"], rows))

    print("\n### scale: 1,000 other recipients' messages in the tables\n")
    rows = []
    for c in configs:
        base = {}
        for r in runs:
            if not r["label"].startswith(c + " rows="):
                continue
            n = int(r["label"].split("rows=")[1])
            key = (r["scenario"], r["clients"])
            base.setdefault(key, r["p50_ms"])
            rows.append((c, f"{n:,}", r["scenario"], r["clients"], f"{r['per_second']:.0f}",
                         f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                         f"{r['p50_ms'] / base[key]:.2f}"))
    print(table(["configuration", "seeded rows", "scenario", "clients", "requests/s", "p50 ms",
                 "p99 ms", "p50 / p50 at 1 k rows"], rows))

    print("\n### memory: server peak RSS during send runs\n")
    rows = []
    for c in configs:
        for r in runs:
            if r["label"] == c and r["scenario"] == "send":
                limit = max(128, 64 + 4 * r["clients"] * r["size"] / MIB)
                within = r["peak_rss_mib"] is not None and r["peak_rss_mib"] <= limit
                rows.append((c, size(r["size"]), r["clients"], rss(r), f"{limit:.0f}",
                             "yes" if within else "**no**"))
    print(table(["configuration", "payload", "clients", "peak RSS MiB",
                 "limit MiB: max(128, 64 + 4 × payload in flight)", "within"], rows))


if __name__ == "__main__":
    main(sys.argv[1])
