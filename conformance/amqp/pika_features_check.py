"""pika scenarios for Wharf's newest AMQP features (see conformance/amqp/pika_features.rs, which runs
one per test against a broker of its own):

    python pika_features_check.py <scenario> --port 5672 [--idempotency-key message-id]

- idempotency keys (`x-idempotency-key` header or `message-id`, by the broker's
  `amqp.idempotency_key` setting, passed here as --idempotency-key so the scenario knows what to
  expect), scoped to the destination queue;
- partition keys (`x-partition-key`) on a queue with `x-partitions`;
- delayed-message exchanges (the API of RabbitMQ's rabbitmq-delayed-message-exchange plugin:
  type `x-delayed-message`, argument `x-delayed-type`, header `x-delay`), across a restart too;
- global basic.qos, alone, with per-consumer qos, raised, lowered and lifted while consumers run,
  and what a full window does to the messages it holds back;
- basic.cancel leaving the consumer's unacked deliveries on the channel, and losing nothing that
  was in flight to the consumer or published after cancel-ok;
- mandatory publishes in a transaction returned at tx.commit;
- acks in a rolled-back transaction staying unacked.

Each scenario exits 0 when Wharf behaved as RabbitMQ (and its delayed-message plugin) documents,
or, for what RabbitMQ does not have (idempotency and partition keys), as Wharf documents it
(docs/exactly-once.md, protocols/amqp/src/config.rs); otherwise it fails naming what differed.
Every client call is bounded (socket timeouts, a watchdog alarm); every "does not arrive" check
waits a bounded time, after a positive control showed that delivery works.
"""

import sys
import time

import pika.channel
from pika.exceptions import ChannelClosedByBroker, NackError

from pika_common import (
    POLL_SECS,
    WAIT_SECS,
    confirmed_channel,
    connect,
    exchange_exists,
    expect,
    expect_bodies,
    expect_channel_error,
    expect_empty,
    expect_returned,
    fail,
    poll,
    publish,
    pump,
    ready_count,
    run_scenarios,
    settle,
    take,
    take_unacked,
)

# The whole scenario's bound: the Rust side kills the process later (60 s); this names the cause.
SCENARIO_TIMEOUT_SECS = 30

# The idempotency key sources of `amqp.idempotency_key`.
SOURCES = ["header", "message-id", "header-or-message-id", "none"]


class Received:
    """A consumer callback recording deliveries as (consumer name, method, properties, body)."""

    def __init__(self):
        self.deliveries = []

    def callback(self, name):
        return lambda _channel, method, properties, body: self.deliveries.append((name, method, properties, body))

    def bodies(self, name=None):
        return [body.decode() for who, _, _, body in self.deliveries if name is None or who == name]

    def count(self, name=None):
        return len(self.bodies(name))

    def tags(self, name):
        return [method.delivery_tag for who, method, _, _ in self.deliveries if who == name]


# ----- idempotency keys --------------------------------------------------------------------------


def expected_copies(source, pair):
    """How many copies of a pair of publishes a queue stores under `source`."""
    deduplicated = {
        # The same x-idempotency-key, different message ids.
        "same-header": {"header", "header-or-message-id"},
        # The same message id, no header.
        "same-message-id": {"message-id", "header-or-message-id"},
        # The same message id, different x-idempotency-key headers: the header wins when read.
        "same-id-other-header": {"message-id"},
        # An empty message id is no key.
        "empty-message-id": set(),
    }[pair]
    return 1 if source in deduplicated else 2


def idempotency_by_source(args):
    """Four pairs of publishes (confirms on), each pair to a queue of its own; every publish is
    acked, and a deduplicated pair is stored once (the first), as `amqp.idempotency_key` says."""
    source = args.idempotency_key
    connection = connect(args)
    channel = confirmed_channel(connection)
    pairs = {
        "same-header": [
            {"headers": {"x-idempotency-key": "key-a"}, "message_id": "id-a1"},
            {"headers": {"x-idempotency-key": "key-a"}, "message_id": "id-a2"},
        ],
        "same-message-id": [{"message_id": "id-b"}, {"message_id": "id-b"}],
        "same-id-other-header": [
            {"headers": {"x-idempotency-key": "key-c1"}, "message_id": "id-c"},
            {"headers": {"x-idempotency-key": "key-c2"}, "message_id": "id-c"},
        ],
        "empty-message-id": [{"message_id": ""}, {"message_id": ""}],
    }
    for pair, publishes in pairs.items():
        channel.queue_declare(queue=pair)
        for n, properties in enumerate(publishes):
            try:
                publish(channel, "", pair, f"{pair} {n}", **properties)
            except NackError:
                fail(f"{source}: publish {n} of {pair} was nacked, expected acked (a duplicate is acked)")
    for pair, publishes in pairs.items():
        copies = expected_copies(source, pair)
        got = expect_bodies(channel, pair, [f"{pair} {n}" for n in range(copies)])
        # The message is delivered as published: the key header and message id stay on it.
        for (_, properties, _), published in zip(got, publishes):
            expect(
                properties.message_id == published["message_id"],
                f"{pair}: delivered message id {properties.message_id!r}, published {published['message_id']!r}",
            )
            headers = properties.headers or {}
            for name, value in published.get("headers", {}).items():
                expect(headers.get(name) == value, f"{pair}: delivered headers {headers}, published {name}={value!r}")
    connection.close()


def idempotency_key_outlives_consumption(args):
    """With the default source, a repeat of a consumed and acked message's key is still not stored
    (docs/exactly-once.md: one copy per queue whether or not the original was consumed)."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="orders")
    publish(channel, "", "orders", "original", headers={"x-idempotency-key": "order-42"})
    method, _, body = take_unacked(channel, "orders")
    expect(body == b"original", f"got {body!r}")
    channel.basic_ack(method.delivery_tag)
    publish(channel, "", "orders", "retry", headers={"x-idempotency-key": "order-42"})
    publish(channel, "", "orders", "next", headers={"x-idempotency-key": "order-43"})
    expect_bodies(channel, "orders", ["next"])
    connection.close()


def idempotency_key_per_queue(args):
    """A key is scoped to its destination queue: the same key is stored once in each queue it
    reaches, through one fanout publish or through separate publishes."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("fan", exchange_type="fanout")
    for queue in ["left", "right"]:
        channel.queue_declare(queue=queue)
        channel.queue_bind(queue, "fan")
    publish(channel, "fan", "", "fanned", headers={"x-idempotency-key": "k-fan"})
    publish(channel, "fan", "", "fanned again", headers={"x-idempotency-key": "k-fan"})
    for queue in ["left", "right"]:
        expect_bodies(channel, queue, ["fanned"])
    # One key, two queues through the default exchange: each stores it once.
    publish(channel, "", "left", "to left", headers={"x-idempotency-key": "k-direct"})
    publish(channel, "", "right", "to right", headers={"x-idempotency-key": "k-direct"})
    publish(channel, "", "left", "to left again", headers={"x-idempotency-key": "k-direct"})
    publish(channel, "", "left", "left control", headers={"x-idempotency-key": "k-other"})
    expect_bodies(channel, "left", ["to left", "left control"])
    expect_bodies(channel, "right", ["to right"])
    connection.close()


def idempotency_key_not_a_string(args):
    """An `x-idempotency-key` that is not a string is refused: channel error 406, nothing stored."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="orders")
    for key in [42, True]:
        expect_channel_error(
            connection,
            406,
            "PRECONDITION_FAILED - ",
            lambda c, key=key: publish(c, "", "orders", "bad key", headers={"x-idempotency-key": key}),
            prefix=True,
            contains="x-idempotency-key",
        )
    publish(channel, "", "orders", "good key", headers={"x-idempotency-key": "k"})
    expect_bodies(channel, "orders", ["good key"])
    connection.close()


# ----- partition keys ----------------------------------------------------------------------------


def partition_key_order(args):
    """On a queue of 4 partitions, the messages of one `x-partition-key` keep their publish order
    whatever their routing keys (they share a partition); two keys each keep theirs."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.exchange_declare("events", exchange_type="topic")
    channel.queue_declare(queue="parts", arguments={"x-partitions": 4})
    channel.queue_bind("parts", "events", routing_key="#")
    count = 40
    for n in range(count):
        publish(channel, "events", f"region-{n}.order-{n * 7919 % 101}", f"c7-{n}", headers={"x-partition-key": "c-7"})
    received = Received()
    channel.basic_consume("parts", received.callback("consumer"), auto_ack=True)
    pump(connection, lambda: received.count() >= count, f"delivery of {count} messages")
    settle(connection)
    expected = [f"c7-{n}" for n in range(count)]
    expect(received.bodies() == expected, f"one partition key: received {received.bodies()}, expected {expected}")
    headers = received.deliveries[0][2].headers or {}
    expect(headers.get("x-partition-key") == "c-7", f"the partition key header is not delivered: {headers}")

    # Two keys, interleaved: each key's messages in order (the keys may share a partition or not).
    # Another queue, read by basic.get: the consumer above stays on "parts".
    channel.exchange_declare("events-2", exchange_type="topic")
    channel.queue_declare(queue="parts-2", arguments={"x-partitions": 4})
    channel.queue_bind("parts-2", "events-2", routing_key="#")
    for n in range(count):
        key = "c-7" if n % 2 == 0 else "c-9"
        publish(channel, "events-2", f"area.{n}", f"{key}/{n}", headers={"x-partition-key": key})
    got = [body.decode() for _, _, body in take(channel, "parts-2", count)]
    expect_empty(channel, "parts-2", f"only {count} messages")
    for key in ["c-7", "c-9"]:
        mine = [body for body in got if body.startswith(f"{key}/")]
        expected = [f"{key}/{n}" for n in range(count) if (n % 2 == 0) == (key == "c-7")]
        expect(mine == expected, f"partition key {key}: received {mine}, expected {expected}")
    connection.close()


def partition_key_not_a_string(args):
    """An `x-partition-key` that is not a string is refused: channel error 406, nothing stored."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    channel.queue_declare(queue="parts", arguments={"x-partitions": 4})
    expect_channel_error(
        connection,
        406,
        "PRECONDITION_FAILED - ",
        lambda c: publish(c, "", "parts", "bad key", headers={"x-partition-key": 7}),
        prefix=True,
        contains="x-partition-key",
    )
    publish(channel, "", "parts", "good key", headers={"x-partition-key": "7"})
    expect_bodies(channel, "parts", ["good key"])
    connection.close()


# ----- delayed-message exchanges -----------------------------------------------------------------


def delayed_exchange(channel, name, routing, durable=False):
    channel.exchange_declare(
        name, exchange_type="x-delayed-message", durable=durable, arguments={"x-delayed-type": routing}
    )


def delayed_to_jobs(args):
    """A connection and a channel in confirm mode on it, with the queue `jobs` bound under `jobs` to
    the direct delayed-message exchange `later`."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    delayed_exchange(channel, "later", "direct")
    channel.queue_declare(queue="jobs")
    channel.queue_bind("jobs", "later", routing_key="jobs")
    return connection, channel


def wait_for_delayed(channel, queue, published, delay_ms):
    """Poll `queue` (basic.get without auto-ack) until the message published at `published`
    (monotonic) with `x-delay: delay_ms` arrives: while the delay surely runs it is neither
    consumable nor counted as ready. Returns (method, properties, body, seconds since published)."""
    # The broker's delay starts when it commits the publish, after `published`: any answer that
    # returned less than the delay after `published` was made while the delay ran. 20 ms of slack
    # for the broker's millisecond clock.
    running = delay_ms / 1000 - 0.02
    while True:
        count = ready_count(channel, queue)
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        elapsed = time.monotonic() - published
        if method is not None:
            expect(elapsed >= running, f"the message delayed by {delay_ms} ms was consumable {elapsed:.3f} s in")
            return method, properties, body, elapsed
        expect(count == 0 or elapsed >= running, f"{count} ready messages {elapsed:.3f} s into the delay, expected 0")
        expect(elapsed < delay_ms / 1000 + WAIT_SECS, f"the message delayed by {delay_ms} ms did not arrive")
        time.sleep(POLL_SECS)


def delayed_direct_holds_for_x_delay(args):
    """A message with `x-delay: 1000` is neither counted in its queue nor consumable before 1 s,
    and arrives after; one without `x-delay`, or with a zero or negative one, is delivered at once,
    overtaking it. A consumer, too, gets the delayed message only after its delay."""
    connection, channel = delayed_to_jobs(args)
    published = time.monotonic()
    publish(channel, "later", "jobs", "in 1 s", headers={"x-delay": 1000})
    publish(channel, "later", "jobs", "now")
    publish(channel, "later", "jobs", "negative", headers={"x-delay": -500})
    publish(channel, "later", "jobs", "zero", headers={"x-delay": 0})
    got = take(channel, "jobs", 3)
    elapsed = time.monotonic() - published
    bodies = [body.decode() for _, _, body in got]
    expect(bodies == ["now", "negative", "zero"], f"undelayed messages: got {bodies}, expected now, negative, zero")
    expect(elapsed < 1.0, f"the undelayed messages took {elapsed:.3f} s, as long as the delay: were they delayed?")
    method, _, body, _ = wait_for_delayed(channel, "jobs", published, 1000)
    expect(body == b"in 1 s", f"got {body!r}")
    channel.basic_ack(method.delivery_tag)
    expect_empty(channel, "jobs")

    received = Received()
    channel.basic_consume("jobs", received.callback("consumer"), auto_ack=True)
    published = time.monotonic()
    publish(channel, "later", "jobs", "consumed later", headers={"x-delay": 800})
    pump(connection, lambda: received.count() >= 1, "delivery of the delayed message to a consumer")
    elapsed = time.monotonic() - published
    expect(received.bodies() == ["consumed later"], f"consumer received {received.bodies()}")
    expect(elapsed >= 0.78, f"the message delayed by 800 ms reached the consumer after {elapsed:.3f} s")
    connection.close()


def delayed_header_negated(args):
    """The plugin delivers a delayed message with its `x-delay` header negated (-Delay, a signed
    int), so it is not delayed again by a further delayed exchange and consumers can tell."""
    connection, channel = delayed_to_jobs(args)
    published = time.monotonic()
    publish(channel, "later", "jobs", "delayed", headers={"x-delay": 300, "app": "kept"})
    _, properties, body, _ = wait_for_delayed(channel, "jobs", published, 300)
    expect(body == b"delayed", f"got {body!r}")
    headers = properties.headers or {}
    expect(headers.get("app") == "kept", f"the message's own header was lost: {headers}")
    expect(headers.get("x-delay") == -300, f"delivered with x-delay {headers.get('x-delay')!r}, expected -300")
    connection.close()


def delayed_x_delay_converted(args):
    """The plugin converts an `x-delay` given as a string to an integer delay
    (rabbit_delayed_message_utils:try_convert_to_int): "600" delays the message by 600 ms."""
    connection, channel = delayed_to_jobs(args)
    published = time.monotonic()
    publish(channel, "later", "jobs", "string delay", headers={"x-delay": "600"})
    _, _, body, _ = wait_for_delayed(channel, "jobs", published, 600)
    expect(body == b"string delay", f"got {body!r}")
    connection.close()


def delayed_routing_follows_delayed_type(args):
    """A delayed-message exchange routes as its `x-delayed-type`: direct, topic, fanout, headers."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    delay = {"x-delay": 300}
    cases = {
        "direct": [("d-q", "key", None)],
        "topic": [("t-q", "orders.*", None)],
        "fanout": [("f-q1", "one", None), ("f-q2", "two", None)],
        "headers": [("h-q", "", {"x-match": "all", "kind": "pdf"})],
    }
    for routing, bindings in cases.items():
        delayed_exchange(channel, f"delayed-{routing}", routing)
        for queue, key, arguments in bindings:
            channel.queue_declare(queue=queue)
            channel.queue_bind(queue, f"delayed-{routing}", routing_key=key, arguments=arguments)
    # Non-matching messages first: routing keeps publish order, so if they were routed they
    # would come before the matching ones.
    publish(channel, "delayed-direct", "other", "direct miss", headers=delay)
    publish(channel, "delayed-direct", "key", "direct hit", headers=delay)
    publish(channel, "delayed-topic", "orders.eu.new", "topic miss", headers=delay)
    publish(channel, "delayed-topic", "orders.eu", "topic hit", headers=delay)
    publish(channel, "delayed-fanout", "any key", "fanout hit", headers=delay)
    publish(channel, "delayed-headers", "", "headers miss", headers={**delay, "kind": "txt"})
    publish(channel, "delayed-headers", "", "headers hit", headers={**delay, "kind": "pdf"})
    expect_bodies(channel, "d-q", ["direct hit"])
    expect_bodies(channel, "t-q", ["topic hit"])
    expect_bodies(channel, "f-q1", ["fanout hit"])
    expect_bodies(channel, "f-q2", ["fanout hit"])
    expect_bodies(channel, "h-q", ["headers hit"])
    connection.close()


def delayed_ttl_starts_after_delay(args):
    """A queue's message TTL counts from when the delayed message reaches the queue, after its
    delay (the plugin routes it then): a TTL shorter than the delay does not expire it unseen."""
    connection = connect(args)
    channel = confirmed_channel(connection)
    delayed_exchange(channel, "later", "direct")
    channel.queue_declare(queue="short-lived", arguments={"x-message-ttl": 600})
    channel.queue_bind("short-lived", "later", routing_key="jobs")
    published = time.monotonic()
    publish(channel, "later", "jobs", "queue ttl", headers={"x-delay": 900})
    _, _, body, _ = wait_for_delayed(channel, "short-lived", published, 900)
    expect(body == b"queue ttl", f"got {body!r}")
    published = time.monotonic()
    publish(channel, "later", "jobs", "message ttl", headers={"x-delay": 900}, expiration="400")
    _, _, body, _ = wait_for_delayed(channel, "short-lived", published, 900)
    expect(body == b"message ttl", f"got {body!r}")
    connection.close()


def delayed_type_missing(args):
    """`x-delayed-message` without `x-delayed-type` is refused with the plugin's 406 text, and no
    exchange is created."""
    connection = connect(args)
    text = "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type"
    expect_channel_error(
        connection, 406, text, lambda c: c.exchange_declare("no-type", exchange_type="x-delayed-message")
    )
    expect(not exchange_exists(connection, "no-type"), "the refused exchange exists")
    connection.close()


def delayed_type_self(args):
    """`x-delayed-type: x-delayed-message` is refused with the plugin's own text for it."""
    connection = connect(args)
    text = "PRECONDITION_FAILED - Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'"
    expect_channel_error(connection, 406, text, lambda c: delayed_exchange(c, "self-typed", "x-delayed-message"))
    expect(not exchange_exists(connection, "self-typed"), "the refused exchange exists")
    connection.close()


# The delay of the message published before a restart: long enough to outlast the restart.
RESTART_DELAY_MS = 4000


def delayed_restart_before(args):
    connection = connect(args)
    channel = confirmed_channel(connection)
    delayed_exchange(channel, "durable-later", "direct", durable=True)
    channel.queue_declare(queue="durable-jobs", durable=True)
    channel.queue_bind("durable-jobs", "durable-later", routing_key="jobs")
    # The body carries the wall-clock time of the publish to the scenario after the restart.
    publish(
        channel,
        "durable-later",
        "jobs",
        f"{time.time():.3f}",
        headers={"x-delay": RESTART_DELAY_MS},
        delivery_mode=2,
    )
    publish(channel, "durable-later", "jobs", "undelayed", delivery_mode=2)
    expect_bodies(channel, "durable-jobs", ["undelayed"])
    connection.close()


def delayed_restart_after(args):
    """The delayed message survived the restart and arrives once its delay is over, not before."""
    connection = connect(args)
    channel = connection.channel()
    method, _, body = take_unacked(channel, "durable-jobs", RESTART_DELAY_MS / 1000 + WAIT_SECS)
    arrived = time.time()
    published = float(body.decode())
    waited = arrived - published
    expect(
        waited >= RESTART_DELAY_MS / 1000 - 0.05,
        f"the message delayed by {RESTART_DELAY_MS} ms was consumable {waited:.3f} s after its publish",
    )
    channel.basic_ack(method.delivery_tag)
    expect_empty(channel, "durable-jobs", "the delayed message once")
    connection.close()


def delayed_mandatory(args):
    """Wharf routes a delayed message at publish time, so a mandatory unroutable one is returned at
    once (the plugin cannot do this: it routes after the delay) and a routable one is acked and
    delivered after its delay."""
    connection, channel = delayed_to_jobs(args)
    publish(channel, "later", "jobs", "routable", mandatory=True, headers={"x-delay": 300})
    returned = expect_returned(
        lambda: publish(channel, "later", "nowhere", "unroutable", mandatory=True, headers={"x-delay": 300}),
        "the mandatory unroutable delayed publish",
    )
    expect(len(returned) == 1, f"{len(returned)} messages returned, expected 1")
    expect(returned[0].body == b"unroutable", f"returned {returned[0].body!r}")
    expect(returned[0].method.reply_code == 312, f"returned with {returned[0].method.reply_code}")
    expect_bodies(channel, "jobs", ["routable"])
    connection.close()


# ----- global basic.qos --------------------------------------------------------------------------


def fill_two_queues(publisher, count=10):
    """Queues q1 and q2, each holding `count` messages."""
    for queue in ["q1", "q2"]:
        publisher.queue_declare(queue=queue)
        for n in range(count):
            publish(publisher, "", queue, f"{queue}-{n}")


def expect_delivered(connection, received, total, what):
    pump(connection, lambda: received.count() >= total, f"{what}: {total} deliveries")
    settle(connection)
    expect(received.count() == total, f"{what}: {received.count()} deliveries, expected {total}")


def consume_two_queues(args, global_prefetch, per_consumer_prefetch=None, count=10):
    """q1 and q2 filled with `count` messages each, and a channel with a global prefetch of
    `global_prefetch` (set after a per-consumer `per_consumer_prefetch`, if given) consuming them
    with manual acks, as `one` (q1) and `two` (q2). Returns (connection, publisher, channel,
    received)."""
    connection = connect(args)
    publisher = confirmed_channel(connection)
    fill_two_queues(publisher, count)
    channel = connection.channel()
    if per_consumer_prefetch is not None:
        channel.basic_qos(prefetch_count=per_consumer_prefetch, global_qos=False)
    channel.basic_qos(prefetch_count=global_prefetch, global_qos=True)
    received = Received()
    channel.basic_consume("q1", received.callback("one"))
    channel.basic_consume("q2", received.callback("two"))
    return connection, publisher, channel, received


def global_qos_limits_the_channel(args):
    """prefetch_count=3 global: 3 unacked deliveries across both consumers of the channel; raising
    it to 6 while they run lets 3 more through at once; acks open the window again."""
    connection, _, channel, received = consume_two_queues(args, 3)
    expect_delivered(connection, received, 3, "global prefetch 3")
    channel.basic_qos(prefetch_count=6, global_qos=True)
    expect_delivered(connection, received, 6, "global prefetch raised to 6")
    for name in ["one", "two"]:
        for tag in received.tags(name):
            channel.basic_ack(tag)
    expect_delivered(connection, received, 12, "6 acked under global prefetch 6")
    connection.close()


def global_qos_lowered(args):
    """Lowering the global prefetch below what is unacked sends nothing until acks bring the
    unacked count under the new limit."""
    connection, _, channel, received = consume_two_queues(args, 5)
    expect_delivered(connection, received, 5, "global prefetch 5")
    channel.basic_qos(prefetch_count=2, global_qos=True)
    tags = [method.delivery_tag for _, method, _, _ in received.deliveries]
    # 5 unacked; 2 acked leaves 3, still above 2: nothing more.
    for tag in tags[:2]:
        channel.basic_ack(tag)
    settle(connection)
    expect(received.count() == 5, f"with 3 unacked over a global prefetch of 2, {received.count()} delivered")
    # 2 more acked leaves 1: one more delivery fills the window of 2.
    for tag in tags[2:4]:
        channel.basic_ack(tag)
    expect_delivered(connection, received, 6, "1 unacked under global prefetch 2")
    connection.close()


def global_and_per_consumer_qos(args):
    """RabbitMQ's example: per-consumer 2 and global 3 together: at most 2 per consumer and 3 on
    the channel."""
    connection, _, channel, received = consume_two_queues(args, 3, per_consumer_prefetch=2)
    expect_delivered(connection, received, 3, "per-consumer 2, global 3")
    counts = (received.count("one"), received.count("two"))
    expect(max(counts) <= 2, f"a consumer got more than its prefetch of 2: {counts}")
    connection.close()


def per_consumer_qos_applies_to_later_consumers(args):
    """A per-consumer basic.qos (global false) applies to consumers started afterwards; earlier
    consumers keep theirs."""
    connection = connect(args)
    publisher = confirmed_channel(connection)
    fill_two_queues(publisher)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    received = Received()
    channel.basic_consume("q1", received.callback("one"))
    channel.basic_qos(prefetch_count=3)
    channel.basic_consume("q2", received.callback("two"))
    expect_delivered(connection, received, 4, "prefetch 1 then 3")
    counts = (received.count("one"), received.count("two"))
    expect(counts == (1, 3), f"(first consumer, second consumer) got {counts}, expected (1, 3)")
    # The first consumer's limit is still 1: one ack, one more delivery.
    channel.basic_ack(received.tags("one")[0])
    expect_delivered(connection, received, 5, "one ack by the consumer of prefetch 1")
    counts = (received.count("one"), received.count("two"))
    expect(counts == (2, 3), f"after one ack, got {counts}, expected (2, 3)")
    connection.close()


def global_qos_zero_lifts_the_limit(args):
    """A global prefetch of 0 means no limit: every waiting message is delivered."""
    connection, _, channel, received = consume_two_queues(args, 2)
    expect_delivered(connection, received, 2, "global prefetch 2")
    channel.basic_qos(prefetch_count=0, global_qos=True)
    expect_delivered(connection, received, 20, "global prefetch 0")
    connection.close()


def starved_queue(received):
    """With a global prefetch of 1 and consumers `one` (q1) and `two` (q2), the queue whose
    consumer got nothing."""
    expect(received.count() == 1, f"expected one delivery, got {received.bodies()}")
    return "q2" if received.count("one") == 1 else "q1"


def global_qos_window_leaves_messages_ready(args):
    """While the channel's global window is full, a consumer of another queue gets nothing, and that
    queue's messages stay ready in it: counted by queue.declare-ok, first in line for basic.get on
    another channel (RabbitMQ's queues do not hand a message out while the limiter blocks)."""
    connection, publisher, channel, received = consume_two_queues(args, 1, count=3)
    expect_delivered(connection, received, 1, "global prefetch 1")
    starved = starved_queue(received)
    count = ready_count(publisher, starved)
    method, _, body = publisher.basic_get(starved, auto_ack=True)
    got = body.decode() if method is not None else None
    expect(
        (count, got) == (3, f"{starved}-0"),
        f"{starved}, whose consumer got nothing, counts {count} ready messages and basic.get on another channel "
        f"got {got!r}; expected 3 and {starved}-0",
    )
    connection.close()


def global_qos_close_requeues_unsent_unredelivered(args):
    """When a channel with a full global window closes, only what was delivered to the client comes
    back redelivered; messages it never sent keep redelivered false."""
    connection, publisher, channel, received = consume_two_queues(args, 1, count=3)
    expect_delivered(connection, received, 1, "global prefetch 1")
    delivered = received.bodies()[0]
    channel.close()
    for queue in ["q1", "q2"]:
        got = expect_bodies(publisher, queue, [f"{queue}-{n}" for n in range(3)])
        for method, _, body in got:
            expected = body.decode() == delivered
            expect(
                method.redelivered == expected,
                f"{body.decode()} came back with redelivered={method.redelivered}; only {delivered} was delivered",
            )
    connection.close()


# ----- basic.cancel ------------------------------------------------------------------------------


def work_queue(connection, count):
    """The queue `work` holding m0, m1, ... (`count` messages); returns the confirm-mode channel
    that published them."""
    publisher = confirmed_channel(connection)
    publisher.queue_declare(queue="work")
    for n in range(count):
        publish(publisher, "", "work", f"m{n}")
    return publisher


def answered(what, round_trip):
    """`round_trip()`, a synchronous method, is answered: `what`, sent before it, did not close the
    channel."""
    try:
        round_trip()
    except ChannelClosedByBroker as error:
        fail(f"{what} closed the channel: {error.reply_code} {error.reply_text!r}")


def expect_acks_kept(publisher, channel):
    """Close `channel`, whose deliveries from `work` were all acked: none comes back (the queue
    still delivers, a positive control)."""
    channel.close()
    publish(publisher, "", "work", "control")
    expect_bodies(publisher, "work", ["control"])


def cancel_keeps_unacked(args):
    """After basic.cancel the consumer's unacked deliveries stay on the channel: not redelivered to
    another consumer, ackable without error; a nack with requeue or the channel's close returns
    them."""
    connection = connect(args)
    publisher = work_queue(connection, 3)
    first = connection.channel()
    received = Received()
    tag = first.basic_consume("work", received.callback("first"))
    pump(connection, lambda: received.count("first") >= 3, "delivery of 3 messages to the first consumer")
    settle(connection)
    expect(received.bodies("first") == ["m0", "m1", "m2"], f"first consumer got {received.bodies('first')}")
    tags = dict(zip(received.bodies("first"), received.tags("first")))
    first.basic_cancel(tag)

    second = connection.channel()
    second.basic_consume("work", received.callback("second"))
    publish(publisher, "", "work", "m3")
    pump(connection, lambda: received.count("second") >= 1, "delivery of a new message to the second consumer")
    settle(connection)
    expect(received.bodies("second") == ["m3"], f"after the cancel the second consumer got {received.bodies('second')}")

    # Acking a delivery of the cancelled consumer is no error.
    first.basic_ack(tags["m0"])
    answered("acking after basic.cancel", lambda: first.basic_qos(prefetch_count=0))
    count = ready_count(publisher, "work")
    expect(count == 0, f"{count} ready messages after the cancel, expected 0 (m1, m2 unacked)")

    first.basic_nack(tags["m1"], requeue=True)
    pump(connection, lambda: received.count("second") >= 2, "redelivery of the nacked message")
    settle(connection)
    got = received.bodies("second")
    expect(got == ["m3", "m1"], f"after the nack the second consumer got {got}")
    expect(received.deliveries[-1][1].redelivered, "the requeued message came back without redelivered")

    first.close()
    pump(connection, lambda: received.count("second") >= 3, "redelivery after the cancelled consumer's channel closed")
    settle(connection)
    expect(
        received.bodies("second") == ["m3", "m1", "m2"],
        f"after the channel closed the second consumer got {received.bodies('second')} (m0 was acked)",
    )
    expect(received.deliveries[-1][1].redelivered, "the requeued message came back without redelivered")
    for delivery_tag in received.tags("second"):
        second.basic_ack(delivery_tag)
    connection.close()


def cancel_then_publish(args):
    """Once basic.cancel-ok is back, the consumer gets nothing more: messages published right
    afterwards stay in the queue (none is handed to the cancelled consumer and lost), for auto-ack
    and manual-ack consumers, of a plain queue and of a queue of 4 partitions."""
    connection = connect(args)
    publisher = confirmed_channel(connection)
    for partitions in [1, 4]:
        for auto_ack in [True, False]:
            queue = f"work-{partitions}-{'auto' if auto_ack else 'manual'}-ack"
            publisher.queue_declare(queue=queue, arguments={"x-partitions": partitions})
            for round_ in range(5):
                channel = connection.channel()
                received = Received()
                tag = channel.basic_consume(queue, received.callback("cancelled"), auto_ack=auto_ack)
                # Positive control: the consumer receives.
                publish(publisher, "", queue, f"control {round_}")
                pump(connection, lambda: received.count() >= 1, "delivery to the consumer")
                if not auto_ack:
                    channel.basic_ack(received.tags("cancelled")[0])
                pending = channel.basic_cancel(tag)
                expect(not pending, f"messages arrived between basic.cancel and cancel-ok: {pending}")
                # At once, on the consumer's own channel; partition keys spread the messages over
                # the partitions.
                for n in range(4):
                    publish(channel, "", queue, f"after cancel {round_}.{n}", headers={"x-partition-key": f"p{n}"})
                what = f"{queue}, round {round_}"
                got = sorted(body.decode() for _, _, body in take(publisher, queue, 4))
                expected = [f"after cancel {round_}.{n}" for n in range(4)]
                expect(got == expected, f"{what}: the queue holds {got}, expected {expected}")
                expect(received.count() == 1, f"{what}: the cancelled consumer got {received.bodies()}")
                channel.close()
    connection.close()


class WireDeliveries:
    """Counts every basic.deliver pika reads off the wire, including those it drops silently: pika
    discards deliveries for a consumer it already cancelled (RabbitMQ may still send some between
    basic.cancel and cancel-ok), and those count as delivered, not lost."""

    def __init__(self):
        self.count = 0
        original = pika.channel.Channel._on_deliver

        def counting(channel, method_frame, header_frame, body):
            self.count += 1
            return original(channel, method_frame, header_frame, body)

        pika.channel.Channel._on_deliver = counting


# Messages waiting when a busy consumer is cancelled: more than the broker has in flight to it.
BACKLOG = 2000


def cancel_with_backlog(args, auto_ack):
    """Cancelling a consumer while a backlog flows to it loses nothing. Auto-ack: every message is
    either delivered (on the wire, before or after cancel-ok) or still in the queue. Manual ack:
    what it did not ack is back in the queue once its channel closes."""
    wire = WireDeliveries()
    connection = connect(args)
    publisher = connection.channel()
    queue = "backlog"
    publisher.queue_declare(queue=queue)
    for n in range(BACKLOG):
        publisher.basic_publish("", queue, f"m{n}".encode())
    poll(lambda: ready_count(publisher, queue) >= BACKLOG, f"all {BACKLOG} messages reaching {queue!r}")
    channel = connection.channel()
    received = Received()
    tag = channel.basic_consume(queue, received.callback("busy"), auto_ack=auto_ack)
    pump(connection, lambda: received.count() >= 100, "delivery of 100 messages")
    pending = channel.basic_cancel(tag)
    settle(connection)
    if auto_ack:
        delivered = wire.count
        what = f"auto-ack: {delivered} delivered on the wire ({len(pending)} after the cancel)"
    else:
        for delivery_tag in received.tags("busy"):
            channel.basic_ack(delivery_tag)
        channel.close()
        delivered = received.count()
        what = f"manual ack: {delivered} delivered and acked"
    # Requeues may take a moment: wait (boundedly) for the count to reach what it must be.
    deadline = time.monotonic() + WAIT_SECS
    while (remaining := ready_count(publisher, queue)) != BACKLOG - delivered and time.monotonic() < deadline:
        time.sleep(POLL_SECS * 2)
    if delivered + remaining != BACKLOG:
        # Say whether the missing messages are gone or held until the connection closes.
        connection.close()
        connection = connect(args)
        after_close = ready_count(connection.channel(), queue)
        fail(
            f"{what}, {remaining} left in the queue: {BACKLOG - delivered - remaining} of {BACKLOG} missing "
            f"({after_close} in the queue once the connection closed)"
        )
    connection.close()


def cancel_then_ack_multiple(args):
    """One ack with `multiple` settles the unacked deliveries of a cancelled consumer and of a later
    consumer on the same channel together: nothing comes back when the channel closes."""
    connection = connect(args)
    publisher = work_queue(connection, 2)
    channel = connection.channel()
    received = Received()
    tag = channel.basic_consume("work", received.callback("first"))
    pump(connection, lambda: received.count() >= 2, "delivery of 2 messages to the first consumer")
    settle(connection)
    channel.basic_cancel(tag)
    channel.basic_consume("work", received.callback("second"))
    publish(publisher, "", "work", "m2")
    pump(connection, lambda: received.count() >= 3, "delivery of a new message to the second consumer")
    settle(connection)
    expect(received.bodies() == ["m0", "m1", "m2"], f"received {received.bodies()}")
    last = received.deliveries[-1][1].delivery_tag
    channel.basic_ack(last, multiple=True)
    answered("ack multiple after basic.cancel", lambda: channel.basic_qos(prefetch_count=0))
    expect_acks_kept(publisher, channel)
    connection.close()


# ----- transactions ------------------------------------------------------------------------------


class Returns:
    def __init__(self, channel):
        self.returned = []
        channel.add_on_return_callback(lambda _c, method, _p, body: self.returned.append((method, body)))

    def bodies(self):
        return [body.decode() for _, body in self.returned]


def tx_mandatory_returned_at_commit(args):
    """In tx mode a mandatory unroutable publish is returned (312 NO_ROUTE) when tx.commit is
    sent, not before; after tx.rollback nothing is returned."""
    connection = connect(args)
    channel = connection.channel()
    returns = Returns(channel)
    channel.queue_declare(queue="orders")
    channel.tx_select()
    publish(channel, "", "nowhere", "unroutable", mandatory=True)
    publish(channel, "", "nowhere", "not mandatory")
    publish(channel, "", "orders", "routable", mandatory=True)
    settle(connection)
    expect(returns.returned == [], f"returned before tx.commit: {returns.bodies()}")
    channel.tx_commit()
    pump(connection, lambda: returns.returned, "the return of the committed mandatory publish")
    settle(connection)
    expect(returns.bodies() == ["unroutable"], f"returned at commit: {returns.bodies()}, expected ['unroutable']")
    method, _ = returns.returned[0]
    got = (method.reply_code, method.reply_text, method.exchange, method.routing_key)
    expect(got == (312, "NO_ROUTE", "", "nowhere"), f"basic.return {got}, expected (312, 'NO_ROUTE', '', 'nowhere')")
    expect_bodies(channel, "orders", ["routable"])

    returns.returned.clear()
    publish(channel, "", "nowhere", "rolled back", mandatory=True)
    channel.tx_rollback()
    settle(connection)
    expect(returns.returned == [], f"returned after tx.rollback: {returns.bodies()}")
    # The next commit returns only its own publish.
    publish(channel, "", "nowhere", "committed later", mandatory=True)
    channel.tx_commit()
    pump(connection, lambda: returns.returned, "the return of the second commit")
    settle(connection)
    expect(returns.bodies() == ["committed later"], f"returned at the second commit: {returns.bodies()}")
    connection.close()


def tx_mandatory_queue_deleted_before_commit(args):
    """A mandatory publish staged while its queue existed, committed after the queue was deleted,
    reaches no queue: it is returned at tx.commit (RabbitMQ delivers a transaction's publishes at
    commit, and returns the mandatory ones no queue took)."""
    connection = connect(args)
    admin = connection.channel()
    admin.queue_declare(queue="doomed")
    admin.queue_declare(queue="kept")
    channel = connection.channel()
    returns = Returns(channel)
    channel.tx_select()
    publish(channel, "", "doomed", "to the deleted queue", mandatory=True)
    publish(channel, "", "kept", "to the kept queue", mandatory=True)
    admin.queue_delete("doomed")
    channel.tx_commit()
    pump(connection, lambda: returns.returned, "the return of the publish whose queue was deleted")
    settle(connection)
    expect(returns.bodies() == ["to the deleted queue"], f"returned at commit: {returns.bodies()}")
    method, _ = returns.returned[0]
    expect(method.reply_code == 312, f"returned with {method.reply_code} {method.reply_text!r}, expected 312")
    expect_bodies(channel, "kept", ["to the kept queue"])
    connection.close()


def tx_acked_twice(connection):
    """A tx channel holding m0 and m1 by basic.get, both acked in a transaction rolled back;
    returns the channel and the delivery tags."""
    publisher = work_queue(connection, 2)
    channel = connection.channel()
    channel.tx_select()
    tags = []
    for n in range(2):
        method, _, body = take_unacked(channel, "work")
        expect(body == f"m{n}".encode(), f"got {body!r}, expected m{n}")
        tags.append(method.delivery_tag)
    for tag in tags:
        channel.basic_ack(tag)
    channel.tx_rollback()
    count = ready_count(publisher, "work")
    expect(count == 0, f"{count} ready messages after the rollback, expected 0 (still unacked)")
    return publisher, channel, tags


def tx_rollback_keeps_acks_unacked(args):
    """Acks of a rolled-back transaction are abandoned: the deliveries are still unacked, so they
    can be acked again and committed (no unknown-tag error), and are then gone for good."""
    connection = connect(args)
    publisher, channel, tags = tx_acked_twice(connection)
    for tag in tags:
        channel.basic_ack(tag)
    answered("acking again after tx.rollback", channel.tx_commit)
    expect_acks_kept(publisher, channel)
    connection.close()


def tx_rollback_then_close_requeues(args):
    """Deliveries whose acks were rolled back are requeued when the channel closes, redelivered."""
    connection = connect(args)
    publisher, channel, _ = tx_acked_twice(connection)
    channel.close()
    got = expect_bodies(publisher, "work", ["m0", "m1"])
    for method, _, body in got:
        expect(method.redelivered, f"{body!r} came back without redelivered")
    connection.close()


SCENARIOS = {
    # Idempotency keys.
    "idempotency-by-source": idempotency_by_source,
    "idempotency-key-outlives-consumption": idempotency_key_outlives_consumption,
    "idempotency-key-per-queue": idempotency_key_per_queue,
    "idempotency-key-not-a-string": idempotency_key_not_a_string,
    # Partition keys.
    "partition-key-order": partition_key_order,
    "partition-key-not-a-string": partition_key_not_a_string,
    # Delayed-message exchanges.
    "delayed-direct-holds-for-x-delay": delayed_direct_holds_for_x_delay,
    "delayed-routing-follows-delayed-type": delayed_routing_follows_delayed_type,
    "delayed-header-negated": delayed_header_negated,
    "delayed-x-delay-converted": delayed_x_delay_converted,
    "delayed-ttl-starts-after-delay": delayed_ttl_starts_after_delay,
    "delayed-type-missing": delayed_type_missing,
    "delayed-type-self": delayed_type_self,
    "delayed-restart-before": delayed_restart_before,
    "delayed-restart-after": delayed_restart_after,
    "delayed-mandatory": delayed_mandatory,
    # Global basic.qos.
    "global-qos-limits-the-channel": global_qos_limits_the_channel,
    "global-qos-lowered": global_qos_lowered,
    "global-qos-zero-lifts-the-limit": global_qos_zero_lifts_the_limit,
    "global-qos-window-leaves-messages-ready": global_qos_window_leaves_messages_ready,
    "global-qos-close-requeues-unsent-unredelivered": global_qos_close_requeues_unsent_unredelivered,
    "global-and-per-consumer-qos": global_and_per_consumer_qos,
    "per-consumer-qos-applies-to-later-consumers": per_consumer_qos_applies_to_later_consumers,
    # basic.cancel.
    "cancel-keeps-unacked": cancel_keeps_unacked,
    "cancel-then-ack-multiple": cancel_then_ack_multiple,
    "cancel-then-publish": cancel_then_publish,
    "cancel-auto-ack-with-backlog": lambda args: cancel_with_backlog(args, auto_ack=True),
    "cancel-manual-ack-with-backlog": lambda args: cancel_with_backlog(args, auto_ack=False),
    # Transactions.
    "tx-mandatory-returned-at-commit": tx_mandatory_returned_at_commit,
    "tx-mandatory-queue-deleted-before-commit": tx_mandatory_queue_deleted_before_commit,
    "tx-rollback-keeps-acks-unacked": tx_rollback_keeps_acks_unacked,
    "tx-rollback-then-close-requeues": tx_rollback_then_close_requeues,
}


def add_arguments(parser):
    parser.add_argument(
        "--idempotency-key",
        choices=SOURCES,
        default="header",
        help="the broker's amqp.idempotency_key setting (what idempotency-by-source expects)",
    )


if __name__ == "__main__":
    sys.exit(run_scenarios(__doc__, SCENARIOS, SCENARIO_TIMEOUT_SECS, add_arguments))
