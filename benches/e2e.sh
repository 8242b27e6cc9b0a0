#!/usr/bin/env bash
# End-to-end benchmark: Baton against plain Postfix and Postfix + OpenDKIM,
# measured in one run of the peer harness (smtp-source load, smtp-sink
# receiver, everything on 127.0.0.1).
#
# Baton runs as in production: RSA-2048 DKIM signing for the From domain of
# the load (bench.example), SPF/DMARC alignment in `warn` mode, the durable
# spool (fsync before every 250), and delivery through an MX lookup. The MX,
# the DKIM key and a DMARC record are served by a dnsmasq on 127.0.0.1 that
# serves only its own records and never forwards a query. Shaping limits
# are raised so that they do not bind.
#
# Usage (as root, from anywhere):
#   benches/e2e.sh
#
# Settings (environment variables, defaults in brackets):
#   PEER_HARNESS [<repo>/../shared/bench/postfix_peer.sh]  the peer harness
#   MSGS [20000] SESSIONS [20] SIZES ["4k 50k"] RUNS [3]
#   SCENARIOS ["postfix postfix_dkim external"]
#   BUILD [1]     0 = use target/release/baton as it is
#   PACED [1]     after the harness, measure acceptance latency with
#                 benches/e2e_tools.py at PACED_FRACTION of Baton's median
#                 4k rate, for PACED_SECONDS
#   PACED_FRACTION [0.5] PACED_SECONDS [30] PACED_SIZE [4096]
#   OUT [<repo>/target/bench-results/e2e-<time>]  logs, tables, config
# Every other variable of the harness (QUIET_PCT, RUN_GAP, ...) passes
# through to it.
#
# Output: $OUT/report.md (tables) and $OUT/harness.log, plus the harness's
# own results.tsv and summary.txt, copied into $OUT.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER_HARNESS=${PEER_HARNESS:-$REPO/../shared/bench/postfix_peer.sh}
MSGS=${MSGS:-20000}
SESSIONS=${SESSIONS:-20}
SIZES=${SIZES:-"4k 50k"}
RUNS=${RUNS:-3}
SCENARIOS=${SCENARIOS:-"postfix postfix_dkim external"}
BUILD=${BUILD:-1}
PACED=${PACED:-1}
PACED_FRACTION=${PACED_FRACTION:-0.5}
PACED_SECONDS=${PACED_SECONDS:-30}
PACED_SIZE=${PACED_SIZE:-4096}
OUT=${OUT:-$REPO/target/bench-results/e2e-$(date +%Y%m%d-%H%M%S)}
BATON=$REPO/target/release/baton
export BUILD
TOOLS=$REPO/benches/e2e_tools.py
PY=/usr/bin/python3

LOG_PREFIX=e2e
# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"

[[ -f $PEER_HARNESS ]] || die "peer harness not found at $PEER_HARNESS; set PEER_HARNESS to the path of postfix_peer.sh"
[[ $(id -u) == 0 ]] || die "run as root: the peer harness runs its own Postfix instance"
command -v dnsmasq >/dev/null || die "dnsmasq not found; install it with: apt-get install dnsmasq-base"

GW_PORT= HTTP_PORT= DNS_PORT=
for name in GW_PORT HTTP_PORT DNS_PORT SINK_PORT PF_PORT DKIM_PORT; do take_port "$name"; done
export SINK_PORT PF_PORT DKIM_PORT

BATON_PID= DNS_PID= POLL_PID= SINK_PID=
cleanup() {
    local rc=$?
    set +e
    [[ -n $POLL_PID ]] && kill "$POLL_PID" 2>/dev/null && wait "$POLL_PID" 2>/dev/null
    [[ -n $SINK_PID ]] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
    if [[ -n $BATON_PID ]]; then
        kill -TERM "$BATON_PID" 2>/dev/null && wait "$BATON_PID" 2>/dev/null
        log "baton stopped"
    fi
    if [[ -n $DNS_PID ]]; then
        kill "$DNS_PID" 2>/dev/null && wait "$DNS_PID" 2>/dev/null
        log "dnsmasq stopped"
    fi
    [[ -n ${WORK:-} ]] && rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$OUT"
exec 2> >(tee -a "$OUT/e2e.log" >&2)

build_baton
WORK=$(mktemp -d /tmp/baton-e2e.XXXXXX)
write_config "$WORK" "$GW_PORT" "$HTTP_PORT" "$DNS_PORT" "$SINK_PORT"
write_open_shaping "$WORK"
cp -r "$WORK/baton.yaml" "$WORK/policies" "$OUT/"
start_dns "$WORK" "$DNS_PORT"
start_baton "$WORK" "$GW_PORT" "$OUT/baton.log"
"$BATON" dkim check --config "$WORK/baton.yaml" >&2 || die "the DKIM key is not published as expected"

# Prove that the measured setup signs: one swaks message and three
# smtp-source messages through Baton, DKIM-verified by the harness.
log "verifying Baton's signatures with the harness (verify-external)"
GW_PORT=$GW_PORT DKIM_TXT=$WORK/dkim.txt bash "$PEER_HARNESS" verify-external >&2
# The harness names its dump and result folders by the second it starts.
# Started within the same second, the measuring run would share the dump
# folder and check Baton's messages against OpenDKIM's key, and fail.
sleep 1

# ---------------------------------------------------------------- measure
"$PY" "$TOOLS" poll --url "http://127.0.0.1:$HTTP_PORT/metrics" --pid "$BATON_PID" \
    --out "$OUT/metrics.jsonl" &
POLL_PID=$!
BATON_CPU0=$(cpu_seconds "$BATON_PID") DNS_CPU0=$(cpu_seconds "$DNS_PID")

log "harness: SCENARIOS='$SCENARIOS' MSGS=$MSGS SESSIONS=$SESSIONS SIZES='$SIZES' RUNS=$RUNS"
uptime >&2
MSGS=$MSGS SESSIONS=$SESSIONS SIZES=$SIZES RUNS=$RUNS SCENARIOS=$SCENARIOS \
    GW_PORT=$GW_PORT GW_PID="$BATON_PID,$DNS_PID" \
    bash "$PEER_HARNESS" bench > "$OUT/harness.out" 2> >(tee "$OUT/harness.log" >&2)

BATON_CPU1=$(cpu_seconds "$BATON_PID") DNS_CPU1=$(cpu_seconds "$DNS_PID")
HWM=$(awk '/^VmHWM/ { print $2 }' "/proc/$BATON_PID/status")
RESULTS=$(sed -n 's/^# summary .*results in \(.*\))$/\1/p' "$OUT/harness.out")
[[ -d $RESULTS ]] || die "harness results folder not found in $OUT/harness.out"
cp "$RESULTS/results.tsv" "$RESULTS/summary.txt" "$RESULTS/env.txt" "$OUT/"

# ---------------------------------------------------------------- paced load
if [[ $PACED == 1 ]] && [[ $SCENARIOS == *external* ]] && [[ " $SIZES " == *" 4k "* ]]; then
    RATE=$("$PY" "$TOOLS" median-rate --results "$OUT/results.tsv" --scenario external --size 4k)
    PACED_RATE=$(awk -v r="$RATE" -v f="$PACED_FRACTION" 'BEGIN { printf "%d", r * f }')
    log "paced load: $PACED_RATE msg/s (${PACED_FRACTION} x median 4k rate $RATE) for ${PACED_SECONDS}s"
    /usr/sbin/smtp-sink -u nobody 127.0.0.1:"$SINK_PORT" 1024 > /dev/null 2>&1 &
    SINK_PID=$!
    wait_listen "$SINK_PORT" 10
    log "load before the paced run: $(uptime)"
    "$PY" "$TOOLS" paced --port "$GW_PORT" --rate "$PACED_RATE" --seconds "$PACED_SECONDS" \
        --sessions "$SESSIONS" --size "$PACED_SIZE" --out "$OUT/paced.json" >&2
    sleep 2
    kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=
fi
kill "$POLL_PID"; wait "$POLL_PID" 2>/dev/null || true; POLL_PID=

# ---------------------------------------------------------------- report
"$PY" "$TOOLS" report --results "$OUT/results.tsv" --harness-log "$OUT/harness.log" \
    --metrics "$OUT/metrics.jsonl" --paced "$OUT/paced.json" --hwm-kib "$HWM" \
    --baton-cpu "$(awk -v a="$BATON_CPU0" -v b="$BATON_CPU1" 'BEGIN { print b - a }')" \
    --dns-cpu "$(awk -v a="$DNS_CPU0" -v b="$DNS_CPU1" 'BEGIN { print b - a }')" \
    > "$OUT/report.md"
{ echo; echo "## Harness summary"; echo; sed 's/^/    /' "$OUT/summary.txt"; } >> "$OUT/report.md"
cat "$OUT/report.md"
log "results in $OUT"
