"""pika scenarios against Wharf (see conformance/amqp/pika.rs).

    python pika_check.py readme --port 5672
    python pika_check.py from-mqtt --port 5672 --mqtt-port 1883
"""

import argparse
import subprocess
import sys
import time

import pika


def readme(args):
    # The README's example, as written there.
    connection = pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1", port=args.port))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue="orders", durable=True)
    channel.basic_publish(
        exchange="",
        routing_key="orders",
        body=b"order 42",
        properties=pika.BasicProperties(delivery_mode=2, headers={"region": "eu"}),
    )
    for method, properties, body in channel.consume("orders", inactivity_timeout=10):
        if method is None:
            raise SystemExit("no message within 10 s")
        channel.basic_ack(method.delivery_tag)
        assert body == b"order 42", body
        assert properties.headers == {"region": "eu"}, properties.headers
        assert properties.delivery_mode == 2, properties.delivery_mode
        break
    channel.cancel()
    method = channel.queue_declare(queue="orders", passive=True).method
    assert method.message_count == 0, f"{method.message_count} messages left after the ack"
    connection.close()


def from_mqtt(args):
    connection = pika.BlockingConnection(pika.ConnectionParameters(host="127.0.0.1", port=args.port))
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue=queue, exchange="amq.topic", routing_key="sensors.#")
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(args.mqtt_port), "-t", "sensors/temp", "-m", "21.5", "-q", "1"],
        check=True,
        timeout=10,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            assert method.routing_key == "sensors.temp", method.routing_key
            assert body == b"21.5", body
            break
        time.sleep(0.05)
    else:
        raise SystemExit("the MQTT publish did not reach the AMQP queue within 10 s")
    connection.close()


SCENARIOS = {"readme": readme, "from-mqtt": from_mqtt}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mqtt-port", type=int, default=1883)
    args = parser.parse_args()
    SCENARIOS[args.scenario](args)
    print(f"passed pika {args.scenario}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
