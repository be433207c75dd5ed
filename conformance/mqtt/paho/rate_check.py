"""A rough end-to-end rate check with one Paho publisher and one Paho subscriber (Python-bound:
the clients, not the broker, are the limit). Not a benchmark: `wharf bench` is the tool for that.

    python conformance/mqtt/paho/rate_check.py --port 1883 --count 5000 --qos 1
"""

import argparse
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--qos", type=int, choices=[0, 1, 2], default=1)
    parser.add_argument("--size", type=int, default=256, help="payload bytes")
    args = parser.parse_args()

    received = 0
    done = threading.Event()

    def on_message(_client, _userdata, _message):
        nonlocal received
        received += 1
        if received >= args.count:
            done.set()

    topic = f"rate/{time.time_ns()}"
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rate-sub-{time.time_ns()}", protocol=mqtt.MQTTv311)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect(args.host, args.port)
    sub.loop_start()
    sub.subscribe(topic, args.qos)
    subscribed.wait(10)

    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rate-pub-{time.time_ns()}", protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(256)
    pub.connect(args.host, args.port)
    pub.loop_start()
    payload = b"x" * args.size
    started = time.monotonic()
    infos = [pub.publish(topic, payload, qos=args.qos) for _ in range(args.count)]
    for info in infos:
        info.wait_for_publish(60)
    published = time.monotonic() - started
    done.wait(60)
    total = time.monotonic() - started
    print(
        f"QoS {args.qos}: {args.count} x {args.size} B published (acknowledged) in {published:.2f} s "
        f"({args.count / published:.0f}/s); {received} received in {total:.2f} s ({received / total:.0f}/s)"
    )
    return 0 if received >= args.count else 1


if __name__ == "__main__":
    raise SystemExit(main())
