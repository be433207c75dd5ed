"""Helpers shared by the pika scenario scripts (pika_check.py, pika_basic_check.py, pika_features_check.py).

Each script imports what it needs (`from pika_common import ...`; a script's own directory is on
`sys.path` when it is run as `python conformance/amqp/<script>.py`) and ends with `run_scenarios`,
which parses the command line, starts the watchdog and runs the scenario named there.

Every wait here is bounded: client calls by the connection's timeouts and the watchdog, message
waits by deadlines; a "does not arrive" check (`expect_empty`, `settle`) waits a bounded time and
is only called after a positive control showed that delivery works.
"""

import argparse
import os
import signal
import sys
import time
import traceback

import pika
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError

# Socket timeout of every connection, and how long a publisher may stay blocked.
SOCKET_TIMEOUT_SECS = 5
# The whole handshake of a connection.
STACK_TIMEOUT_SECS = 10
# Longest wait for something that must happen (a message arriving, a queue going away).
WAIT_SECS = 5.0
# How long "nothing more arrives" is watched, always after a positive control showed delivery works.
SETTLE_SECS = 0.5
# Pause between two polls (basic.get, passive declare, process_data_events).
POLL_SECS = 0.05

USER = "guest"
PASSWORD = "guest"

# What the scenario does now (set by `step`), named by failures and the watchdog.
_step = None


class Mismatch(AssertionError):
    """The broker did something other than what the scenario expects."""


def step(name):
    """Name what the scenario does now, for failure messages and the watchdog's."""
    global _step
    _step = name


def fail(message):
    raise Mismatch(message if _step is None else f"{message} (at: {_step})")


def expect(condition, message):
    if not condition:
        fail(message)


# ----- connections and channels ------------------------------------------------------------------


def params(args, **overrides):
    """The connection parameters of every scenario connection to `args.port`, with `overrides`."""
    settings = dict(
        host="127.0.0.1",
        port=args.port,
        credentials=pika.PlainCredentials(USER, PASSWORD),
        connection_attempts=1,
        socket_timeout=SOCKET_TIMEOUT_SECS,
        stack_timeout=STACK_TIMEOUT_SECS,
        blocked_connection_timeout=SOCKET_TIMEOUT_SECS,
    )
    settings.update(overrides)
    return pika.ConnectionParameters(**settings)


def connect(args, **overrides):
    return pika.BlockingConnection(params(args, **overrides))


def confirmed_channel(connection):
    """A channel in confirm mode: each publish returns once the broker acked it, and raises
    NackError on a nack and UnroutableError on a return."""
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def publish(channel, exchange, routing_key, body, mandatory=False, **properties):
    """basic.publish of `body` (str or bytes) with the basic properties `properties`."""
    channel.basic_publish(
        exchange=exchange,
        routing_key=routing_key,
        body=body.encode() if isinstance(body, str) else body,
        properties=pika.BasicProperties(**properties),
        mandatory=mandatory,
    )


def expect_nacked(publish_action, what):
    """`publish_action()`, a publish on a channel in confirm mode, is refused with basic.nack."""
    try:
        publish_action()
    except NackError:
        return
    fail(f"{what} was confirmed with basic.ack, expected basic.nack")


def expect_returned(publish_action, what):
    """`publish_action()`, a mandatory publish on a channel in confirm mode, is returned; gives the
    returned messages (pika's ReturnedMessage: method, properties, body)."""
    try:
        publish_action()
    except UnroutableError as error:
        return error.messages
    fail(f"{what} was not returned")


def ready_count(channel, queue):
    """Ready messages in `queue` (queue.declare-ok's message_count)."""
    return channel.queue_declare(queue=queue, passive=True).method.message_count


def _passive_declare_succeeds(connection, what, name, declare):
    """Whether `declare(channel)`, a passive declare of `what` `name` on a channel of its own,
    succeeds; a 404 (which closes that channel) means no."""
    channel = connection.channel()
    try:
        declare(channel)
    except ChannelClosedByBroker as error:
        expect(error.reply_code == 404, f"passive declare of {what} {name!r}: {error.reply_code} {error.reply_text!r}")
        return False
    channel.close()
    return True


def queue_exists(connection, queue):
    return _passive_declare_succeeds(connection, "queue", queue, lambda c: c.queue_declare(queue=queue, passive=True))


def exchange_exists(connection, exchange):
    return _passive_declare_succeeds(
        connection, "exchange", exchange, lambda c: c.exchange_declare(exchange=exchange, passive=True)
    )


# ----- waiting -----------------------------------------------------------------------------------


def _wait(condition, what, timeout, pause):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            fail(f"{what() if callable(what) else what} did not happen within {timeout} s")
        pause()


def poll(condition, what, timeout=WAIT_SECS, interval=POLL_SECS):
    """Check `condition()` every `interval` until it holds; fail naming `what` (a str, or a function
    giving one) after `timeout`."""
    _wait(condition, what, timeout, lambda: time.sleep(interval))


def pump(connection, done, what, timeout=WAIT_SECS):
    """Process the connection's events (consumer and return callbacks) until `done()`; fail naming
    `what` (a str, or a function giving one) after `timeout`."""
    _wait(done, what, timeout, lambda: connection.process_data_events(time_limit=POLL_SECS))


def settle(connection, seconds=SETTLE_SECS):
    """Process the connection's events for `seconds`: what should not arrive gets its chance to
    (after a positive control)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection.process_data_events(time_limit=POLL_SECS)


# ----- taking messages ---------------------------------------------------------------------------


def take(channel, queue, count, timeout=WAIT_SECS, auto_ack=True):
    """The next `count` messages of `queue` as (method, properties, body), by basic.get, waiting at
    most `timeout` for them (0: they must be there now)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        method, properties, body = channel.basic_get(queue, auto_ack=auto_ack)
        if method is None:
            expect(
                time.monotonic() < deadline,
                f"queue {queue!r}: expected {count} messages within {timeout} s, got {[m[2] for m in got]}",
            )
            time.sleep(POLL_SECS)
            continue
        got.append((method, properties, body))
    return got


def take_unacked(channel, queue, timeout=WAIT_SECS):
    """The next message of `queue` by basic.get without auto-ack, waiting at most `timeout`."""
    return take(channel, queue, 1, timeout=timeout, auto_ack=False)[0]


def expect_empty(channel, queue, why="nothing more", seconds=SETTLE_SECS):
    """Nothing (more) arrives in `queue` within `seconds`. Only called after a positive control."""
    time.sleep(seconds)
    method, _, body = channel.basic_get(queue, auto_ack=True)
    expect(method is None, f"queue {queue!r}: expected {why}, got {body!r}")


def expect_bodies(channel, queue, expected):
    """`queue` holds exactly the messages `expected` (bodies as str), in that order, and no more;
    returns them as (method, properties, body)."""
    got = take(channel, queue, len(expected))
    bodies = [body.decode() for _, _, body in got]
    expect(bodies == expected, f"queue {queue!r}: expected {expected}, got {bodies}")
    expect_empty(channel, queue, f"only {expected}")
    return got


# ----- channel errors ----------------------------------------------------------------------------


def expect_usable(connection):
    """A channel error closes only its channel: the connection is open, and a new channel declares
    a queue and routes a message through it."""
    before = _step
    step("check the connection is still usable")
    expect(connection.is_open, "a channel error closed the whole connection")
    channel = connection.channel()
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.basic_publish(exchange="", routing_key=queue, body=b"still usable")
    _, _, body = take(channel, queue, 1)[0]
    expect(body == b"still usable", f"the check message came back as {body!r}")
    channel.queue_delete(queue)
    channel.close()
    step(before)


def expect_channel_error(connection, code, text, action, prefix=False, contains=None, channel=None):
    """`action(channel)` (on `channel`, or on a new channel) makes the broker close that channel
    with `code` and a reply text equal to `text` (or starting with it when `prefix`), which contains
    `contains` if given; the connection stays usable."""
    channel = channel or connection.channel()
    try:
        action(channel)
        # A publish is not answered: a synchronous method afterwards receives the close (the broker
        # answers in order, so a close caused by `action` comes before this method's ok).
        channel.basic_qos(prefetch_count=0)
    except ChannelClosedByBroker as error:
        got = (error.reply_code, error.reply_text)
        matches = error.reply_text.startswith(text) if prefix else error.reply_text == text
        expect(
            error.reply_code == code and matches,
            f"expected channel close {code} {text!r}{' (prefix)' if prefix else ''}, got {got}",
        )
        expect(contains is None or contains in error.reply_text, f"expected a text naming {contains!r}, got {got}")
    else:
        fail(f"expected channel close {code} {text!r}, the broker accepted it")
    expect(channel.is_closed, "the channel is not closed after channel.close")
    expect_usable(connection)


# ----- running a scenario ------------------------------------------------------------------------


def _watchdog(timeout_secs):
    def on_alarm(_signum, frame):
        # A blocking pika call may swallow an exception or not return: exit from here, whatever it
        # is doing, naming the step and the line it was at.
        at = _step or "see the stack below"
        sys.stderr.write(f"FAILED: the scenario did not finish within {timeout_secs} s (at: {at})\n")
        traceback.print_stack(frame, file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)

    return on_alarm


def run_scenarios(description, scenarios, timeout_secs, add_arguments=None):
    """Parse `scenario --port N` (and what `add_arguments(parser)` adds), bound the whole run by
    `timeout_secs` and run the scenario; returns the exit code (0: passed)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(scenarios))
    parser.add_argument("--port", type=int, required=True)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    # Every client call is bounded by the connection's timeouts; this bounds the whole scenario.
    signal.signal(signal.SIGALRM, _watchdog(timeout_secs))
    signal.alarm(timeout_secs)
    try:
        scenarios[args.scenario](args)
    except Mismatch as error:
        traceback.print_exc()
        print(f"FAILED pika {args.scenario}: {error}", file=sys.stderr)
        return 1
    print(f"passed pika {args.scenario}")
    return 0
