#!/usr/bin/env bash
# CPU profile of Baton under the end-to-end load. Baton runs with the
# configuration of benches/e2e.sh (RSA-2048 signing, alignment in warn mode,
# durable spool, MX through dnsmasq on 127.0.0.1). smtp-source sends MSGS
# messages of SIZE bytes over SESSIONS sessions to it, and smtp-sink receives
# them. `perf record` samples Baton's threads with the cpu-clock software
# event, because virtual machines often have no hardware counters (check
# with `perf stat -e instructions true`).
#
# Usage (as root): benches/profile.sh
# Settings: MSGS [20000] SIZE [4096] SESSIONS [20] FREQ [999] (samples per
#   second per CPU), BUILD [1], OUT [<repo>/target/bench-results/profile-<time>]
# Output: $OUT/perf.data, $OUT/report.txt (flat, by symbol, no children)
# and $OUT/report-dso.txt (by shared object).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MSGS=${MSGS:-20000}
SIZE=${SIZE:-4096}
SESSIONS=${SESSIONS:-20}
FREQ=${FREQ:-999}
BUILD=${BUILD:-1}
OUT=${OUT:-$REPO/target/bench-results/profile-$(date +%Y%m%d-%H%M%S)}
BATON=$REPO/target/release/baton
TOOLS=$REPO/benches/e2e_tools.py
PY=/usr/bin/python3

LOG_PREFIX=profile
# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"

[[ $(id -u) == 0 ]] || die "run as root: smtp-sink needs -u nobody, which only root may use"
command -v perf >/dev/null || die "perf not found; install it with: apt-get install linux-perf"
command -v dnsmasq >/dev/null || die "dnsmasq not found; install it with: apt-get install dnsmasq-base"

BATON_PID= DNS_PID= SINK_PID= WORK=
cleanup() {
    local rc=$?
    set +e
    [[ -n $SINK_PID ]] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
    [[ -n $BATON_PID ]] && kill -TERM "$BATON_PID" 2>/dev/null && wait "$BATON_PID" 2>/dev/null
    [[ -n $DNS_PID ]] && kill "$DNS_PID" 2>/dev/null && wait "$DNS_PID" 2>/dev/null
    [[ -n $WORK ]] && rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$OUT"
build_baton
GW_PORT= HTTP_PORT= DNS_PORT= SINK_PORT=
for name in GW_PORT HTTP_PORT DNS_PORT SINK_PORT; do take_port "$name"; done
WORK=$(mktemp -d /tmp/baton-profile.XXXXXX)
write_config "$WORK" "$GW_PORT" "$HTTP_PORT" "$DNS_PORT" "$SINK_PORT"
write_open_shaping "$WORK"
start_dns "$WORK" "$DNS_PORT"
start_baton "$WORK" "$GW_PORT" "$OUT/baton.log"
/usr/sbin/smtp-sink -u nobody -c "127.0.0.1:$SINK_PORT" 1024 > "$WORK/sink.count" 2>/dev/null &
SINK_PID=$!
wait_listen "$SINK_PORT" 10

log "load before the profile: $(uptime)"
perf record -e cpu-clock -F "$FREQ" -g --call-graph dwarf,16384 -p "$BATON_PID" -o "$OUT/perf.data" 2> "$OUT/perf-record.log" &
PERF_PID=$!
sleep 1
t0=$EPOCHREALTIME
cpu0=$(cpu_seconds "$BATON_PID")
/usr/sbin/smtp-source -s "$SESSIONS" -m "$MSGS" -l "$SIZE" -N -S profile \
    -f sender@bench.example -t rcpt@dest.example -M client.bench.example "127.0.0.1:$GW_PORT"
"$PY" "$TOOLS" wait-sink --file "$WORK/sink.count" --counts "$MSGS" --timeout 600 > /dev/null
t1=$EPOCHREALTIME
cpu1=$(cpu_seconds "$BATON_PID")
kill -INT "$PERF_PID"; wait "$PERF_PID" || true
log "$MSGS messages in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s," \
    "Baton CPU $(awk -v a="$cpu0" -v b="$cpu1" -v n="$MSGS" 'BEGIN { printf "%.2f s (%.3f ms/msg)", b - a, (b - a) * 1000 / n }'); load: $(uptime)"

perf report -i "$OUT/perf.data" --stdio --no-children --sort symbol --percent-limit 0.5 -g none \
    > "$OUT/report.txt" 2> /dev/null
perf report -i "$OUT/perf.data" --stdio --no-children --sort dso -g none > "$OUT/report-dso.txt" 2> /dev/null
perf report -i "$OUT/perf.data" --stdio --children --sort symbol --percent-limit 2 -g none \
    > "$OUT/report-children.txt" 2> /dev/null
head -60 "$OUT/report.txt"
log "results in $OUT"
