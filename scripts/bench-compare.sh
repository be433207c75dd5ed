#!/usr/bin/env bash
# Side-by-side benchmark, in one run on this machine: `wharf bench` drives Wharf (fsync before
# every acknowledgement, as always), Mosquitto (no persistence; max_queued_messages 0 so that it
# drops nothing) and RabbitMQ (classic and quorum queues; its MQTT plugin), with the same
# scenarios, and prints one table with the ratio Wharf / peer. Installs mosquitto and
# rabbitmq-server with apt-get when missing, starts every broker on loopback on its own ports,
# and stops everything it started on exit. Not part of CI (minutes, and it installs packages).
#
#   scripts/bench-compare.sh                     # everything
#   BENCH_COUNT=20000 BENCH_RATE_SECS=5 scripts/bench-compare.sh
#
# Output: the table on stdout (Markdown); each run's JSON report under $BENCH_OUT (default
# target/bench-compare).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

COUNT=${BENCH_COUNT:-50000}
RATE=${BENCH_RATE:-10000}
RATE_SECS=${BENCH_RATE_SECS:-10}
FAN_OUT=${BENCH_FAN_OUT:-100}
IDLE=${BENCH_IDLE:-10000}
OUT=${BENCH_OUT:-target/bench-compare}
WORK=$(mktemp -d /tmp/wharf-bench-compare.XXXXXX)
BENCH=target/release/wharf

WHARF_MQTT=21883 WHARF_AMQP=25672 WHARF_ADMIN=25673
MOSQ_MQTT=31883
# Below the ephemeral port range (32768 and up): a connect loop to a free port there can connect
# to itself and take the port a broker is about to listen on.
RMQ_AMQP=24672 RMQ_MQTT=31884 RMQ_DIST=24673
RMQ_NODE=wharfbench@localhost

log() { printf '%s\n' "$*" >&2; }

# The idle-connection scenario needs a file descriptor per connection in the broker and the bench.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        log "bench-compare: root (or sudo) is needed to run: $*"; return 1; fi
}

WHARF_PID= MOSQ_PID= RMQ_STARTED=
# Erlang VMs running before this run: any other one at the end is ours (a node that never
# registered cannot be stopped with rabbitmqctl, and would hold its ports for the next run).
BEAMS_BEFORE=" $(pgrep -d ' ' beam.smp || true) "
cleanup() {
    local status=$?
    if [ $status -ne 0 ]; then
        # Say why before the logs go.
        for file in "$WORK"/wharf.log "$WORK"/mosquitto.log "$WORK"/rabbitmq/log/*.log; do
            [ -f "$file" ] && { log "--- $file"; grep -m 20 -E 'error|reason|eaddrinuse|refused' "$file" | cut -c1-300 >&2 || true; }
        done
        command -v ss >/dev/null 2>&1 && ss -ltnp >&2 || true
    fi
    [ -n "$WHARF_PID" ] && kill "$WHARF_PID" 2>/dev/null && wait "$WHARF_PID" 2>/dev/null || true
    [ -n "$MOSQ_PID" ] && kill "$MOSQ_PID" 2>/dev/null && wait "$MOSQ_PID" 2>/dev/null || true
    if [ -n "$RMQ_STARTED" ]; then
        rabbitmqctl -n "$RMQ_NODE" stop >/dev/null 2>&1 || true
        for pid in $(pgrep beam.smp || true); do
            case "$BEAMS_BEFORE" in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
        done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- what is needed ------------------------------------------------------------------------------
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} with apt-get"
    as_root apt-get update >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
# Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user and drops the environment that
# points the node at this run's directory: use the scripts behind it.
export PATH="/usr/lib/rabbitmq/bin:$PATH:/usr/sbin"
# Debian starts the packaged services on install; they are not ours and would compete for the CPU.
for service in mosquitto rabbitmq-server; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
        log "note: the system's $service service is running and shares the CPU with this run"
    fi
done

log "building wharf (release)"
cargo build --release -p wharf >&2
mkdir -p "$OUT"

wait_port() { # host port seconds
    local deadline=$((SECONDS + $3))
    until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || { log "nothing listens on $1:$2 after $3 s"; return 1; }
        sleep 0.2
    done
}

# --- brokers -------------------------------------------------------------------------------------
log "starting wharf"
WHARF__LISTENERS__MQTT=127.0.0.1:$WHARF_MQTT WHARF__LISTENERS__AMQP=127.0.0.1:$WHARF_AMQP \
    WHARF__LISTENERS__MQTT_WS=127.0.0.1:0 WHARF__LISTENERS__AMQP_TLS=127.0.0.1:0 \
    WHARF__MQTT__SYS_INTERVAL_SECS=0 \
    "$BENCH" serve --data-dir "$WORK/wharf-data" --admin-listen "127.0.0.1:$WHARF_ADMIN" \
    >"$WORK/wharf.log" 2>&1 &
WHARF_PID=$!
wait_port 127.0.0.1 $WHARF_MQTT 30
wait_port 127.0.0.1 $WHARF_AMQP 30

log "starting mosquitto"
cat >"$WORK/mosquitto.conf" <<CONF
listener $MOSQ_MQTT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
CONF
mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
MOSQ_PID=$!
wait_port 127.0.0.1 $MOSQ_MQTT 30

log "starting rabbitmq"
mkdir -p "$WORK/rabbitmq"
cat >"$WORK/rabbitmq/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$RMQ_AMQP
mqtt.listeners.tcp.default = 127.0.0.1:$RMQ_MQTT
mqtt.allow_anonymous = true
loopback_users = none
management.tcp.port = 0
CONF
echo '[rabbitmq_mqtt].' >"$WORK/rabbitmq/enabled_plugins"
if epmd -names 2>/dev/null | grep -q "name ${RMQ_NODE%@*} "; then
    log "a node named $RMQ_NODE is running already (an earlier run?): stopping it"
    rabbitmqctl -n "$RMQ_NODE" stop >&2 || true
fi
RABBITMQ_NODENAME=$RMQ_NODE RABBITMQ_DIST_PORT=$RMQ_DIST \
    RABBITMQ_CONFIG_FILE="$WORK/rabbitmq/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/rabbitmq/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$WORK/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$WORK/rabbitmq/log" \
    rabbitmq-server -detached >"$WORK/rabbitmq.log" 2>&1
RMQ_STARTED=1
# A detached node registers with epmd a moment later; then it boots (its MQTT plugin waits for
# cluster peers that never come before electing itself).
deadline=$((SECONDS + 60))
until epmd -names 2>/dev/null | grep -q "name ${RMQ_NODE%@*} "; do
    [ $SECONDS -lt $deadline ] || { log "rabbitmq did not start; see $WORK/rabbitmq/log"; exit 1; }
    sleep 0.5
done
rabbitmqctl -n "$RMQ_NODE" await_startup --timeout 120 >&2
wait_port 127.0.0.1 $RMQ_AMQP 60
wait_port 127.0.0.1 $RMQ_MQTT 60

# --- scenarios -----------------------------------------------------------------------------------
# run NAME BROKER PROTOCOL PORT ARGS...: one run, its report kept as $OUT/NAME-BROKER.json.
run() {
    local name=$1 broker=$2 protocol=$3 port=$4
    shift 4
    log "== $name: $broker"
    "$BENCH" bench "$protocol" --port "$port" --json "$@" >"$OUT/$name-$broker.json"
}

field() { # file field: a number from a report (latency fields as latency_micros.pNN)
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); v=r
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$1" "$2"
}

ROWS=()
# row TITLE NAME PEER METRIC: Wharf's and PEER's METRIC for scenario NAME, and their ratio.
row() {
    local title=$1 name=$2 peer=$3 metric=$4
    local ours theirs lost_ours lost_theirs
    ours=$(field "$OUT/$name-wharf.json" "$metric")
    theirs=$(field "$OUT/$name-$peer.json" "$metric")
    lost_ours=$(field "$OUT/$name-wharf.json" lost)
    lost_theirs=$(field "$OUT/$name-$peer.json" lost)
    ROWS+=("$(python3 -c 'import sys
title, peer, metric, ours, theirs, lo, lt = sys.argv[1:]
ours, theirs = float(ours), float(theirs)
unit = "msg/s" if metric == "received_per_sec" else "us (" + metric.split(".")[-1] + ")"
ratio = ours / theirs if theirs else float("nan")
print(f"| {title} | {peer} | {unit} | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f} | {lo} / {lt} |")' \
        "$title" "$peer" "$metric" "$ours" "$theirs" "$lost_ours" "$lost_theirs")")
}

# idle_bytes BROKER PID PORT: broker memory (RSS) per idle MQTT connection, bytes. Measured first,
# on brokers that have done nothing yet: after the other scenarios the allocators hold freed memory
# that the connections would reuse, and the growth of RSS would understate what they cost.
idle_bytes() {
    local broker=$1 pid=$2 port=$3 before during bench deadline
    before=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    log "== idle connections: $broker"
    "$BENCH" bench mqtt --port "$port" --qos 0 --count 0 --idle-connections "$IDLE" --hold-secs 5 --json \
        >"$OUT/idle-$broker.json" 2>"$WORK/idle-$broker.err" &
    bench=$!
    deadline=$((SECONDS + 300))
    until grep -q '^holding' "$WORK/idle-$broker.err"; do
        kill -0 "$bench" 2>/dev/null || { cat "$WORK/idle-$broker.err" >&2; return 1; }
        [ $SECONDS -lt $deadline ] || { log "idle connections: no hold after 300 s"; return 1; }
        sleep 0.2
    done
    sleep 2
    during=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    wait "$bench"
    echo $(((during - before) * 1024 / IDLE))
}
IDLE_WHARF=$(idle_bytes wharf "$WHARF_PID" $WHARF_MQTT)
IDLE_MOSQ=$(idle_bytes mosquitto "$MOSQ_PID" $MOSQ_MQTT)

MQTT_2x2=(--publishers 2 --subscribers 2 --size-bytes 256 --count "$COUNT")
for qos in 0 1 2; do
    run "mqtt-qos$qos" wharf mqtt $WHARF_MQTT --qos $qos "${MQTT_2x2[@]}"
    run "mqtt-qos$qos" mosquitto mqtt $MOSQ_MQTT --qos $qos "${MQTT_2x2[@]}"
    run "mqtt-qos$qos" rabbitmq-mqtt mqtt $RMQ_MQTT --qos $((qos > 1 ? 1 : qos)) "${MQTT_2x2[@]}"
done
MQTT_RATE=(--qos 1 --publishers 2 --subscribers 2 --rate-per-sec "$RATE" --duration-secs "$RATE_SECS")
run mqtt-rate wharf mqtt $WHARF_MQTT "${MQTT_RATE[@]}"
run mqtt-rate mosquitto mqtt $MOSQ_MQTT "${MQTT_RATE[@]}"
FAN=(--qos 1 --publishers 1 --subscribers "$FAN_OUT" --layout fan-out --count $((COUNT / FAN_OUT * 2)))
run mqtt-fanout wharf mqtt $WHARF_MQTT "${FAN[@]}"
run mqtt-fanout mosquitto mqtt $MOSQ_MQTT "${FAN[@]}"

AMQP_2x2=(--confirms --publishers 2 --subscribers 2 --size-bytes 256 --count "$COUNT" --multi-ack-every 100)
run amqp-confirms wharf amqp $WHARF_AMQP "${AMQP_2x2[@]}"
run amqp-confirms rabbitmq-classic amqp $RMQ_AMQP --queue-type classic "${AMQP_2x2[@]}"
run amqp-confirms rabbitmq-quorum amqp $RMQ_AMQP --queue-type quorum "${AMQP_2x2[@]}"
AMQP_RATE=(--confirms --publishers 2 --subscribers 2 --rate-per-sec "$RATE" --duration-secs "$RATE_SECS" --multi-ack-every 100)
run amqp-rate wharf amqp $WHARF_AMQP "${AMQP_RATE[@]}"
run amqp-rate rabbitmq-quorum amqp $RMQ_AMQP --queue-type quorum "${AMQP_RATE[@]}"


row "MQTT QoS 0, 2 -> 2, 256 B" mqtt-qos0 mosquitto received_per_sec
row "MQTT QoS 1, 2 -> 2, 256 B" mqtt-qos1 mosquitto received_per_sec
row "MQTT QoS 1, 2 -> 2, 256 B" mqtt-qos1 rabbitmq-mqtt received_per_sec
row "MQTT QoS 2, 2 -> 2, 256 B" mqtt-qos2 mosquitto received_per_sec
row "MQTT QoS 1 at $RATE msg/s" mqtt-rate mosquitto latency_micros.p99
row "MQTT QoS 1 fan-out 1 -> $FAN_OUT" mqtt-fanout mosquitto received_per_sec
row "AMQP confirms, persistent, 2 -> 2" amqp-confirms rabbitmq-classic received_per_sec
row "AMQP confirms, persistent, 2 -> 2" amqp-confirms rabbitmq-quorum received_per_sec
row "AMQP confirms at $RATE msg/s" amqp-rate rabbitmq-quorum latency_micros.p99
ROWS+=("$(python3 -c 'import sys
n, ours, theirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ratio = ours / theirs if theirs else float("nan")
print(f"| {n} idle MQTT connections | mosquitto | bytes of RSS each | {ours:,} | {theirs:,} | {ratio:.2f} | - |")' \
    "$IDLE" "$IDLE_WHARF" "$IDLE_MOSQ")")

echo
echo "Wharf $("$BENCH" --version | awk '{print $2}'), $(mosquitto -h 2>/dev/null | head -1 | awk '{print $1, $2, $3}'), RabbitMQ $(rabbitmqctl -n "$RMQ_NODE" version 2>/dev/null || echo '?'); $(nproc) cores; count $COUNT per throughput run"
echo
echo "| scenario | peer | unit | Wharf | peer | Wharf / peer | lost (Wharf / peer) |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Throughput rows: higher is better for Wharf when the ratio is above 1. Latency and memory rows: lower is better, so a ratio below 1 favours Wharf."
