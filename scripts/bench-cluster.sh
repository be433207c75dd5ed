#!/usr/bin/env bash
# Three-node benchmark, in one run on this machine: `wharf bench` drives a three-node Wharf
# cluster, a single Wharf node and a three-node RabbitMQ cluster (quorum queues, three replicas)
# with the same scenarios, and prints one table. Every broker runs on loopback on its own ports,
# with its data under a temporary directory; one system at a time, so that none of them competes
# for the CPU while another is measured. Against a cluster the load generator connects to node 1
# only (Wharf node 1, wharfq1@localhost): its publishers and consumers are all on that node.
# Installs rabbitmq-server with apt-get when missing, and stops everything it started on exit.
# Not part of CI (minutes, and it installs packages).
#
#   scripts/bench-cluster.sh                                    # builds target/release/wharf
#   WHARF_BINARY=/path/to/wharf BENCH_COUNT=3000 BENCH_RATE=1000 BENCH_RATE_SECS=2 scripts/bench-cluster.sh
#
# Knobs: BENCH_COUNT (messages per throughput run, 30000), BENCH_RATE (msg/s of the latency runs,
# 5000), BENCH_RATE_SECS (their length, 5), BENCH_OUT (target/bench-cluster), WHARF_BINARY (a
# built wharf used as it is; unset: `cargo build --release -p wharf`, target/release/wharf).
#
# Output: the table on stdout (Markdown); each run's JSON report under $BENCH_OUT as
# SCENARIO-SYSTEM.json (SYSTEM: wharf3, wharf1, rabbitmq3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

COUNT=${BENCH_COUNT:-30000}
RATE=${BENCH_RATE:-5000}
RATE_SECS=${BENCH_RATE_SECS:-5}
OUT=${BENCH_OUT:-target/bench-cluster}
BENCH=${WHARF_BINARY:-target/release/wharf}
WORK=$(mktemp -d /tmp/wharf-bench-cluster.XXXXXX)

# Below the ephemeral port range (32768 and up), and apart from scripts/bench-compare.sh's.
# Wharf cluster node N (1 to 3): MQTT 220N1, AMQP 220N2, cluster 220N4, admin 220N5.
wharf_port() { echo $((22000 + 10 * $1 + $2)); } # node offset
SINGLE_MQTT=22041 SINGLE_AMQP=22042 SINGLE_ADMIN=22045
# RabbitMQ node wharfqN@localhost: AMQP 230N2, Erlang distribution 230N3.
rmq_node() { echo "wharfq$1@localhost"; }
rmq_amqp() { echo $((23002 + 10 * $1)); }
rmq_dist() { echo $((23003 + 10 * $1)); }

log() { printf '%s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        log "bench-cluster: root (or sudo) is needed to run: $*"; return 1; fi
}

WHARF_PIDS=() RMQ_STARTED='' EPMD_BEFORE=''
# stop_wharf: every wharf process this run started, SIGTERM then (after 15 s) SIGKILL.
stop_wharf() {
    local pid deadline
    for pid in "${WHARF_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + 15))
    for pid in "${WHARF_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    WHARF_PIDS=()
}
# our_beams: this run's RabbitMQ nodes, the Erlang VMs whose environment names this run's directory.
our_beams() {
    local pid
    for pid in $(pgrep beam.smp || true); do
        grep -qsF "$WORK/rabbitmq" "/proc/$pid/environ" && echo "$pid"
    done
    return 0
}
# stop_rabbitmq: the three nodes; then, after 30 s, SIGKILL to any of their VMs left (a node that
# never registered cannot be stopped with rabbitmqctl, and would hold its ports for the next run);
# then epmd when this run started it.
stop_rabbitmq() {
    [ -n "$RMQ_STARTED" ] || return 0
    local n deadline pid
    for n in 1 2 3; do rabbitmqctl -n "$(rmq_node $n)" stop >/dev/null 2>&1 & done
    wait
    deadline=$((SECONDS + 30))
    while [ -n "$(our_beams)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    for pid in $(our_beams); do kill -KILL "$pid" 2>/dev/null || true; done
    [ -n "$EPMD_BEFORE" ] || epmd -kill >/dev/null 2>&1 || true
    RMQ_STARTED=
}
cleanup() {
    local status=$?
    set +e
    if [ $status -ne 0 ]; then
        # Say why before the logs go; keep them.
        mkdir -p "$OUT/logs-failed"
        for file in "$WORK"/*.log "$WORK"/rabbitmq/*/log/*.log; do
            [ -f "$file" ] || continue
            log "--- $file"
            # (openraft's complaints about an unreachable peer would hide the cause)
            grep -v openraft "$file" | grep -i -m 20 -E 'error|panic|reason|eaddrinuse|refused' | cut -c1-300 >&2
            cp "$file" "$OUT/logs-failed/" 2>/dev/null
        done
        log "logs copied to $OUT/logs-failed"
        command -v ss >/dev/null 2>&1 && ss -ltnp >&2
    fi
    stop_wharf
    stop_rabbitmq
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- what is needed ------------------------------------------------------------------------------
if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
    log "installing rabbitmq-server with apt-get"
    as_root apt-get update >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server >&2
fi
# Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user and drops the environment that
# points the node at this run's directory: use the scripts behind it.
export PATH="/usr/lib/rabbitmq/bin:$PATH:/usr/sbin"
# Debian starts the packaged service on install; it is not ours and would compete for the CPU.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
    log "note: the system's rabbitmq-server service is running and shares the CPU with this run"
fi
EPMD_BEFORE=$(pgrep -x epmd || true)

if [ -z "${WHARF_BINARY:-}" ]; then
    log "building wharf (release)"
    cargo build --release -p wharf >&2
fi
[ -x "$BENCH" ] || { log "no wharf binary at $BENCH"; exit 1; }
mkdir -p "$OUT"
rm -rf "$OUT"/*.json "$OUT/logs-failed"

wait_ready() { # name admin-port seconds pid: until the node's /readyz answers 200
    local deadline=$((SECONDS + $3)) code
    while :; do
        code=$(curl -s --max-time 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/readyz" || true)
        [ "$code" = 200 ] && return 0
        kill -0 "$4" 2>/dev/null || { log "$1 exited before it was ready; see its log"; return 1; }
        [ $SECONDS -lt $deadline ] || { log "$1: /readyz did not answer 200 after $3 s (last: $code)"; return 1; }
        sleep 0.2
    done
}

# wharf_config FILE ID DATA MQTT AMQP ADMIN [CLUSTER]: a node's configuration; listeners the runs
# do not use are off. With CLUSTER, the node is one of the three-node cluster's.
wharf_config() {
    local file=$1 id=$2 data=$3 mqtt=$4 amqp=$5 admin=$6 cluster=${7:-}
    {
        printf '[node]\nid = %s\ndata_dir = "%s"\n\n' "$id" "$data"
        if [ -n "$cluster" ]; then
            printf '[cluster]\npeers = ["1@127.0.0.1:%s", "2@127.0.0.1:%s", "3@127.0.0.1:%s"]\n\n' \
                "$(wharf_port 1 4)" "$(wharf_port 2 4)" "$(wharf_port 3 4)"
        fi
        printf '[listeners]\ncluster = "%s"\nmqtt = "127.0.0.1:%s"\namqp = "127.0.0.1:%s"\n' \
            "${cluster:+127.0.0.1:$cluster}" "$mqtt" "$amqp"
        printf 'mqtt_ws = ""\nmqtt_tls = ""\namqp_tls = ""\nnative = ""\n\n'
        printf '[admin]\nlisten = "127.0.0.1:%s"\n\n' "$admin"
        # No $SYS publishing during the runs.
        printf '[mqtt]\nsys_interval_secs = 0\n'
    } >"$file"
    "$BENCH" config check --config "$file" >&2
}

start_wharf() { # name config
    "$BENCH" serve --config "$2" >"$WORK/$1.log" 2>&1 &
    WHARF_PIDS+=($!)
}

# --- scenarios -----------------------------------------------------------------------------------
# run NAME SYSTEM PROTOCOL PORT ARGS...: one run, its report kept as $OUT/NAME-SYSTEM.json.
run() {
    local name=$1 system=$2 protocol=$3 port=$4
    shift 4
    log "== $name: $system"
    "$BENCH" bench "$protocol" --port "$port" --json "$@" >"$OUT/$name-$system.json"
}
MQTT_2x2=(--qos 1 --publishers 2 --subscribers 2 --size-bytes 256 --count "$COUNT")
MQTT_RATE=(--qos 1 --publishers 2 --subscribers 2 --size-bytes 256 --rate-per-sec "$RATE" --duration-secs "$RATE_SECS")
# Wharf accepts x-queue-type quorum (it treats every queue alike), so every system gets the same.
AMQP_2x2=(--confirms --queue-type quorum --publishers 2 --subscribers 2 --size-bytes 256 --count "$COUNT" --multi-ack-every 100)
AMQP_RATE=(--confirms --queue-type quorum --publishers 2 --subscribers 2 --size-bytes 256 --rate-per-sec "$RATE" --duration-secs "$RATE_SECS" --multi-ack-every 100)
wharf_runs() { # system mqtt-port amqp-port
    run mqtt-qos1 "$1" mqtt "$2" "${MQTT_2x2[@]}"
    run amqp-confirms "$1" amqp "$3" "${AMQP_2x2[@]}"
    run mqtt-rate "$1" mqtt "$2" "${MQTT_RATE[@]}"
    run amqp-rate "$1" amqp "$3" "${AMQP_RATE[@]}"
}

# --- Wharf, three nodes --------------------------------------------------------------------------
log "starting a three-node wharf cluster"
for n in 1 2 3; do
    wharf_config "$WORK/wharf$n.toml" $n "$WORK/wharf$n-data" \
        "$(wharf_port $n 1)" "$(wharf_port $n 2)" "$(wharf_port $n 5)" "$(wharf_port $n 4)"
done
# Together: a node is ready only once a majority runs.
for n in 1 2 3; do start_wharf "wharf$n" "$WORK/wharf$n.toml"; done
for n in 1 2 3; do wait_ready "wharf node $n" "$(wharf_port $n 5)" 120 "${WHARF_PIDS[$((n - 1))]}"; done
"$BENCH" cluster status --admin "127.0.0.1:$(wharf_port 1 5)" >&2
wharf_runs wharf3 "$(wharf_port 1 1)" "$(wharf_port 1 2)"
log "stopping the wharf cluster"
stop_wharf

# --- Wharf, one node -----------------------------------------------------------------------------
log "starting a single wharf node"
wharf_config "$WORK/wharf-single.toml" 1 "$WORK/wharf-single-data" $SINGLE_MQTT $SINGLE_AMQP $SINGLE_ADMIN
start_wharf wharf-single "$WORK/wharf-single.toml"
wait_ready "wharf single node" $SINGLE_ADMIN 60 "${WHARF_PIDS[0]}"
wharf_runs wharf1 $SINGLE_MQTT $SINGLE_AMQP
log "stopping the single wharf node"
stop_wharf

# --- RabbitMQ, three nodes -----------------------------------------------------------------------
# All nodes run as this user and share its Erlang cookie ($HOME/.erlang.cookie, made by the first
# node when missing: node 1 starts alone until it has registered, so that only one node makes it).
start_rabbitmq() { # n
    local n=$1 dir=$WORK/rabbitmq/n$1 node deadline
    node=$(rmq_node "$n")
    mkdir -p "$dir"
    cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$(rmq_amqp "$n")
loopback_users = none
CONF
    echo '[].' >"$dir/enabled_plugins"
    if epmd -names 2>/dev/null | grep -q "name ${node%@*} "; then
        log "a node named $node is running already (an earlier run?): stopping it"
        rabbitmqctl -n "$node" stop >&2 || true
    fi
    RMQ_STARTED=1
    RABBITMQ_NODENAME=$node RABBITMQ_DIST_PORT=$(rmq_dist "$n") \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
        rabbitmq-server -detached >"$WORK/rabbitmq$n.log" 2>&1
    # A detached node registers with epmd a moment later.
    deadline=$((SECONDS + 60))
    until epmd -names 2>/dev/null | grep -q "name ${node%@*} "; do
        [ $SECONDS -lt $deadline ] || { log "rabbitmq $node did not start; see $dir/log"; return 1; }
        sleep 0.5
    done
}
log "starting a three-node rabbitmq cluster"
start_rabbitmq 1
start_rabbitmq 2
start_rabbitmq 3
for n in 1 2 3; do rabbitmqctl -n "$(rmq_node $n)" await_startup --timeout 120 >&2; done
for n in 2 3; do
    rabbitmqctl -n "$(rmq_node $n)" stop_app >&2
    rabbitmqctl -n "$(rmq_node $n)" join_cluster "$(rmq_node 1)" >&2
    rabbitmqctl -n "$(rmq_node $n)" start_app >&2
done
rabbitmqctl -n "$(rmq_node 1)" cluster_status --formatter json >"$WORK/cluster_status.json"
running=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["running_nodes"]))' "$WORK/cluster_status.json")
[ "$running" -eq 3 ] || { log "rabbitmq cluster: $running running nodes, not 3"; rabbitmqctl -n "$(rmq_node 1)" cluster_status >&2; exit 1; }
log "rabbitmq cluster: 3 running nodes"
RMQ_VERSION=$(rabbitmqctl -n "$(rmq_node 1)" version 2>/dev/null || echo '?')
OTP_VERSION=$(rabbitmqctl -n "$(rmq_node 1)" eval 'erlang:system_info(otp_release).' 2>/dev/null | tr -d '"' || echo '?')
# Quorum queues get a replica on each of the three nodes (quorum_cluster_size defaults to 3);
# declared through node 1, they have their leader there. RabbitMQ's MQTT plugin is not measured:
# the bench's clean sessions get transient classic queues there, whatever mqtt.durable_queue_type
# says, so nothing of it would be replicated.
run amqp-confirms rabbitmq3 amqp "$(rmq_amqp 1)" "${AMQP_2x2[@]}"
run amqp-rate rabbitmq3 amqp "$(rmq_amqp 1)" "${AMQP_RATE[@]}"
log "stopping the rabbitmq cluster"
stop_rabbitmq

# --- table ---------------------------------------------------------------------------------------
field() { # file field: a number from a report (latency fields as latency_micros.pNN)
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); v=r
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$1" "$2"
}

ROWS=()
# row TITLE NAME: scenario NAME on the three systems (- where it was not run).
row() {
    ROWS+=("$(python3 -c 'import json,os,sys
title, name, out = sys.argv[1:]
cells, losses = [], []
for system in ("wharf3", "wharf1", "rabbitmq3"):
    path = os.path.join(out, f"{name}-{system}.json")
    if not os.path.exists(path):
        cells.append("-"); losses.append("-"); continue
    r = json.load(open(path))
    rate, p50, p99 = r["received_per_sec"], r["latency_micros"]["p50"] / 1000, r["latency_micros"]["p99"] / 1000
    cells.append(f"{rate:,.0f} msg/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    losses.append("%d / %d" % (r["lost"], r["duplicates"]))
print(f"| {title} | " + " | ".join(cells) + " | " + " · ".join(losses) + " |")' "$1" "$2" "$OUT")")
}
row "MQTT QoS 1, 2 -> 2, 256 B, $COUNT msgs" mqtt-qos1
row "AMQP confirms, persistent, quorum, 2 -> 2, 256 B, $COUNT msgs" amqp-confirms
row "MQTT QoS 1 at $RATE msg/s for $RATE_SECS s" mqtt-rate
row "AMQP confirms, quorum, at $RATE msg/s for $RATE_SECS s" amqp-rate

echo
echo "Wharf $("$BENCH" --version | awk '{print $2}'), RabbitMQ $RMQ_VERSION (Erlang/OTP $OTP_VERSION); $(nproc) cores; load generator on node 1 of each cluster"
echo
echo "| scenario | Wharf 3 nodes | Wharf 1 node | RabbitMQ quorum 3 nodes | lost / dup (3 nodes · 1 node · RabbitMQ) |"
echo "|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "msg/s: received per second over the run; p50 and p99: end-to-end latency. Every run, as measured:"
echo
echo "| run | system | sent/s | received/s | p50 (us) | p99 (us) | lost | dup |"
echo "|---|---|---|---|---|---|---|---|"
for name in mqtt-qos1 amqp-confirms mqtt-rate amqp-rate; do
    for system in wharf3 wharf1 rabbitmq3; do
        file=$OUT/$name-$system.json
        [ -f "$file" ] || continue
        printf '| %s | %s | %.0f | %.0f | %s | %s | %s | %s |\n' "$name" "$system" \
            "$(field "$file" sent_per_sec)" "$(field "$file" received_per_sec)" \
            "$(field "$file" latency_micros.p50)" "$(field "$file" latency_micros.p99)" \
            "$(field "$file" lost)" "$(field "$file" duplicates)"
    done
done
