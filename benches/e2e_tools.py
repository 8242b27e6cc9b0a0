#!/usr/bin/env python3
"""Helpers of benches/e2e.sh and benches/big_queue.sh (standard library only).

Subcommands:
  poll         sample Baton's /metrics and /proc/<pid> every --interval
               seconds into a JSON-lines file, until SIGTERM
  paced        send mail at a fixed rate and measure, per message, the time
               from the end of DATA (the final ".\\r\\n") to the 250 reply
  median-rate  print the median rate of one scenario and size of results.tsv
  wait-sink    wait until smtp-sink's -c counter reaches each of --counts,
               and print the epoch time each was first seen
  log-time     print when Baton first logged a text, in seconds after --since
  report       Markdown tables from the harness results, the metrics samples
               and the paced run
"""

import argparse
import asyncio
import csv
import json
import math
import re
import signal
import statistics
import sys
import time
import urllib.request


# --------------------------------------------------------------------- poll
def read_proc(pid):
    """Returns (VmRSS KiB, VmHWM KiB, utime+stime seconds) of a process."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return rss, hwm, ticks / CLOCK_TICKS


CLOCK_TICKS = 100
SAMPLE_LINE = re.compile(r'^(baton_acceptance_seconds_(?:bucket|count|sum)|baton_messages_received_total)(?:\{le="([^"]+)"\})? (\S+)$')


def parse_metrics(text):
    sample = {"buckets": {}, "count": 0, "sum": 0.0, "received": 0}
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if not match:
            continue
        name, le, value = match.groups()
        if name.endswith("_bucket"):
            sample["buckets"][le] = int(float(value))
        elif name.endswith("_count"):
            sample["count"] = int(float(value))
        elif name.endswith("_sum"):
            sample["sum"] = float(value)
        else:
            sample["received"] = int(float(value))
    return sample


def poll(args):
    global CLOCK_TICKS
    import os
    CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with open(args.out, "a") as out:
        while not stop:
            started = time.time()
            try:
                with urllib.request.urlopen(args.url, timeout=5) as response:
                    sample = parse_metrics(response.read().decode())
                sample["rss_kib"], sample["hwm_kib"], sample["cpu_s"] = read_proc(args.pid)
            except (OSError, ValueError) as error:
                print(f"poll: sample failed: {error}", file=sys.stderr)
                if not os.path.exists(f"/proc/{args.pid}"):
                    return
                time.sleep(args.interval)
                continue
            sample["t"] = started
            out.write(json.dumps(sample) + "\n")
            out.flush()
            time.sleep(max(0.0, args.interval - (time.time() - started)))


# -------------------------------------------------------------------- paced
async def read_reply(reader):
    """Reads one (possibly multi-line) SMTP reply; returns its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3])


def message_text(number, size):
    head = (
        f"From: Sender <sender@bench.example>\r\n"
        f"To: {number}rcpt@dest.example\r\n"
        f"Subject: paced {number}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <paced-{number}-{time.time_ns()}@bench.example>\r\n"
        f"\r\n"
    ).encode()
    body = bytearray()
    while len(head) + len(body) + 78 <= size:
        body += b"x" * 76 + b"\r\n"
    return head + bytes(body)


async def paced_session(args, tokens, results):
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    if await read_reply(reader) != 220:
        raise ConnectionError("no 220 greeting")
    writer.write(b"EHLO paced.bench.example\r\n")
    if await read_reply(reader) != 250:
        raise ConnectionError("EHLO rejected")
    while True:
        token = await tokens.get()
        if token is None:
            break
        number, due = token
        lag = time.monotonic() - due
        writer.write(
            f"MAIL FROM:<sender@bench.example>\r\nRCPT TO:<{number}rcpt@dest.example>\r\nDATA\r\n".encode()
        )
        codes = [await read_reply(reader) for _ in range(3)]
        if codes != [250, 250, 354]:
            results.append({"ok": False, "codes": codes, "lag": lag})
            writer.write(b"RSET\r\n")
            await read_reply(reader)
            continue
        writer.write(message_text(number, args.size))
        await writer.drain()
        end_of_data = time.perf_counter()
        writer.write(b".\r\n")
        code = await read_reply(reader)
        latency = time.perf_counter() - end_of_data
        results.append({"ok": code == 250, "codes": [code], "latency": latency, "lag": lag})
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def paced_main(args):
    tokens = asyncio.Queue()
    results = []
    sessions = [asyncio.create_task(paced_session(args, tokens, results)) for _ in range(args.sessions)]
    total = int(args.rate * args.seconds)
    started_wall = time.time()
    start = time.monotonic() + 0.5
    for number in range(total):
        due = start + number / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tokens.put_nowait((number, due))
    for _ in sessions:
        tokens.put_nowait(None)
    await asyncio.gather(*sessions)
    elapsed = time.monotonic() - start
    return results, started_wall, time.time(), elapsed


def quantile(sorted_values, q):
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def paced(args):
    results, started, ended, elapsed = asyncio.run(paced_main(args))
    latencies = sorted(r["latency"] for r in results if r["ok"])
    lags = sorted(r["lag"] for r in results)
    summary = {
        "target_rate": args.rate,
        "seconds": args.seconds,
        "sessions": args.sessions,
        "size": args.size,
        "sent": len(results),
        "accepted": len(latencies),
        "failed": len(results) - len(latencies),
        "achieved_rate": len(results) / elapsed,
        "p50_ms": quantile(latencies, 0.50) * 1000,
        "p90_ms": quantile(latencies, 0.90) * 1000,
        "p99_ms": quantile(latencies, 0.99) * 1000,
        "p999_ms": quantile(latencies, 0.999) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else math.nan,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else math.nan,
        "client_lag_p99_ms": quantile(lags, 0.99) * 1000,
        "start": started,
        "end": ended,
    }
    with open(args.out, "w") as out:
        json.dump(summary, out, indent=1)
    print(
        f"paced: target {args.rate}/s achieved {summary['achieved_rate']:.0f}/s, "
        f"accepted {summary['accepted']}/{summary['sent']}, end of DATA -> 250: "
        f"p50 {summary['p50_ms']:.2f} ms p99 {summary['p99_ms']:.2f} ms max {summary['max_ms']:.2f} ms "
        f"(client lag p99 {summary['client_lag_p99_ms']:.1f} ms)",
        file=sys.stderr,
    )


# ---------------------------------------------------------------- wait-sink
SINK_RECORD = re.compile(rb"mesg=(\d+)")


def wait_sink(args):
    """smtp-sink -c writes "sess=N quit=N mesg=N" records ended by CR; the
    last complete record contains the count. Polled every 5 ms."""
    import os
    targets = sorted(args.counts)
    seen = []
    deadline = time.monotonic() + args.timeout
    count = 0
    with open(args.file, "rb") as f:
        while targets:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 128))
            records = f.read().split(b"\r")[:-1]
            now = time.time()
            if records:
                match = SINK_RECORD.search(records[-1])
                if match:
                    count = int(match.group(1))
            while targets and count >= targets[0]:
                seen.append(now)
                targets.pop(0)
            if time.monotonic() > deadline:
                sys.exit(f"wait-sink: timed out at {count} messages")
            time.sleep(0.005)
    print(" ".join(f"{t:.6f}" for t in seen))


# ----------------------------------------------------------------- log-time
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z")


def log_time(args):
    from datetime import datetime, timezone
    with open(args.file, errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            if args.text not in line:
                continue
            match = TIMESTAMP.search(line)
            if match:
                moment = datetime.fromisoformat(match.group(1)).replace(tzinfo=timezone.utc)
                print(f"{moment.timestamp() - args.since:.2f}")
                return
    print("nan")


# ------------------------------------------------------------------- report
def read_results(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def final_attempts(rows):
    """Maps (scenario, size, runK) to the row of its last attempt: the
    harness repeats a noisy run and stops at the first clean one."""
    final = {}
    for row in rows:
        run = row["run"].split("-retry")[0]
        final[(row["scenario"], row["size"], run)] = row
    return final


def median_rate(args):
    rows = [r for r in final_attempts(read_results(args.results)).values()
            if r["scenario"] == args.scenario and r["size"] == args.size and r["ok"] == "1"]
    if not rows:
        sys.exit(f"median-rate: no completed {args.scenario} {args.size} runs in {args.results}")
    print(f"{statistics.median(float(r['rate']) for r in rows):.0f}")


def histogram_quantile(q, start, end):
    """Prometheus-style quantile of the observations between two samples:
    linear interpolation inside the bucket that contains the q-th one."""
    bounds = sorted((float(le), le) for le in end["buckets"] if le != "+Inf")
    total = end["count"] - start["count"]
    if total <= 0:
        return math.nan
    rank = q * total
    lower = 0.0
    previous = 0
    for bound, le in bounds:
        cumulative = end["buckets"][le] - start["buckets"].get(le, 0)
        if cumulative >= rank:
            inside = cumulative - previous
            fraction = (rank - previous) / inside if inside else 1.0
            return lower + (bound - lower) * fraction
        lower, previous = bound, cumulative
    return math.inf


def load_samples(path):
    samples = []
    try:
        with open(path) as f:
            for line in f:
                samples.append(json.loads(line))
    except FileNotFoundError:
        pass
    return samples


RUN_LINE = re.compile(r"\s(warmup|run\d+(?:-retry\d+)?): scenario=external msgs=(\d+) size=(\S+)")


def external_windows(log_path, samples):
    """Finds each external run of the harness log in the metrics samples:
    the runs came in log order, and each one raised the received counter
    by its message count. Returns (label, size, count, first sample index,
    last sample index)."""
    runs = []
    with open(log_path) as log:
        for line in log:
            match = RUN_LINE.search(line)
            if match:
                runs.append((match.group(1), match.group(3), int(match.group(2))))
    windows = []
    position = 0
    for label, size, count in runs:
        while position + 1 < len(samples) and samples[position + 1]["received"] == samples[position]["received"]:
            position += 1
        first = position
        last = first
        while last + 1 < len(samples) and samples[last]["received"] - samples[first]["received"] < count:
            last += 1
        windows.append((label, size, count, first, last))
        position = last
    return windows


def report(args):
    rows = read_results(args.results)
    final = final_attempts(rows)
    samples = load_samples(args.metrics)
    windows = {}
    received = 0
    if samples:
        for label, size, count, first, last in external_windows(args.harness_log, samples):
            windows[(size, label)] = (samples[first], samples[last], max(s["rss_kib"] for s in samples[first:last + 1]))
            received += count

    def row_of(scenario, size, run):
        return final.get((scenario, size, run))

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    run_labels = sorted({k[2] for k in final}, key=lambda r: int(r[3:]))
    print("## Runs (last attempt of each run)\n")
    print("| size | run | Postfix msg/s | Postfix+OpenDKIM msg/s | Baton msg/s | Baton/Postfix | Baton/Postfix+OpenDKIM "
          "| Baton CPU ms/msg | Postfix+OpenDKIM CPU ms/msg | accept p50 ms | accept p99 ms | Baton peak RSS MiB | noisy (pf/dkim/baton) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for run in run_labels:
            pf, dk, gw = (row_of(s, size, run) for s in ("postfix", "postfix_dkim", "external"))

            def rate(row):
                return float(row["rate"]) if row and row["ok"] == "1" else math.nan

            def cpu(row):
                if not row:
                    return math.nan
                return (float(row["mta_cpu_s"]) + float(row["dkim_cpu_s"])) * 1000 / int(row["msgs"])

            p50 = p99 = rss = math.nan
            if gw and (size, gw["run"]) in windows:
                start, end, peak = windows[(size, gw["run"])]
                p50 = histogram_quantile(0.5, start, end) * 1000
                p99 = histogram_quantile(0.99, start, end) * 1000
                rss = peak / 1024
            noisy = "/".join(r["noisy"] if r else "-" for r in (pf, dk, gw))
            print(f"| {size} | {run} | {rate(pf):.0f} | {rate(dk):.0f} | {rate(gw):.0f} | {rate(gw) / rate(pf):.2f} "
                  f"| {rate(gw) / rate(dk):.2f} | {cpu(gw):.3f} | {cpu(dk):.3f} | {p50:.2f} | {p99:.2f} | {rss:.0f} | {noisy} |")

    print("\n## Median and spread (same runs)\n")
    print("| scenario | size | median msg/s | min | max | spread | median CPU ms/msg |")
    print("|---|---|---|---|---|---|---|")
    for scenario in ("postfix", "postfix_dkim", "external"):
        for size in sizes:
            use = [r for (s, z, _), r in final.items() if s == scenario and z == size and r["ok"] == "1"]
            if not use:
                continue
            rates = [float(r["rate"]) for r in use]
            median = statistics.median(rates)
            cpu = statistics.median((float(r["mta_cpu_s"]) + float(r["dkim_cpu_s"])) * 1000 / int(r["msgs"]) for r in use)
            print(f"| {scenario} | {size} | {median:.0f} | {min(rates):.0f} | {max(rates):.0f} "
                  f"| {(max(rates) - min(rates)) / median * 100:.1f}% | {cpu:.3f} |")

    print("\n## Baton process\n")
    print(f"- peak RSS (VmHWM) over the whole run: {args.hwm_kib / 1024:.0f} MiB")
    if received:
        print(f"- CPU over the harness run: Baton {args.baton_cpu:.1f} s, dnsmasq {args.dns_cpu:.1f} s, "
              f"for {received} messages received (warmups included): Baton alone "
              f"{args.baton_cpu * 1000 / received:.3f} ms/msg, dnsmasq {args.dns_cpu * 1000 / received:.4f} ms/msg")
    print("- the CPU column above is the harness's: Baton and dnsmasq together (GW_PID); acceptance "
          "p50/p99 come from the baton_acceptance_seconds histogram (buckets 1, 2.5, 5, 10, 25, 50 ms, ...), "
          "interpolated inside a bucket as Prometheus does")

    try:
        with open(args.paced) as f:
            paced_summary = json.load(f)
    except FileNotFoundError:
        return
    print("\n## Acceptance latency at a fixed rate\n")
    in_window = [s for s in samples if paced_summary["start"] - 1 <= s["t"] <= paced_summary["end"] + 1]
    histogram = ""
    if len(in_window) >= 2:
        histogram = (f"; Baton's histogram over the same window: p50 "
                     f"{histogram_quantile(0.5, in_window[0], in_window[-1]) * 1000:.2f} ms, p99 "
                     f"{histogram_quantile(0.99, in_window[0], in_window[-1]) * 1000:.2f} ms")
    print(f"- {paced_summary['sessions']} sessions, {paced_summary['size']}-byte messages, target "
          f"{paced_summary['target_rate']:.0f} msg/s for {paced_summary['seconds']} s, achieved "
          f"{paced_summary['achieved_rate']:.0f} msg/s, {paced_summary['accepted']}/{paced_summary['sent']} accepted")
    print(f"- end of DATA to 250, measured by the client: p50 {paced_summary['p50_ms']:.2f} ms, "
          f"p90 {paced_summary['p90_ms']:.2f} ms, p99 {paced_summary['p99_ms']:.2f} ms, "
          f"p99.9 {paced_summary['p999_ms']:.2f} ms, max {paced_summary['max_ms']:.2f} ms{histogram}")
    print(f"- client lag (message sent later than scheduled) p99: {paced_summary['client_lag_p99_ms']:.1f} ms")


# --------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("poll")
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    p.set_defaults(run=poll)

    p = commands.add_parser("paced")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, required=True, help="messages per second")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096, help="message size in bytes")
    p.add_argument("--out", required=True)
    p.set_defaults(run=paced)

    p = commands.add_parser("median-rate")
    p.add_argument("--results", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--size", required=True)
    p.set_defaults(run=median_rate)

    p = commands.add_parser("wait-sink")
    p.add_argument("--file", required=True, help="smtp-sink -c output")
    p.add_argument("--counts", type=int, nargs="+", required=True)
    p.add_argument("--timeout", type=float, default=1800, help="seconds")
    p.set_defaults(run=wait_sink)

    p = commands.add_parser("log-time")
    p.add_argument("--file", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--since", type=float, required=True, help="epoch seconds")
    p.set_defaults(run=log_time)

    p = commands.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--harness-log", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--paced", required=True)
    p.add_argument("--hwm-kib", type=int, required=True)
    p.add_argument("--baton-cpu", type=float, required=True, help="CPU seconds of Baton during the harness run")
    p.add_argument("--dns-cpu", type=float, required=True, help="CPU seconds of dnsmasq during the harness run")
    p.set_defaults(run=report)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
