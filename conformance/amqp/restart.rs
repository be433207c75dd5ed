//! Durability of AMQP work across a crash, with lapin as the client: the broker is killed with
//! SIGKILL ([`Broker::kill`]: nothing flushed, no connection closed) and started again on the same
//! data directory ([`Broker::restart`]). Confirmed persistent messages in a durable queue all
//! survive; deliveries unacknowledged at the kill come back with `redelivered` set; a committed
//! transaction is entirely there and one whose commit was never sent is not there at all.

use std::future::Future;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::harness::Broker;

/// Longest wait for any one client call (and for the AMQP port to accept after a restart).
const PATIENCE: Duration = Duration::from_secs(10);

/// delivery-mode 2: persistent.
const PERSISTENT: u8 = 2;

/// A runtime for lapin; the harness's blocking calls (start, kill, restart) run outside it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// `call` within [`PATIENCE`], or the test fails naming `what`.
async fn within<T>(what: &str, call: impl Future<Output = lapin::Result<T>>) -> T {
    match tokio::time::timeout(PATIENCE, call).await {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => panic!("{what} failed: {error}"),
        Err(_) => panic!("{what} did not finish within {PATIENCE:?}"),
    }
}

/// A connection to `/` as guest, retried while the broker's AMQP listener is not yet accepting.
async fn connect(broker: &Broker) -> Connection {
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", broker.amqp_port());
    let deadline = Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout(PATIENCE, Connection::connect(&uri, ConnectionProperties::default())).await {
            Ok(Ok(connection)) => return connection,
            Ok(Err(_)) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(Err(error)) => panic!("connect to {uri} failed: {error}"),
            Err(_) => panic!("connect to {uri} did not finish within {PATIENCE:?}"),
        }
    }
}

async fn channel(connection: &Connection) -> Channel {
    within("channel.open", connection.create_channel()).await
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
}

/// Declare a durable queue.
async fn declare_durable(channel: &Channel, queue: &str) {
    within("queue.declare", channel.queue_declare(queue.into(), durable(), FieldTable::default())).await;
}

/// The number of ready messages in `queue` (a passive declare).
async fn message_count(channel: &Channel, queue: &str) -> u32 {
    let options = QueueDeclareOptions { passive: true, ..durable() };
    within("passive queue.declare", channel.queue_declare(queue.into(), options, FieldTable::default()))
        .await
        .message_count()
}

/// Publish persistent `bodies` to `queue` on a channel in confirm mode; every one must be acked.
async fn publish_confirmed(channel: &Channel, queue: &str, bodies: &[Vec<u8>]) {
    let mut confirms = Vec::with_capacity(bodies.len());
    for body in bodies {
        let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
        let publish = channel.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties);
        confirms.push(within("basic.publish", publish).await);
    }
    for (i, confirm) in confirms.into_iter().enumerate() {
        let confirmation = within("publisher confirm", confirm).await;
        assert!(confirmation.is_ack(), "publish {i} to {queue} was not acked: {confirmation:?}");
    }
}

/// Publish one persistent message (no confirm awaited: the channel is transactional).
async fn publish(channel: &Channel, queue: &str, body: &[u8]) {
    let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
    within(
        "basic.publish",
        channel.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties),
    )
    .await;
}

/// Take every message of `queue` with no-ack basic.get: (body, redelivered) in queue order.
async fn drain(channel: &Channel, queue: &str) -> Vec<(Vec<u8>, bool)> {
    let mut messages = Vec::new();
    let options = BasicGetOptions { no_ack: true };
    while let Some(got) = within("basic.get", channel.basic_get(queue.into(), options)).await {
        messages.push((got.delivery.data, got.delivery.redelivered));
    }
    messages
}

fn bodies(prefix: &str, count: usize) -> Vec<Vec<u8>> {
    (0..count).map(|i| format!("{prefix}-{i}").into_bytes()).collect()
}

#[test]
fn confirmed_persistent_messages_in_a_durable_queue_survive_sigkill() {
    const COUNT: usize = 200;
    let runtime = runtime();
    let mut broker = Broker::start();
    let sent = bodies("persistent", COUNT);
    let connection = runtime.block_on(async {
        let connection = connect(&broker).await;
        let channel = channel(&connection).await;
        declare_durable(&channel, "survivors").await;
        within("confirm.select", channel.confirm_select(ConfirmSelectOptions::default())).await;
        publish_confirmed(&channel, "survivors", &sent).await;
        connection
    });
    // A crash: the connection is never closed.
    broker.kill();
    drop(connection);
    broker.restart();
    runtime.block_on(async {
        let connection = connect(&broker).await;
        let channel = channel(&connection).await;
        assert_eq!(message_count(&channel, "survivors").await as usize, COUNT, "messages after the restart");
        let received = drain(&channel, "survivors").await;
        let received_bodies: Vec<Vec<u8>> = received.iter().map(|(body, _)| body.clone()).collect();
        assert_eq!(received_bodies, sent, "every confirmed message, once, in publish order");
        assert!(received.iter().all(|(_, redelivered)| !redelivered), "never delivered, so not redelivered");
    });
}

#[test]
fn deliveries_unacked_at_sigkill_are_redelivered_after_restart() {
    let runtime = runtime();
    let mut broker = Broker::start();
    let sent = bodies("inflight", 5);
    let connection = runtime.block_on(async {
        let connection = connect(&broker).await;
        let channel = channel(&connection).await;
        declare_durable(&channel, "inflight").await;
        within("confirm.select", channel.confirm_select(ConfirmSelectOptions::default())).await;
        publish_confirmed(&channel, "inflight", &sent).await;
        let consumer_channel = self::channel(&connection).await;
        let mut consumer = within(
            "basic.consume",
            consumer_channel.basic_consume(
                "inflight".into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        let mut delivered = Vec::new();
        for _ in 0..sent.len() {
            let delivery = match tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut consumer)).await {
                Ok(Some(Ok(delivery))) => delivery,
                other => panic!("expected a delivery, got {other:?}"),
            };
            assert!(!delivery.redelivered, "first delivery of {:?}", delivery.data);
            delivered.push(delivery);
        }
        let delivered_bodies: Vec<Vec<u8>> = delivered.iter().map(|d| d.data.clone()).collect();
        assert_eq!(delivered_bodies, sent);
        // The first two are acked; the rest are still unacked at the kill.
        for delivery in &delivered[..2] {
            within("basic.ack", consumer_channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default())).await;
        }
        // A round trip on the same channel: the server has handled the acks before it answers.
        let _ = message_count(&consumer_channel, "inflight").await;
        connection
    });
    broker.kill();
    drop(connection);
    broker.restart();
    runtime.block_on(async {
        let connection = connect(&broker).await;
        let channel = channel(&connection).await;
        let expected: Vec<(Vec<u8>, bool)> = sent[2..].iter().map(|body| (body.clone(), true)).collect();
        assert_eq!(
            drain(&channel, "inflight").await,
            expected,
            "the unacked deliveries, redelivered; not the acked ones"
        );
    });
}

#[test]
fn committed_tx_is_entirely_applied_and_uncommitted_tx_not_at_all_after_sigkill() {
    let runtime = runtime();
    let mut broker = Broker::start();
    let connection = runtime.block_on(async {
        let connection = connect(&broker).await;
        let setup = channel(&connection).await;
        for queue in ["tx-a", "tx-b", "tx-source"] {
            declare_durable(&setup, queue).await;
        }
        within("confirm.select", setup.confirm_select(ConfirmSelectOptions::default())).await;
        publish_confirmed(&setup, "tx-source", &bodies("source", 2)).await;

        // Committed: a get, two publishes to two queues, the get's ack, commit.
        let committed = channel(&connection).await;
        within("tx.select", committed.tx_select()).await;
        let got = within("basic.get", committed.basic_get("tx-source".into(), BasicGetOptions::default()))
            .await
            .expect("a message in tx-source");
        assert_eq!(got.delivery.data, b"source-0");
        publish(&committed, "tx-a", b"a-committed").await;
        publish(&committed, "tx-b", b"b-committed").await;
        within("basic.ack", committed.basic_ack(got.delivery.delivery_tag, BasicAckOptions::default())).await;
        within("tx.commit", committed.tx_commit()).await;

        // Never committed: the same staged work, then the kill.
        let pending = channel(&connection).await;
        within("tx.select", pending.tx_select()).await;
        let got = within("basic.get", pending.basic_get("tx-source".into(), BasicGetOptions::default()))
            .await
            .expect("a second message in tx-source");
        assert_eq!(got.delivery.data, b"source-1");
        publish(&pending, "tx-a", b"a-uncommitted").await;
        publish(&pending, "tx-b", b"b-uncommitted").await;
        within("basic.ack", pending.basic_ack(got.delivery.delivery_tag, BasicAckOptions::default())).await;
        // A round trip on the pending channel (everything above is handled), which also shows the
        // staged publishes are not visible before a commit.
        assert_eq!(message_count(&pending, "tx-a").await, 1, "tx-a before the kill: the committed publish only");
        connection
    });
    broker.kill();
    drop(connection);
    broker.restart();
    runtime.block_on(async {
        let connection = connect(&broker).await;
        let channel = channel(&connection).await;
        assert_eq!(drain(&channel, "tx-a").await, vec![(b"a-committed".to_vec(), false)], "tx-a");
        assert_eq!(drain(&channel, "tx-b").await, vec![(b"b-committed".to_vec(), false)], "tx-b");
        // source-0's ack was committed; source-1's was staged only, and it was delivered (to the
        // uncommitted transaction's basic.get) before the kill.
        assert_eq!(drain(&channel, "tx-source").await, vec![(b"source-1".to_vec(), true)], "tx-source");
    });
}
