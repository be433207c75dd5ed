"""Wharf's native gRPC API from Python, with stubs generated from the contract: every RPC once.

Generates the stubs of protocols/native/proto/wharf/v1/wharf.proto with grpcio-tools into a
temporary directory, then, against a running broker: declares, binds, lists, purges and deletes
exchanges and queues; publishes with an idempotency key (twice: the second gets the duplicate
verdict) and in a batch; asks whether a key was committed; consumes with credit and
acknowledges; commits a consume-transform-produce transaction; prepares, commits and aborts
transactions; answers a check-back question; and reads the broker's error code from a failed
call's google.rpc.ErrorInfo detail. Exits 0 only when every answer is as documented in
docs/native-api.md, whose examples are taken from this file.

    python -m pip install grpcio grpcio-tools grpcio-status
    python examples/native-python/example.py --port 7654
"""

import argparse
import os
import queue
import sys
import tempfile
import uuid

import grpc
from grpc_status import rpc_status
from grpc_tools import protoc
from google.rpc import error_details_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "protocols", "native", "proto")
TIMEOUT_SECS = 10


def generate_stubs():
    """Compile the .proto into a temporary package directory and import it."""
    out = tempfile.mkdtemp(prefix="wharf-stubs-")
    status = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(PROTO_DIR, "wharf", "v1", "wharf.proto"),
    ])
    if status != 0:
        sys.exit(f"grpc_tools.protoc failed with {status}")
    sys.path.insert(0, out)
    from wharf.v1 import wharf_pb2, wharf_pb2_grpc  # noqa: E402 (generated just now)
    return wharf_pb2, wharf_pb2_grpc


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


class Stream:
    """A request iterator fed from a queue: the client side of a bidirectional stream."""

    def __init__(self):
        self.requests = queue.Queue()

    def send(self, request):
        self.requests.put(request)

    def close(self):
        self.requests.put(None)

    def __iter__(self):
        while True:
            request = self.requests.get()
            if request is None:
                return
            yield request


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7654)
    args = parser.parse_args()
    pb, pb_grpc = generate_stubs()
    channel = grpc.insecure_channel(f"{args.host}:{args.port}")
    wharf = pb_grpc.WharfStub(channel)
    run = uuid.uuid4().hex[:8]
    orders, ledger = f"py-orders-{run}", f"py-ledger-{run}"

    for name in (orders, ledger):
        wharf.DeclareQueue(pb.DeclareQueueRequest(name=name, durable=True), timeout=TIMEOUT_SECS)
    declared = wharf.DeclareQueue(pb.DeclareQueueRequest(name=orders, passive=True), timeout=TIMEOUT_SECS)
    check(declared.name == orders and declared.message_count == 0, "declare and passive declare")

    order = pb.Message(
        routing_key=orders,
        payload=b'{"order": 1, "amount": 250}',
        idempotency_key=f"order-1-{run}",
        properties=pb.Properties(content_type="application/json"),
        headers=[pb.Header(name="attempt", value=pb.Value(int32=1))],
    )
    first = wharf.Publish(pb.PublishRequest(message=order), timeout=TIMEOUT_SECS)
    check(len(first.positions) == 1 and not first.duplicate, "publish stores the message")
    again = wharf.Publish(pb.PublishRequest(message=order), timeout=TIMEOUT_SECS)
    check(again.duplicate and list(again.duplicates) == list(first.positions), "a repeated key is a duplicate")
    known = wharf.QueryKey(pb.QueryKeyRequest(queue=orders, key=f"order-1-{run}"), timeout=TIMEOUT_SECS)
    check(known.committed and known.position == first.positions[0], "the key is committed where it was stored")

    stream = Stream()
    stream.send(pb.ConsumeRequest(subscribe=pb.Subscribe(queue=orders, credit=1)))
    events = wharf.Consume(iter(stream), timeout=TIMEOUT_SECS * 3)
    subscribed = next(events)
    check(subscribed.HasField("subscribed"), "subscribed")
    delivery = next(events).delivery
    check(delivery.message.payload == order.payload, "the order is delivered")
    check(delivery.message.headers[0].value.int32 == 1, "typed headers survive")

    # Consume-transform-produce: acknowledge the order and publish its ledger entry atomically.
    txn = wharf.BeginTransaction(pb.BeginTransactionRequest(), timeout=TIMEOUT_SECS).txn_id
    entry = pb.Message(routing_key=ledger, payload=b"debit 250", idempotency_key=f"ledger-1-{run}")
    wharf.Stage(
        pb.StageRequest(
            txn_id=txn,
            publishes=[pb.StagedPublish(message=entry)],
            acks=[pb.StagedAck(consumer_id=subscribed.subscribed.consumer_id, positions=[delivery.position])],
        ),
        timeout=TIMEOUT_SECS,
    )
    committed = wharf.Commit(pb.CommitRequest(txn_id=txn), timeout=TIMEOUT_SECS)
    check(len(committed.published) == 1 and len(committed.published[0].positions) == 1, "transaction committed")
    # The order was acknowledged by the transaction: settling it again finds nothing held.
    stream.send(pb.ConsumeRequest(settle=pb.Settle(positions=[delivery.position], outcome=pb.OUTCOME_ACK, request_id=7)))
    settled = next(events).settled
    check(settled.request_id == 7 and list(settled.unknown) == [delivery.position], "acknowledged by the transaction")
    stream.close()

    queues = {q.name: q for q in wharf.ListQueues(pb.ListQueuesRequest(), timeout=TIMEOUT_SECS).queues}
    check(queues[orders].message_count == 0 and queues[ledger].message_count == 1, "queue counts after the transaction")

    batch(pb, wharf, ledger, run)
    two_phase(pb, wharf, ledger, run)
    catalogue(pb, wharf, run)

    try:
        wharf.Publish(pb.PublishRequest(message=pb.Message(exchange="no-such-exchange")), timeout=TIMEOUT_SECS)
        check(False, "publishing to a missing exchange fails")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.NOT_FOUND, "a missing exchange is NOT_FOUND")
        status = rpc_status.from_call(error)
        info = error_details_pb2.ErrorInfo()
        check(status is not None and status.details[0].Unpack(info), "the status has an ErrorInfo detail")
        check(info.reason == "NOT_FOUND" and info.domain == "wharf", "ErrorInfo names the broker's code")
        check(info.metadata["retryable"] == "false", "and says it is not retryable")
    print("all checks passed")


def batch(pb, wharf, queue_name, run):
    """PublishBatch: one result per message, in order; an error is in-band."""
    reply = wharf.PublishBatch(
        pb.PublishBatchRequest(messages=[
            pb.Message(routing_key=queue_name, payload=b"batch 1", idempotency_key=f"batch-1-{run}"),
            pb.Message(exchange="no-such-exchange", payload=b"lost"),
            pb.Message(routing_key=queue_name, payload=b"batch 1 again", idempotency_key=f"batch-1-{run}"),
        ]),
        timeout=TIMEOUT_SECS,
    )
    results = reply.results
    check(len(results) == 3 and results[0].HasField("published"), "a batch answers each message")
    check(results[1].error.code == "NOT_FOUND" and not results[1].error.retryable, "an in-band error")
    check(results[2].published.duplicate, "a repeated key within a batch is a duplicate")


def two_phase(pb, wharf, queue_name, run):
    """Prepare then Commit; Prepare then Abort; a half message decided by a check-back answer."""
    txn = wharf.BeginTransaction(pb.BeginTransactionRequest(), timeout=TIMEOUT_SECS).txn_id
    wharf.Stage(pb.StageRequest(txn_id=txn, publishes=[pb.StagedPublish(
        message=pb.Message(routing_key=queue_name, payload=b"prepared"))]), timeout=TIMEOUT_SECS)
    prepared = wharf.Prepare(pb.PrepareRequest(txn_id=txn), timeout=TIMEOUT_SECS)
    check(prepared.decision_timeout_ms > 0, "prepared, with the time the broker waits for the decision")
    check(len(wharf.Commit(pb.CommitRequest(txn_id=txn), timeout=TIMEOUT_SECS).published) == 1, "committed")

    txn = wharf.BeginTransaction(pb.BeginTransactionRequest(), timeout=TIMEOUT_SECS).txn_id
    wharf.Stage(pb.StageRequest(txn_id=txn, publishes=[pb.StagedPublish(
        message=pb.Message(routing_key=queue_name, payload=b"never"))]), timeout=TIMEOUT_SECS)
    wharf.Prepare(pb.PrepareRequest(txn_id=txn), timeout=TIMEOUT_SECS)
    wharf.Abort(pb.AbortRequest(txn_id=txn), timeout=TIMEOUT_SECS)
    try:
        wharf.Commit(pb.CommitRequest(txn_id=txn), timeout=TIMEOUT_SECS)
        check(False, "an aborted transaction cannot be committed")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.NOT_FOUND, "an aborted transaction is gone")

    # A half message: prepared for the group "shop"; its producer answers when asked.
    group = f"shop-{run}"
    answers = Stream()
    answers.send(pb.CheckBackRequest(register=pb.Register(group=group)))
    questions = wharf.CheckBack(iter(answers), timeout=TIMEOUT_SECS * 6)
    txn = wharf.BeginTransaction(pb.BeginTransactionRequest(check_back_group=group), timeout=TIMEOUT_SECS).txn_id
    wharf.Stage(pb.StageRequest(txn_id=txn, publishes=[pb.StagedPublish(
        message=pb.Message(routing_key=queue_name, payload=b"half"))]), timeout=TIMEOUT_SECS)
    wharf.Prepare(pb.PrepareRequest(txn_id=txn), timeout=TIMEOUT_SECS)
    question = next(questions)  # asked every limits.half_message_check_interval_ms
    check(question.txn_id == txn and question.message.payload == b"half", "the broker checks back")
    answers.send(pb.CheckBackRequest(answer=pb.CheckBackAnswer(
        question_id=question.question_id, decision=pb.DECISION_COMMIT)))
    answers.close()


def catalogue(pb, wharf, run):
    """Exchanges, queues and bindings: declare, bind, list, unbind, purge, delete."""
    exchange, audit = f"py-events-{run}", f"py-audit-{run}"
    wharf.DeclareExchange(pb.DeclareExchangeRequest(name=exchange, type="topic", durable=True), timeout=TIMEOUT_SECS)
    wharf.DeclareQueue(pb.DeclareQueueRequest(name=audit, durable=True, arguments=[
        pb.Header(name="x-max-length", value=pb.Value(int32=1000))]), timeout=TIMEOUT_SECS)
    binding = pb.BindRequest(source=exchange, queue=audit, routing_key="order.*")
    wharf.Bind(binding, timeout=TIMEOUT_SECS)
    routed = wharf.Publish(pb.PublishRequest(message=pb.Message(
        exchange=exchange, routing_key="order.paid", payload=b"x")), timeout=TIMEOUT_SECS)
    check(routed.routed == 1, "routed through the binding")
    exchanges = [e.name for e in wharf.ListExchanges(pb.ListExchangesRequest(), timeout=TIMEOUT_SECS).exchanges]
    check(exchange in exchanges, "the exchange is listed")
    bindings = wharf.ListBindings(pb.ListBindingsRequest(), timeout=TIMEOUT_SECS).bindings
    check(any(b.source == exchange and b.queue == audit for b in bindings), "the binding is listed")
    wharf.Unbind(binding, timeout=TIMEOUT_SECS)
    purged = wharf.PurgeQueue(pb.PurgeQueueRequest(name=audit), timeout=TIMEOUT_SECS)
    check(purged.message_count == 1, "purged")
    deleted = wharf.DeleteQueue(pb.DeleteQueueRequest(name=audit, if_empty=True), timeout=TIMEOUT_SECS)
    check(deleted.message_count == 0, "deleted")
    wharf.DeleteExchange(pb.DeleteExchangeRequest(name=exchange), timeout=TIMEOUT_SECS)


if __name__ == "__main__":
    main()
