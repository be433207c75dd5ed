"""pika scenarios for the basic class, publisher confirms, transactions and connection
negotiation against Wharf (see conformance/amqp/pika_basic.rs, which runs one per test).

    python pika_basic_check.py <scenario> --port 5672

Each scenario exits 0 when the broker behaved as RabbitMQ documents (or as
protocols/amqp/MAPPING.md documents where Wharf deliberately differs), and exits non-zero with
a message naming what differed otherwise. Every wait is bounded: blocking calls by a watchdog
alarm, message waits by deadlines; a "does not arrive" check waits a bounded time, and only
after a positive control showed that delivery works.
"""

import argparse
import datetime
import decimal
import os
import signal
import sys
import time

import pika
import pika.exceptions
import pika.spec

# The whole scenario: past it the watchdog fails the run, naming the step it was in.
SCENARIO_TIMEOUT_SECS = 25
# Longest wait for something that should happen (a delivery, a return, a cancel).
ARRIVAL_TIMEOUT_SECS = 5.0
# How long a "does not arrive" check waits (after a positive control).
QUIET_SECS = 0.7
# pika's own socket and handshake timeouts.
SOCKET_TIMEOUT_SECS = 5
STACK_TIMEOUT_SECS = 10

USER = "guest"
PASSWORD = "guest"

_step = "start"


class Mismatch(Exception):
    """The broker did something other than what the scenario expects."""


def step(name):
    """Name what the scenario does now, for the watchdog's message."""
    global _step
    _step = name


def _watchdog(_signum, _frame):
    # A blocking pika call has no timeout of its own: exit from here, whatever it is doing.
    sys.stderr.write(f"FAILED: no answer within {SCENARIO_TIMEOUT_SECS} s; the scenario was at: {_step}\n")
    sys.stderr.flush()
    os._exit(3)


def fail(message):
    raise Mismatch(f"{message} (at: {_step})")


def check(condition, message):
    if not condition:
        fail(message)


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


def params(args, **overrides):
    settings = dict(
        host="127.0.0.1",
        port=args.port,
        credentials=pika.PlainCredentials(USER, PASSWORD),
        socket_timeout=SOCKET_TIMEOUT_SECS,
        stack_timeout=STACK_TIMEOUT_SECS,
        blocked_connection_timeout=SOCKET_TIMEOUT_SECS,
        connection_attempts=1,
    )
    settings.update(overrides)
    return pika.ConnectionParameters(**settings)


def connect(args, **overrides):
    return pika.BlockingConnection(params(args, **overrides))


def wait_until(connection, condition, what, timeout=ARRIVAL_TIMEOUT_SECS):
    """Process I/O until `condition()` holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            fail(f"{what} within {timeout} s")
        connection.process_data_events(time_limit=0.05)


def quiet(connection, seconds=QUIET_SECS):
    """Process I/O for `seconds`: what should not arrive gets its chance to."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.05)


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
        wait_until(connection, lambda: len(self) >= count, f"{count} {what} did not arrive (got {len(self)})")
        return self.deliveries


def publish_all(channel, queue, bodies, **kwargs):
    """Publish to `queue` through the default exchange (each confirmed when `channel` is in confirm mode)."""
    for body in bodies:
        channel.basic_publish("", queue, body, **kwargs)


def confirmed_channel(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def ready_count(channel, queue):
    """Ready messages in `queue` (queue.declare-ok's message_count)."""
    return channel.queue_declare(queue, passive=True).method.message_count


def get_all(channel, queue, count, auto_ack=True):
    """`count` messages by basic.get, failing if fewer are there."""
    got = []
    for index in range(count):
        method, properties, body = channel.basic_get(queue, auto_ack=auto_ack)
        check(method is not None, f"basic.get {index + 1} of {count} on {queue!r} found the queue empty")
        got.append((method, properties, body))
    return got


def check_connection_usable(connection):
    """A channel error closes only its channel: the connection still routes a message."""
    step("check the connection is still usable")
    check(connection.is_open, "the connection was closed, not only the channel")
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.basic_publish("", queue, b"still usable")
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_SECS
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            eq(body, b"still usable", "body of the message on the still-usable connection")
            break
        check(time.monotonic() < deadline, "the still-usable connection did not route a message")
        time.sleep(0.02)
    channel.close()


def expect_channel_error(connection, channel, action, code, text):
    """`action` (or the next round trip on `channel`) gets channel.close `code` `text`; the
    connection stays usable."""
    try:
        action()
        # A round trip: the broker answers in order, so a channel.close caused by `action`
        # arrives before this method's ok (which a closed channel never sends).
        channel.basic_qos(prefetch_count=0)
    except pika.exceptions.ChannelClosedByBroker as error:
        eq(error.reply_code, code, "channel.close reply code")
        eq(error.reply_text, text, "channel.close reply text")
    else:
        fail(f"expected channel.close {code} {text!r}, the channel stayed open")
    check(channel.is_closed, "the channel is not closed after channel.close")
    check_connection_usable(connection)


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
    check(connection.is_closed, "the connection is not closed after connection.close")


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
        wait_until(connection, lambda: tags, f"no basic.consume-ok for tag {consumer_tag!r}")
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
    wait_until(connection, lambda: returned, "no basic.return for a mandatory unroutable publish")
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
    try:
        confirming.basic_publish("amq.direct", "nowhere", b"lost again", mandatory=True)
    except pika.exceptions.UnroutableError as error:
        eq(len(error.messages), 1, "returned messages")
        eq(error.messages[0].method.reply_code, 312, "basic.return reply code (confirm mode)")
        eq(error.messages[0].method.reply_text, "NO_ROUTE", "basic.return reply text (confirm mode)")
        eq(error.messages[0].body, b"lost again", "returned body (confirm mode)")
    else:
        fail("a mandatory unroutable publish in confirm mode was not returned")

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
    quiet(connection)
    eq(returned, [], "basic.return for a non-mandatory publish")
    check(channel.is_open, "the channel was closed by a non-mandatory unroutable publish")
    got = get_all(channel, queue, 1)
    eq(got[0][2], b"kept", "the routed message")
    eq(got[0][0].message_count, 0, "messages left in the bound queue (the unroutable one went nowhere)")
    connection.close()


def publish_to_missing_exchange_404(args):
    connection = connect(args)
    channel = connection.channel()
    step("basic.publish to an exchange that does not exist")
    expect_channel_error(
        connection,
        channel,
        lambda: channel.basic_publish("no-such-exchange", "k", b"x"),
        404,
        "NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'",
    )
    connection.close()


def publish_foreign_user_id_406(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("users").method.queue
    step("positive control: user_id equal to the login is accepted and kept")
    channel.basic_publish("", queue, b"mine", properties=pika.BasicProperties(user_id=USER))
    got = get_all(channel, queue, 1)
    eq(got[0][1].user_id, USER, "user_id of the accepted message")
    step("user_id of someone else")
    expect_channel_error(
        connection,
        channel,
        lambda: channel.basic_publish("", queue, b"forged", properties=pika.BasicProperties(user_id="mallory")),
        406,
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'",
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
    check(received == body, "the 1 MiB body arrived with different bytes")
    eq(properties.message_id, "big", "message-id of the large message")
    body_frames = [size for size, kind in frame_sizes if kind == "Body"]
    check(len(body_frames) >= len(body) // frame_max, f"the body came in {len(body_frames)} frames")
    largest = max(size for size, _ in frame_sizes)
    check(largest <= frame_max, f"the broker sent a {largest}-byte frame, above the negotiated frame_max {frame_max}")
    connection.close()


def empty_body(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("empty").method.queue
    properties = pika.BasicProperties(content_type="text/plain", headers={"empty": True})
    step("publish an empty body, then a non-empty one (the stream must stay in step)")
    channel.basic_publish("", queue, b"", properties=properties)
    channel.basic_publish("", queue, b"", properties=properties)
    channel.basic_publish("", queue, b"after")
    step("basic.get the first empty message")
    method, got_properties, body = channel.basic_get(queue, auto_ack=True)
    check(method is not None, "the empty message is not in the queue")
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
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("props").method.queue
    step("publish twice with every basic property and every header type pika encodes")
    for _ in range(2):
        channel.basic_publish("", queue, b"payload", properties=pika.BasicProperties(**SENT_PROPERTIES))
    step("basic.get")
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    check(method is not None, "the message is not in the queue")
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
    check(first.startswith("amq.ctag-"), f"server-generated tag {first!r} does not start with 'amq.ctag-'")
    check(second.startswith("amq.ctag-"), f"server-generated tag {second!r} does not start with 'amq.ctag-'")
    check(first != second, f"two server-generated tags on one channel are equal: {first!r}")
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
    channel = connection.channel()
    step("basic.consume on a queue that does not exist")
    expect_channel_error(
        connection,
        channel,
        lambda: channel.basic_consume("no-such-queue", Collector()),
        404,
        "NOT_FOUND - no queue 'no-such-queue' in vhost '/'",
    )
    connection.close()


def cancel_stops_deliveries(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("cancelled").method.queue
    channel = connection.channel()
    collector = Collector()
    tag = channel.basic_consume(queue, collector, auto_ack=True)
    step("positive control: the consumer gets a message")
    publisher.basic_publish("", queue, b"one")
    collector.wait(connection, 1)
    step("basic.cancel, then publish again")
    channel.basic_cancel(tag)
    publisher.basic_publish("", queue, b"two")
    quiet(connection)
    eq(collector.bodies(), [b"one"], "bodies delivered (the second came after basic.cancel)")
    got = get_all(publisher, queue, 1)
    eq(got[0][2], b"two", "the message published after cancel, still queued")
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
    wait_until(connection, lambda: cancelled, "no basic.cancel from the broker after the queue was deleted")
    eq(cancelled, [tag], "tags of the broker's basic.cancel")
    check(channel.is_open, "the consumer's channel was closed by the cancel notification")
    step("the consumer's channel is still usable")
    channel.queue_declare("", exclusive=True)
    connection.close()


def no_ack_consume_removes_messages(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("noack").method.queue
    publish_all(publisher, queue, [b"1", b"2", b"3"])
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
    check(method is None, "a no-ack delivery was requeued")
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
    other = connection.channel()
    expect_channel_error(
        connection,
        other,
        lambda: other.basic_consume(busy, Collector(), exclusive=True),
        403,
        "ACCESS_REFUSED - queue 'busy' in vhost '/' in exclusive use",
    )
    connection.close()


def round_robin_between_consumers(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("shared").method.queue
    first, second = Collector(), Collector()
    channel = connection.channel()
    first_tag = channel.basic_consume(queue, first, auto_ack=True)
    second_tag = connection.channel().basic_consume(queue, second, auto_ack=True)
    arrivals = []
    step("publish ten messages to a queue with two consumers")
    for index in range(10):
        publisher.basic_publish("", queue, str(index).encode())
    wait_until(connection, lambda: len(first) + len(second) >= 10, "ten deliveries did not arrive")
    quiet(connection, 0.3)
    eq(len(first) + len(second), 10, "total deliveries (a message went to both consumers)")
    eq((len(first), len(second)), (5, 5), "deliveries per consumer")
    for collector in (first, second):
        arrivals.extend((int(body), method.consumer_tag) for method, _, body in collector.deliveries)
    tags = [tag for _, tag in sorted(arrivals)]
    check(
        all(tags[index] != tags[index + 1] for index in range(len(tags) - 1)),
        f"messages in publish order did not alternate between the consumers: {tags}",
    )
    check({first_tag, second_tag} == set(tags), f"unexpected consumer tags {set(tags)}")
    connection.close()


def basic_get_message_count_and_empty(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("gettable").method.queue
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
    check(method is None, "basic.get after the queue was drained returned a message")
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
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("acked").method.queue
    publish_all(publisher, queue, [b"m1", b"m2", b"m3", b"m4"])
    channel, collector = consume_unacked(connection, queue, 4)
    tags = [method.delivery_tag for method, _, _ in collector.deliveries]
    eq(tags, [1, 2, 3, 4], "delivery tags")
    step("ack 1; ack 3 with multiple (2 and 3); leave 4 unacked")
    channel.basic_ack(1)
    channel.basic_ack(3, multiple=True)
    channel.close()
    step("closing the channel requeues only the unacked fourth message")
    got = get_all(publisher, queue, 1)
    eq((got[0][2], got[0][0].redelivered, got[0][0].message_count), (b"m4", True, 0), "(body, redelivered, left)")
    connection.close()


def nack_multiple_requeue_redelivers(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("nacked").method.queue
    publish_all(publisher, queue, [b"m1", b"m2", b"m3", b"m4"])
    channel, collector = consume_unacked(connection, queue, 4)
    step("nack 3 with multiple and requeue: 1..3 come back redelivered, 4 stays with us")
    channel.basic_nack(3, multiple=True, requeue=True)
    collector.wait(connection, 7, "deliveries (4, then 3 redelivered)")
    quiet(connection, 0.3)
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
        check(isinstance(deaths, list) and deaths, f"no x-death header on dead-lettered {body!r}")
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
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("rejected").method.queue
    publish_all(channel, queue, [b"only"])
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    check(method is not None, "the message is not in the queue")
    eq(method.redelivered, False, "redelivered flag of the first delivery")
    step("reject with requeue")
    channel.basic_reject(method.delivery_tag, requeue=True)
    method, _, body = channel.basic_get(queue, auto_ack=False)
    check(method is not None, "the rejected message was not requeued")
    eq((body, method.redelivered), (b"only", True), "(body, redelivered) after reject with requeue")
    channel.basic_ack(method.delivery_tag)
    connection.close()


def reject_without_requeue_discards(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("discarded").method.queue
    publish_all(publisher, queue, [b"gone", b"kept"])
    channel = connection.channel()
    method, _, body = channel.basic_get(queue, auto_ack=False)
    check(method is not None and body == b"gone", f"first basic.get gave {body!r}")
    step("reject without requeue, then close the channel")
    channel.basic_reject(method.delivery_tag, requeue=False)
    channel.close()
    got = get_all(publisher, queue, 1)
    eq((got[0][2], got[0][0].message_count), (b"kept", 0), "(body, left) after the rejected one was discarded")
    connection.close()


def unknown_delivery_tag_406(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("tags").method.queue
    publish_all(channel, queue, [b"x"])
    step("positive control: ack of a real tag")
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    channel.basic_ack(method.delivery_tag)
    step("ack of a tag never delivered")
    expect_channel_error(
        connection, channel, lambda: channel.basic_ack(99), 406, "PRECONDITION_FAILED - unknown delivery tag 99"
    )
    connection.close()


def double_ack_406(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    queue = channel.queue_declare("twice").method.queue
    publish_all(channel, queue, [b"x"])
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    eq(method.delivery_tag, 1, "delivery tag")
    step("ack the same tag twice")
    channel.basic_ack(1)
    expect_channel_error(
        connection, channel, lambda: channel.basic_ack(1), 406, "PRECONDITION_FAILED - unknown delivery tag 1"
    )
    other = connection.channel()
    eq(ready_count(other, queue), 0, "ready messages after the ack")
    connection.close()


def recover_requeue_redelivers(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("recovered").method.queue
    publish_all(publisher, queue, [b"r1", b"r2"])
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
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("requeued").method.queue
    publish_all(publisher, queue, [b"u1", b"u2"])
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
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("prefetched").method.queue
    publish_all(publisher, queue, [f"p{index}".encode() for index in range(5)])
    step("consume with basic.qos prefetch_count=2: two deliveries")
    channel, collector = consume_unacked(connection, queue, 2, prefetch=2)
    quiet(connection)
    eq(len(collector), 2, "deliveries with two unacked and prefetch 2")
    step("ack one: exactly one more")
    channel.basic_ack(collector.deliveries[0][0].delivery_tag)
    collector.wait(connection, 3)
    quiet(connection)
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
    try:
        channel.basic_publish("", bounded, b"second")
    except pika.exceptions.NackError:
        pass
    else:
        fail("a publish refused by an x-overflow=reject-publish queue was acked")
    check(channel.is_open, "the channel was closed by a nack")
    step("the channel keeps confirming")
    other = channel.queue_declare("unbounded").method.queue
    channel.basic_publish("", other, b"third")
    got = get_all(channel, bounded, 1)
    eq((got[0][2], got[0][0].message_count), (b"first", 0), "(body, left) in the bounded queue")
    connection.close()


# ---------------------------------------------------------------------------------------------
# Transactions


def tx_commit_makes_publishes_visible(args):
    connection = connect(args)
    observer = connection.channel()
    queue = observer.queue_declare("txq").method.queue
    channel = connection.channel()
    channel.tx_select()
    step("publish three in a transaction")
    for body in (b"t1", b"t2", b"t3"):
        channel.basic_publish("", queue, body)
    # A round trip on the transactional channel: the broker has processed the publishes.
    channel.queue_declare(queue, passive=True)
    eq(ready_count(observer, queue), 0, "ready messages before tx.commit")
    method, _, _ = observer.basic_get(queue, auto_ack=True)
    check(method is None, "basic.get saw an uncommitted publish")
    step("tx.commit")
    channel.tx_commit()
    eq(ready_count(observer, queue), 3, "ready messages after tx.commit")
    eq([body for _, _, body in get_all(observer, queue, 3)], [b"t1", b"t2", b"t3"], "committed bodies")
    connection.close()


def tx_rollback_discards_publishes(args):
    connection = connect(args)
    observer = connection.channel()
    queue = observer.queue_declare("txr").method.queue
    channel = connection.channel()
    channel.tx_select()
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
    got = get_all(observer, queue, 1)
    eq((got[0][2], got[0][0].message_count), (b"committed", 0), "(body, left) after rollback then commit")
    connection.close()


def tx_acks_take_effect_at_commit(args):
    connection = connect(args)
    publisher = confirmed_channel(connection)
    queue = publisher.queue_declare("txacks").method.queue
    publish_all(publisher, queue, [b"held"])

    step("get and ack inside a transaction, tx.rollback, close the channel")
    channel = connection.channel()
    channel.tx_select()
    method, _, body = channel.basic_get(queue, auto_ack=False)
    check(method is not None and body == b"held", "the message is not in the queue")
    channel.basic_ack(method.delivery_tag)
    channel.tx_rollback()
    channel.close()
    step("the rolled-back ack did not happen: the message was still unacked and is redelivered")
    method, _, body = publisher.basic_get(queue, auto_ack=False)
    check(method is not None, "the message acked in a rolled-back transaction is gone")
    eq((body, method.redelivered), (b"held", True), "(body, redelivered) after the rolled-back ack")
    publisher.basic_reject(method.delivery_tag, requeue=True)

    step("get and ack inside a transaction, close the channel without tx.commit")
    channel = connection.channel()
    channel.tx_select()
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    check(method is not None, "the message is not in the queue")
    channel.basic_ack(method.delivery_tag)
    channel.close()
    step("closing the channel dropped the uncommitted ack: the message is requeued")
    method, _, body = publisher.basic_get(queue, auto_ack=False)
    check(method is not None, "the message acked in an uncommitted transaction is gone after channel close")
    eq((body, method.redelivered), (b"held", True), "(body, redelivered) after the uncommitted ack")
    publisher.basic_reject(method.delivery_tag, requeue=True)

    step("get and ack inside a transaction, tx.commit, close the channel")
    channel = connection.channel()
    channel.tx_select()
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    check(method is not None, "the message is not in the queue")
    channel.basic_ack(method.delivery_tag)
    channel.tx_commit()
    channel.close()
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

    step("stage one ack and four publishes (four queues) in a transaction")
    channel = connection.channel()
    channel.tx_select()
    method, _, body = channel.basic_get(source, auto_ack=False)
    check(method is not None and body == b"to-ack", f"basic.get on the source gave {body!r}")
    channel.basic_ack(method.delivery_tag)
    for queue in targets:
        channel.basic_publish("", queue, b"committed")
    channel.queue_declare(source, passive=True)
    eq(counts(), [0, 0, 0, 0], "ready messages in the targets before tx.commit")
    step("tx.commit: every publish and the ack take effect")
    channel.tx_commit()
    eq(counts(), [1, 1, 1, 1], "ready messages in the targets after tx.commit")
    channel.close()
    got = get_all(observer, source, 1, auto_ack=False)
    eq((got[0][2], got[0][0].message_count), (b"stays", 0), "(body, left) in the source: the acked one is gone")
    observer.basic_reject(got[0][0].delivery_tag, requeue=True)

    step("stage an ack and four publishes again; tx.rollback: none takes effect")
    channel = connection.channel()
    channel.tx_select()
    method, _, body = channel.basic_get(source, auto_ack=False)
    check(method is not None and body == b"stays", f"basic.get on the source gave {body!r}")
    channel.basic_ack(method.delivery_tag)
    for queue in targets:
        channel.basic_publish("", queue, b"rolled back")
    channel.queue_declare(source, passive=True)
    channel.tx_rollback()
    eq(counts(), [1, 1, 1, 1], "ready messages in the targets after tx.rollback")
    channel.close()
    got = get_all(observer, source, 1)
    eq((got[0][2], got[0][0].redelivered), (b"stays", True), "the source message whose ack was rolled back")
    bodies = [get_all(observer, queue, 1)[0][2] for queue in targets]
    eq(bodies, [b"committed"] * 4, "the targets' messages")
    connection.close()


def tx_reject_takes_effect_at_commit(args):
    """RabbitMQ buffers basic.reject and basic.nack in a transaction like basic.ack (its
    channel's uncommitted_nacks): a requeue happens at tx.commit, not before."""
    connection = connect(args)
    observer = confirmed_channel(connection)
    queue = observer.queue_declare("txreject").method.queue
    publish_all(observer, queue, [b"held"])
    channel = connection.channel()
    channel.tx_select()
    method, _, _ = channel.basic_get(queue, auto_ack=False)
    check(method is not None, "the message is not in the queue")
    step("basic.reject with requeue inside the transaction")
    channel.basic_reject(method.delivery_tag, requeue=True)
    channel.queue_declare(queue, passive=True)
    eq(ready_count(observer, queue), 0, "ready messages before tx.commit (the reject was applied at once)")
    step("tx.commit: the message is requeued")
    channel.tx_commit()
    got = get_all(observer, queue, 1)
    eq((got[0][2], got[0][0].redelivered), (b"held", True), "(body, redelivered) after the committed reject")
    connection.close()


def tx_commit_on_non_transactional_channel_406(args):
    connection = connect(args)
    channel = connection.channel()
    step("tx.commit without tx.select")
    expect_channel_error(
        connection, channel, channel.tx_commit, 406, "PRECONDITION_FAILED - channel is not transactional"
    )
    channel = connection.channel()
    step("tx.rollback without tx.select")
    expect_channel_error(
        connection, channel, channel.tx_rollback, 406, "PRECONDITION_FAILED - channel is not transactional"
    )
    connection.close()


def confirm_select_on_tx_channel_406(args):
    connection = connect(args)
    channel = connection.channel()
    channel.tx_select()
    step("confirm.select on a transactional channel")
    expect_channel_error(
        connection,
        channel,
        channel.confirm_delivery,
        406,
        "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
    )
    connection.close()


def tx_select_on_confirm_channel_406(args):
    connection = connect(args)
    channel = connection.channel()
    channel.confirm_delivery()
    step("tx.select on a channel in confirm mode")
    expect_channel_error(
        connection,
        channel,
        channel.tx_select,
        406,
        "PRECONDITION_FAILED - cannot switch from confirm to tx mode",
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
    check(checker is not None, "pika runs no heartbeat checker")
    step("idle for three heartbeat intervals")
    connection.sleep(6)
    check(connection.is_open, "the idle connection was closed")
    received = checker._heartbeat_frames_received
    # At 2 s the broker sends one at least every 2 s (RabbitMQ: every 1 s); at its default 60 s, none.
    check(received >= 2, f"the broker sent {received} heartbeat frames in 6 s idle at heartbeat=2")
    step("the connection still works after idling")
    check_connection_usable(connection)
    connection.close()


def missed_heartbeats_close_connection(args):
    connection = connect(args, heartbeat=2)
    checker = connection._impl._heartbeat_checker
    check(checker is not None, "pika runs no heartbeat checker")
    # The client falls silent: pika's heartbeat timer still runs, but sends nothing.
    checker._send_heartbeat_frame = lambda: None
    started = time.monotonic()
    step("silent for up to 8 s at heartbeat=2")
    try:
        connection.sleep(8)
    except pika.exceptions.AMQPConnectionError as error:
        elapsed = time.monotonic() - started
        check(
            isinstance(error, (pika.exceptions.StreamLostError, pika.exceptions.ConnectionClosedByBroker)),
            f"the connection ended with {error!r}, not by the broker",
        )
        # Two silent intervals (4 s) at the earliest, as RabbitMQ; not at once for another reason.
        check(elapsed >= 3.5, f"the broker closed the silent connection after only {elapsed:.1f} s")
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
    check(connection.is_closed, "the connection is not closed after close-ok")
    step("a new connection works")
    again = connect(args)
    check_connection_usable(again)
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
    "confirm-after-tx-406": confirm_select_on_tx_channel_406,
    "tx-after-confirm-406": tx_select_on_confirm_channel_406,
    "wrong-password-403": wrong_password_403,
    "missing-vhost-530": missing_vhost_530,
    "heartbeat": heartbeat_keeps_idle_connection_open,
    "missed-heartbeats": missed_heartbeats_close_connection,
    "client-close": client_close_gets_close_ok,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(SCENARIO_TIMEOUT_SECS)
    try:
        SCENARIOS[args.scenario](args)
    except Mismatch as error:
        print(f"FAILED pika {args.scenario}: {error}", file=sys.stderr)
        return 1
    print(f"passed pika {args.scenario}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
