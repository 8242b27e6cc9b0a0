# Shared by benches/e2e.sh and benches/big_queue.sh (sourced, not run):
# free ports, a Baton configuration as in production, and the local DNS
# server that publishes its MX, DKIM and DMARC records on 127.0.0.1.
#
# The caller sets REPO, BATON, OUT and LOG_PREFIX, and kills BATON_PID and
# DNS_PID when it exits.

log() { printf '[%(%H:%M:%S)T] %s: %s\n' -1 "$LOG_PREFIX" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

is_listening() { [[ -n $(ss -Hltun "sport = :$1" 2>/dev/null) ]]; }

# take_port NAME: sets variable NAME to a port that nothing on this machine
# listens on (TCP or UDP) and that no earlier call returned. A variable that
# is already set is kept.
TAKEN_PORTS=" "
take_port() {
    local port
    if [[ -n ${!1:-} ]]; then
        TAKEN_PORTS+="${!1} "
        return
    fi
    while :; do
        port=$((20000 + RANDOM % 20000))
        [[ $TAKEN_PORTS == *" $port "* ]] && continue
        is_listening "$port" && continue
        TAKEN_PORTS+="$port "
        printf -v "$1" '%s' "$port"
        return
    done
}

wait_listen() {                    # wait_listen PORT SECONDS
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        is_listening "$1" && return 0
        sleep 0.05
    done
    die "nothing listening on 127.0.0.1:$1 after $2 s"
}

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
    awk -v t="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); split($0, f, " "); print (f[12] + f[13]) / t }' "/proc/$1/stat"
}

build_baton() {
    if [[ ${BUILD:-1} == 1 ]]; then
        log "building baton (release)"
        (cd "$REPO" && cargo build --release --ignore-rust-version) >&2
    fi
    [[ -x $BATON ]] || die "$BATON not found; build it with cargo build --release --ignore-rust-version"
}

# write_config WORK GW_PORT HTTP_PORT DNS_PORT SINK_PORT
# Writes WORK/baton.yaml and WORK/policies/senders.yaml, makes an RSA-2048
# key for bench.example with `baton dkim keygen`, and sets DKIM_TXT_ARG
# (the record as dnsmasq --txt-record strings) and WORK/dkim.txt (the
# record as one line, for the harness's DKIM check).
write_config() {
    local work=$1 gw_port=$2 http_port=$3 dns_port=$4 sink_port=$5
    mkdir -p "$work/policies"
    cat > "$work/baton.yaml" <<EOF
hostname: mta.bench.example
smtp:
  listen: ["127.0.0.1:$gw_port"]
http:
  listen: "127.0.0.1:$http_port"
spool:
  path: $work/data
dns:
  nameservers: ["127.0.0.1:$dns_port"]
delivery:
  remote_port: $sink_port
  retry: [10s, 1m]
  shutdown_grace: 2s
policies: $work/policies
keys: $work/keys
EOF
    cat > "$work/policies/senders.yaml" <<'EOF'
defaults:
  alignment: warn
domains:
  bench.example:
    selectors: [bench]
EOF
    "$BATON" dkim keygen --config "$work/baton.yaml" --domain bench.example --selector bench \
        --algorithm rsa-2048 > "$work/keygen.txt"
    # The zone line lists the record as quoted strings of at most 255 bytes.
    local parts
    mapfile -t parts < <(grep '_domainkey' "$work/keygen.txt" | grep -o '"[^"]*"')
    ((${#parts[@]} > 0)) || die "no TXT record in the output of baton dkim keygen ($work/keygen.txt)"
    parts=("${parts[@]//\"/}")
    printf '%s' "${parts[@]}" > "$work/dkim.txt"
    echo >> "$work/dkim.txt"
    # On the command line dnsmasq keeps quotes as part of the text, so the
    # strings go unquoted, separated by commas (base64 has no commas).
    DKIM_TXT_ARG=$(IFS=,; echo "${parts[*]}")
}

# Shaping limits far above the rates seen on a 2-core machine (about 1,100
# messages/s), so that the message and connection rates do not delay delivery.
write_open_shaping() {
    cat > "$1/policies/shaping.yaml" <<'EOF'
default:
  max_connections: 50
  max_message_rate: "1000000/s"
  max_burst: 10000
  max_messages_per_connection: 10000
  max_connection_rate: "100000/s"
  total_max_connections: 200
EOF
}

# start_dns WORK DNS_PORT: dnsmasq on 127.0.0.1 with the benchmark's records.
# --no-resolv and no --server: nothing is forwarded; --local=/example/ makes
# every other name under example answer NXDOMAIN from here. --local-ttl
# gives the records a TTL, as published records have, so the resolver
# caches them as it would in production.
start_dns() {
    local work=$1 port=$2
    dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll \
        --listen-address=127.0.0.1 --bind-interfaces --port="$port" \
        --local=/example/ --local-ttl=300 \
        --mx-host=dest.example,mx.dest.example,10 \
        --host-record=mx.dest.example,127.0.0.1 \
        --host-record=mta.bench.example,127.0.0.1 \
        --txt-record="bench._domainkey.bench.example,$DKIM_TXT_ARG" \
        --txt-record='_dmarc.bench.example,v=DMARC1; p=none' \
        --pid-file= --log-facility=- 2> "$OUT/dnsmasq.log" &
    DNS_PID=$!
    wait_listen "$port" 10
    log "dnsmasq (pid $DNS_PID) on 127.0.0.1:$port"
}

# start_baton WORK GW_PORT LOGFILE: sets BATON_PID once SMTP listens.
start_baton() {
    local work=$1 port=$2 logfile=$3
    (cd "$work" && exec "$BATON" serve --config "$work/baton.yaml") 2>> "$logfile" &
    BATON_PID=$!
    wait_listen "$port" 600
    log "baton (pid $BATON_PID) on 127.0.0.1:$port"
}
