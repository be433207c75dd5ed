"""pika scenarios for the basic class, publisher confirms, transactions and connection
negotiation against Wharf (see conformance/amqp/pika_basic.rs, which runs one per test).

    python pika_basic_check.py <scenario> --port 5672

Each scenario exits 0 when the broker behaved as RabbitMQ documents (or as
protocols/amqp/MAPPING.md documents where Wharf deliberately differs), and exits non-zero with
a message naming what differed otherwise. Every wait is bounded: blocking calls by a watchdog
alarm, message waits by deadlines; a "does not arrive" check waits a bounded time, and only
after a positive control showed that delivery works.
"""

import datetime
import decimal
import os
import sys
import time

import pika
import pika.exceptions
import pika.spec

from pika_common import (
    USER,
    confirmed_channel,
    connect,
    expect,
    expect_channel_error,
    expect_nacked,
    expect_returned,
    expect_usable,
    fail,
    params,
    pump,
    ready_count,
    run_scenarios,
    settle,
    step,
    take,
)

# The whole scenario: past it the watchdog fails the run, naming the step it was in.
SCENARIO_TIMEOUT_SECS = 25
# How long a "does not arrive" check waits (after a positive control).
QUIET_SECS = 0.7


def eq(actual, expected, what):
    if actual != expected:
        fail(f"{what}: expected {expected!r}, got {actual!r}")


def same(actual, expected, path="value"):
    """Equal values of the same Python types, recursively (so True is not 1 and b'x' is not 'x')."""
    if isinstance(expected, int) and not isinstance(expected, bool):
        # pika decodes 64-bit integers as its `long`, a subclass of int.
        if not isinstance(actual, int) or isinstance(actual, bool):
            fail(f"{path}: expected int {expected!r}, got {type(actual).__name__} {actual!r}")
    elif type(actual) is not type(expected):
        fail(f"{path}: expected {type(expected).__name__} {expected!r}, got {type(actual).__name__} {actual!r}")
    if isinstance(expected, dict):
        eq(sorted(actual), sorted(expected), f"{path}: keys")
        for key in expected:
            same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list):
        eq(len(actual), len(expected), f"{path}: length")
        for index, (got, want) in enumerate(zip(actual, expected)):
            same(got, want, f"{path}[{index}]")
    else:
        eq(actual, expected, path)


class Collector:
    """A consumer callback recording (method, properties, body) in arrival order."""

    def __init__(self):
        self.deliveries = []

    def __call__(self, _channel, method, properties, body):
        self.deliveries.append((method, properties, body))

    def __len__(self):
        return len(self.deliveries)

    def bodies(self):
        return [body for _, _, body in self.deliveries]

    def wait(self, connection, count, what="deliveries"):
        pump(connection, lambda: len(self) >= count, lambda: f"arrival of {count} {what} (got {len(self)})")
        return self.deliveries


def publish_all(channel, queue, bodies):
    """Publish to `queue` through the default exchange (each confirmed when `channel` is in confirm mode)."""
    for body in bodies:
        channel.basic_publish("", queue, body)


def connect_with_queue(args, name, bodies=()):
    """A connection, a channel in confirm mode and the queue `name` declared on it, holding
    `bodies`: (connection, channel, queue)."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare(name).method.queue
    publish_all(channel, queue, bodies)
    return connection, channel, queue


def get_all(channel, queue, count, auto_ack=True):
    """`count` messages by basic.get, failing at once if fewer are there."""
    return take(channel, queue, count, timeout=0, auto_ack=auto_ack)


def expect_next(channel, queue, what, auto_ack=True, **expected):
    """The next message of `queue`, there now (basic.get), has the `body` and the get-ok fields
    (message_count, redelivered) in `expected`; returns it as (method, properties, body)."""
    method, properties, body = get_all(channel, queue, 1, auto_ack)[0]
    got = {name: body if name == "body" else getattr(method, name) for name in expected}
    eq(got, expected, what)
    return method, properties, body


def expect_connection_error(connection, action, code, text):
    """`action` (or the next round trip) gets connection.close `code` `text`."""
    try:
        action()
        connection.channel()
    except pika.exceptions.ConnectionClosedByBroker as error:
        eq(error.reply_code, code, "connection.close reply code")
        eq(error.reply_text, text, "connection.close reply text")
    else:
        fail(f"expected connection.close {code} {text!r}, the connection stayed open")
    expect(connection.is_closed, "the connection is not closed after connection.close")


def expect_refused_connect(args, error_type, code, text, **overrides):
    """Connecting fails with `error_type`, caused by the broker's connection.close `code` `text`
    (pika reports a close during the handshake as the repr of ConnectionClosedByBroker)."""
    try:
        connection = connect(args, **overrides)
    except error_type as error:
        expected = repr(pika.exceptions.ConnectionClosedByBroker(code, text))
        eq(error.args[0] if error.args else None, expected, f"{error_type.__name__} cause")
    except pika.exceptions.AMQPConnectionError as error:
        fail(f"expected {error_type.__name__} (connection.close {code} {text!r}), got {error!r}")
    else:
        connection.close()
        fail(f"the connection was accepted; expected connection.close {code} {text!r}")


def raw_consume(connection, channel, queue, consumer_tag, on_message):
    """basic.consume sent as is (pika itself always picks a tag, so it cannot ask the server to
    generate one); returns consume-ok's tag, under which deliveries reach `on_message`."""
    impl = channel._impl
    tags = []

    def on_consume_ok(frame):
        tag = frame.method.consumer_tag
        tags.append(tag)
        impl._consumers[tag] = on_message

    # The BlockingChannel signals every consume-ok to its own one-shot result: reset it after.
    with channel._basic_consume_ok_result:
        consume = pika.spec.Basic.Consume(queue=queue, consumer_tag=consumer_tag)
        impl._rpc(consume, on_consume_ok, [pika.spec.Basic.ConsumeOk])
        pump(connection, lambda: tags, f"basic.consume-ok for tag {consumer_tag!r}")
    return tags[0]


# ---------------------------------------------------------------------------------------------
# Publishing


def mandatory_unroutable_returned(args):
    connection = connect(args)
    step("mandatory unroutable publish without confirms: basic.return")
    channel = connection.channel()
    returned = []
    channel.add_on_return_callback(lambda _ch, method, properties, body: returned.append((method, properties, body)))
    properties = pika.BasicProperties(message_id="m-1", headers={"h": "v"})
    channel.basic_publish("amq.direct", "nowhere", b"lost", properties=properties, mandatory=True)
    pump(connection, lambda: returned, "a basic.return for a mandatory unroutable publish")
    method, properties, body = returned[0]
    eq(method.reply_code, 312, "basic.return reply code")
    eq(method.reply_text, "NO_ROUTE", "basic.return reply text")
    eq(method.exchange, "amq.direct", "basic.return exchange")
    eq(method.routing_key, "nowhere", "basic.return routing key")
    eq(body, b"lost", "returned body")
    eq(properties.message_id, "m-1", "returned message-id")
    eq(properties.headers, {"h": "v"}, "returned headers")

    step("mandatory unroutable publish with confirms: returned, then acked (pika: UnroutableError)")
    confirming = confirmed_channel(connection)
    returned_again = expect_returned(
        lambda: confirming.basic_publish("amq.direct", "nowhere", b"lost again", mandatory=True),
        "a mandatory unroutable publish in confirm mode",
    )
    eq(len(returned_again), 1, "returned messages")
    eq(returned_again[0].method.reply_code, 312, "basic.return reply code (confirm mode)")
    eq(returned_again[0].method.reply_text, "NO_ROUTE", "basic.return reply text (confirm mode)")
    eq(returned_again[0].body, b"lost again", "returned body (confirm mode)")

    step("a routable mandatory publish is delivered, not returned")
    queue = confirming.queue_declare("routed").method.queue
    confirming.queue_bind(queue, "amq.direct", "here")
    confirming.basic_publish("amq.direct", "here", b"found", mandatory=True)
    eq(get_all(confirming, queue, 1)[0][2], b"found", "routed mandatory message")
    eq(len(returned), 1, "basic.return count on the first channel")
    connection.close()


def unroutable_dropped_and_confirmed(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    returned = []
    channel.add_on_return_callback(lambda *message: returned.append(message))
    queue = channel.queue_declare("kept").method.queue
    channel.queue_bind(queue, "amq.direct", "here")
    step("publish non-mandatory to a key nothing is bound to: acked (no NackError), no return")
    channel.basic_publish("amq.direct", "nowhere", b"dropped")
    step("positive control: a routed publish arrives")
    channel.basic_publish("amq.direct", "here", b"kept")
    settle(connection, QUIET_SECS)
    eq(returned, [], "basic.return for a non-mandatory publish")
    expect(channel.is_open, "the channel was closed by a non-mandatory unroutable publish")
    # Nothing left behind it in the bound queue: the unroutable one went nowhere.
    expect_next(channel, queue, "the routed message", body=b"kept", message_count=0)
    connection.close()


def publish_to_missing_exchange_404(args):
    connection = connect(args)
    step("basic.publish to an exchange that does not exist")
    expect_channel_error(
        connection,
        404,
        "NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'",
        lambda c: c.basic_publish("no-such-exchange", "k", b"x"),
    )
    connection.close()


def publish_foreign_user_id_406(args):
    connection, channel, queue = connect_with_queue(args, "users")
    step("positive control: user_id equal to the login is accepted and kept")
    channel.basic_publish("", queue, b"mine", properties=pika.BasicProperties(user_id=USER))
    got = get_all(channel, queue, 1)
    eq(got[0][1].user_id, USER, "user_id of the accepted message")
    step("user_id of someone else")
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'",
        lambda c: c.basic_publish("", queue, b"forged", properties=pika.BasicProperties(user_id="mallory")),
        channel=channel,
    )
    other = connection.channel()
    eq(ready_count(other, queue), 0, "messages in the queue after the refused publish")
    connection.close()


def large_message_split_into_frames(args):
    frame_max = 4096
    connection = connect(args, frame_max=frame_max)
    eq(connection._impl.params.frame_max, frame_max, "negotiated frame_max")
    frame_sizes = []
    impl = connection._impl
    read_frame = impl._read_frame

    def recording_read_frame():
        consumed, frame = read_frame()
        if frame is not None:
            frame_sizes.append((consumed, type(frame).__name__))
        return consumed, frame

    impl._read_frame = recording_read_frame
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("large").method.queue
    body = os.urandom(1024 * 1024)
    step("publish 1 MiB with frame_max 4096 (pika splits it into body frames)")
    channel.basic_publish("", queue, body, properties=pika.BasicProperties(message_id="big"))
    step("consume it")
    collector = Collector()
    channel.basic_consume(queue, collector, auto_ack=True)
    method, properties, received = collector.wait(connection, 1, "1 MiB message")[0]
    eq(len(received), len(body), "length of the received body")
    expect(received == body, "the 1 MiB body arrived with different bytes")
    eq(properties.message_id, "big", "message-id of the large message")
    body_frames = [size for size, kind in frame_sizes if kind == "Body"]
    expect(len(body_frames) >= len(body) // frame_max, f"the body came in {len(body_frames)} frames")
    largest = max(size for size, _ in frame_sizes)
    expect(largest <= frame_max, f"the broker sent a {largest}-byte frame, above the negotiated frame_max {frame_max}")
    connection.close()


def empty_body(args):
    connection, channel, queue = connect_with_queue(args, "empty")
    properties = pika.BasicProperties(content_type="text/plain", headers={"empty": True})
    step("publish an empty body, then a non-empty one (the stream must stay in step)")
    channel.basic_publish("", queue, b"", properties=properties)
    channel.basic_publish("", queue, b"", properties=properties)
    channel.basic_publish("", queue, b"after")
    step("basic.get the first empty message")
    method, got_properties, body = channel.basic_get(queue, auto_ack=True)
    expect(method is not None, "the empty message is not in the queue")
    eq(body, b"", "body of the empty message (basic.get)")
    eq(got_properties.content_type, "text/plain", "content-type of the empty message")
    eq(got_properties.headers, {"empty": True}, "headers of the empty message")
    step("consume the second empty message and the one after it")
    collector = Collector()
    channel.basic_consume(queue, collector, auto_ack=True)
    collector.wait(connection, 2)
    eq(collector.bodies(), [b"", b"after"], "bodies consumed")
    eq(collector.deliveries[0][1].headers, {"empty": True}, "headers of the consumed empty message")
    connection.close()


# ---------------------------------------------------------------------------------------------
# Properties and headers

# Every type pika 1.3 can encode in a field table. pika cannot encode floats (it raises
# UnsupportedAMQPFieldException), so none are sent.
SENT_HEADERS = {
    "str": "text",
    "unicode": "žluťoučký kůň 🐎",
    "empty-str": "",
    "bytes": b"\x00\xffbinary\x80",
    "int": 42,
    "int-negative": -7,
    "int-64": 2**40,
    "int-64-negative": -(2**40),
    "true": True,
    "false": False,
    "decimal": decimal.Decimal("3.14"),
    "decimal-integral": decimal.Decimal("7"),
    "datetime": datetime.datetime(2024, 2, 29, 12, 34, 56),
    "table": {"inner": "x", "n": 1, "deeper": {"flag": True, "list": [1, "two"]}},
    "list": ["a", 1, True, None, {"k": "v"}, [2, 3], b"\x01"],
    "empty-list": [],
    "empty-table": {},
    "none": None,
}

# What comes back. pika writes a negative 64-bit integer with tag 'L' and a positive one with
# 'l'; RabbitMQ (like amq-protocol) reads both as a signed 64-bit 'l' and writes 'l', which pika
# 1.3 decodes as unsigned: the same 64 bits, seen as 2**64 - 2**40.
EXPECTED_HEADERS = dict(SENT_HEADERS)
EXPECTED_HEADERS["int-64-negative"] = -(2**40) % 2**64

SENT_PROPERTIES = dict(
    content_type="application/json",
    content_encoding="gzip",
    headers=SENT_HEADERS,
    delivery_mode=2,
    priority=7,
    correlation_id="corr-42",
    reply_to="replies",
    expiration="60000",
    message_id="msg-42",
    timestamp=1_700_000_000,
    type="order.created",
    user_id=USER,
    app_id="pika-basic-check",
)


def check_properties(properties, how):
    for name, sent in SENT_PROPERTIES.items():
        if name == "headers":
            same(properties.headers, EXPECTED_HEADERS, f"headers ({how})")
        else:
            same(getattr(properties, name), sent, f"property {name} ({how})")


def properties_and_headers_preserved(args):
    connection, channel, queue = connect_with_queue(args, "props")
    step("publish twice with every basic property and every header type pika encodes")
    for _ in range(2):
        channel.basic_publish("", queue, b"payload", properties=pika.BasicProperties(**SENT_PROPERTIES))
    step("basic.get")
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    expect(method is not None, "the message is not in the queue")
    eq(body, b"payload", "body (basic.get)")
    eq((method.exchange, method.routing_key, method.redelivered), ("", queue, False), "get-ok fields")
    check_properties(properties, "basic.get")
    step("basic.consume")
    collector = Collector()
    channel.basic_consume(queue, collector, auto_ack=True)
    method, properties, body = collector.wait(connection, 1)[0]
    eq(body, b"payload", "body (basic.deliver)")
    eq((method.exchange, method.routing_key, method.redelivered), ("", queue, False), "deliver fields")
    check_properties(properties, "basic.deliver")
    connection.close()


# ---------------------------------------------------------------------------------------------
# Consuming


def consumer_tags_server_generated_and_client_chosen(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    queues = [channel.queue_declare(name).method.queue for name in ("tag-a", "tag-b", "tag-c")]
    collector = Collector()
    step("basic.consume with an empty tag: the server generates one")
    first = raw_consume(connection, channel, queues[0], "", collector)
    second = raw_consume(connection, channel, queues[1], "", collector)
    expect(first.startswith("amq.ctag-"), f"server-generated tag {first!r} does not start with 'amq.ctag-'")
    expect(second.startswith("amq.ctag-"), f"server-generated tag {second!r} does not start with 'amq.ctag-'")
    expect(first != second, f"two server-generated tags on one channel are equal: {first!r}")
    step("basic.consume with a client tag: consume-ok echoes it")
    chosen = raw_consume(connection, channel, queues[2], "client-chosen-tag", collector)
    eq(chosen, "client-chosen-tag", "consume-ok tag for a client tag")
    step("deliveries carry the consumer's tag")
    for queue in queues:
        channel.basic_publish("", queue, queue.encode())
    collector.wait(connection, 3)
    tags = {body.decode(): method.consumer_tag for method, _, body in collector.deliveries}
    eq(tags, {queues[0]: first, queues[1]: second, queues[2]: chosen}, "consumer tag of each delivery")
    connection.close()


def consumer_tag_reuse_is_530(args):
    connection = connect(args)
    channel = connection.channel()
    queue = channel.queue_declare("reuse").method.queue
    channel.basic_consume(queue, Collector(), consumer_tag="dup")
    step("the same tag on another channel is allowed (tags are per channel)")
    other = connection.channel()
    other.basic_consume(queue, Collector(), consumer_tag="dup")
    step("the same tag again on the first channel (sent raw: pika refuses it itself)")
    expect_connection_error(
        connection,
        lambda: channel._impl._send_method(pika.spec.Basic.Consume(queue=queue, consumer_tag="dup")),
        530,
        "NOT_ALLOWED - attempt to reuse consumer tag 'dup'",
    )


def consume_missing_queue_404(args):
    connection = connect(args)
    step("basic.consume on a queue that does not exist")
    expect_channel_error(
        connection,
        404,
        "NOT_FOUND - no queue 'no-such-queue' in vhost '/'",
        lambda c: c.basic_consume("no-such-queue", Collector()),
    )
    connection.close()


def cancel_stops_deliveries(args):
    connection, publisher, queue = connect_with_queue(args, "cancelled")
    channel = connection.channel()
    collector = Collector()
    tag = channel.basic_consume(queue, collector, auto_ack=True)
    step("positive control: the consumer gets a message")
    publisher.basic_publish("", queue, b"one")
    collector.wait(connection, 1)
    step("basic.cancel, then publish again")
    channel.basic_cancel(tag)
    publisher.basic_publish("", queue, b"two")
    settle(connection, QUIET_SECS)
    eq(collector.bodies(), [b"one"], "bodies delivered (the second came after basic.cancel)")
    expect_next(publisher, queue, "the message published after cancel, still queued", body=b"two")
    connection.close()


def consumer_cancel_notification_on_queue_delete(args):
    connection = connect(args)
    channel = connection.channel()
    queue = channel.queue_declare("doomed").method.queue
    cancelled = []
    channel.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    collector = Collector()
    tag = channel.basic_consume(queue, collector, auto_ack=True)
    step("positive control: the consumer gets a message")
    channel.basic_publish("", queue, b"before")
    collector.wait(connection, 1)
    step("delete the queue from another channel")
    other = connection.channel()
    other.queue_delete(queue)
    pump(connection, lambda: cancelled, "a basic.cancel from the broker after the queue was deleted")
    eq(cancelled, [tag], "tags of the broker's basic.cancel")
    expect(channel.is_open, "the consumer's channel was closed by the cancel notification")
    step("the consumer's channel is still usable")
    channel.queue_declare("", exclusive=True)
    connection.close()


def no_ack_consume_removes_messages(args):
    connection, publisher, queue = connect_with_queue(args, "noack", [b"1", b"2", b"3"])
    channel = connection.channel()
    collector = Collector()
    channel.basic_consume(queue, collector, auto_ack=True)
    step("consume three messages with no-ack")
    collector.wait(connection, 3)
    eq(collector.bodies(), [b"1", b"2", b"3"], "bodies")
    step("close the channel without acking: nothing is requeued")
    channel.close()
    eq(ready_count(publisher, queue), 0, "ready messages after closing the no-ack consumer's channel")
    method, _, _ = publisher.basic_get(queue, auto_ack=True)
    expect(method is None, "a no-ack delivery was requeued")
    connection.close()


def exclusive_consume_refused_when_queue_has_consumer(args):
    connection = connect(args)
    channel = connection.channel()
    free = channel.queue_declare("free").method.queue
    busy = channel.queue_declare("busy").method.queue
    step("positive control: an exclusive consumer on a queue without consumers")
    channel.basic_consume(free, Collector(), exclusive=True)
    channel.basic_consume(busy, Collector())
    step("exclusive basic.consume on a queue that has a consumer")
    expect_channel_error(
        connection,
        403,
        "ACCESS_REFUSED - queue 'busy' in vhost '/' in exclusive use",
        lambda c: c.basic_consume(busy, Collector(), exclusive=True),
    )
    connection.close()


def round_robin_between_consumers(args):
    connection, publisher, queue = connect_with_queue(args, "shared")
    first, second = Collector(), Collector()
    channel = connection.channel()
    first_tag = channel.basic_consume(queue, first, auto_ack=True)
    second_tag = connection.channel().basic_consume(queue, second, auto_ack=True)
    arrivals = []
    step("publish ten messages to a queue with two consumers")
    for index in range(10):
        publisher.basic_publish("", queue, str(index).encode())
    pump(connection, lambda: len(first) + len(second) >= 10, "ten deliveries")
    settle(connection, 0.3)
    eq(len(first) + len(second), 10, "total deliveries (a message went to both consumers)")
    eq((len(first), len(second)), (5, 5), "deliveries per consumer")
    for collector in (first, second):
        arrivals.extend((int(body), method.consumer_tag) for method, _, body in collector.deliveries)
    tags = [tag for _, tag in sorted(arrivals)]
    expect(
        all(tags[index] != tags[index + 1] for index in range(len(tags) - 1)),
        f"messages in publish order did not alternate between the consumers: {tags}",
    )
    expect({first_tag, second_tag} == set(tags), f"unexpected consumer tags {set(tags)}")
    connection.close()


def basic_get_message_count_and_empty(args):
    connection, channel, queue = connect_with_queue(args, "gettable")
    step("basic.get on an empty queue: get-empty")
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    eq((method, properties, body), (None, None, None), "basic.get on an empty queue")
    publish_all(channel, queue, [b"a", b"b", b"c"])
    step("basic.get three times: message_count is what remains")
    seen = []
    for method, _, body in get_all(channel, queue, 3, auto_ack=False):
        seen.append((body, method.message_count, method.redelivered, method.exchange, method.routing_key))
        channel.basic_ack(method.delivery_tag)
    eq(
        seen,
        [(b"a", 2, False, "", queue), (b"b", 1, False, "", queue), (b"c", 0, False, "", queue)],
        "(body, message_count, redelivered, exchange, routing_key) of each get-ok",
    )
    step("basic.get once more: get-empty")
    method, _, _ = channel.basic_get(queue, auto_ack=True)
    expect(method is None, "basic.get after the queue was drained returned a message")
    connection.close()


# ---------------------------------------------------------------------------------------------
# Settling


def consume_unacked(connection, queue, count, prefetch=None):
    channel = connection.channel()
    if prefetch is not None:
        channel.basic_qos(prefetch_count=prefetch)
    collector = Collector()
    channel.basic_consume(queue, collector, auto_ack=False)
    collector.wait(connection, count)
    return channel, collector


def ack_single_and_multiple(args):
    connection, publisher, queue = connect_with_queue(args, "acked", [b"m1", b"m2", b"m3", b"m4"])
    channel, collector = consume_unacked(connection, queue, 4)
    tags = [method.delivery_tag for method, _, _ in collector.deliveries]
    eq(tags, [1, 2, 3, 4], "delivery tags")
    step("ack 1; ack 3 with multiple (2 and 3); leave 4 unacked")
    channel.basic_ack(1)
    channel.basic_ack(3, multiple=True)
    channel.close()
    step("closing the channel requeues only the unacked fourth message")
    expect_next(publisher, queue, "the requeued message", body=b"m4", redelivered=True, message_count=0)
    connection.close()


def nack_multiple_requeue_redelivers(args):
    connection, publisher, queue = connect_with_queue(args, "nacked", [b"m1", b"m2", b"m3", b"m4"])
    channel, collector = consume_unacked(connection, queue, 4)
    step("nack 3 with multiple and requeue: 1..3 come back redelivered, 4 stays with us")
    channel.basic_nack(3, multiple=True, requeue=True)
    collector.wait(connection, 7, "deliveries (4, then 3 redelivered)")
    settle(connection, 0.3)
    again = collector.deliveries[4:]
    eq(
        [(body, method.redelivered) for method, _, body in again],
        [(b"m1", True), (b"m2", True), (b"m3", True)],
        "(body, redelivered) of the redeliveries, in queue order",
    )
    eq([method.delivery_tag for method, _, _ in again], [5, 6, 7], "delivery tags of the redeliveries")
    channel.basic_ack(7, multiple=True)
    channel.close()
    eq(ready_count(publisher, queue), 0, "ready messages after acking everything")
    connection.close()


def nack_multiple_without_requeue_dead_letters_or_drops(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    dead = publisher.queue_declare("dead-letters").method.queue
    arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead}
    lettered = publisher.queue_declare("lettered", arguments=arguments).method.queue
    plain = publisher.queue_declare("plain").method.queue
    publish_all(publisher, lettered, [b"m1", b"m2", b"m3"])
    publish_all(publisher, plain, [b"p1", b"p2"])

    step("nack 2 with multiple, no requeue, on a queue with a dead-letter exchange")
    channel, collector = consume_unacked(connection, lettered, 3)
    channel.basic_nack(2, multiple=True, requeue=False)
    channel.basic_ack(3)
    channel.close()
    eq(ready_count(publisher, lettered), 0, "messages left in the nacked queue")
    got = get_all(publisher, dead, 2)
    eq([body for _, _, body in got], [b"m1", b"m2"], "dead-lettered bodies")
    for _, properties, body in got:
        deaths = (properties.headers or {}).get("x-death")
        expect(isinstance(deaths, list) and deaths, f"no x-death header on dead-lettered {body!r}")
        death = deaths[0]
        eq(death.get("reason"), "rejected", "x-death reason")
        eq(death.get("queue"), lettered, "x-death queue")
        eq(death.get("exchange"), "", "x-death exchange")
        eq(death.get("routing-keys"), [lettered], "x-death routing-keys")
        eq(death.get("count"), 1, "x-death count")

    step("nack with multiple, no requeue, on a queue without one: dropped")
    channel, collector = consume_unacked(connection, plain, 2)
    channel.basic_nack(2, multiple=True, requeue=False)
    channel.close()
    eq(ready_count(publisher, plain), 0, "messages left after nack without requeue (closing requeued them?)")
    connection.close()


def reject_requeue_sets_redelivered(args):
    connection, channel, queue = connect_with_queue(args, "rejected", [b"only"])
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    expect(method is not None, "the message is not in the queue")
    eq(method.redelivered, False, "redelivered flag of the first delivery")
    step("reject with requeue")
    channel.basic_reject(method.delivery_tag, requeue=True)
    method, _, body = channel.basic_get(queue, auto_ack=False)
    expect(method is not None, "the rejected message was not requeued")
    eq((body, method.redelivered), (b"only", True), "(body, redelivered) after reject with requeue")
    channel.basic_ack(method.delivery_tag)
    connection.close()


def reject_without_requeue_discards(args):
    connection, publisher, queue = connect_with_queue(args, "discarded", [b"gone", b"kept"])
    channel = connection.channel()
    method, _, body = channel.basic_get(queue, auto_ack=False)
    expect(method is not None and body == b"gone", f"first basic.get gave {body!r}")
    step("reject without requeue, then close the channel")
    channel.basic_reject(method.delivery_tag, requeue=False)
    channel.close()
    expect_next(publisher, queue, "after the rejected one was discarded", body=b"kept", message_count=0)
    connection.close()


def unknown_delivery_tag_406(args):
    connection, channel, queue = connect_with_queue(args, "tags", [b"x"])
    step("positive control: ack of a real tag")
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    channel.basic_ack(method.delivery_tag)
    step("ack of a tag never delivered")
    expect_channel_error(
        connection, 406, "PRECONDITION_FAILED - unknown delivery tag 99", lambda c: c.basic_ack(99), channel=channel
    )
    connection.close()


def double_ack_406(args):
    connection, channel, queue = connect_with_queue(args, "twice", [b"x"])
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    eq(method.delivery_tag, 1, "delivery tag")
    step("ack the same tag twice")
    channel.basic_ack(1)
    expect_channel_error(
        connection, 406, "PRECONDITION_FAILED - unknown delivery tag 1", lambda c: c.basic_ack(1), channel=channel
    )
    other = connection.channel()
    eq(ready_count(other, queue), 0, "ready messages after the ack")
    connection.close()


def recover_requeue_redelivers(args):
    connection, publisher, queue = connect_with_queue(args, "recovered", [b"r1", b"r2"])
    channel, collector = consume_unacked(connection, queue, 2)
    step("basic.recover(requeue=True) with two unacked deliveries")
    channel.basic_recover(requeue=True)
    collector.wait(connection, 4, "deliveries (2, then 2 redelivered)")
    again = collector.deliveries[2:]
    eq(
        sorted((body, method.redelivered) for method, _, body in again),
        [(b"r1", True), (b"r2", True)],
        "(body, redelivered) after basic.recover",
    )
    for method, _, _ in again:
        channel.basic_ack(method.delivery_tag)
    channel.close()
    eq(ready_count(publisher, queue), 0, "ready messages after acking the redeliveries")
    connection.close()


def channel_close_requeues_unacked(args):
    connection, publisher, queue = connect_with_queue(args, "requeued", [b"u1", b"u2"])
    channel, collector = consume_unacked(connection, queue, 2)
    eq([method.redelivered for method, _, _ in collector.deliveries], [False, False], "first deliveries redelivered")
    step("close the channel holding two unacked deliveries")
    channel.close()
    step("another consumer gets them, redelivered")
    other_connection = connect(args)
    _, other = consume_unacked(other_connection, queue, 2)
    eq(
        sorted((body, method.redelivered) for method, _, body in other.deliveries),
        [(b"u1", True), (b"u2", True)],
        "(body, redelivered) on the other consumer",
    )
    other_connection.close()
    connection.close()


def prefetch_count_limits_unacked(args):
    connection, publisher, queue = connect_with_queue(args, "prefetched", [f"p{index}".encode() for index in range(5)])
    step("consume with basic.qos prefetch_count=2: two deliveries")
    channel, collector = consume_unacked(connection, queue, 2, prefetch=2)
    settle(connection, QUIET_SECS)
    eq(len(collector), 2, "deliveries with two unacked and prefetch 2")
    step("ack one: exactly one more")
    channel.basic_ack(collector.deliveries[0][0].delivery_tag)
    collector.wait(connection, 3)
    settle(connection, QUIET_SECS)
    eq(len(collector), 3, "deliveries after one ack")
    step("ack the rest as they come")
    channel.basic_ack(collector.deliveries[2][0].delivery_tag, multiple=True)
    collector.wait(connection, 5)
    eq(collector.bodies(), [f"p{index}".encode() for index in range(5)], "bodies in order")
    channel.basic_ack(collector.deliveries[4][0].delivery_tag, multiple=True)
    connection.close()


# ---------------------------------------------------------------------------------------------
# Publisher confirms


def confirms_ack_every_publish_in_order(args):
    """With SelectConnection, which shows each basic.ack (pika's BlockingChannel hides them)."""
    count = 50
    frames = []
    failures = []

    def on_open(connection):
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel):
        channel.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda _frame: declare(channel))

    def declare(channel):
        channel.queue_declare("confirmed", callback=lambda _frame: publish(channel))

    def publish(channel):
        for index in range(count):
            channel.basic_publish("", "confirmed", f"c{index}".encode())

    def on_confirm(frame):
        method = frame.method
        frames.append((type(method).__name__, method.delivery_tag, method.multiple))
        if confirmed_tags() >= set(range(1, count + 1)) or frames[-1][0] != "Ack":
            state["connection"].close()

    def confirmed_tags():
        tags = set()
        for _, tag, multiple in frames:
            tags.update(range(1, tag + 1) if multiple else [tag])
        return tags

    def on_open_error(_connection, error):
        failures.append(f"connection failed: {error!r}")
        state["connection"].ioloop.stop()

    def on_close(connection, _reason):
        connection.ioloop.stop()

    def on_timeout():
        failures.append(f"confirms did not arrive within 10 s: {frames}")
        state["connection"].close()

    state = {}
    step("publish 50 messages in confirm mode (SelectConnection)")
    connection = pika.SelectConnection(
        params(args), on_open_callback=on_open, on_open_error_callback=on_open_error, on_close_callback=on_close
    )
    state["connection"] = connection
    connection.ioloop.call_later(10, on_timeout)
    connection.ioloop.start()
    if failures:
        fail(failures[0])
    eq([kind for kind, _, _ in frames if kind != "Ack"], [], "confirms that are not basic.ack")
    tags = [tag for _, tag, _ in frames]
    eq(tags, sorted(set(tags)), "confirm delivery tags in increasing order without repeats")
    eq(confirmed_tags(), set(range(1, count + 1)), "publish sequence numbers confirmed")
    step("every confirmed message is in the queue, in order")
    blocking = connect(args)
    channel = blocking.channel()
    got = get_all(channel, "confirmed", count)
    eq([body for _, _, body in got], [f"c{index}".encode() for index in range(count)], "bodies")
    blocking.close()


def confirm_nack_when_queue_refuses(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    arguments = {"x-max-length": 1, "x-overflow": "reject-publish"}
    bounded = channel.queue_declare("bounded", arguments=arguments).method.queue
    step("positive control: the first publish fits and is acked")
    channel.basic_publish("", bounded, b"first")
    step("the second is refused by the full queue: basic.nack (pika: NackError)")
    expect_nacked(lambda: channel.basic_publish("", bounded, b"second"), "a publish to a full reject-publish queue")
    expect(channel.is_open, "the channel was closed by a nack")
    step("the channel keeps confirming")
    other = channel.queue_declare("unbounded").method.queue
    channel.basic_publish("", other, b"third")
    expect_next(channel, bounded, "the bounded queue", body=b"first", message_count=0)
    connection.close()


# ---------------------------------------------------------------------------------------------
# Transactions


def tx_channel(connection):
    """A new channel in tx mode."""
    channel = connection.channel()
    channel.tx_select()
    return channel


def tx_get(connection, queue, body):
    """A new channel in tx mode and the delivery tag of the next message of `queue`, which must be
    `body`, got by basic.get without auto-ack."""
    channel = tx_channel(connection)
    method, _, got = channel.basic_get(queue, auto_ack=False)
    expect(method is not None and got == body, f"basic.get on {queue!r} gave {got!r}, expected {body!r}")
    return channel, method.delivery_tag


def tx_commit_makes_publishes_visible(args):
    connection = connect(args)
    observer = connection.channel()
    queue = observer.queue_declare("txq").method.queue
    channel = tx_channel(connection)
    step("publish three in a transaction")
    for body in (b"t1", b"t2", b"t3"):
        channel.basic_publish("", queue, body)
    # A round trip on the transactional channel: the broker has processed the publishes.
    channel.queue_declare(queue, passive=True)
    eq(ready_count(observer, queue), 0, "ready messages before tx.commit")
    method, _, _ = observer.basic_get(queue, auto_ack=True)
    expect(method is None, "basic.get saw an uncommitted publish")
    step("tx.commit")
    channel.tx_commit()
    eq(ready_count(observer, queue), 3, "ready messages after tx.commit")
    eq([body for _, _, body in get_all(observer, queue, 3)], [b"t1", b"t2", b"t3"], "committed bodies")
    connection.close()


def tx_rollback_discards_publishes(args):
    connection = connect(args)
    observer = connection.channel()
    queue = observer.queue_declare("txr").method.queue
    channel = tx_channel(connection)
    step("publish two, tx.rollback")
    channel.basic_publish("", queue, b"rolled-back-1")
    channel.basic_publish("", queue, b"rolled-back-2")
    channel.tx_rollback()
    eq(ready_count(observer, queue), 0, "ready messages after tx.rollback")
    step("the channel stays transactional: publish one, tx.commit")
    channel.basic_publish("", queue, b"committed")
    channel.queue_declare(queue, passive=True)
    eq(ready_count(observer, queue), 0, "ready messages before the second tx.commit")
    channel.tx_commit()
    expect_next(observer, queue, "after rollback then commit", body=b"committed", message_count=0)
    connection.close()


def tx_acks_take_effect_at_commit(args):
    connection, publisher, queue = connect_with_queue(args, "txacks", [b"held"])

    def ack_in_tx(end):
        """Get and ack the message in a transaction, `end(channel)` it, close the channel."""
        channel, tag = tx_get(connection, queue, b"held")
        channel.basic_ack(tag)
        end(channel)
        channel.close()

    def expect_redelivered(ack):
        """The `ack` ack did not happen: the message was still unacked and is back, redelivered."""
        method, _, body = publisher.basic_get(queue, auto_ack=False)
        expect(method is not None, f"the message of the {ack} ack is gone after channel close")
        eq((body, method.redelivered), (b"held", True), f"(body, redelivered) after the {ack} ack")
        publisher.basic_reject(method.delivery_tag, requeue=True)

    step("get and ack inside a transaction, tx.rollback, close the channel")
    ack_in_tx(lambda channel: channel.tx_rollback())
    step("the rolled-back ack did not happen: the message was still unacked and is redelivered")
    expect_redelivered("rolled-back")

    step("get and ack inside a transaction, close the channel without tx.commit")
    ack_in_tx(lambda _channel: None)
    step("closing the channel dropped the uncommitted ack: the message is requeued")
    expect_redelivered("uncommitted")

    step("get and ack inside a transaction, tx.commit, close the channel")
    ack_in_tx(lambda channel: channel.tx_commit())
    eq(ready_count(publisher, queue), 0, "ready messages after the committed ack and channel close")
    connection.close()


def tx_publishes_and_acks_all_or_nothing(args):
    """Publishes to several queues and an ack, in one transaction: none before tx.commit, all
    after it; after tx.rollback none of them took effect."""
    connection = connect(args)
    observer = confirmed_channel(connection)
    # Several queues, so that they are likely on different core shards.
    targets = [observer.queue_declare(f"tx-target-{index}").method.queue for index in range(4)]
    source = observer.queue_declare("tx-source").method.queue
    publish_all(observer, source, [b"to-ack", b"stays"])

    def counts():
        return [ready_count(observer, queue) for queue in targets]

    def stage(acked, published):
        """A new tx channel that acked the source's next message `acked` and published
        `published` to every target, all uncommitted and processed by the broker."""
        channel, tag = tx_get(connection, source, acked)
        channel.basic_ack(tag)
        for queue in targets:
            channel.basic_publish("", queue, published)
        channel.queue_declare(source, passive=True)
        return channel

    step("stage one ack and four publishes (four queues) in a transaction")
    channel = stage(b"to-ack", b"committed")
    eq(counts(), [0, 0, 0, 0], "ready messages in the targets before tx.commit")
    step("tx.commit: every publish and the ack take effect")
    channel.tx_commit()
    eq(counts(), [1, 1, 1, 1], "ready messages in the targets after tx.commit")
    channel.close()
    method, _, _ = expect_next(
        observer, source, "the source: the acked one is gone", auto_ack=False, body=b"stays", message_count=0
    )
    observer.basic_reject(method.delivery_tag, requeue=True)

    step("stage an ack and four publishes again; tx.rollback: none takes effect")
    channel = stage(b"stays", b"rolled back")
    channel.tx_rollback()
    eq(counts(), [1, 1, 1, 1], "ready messages in the targets after tx.rollback")
    channel.close()
    expect_next(observer, source, "the source message whose ack was rolled back", body=b"stays", redelivered=True)
    bodies = [get_all(observer, queue, 1)[0][2] for queue in targets]
    eq(bodies, [b"committed"] * 4, "the targets' messages")
    connection.close()


def tx_reject_takes_effect_at_commit(args):
    """RabbitMQ buffers basic.reject and basic.nack in a transaction like basic.ack (its
    channel's uncommitted_nacks): a requeue happens at tx.commit, not before."""
    connection, observer, queue = connect_with_queue(args, "txreject", [b"held"])
    channel, tag = tx_get(connection, queue, b"held")
    step("basic.reject with requeue inside the transaction")
    channel.basic_reject(tag, requeue=True)
    channel.queue_declare(queue, passive=True)
    eq(ready_count(observer, queue), 0, "ready messages before tx.commit (the reject was applied at once)")
    step("tx.commit: the message is requeued")
    channel.tx_commit()
    expect_next(observer, queue, "after the committed reject", body=b"held", redelivered=True)
    connection.close()


def tx_commit_on_non_transactional_channel_406(args):
    connection = connect(args)
    step("tx.commit without tx.select")
    expect_channel_error(connection, 406, "PRECONDITION_FAILED - channel is not transactional", lambda c: c.tx_commit())
    step("tx.rollback without tx.select")
    expect_channel_error(
        connection, 406, "PRECONDITION_FAILED - channel is not transactional", lambda c: c.tx_rollback()
    )
    connection.close()


def mode_switch_406(args, first, then):
    """A channel in mode `first` ("tx" or "confirm") asked for mode `then` is closed 406."""
    select = {"tx": lambda c: c.tx_select(), "confirm": lambda c: c.confirm_delivery()}
    connection = connect(args)
    channel = connection.channel()
    select[first](channel)
    step(f"{then}.select on a channel in {first} mode")
    expect_channel_error(
        connection,
        406,
        f"PRECONDITION_FAILED - cannot switch from {first} to {then} mode",
        select[then],
        channel=channel,
    )
    connection.close()


# ---------------------------------------------------------------------------------------------
# Negotiation


def wrong_password_403(args):
    step("positive control: the right password")
    connect(args).close()
    step("a wrong password")
    expect_refused_connect(
        args,
        pika.exceptions.ProbableAuthenticationError,
        403,
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.",
        credentials=pika.PlainCredentials(USER, "not-the-password"),
    )


def missing_vhost_530(args):
    step("positive control: vhost /")
    connect(args, virtual_host="/").close()
    step("a vhost that does not exist")
    expect_refused_connect(
        args,
        pika.exceptions.ProbableAccessDeniedError,
        530,
        "NOT_ALLOWED - vhost no-such-vhost not found",
        virtual_host="no-such-vhost",
    )


def heartbeat_keeps_idle_connection_open(args):
    connection = connect(args, heartbeat=2)
    eq(connection._impl.params.heartbeat, 2, "heartbeat sent in tune-ok")
    checker = connection._impl._heartbeat_checker
    expect(checker is not None, "pika runs no heartbeat checker")
    step("idle for three heartbeat intervals")
    connection.sleep(6)
    expect(connection.is_open, "the idle connection was closed")
    received = checker._heartbeat_frames_received
    # At 2 s the broker sends one at least every 2 s (RabbitMQ: every 1 s); at its default 60 s, none.
    expect(received >= 2, f"the broker sent {received} heartbeat frames in 6 s idle at heartbeat=2")
    step("the connection still works after idling")
    expect_usable(connection)
    connection.close()


def missed_heartbeats_close_connection(args):
    connection = connect(args, heartbeat=2)
    checker = connection._impl._heartbeat_checker
    expect(checker is not None, "pika runs no heartbeat checker")
    # The client falls silent: pika's heartbeat timer still runs, but sends nothing.
    checker._send_heartbeat_frame = lambda: None
    started = time.monotonic()
    step("silent for up to 8 s at heartbeat=2")
    try:
        connection.sleep(8)
    except pika.exceptions.AMQPConnectionError as error:
        elapsed = time.monotonic() - started
        expect(
            isinstance(error, (pika.exceptions.StreamLostError, pika.exceptions.ConnectionClosedByBroker)),
            f"the connection ended with {error!r}, not by the broker",
        )
        # Two silent intervals (4 s) at the earliest, as RabbitMQ; not at once for another reason.
        expect(elapsed >= 3.5, f"the broker closed the silent connection after only {elapsed:.1f} s")
    else:
        fail("the broker kept a connection that sent nothing for 8 s at heartbeat=2")


def client_close_gets_close_ok(args):
    connection = connect(args)
    channel = connection.channel()
    channel.queue_declare("", exclusive=True)
    close_oks = []
    impl = connection._impl
    on_close_ok = impl._on_connection_close_ok

    def recording_close_ok(frame):
        close_oks.append(frame.method)
        on_close_ok(frame)

    impl._on_connection_close_ok = recording_close_ok
    step("connection.close")
    connection.close()
    eq(len(close_oks), 1, "connection.close-ok frames received")
    eq(type(close_oks[0]).__name__, "CloseOk", "reply to connection.close")
    expect(connection.is_closed, "the connection is not closed after close-ok")
    step("a new connection works")
    again = connect(args)
    expect_usable(again)
    again.close()


SCENARIOS = {
    "mandatory-unroutable-returned": mandatory_unroutable_returned,
    "unroutable-dropped-and-confirmed": unroutable_dropped_and_confirmed,
    "publish-to-missing-exchange-404": publish_to_missing_exchange_404,
    "publish-foreign-user-id-406": publish_foreign_user_id_406,
    "large-message-split-into-frames": large_message_split_into_frames,
    "empty-body": empty_body,
    "properties-and-headers-preserved": properties_and_headers_preserved,
    "consumer-tags": consumer_tags_server_generated_and_client_chosen,
    "consumer-tag-reuse-530": consumer_tag_reuse_is_530,
    "consume-missing-queue-404": consume_missing_queue_404,
    "cancel-stops-deliveries": cancel_stops_deliveries,
    "cancel-notification-on-queue-delete": consumer_cancel_notification_on_queue_delete,
    "no-ack-consume": no_ack_consume_removes_messages,
    "exclusive-consume-refused-403": exclusive_consume_refused_when_queue_has_consumer,
    "round-robin": round_robin_between_consumers,
    "basic-get": basic_get_message_count_and_empty,
    "ack-single-and-multiple": ack_single_and_multiple,
    "nack-multiple-requeue": nack_multiple_requeue_redelivers,
    "nack-multiple-no-requeue": nack_multiple_without_requeue_dead_letters_or_drops,
    "reject-requeue": reject_requeue_sets_redelivered,
    "reject-discard": reject_without_requeue_discards,
    "unknown-delivery-tag-406": unknown_delivery_tag_406,
    "double-ack-406": double_ack_406,
    "recover-requeue": recover_requeue_redelivers,
    "channel-close-requeues": channel_close_requeues_unacked,
    "prefetch": prefetch_count_limits_unacked,
    "confirms-in-order": confirms_ack_every_publish_in_order,
    "confirm-nack-reject-publish": confirm_nack_when_queue_refuses,
    "tx-commit": tx_commit_makes_publishes_visible,
    "tx-rollback": tx_rollback_discards_publishes,
    "tx-acks-at-commit": tx_acks_take_effect_at_commit,
    "tx-all-or-nothing": tx_publishes_and_acks_all_or_nothing,
    "tx-reject-at-commit": tx_reject_takes_effect_at_commit,
    "tx-not-transactional-406": tx_commit_on_non_transactional_channel_406,
    "confirm-after-tx-406": lambda args: mode_switch_406(args, "tx", "confirm"),
    "tx-after-confirm-406": lambda args: mode_switch_406(args, "confirm", "tx"),
    "wrong-password-403": wrong_password_403,
    "missing-vhost-530": missing_vhost_530,
    "heartbeat": heartbeat_keeps_idle_connection_open,
    "missed-heartbeats": missed_heartbeats_close_connection,
    "client-close": client_close_gets_close_ok,
}


if __name__ == "__main__":
    sys.exit(run_scenarios(__doc__, SCENARIOS, SCENARIO_TIMEOUT_SECS))
