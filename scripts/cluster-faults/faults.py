#!/usr/bin/env python3
"""Fault-injection run against a three-node Wharf cluster of real `wharf serve` processes.

Each node runs in its own network namespace (veth pairs to a bridge in the root namespace), so a
partition is a pair of iptables rules inside one node's namespace. MQTT (paho) and AMQP (pika)
clients in the root namespace publish and consume on every node while a seeded schedule kills
(SIGKILL, then restart), freezes (SIGSTOP, then SIGCONT) or isolates one node at a time. Afterwards
the clients' own histories say what was lost, duplicated or reordered.

Started by run.sh, which makes the venv and checks the binary; see README.md beside this file.
Everything it creates (namespaces, veths, the bridge, iptables rules, processes) is removed on
exit, Ctrl-C included. Logs and data stay in the work directory it prints.
"""

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request

import paho.mqtt.client as mqtt
import pika
import pika.exceptions

NODE_IDS = (1, 2, 3)
# 10.77.0.N is node N inside its namespace; the bridge (the clients' side) is .254.
SUBNET_PREFIX = "10.77.0"
BRIDGE_ADDR = f"{SUBNET_PREFIX}.254"
BRIDGE_NAME = "wfbr0"
NAMESPACE_FMT = "wharf-faults-n{}"
VETH_FMT = "wfveth{}"

# A publish not acknowledged within this long is treated as a connection failure: a node cut off
# from its peers keeps its clients' sockets open but can commit nothing, and the clients must
# move on to another node as they would on a real network.
OPERATION_TIMEOUT_SECS = 10.0
# A CONNECT / AMQP handshake not answered within this long counts as a failed connection (a
# SIGSTOPped node accepts TCP connections in its kernel backlog but answers nothing).
CONNECT_TIMEOUT_SECS = 8.0
# A subscriber that hears nothing this long while publishers run moves to another node: its
# node may be cut off (messages published elsewhere do not reach its replica).
SUBSCRIBER_STALL_SECS = 20.0
MQTT_KEEPALIVE_SECS = 5
AMQP_HEARTBEAT_SECS = 5
# Each publisher keeps at most this many messages unconfirmed; beyond it, it waits (back-pressure).
UNCONFIRMED_MAX = 100
MQTT_INFLIGHT_MAX = 20
AMQP_PREFETCH = 50
TXN_BATCH_LEN = 5

QUEUE_CONFIRM = "faults.confirm"
QUEUE_TXN = "faults.tx"

T0 = time.monotonic()


def now_secs():
    """Seconds since the program started: every log line and history record uses this clock."""
    return time.monotonic() - T0


class Log:
    """Thread-safe log to stdout and a file in the work directory; lines carry the run's clock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.file = None
        self.quiet_stdout = False

    def open(self, path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, kind, text, echo=True):
        line = f"[{now_secs():8.2f}s {time.strftime('%H:%M:%S')}] {kind:<8} {text}"
        with self.lock:
            if echo and not self.quiet_stdout:
                print(line, flush=True)
            if self.file:
                self.file.write(line + "\n")


log = Log()


def sh(args, check=True, quiet=False):
    """Runs a command for the network set-up; failures of clean-up commands are expected."""
    result = subprocess.run(args, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    if result.returncode != 0 and not quiet:
        log("net", f"(ignored) {' '.join(args)}: {result.stderr.strip()}", echo=False)
    return result


# ---------------------------------------------------------------------------------------------
# The cluster: namespaces, configs, processes, faults
# ---------------------------------------------------------------------------------------------


class Node:
    def __init__(self, node_id, work_dir, repo_root):
        self.id = node_id
        self.addr = f"{SUBNET_PREFIX}.{node_id}"
        self.namespace = NAMESPACE_FMT.format(node_id)
        self.data_dir = os.path.join(work_dir, f"data-node{node_id}")
        self.config_path = os.path.join(work_dir, f"node{node_id}.toml")
        self.log_path = os.path.join(work_dir, f"node{node_id}.log")
        self.process = None
        self.stopped = False  # SIGSTOPped
        self.partitioned = None  # None, or the partition mode
        self.starts = 0
        self.write_config(os.path.join(repo_root, "examples", "cluster", f"node{node_id}.toml"))

    def write_config(self, example_path):
        """Copies the example config, moving data_dir to the work dir and every address to the
        namespaces' addresses (peers to their own node's address, listeners to this node's)."""
        with open(example_path) as f:
            text = f.read()
        text = re.sub(r'(?m)^data_dir = ".*"$', f'data_dir = "{self.data_dir}"', text)
        text = re.sub(r"(\d+)@127\.0\.0\.1:", lambda m: f"{m.group(1)}@{SUBNET_PREFIX}.{m.group(1)}:", text)
        text = text.replace('"127.0.0.1:', f'"{self.addr}:')
        header = (f"# Written by scripts/cluster-faults/faults.py from {os.path.basename(example_path)}:"
                  f" data_dir and addresses moved to the run's work dir and node {self.id}'s namespace.\n")
        with open(self.config_path, "w") as f:
            f.write(header + text)
        config = tomllib.loads(text)
        listeners = config["listeners"]
        self.mqtt_port = int(listeners["mqtt"].rsplit(":", 1)[1])
        self.amqp_port = int(listeners["amqp"].rsplit(":", 1)[1])
        self.cluster_port = int(listeners["cluster"].rsplit(":", 1)[1])
        self.admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
        for peer in config["cluster"]["peers"]:
            assert peer.split("@")[1].startswith(SUBNET_PREFIX), peer

    def admin_get(self, path, timeout_secs=2.0):
        """(status, body) of an admin endpoint, or (None, error) when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://{self.addr}:{self.admin_port}{path}", timeout=timeout_secs) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except Exception as e:  # noqa: BLE001 - any failure means "not answering"
            return None, str(e)

    def is_ready(self):
        return self.admin_get("/readyz")[0] == 200

    def running(self):
        return self.process is not None and self.process.poll() is None


class Cluster:
    def __init__(self, work_dir, binary, repo_root, log_level):
        self.work_dir = work_dir
        self.binary = binary
        self.log_level = log_level
        self.nodes = {i: Node(i, work_dir, repo_root) for i in NODE_IDS}
        self.network_up = False

    # -- network ---------------------------------------------------------------------------

    @staticmethod
    def remove_network():
        """Deletes the namespaces, veths and bridge; also what a crashed earlier run left."""
        for i in NODE_IDS:
            sh(["ip", "netns", "del", NAMESPACE_FMT.format(i)], check=False, quiet=True)
            sh(["ip", "link", "del", VETH_FMT.format(i)], check=False, quiet=True)
        sh(["ip", "link", "del", BRIDGE_NAME], check=False, quiet=True)

    def create_network(self):
        self.remove_network()
        self.network_up = True
        sh(["ip", "link", "add", BRIDGE_NAME, "type", "bridge"])
        sh(["ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE_NAME])
        sh(["ip", "link", "set", BRIDGE_NAME, "up"])
        for node in self.nodes.values():
            ns, veth = node.namespace, VETH_FMT.format(node.id)
            sh(["ip", "netns", "add", ns])
            sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            sh(["ip", "link", "set", veth, "master", BRIDGE_NAME, "up"])
            sh(["ip", "-n", ns, "addr", "add", f"{node.addr}/24", "dev", "eth0"])
            sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        # The bridge may pass bridged frames through the root namespace's iptables
        # (br_netfilter); nothing there drops them today, but a FORWARD policy of DROP would.
        log("net", f"bridge {BRIDGE_NAME} {BRIDGE_ADDR}/24; namespaces "
                   + ", ".join(f"{n.namespace}={n.addr}" for n in self.nodes.values()))

    # -- processes ---------------------------------------------------------------------------

    def start(self, node):
        node.starts += 1
        logf = open(node.log_path, "ab")
        logf.write(f"\n===== faults.py: start #{node.starts} of node {node.id} at {now_secs():.2f}s "
                   f"({time.strftime('%H:%M:%S')}) =====\n".encode())
        logf.flush()
        args = ["ip", "netns", "exec", node.namespace, self.binary, "serve", "--config", node.config_path]
        if self.log_level:
            args += ["--log-level", self.log_level]
        # `ip netns exec` execs the binary, so the pid is wharf's own; its own session keeps
        # Ctrl-C in the terminal from reaching the nodes before the clean-up does.
        node.process = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        node.stopped = False
        log("node", f"node {node.id} started (pid {node.process.pid})")

    def wait_ready(self, nodes, timeout_secs):
        deadline = time.monotonic() + timeout_secs
        pending = list(nodes)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if not n.is_ready()]
            for n in pending:
                if not n.running():
                    raise RuntimeError(f"node {n.id} exited with {n.process.returncode}; see {n.log_path}")
            if pending:
                time.sleep(0.25)
        return not pending

    def kill(self, node):
        if node.running():
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait()
        node.stopped = False

    def freeze(self, node):
        os.kill(node.process.pid, signal.SIGSTOP)
        node.stopped = True

    def thaw(self, node):
        if node.running():
            os.kill(node.process.pid, signal.SIGCONT)
        node.stopped = False

    def ipt(self, node, *rule):
        sh(["ip", "netns", "exec", node.namespace, "iptables", "-w", *rule])

    def partition(self, node, mode):
        """mode "peers": drop everything to and from the other two nodes (the cluster traffic);
        clients still reach the node. mode "all": drop everything on its link, clients too."""
        if mode == "peers":
            for peer in self.nodes.values():
                if peer is not node:
                    self.ipt(node, "-A", "INPUT", "-s", peer.addr, "-j", "DROP")
                    self.ipt(node, "-A", "OUTPUT", "-d", peer.addr, "-j", "DROP")
        else:
            self.ipt(node, "-A", "INPUT", "-i", "eth0", "-j", "DROP")
            self.ipt(node, "-A", "OUTPUT", "-o", "eth0", "-j", "DROP")
        node.partitioned = mode

    def heal(self, node):
        self.ipt(node, "-F", "INPUT")
        self.ipt(node, "-F", "OUTPUT")
        node.partitioned = None

    def leaders(self):
        """group -> leader id, as the first answering node sees it (for the fault log)."""
        for node in self.nodes.values():
            if node.running() and not node.stopped and not node.partitioned:
                status, body = node.admin_get("/cluster", timeout_secs=1.0)
                if status == 200:
                    try:
                        return summarize_leaders(json.loads(body))
                    except Exception:  # noqa: BLE001 - the log line is best effort
                        return body[:200]
        return "?"

    def stop_all(self):
        """SIGCONT, SIGTERM, then SIGKILL whatever has not exited after a few seconds."""
        for node in self.nodes.values():
            if node.running():
                try:
                    os.kill(node.process.pid, signal.SIGCONT)
                    os.kill(node.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8
        for node in self.nodes.values():
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(node.process.pid, signal.SIGKILL)
                node.process.wait()

    def cleanup(self):
        self.stop_all()
        if self.network_up:
            self.remove_network()
            self.network_up = False


def summarize_leaders(cluster_json):
    """Reduces the admin `/cluster` answer to "group:leader" pairs, whatever its exact shape."""
    groups = cluster_json.get("groups", cluster_json) if isinstance(cluster_json, dict) else cluster_json
    parts = []
    if isinstance(groups, dict):
        groups = [dict(v, name=k) if isinstance(v, dict) else {"name": k} for k, v in groups.items()]
    for g in groups or []:
        if isinstance(g, dict):
            name = g.get("name") or g.get("group") or "?"
            parts.append(f"{name}:{g.get('leader', g.get('current_leader', '?'))}")
    return " ".join(parts) if parts else json.dumps(cluster_json)[:200]


# ---------------------------------------------------------------------------------------------
# Fault schedule
# ---------------------------------------------------------------------------------------------

FAULT_KINDS = ("kill", "stop", "partition-peers", "partition-all")


class FaultInjector(threading.Thread):
    """One fault at a time on one node, then recovery, then a healthy gap: a majority always
    exists. Seeded; the schedule's random draws do not depend on how the run goes, but the
    waits for readiness do, so a replay follows the same order of faults, not the same timing."""

    def __init__(self, cluster, seed, stop_event, hold_secs=(3.0, 8.0), gap_secs=(5.0, 15.0)):
        super().__init__(name="faults", daemon=True)
        self.cluster = cluster
        self.random = random.Random(seed)
        self.stop_event = stop_event
        self.hold_secs = hold_secs
        self.gap_secs = gap_secs
        self.counts = collections.Counter()
        self.events = []  # (start, end, kind, node)
        self.current = None

    def run(self):
        try:
            self.loop()
        except Exception as e:  # noqa: BLE001 - reported, and the run goes on without faults
            log("fault", f"fault thread failed: {e!r}")

    def loop(self):
        if self.stop_event.wait(self.random.uniform(*self.gap_secs)):
            return
        while not self.stop_event.is_set():
            kind = self.random.choice(FAULT_KINDS)
            node = self.cluster.nodes[self.random.choice(NODE_IDS)]
            hold_secs = self.random.uniform(*self.hold_secs)
            gap_secs = self.random.uniform(*self.gap_secs)
            leaders = self.cluster.leaders()
            start = now_secs()
            self.current = (kind, node)
            self.counts[kind] += 1
            log("fault", f"#{sum(self.counts.values())} {kind} node {node.id} for {hold_secs:.1f}s (leaders before: {leaders})")
            if kind == "kill":
                self.cluster.kill(node)
                self.stop_event.wait(hold_secs)
                self.cluster.start(node)
            elif kind == "stop":
                self.cluster.freeze(node)
                self.stop_event.wait(hold_secs)
                self.cluster.thaw(node)
            else:
                self.cluster.partition(node, kind.split("-", 1)[1])
                self.stop_event.wait(hold_secs)
                self.cluster.heal(node)
            log("fault", f"recovered from {kind} of node {node.id}; waiting for /readyz")
            ready = self.cluster.wait_ready([node], timeout_secs=120)
            self.current = None
            end = now_secs()
            self.events.append((start, end, kind, node.id))
            log("fault", f"node {node.id} {'ready' if ready else 'NOT READY after 120s'} "
                         f"{end - start:.1f}s after the fault began (leaders now: {self.cluster.leaders()})")
            if self.stop_event.wait(gap_secs):
                return


# ---------------------------------------------------------------------------------------------
# Client histories
# ---------------------------------------------------------------------------------------------


class History:
    """What the clients saw. Publishers record sends and confirms, consumers every delivery."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = collections.defaultdict(dict)  # (stream, pub) -> seq -> (t, node)
        self.confirmed = collections.defaultdict(dict)  # (stream, pub) -> seq -> (t, node)
        self.retried = collections.defaultdict(set)  # (stream, pub) -> seqs the client sent again
        self.receipts = collections.defaultdict(list)  # consumer -> [(t, pub, seq, flagged, node)]
        self.unknown = collections.Counter()  # consumer -> payloads that parse to no message
        self.stream_kind = {}  # stream -> "fanout" (each consumer gets all) or "competing"
        self.stream_protocol = {}
        self.last_receipt_t = now_secs()
        self.events = collections.Counter()  # named client events (reconnects, nacks, ...)

    def add_stream(self, stream, protocol, kind):
        self.stream_kind[stream] = kind
        self.stream_protocol[stream] = protocol

    def record_sent(self, stream, pub, seq, node):
        with self.lock:
            self.sent[(stream, pub)].setdefault(seq, (now_secs(), node))

    def record_confirmed(self, stream, pub, seq, node):
        with self.lock:
            self.confirmed[(stream, pub)].setdefault(seq, (now_secs(), node))

    def record_retried(self, stream, pub, seqs):
        with self.lock:
            self.retried[(stream, pub)].update(seqs)

    def record_receipt(self, consumer, payload, flagged, node):
        t = now_secs()
        try:
            pub, seq = payload.decode().split(" ", 2)[:2]
            seq = int(seq)
        except Exception:  # noqa: BLE001 - anything else on our topics is itself an anomaly
            with self.lock:
                self.unknown[consumer] += 1
            return
        with self.lock:
            self.receipts[consumer].append((t, pub, seq, bool(flagged), node))
            self.last_receipt_t = t

    def count(self, event):
        with self.lock:
            self.events[event] += 1


def payload_of(pub, seq):
    # Publisher id and sequence number first; padding makes it a plausible message size.
    return f"{pub} {seq} {time.time():.3f} {'x' * 64}".encode()


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


class ClientBase(threading.Thread):
    """Round-robin over the nodes: a client that loses its connection goes to the next node."""

    def __init__(self, name, cluster, history, stop_event, first_node):
        super().__init__(name=name, daemon=True)
        self.cluster = cluster
        self.history = history
        self.stop_event = stop_event
        self.node_index = NODE_IDS.index(first_node)
        self.node = cluster.nodes[first_node]
        self.connects = 0
        self.failed = None

    def next_node(self):
        self.node_index = (self.node_index + 1) % len(NODE_IDS)
        self.node = self.cluster.nodes[NODE_IDS[self.node_index]]

    def run(self):
        try:
            self.main()
        except Exception as e:  # noqa: BLE001 - a client bug must not hang the run
            self.failed = repr(e)
            log("client", f"{self.name} died: {e!r}")


class MqttClient(ClientBase):
    """A paho client driven by this thread's own loop() calls (no paho thread), so that the
    reconnect (to the next node) and the time-outs are ours."""

    def __init__(self, name, cluster, history, stop_event, first_node):
        super().__init__(name, cluster, history, stop_event, first_node)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=False,
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(MQTT_INFLIGHT_MAX)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.connected = False
        self.lost_rc = None
        self.connect_started = None
        self.ever_connected = False
        self.session_present = None

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log("mqtt", f"{self.name}: CONNACK refused by node {self.node.id}: {reason_code}")
            self.drop_socket()
            return
        self.connected = True
        self.connack_seen = True
        self.session_present = flags.session_present
        if self.ever_connected and not flags.session_present:
            self.history.count("mqtt session lost on reconnect")
            log("ANOMALY", f"{self.name}: session NOT present on reconnect to node {self.node.id}")
        self.ever_connected = True
        self.on_connected(flags.session_present)

    def on_connected(self, session_present):
        pass

    def before_reconnect(self):
        pass

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected = False

    def drop_socket(self):
        """Cuts the connection as a network failure would (no DISCONNECT packet)."""
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def connect(self):
        """One attempt on the current node; on failure the caller moves on to the next."""
        self.connects += 1
        self.connect_started = time.monotonic()
        self.connected = False
        self.connack_seen = False
        try:
            if self.connects == 1:
                self.client.connect_async(self.node.addr, self.node.mqtt_port, keepalive=MQTT_KEEPALIVE_SECS)
            # paho's host setter refuses a client whose connection was lost (not closed by us).
            self.client._host = self.node.addr  # noqa: SLF001
            self.client._port = self.node.mqtt_port  # noqa: SLF001
            self.client.reconnect()
            return True
        except (OSError, RuntimeError) as e:
            log("mqtt", f"{self.name}: connect to node {self.node.id} failed: {e!r}", echo=False)
            return False

    def pump(self):
        """Drives paho for a short while; returns False when the connection is gone."""
        rc = self.client.loop(timeout=0.05)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self.lost_rc = rc
            return False
        if not self.connected and time.monotonic() - self.connect_started > CONNECT_TIMEOUT_SECS:
            log("mqtt", f"{self.name}: no CONNACK from node {self.node.id} in {CONNECT_TIMEOUT_SECS:.0f}s")
            self.lost_rc = None
            return False
        return True

    def move_on(self, why):
        was = self.node.id
        self.before_reconnect()
        self.drop_socket()
        self.client._sock_close()  # noqa: SLF001 - paho has no public "forget the socket"
        self.connected = False
        self.next_node()
        self.history.count(f"{self.kind} reconnects")
        log("mqtt", f"{self.name}: {why} on node {was}; reconnecting to node {self.node.id}", echo=False)
        time.sleep(0.2)

    def loop_until(self, done):
        """Connect, pump, reconnect on failure, until done() says so."""
        while not done():
            if not self.connect():
                self.next_node()
                time.sleep(0.5)
                continue
            while not done():
                if not self.pump():
                    why = "no CONNACK" if self.lost_rc is None else mqtt.error_string(self.lost_rc)
                    if not self.connack_seen:
                        why += f", before CONNACK, {time.monotonic() - self.connect_started:.1f}s after CONNECT"
                        self.history.count("mqtt connects unanswered")
                    self.move_on(f"connection lost ({why})")
                    break
                why = self.step()
                if why:
                    self.move_on(why)
                    break
        try:
            self.client.disconnect()
            self.client.loop(timeout=0.2)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


class MqttPublisher(MqttClient):
    kind = "mqtt-pub"

    def __init__(self, name, cluster, history, stop_event, first_node, stream, topic, qos, rate_per_sec,
                 finish_event):
        super().__init__(name, cluster, history, stop_event, first_node)
        self.stream, self.topic, self.qos = stream, topic, qos
        self.interval_secs = 1.0 / rate_per_sec
        self.finish_event = finish_event  # set: publish nothing new, finish the outstanding ones
        self.next_seq = 1
        self.next_send = time.monotonic()
        self.mid_to_seq = {}
        self.unconfirmed = {}  # seq -> monotonic time of the first send
        self.client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        seq = self.mid_to_seq.pop(mid, None)
        if seq is None:
            log("mqtt", f"{self.name}: acknowledgement of unknown packet id {mid}")
            return
        self.unconfirmed.pop(seq, None)
        self.history.record_confirmed(self.stream, self.name, seq, self.node.id)

    def step(self):
        t = time.monotonic()
        # Only once CONNACK is in: paho writes a PUBLISH made while it is still connecting at
        # once, ahead of the retransmissions it sends on CONNACK, which would reorder them.
        if (self.connected and not self.finish_event.is_set() and t >= self.next_send
                and len(self.unconfirmed) < UNCONFIRMED_MAX):
            seq = self.next_seq
            self.next_seq += 1
            self.next_send = max(self.next_send + self.interval_secs, t - 1.0)
            # paho keeps a QoS>0 message until acknowledged, resends it after a reconnect with
            # DUP=1 (or PUBREL for QoS 2 past PUBREC): the retry is the library's own.
            info = self.client.publish(self.topic, payload_of(self.name, seq), qos=self.qos)
            self.mid_to_seq[info.mid] = seq
            self.unconfirmed[seq] = t
            self.history.record_sent(self.stream, self.name, seq, self.node.id)
        if self.connected and self.unconfirmed:
            oldest = min(self.unconfirmed.values())
            if t - oldest > OPERATION_TIMEOUT_SECS:
                # Restart the clock, so the next node gets its own full time-out.
                for seq in self.unconfirmed:
                    self.unconfirmed[seq] = t
                self.history.count("mqtt publish time-outs")
                return f"no acknowledgement in {OPERATION_TIMEOUT_SECS:.0f}s"
        return None

    def before_reconnect(self):
        # paho sends every unacknowledged message again on the next connection.
        self.history.record_retried(self.stream, self.name, list(self.unconfirmed))

    def on_connected(self, session_present):
        t = time.monotonic()
        for seq in self.unconfirmed:
            self.unconfirmed[seq] = t

    def main(self):
        give_up_at = [None]

        def done():
            if self.stop_event.is_set():
                return True
            if self.finish_event.is_set():
                if give_up_at[0] is None:
                    give_up_at[0] = time.monotonic() + 90
                return not self.unconfirmed or time.monotonic() > give_up_at[0]
            return False

        self.loop_until(done)


class MqttSubscriber(MqttClient):
    kind = "mqtt-sub"

    def __init__(self, name, cluster, history, stop_event, first_node, topic_filter, qos, publishing_event):
        super().__init__(name, cluster, history, stop_event, first_node)
        self.topic_filter, self.qos = topic_filter, qos
        self.publishing_event = publishing_event
        self.subscribed = threading.Event()
        self.last_message = time.monotonic()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def on_connected(self, session_present):
        self.last_message = time.monotonic()
        if not session_present:
            self.client.subscribe(self.topic_filter, qos=self.qos)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            log("ANOMALY", f"{self.name}: SUBSCRIBE refused: {reason_codes}")
        self.subscribed.set()

    def _on_message(self, client, userdata, message):
        self.last_message = time.monotonic()
        self.history.record_receipt(self.name, message.payload, message.dup, self.node.id)

    def step(self):
        if (self.connected and self.publishing_event.is_set()
                and time.monotonic() - self.last_message > SUBSCRIBER_STALL_SECS):
            self.history.count("mqtt subscriber stalls")
            return f"nothing received for {SUBSCRIBER_STALL_SECS:.0f}s"
        return None

    def main(self):
        self.loop_until(self.stop_event.is_set)


class AmqpClient(ClientBase):
    """pika's BlockingConnection; a watchdog (see Watchdog) cuts the socket of a call that takes
    too long, which pika then reports as a lost connection."""

    def __init__(self, name, cluster, history, stop_event, first_node):
        super().__init__(name, cluster, history, stop_event, first_node)
        self.connection = None
        self.channel = None
        self.busy_since = None  # monotonic time a blocking call began, or None

    def open(self):
        self.connects += 1
        params = pika.ConnectionParameters(
            host=self.node.addr, port=self.node.amqp_port, heartbeat=AMQP_HEARTBEAT_SECS,
            socket_timeout=CONNECT_TIMEOUT_SECS, stack_timeout=CONNECT_TIMEOUT_SECS,
            blocked_connection_timeout=OPERATION_TIMEOUT_SECS, connection_attempts=1,
            client_properties={"connection_name": self.name})
        self.busy_since = time.monotonic()
        try:
            self.connection = pika.BlockingConnection(params)
            self.channel = self.connection.channel()
            self.channel.queue_declare(self.queue, durable=True)
        finally:
            self.busy_since = None

    def close(self):
        conn, self.connection, self.channel = self.connection, None, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # noqa: BLE001 - the connection is being dropped anyway
                pass

    def cut(self):
        """Called by the watchdog: shuts the socket down under pika's feet."""
        conn = self.connection
        try:
            sock = conn._impl._transport._sock  # noqa: SLF001 - pika exposes no socket
            sock.shutdown(socket.SHUT_RDWR)
        except Exception:  # noqa: BLE001 - not connected yet, or already gone
            pass

    def call(self, fn, *args, **kwargs):
        self.busy_since = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.busy_since = None

    def failed_on_node(self, e):
        was = self.node.id
        self.close()
        self.next_node()
        self.history.count(f"{self.kind} reconnects")
        log("amqp", f"{self.name}: {type(e).__name__}: {str(e)[:160]} on node {was}; "
                    f"reconnecting to node {self.node.id}", echo=False)
        time.sleep(0.2)


AMQP_ERRORS = (pika.exceptions.AMQPError, OSError, AssertionError, ValueError)


class AmqpPublisher(AmqpClient):
    """Publisher confirms, one message at a time: confirmed when basic_publish returns."""

    kind = "amqp-pub"

    def __init__(self, name, cluster, history, stop_event, first_node, stream, queue, rate_per_sec,
                 finish_event, idempotency_header, txn_batch_len=0):
        super().__init__(name, cluster, history, stop_event, first_node)
        self.stream, self.queue = stream, queue
        self.interval_secs = 1.0 / rate_per_sec
        self.finish_event = finish_event
        self.idempotency_header = idempotency_header
        self.txn_batch_len = txn_batch_len  # 0: confirms; N: tx.select, N publishes, tx.commit
        self.next_seq = 1
        self.pending = []  # seqs published but not confirmed, to publish again after a failure

    def properties(self, seq):
        message_id = f"{self.name}:{seq}"
        headers = {"x-idempotency-key": message_id} if self.idempotency_header else None
        return pika.BasicProperties(message_id=message_id, delivery_mode=2, headers=headers)

    def publish_one(self, seq):
        self.history.record_sent(self.stream, self.name, seq, self.node.id)
        self.call(self.channel.basic_publish, exchange="", routing_key=self.queue,
                  body=payload_of(self.name, seq), properties=self.properties(seq), mandatory=True)

    def main(self):
        next_send = time.monotonic()
        give_up_at = None
        while not self.stop_event.is_set():
            if self.finish_event.is_set() and not self.pending:
                break
            if self.finish_event.is_set():
                give_up_at = give_up_at or time.monotonic() + 90
                if time.monotonic() > give_up_at:
                    break
            try:
                if self.connection is None:
                    self.call(self.open)
                    if self.txn_batch_len:
                        self.call(self.channel.tx_select)
                    else:
                        self.call(self.channel.confirm_delivery)
                if not self.pending:
                    if self.finish_event.is_set():
                        continue
                    wait = next_send - time.monotonic()
                    if wait > 0:
                        # Keeps heartbeats flowing while idle.
                        self.call(self.connection.process_data_events, time_limit=wait)
                        continue
                    n = max(1, self.txn_batch_len)
                    self.pending = list(range(self.next_seq, self.next_seq + n))
                    self.next_seq += n
                    next_send = max(next_send + n * self.interval_secs, time.monotonic() - 1.0)
                if self.txn_batch_len:
                    for seq in self.pending:
                        self.publish_one(seq)
                    self.call(self.channel.tx_commit)
                else:
                    self.publish_one(self.pending[0])
                for seq in self.pending:
                    self.history.record_confirmed(self.stream, self.name, seq, self.node.id)
                self.pending = []
            except pika.exceptions.NackError:
                self.history.record_retried(self.stream, self.name, self.pending)
                self.history.count("amqp basic.nack")
                log("amqp", f"{self.name}: basic.nack for {self.pending} on node {self.node.id}; publishing again")
            except pika.exceptions.UnroutableError:
                self.history.count("amqp basic.return")
                log("ANOMALY", f"{self.name}: basic.return for {self.pending} on node {self.node.id}")
            except AMQP_ERRORS as e:
                self.history.record_retried(self.stream, self.name, self.pending)
                self.failed_on_node(e)
        self.close()


class AmqpConsumer(AmqpClient):
    """Manual acks; the flag recorded with each delivery is AMQP's redelivered."""

    kind = "amqp-consumer"

    def __init__(self, name, cluster, history, stop_event, first_node, queue, publishing_event):
        super().__init__(name, cluster, history, stop_event, first_node)
        self.queue = queue
        self.publishing_event = publishing_event
        self.ready = threading.Event()
        self.last_message = time.monotonic()

    def on_message(self, channel, method, properties, body):
        self.last_message = time.monotonic()
        self.history.record_receipt(self.name, body, method.redelivered, self.node.id)
        channel.basic_ack(method.delivery_tag)

    def main(self):
        while not self.stop_event.is_set():
            try:
                if self.connection is None:
                    self.call(self.open)
                    self.call(self.channel.basic_qos, prefetch_count=AMQP_PREFETCH)
                    self.call(self.channel.basic_consume, self.queue, self.on_message, auto_ack=False)
                    self.last_message = time.monotonic()
                    self.ready.set()
                self.call(self.connection.process_data_events, time_limit=0.5)
                if (self.publishing_event.is_set()
                        and time.monotonic() - self.last_message > SUBSCRIBER_STALL_SECS):
                    self.history.count("amqp consumer stalls")
                    raise TimeoutError(f"nothing received for {SUBSCRIBER_STALL_SECS:.0f}s")
            except (*AMQP_ERRORS, TimeoutError) as e:
                self.failed_on_node(e)
        self.close()


class Watchdog(threading.Thread):
    """Cuts the socket of an AMQP client whose blocking call has lasted too long."""

    def __init__(self, clients, stop_event):
        super().__init__(name="watchdog", daemon=True)
        self.clients, self.stop_event = clients, stop_event

    def run(self):
        while not self.stop_event.wait(0.5):
            t = time.monotonic()
            for c in self.clients:
                since = c.busy_since
                if since is not None and t - since > OPERATION_TIMEOUT_SECS:
                    c.history.count("amqp call time-outs")
                    log("amqp", f"{c.name}: call on node {c.node.id} took over {OPERATION_TIMEOUT_SECS:.0f}s; "
                                "cutting its socket", echo=False)
                    c.busy_since = None
                    c.cut()


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def analyse(history, consumers_by_stream):
    """Per stream: lost, missed, duplicated (flagged / true), reordered; with example details."""
    results = {}
    details = collections.defaultdict(list)
    for stream, consumers in consumers_by_stream.items():
        kind = history.stream_kind[stream]
        confirmed = {(pub, seq): v for (s, pub), seqs in history.confirmed.items() if s == stream
                     for seq, v in seqs.items()}
        sent = {(pub, seq): v for (s, pub), seqs in history.sent.items() if s == stream for seq, v in seqs.items()}
        retried = {(pub, seq) for (s, pub), seqs in history.retried.items() if s == stream for seq in seqs}
        r = collections.Counter()
        r["confirmed"] = len(confirmed)
        r["unconfirmed"] = len(set(sent) - set(confirmed))
        receivers = collections.defaultdict(set)
        # A "domain" is where a message must arrive exactly once: each subscriber of a fan-out
        # stream, or all the consumers of a queue together.
        domains = [[c] for c in consumers] if kind == "fanout" else [list(consumers)]
        for domain in domains:
            merged = sorted((rec + (c,) for c in domain for rec in history.receipts[c]), key=lambda x: x[0])
            seen = {}
            max_first = collections.defaultdict(lambda: 0)  # (consumer, pub) -> highest first seq
            for t, pub, seq, flagged, node, c in merged:
                key = (pub, seq)
                receivers[key].add(c)
                r["deliveries"] += 1
                if key not in sent:
                    r["phantom"] += 1
                    details["phantom"].append(f"{stream} {c} got {pub}:{seq} at {t:.2f}s on node {node}: never sent")
                    continue
                if key in seen:
                    # Unflagged: stored twice. After a client retry that is at-least-once doing
                    # its job (QoS 1, AMQP without idempotency key); without one it is not.
                    r["dup_flagged" if flagged else "dup_retry" if key in retried else "dup_true"] += 1
                    if not flagged:
                        first = seen[key]
                        details["dup_retry" if key in retried else "dup_true"].append(
                            f"{stream} {pub}:{seq}: {c} at {t:.2f}s on node {node}, unflagged; first {first[1]} at "
                            f"{first[0]:.2f}s on node {first[2]}; sent {sent[key][0]:.2f}s on node {sent[key][1]}, "
                            f"confirmed {fmt_confirm(confirmed.get(key))}")
                    continue
                seen[key] = (t, c, node)
                prev = max_first[(c, pub)]
                if seq < prev:
                    if flagged:
                        r["late_redelivered"] += 1
                    else:
                        r["reordered"] += 1
                        details["reordered"].append(
                            f"{stream} {c} got {pub}:{seq} at {t:.2f}s on node {node} after {pub}:{prev}; "
                            f"sent {sent[key][0]:.2f}s on node {sent[key][1]}, confirmed {fmt_confirm(confirmed.get(key))}")
                max_first[(c, pub)] = max(prev, seq)
        for key, (t, node) in sorted(confirmed.items()):
            got = receivers.get(key, set())
            if not got:
                r["lost"] += 1
                details["lost"].append(f"{stream} {key[0]}:{key[1]} sent {sent[key][0]:.2f}s on node {sent[key][1]}, "
                                       f"confirmed {t:.2f}s on node {node}, received by no consumer")
            elif kind == "fanout" and len(got) < len(consumers):
                missing = sorted(set(consumers) - got)
                r["missed"] += len(missing)
                details["missed"].append(f"{stream} {key[0]}:{key[1]} confirmed {t:.2f}s on node {node}, "
                                         f"not received by {','.join(missing)}")
        r["retried"] = len(retried)
        r["unconfirmed_received"] = sum(1 for k in set(sent) - set(confirmed) if receivers.get(k))
        r["unknown_payloads"] = sum(history.unknown[c] for c in consumers)
        results[stream] = r
    return results, details


def fmt_confirm(v):
    return "never" if v is None else f"{v[0]:.2f}s on node {v[1]}"


def fault_at(faults, t):
    """The fault under way at time t (for the details), or ''."""
    for start, end, kind, node in faults:
        if start - 1 <= t <= end + 1:
            return f"{kind} node {node} [{start:.1f}s..{end:.1f}s]"
    return ""


COLUMNS = [("confirmed", "confirmed"), ("unconfirmed", "unconf."), ("lost", "lost"), ("missed", "missed"),
           ("dup_flagged", "dup(flag)"), ("dup_retry", "dup(retry)"), ("dup_true", "dup(true)"), ("reordered", "reordered"),
           ("late_redelivered", "late-redeliv"), ("phantom", "phantom"), ("deliveries", "deliveries")]


def summary_table(history, results, injector, run_secs, load_secs, seed):
    lines = []
    lines.append(f"seed {seed}; load {load_secs:.0f}s; whole run {run_secs:.0f}s (set-up, load, heal, drain, check)")
    header = f"{'stream':<14} {'proto':<5} " + " ".join(f"{label:>12}" for _, label in COLUMNS)
    lines.append(header)
    lines.append("-" * len(header))
    total = collections.Counter()
    per_protocol = collections.Counter()
    for stream, r in results.items():
        proto = history.stream_protocol[stream]
        lines.append(f"{stream:<14} {proto:<5} " + " ".join(f"{r[k]:>12}" for k, _ in COLUMNS))
        total.update(r)
        per_protocol[proto] += r["confirmed"]
    lines.append(f"{'total':<14} {'':<5} " + " ".join(f"{total[k]:>12}" for k, _ in COLUMNS))
    lines.append("confirmed per protocol: " + ", ".join(f"{p} {n}" for p, n in sorted(per_protocol.items())))
    counts = injector.counts if injector else collections.Counter()
    lines.append("faults injected: " + ", ".join(f"{k} {counts[k]}" for k in FAULT_KINDS)
                 + f" (total {sum(counts.values())})")
    lines.append("client events: " + (", ".join(f"{k} {v}" for k, v in sorted(history.events.items())) or "none"))
    return lines, total


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-secs", type=float, default=60, help="how long the load (and faults) last")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: random, printed)")
    parser.add_argument("--no-faults", action="store_true", help="load only: the baseline")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second per publisher")
    parser.add_argument("--drain-quiet-secs", type=float, default=30.0,
                        help="the drain ends when no consumer has received anything for this long")
    parser.add_argument("--drain-max-secs", type=float, default=300.0)
    parser.add_argument("--amqp-idempotency-header", action="store_true",
                        help="also set x-idempotency-key (= message_id) on AMQP publishes: Wharf's default "
                             "amqp.idempotency_key is 'header', so without it retries may be stored twice")
    parser.add_argument("--watch-queues-secs", type=float, default=0,
                        help="every this many seconds, log each queue's (messages, consumers) as a healthy node "
                             "sees them (0: off); a persistent session with two consumers is logged as ANOMALY")
    parser.add_argument("--binary", required=True)
    parser.add_argument("--repo", required=True, help="repository root (for examples/cluster/)")
    parser.add_argument("--work-dir", default=None, help="default: a new /tmp/wharf-faults.XXXX")
    parser.add_argument("--log-level", default="info,openraft=warn,lsm_tree=warn,wharf_mqtt=debug,wharf_amqp=debug",
                        help="passed to wharf serve --log-level (default: the protocols' debug lines, which say "
                             "why a connection or a publish failed)")
    args = parser.parse_args()

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="wharf-faults.", dir="/tmp")
    os.makedirs(work_dir, exist_ok=True)
    log.open(os.path.join(work_dir, "run.log"))
    # Copied, so that restarts run the same binary even if someone rebuilds meanwhile.
    binary = os.path.join(work_dir, "wharf")
    shutil.copy2(args.binary, binary)
    log("run", f"work dir {work_dir}; seed {seed}; duration {args.duration_secs:.0f}s; "
               f"faults {'off' if args.no_faults else 'on'}; rate {args.rate}/s per publisher")

    def on_signal(signum, frame):
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    cluster = Cluster(work_dir, binary, args.repo, args.log_level)
    stop_clients = threading.Event()
    stop_faults = threading.Event()
    clients = []
    exit_code = 3
    try:
        exit_code = run(args, seed, work_dir, cluster, stop_clients, stop_faults, clients)
    except Interrupted as e:
        log("run", f"interrupted ({e}); cleaning up")
        exit_code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_faults.set()
        stop_clients.set()
        for c in clients:
            c.join(timeout=3)
        cluster.cleanup()
        log("run", f"cleaned up (nodes stopped, namespaces and bridge removed); logs in {work_dir}")
    return exit_code


def run(args, seed, work_dir, cluster, stop_clients, stop_faults, clients):
    run_started = now_secs()
    cluster.create_network()
    for node in cluster.nodes.values():
        cluster.start(node)
    if not cluster.wait_ready(cluster.nodes.values(), timeout_secs=120):
        raise RuntimeError("the cluster did not become ready in 120 s")
    log("run", f"cluster ready in {now_secs() - run_started:.1f}s; leaders {cluster.leaders()}")

    history = History()
    publishing = threading.Event()
    finish = threading.Event()
    consumers_by_stream = collections.defaultdict(list)
    publishers, consumers, amqp_clients = [], [], []

    # MQTT: per QoS, three publishers (one starting on each node) and two subscribers to every
    # publisher's topic (a fan-out: each subscriber must get every message), starting on the
    # nodes after the publishers'.
    for qos in (1, 2):
        stream = f"mqtt-qos{qos}"
        history.add_stream(stream, "MQTT", "fanout")
        for i, first in enumerate((2, 3)):
            sub = MqttSubscriber(f"wf-q{qos}-sub{i + 1}", cluster, history, stop_clients, first,
                                 f"faults/q{qos}/#", qos, publishing)
            consumers.append(sub)
            consumers_by_stream[stream].append(sub.name)
        for first in NODE_IDS:
            name = f"wf-q{qos}-pub{first}"
            publishers.append(MqttPublisher(name, cluster, history, stop_clients, first, stream,
                                            f"faults/q{qos}/{name}", qos, args.rate, finish))
    # AMQP: a durable queue with publisher confirms, and one written in transactions; each has two
    # competing consumers (manual acks).
    for stream, queue, batch_len, pub_nodes in (("amqp-confirm", QUEUE_CONFIRM, 0, NODE_IDS),
                                                ("amqp-tx", QUEUE_TXN, TXN_BATCH_LEN, (3, 1))):
        history.add_stream(stream, "AMQP", "competing")
        for i, first in enumerate((2, 3)):
            c = AmqpConsumer(f"wf-{stream}-c{i + 1}", cluster, history, stop_clients, first, queue, publishing)
            consumers.append(c)
            amqp_clients.append(c)
            consumers_by_stream[stream].append(c.name)
        for first in pub_nodes:
            p = AmqpPublisher(f"wf-{stream}-p{first}", cluster, history, stop_clients, first, stream, queue,
                              args.rate, finish, args.amqp_idempotency_header, batch_len)
            publishers.append(p)
            amqp_clients.append(p)
    clients.extend(consumers + publishers)

    watchdog = Watchdog(amqp_clients, stop_clients)
    watchdog.start()
    for c in consumers:
        c.start()
    deadline = time.monotonic() + 60
    for c in consumers:
        ev = c.subscribed if isinstance(c, MqttSubscriber) else c.ready
        if not ev.wait(max(0.1, deadline - time.monotonic())):
            raise RuntimeError(f"{c.name} not subscribed after 60 s")
    log("run", f"{len(consumers)} consumers subscribed; starting {len(publishers)} publishers "
               f"for {args.duration_secs:.0f}s")

    load_started = now_secs()
    publishing.set()
    for p in publishers:
        p.start()
    injector = None
    if not args.no_faults:
        injector = FaultInjector(cluster, seed, stop_faults)
        injector.start()
    if args.watch_queues_secs > 0:
        session_queues = [f"mqtt.session.{c.name}" for c in consumers if isinstance(c, MqttSubscriber)]
        threading.Thread(target=watch_queues, name="watch-queues", daemon=True,
                         args=(cluster, injector, [QUEUE_CONFIRM, QUEUE_TXN] + session_queues,
                               args.watch_queues_secs, stop_clients)).start()
    next_progress = time.monotonic() + 30
    end = time.monotonic() + args.duration_secs
    while time.monotonic() < end:
        time.sleep(0.5)
        if time.monotonic() >= next_progress:
            next_progress += 30
            progress(history)
    load_secs = now_secs() - load_started

    # Heal: no new fault; end the one under way (the injector's own recovery does it).
    stop_faults.set()
    if injector:
        injector.join(timeout=180)
    for node in cluster.nodes.values():
        if node.partitioned:
            cluster.heal(node)
        if node.stopped:
            cluster.thaw(node)
        if not node.running():
            cluster.start(node)
    ready = cluster.wait_ready(cluster.nodes.values(), timeout_secs=120)
    log("run", f"load over after {load_secs:.0f}s; cluster healed, all ready: {ready}; "
               "publishers finish their unconfirmed messages")
    finish.set()
    for p in publishers:
        p.join(timeout=120)
    publishing.clear()
    for p in publishers:
        if p.is_alive():
            log("ANOMALY", f"{p.name} still has unconfirmed messages after 120 s")
    log("run", f"publishers done; draining until nothing arrives for {args.drain_quiet_secs:.0f}s")
    drain_end = time.monotonic() + args.drain_max_secs
    while time.monotonic() < drain_end:
        time.sleep(1)
        if now_secs() - history.last_receipt_t >= args.drain_quiet_secs:
            break
    stop_clients.set()
    for c in clients:
        c.join(timeout=10)
    failed = [f"{c.name}: {c.failed}" for c in clients if c.failed]
    for f in failed:
        log("ANOMALY", f"client thread died: {f}")

    results, details = analyse(history, consumers_by_stream)
    faults = injector.events if injector else []
    time.sleep(3)  # lets the nodes commit the clients' disconnections
    queues = [QUEUE_CONFIRM, QUEUE_TXN] + [f"mqtt.session.{c.name}" for c in consumers if isinstance(c, MqttSubscriber)]
    queue_depths = {node.id: queue_depth(node, queues) for node in cluster.nodes.values()}
    leftovers = sweep_queues(cluster.nodes[1], queues)
    run_secs = now_secs() - run_started
    lines, total = summary_table(history, results, injector, run_secs, load_secs, seed)
    with open(os.path.join(work_dir, "details.txt"), "w") as f:
        for kind, items in details.items():
            for item in items:
                t_match = re.search(r"confirmed ([0-9.]+)s|at ([0-9.]+)s", item)
                t = float(next(g for g in t_match.groups() if g)) if t_match else -1
                f.write(f"{kind}: {item}  {fault_at(faults, t)}\n")
    dump_history(history, os.path.join(work_dir, "history.jsonl"))
    with open(os.path.join(work_dir, "faults.json"), "w") as f:
        json.dump([{"start_secs": s, "end_secs": e, "kind": k, "node": n} for s, e, k, n in faults], f, indent=1)
    log("run", "summary follows; details (every anomaly) in " + os.path.join(work_dir, "details.txt"))
    print()
    for line in lines:
        print(line)
        log("summary", line, echo=False)
    print("left in the queues after the clients closed, (messages, consumers) per node:")
    for node_id, depths in queue_depths.items():
        print(f"  node {node_id}: {depths}")
        log("summary", f"queues on node {node_id}: {depths}", echo=False)
    for q, items in leftovers.items():
        line = f"still in {q} after the drain (basic.get, not acked): {items if isinstance(items, str) else ' '.join(items[:20])}"
        print("  " + line)
        log("summary", line, echo=False)
    for kind in ("lost", "missed", "reordered", "dup_true", "phantom"):
        for item in details[kind][:5]:
            print(f"  {kind}: {item}")
        if len(details[kind]) > 5:
            print(f"  ... {len(details[kind]) - 5} more {kind} in details.txt")
    bad = total["lost"] + total["missed"] + total["reordered"] + total["phantom"]
    print(f"RESULT: {'FAIL' if bad or failed else 'PASS'} (lost {total['lost']}, missed {total['missed']}, "
          f"reordered {total['reordered']}, phantom {total['phantom']}; work dir {work_dir})")
    return 1 if bad or failed else 0


def watch_queues(cluster, injector, queues, interval_secs, stop_event):
    """Logs the queues as a healthy node sees them: evidence for deliveries held by consumers
    whose connections are gone."""
    turn = 0
    while not stop_event.wait(interval_secs):
        faulty = injector.current[1] if injector and injector.current else None
        healthy = [n for n in cluster.nodes.values()
                   if n is not faulty and n.running() and not n.stopped and not n.partitioned]
        if not healthy:
            continue
        turn += 1
        node = healthy[turn % len(healthy)]
        depths = queue_depth(node, queues)
        log("queues", f"as node {node.id} sees them: {depths}", echo=False)
        for q, v in depths.items():
            if q.startswith("mqtt.session.") and isinstance(v, tuple) and v[1] > 1:
                log("ANOMALY", f"{q} has {v[1]} consumers on node {node.id} ({v[0]} messages)")


def dump_history(history, path):
    """Every send, confirm, retry and delivery, one JSON object a line, for a closer look."""
    with open(path, "w") as f:
        for kind, table in (("sent", history.sent), ("confirmed", history.confirmed)):
            for (stream, pub), seqs in table.items():
                for seq, (t, node) in seqs.items():
                    f.write(json.dumps({"ev": kind, "stream": stream, "pub": pub, "seq": seq, "t": round(t, 3),
                                        "node": node}) + "\n")
        for (stream, pub), seqs in history.retried.items():
            f.write(json.dumps({"ev": "retried", "stream": stream, "pub": pub, "seqs": sorted(seqs)}) + "\n")
        for consumer, receipts in history.receipts.items():
            for t, pub, seq, flagged, node in receipts:
                f.write(json.dumps({"ev": "recv", "consumer": consumer, "pub": pub, "seq": seq, "t": round(t, 3),
                                    "flag": flagged, "node": node}) + "\n")


def inspect_queues(node, queues, look):
    """queue -> look(channel, queue) on `node`, one channel per queue; a queue whose look failed
    maps to the error, and {"error": ...} means the node could not be reached: the final
    inspections report what they could not see rather than failing the run."""
    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host=node.addr, port=node.amqp_port, socket_timeout=5, stack_timeout=10, connection_attempts=1))
    except Exception as e:  # noqa: BLE001 - a report detail, not a check
        return {"error": repr(e)}
    out = {}
    try:
        for q in queues:
            try:
                ch = conn.channel()
                out[q] = look(ch, q)
                ch.close()
            except Exception as e:  # noqa: BLE001
                out[q] = repr(e)[:80]
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
    return out


def sweep_queues(node, queues):
    """queue -> ["pub:seq(redelivered)", ...] still in it once every client has gone: messages that
    sat in a queue while its consumers were connected and idle. Taken with basic.get and not
    acknowledged, so they stay where they are."""
    def take_all(ch, q):
        items = []
        for _ in range(10000):
            method, _props, body = ch.basic_get(q, auto_ack=False)
            if method is None:
                break
            pub_seq = ":".join(body.decode(errors="replace").split(" ")[:2])
            items.append(pub_seq + ("(redelivered)" if method.redelivered else ""))
        return items
    return {q: items for q, items in inspect_queues(node, queues, take_all).items() if items}


def queue_depth(node, queues=(QUEUE_CONFIRM, QUEUE_TXN)):
    """queue -> (messages, consumers) as `node` sees them, by passive declares, after every client
    has gone: consumers left over are held by connections the broker still thinks alive."""
    def depth(ch, q):
        m = ch.queue_declare(q, passive=True).method
        return (m.message_count, m.consumer_count)
    return inspect_queues(node, queues, depth)


def progress(history):
    with history.lock:
        confirmed = sum(len(v) for v in history.confirmed.values())
        received = sum(len(v) for v in history.receipts.values())
        events = dict(history.events)
    log("progress", f"confirmed {confirmed}, deliveries {received}, events {events}")


if __name__ == "__main__":
    sys.exit(main())
