#!/usr/bin/env bash
# Large-queue benchmark: fill Baton's queue while nothing can be delivered,
# then measure the memory it takes, the restart time to the first delivery,
# and the delivery rate with the full queue against a small queue.
#
# Steps, run once with QUEUE_MSGS messages and once with BASE_MSGS:
#  1. Baton starts with a shaping policy that stops delivery: one connection
#     and one message a day to any site. No receiving server listens on the
#     MX port, so the one message allowed fails and is deferred, and every
#     other message waits in the ready queue.
#  2. smtp-source fills the queue (RSA-2048 signing and the alignment
#     check run as in production, see benches/common.sh).
#  3. Baton's RSS (VmRSS, VmHWM) and the spool's size are read.
#  4. Baton is stopped with STOP_SIGNAL, the open shaping policy replaces
#     the holding one, smtp-sink starts on the MX port, and Baton starts
#     again. Restart time = from the start command until the sink counts
#     its first message. Baton logs "baton started" when it has scheduled
#     every queued message; deliveries begin before that.
#  5. Delivery rate = messages the sink counts per second between the
#     SKIP-th message and the min(MEASURE_MSGS, queue - SKIP)-th, and
#     for every STEP messages in between (segments.tsv).
#
# Usage (as root): benches/big_queue.sh
# Settings (environment variables, defaults in brackets):
#   QUEUE_MSGS [1000000]  messages in the full queue
#   BASE_MSGS [20000]     messages in the small queue (0 = skip it)
#   MSG_SIZE [4096]       message size in bytes (smtp-source -l)
#   SESSIONS [20]         smtp-source sessions while filling
#   MEASURE_MSGS [100000] delivered messages the rate is measured over
#   SKIP [1000]           delivered messages before the rate window starts
#   STEP [50000]          also log the rate of every STEP delivered messages
#                         (segments.tsv), to see it change as the queue drains
#   STOP_SIGNAL [TERM]    TERM (graceful stop) or KILL (crash)
#   BUILD [1]             0 = use target/release/baton as it is
#   OUT [<repo>/target/bench-results/big-queue-<time>]
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUEUE_MSGS=${QUEUE_MSGS:-1000000}
BASE_MSGS=${BASE_MSGS:-20000}
MSG_SIZE=${MSG_SIZE:-4096}
SESSIONS=${SESSIONS:-20}
MEASURE_MSGS=${MEASURE_MSGS:-100000}
SKIP=${SKIP:-1000}
STEP=${STEP:-50000}
STOP_SIGNAL=${STOP_SIGNAL:-TERM}
BUILD=${BUILD:-1}
OUT=${OUT:-$REPO/target/bench-results/big-queue-$(date +%Y%m%d-%H%M%S)}
BATON=$REPO/target/release/baton
TOOLS=$REPO/benches/e2e_tools.py
PY=/usr/bin/python3
SMTP_SOURCE=/usr/sbin/smtp-source
SMTP_SINK=/usr/sbin/smtp-sink

LOG_PREFIX=big-queue
# shellcheck source=benches/common.sh
source "$REPO/benches/common.sh"

[[ $(id -u) == 0 ]] || die "run as root: smtp-sink needs -u nobody, which only root may use"
command -v dnsmasq >/dev/null || die "dnsmasq not found; install it with: apt-get install dnsmasq-base"
[[ -x $SMTP_SOURCE && -x $SMTP_SINK ]] || die "smtp-source or smtp-sink not found; install postfix (postfix_peer.sh install does)"
[[ $STOP_SIGNAL == TERM || $STOP_SIGNAL == KILL ]] || die "invalid STOP_SIGNAL=$STOP_SIGNAL; use TERM or KILL"

BATON_PID= DNS_PID= SINK_PID= SOURCE_PID= WORK=
cleanup() {
    local rc=$?
    set +e
    [[ -n $SOURCE_PID ]] && kill "$SOURCE_PID" 2>/dev/null && wait "$SOURCE_PID" 2>/dev/null
    [[ -n $SINK_PID ]] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
    if [[ -n $BATON_PID ]]; then
        kill -TERM "$BATON_PID" 2>/dev/null && wait "$BATON_PID" 2>/dev/null
        log "baton stopped"
    fi
    if [[ -n $DNS_PID ]]; then
        kill "$DNS_PID" 2>/dev/null && wait "$DNS_PID" 2>/dev/null
        log "dnsmasq stopped"
    fi
    [[ -n $WORK ]] && rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$OUT"
exec 2> >(tee -a "$OUT/big_queue.log" >&2)
build_baton

# Stops delivery: the first message may go (and fails, because nothing
# listens), and the next one waits a day for the message and connection rates.
write_holding_shaping() {
    cat > "$1/policies/shaping.yaml" <<'EOF'
default:
  max_connections: 1
  max_message_rate: "1/day"
  max_connection_rate: "1/day"
  total_max_connections: 1
EOF
}

metric() {                         # metric HTTP_PORT NAME
    curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}

# measure LABEL MESSAGES: one pass of steps 1-5; appends a row to rows.tsv.
measure() {
    local label=$1 messages=$2
    local gw_port= http_port= dns_port= sink_port=
    for name in gw_port http_port dns_port sink_port; do take_port "$name"; done
    WORK=$(mktemp -d /tmp/baton-big-queue.XXXXXX)
    write_config "$WORK" "$gw_port" "$http_port" "$dns_port" "$sink_port"
    write_holding_shaping "$WORK"
    start_dns "$WORK" "$dns_port"
    local baton_log=$OUT/baton-$label.log
    start_baton "$WORK" "$gw_port" "$baton_log"

    # ---- 2. fill
    log "$label: filling the queue with $messages messages of $MSG_SIZE bytes ($(uptime))"
    local t0 t1
    t0=$EPOCHREALTIME
    "$SMTP_SOURCE" -s "$SESSIONS" -m "$messages" -l "$MSG_SIZE" -N -S "big queue" \
        -f sender@bench.example -t rcpt@dest.example -M client.bench.example \
        "127.0.0.1:$gw_port" > "$OUT/source-$label.log" 2>&1 &
    SOURCE_PID=$!
    wait "$SOURCE_PID" || die "smtp-source failed; see $OUT/source-$label.log"
    SOURCE_PID=
    t1=$EPOCHREALTIME
    local received queued
    received=$(metric "$http_port" baton_messages_received_total)
    queued=$(metric "$http_port" baton_queue_messages)
    local fill_secs
    fill_secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    log "$label: filled in ${fill_secs}s: received=$received queued=$queued"
    ((${received%.*} >= messages)) || die "only $received of $messages messages were accepted"

    # ---- 3. memory and disk with the full queue
    sleep 5
    local rss hwm disk cpu_fill
    rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$BATON_PID/status")
    hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$BATON_PID/status")
    disk=$(du -sk "$WORK/data" | cut -f1)
    cpu_fill=$(cpu_seconds "$BATON_PID")
    log "$label: full queue: VmRSS=${rss} KiB VmHWM=${hwm} KiB spool=${disk} KiB baton_cpu=${cpu_fill}s"

    # ---- 4. restart with a receiver and open shaping
    local stop0 stop1
    stop0=$EPOCHREALTIME
    kill "-$STOP_SIGNAL" "$BATON_PID"
    wait "$BATON_PID" 2>/dev/null || true
    stop1=$EPOCHREALTIME
    BATON_PID=
    write_open_shaping "$WORK"
    "$SMTP_SINK" -u nobody -c "127.0.0.1:$sink_port" 1024 > "$WORK/sink.count" 2> "$OUT/sink-$label.err" &
    SINK_PID=$!
    wait_listen "$sink_port" 10
    sync
    log "$label: baton stopped with SIG$STOP_SIGNAL in $(awk -v a="$stop0" -v b="$stop1" 'BEGIN { printf "%.2f", b - a }')s; restarting"
    : > "$baton_log.restart"
    local start0
    start0=$EPOCHREALTIME
    (cd "$WORK" && exec "$BATON" serve --config "$WORK/baton.yaml") 2> "$baton_log.restart" &
    BATON_PID=$!
    local window_end=$(( MEASURE_MSGS < messages - SKIP ? MEASURE_MSGS : messages - SKIP ))
    local counts=(1 "$SKIP") count
    for ((count = SKIP + STEP; count < window_end; count += STEP)); do counts+=("$count"); done
    counts+=("$window_end")
    # Prints the epoch time at which the sink had counted each of "counts".
    local times
    read -r -a times < <("$PY" "$TOOLS" wait-sink --file "$WORK/sink.count" --counts "${counts[@]}" --timeout 3600)
    ((${#times[@]} == ${#counts[@]})) || die "timed out waiting for the sink to count $window_end messages; see $baton_log.restart"
    local rss_after hwm_after
    rss_after=$(awk '/^VmRSS/ { print $2 }' "/proc/$BATON_PID/status")
    hwm_after=$(awk '/^VmHWM/ { print $2 }' "/proc/$BATON_PID/status")
    local last=$((${#counts[@]} - 1))
    local resumed_secs restart_secs rate
    restart_secs=$(awk -v a="$start0" -v b="${times[0]}" 'BEGIN { printf "%.2f", b - a }')
    rate=$(awk -v a="${times[1]}" -v b="${times[$last]}" -v n=$((window_end - SKIP)) 'BEGIN { printf "%.0f", n / (b - a) }')
    # Baton logs "baton started" once it has scheduled every queued message
    # and its SMTP intake accepts connections.
    resumed_secs=$("$PY" "$TOOLS" log-time --file "$baton_log.restart" --text 'baton started' --since "$start0")
    log "$label: restart to first delivery ${restart_secs}s; process start to 'baton started' ${resumed_secs}s;" \
        "delivery rate ${rate}/s over messages $SKIP..$window_end; VmRSS at the end ${rss_after} KiB, VmHWM ${hwm_after} KiB"
    [[ $resumed_secs != nan ]] || log "WARN: no 'baton started' line yet in $baton_log.restart"
    local i
    for ((i = 2; i <= last; i++)); do
        printf '%s\t%s\t%s\t%.1f\t%.0f\n' "$label" "${counts[i-1]}" "${counts[i]}" \
            "$(awk -v a="$start0" -v b="${times[i]}" 'BEGIN { print b - a }')" \
            "$(awk -v a="${times[i-1]}" -v b="${times[i]}" -v n=$((counts[i] - counts[i-1])) 'BEGIN { print n / (b - a) }')" \
            >> "$OUT/segments.tsv"
    done
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$messages" "$fill_secs" \
        "$rss" "$hwm" "$disk" "$restart_secs" "$resumed_secs" "$rate" "$SKIP..$window_end" "$rss_after" "$hwm_after" \
        >> "$OUT/rows.tsv"

    # ---- stop everything of this pass
    kill -TERM "$BATON_PID"; wait "$BATON_PID" 2>/dev/null || true; BATON_PID=
    kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=
    kill "$DNS_PID"; wait "$DNS_PID" 2>/dev/null || true; DNS_PID=
    rm -rf "$WORK"; WORK=
}

printf 'queue\tmessages\tfill_secs\tvm_rss_kib\tvm_hwm_kib\tspool_kib\trestart_to_first_delivery_secs\tstart_to_baton_started_secs\tdelivery_rate\trate_window\tvm_rss_at_end_kib\tvm_hwm_at_end_kib\n' > "$OUT/rows.tsv"
printf 'queue\tfrom\tto\tsecs_after_start\trate\n' > "$OUT/segments.tsv"
log "machine: $(nproc) cores, $(uptime)"
if ((BASE_MSGS > 0)); then measure small "$BASE_MSGS"; fi
measure full "$QUEUE_MSGS"
column -t -s $'\t' "$OUT/rows.tsv"
column -t -s $'\t' "$OUT/segments.tsv"
log "results in $OUT/rows.tsv"
