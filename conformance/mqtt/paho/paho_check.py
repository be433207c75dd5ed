#!/usr/bin/env python3
"""Interoperability checks of Wharf's MQTT listener with the Eclipse Paho Python client (paho-mqtt 2.1).

Run by conformance/mqtt/paho.rs with the venv made by conformance/setup.sh:

    python paho_check.py SCENARIO --host 127.0.0.1 --port N --version {311,5}
                         [--transport {tcp,websockets}] [--tls-ca CERT.pem]

Scenarios: roundtrip (publish/subscribe at QoS 0, 1, 2), retained, will, session. Each exits 0 when
every check passes, and non-zero with a message on stderr naming the failed check otherwise.

`gen-cert --cert C --key K` writes a self-signed certificate for 127.0.0.1/localhost with the
`cryptography` package (used when the `openssl` command is not available).
"""

import argparse
import datetime
import ipaddress
import queue
import sys
import threading
import time
import uuid

TIMEOUT_S = 10.0
# How long "nothing arrives" is watched after a positive control showed delivery works.
SETTLE_S = 1.0


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def mqtt_modules():
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    check(paho.mqtt.__version__.startswith("2.1"), f"paho-mqtt 2.1.x expected, found {paho.mqtt.__version__}")
    return mqtt, CallbackAPIVersion, PacketTypes, Properties


class Conn:
    """One paho client running its network loop in a thread, with queues for what it receives."""

    def __init__(self, args, client_id, clean=True, session_expiry=None, will=None):
        mqtt, callback_api, packet_types, properties = mqtt_modules()
        self.args = args
        self.client_id = client_id
        self.v5 = args.version == "5"
        self.messages = queue.Queue()
        self.subacks = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack = None
        kwargs = dict(
            callback_api_version=callback_api.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            transport=args.transport,
        )
        if not self.v5:
            kwargs["clean_session"] = clean
        client = mqtt.Client(**kwargs)
        if args.transport == "websockets":
            client.ws_set_options(path="/mqtt")
        if args.tls_ca:
            # With --client-cert/--client-key the client authenticates too (mTLS).
            client.tls_set(ca_certs=args.tls_ca, certfile=args.client_cert, keyfile=args.client_key)
        if will is not None:
            topic, payload = will
            client.will_set(topic, payload, qos=1, retain=False)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda _c, _u, _flags, _reason, _p: self.disconnected.set()
        client.on_message = lambda _c, _u, message: self.messages.put(message)
        client.on_subscribe = lambda _c, _u, mid, codes, _p: self.subacks.put((mid, codes))
        connect_kwargs = {"keepalive": 30}
        if self.v5:
            props = properties(packet_types.CONNECT)
            if session_expiry is not None:
                props.SessionExpiryInterval = session_expiry
            connect_kwargs["clean_start"] = clean
            connect_kwargs["properties"] = props
        self.client = client
        client.connect(args.host, args.port, **connect_kwargs)
        client.loop_start()
        check(self.connected.wait(TIMEOUT_S), f"{client_id}: no CONNACK within {TIMEOUT_S} s")
        flags, reason = self.connack
        check(not reason.is_failure, f"{client_id}: connection refused: {reason}")
        self.session_present = bool(flags.session_present)

    def _on_connect(self, _client, _userdata, flags, reason_code, _properties):
        self.connack = (flags, reason_code)
        self.connected.set()

    def subscribe(self, topic, qos):
        result, mid = self.client.subscribe(topic, qos)
        check(result == 0, f"{self.client_id}: SUBSCRIBE {topic} not sent ({result})")
        try:
            got_mid, codes = self.subacks.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise CheckFailed(f"{self.client_id}: no SUBACK for {topic}")
        check(got_mid == mid, f"{self.client_id}: SUBACK for message id {got_mid}, expected {mid}")
        granted = [code.value for code in codes]
        check(granted == [qos], f"{self.client_id}: SUBACK for {topic} granted {granted}, expected [{qos}]")

    def publish(self, topic, payload, qos, retain=False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=TIMEOUT_S)
        check(info.is_published(), f"{self.client_id}: PUBLISH to {topic} at QoS {qos} not acknowledged")

    def expect_message(self, what):
        try:
            return self.messages.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise CheckFailed(f"{self.client_id}: no message ({what}) within {TIMEOUT_S} s")

    def expect_no_message(self, what, wait=SETTLE_S):
        try:
            message = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise CheckFailed(f"{self.client_id}: unexpected message ({what}): {message.topic} {message.payload!r}")

    def disconnect(self):
        """Send DISCONNECT and wait until the network loop has sent it and closed."""
        self.client.disconnect()
        check(self.disconnected.wait(TIMEOUT_S), f"{self.client_id}: DISCONNECT did not complete")
        self.client.loop_stop()

    def drop(self):
        """Close the socket without DISCONNECT (an abnormal disconnection)."""
        self.client.loop_stop()
        sock = self.client.socket()
        check(sock is not None, f"{self.client_id}: no socket to drop")
        sock.close()


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def scenario_roundtrip(args):
    base = unique("paho/roundtrip")
    sub = Conn(args, unique("paho-sub"))
    pub = Conn(args, unique("paho-pub"))
    for qos in (0, 1, 2):
        topic = f"{base}/{qos}"
        sub.subscribe(topic, qos)
        payload = f"qos {qos} via {args.transport}".encode()
        pub.publish(topic, payload, qos)
        message = sub.expect_message(f"QoS {qos} round trip")
        check(message.topic == topic, f"QoS {qos}: topic {message.topic}, expected {topic}")
        check(message.payload == payload, f"QoS {qos}: payload {message.payload!r}, expected {payload!r}")
        check(message.qos == qos, f"QoS {qos}: delivered at QoS {message.qos}")
        check(not message.retain, f"QoS {qos}: RETAIN set on a live message")
        print(f"ok: QoS {qos} round trip")
    sub.expect_no_message("a duplicate")
    sub.disconnect()
    pub.disconnect()


def scenario_retained(args):
    base = unique("paho/retained")
    pub = Conn(args, unique("paho-retain-pub"))
    pub.publish(f"{base}/a", b"A", 1, retain=True)
    pub.publish(f"{base}/b", b"B", 1, retain=True)
    sub = Conn(args, unique("paho-retain-sub"))
    sub.subscribe(f"{base}/#", 1)
    got = sorted((m.topic, m.payload, m.retain) for m in (sub.expect_message("retained 1"), sub.expect_message("retained 2")))
    check(got == [(f"{base}/a", b"A", True), (f"{base}/b", b"B", True)], f"retained messages on subscribe: {got}")
    sub.disconnect()
    print("ok: retained messages sent on subscribe with RETAIN 1")
    pub.publish(f"{base}/a", b"", 1, retain=True)
    late = Conn(args, unique("paho-retain-late"))
    late.subscribe(f"{base}/#", 1)
    message = late.expect_message("the remaining retained message")
    check((message.topic, message.payload) == (f"{base}/b", b"B"), f"after clearing {base}/a: got {message.topic} {message.payload!r}")
    late.expect_no_message("the cleared retained message")
    print("ok: a zero-byte retained message clears the topic")
    late.disconnect()
    pub.disconnect()


def scenario_will(args):
    base = unique("paho/will")
    watcher = Conn(args, unique("paho-will-watcher"))
    watcher.subscribe(f"{base}/#", 1)
    polite = Conn(args, unique("paho-polite"), will=(f"{base}/polite", b"polite is gone"))
    polite.disconnect()
    crashed = Conn(args, unique("paho-crashed"), will=(f"{base}/crashed", b"crashed is gone"))
    crashed.drop()
    message = watcher.expect_message("the will of the dropped connection")
    check(
        (message.topic, message.payload) == (f"{base}/crashed", b"crashed is gone"),
        f"expected only the dropped client's will, got {message.topic} {message.payload!r}",
    )
    watcher.expect_no_message("the will of the client that sent DISCONNECT")
    print("ok: will published on abnormal disconnection only")
    watcher.disconnect()


def scenario_session(args):
    topic = unique("paho/session")
    client_id = unique("paho-persistent")
    sub = Conn(args, client_id, clean=False, session_expiry=300)
    check(not sub.session_present, "a new session must not be present")
    sub.subscribe(topic, 1)
    sub.disconnect()
    pub = Conn(args, unique("paho-session-pub"))
    pub.publish(topic, b"while away", 1)
    sub = Conn(args, client_id, clean=False, session_expiry=300)
    check(sub.session_present, "the persistent session must be resumed (Session Present)")
    message = sub.expect_message("the message published while away")
    check((message.topic, message.payload) == (topic, b"while away"), f"got {message.topic} {message.payload!r}")
    sub.expect_no_message("a duplicate")
    print("ok: persistent session kept the subscription and the message")
    sub.disconnect()
    pub.disconnect()


def gen_cert(args):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with open(args.cert, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(args.key, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def gen_client_cert(args):
    """A CA (--cert/--key) and a client certificate it signs (--client-cert/--client-key), for mTLS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write(path, data):
        with open(path, "wb") as f:
            f.write(data)

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wharf test client CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]))
        .issuer_name(ca_name)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write(args.cert, ca.public_bytes(serialization.Encoding.PEM))
    write(args.key, key_pem(ca_key))
    write(args.client_cert, client.public_bytes(serialization.Encoding.PEM))
    write(args.client_key, key_pem(client_key))


SCENARIOS = {
    "roundtrip": scenario_roundtrip,
    "retained": scenario_retained,
    "will": scenario_will,
    "session": scenario_session,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS) + ["gen-cert", "gen-client-cert"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--version", choices=["311", "5"], default="311")
    parser.add_argument("--transport", choices=["tcp", "websockets"], default="tcp")
    parser.add_argument("--tls-ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--client-cert")
    parser.add_argument("--client-key")
    args = parser.parse_args()
    if args.scenario == "gen-cert":
        gen_cert(args)
        return 0
    if args.scenario == "gen-client-cert":
        gen_client_cert(args)
        return 0
    if args.port is None:
        parser.error("--port is required")
    started = time.monotonic()
    label = f"{args.scenario} (MQTT {'5' if args.version == '5' else '3.1.1'} over {args.transport}{' + TLS' if args.tls_ca else ''})"
    try:
        SCENARIOS[args.scenario](args)
    except CheckFailed as failure:
        print(f"FAILED {label}: {failure}", file=sys.stderr)
        return 1
    print(f"passed {label} in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
