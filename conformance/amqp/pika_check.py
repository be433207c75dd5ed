"""pika scenarios against Wharf (see conformance/amqp/pika.rs).

    python pika_check.py readme --port 5672
    python pika_check.py from-mqtt --port 5672 --mqtt-port 1883
    python pika_check.py exchange-topic --port 5672

Each scenario exits 0 when Wharf behaved as RabbitMQ documents (or, where Wharf deliberately differs,
as protocols/amqp/MAPPING.md says), and fails with a message naming what differed otherwise. The
topology scenarios (exchanges, queues, queue arguments) check channel errors by reply code AND reply
text, and then that the connection is still usable: a channel error closes the channel only.
"""

import calendar
import subprocess
import sys
import time
from datetime import datetime, timezone

import pika
from pika.exceptions import ConnectionBlockedTimeout, UnroutableError

from pika_common import (
    POLL_SECS,
    SETTLE_SECS,
    WAIT_SECS,
    Mismatch,
    confirmed_channel,
    connect,
    exchange_exists,
    expect,
    expect_bodies,
    expect_channel_error,
    expect_empty,
    expect_nacked,
    expect_returned,
    expect_usable,
    poll,
    publish,
    pump,
    queue_exists,
    run_scenarios,
    settle,
    take,
    take_unacked,
)

# A whole scenario's bound: the Rust side kills the process later (60 s), this names the cause.
SCENARIO_TIMEOUT_SECS = 30


def wait_until_gone(connection, what, exists, name):
    """Poll (at most WAIT_SECS) until `exists(connection, name)` is false."""
    poll(lambda: not exists(connection, name), f"{what} {name!r} going away", interval=POLL_SECS * 2)


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
    connection = connect(args)
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(queue=queue, exchange="amq.topic", routing_key="sensors.#")
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(args.mqtt_port), "-t", "sensors/temp", "-m", "21.5", "-q", "1"],
        check=True,
        timeout=10,
    )
    method, _, body = take(channel, queue, 1, timeout=10)[0]
    expect(method.routing_key == "sensors.temp", f"the MQTT publish arrived with routing key {method.routing_key!r}")
    expect(body == b"21.5", f"the MQTT publish arrived as {body!r}")
    connection.close()


# ----- exchanges -------------------------------------------------------------------------------------


def declare_queues(channel, *names):
    for name in names:
        channel.queue_declare(queue=name)


def exchange_direct(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("d", exchange_type="direct")
    declare_queues(channel, "qa", "qb", "qab", "qempty")
    channel.queue_bind("qa", "d", routing_key="a")
    channel.queue_bind("qb", "d", routing_key="b")
    channel.queue_bind("qab", "d", routing_key="a")
    channel.queue_bind("qab", "d", routing_key="b")
    channel.queue_bind("qempty", "d", routing_key="")
    for key in ["a", "b", "c", "A", "a.b", ""]:
        publish(channel, "d", key, f"key {key!r}")
    expect_bodies(channel, "qa", ["key 'a'"])
    expect_bodies(channel, "qb", ["key 'b'"])
    expect_bodies(channel, "qab", ["key 'a'", "key 'b'"])
    expect_bodies(channel, "qempty", ["key ''"])
    connection.close()


def exchange_fanout(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("f", exchange_type="fanout")
    declare_queues(channel, "f1", "f2", "unbound")
    channel.queue_bind("f1", "f", routing_key="")
    channel.queue_bind("f2", "f", routing_key="ignored")
    for key in ["x", "", "y.z"]:
        publish(channel, "f", key, f"key {key!r}")
    publish(channel, "", "unbound", "control")
    expected = ["key 'x'", "key ''", "key 'y.z'"]
    expect_bodies(channel, "f1", expected)
    expect_bodies(channel, "f2", expected)
    expect_bodies(channel, "unbound", ["control"])
    connection.close()


def exchange_topic(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("t", exchange_type="topic")
    bindings = {
        "t1": ["*.orange.*"],
        "t2": ["*.*.rabbit", "lazy.#"],
        "t3": ["#"],
        "t4": ["a.#.z"],
        "t5": ["a.*"],
    }
    for queue, keys in bindings.items():
        channel.queue_declare(queue=queue)
        for key in keys:
            channel.queue_bind(queue, "t", routing_key=key)
    keys = [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "orange",
        "quick.orange.male.rabbit",
        "lazy.orange.male.rabbit",
        "lazy",
        "",
        "a.z",
        "a.b.c.z",
        "a.b",
        "a",
        "a.b.c",
    ]
    for key in keys:
        publish(channel, "t", key, key)
    expect_bodies(channel, "t1", ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"])
    # lazy.pink.rabbit matches both of t2's bindings and still arrives once.
    expect_bodies(
        channel,
        "t2",
        [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "lazy.brown.fox",
            "lazy.pink.rabbit",
            "lazy.orange.male.rabbit",
            "lazy",
        ],
    )
    expect_bodies(channel, "t3", keys)
    # `#` matches zero or more words, `*` exactly one.
    expect_bodies(channel, "t4", ["a.z", "a.b.c.z"])
    expect_bodies(channel, "t5", ["a.z", "a.b"])
    connection.close()


def exchange_headers(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("h", exchange_type="headers")
    declare_queues(channel, "h-all", "h-any", "h-default")
    channel.queue_bind("h-all", "h", arguments={"x-match": "all", "format": "pdf", "type": "report"})
    channel.queue_bind("h-any", "h", arguments={"x-match": "any", "format": "pdf", "type": "report"})
    # Without x-match, a binding matches all of its headers.
    channel.queue_bind("h-default", "h", arguments={"format": "zip", "size": 3})
    messages = [
        ("both", {"format": "pdf", "type": "report"}),
        ("both and more", {"format": "pdf", "type": "report", "extra": "x"}),
        ("format only", {"format": "pdf"}),
        ("type only", {"type": "report"}),
        ("other values", {"format": "zip", "type": "log"}),
        ("zip and size", {"format": "zip", "size": 3}),
        ("zip, other size", {"format": "zip", "size": 4}),
        ("no headers", None),
    ]
    for body, headers in messages:
        # The routing key is ignored by a headers exchange.
        publish(channel, "h", "some.key", body, headers=headers)
    expect_bodies(channel, "h-all", ["both", "both and more"])
    expect_bodies(channel, "h-any", ["both", "both and more", "format only", "type only"])
    expect_bodies(channel, "h-default", ["zip and size"])
    connection.close()


def default_exchange(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    declare_queues(channel, "by-name", "other")
    publish(channel, "", "by-name", "to by-name")
    publish(channel, "", "other", "to other")
    expect_bodies(channel, "by-name", ["to by-name"])
    expect_bodies(channel, "other", ["to other"])
    # A name that is no queue: unroutable, so a mandatory publish is returned.
    expect_returned(
        lambda: publish(channel, "", "no-such-queue", "lost", mandatory=True),
        "a mandatory publish to the default exchange with no such queue",
    )
    # The default exchange exists (passive) and cannot be bound to.
    channel.exchange_declare("", passive=True)
    expect_channel_error(
        connection,
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
        lambda c: c.queue_bind("by-name", "", routing_key="x"),
    )
    connection.close()


def predeclared_exchanges(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    for name in ["amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"]:
        channel.exchange_declare(name, passive=True)
    # An equivalent redeclare of a predeclared exchange is allowed (they are durable).
    channel.exchange_declare("amq.direct", exchange_type="direct", durable=True)
    declare_queues(channel, "via-direct", "via-fanout", "via-topic", "via-headers", "via-match")
    channel.queue_bind("via-direct", "amq.direct", routing_key="k")
    channel.queue_bind("via-fanout", "amq.fanout")
    channel.queue_bind("via-topic", "amq.topic", routing_key="a.*")
    channel.queue_bind("via-headers", "amq.headers", arguments={"x-match": "all", "h": "v"})
    channel.queue_bind("via-match", "amq.match", arguments={"x-match": "any", "h": "v", "g": "w"})
    publish(channel, "amq.direct", "k", "direct k")
    publish(channel, "amq.direct", "j", "direct j")
    publish(channel, "amq.fanout", "anything", "fanout")
    publish(channel, "amq.topic", "a.b", "topic a.b")
    publish(channel, "amq.topic", "a.b.c", "topic a.b.c")
    publish(channel, "amq.headers", "", "headers h=v", headers={"h": "v"})
    publish(channel, "amq.headers", "", "headers h=x", headers={"h": "x"})
    publish(channel, "amq.match", "", "match g=w", headers={"g": "w"})
    publish(channel, "amq.match", "", "match g=x", headers={"g": "x"})
    expect_bodies(channel, "via-direct", ["direct k"])
    expect_bodies(channel, "via-fanout", ["fanout"])
    expect_bodies(channel, "via-topic", ["topic a.b"])
    expect_bodies(channel, "via-headers", ["headers h=v"])
    expect_bodies(channel, "via-match", ["match g=w"])
    connection.close()


def reserved_exchange_name(args):
    connection = connect(args)
    expect_channel_error(
        connection,
        403,
        "ACCESS_REFUSED - exchange name 'amq.anything' contains reserved prefix 'amq.*'",
        lambda c: c.exchange_declare("amq.anything", exchange_type="direct"),
    )
    expect(not exchange_exists(connection, "amq.anything"), "the refused exchange amq.anything exists")
    connection.close()


def exchange_passive_missing(args):
    connection = connect(args)
    expect_channel_error(
        connection,
        404,
        "NOT_FOUND - no exchange 'missing' in vhost '/'",
        lambda c: c.exchange_declare("missing", passive=True),
    )
    # The positive control: a passive declare of an exchange that exists succeeds.
    channel = connection.channel()
    channel.exchange_declare("present", exchange_type="fanout")
    channel.exchange_declare("present", passive=True)
    connection.close()


def exchange_inequivalent(args):
    connection = connect(args)
    channel = connection.channel()
    channel.exchange_declare("x", exchange_type="direct", durable=False)
    # The same declaration again is fine.
    channel.exchange_declare("x", exchange_type="direct", durable=False)
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': "
        "received 'fanout' but current is 'direct'",
        lambda c: c.exchange_declare("x", exchange_type="fanout", durable=False),
    )
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'x' in vhost '/': "
        "received 'true' but current is 'false'",
        lambda c: c.exchange_declare("x", exchange_type="direct", durable=True),
    )
    connection.close()


def exchange_to_exchange(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("src", exchange_type="direct")
    channel.exchange_declare("dst", exchange_type="fanout")
    channel.queue_declare(queue="e2e")
    channel.queue_bind("e2e", "dst")
    channel.exchange_bind(destination="dst", source="src", routing_key="k")
    publish(channel, "src", "other", "src other")
    publish(channel, "src", "k", "src k")
    expect_bodies(channel, "e2e", ["src k"])
    channel.exchange_unbind(destination="dst", source="src", routing_key="k")
    publish(channel, "src", "k", "src k after unbind")
    # The positive control: the destination exchange itself still routes to the queue.
    publish(channel, "dst", "", "dst directly")
    expect_bodies(channel, "e2e", ["dst directly"])
    connection.close()


def alternate_exchange(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("ae", exchange_type="fanout")
    channel.exchange_declare("main", exchange_type="direct", arguments={"alternate-exchange": "ae"})
    declare_queues(channel, "routed", "unrouted")
    channel.queue_bind("routed", "main", routing_key="k")
    channel.queue_bind("unrouted", "ae")
    publish(channel, "main", "k", "routable", mandatory=True)
    # Taken by the alternate exchange: routed, so a mandatory publish is not returned.
    publish(channel, "main", "nowhere", "unroutable", mandatory=True)
    expect_bodies(channel, "routed", ["routable"])
    expect_bodies(channel, "unrouted", ["unroutable"])
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'main' in vhost '/': "
        "received the value 'other' of type 'longstr' but current is the value 'ae' of type 'longstr'",
        lambda c: c.exchange_declare("main", exchange_type="direct", arguments={"alternate-exchange": "other"}),
    )
    connection.close()


def internal_exchange(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("inner", exchange_type="fanout", internal=True)
    channel.exchange_declare("front", exchange_type="direct")
    channel.queue_declare(queue="behind-inner")
    channel.queue_bind("behind-inner", "inner")
    expect_channel_error(
        connection,
        403,
        "ACCESS_REFUSED - cannot publish to internal exchange 'inner' in vhost '/'",
        lambda c: c.basic_publish(exchange="inner", routing_key="", body=b"direct to inner"),
    )
    channel.exchange_bind(destination="inner", source="front", routing_key="in")
    publish(channel, "front", "in", "via front")
    expect_bodies(channel, "behind-inner", ["via front"])
    connection.close()


def auto_delete_exchange(args):
    connection = connect(args)
    channel = connection.channel()
    channel.exchange_declare("ad", exchange_type="fanout", auto_delete=True)
    declare_queues(channel, "ad1", "ad2", "ad3")
    # Never bound yet: an auto-delete exchange stays until a binding has come and gone.
    time.sleep(SETTLE_SECS)
    expect(exchange_exists(connection, "ad"), "an auto-delete exchange vanished before it was ever bound")
    channel.queue_bind("ad1", "ad")
    channel.queue_bind("ad2", "ad")
    channel.queue_unbind("ad1", "ad")
    time.sleep(SETTLE_SECS)
    expect(exchange_exists(connection, "ad"), "the auto-delete exchange went away while a binding was left")
    channel.queue_unbind("ad2", "ad")
    wait_until_gone(connection, "auto-delete exchange", exchange_exists, "ad")
    # Deleting the bound queue removes the last binding too.
    channel.exchange_declare("ad-by-queue", exchange_type="fanout", auto_delete=True)
    channel.queue_bind("ad3", "ad-by-queue")
    channel.queue_delete("ad3")
    wait_until_gone(connection, "auto-delete exchange", exchange_exists, "ad-by-queue")
    connection.close()


def exchange_delete(args):
    connection = connect(args)
    channel = connection.channel()
    channel.exchange_declare("bound", exchange_type="direct")
    channel.queue_declare(queue="on-bound")
    channel.queue_bind("on-bound", "bound", routing_key="k")
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - exchange 'bound' in vhost '/' in use",
        lambda c: c.exchange_delete("bound", if_unused=True),
    )
    expect(exchange_exists(connection, "bound"), "exchange 'bound' was deleted although if-unused was refused")
    channel.queue_unbind("on-bound", "bound", routing_key="k")
    channel.exchange_delete("bound", if_unused=True)
    expect(not exchange_exists(connection, "bound"), "exchange 'bound' still exists after its delete-ok")
    # Deleting an exchange that does not exist succeeds, as in RabbitMQ 3.x.
    channel.exchange_delete("never-declared")
    channel.exchange_delete("never-declared", if_unused=True)
    expect_usable(connection)
    connection.close()


# ----- queues ----------------------------------------------------------------------------------------


def queue_durable_before_restart(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="kept", durable=True)
    channel.queue_declare(queue="transient", durable=False)
    channel.exchange_declare("kept-x", exchange_type="fanout", durable=True)
    channel.exchange_declare("transient-x", exchange_type="fanout", durable=False)
    channel.queue_bind("kept", "kept-x")
    publish(channel, "", "kept", "persistent", delivery_mode=2)
    publish(channel, "", "transient", "in a transient queue", delivery_mode=2)
    expect(queue_exists(connection, "transient"), "the transient queue was not declared")
    connection.close()


def queue_durable_after_restart(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    declared = channel.queue_declare(queue="kept", passive=True).method
    expect(declared.message_count == 1, f"durable queue 'kept' holds {declared.message_count} messages, expected 1")
    expect(not queue_exists(connection, "transient"), "the non-durable queue 'transient' survived the restart")
    expect(exchange_exists(connection, "kept-x"), "the durable exchange 'kept-x' did not survive the restart")
    expect(not exchange_exists(connection, "transient-x"), "the non-durable exchange 'transient-x' survived")
    # The binding of the durable queue to the durable exchange survived too.
    publish(channel, "kept-x", "", "after restart")
    expect_bodies(channel, "kept", ["persistent", "after restart"])
    connection.close()


def queue_passive(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    declared = channel.queue_declare(queue="counted").method
    expect((declared.queue, declared.message_count, declared.consumer_count) == ("counted", 0, 0), f"{declared}")
    for n in range(3):
        publish(channel, "", "counted", f"m{n}")
    declared = channel.queue_declare(queue="counted", passive=True).method
    expect(
        (declared.queue, declared.message_count, declared.consumer_count) == ("counted", 3, 0),
        f"passive declare of 'counted' with 3 messages and no consumer answered {declared}",
    )
    # A consumer holding one unacknowledged message: RabbitMQ counts ready messages only.
    consumer = connection.channel()
    consumer.basic_qos(prefetch_count=1)
    received = []
    consumer.basic_consume("counted", lambda ch, method, props, body: received.append(body))
    pump(connection, lambda: len(received) == 1, "the first delivery")
    declared = channel.queue_declare(queue="counted", passive=True).method
    expect(
        (declared.message_count, declared.consumer_count) == (2, 1),
        f"passive declare with 1 unacked of 3 and one consumer answered {declared}",
    )
    expect_channel_error(
        connection,
        404,
        "NOT_FOUND - no queue 'missing' in vhost '/'",
        lambda c: c.queue_declare(queue="missing", passive=True),
    )
    expect(not queue_exists(connection, "missing"), "a passive declare created the queue 'missing'")
    connection.close()


def queue_server_named(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    first = channel.queue_declare(queue="", exclusive=True).method.queue
    second = channel.queue_declare(queue="", exclusive=True).method.queue
    for name in (first, second):
        expect(name.startswith("amq.gen-") and len(name) > len("amq.gen-"), f"server-named queue {name!r}")
    expect(first != second, f"two server-named queues share the name {first!r}")
    publish(channel, "", first, "to the generated name")
    expect_bodies(channel, first, ["to the generated name"])
    # Clients may not pick names in the reserved namespace themselves.
    expect_channel_error(
        connection,
        403,
        "ACCESS_REFUSED - queue name 'amq.mine' contains reserved prefix 'amq.*'",
        lambda c: c.queue_declare(queue="amq.mine"),
    )
    connection.close()


def queue_inequivalent(args):
    connection = connect(args)
    channel = connection.channel()
    channel.queue_declare(queue="q", durable=True, arguments={"x-max-length": 10})
    # The same declaration again is fine, also with the integer in another width.
    channel.queue_declare(queue="q", durable=True, arguments={"x-max-length": 10})
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': "
        "received 'false' but current is 'true'",
        lambda c: c.queue_declare(queue="q", durable=False, arguments={"x-max-length": 10}),
    )
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue 'q' in vhost '/': "
        "received 'true' but current is 'false'",
        lambda c: c.queue_declare(queue="q", durable=True, auto_delete=True, arguments={"x-max-length": 10}),
    )
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': "
        "received the value '20' of type 'signedint' but current is the value '10' of type 'signedint'",
        lambda c: c.queue_declare(queue="q", durable=True, arguments={"x-max-length": 20}),
    )
    # A missing argument: only the name is checked here (see queue-inequivalent-added-argument).
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received none",
        lambda c: c.queue_declare(queue="q", durable=True),
        prefix=True,
    )
    connection.close()


def queue_inequivalent_added_argument(args):
    # RabbitMQ's rabbit_misc:equivalence_fail renders a value it has with its type, and an absent one
    # as `none`: "received the value '10' of type 'signedint' but current is none".
    connection = connect(args)
    channel = connection.channel()
    channel.queue_declare(queue="plain")
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'plain' in vhost '/': "
        "received the value '10' of type 'signedint' but current is none",
        lambda c: c.queue_declare(queue="plain", arguments={"x-max-length": 10}),
    )
    connection.close()


LOCKED = (
    "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'mine' in vhost '/'. It could be "
    "originally declared on another connection or the exclusive property value does not match that of "
    "the original declaration."
)


def queue_exclusive(args):
    owner = connect(args)
    other = connect(args)
    channel = confirmed_channel(owner)
    channel.queue_declare(queue="mine", exclusive=True)
    publish(channel, "", "mine", "for the owner")
    expect_bodies(channel, "mine", ["for the owner"])
    attempts = {
        "declare": lambda c: c.queue_declare(queue="mine", exclusive=True),
        "passive declare": lambda c: c.queue_declare(queue="mine", passive=True),
        "consume": lambda c: c.basic_consume("mine", lambda *_: None),
        "get": lambda c: c.basic_get("mine"),
        "purge": lambda c: c.queue_purge("mine"),
        "bind": lambda c: c.queue_bind("mine", "amq.fanout"),
        "delete": lambda c: c.queue_delete("mine"),
    }
    for what, attempt in attempts.items():
        try:
            expect_channel_error(other, 405, LOCKED, attempt)
        except Mismatch as mismatch:
            raise Mismatch(f"{what} of another connection's exclusive queue: {mismatch}") from None
    # Still there for its owner, then deleted when the owner's connection closes.
    channel.queue_declare(queue="mine", passive=True)
    owner.close()
    wait_until_gone(other, "exclusive queue of a closed connection", queue_exists, "mine")
    other.close()


def queue_auto_delete(args):
    connection = connect(args)
    channel = connection.channel()
    channel.queue_declare(queue="ad", auto_delete=True)
    # Never consumed from: it stays.
    time.sleep(SETTLE_SECS)
    expect(queue_exists(connection, "ad"), "an auto-delete queue vanished before it ever had a consumer")
    first = connection.channel()
    second = connection.channel()
    first_tag = first.basic_consume("ad", lambda *_: None)
    second_tag = second.basic_consume("ad", lambda *_: None)
    first.basic_cancel(first_tag)
    time.sleep(SETTLE_SECS)
    expect(queue_exists(connection, "ad"), "the auto-delete queue went away while a consumer was left")
    count = channel.queue_declare(queue="ad", passive=True).method.consumer_count
    expect(count == 1, f"auto-delete queue with one consumer left reports {count} consumers")
    second.basic_cancel(second_tag)
    wait_until_gone(connection, "auto-delete queue", queue_exists, "ad")
    connection.close()


def queue_purge(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="purged")
    for n in range(3):
        publish(channel, "", "purged", f"m{n}")
    purged = channel.queue_purge("purged").method.message_count
    expect(purged == 3, f"purge of 3 messages answered message_count {purged}")
    count = channel.queue_declare(queue="purged", passive=True).method.message_count
    expect(count == 0, f"{count} messages left after the purge")
    publish(channel, "", "purged", "after the purge")
    expect_bodies(channel, "purged", ["after the purge"])
    purged = channel.queue_purge("purged").method.message_count
    expect(purged == 0, f"purge of an empty queue answered message_count {purged}")
    connection.close()


def queue_delete(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="busy")
    consumer = connection.channel()
    consumer.basic_consume("busy", lambda *_: None)
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - queue 'busy' in vhost '/' in use",
        lambda c: c.queue_delete("busy", if_unused=True),
    )
    expect(queue_exists(connection, "busy"), "queue 'busy' was deleted although if-unused was refused")
    channel.queue_declare(queue="full")
    publish(channel, "", "full", "one")
    publish(channel, "", "full", "two")
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - queue 'full' in vhost '/' not empty",
        lambda c: c.queue_delete("full", if_empty=True),
    )
    expect(queue_exists(connection, "full"), "queue 'full' was deleted although if-empty was refused")
    deleted = channel.queue_delete("full").method.message_count
    expect(deleted == 2, f"delete of a queue with 2 messages answered message_count {deleted}")
    expect(not queue_exists(connection, "full"), "queue 'full' still exists after its delete-ok")
    # Both conditions hold for an unused, empty queue.
    channel.queue_declare(queue="idle")
    deleted = channel.queue_delete("idle", if_unused=True, if_empty=True).method.message_count
    expect(deleted == 0, f"delete of an empty queue answered message_count {deleted}")
    expect(not queue_exists(connection, "idle"), "queue 'idle' still exists after its delete-ok")
    # Deleting a queue that does not exist succeeds, as in RabbitMQ 3.x.
    deleted = channel.queue_delete("never-declared").method.message_count
    expect(deleted == 0, f"delete of a missing queue answered message_count {deleted}")
    connection.close()


def queue_bind_unbind(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("routes", exchange_type="direct")
    channel.queue_declare(queue="keys")
    channel.queue_bind("keys", "routes", routing_key="a")
    channel.queue_bind("keys", "routes", routing_key="b")
    # Binding twice is idempotent: still one delivery per message.
    channel.queue_bind("keys", "routes", routing_key="b")
    for key in ["a", "b", "c"]:
        publish(channel, "routes", key, f"{key} before")
    expect_bodies(channel, "keys", ["a before", "b before"])
    channel.queue_unbind("keys", "routes", routing_key="a")
    for key in ["a", "b"]:
        publish(channel, "routes", key, f"{key} after")
    expect_bodies(channel, "keys", ["b after"])

    channel.exchange_declare("by-headers", exchange_type="headers")
    channel.queue_declare(queue="headed")
    red = {"x-match": "all", "color": "red"}
    big = {"x-match": "any", "size": "big", "shape": "round"}
    channel.queue_bind("headed", "by-headers", arguments=red)
    channel.queue_bind("headed", "by-headers", arguments=big)
    publish(channel, "by-headers", "", "red", headers={"color": "red"})
    publish(channel, "by-headers", "", "round", headers={"shape": "round"})
    publish(channel, "by-headers", "", "red and big", headers={"color": "red", "size": "big"})
    publish(channel, "by-headers", "", "blue", headers={"color": "blue"})
    # A message matching two bindings reaches the queue once.
    expect_bodies(channel, "headed", ["red", "round", "red and big"])
    # Unbinding names the binding by its arguments: only the red one goes.
    channel.queue_unbind("headed", "by-headers", arguments=red)
    publish(channel, "by-headers", "", "red again", headers={"color": "red"})
    publish(channel, "by-headers", "", "big again", headers={"size": "big"})
    expect_bodies(channel, "headed", ["big again"])
    connection.close()


# ----- queue arguments -------------------------------------------------------------------------------


def message_ttl(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    # Long enough that a busy machine still gets the positive control in time.
    channel.queue_declare(queue="ttl", arguments={"x-message-ttl": 1000})
    # The positive control: within the TTL the message is there.
    publish(channel, "", "ttl", "fresh")
    expect_bodies(channel, "ttl", ["fresh"])
    publish(channel, "", "ttl", "stale")
    time.sleep(2.0)
    expect_empty(channel, "ttl", "the message to have expired after 1 s")
    count = channel.queue_declare(queue="ttl", passive=True).method.message_count
    expect(count == 0, f"passive declare counts {count} messages after they expired")
    connection.close()


def per_message_ttl(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="mixed")
    publish(channel, "", "mixed", "expires", expiration="300")
    publish(channel, "", "mixed", "stays")
    publish(channel, "", "mixed", "expires too", expiration="300")
    publish(channel, "", "mixed", "long-lived", expiration="60000")
    time.sleep(1.0)
    got = take(channel, "mixed", 2)
    expect([body for _, _, body in got] == [b"stays", b"long-lived"], f"got {[body for _, _, body in got]}")
    # The expiration property is delivered as it was published.
    expect(got[1][1].expiration == "60000", f"expiration delivered as {got[1][1].expiration!r}")
    expect_empty(channel, "mixed", "the messages with a 300 ms expiration to have expired")
    # The shorter of queue TTL and expiration applies.
    channel.queue_declare(queue="short-ttl", arguments={"x-message-ttl": 300})
    publish(channel, "", "short-ttl", "message asks for a minute", expiration="60000")
    time.sleep(1.0)
    expect_empty(channel, "short-ttl", "the queue's 300 ms TTL to win over the message's 60 s")
    connection.close()


def queue_expires(args):
    connection = connect(args)
    channel = connection.channel()
    channel.queue_declare(queue="fleeting", arguments={"x-expires": 1000})
    channel.queue_declare(queue="staying")
    expect(queue_exists(connection, "fleeting"), "the x-expires queue is gone right after its declare")
    # Left alone past its expiry (a passive declare may count as use, so none until then).
    time.sleep(1.5)
    wait_until_gone(connection, "unused queue with x-expires", queue_exists, "fleeting")
    expect(queue_exists(connection, "staying"), "the queue without x-expires went away too")
    connection.close()


def max_length_drop_head(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="capped", arguments={"x-max-length": 2})
    for body in ["one", "two", "three", "four"]:
        publish(channel, "", "capped", body)
    count = channel.queue_declare(queue="capped", passive=True).method.message_count
    expect(count == 2, f"x-max-length 2 queue holds {count} messages")
    expect_bodies(channel, "capped", ["three", "four"])
    # x-overflow drop-head given explicitly behaves the same.
    channel.queue_declare(queue="capped-explicit", arguments={"x-max-length": 1, "x-overflow": "drop-head"})
    for body in ["old", "new"]:
        publish(channel, "", "capped-explicit", body)
    expect_bodies(channel, "capped-explicit", ["new"])
    connection.close()


def max_length_reject_publish(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="full", arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    publish(channel, "", "full", "one")
    publish(channel, "", "full", "two")
    expect_nacked(lambda: publish(channel, "", "full", "three"), "a publish to a full reject-publish queue")
    _, _, body = take(channel, "full", 1)[0]
    expect(body == b"one", f"the oldest message is {body!r}, expected b'one' (reject-publish keeps the head)")
    # Room again: the next publish is accepted.
    publish(channel, "", "full", "four")
    expect_bodies(channel, "full", ["two", "four"])
    connection.close()


def max_length_reject_publish_dlx(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    dead_letter_queue(channel)
    arguments = {"x-max-length": 1, "x-overflow": "reject-publish-dlx", "x-dead-letter-exchange": "dlx"}
    channel.queue_declare(queue="full-dlx", arguments=arguments)
    started = time.time()
    publish(channel, "", "full-dlx", "kept")
    expect_nacked(lambda: publish(channel, "", "full-dlx", "refused"), "a publish to a full reject-publish-dlx queue")
    expect_bodies(channel, "full-dlx", ["kept"])
    _, properties, body = take(channel, "dead", 1)[0]
    expect(body == b"refused", f"dead-lettered {body!r}, expected the refused publish")
    check_x_death(properties, [("maxlen", "full-dlx", "", ["full-dlx"], 1)], started)
    expect_empty(channel, "dead")
    connection.close()


def max_length_bytes(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="bytes", arguments={"x-max-length-bytes": 10})
    # Bodies count, not properties: 4 + 4 fit in 10 bytes, the third pushes the first out.
    for body in ["aaaa", "bbbb", "cccc"]:
        publish(channel, "", "bytes", body, headers={"padding": "x" * 100})
    count = channel.queue_declare(queue="bytes", passive=True).method.message_count
    expect(count == 2, f"x-max-length-bytes 10 queue holds {count} messages of 4 bytes")
    expect_bodies(channel, "bytes", ["bbbb", "cccc"])
    connection.close()


# ----- dead-lettering --------------------------------------------------------------------------------


def dead_letter_queue(channel, exchange="dlx", routing_key=None, queue="dead"):
    """A direct dead-letter exchange with `queue` bound to it under `routing_key` (or, without one,
    a fanout exchange taking every key)."""
    channel.exchange_declare(exchange, exchange_type="direct" if routing_key else "fanout")
    channel.queue_declare(queue=queue)
    channel.queue_bind(queue, exchange, routing_key=routing_key or "")


def check_x_death(properties, expected, started):
    """The x-death header is `expected`, newest first, each entry (reason, queue, exchange,
    routing-keys, count) with a `time` between `started` and now, and exactly RabbitMQ's fields."""
    headers = properties.headers or {}
    deaths = headers.get("x-death")
    expect(isinstance(deaths, list), f"x-death is {deaths!r}, expected an array (headers {headers})")
    expect(len(deaths) == len(expected), f"x-death has {len(deaths)} entries, expected {len(expected)}: {deaths}")
    for death, (reason, queue, exchange, routing_keys, count) in zip(deaths, expected):
        fields = {"count", "reason", "queue", "time", "exchange", "routing-keys"}
        extra = {"original-expiration"} if "original-expiration" in death else set()
        expect(set(death) == fields | extra, f"x-death entry fields {sorted(death)}, expected {sorted(fields)}")
        got = (death["reason"], death["queue"], death["exchange"], death["routing-keys"], death["count"])
        expect(
            got == (reason, queue, exchange, routing_keys, count),
            f"x-death entry (reason, queue, exchange, routing-keys, count) is {got}, "
            f"expected {(reason, queue, exchange, routing_keys, count)}",
        )
        # RabbitMQ writes the count as a long ('l'), which pika decodes to its `long` marker type.
        expect(isinstance(death["count"], pika.compat.long), f"x-death count {death['count']!r} is not a long")
        stamp = death["time"]
        expect(isinstance(stamp, datetime), f"x-death time is {stamp!r}, expected an AMQP timestamp")
        seconds = calendar.timegm(stamp.replace(tzinfo=timezone.utc).utctimetuple())
        expect(
            int(started) - 1 <= seconds <= time.time() + 1,
            f"x-death time {stamp} is not between the scenario's start and now",
        )
    first = expected[-1]
    for prefix, (reason, queue, exchange) in [("x-first-death", first[:3]), ("x-last-death", expected[0][:3])]:
        got = tuple(headers.get(f"{prefix}-{field}") for field in ["reason", "queue", "exchange"])
        expect(got == (reason, queue, exchange), f"{prefix}-reason/queue/exchange are {got}")


def dead_letter_rejected(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    dead_letter_queue(channel, routing_key="dead-key")
    # `work` dead-letters into the retry queue `wait` through the default exchange; `wait` expires
    # messages back into `work`: the classic retry loop, which lets a message die twice in `work`.
    work_args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "wait"}
    wait_args = {"x-message-ttl": 100, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "work"}
    channel.queue_declare(queue="work", arguments=work_args)
    channel.queue_declare(queue="wait", arguments=wait_args)
    final_args = {"x-dead-letter-exchange": "dlx", "x-dead-letter-routing-key": "dead-key"}
    channel.queue_declare(queue="final", arguments=final_args)
    started = time.time()

    # One rejection straight to the dead-letter exchange, its routing key replaced.
    publish(channel, "", "final", "rejected once", headers={"app": "kept"})
    method, _, _ = take_unacked(channel, "final")
    channel.basic_reject(method.delivery_tag, requeue=False)
    method, properties, body = take(channel, "dead", 1)[0]
    expect(body == b"rejected once", f"dead-lettered {body!r}")
    expect(
        (method.exchange, method.routing_key) == ("dlx", "dead-key"),
        f"dead-lettered through {(method.exchange, method.routing_key)}, expected ('dlx', 'dead-key')",
    )
    expect(properties.headers.get("app") == "kept", f"the message's own headers were lost: {properties.headers}")
    check_x_death(properties, [("rejected", "final", "", ["final"], 1)], started)
    expect_empty(channel, "final", "the rejected message to have left the queue")

    # Twice around the retry loop: the (queue, reason) entry counts up and moves to the front.
    publish(channel, "", "work", "retried")
    method, _, _ = take_unacked(channel, "work")
    channel.basic_reject(method.delivery_tag, requeue=False)
    method, properties, _ = take_unacked(channel, "work")
    expect(method.routing_key == "work", f"came back from the retry queue with routing key {method.routing_key!r}")
    check_x_death(properties, [("expired", "wait", "", ["wait"], 1), ("rejected", "work", "", ["work"], 1)], started)
    channel.basic_nack(method.delivery_tag, requeue=False)
    method, properties, _ = take_unacked(channel, "work")
    check_x_death(properties, [("expired", "wait", "", ["wait"], 2), ("rejected", "work", "", ["work"], 2)], started)
    channel.basic_ack(method.delivery_tag)
    connection.close()


def dead_letter_expired(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    dead_letter_queue(channel)
    channel.queue_declare(queue="short", arguments={"x-message-ttl": 200, "x-dead-letter-exchange": "dlx"})
    channel.queue_declare(queue="plain", arguments={"x-dead-letter-exchange": "dlx"})
    started = time.time()
    publish(channel, "", "short", "queue ttl")
    _, properties, body = take(channel, "dead", 1)[0]
    expect(body == b"queue ttl", f"dead-lettered {body!r}")
    check_x_death(properties, [("expired", "short", "", ["short"], 1)], started)
    # A per-message expiration: kept as original-expiration, and the property itself is removed.
    publish(channel, "", "plain", "message ttl", expiration="200")
    method, properties, body = take(channel, "dead", 1)[0]
    expect(body == b"message ttl", f"dead-lettered {body!r}")
    # Without x-dead-letter-routing-key the original routing key is kept.
    expect(method.routing_key == "plain", f"dead-lettered with routing key {method.routing_key!r}")
    check_x_death(properties, [("expired", "plain", "", ["plain"], 1)], started)
    death = properties.headers["x-death"][0]
    expect(death.get("original-expiration") == "200", f"original-expiration is {death.get('original-expiration')!r}")
    expect(properties.expiration is None, f"the dead-lettered message still has expiration {properties.expiration!r}")
    expect_empty(channel, "dead")
    connection.close()


def dead_letter_maxlen(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    dead_letter_queue(channel)
    channel.exchange_declare("entry", exchange_type="direct")
    channel.queue_declare(queue="tiny", arguments={"x-max-length": 1, "x-dead-letter-exchange": "dlx"})
    channel.queue_bind("tiny", "entry", routing_key="in")
    started = time.time()
    publish(channel, "entry", "in", "oldest")
    publish(channel, "entry", "in", "newest")
    _, properties, body = take(channel, "dead", 1)[0]
    expect(body == b"oldest", f"dead-lettered {body!r}, expected the oldest (drop-head)")
    check_x_death(properties, [("maxlen", "tiny", "entry", ["in"], 1)], started)
    expect_bodies(channel, "tiny", ["newest"])
    expect_empty(channel, "dead")
    connection.close()


def delivery_limit(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    dead_letter_queue(channel)
    arguments = {"x-queue-type": "quorum", "x-delivery-limit": 2, "x-dead-letter-exchange": "dlx"}
    channel.queue_declare(queue="limited", durable=True, arguments=arguments)
    started = time.time()
    publish(channel, "", "limited", "poison")
    # Returned twice: still delivered; returned a third time (more than the limit): dead-lettered.
    for attempt in range(3):
        method, _, body = take_unacked(channel, "limited")
        expect(body == b"poison", f"delivery {attempt + 1} is {body!r}")
        expect(method.redelivered == (attempt > 0), f"delivery {attempt + 1} has redelivered={method.redelivered}")
        channel.basic_reject(method.delivery_tag, requeue=True)
    _, properties, body = take(channel, "dead", 1)[0]
    expect(body == b"poison", f"dead-lettered {body!r}")
    check_x_death(properties, [("delivery_limit", "limited", "", ["limited"], 1)], started)
    expect_empty(channel, "limited", "the message to have left after its third return")
    connection.close()


# ----- priorities, single active consumer, queue types, argument errors -----------------------------


def max_priority(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="prio", arguments={"x-max-priority": 5})
    # Above the maximum counts as the maximum, so "at max" and "above max" stay in publish order;
    # no priority counts as 0.
    for body, priority in [("low", 1), ("none", None), ("mid", 3), ("at max", 5), ("above max", 200), ("zero", 0)]:
        publish(channel, "", "prio", body, priority=priority)
    expect_bodies(channel, "prio", ["at max", "above max", "mid", "low", "none", "zero"])
    # Consumers see the same order.
    for body, priority in [("c-low", 1), ("c-high", 4)]:
        publish(channel, "", "prio", body, priority=priority)
    received = []
    channel.basic_consume("prio", lambda ch, method, props, body: received.append(body.decode()), auto_ack=True)
    pump(connection, lambda: len(received) == 2, "delivery of two messages")
    expect(received == ["c-high", "c-low"], f"consumer received {received}")
    connection.close()


def single_active_consumer(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="sac", arguments={"x-single-active-consumer": True})
    received = []
    first = connection.channel()
    second = connection.channel()

    def on_message(name):
        return lambda ch, method, props, body: received.append((name, body.decode()))

    first_tag = first.basic_consume("sac", on_message("first"), auto_ack=True)
    second.basic_consume("sac", on_message("second"), auto_ack=True)
    count = channel.queue_declare(queue="sac", passive=True).method.consumer_count
    expect(count == 2, f"the queue reports {count} consumers, expected 2")
    for n in range(4):
        publish(channel, "", "sac", f"m{n}")
    pump(connection, lambda: len(received) >= 4, "delivery of 4 messages")
    settle(connection)
    expected = [("first", f"m{n}") for n in range(4)]
    expect(received == expected, f"with two consumers, received {received}, expected all by the first")
    received.clear()
    first.basic_cancel(first_tag)
    for n in range(4, 7):
        publish(channel, "", "sac", f"m{n}")
    pump(connection, lambda: len(received) >= 3, "delivery after the active consumer cancelled")
    settle(connection)
    expected = [("second", f"m{n}") for n in range(4, 7)]
    expect(received == expected, f"after the first consumer cancelled, received {received}")
    connection.close()


def queue_types(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="classic-q", durable=True, arguments={"x-queue-type": "classic"})
    channel.queue_declare(queue="quorum-q", durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_declare(queue="quorum-q", durable=True, arguments={"x-queue-type": "quorum"})
    for queue in ["classic-q", "quorum-q"]:
        publish(channel, "", queue, f"to {queue}")
        expect_bodies(channel, queue, [f"to {queue}"])
    # Wharf refuses the types it does not provide (streams) rather than faking them.
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue 'stream-q' in vhost '/': "
        "unsupported queue type 'stream'",
        lambda c: c.queue_declare(queue="stream-q", durable=True, arguments={"x-queue-type": "stream"}),
    )
    expect(not queue_exists(connection, "stream-q"), "the refused stream queue exists")
    connection.close()


def invalid_argument(name, reason, queue="bad"):
    return f"PRECONDITION_FAILED - invalid arg '{name}' for queue '{queue}' in vhost '/': {reason}"


def invalid_arguments(args):
    connection = connect(args)
    cases = [
        ({"x-max-length": -1}, invalid_argument("x-max-length", "{value_negative,-1}")),
        ({"x-max-length-bytes": -5}, invalid_argument("x-max-length-bytes", "{value_negative,-5}")),
        ({"x-message-ttl": -1}, invalid_argument("x-message-ttl", "{value_negative,-1}")),
        ({"x-expires": 0}, invalid_argument("x-expires", "{value_zero,0}")),
        ({"x-max-priority": 256}, invalid_argument("x-max-priority", "{max_value_exceeded,256}")),
        ({"x-max-priority": -1}, invalid_argument("x-max-priority", "{value_negative,-1}")),
        (
            {"x-dead-letter-routing-key": "k"},
            invalid_argument("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined"),
        ),
        (
            {"x-single-active-consumer": 1},
            invalid_argument("x-single-active-consumer", "{unacceptable_type,signedint}"),
        ),
        ({"x-dead-letter-exchange": 7}, invalid_argument("x-dead-letter-exchange", "{unacceptable_type,signedint}")),
        ({"x-overflow": 1}, invalid_argument("x-overflow", "{unacceptable_type,signedint}")),
    ]
    for arguments, text in cases:
        expect_channel_error(connection, 406, text, lambda c: c.queue_declare(queue="bad", arguments=arguments))
    # A string where a number belongs: RabbitMQ's reason differs between versions, the start does not.
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'bad' in vhost '/': ",
        lambda c: c.queue_declare(queue="bad", arguments={"x-message-ttl": "1000"}),
        prefix=True,
    )
    expect(not queue_exists(connection, "bad"), "a queue refused for its arguments exists")
    connection.close()


def invalid_overflow_text(args):
    # rabbit_amqqueue:check_overflow answers {error, invalid_overflow} for an unknown string.
    connection = connect(args)
    expect_channel_error(
        connection,
        406,
        invalid_argument("x-overflow", "invalid_overflow"),
        lambda c: c.queue_declare(queue="bad", arguments={"x-max-length": 1, "x-overflow": "drop-tail"}),
    )
    connection.close()


def max_priority_zero(args):
    # rabbit_amqqueue:check_max_priority_arg accepts 0..255 (check_non_neg_int_arg): 0 is a queue
    # without priorities.
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="no-prio", arguments={"x-max-priority": 0})
    publish(channel, "", "no-prio", "low", priority=1)
    publish(channel, "", "no-prio", "high", priority=9)
    expect_bodies(channel, "no-prio", ["low", "high"])
    connection.close()


def readme_delayed(args):
    # The README's delayed, idempotent publish, as written there, sent twice (a retry).
    connection = connect(args)
    channel = connection.channel()
    channel.queue_declare(queue="orders", durable=True)
    published = time.monotonic()
    for _attempt in range(2):
        channel.exchange_declare("later", exchange_type="x-delayed-message", arguments={"x-delayed-type": "direct"})
        channel.queue_bind("orders", "later", routing_key="orders")
        channel.basic_publish("later", "orders", b"remind me",
                              properties=pika.BasicProperties(headers={"x-delay": 1000, "x-idempotency-key": "reminder-42"}))
    body = take(channel, "orders", 1)[0][2]
    expect(time.monotonic() - published >= 1.0, "delivered before its delay")
    expect(body == b"remind me", f"body {body!r}")
    expect_empty(channel, "orders", "the retried publish stored once")
    connection.close()


def exclusive_consumer(args):
    # An exclusive consumer is alone on its queue for as long as it consumes, whatever the
    # connection; once it is cancelled others may consume again.
    owner = connect(args)
    channel = owner.channel()
    channel.queue_declare(queue="solo")
    tag = channel.basic_consume("solo", lambda *_: None, exclusive=True)
    other = connect(args)
    text = "ACCESS_REFUSED - queue 'solo' in vhost '/' in exclusive use"
    expect_channel_error(other, 403, text, lambda c: c.basic_consume("solo", lambda *_: None))
    expect_channel_error(owner, 403, text, lambda c: c.basic_consume("solo", lambda *_: None))
    channel.basic_cancel(tag)
    later = other.channel()
    later.basic_consume("solo", lambda *_: None)
    # And an exclusive consume is refused while another consumer is there.
    expect_channel_error(owner, 403, text, lambda c: c.basic_consume("solo", lambda *_: None, exclusive=True))
    other.close()
    owner.close()


def consumer_priority(args):
    # x-priority: the higher consumer gets messages while it has room under its prefetch; the
    # lower one only the overflow.
    connection = connect(args)
    publisher = confirmed_channel(connection)
    publisher.queue_declare(queue="ranked")
    got = {"low": [], "high": []}
    low = connection.channel()
    low.basic_consume("ranked", lambda ch, m, p, body: got["low"].append(body), auto_ack=False)
    high = connection.channel()
    high.basic_qos(prefetch_count=3)
    high.basic_consume(
        "ranked", lambda ch, m, p, body: got["high"].append(body), auto_ack=False, arguments={"x-priority": 10}
    )
    for n in range(5):
        publish(publisher, "", "ranked", f"m{n}")
    pump(connection, lambda: len(got["low"]) + len(got["high"]) >= 5, lambda: f"delivery of all 5 messages (got {got})")
    expect(got["high"] == [b"m0", b"m1", b"m2"], f"the high-priority consumer got {got['high']}")
    expect(got["low"] == [b"m3", b"m4"], f"the low-priority consumer got {got['low']}")
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - invalid arg 'x-priority' for queue 'ranked' in vhost '/': {unacceptable_type,longstr}",
        lambda c: c.basic_consume("ranked", lambda *_: None, arguments={"x-priority": "high"}),
    )
    connection.close()


def metric(args, name):
    """The value of the sample `name` (labels included) on the broker's /metrics, or 0."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{args.admin_port}/metrics", timeout=WAIT_SECS) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_metric(args, name, want):
    poll(lambda: metric(args, name) == want, lambda: f"{name} reaching {want} (it is {metric(args, name)})")


def metrics_by_vhost(args):
    # Every AMQP metric carries the vhost and follows the traffic it counts.
    connection = connect(args)
    channel = confirmed_channel(connection)
    wait_metric(args, 'wharf_amqp_connections{vhost="/"}', 1)
    wait_metric(args, 'wharf_amqp_channels{vhost="/"}', 1)
    channel.queue_declare(queue="counted")
    for n in range(3):
        publish(channel, "", "counted", f"m{n}")
    try:
        publish(channel, "", "nowhere", "returned", mandatory=True)
    except UnroutableError:
        pass
    consumer = connection.channel()
    consumer.basic_qos(prefetch_count=10)
    tag = consumer.basic_consume("counted", lambda ch, method, properties, body: ch.basic_ack(method.delivery_tag))
    wait_metric(args, 'wharf_amqp_consumers{vhost="/"}', 1)
    wait_metric(args, 'wharf_amqp_channels{vhost="/"}', 2)
    pump(connection, lambda: metric(args, 'wharf_amqp_acks_total{vhost="/"}') >= 3, "the acks of the three deliveries")
    consumer.basic_cancel(tag)
    method, _, _ = channel.basic_get("counted", auto_ack=False)
    expect(method is None, "the queue should be empty")
    for name, want in [
        ("wharf_amqp_published_total", 4),
        ("wharf_amqp_confirms_total", 4),
        ("wharf_amqp_returns_total", 1),
        ("wharf_amqp_deliveries_total", 3),
        ("wharf_amqp_acks_total", 3),
    ]:
        got = metric(args, f'{name}{{vhost="/"}}')
        expect(got == want, f"{name}: want {want}, got {got}")
    wait_metric(args, 'wharf_amqp_consumers{vhost="/"}', 0)
    consumer.close()
    wait_metric(args, 'wharf_amqp_channels{vhost="/"}', 1)
    connection.close()
    wait_metric(args, 'wharf_amqp_connections{vhost="/"}', 0)
    wait_metric(args, 'wharf_amqp_channels{vhost="/"}', 0)


def disk_alarm_blocks_publishers(args):
    # The broker runs with a disk alarm raised from the start (a free-space minimum no disk has).
    # Wharf sends connection.blocked right after connection.open-ok, before pika's
    # BlockingConnection lets a callback be added, so the proof that it came (and no unblocked
    # after it) is pika's own ConnectionBlockedTimeout. The first publish is taken; nothing after
    # it is read while the alarm lasts, so the second is not.
    connection = connect(args, blocked_connection_timeout=2)
    channel = connection.channel()
    channel.queue_declare(queue="held")
    channel.basic_publish(exchange="", routing_key="held", body=b"first")
    channel.basic_publish(exchange="", routing_key="held", body=b"second")
    deadline = time.monotonic() + WAIT_SECS
    try:
        while True:
            expect(time.monotonic() < deadline, "pika saw no connection.blocked")
            connection.process_data_events(time_limit=0.1)
    except ConnectionBlockedTimeout:
        pass
    # A connection that does not publish is still served.
    observer = connect(args)
    method = observer.channel().queue_declare(queue="held", passive=True).method
    expect(method.message_count == 1, f"{method.message_count} messages taken from the blocked publisher")
    observer.close()


SCENARIOS = {
    "readme": readme,
    "readme-delayed": readme_delayed,
    "metrics-by-vhost": metrics_by_vhost,
    "exclusive-consumer": exclusive_consumer,
    "consumer-priority": consumer_priority,
    "disk-alarm-blocks-publishers": disk_alarm_blocks_publishers,
    "from-mqtt": from_mqtt,
    # Exchanges.
    "exchange-direct": exchange_direct,
    "exchange-fanout": exchange_fanout,
    "exchange-topic": exchange_topic,
    "exchange-headers": exchange_headers,
    "default-exchange": default_exchange,
    "predeclared-exchanges": predeclared_exchanges,
    "reserved-exchange-name": reserved_exchange_name,
    "exchange-passive-missing": exchange_passive_missing,
    "exchange-inequivalent": exchange_inequivalent,
    "exchange-to-exchange": exchange_to_exchange,
    "alternate-exchange": alternate_exchange,
    "internal-exchange": internal_exchange,
    "auto-delete-exchange": auto_delete_exchange,
    "exchange-delete": exchange_delete,
    # Queues.
    "queue-durable-before-restart": queue_durable_before_restart,
    "queue-durable-after-restart": queue_durable_after_restart,
    "queue-passive": queue_passive,
    "queue-server-named": queue_server_named,
    "queue-inequivalent": queue_inequivalent,
    "queue-inequivalent-added-argument": queue_inequivalent_added_argument,
    "queue-exclusive": queue_exclusive,
    "queue-auto-delete": queue_auto_delete,
    "queue-purge": queue_purge,
    "queue-delete": queue_delete,
    "queue-bind-unbind": queue_bind_unbind,
    # Queue arguments.
    "message-ttl": message_ttl,
    "per-message-ttl": per_message_ttl,
    "queue-expires": queue_expires,
    "max-length-drop-head": max_length_drop_head,
    "max-length-reject-publish": max_length_reject_publish,
    "max-length-reject-publish-dlx": max_length_reject_publish_dlx,
    "max-length-bytes": max_length_bytes,
    "dead-letter-rejected": dead_letter_rejected,
    "dead-letter-expired": dead_letter_expired,
    "dead-letter-maxlen": dead_letter_maxlen,
    "delivery-limit": delivery_limit,
    "max-priority": max_priority,
    "single-active-consumer": single_active_consumer,
    "queue-types": queue_types,
    "invalid-arguments": invalid_arguments,
    "invalid-overflow-text": invalid_overflow_text,
    "max-priority-zero": max_priority_zero,
}


def add_arguments(parser):
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--admin-port", type=int, default=15672)


if __name__ == "__main__":
    sys.exit(run_scenarios(__doc__, SCENARIOS, SCENARIO_TIMEOUT_SECS, add_arguments))
