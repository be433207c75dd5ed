//! lapin (Rust, 4.12) against the real `wharf` binary: publisher confirms (ack, and nack from a full
//! `reject-publish` queue), `immediate=true` (540), transactions spread over several shards,
//! consume-transform-produce in one transaction, every field-table value type and every basic
//! property through publish and consume, PLAIN and AMQPLAIN logins, channel errors that leave the
//! connection and its other channels working, many concurrent channels, and prefetch.
//!
//! Each test starts its own broker (the MQTT suite's harness) and talks to it over loopback only.
//! Every client call is bounded by [`PATIENCE`]; every "nothing arrives" check waits [`SETTLE`]
//! after a positive control in the same test showed that delivery works.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind};

use crate::harness::Broker;

/// Longest wait for any one client call or expected delivery.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a "nothing (more) arrives" check waits, after a positive control.
const SETTLE: Duration = Duration::from_millis(500);

/// `future`, or a panic naming `what` if it takes longer than [`PATIENCE`].
async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: no answer within {PATIENCE:?}"),
    }
}

/// The broker's AMQP URI with these credentials and query (`?auth_mechanism=...`).
fn uri_with(broker: &Broker, user: &str, pass: &str, query: &str) -> String {
    format!("amqp://{user}:{pass}@127.0.0.1:{}/%2f{query}", broker.amqp_port())
}

async fn connect(broker: &Broker) -> Connection {
    let uri = uri_with(broker, "guest", "guest", "");
    within("connect", Connection::connect(&uri, ConnectionProperties::default())).await.expect("connect")
}

async fn open_channel(connection: &Connection) -> Channel {
    within("channel.open", connection.create_channel()).await.expect("channel.open")
}

async fn declare(channel: &Channel, queue: &str, arguments: FieldTable) {
    within("queue.declare", channel.queue_declare(queue.into(), QueueDeclareOptions::default(), arguments))
        .await
        .unwrap_or_else(|error| panic!("queue.declare {queue}: {error}"));
}

/// The number of ready messages in `queue` (passive queue.declare).
/// A channel in confirm mode on which `queue` is declared.
async fn confirmed_queue(connection: &Connection, queue: &str, arguments: FieldTable) -> Channel {
    let channel = open_channel(connection).await;
    declare(&channel, queue, arguments).await;
    within("confirm.select", channel.confirm_select(ConfirmSelectOptions::default())).await.expect("confirm.select");
    channel
}

async fn ready_count(channel: &Channel, queue: &str) -> u32 {
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    within("passive queue.declare", channel.queue_declare(queue.into(), options, FieldTable::default()))
        .await
        .unwrap_or_else(|error| panic!("passive queue.declare {queue}: {error}"))
        .message_count()
}

/// Publish on a channel in confirm mode and return the broker's confirmation.
async fn publish_confirm(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Confirmation {
    let options = BasicPublishOptions::default();
    let confirm =
        within("basic.publish", channel.basic_publish(exchange.into(), routing_key.into(), options, body, properties))
            .await
            .expect("basic.publish");
    within("publisher confirm", confirm).await.expect("publisher confirm")
}

/// Publish on a confirm-mode channel and require an ack.
async fn publish_acked(channel: &Channel, routing_key: &str, body: &[u8]) {
    let confirmation = publish_confirm(channel, "", routing_key, body, BasicProperties::default()).await;
    assert!(confirmation.is_ack(), "publish to {routing_key}: {confirmation:?}");
}

/// Publish without waiting for anything (a transactional channel).
async fn publish(channel: &Channel, routing_key: &str, body: &[u8]) {
    within(
        "basic.publish",
        channel.basic_publish(
            "".into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish");
}

async fn consume(channel: &Channel, queue: &str) -> Consumer {
    within(
        "basic.consume",
        channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await
    .unwrap_or_else(|error| panic!("basic.consume {queue}: {error}"))
}

async fn next_delivery(consumer: &mut Consumer, what: &str) -> Delivery {
    within(what, consumer.next()).await.unwrap_or_else(|| panic!("{what}: consumer ended")).expect(what)
}

/// The next delivery if one arrives within `wait`.
async fn try_next_delivery(consumer: &mut Consumer, wait: Duration) -> Option<Delivery> {
    match tokio::time::timeout(wait, consumer.next()).await {
        Ok(Some(delivery)) => Some(delivery.expect("delivery")),
        Ok(None) => panic!("the consumer ended"),
        Err(_) => None,
    }
}

async fn get(channel: &Channel, queue: &str, no_ack: bool) -> Option<BasicGetMessage> {
    within("basic.get", channel.basic_get(queue.into(), BasicGetOptions { no_ack }))
        .await
        .unwrap_or_else(|error| panic!("basic.get {queue}: {error}"))
}

/// Poll `queue` with basic.get (no-ack) until a message is there, for at most [`PATIENCE`].
async fn get_eventually(channel: &Channel, queue: &str) -> BasicGetMessage {
    within(&format!("a message in {queue}"), async {
        loop {
            if let Some(message) = get(channel, queue, true).await {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The reply code and text of a channel or connection error from the broker.
fn amqp_error(error: &lapin::Error) -> (u16, String) {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => (amqp.get_id(), amqp.get_message().as_str().to_owned()),
        other => panic!("expected an AMQP error from the broker, got {other:?} ({error})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_confirms_ack_every_publish_in_order() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let channel = confirmed_queue(&connection, "confirmed", FieldTable::default()).await;
    // Publish them all first, then collect the confirms: they are outstanding together.
    let mut pending = Vec::new();
    for n in 0..20u8 {
        let confirm = within(
            "basic.publish",
            channel.basic_publish(
                "".into(),
                "confirmed".into(),
                BasicPublishOptions::default(),
                &[n],
                BasicProperties::default(),
            ),
        )
        .await
        .expect("basic.publish");
        pending.push(confirm);
    }
    for (n, confirm) in pending.into_iter().enumerate() {
        let confirmation = within("publisher confirm", confirm).await.expect("confirm");
        assert_eq!(confirmation, Confirmation::Ack(None), "publish {n}");
    }
    assert_eq!(ready_count(&channel, "confirmed").await, 20, "every acked publish is in the queue");
    let mut consumer = consume(&channel, "confirmed").await;
    for n in 0..20u8 {
        let delivery = next_delivery(&mut consumer, "confirmed message").await;
        assert_eq!(delivery.data, vec![n]);
        within("basic.ack", delivery.ack(BasicAckOptions::default())).await.expect("ack");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_confirm_is_nack_when_a_reject_publish_queue_is_full() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let channel = confirmed_queue(&connection, "bounded", arguments).await;
    let first = publish_confirm(&channel, "", "bounded", b"first", BasicProperties::default()).await;
    assert_eq!(first, Confirmation::Ack(None), "the first fits");
    let second = publish_confirm(&channel, "", "bounded", b"second", BasicProperties::default()).await;
    assert!(second.is_nack(), "the queue is full: {second:?}");
    // A nack is not a channel error: the channel goes on, and the queue kept only the first.
    assert!(channel.status().connected());
    assert_eq!(ready_count(&channel, "bounded").await, 1);
    let kept = get(&channel, "bounded", true).await.expect("the first message");
    assert_eq!(kept.delivery.data, b"first");
    let third = publish_confirm(&channel, "", "bounded", b"third", BasicProperties::default()).await;
    assert_eq!(third, Confirmation::Ack(None), "room again after the get");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_immediate_publish_closes_the_connection_540_not_implemented() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let mut events = connection.events_listener();
    let channel = open_channel(&connection).await;
    declare(&channel, "q", FieldTable::default()).await;
    let options = BasicPublishOptions { immediate: true, ..BasicPublishOptions::default() };
    // The publish itself may already fail when the close arrives first; the close is what counts.
    let _ =
        within("basic.publish", channel.basic_publish("".into(), "q".into(), options, b"x", Default::default())).await;
    let error = within("the connection error", async {
        loop {
            match events.next().await {
                Some(lapin::Event::Error(error)) => return error,
                Some(_) => {}
                None => panic!("the event stream ended without an error"),
            }
        }
    })
    .await;
    assert_eq!(amqp_error(&error), (540, "NOT_IMPLEMENTED - immediate=true".to_owned()));
    within("the connection to close", async {
        while connection.status().connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The queues of the multi-shard transaction tests: with 4 shards, 8 queues land on several.
fn shard_queues() -> Vec<String> {
    (0..8).map(|n| format!("spread-{n}")).collect()
}

/// The ready counts of `queues`, read one after the other.
async fn scan(channel: &Channel, queues: &[String]) -> Vec<u32> {
    let mut counts = Vec::with_capacity(queues.len());
    for queue in queues {
        counts.push(ready_count(channel, queue).await);
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_tx_over_several_shards_becomes_visible_all_at_once_on_commit() {
    let broker = Broker::builder().env("WHARF__CORE__SHARD_COUNT", 4).start();
    let queues = shard_queues();
    let publisher = connect(&broker).await;
    let channel = open_channel(&publisher).await;
    for queue in &queues {
        declare(&channel, queue, FieldTable::default()).await;
    }
    within("tx.select", channel.tx_select()).await.expect("tx.select");
    // The observer has its own connection, so it keeps reading while the commit is in progress.
    let observer = connect(&broker).await;
    let watch = open_channel(&observer).await;
    let scanner_channels = [open_channel(&observer).await, open_channel(&observer).await];
    const ROUNDS: u32 = 10;
    for round in 0..ROUNDS {
        for queue in &queues {
            publish(&channel, queue, format!("round-{round}").as_bytes()).await;
        }
        assert_eq!(scan(&watch, &queues).await, vec![round; queues.len()], "round {round}: visible before commit");
        // Scan over and over, in queue order and in reverse order, while the commit runs. If the
        // commit is one instant, a scan reads the old count and then the new one, never
        // new-then-old (a queue read later still missing its message while a queue read earlier
        // already shows it).
        let stop = Arc::new(AtomicBool::new(false));
        let scanners: Vec<_> = [queues.clone(), queues.iter().rev().cloned().collect()]
            .into_iter()
            .zip(scanner_channels.clone())
            .map(|(order, watch)| {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut scans = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        scans.push((scan(&watch, &order).await, order.clone()));
                    }
                    scans
                })
            })
            .collect();
        within("tx.commit", channel.tx_commit()).await.expect("tx.commit");
        stop.store(true, Ordering::Relaxed);
        for scanner in scanners {
            for (counts, order) in within("a scanner", scanner).await.expect("scanner task") {
                assert!(counts.iter().all(|c| *c == round || *c == round + 1), "round {round}: counts {counts:?}");
                let first_new = counts.iter().position(|c| *c == round + 1).unwrap_or(counts.len());
                assert!(
                    counts[first_new..].iter().all(|c| *c == round + 1),
                    "round {round}: a partly visible commit: {counts:?} for queues {order:?}"
                );
            }
        }
        assert_eq!(scan(&watch, &queues).await, vec![round + 1; queues.len()], "round {round}: after commit-ok");
    }
    for queue in &queues {
        for round in 0..ROUNDS {
            let message = get(&watch, queue, true).await.unwrap_or_else(|| panic!("{queue}: round {round}"));
            assert_eq!(message.delivery.data, format!("round-{round}").as_bytes(), "{queue}");
        }
        assert!(get(&watch, queue, true).await.is_none(), "{queue}: nothing else");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_tx_over_several_shards_rollback_publishes_nothing() {
    let broker = Broker::builder().env("WHARF__CORE__SHARD_COUNT", 4).start();
    let queues = shard_queues();
    let connection = connect(&broker).await;
    let channel = open_channel(&connection).await;
    for queue in &queues {
        declare(&channel, queue, FieldTable::default()).await;
    }
    let watch = open_channel(&connection).await;
    within("tx.select", channel.tx_select()).await.expect("tx.select");
    for queue in &queues {
        publish(&channel, queue, b"rolled back").await;
    }
    within("tx.rollback", channel.tx_rollback()).await.expect("tx.rollback");
    // The next commit of the same channel must not bring the rolled-back publishes back.
    within("empty tx.commit", channel.tx_commit()).await.expect("empty tx.commit");
    assert_eq!(scan(&watch, &queues).await, vec![0; queues.len()], "nothing after rollback");
    // Positive control: the same channel's next transaction is committed, with only its own.
    for queue in &queues {
        publish(&channel, queue, b"committed").await;
    }
    within("tx.commit", channel.tx_commit()).await.expect("tx.commit");
    assert_eq!(scan(&watch, &queues).await, vec![1; queues.len()], "the committed transaction");
    for queue in &queues {
        let message = get(&watch, queue, true).await.expect("the committed message");
        assert_eq!(message.delivery.data, b"committed", "{queue}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_tx_consume_transform_produce_commit_acks_input_and_publishes_output() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let setup = open_channel(&connection).await;
    declare(&setup, "ctp.in", FieldTable::default()).await;
    declare(&setup, "ctp.out", FieldTable::default()).await;
    within("confirm.select", setup.confirm_select(ConfirmSelectOptions::default())).await.expect("confirm.select");
    publish_acked(&setup, "ctp.in", b"input").await;
    publish_acked(&setup, "ctp.in", b"control").await;

    let worker = open_channel(&connection).await;
    within("basic.qos", worker.basic_qos(2, BasicQosOptions::default())).await.expect("basic.qos");
    within("tx.select", worker.tx_select()).await.expect("tx.select");
    let mut consumer = consume(&worker, "ctp.in").await;
    let input = next_delivery(&mut consumer, "the input").await;
    assert_eq!(input.data, b"input");
    // "control" is received but never acked: it must come back when the worker's channel closes.
    let control = next_delivery(&mut consumer, "the control").await;
    assert_eq!(control.data, b"control");
    within("basic.ack", input.ack(BasicAckOptions::default())).await.expect("ack in tx");
    publish(&worker, "ctp.out", b"output").await;
    assert_eq!(ready_count(&setup, "ctp.out").await, 0, "the output waits for the commit");
    within("tx.commit", worker.tx_commit()).await.expect("tx.commit");

    let output = get(&setup, "ctp.out", true).await.expect("the output after commit");
    assert_eq!(output.delivery.data, b"output");
    within("channel.close", worker.close(200, "done".into())).await.expect("channel.close");
    // The unacked control returns; the input, whose ack was committed, does not.
    let back = get_eventually(&setup, "ctp.in").await;
    assert_eq!(back.delivery.data, b"control");
    assert!(back.delivery.redelivered);
    assert!(get(&setup, "ctp.in", true).await.is_none(), "the committed ack removed the input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_tx_consume_transform_produce_rollback_keeps_input_and_drops_output() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let setup = open_channel(&connection).await;
    declare(&setup, "ctp.in", FieldTable::default()).await;
    declare(&setup, "ctp.out", FieldTable::default()).await;
    within("confirm.select", setup.confirm_select(ConfirmSelectOptions::default())).await.expect("confirm.select");
    publish_acked(&setup, "ctp.in", b"input").await;

    let worker = open_channel(&connection).await;
    within("tx.select", worker.tx_select()).await.expect("tx.select");
    let mut consumer = consume(&worker, "ctp.in").await;
    let input = next_delivery(&mut consumer, "the input").await;
    assert_eq!(input.data, b"input");
    assert!(!input.redelivered);
    within("basic.ack", input.ack(BasicAckOptions::default())).await.expect("ack in tx");
    publish(&worker, "ctp.out", b"output").await;
    within("tx.rollback", worker.tx_rollback()).await.expect("tx.rollback");
    // Positive control: the worker's next transaction does reach the output queue.
    publish(&worker, "ctp.out", b"after rollback").await;
    within("tx.commit", worker.tx_commit()).await.expect("tx.commit");
    let output = get(&setup, "ctp.out", true).await.expect("the committed output");
    assert_eq!(output.delivery.data, b"after rollback", "the rolled-back output was dropped");
    assert!(get(&setup, "ctp.out", true).await.is_none(), "only the committed output");

    // The rolled-back ack left the input unacked: closing the channel returns it to the queue.
    within("channel.close", worker.close(200, "done".into())).await.expect("channel.close");
    let again = get_eventually(&setup, "ctp.in").await;
    assert_eq!(again.delivery.data, b"input");
    assert!(again.delivery.redelivered, "the input was delivered before");
}

/// Two messages in `rb.in`, both taken with basic.get (manual ack) on a fresh transactional
/// channel; returns that channel and the two deliveries' tags.
async fn two_got_in_a_txn(connection: &Connection, setup: &Channel) -> (Channel, u64, u64) {
    declare(setup, "rb.in", FieldTable::default()).await;
    within("confirm.select", setup.confirm_select(ConfirmSelectOptions::default())).await.expect("confirm.select");
    publish_acked(setup, "rb.in", b"first").await;
    publish_acked(setup, "rb.in", b"second").await;
    let worker = open_channel(connection).await;
    within("tx.select", worker.tx_select()).await.expect("tx.select");
    let first = get(&worker, "rb.in", false).await.expect("first");
    assert_eq!(first.delivery.data, b"first");
    let second = get(&worker, "rb.in", false).await.expect("second");
    assert_eq!(second.delivery.data, b"second");
    (worker, first.delivery.delivery_tag, second.delivery.delivery_tag)
}

// AMQP 0-9-1 tx.rollback "abandons all message publications and acknowledgments performed in the
// current transaction": the deliveries acked in it are unacked again (RabbitMQ's rabbit_channel
// puts them back into the channel's unacked set), so the client may ack them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_tx_rollback_leaves_acked_deliveries_unacked_so_they_can_be_acked_again() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let setup = open_channel(&connection).await;
    let (worker, first, second) = two_got_in_a_txn(&connection, &setup).await;
    let ack = |tag| within("basic.ack", worker.basic_ack(tag, BasicAckOptions::default()));
    ack(first).await.expect("ack first in the transaction");
    ack(second).await.expect("ack second in the transaction");
    within("tx.rollback", worker.tx_rollback()).await.expect("tx.rollback");
    ack(first).await.expect("ack first again");
    ack(second).await.expect("ack second again");
    within("tx.commit", worker.tx_commit()).await.expect("tx.commit of the acks made after the rollback");
    assert!(worker.status().connected(), "re-acking a rolled-back ack is no channel error");
    within("channel.close", worker.close(200, "done".into())).await.expect("channel.close");
    // Positive control for the emptiness check below: the queue still takes and gives messages.
    publish_acked(&setup, "rb.in", b"control").await;
    let next = get_eventually(&setup, "rb.in").await;
    assert_eq!(next.delivery.data, b"control", "the committed acks removed both messages");
}

// The same rule seen from the queue: a basic.get delivery whose ack was rolled back is unacked,
// so closing the channel returns it to the queue, as any unacked delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_tx_rollback_then_channel_close_requeues_the_got_messages() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let setup = open_channel(&connection).await;
    let (worker, first, second) = two_got_in_a_txn(&connection, &setup).await;
    within("basic.ack", worker.basic_ack(first, BasicAckOptions::default())).await.expect("ack in the transaction");
    within("tx.rollback", worker.tx_rollback()).await.expect("tx.rollback");
    let _ = second;
    within("channel.close", worker.close(200, "done".into())).await.expect("channel.close");
    // "second" (never acked) is the positive control: it comes back in any case.
    let mut back = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while back.len() < 2 && tokio::time::Instant::now() < deadline {
        match get(&setup, "rb.in", true).await {
            Some(message) => {
                assert!(message.delivery.redelivered, "{:?}", message.delivery.data);
                back.push(String::from_utf8_lossy(&message.delivery.data).into_owned());
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    back.sort();
    assert_eq!(back, ["first", "second"], "requeued within {PATIENCE:?} of the channel close");
}

/// One value of every field type lapin can send (it writes ShortString with a type tag no
/// broker reads, so that one is left out), nested in tables and arrays too.
fn every_field_type() -> FieldTable {
    let mut inner = FieldTable::default();
    inner.insert("deep".into(), AMQPValue::LongLongInt(-42));
    inner.insert("text".into(), AMQPValue::LongString("nested".into()));
    inner.insert("flag".into(), AMQPValue::Boolean(false));
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::FieldTable(inner.clone()));
    nested.insert("u8".into(), AMQPValue::ShortShortUInt(200));
    let array = FieldArray::from(vec![
        AMQPValue::LongInt(1),
        AMQPValue::LongString("two".into()),
        AMQPValue::Boolean(true),
        AMQPValue::Double(4.5),
        AMQPValue::FieldTable(inner),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::ShortInt(-7), AMQPValue::Void])),
        AMQPValue::Void,
        AMQPValue::ByteArray(vec![9, 0, 9].into()),
        AMQPValue::Timestamp(1),
        AMQPValue::DecimalValue(DecimalValue { scale: 1, value: 5 }),
    ]);
    let mut table = FieldTable::default();
    table.insert("bool".into(), AMQPValue::Boolean(true));
    table.insert("i8".into(), AMQPValue::ShortShortInt(i8::MIN));
    table.insert("u8".into(), AMQPValue::ShortShortUInt(u8::MAX));
    table.insert("i16".into(), AMQPValue::ShortInt(i16::MIN));
    table.insert("u16".into(), AMQPValue::ShortUInt(u16::MAX));
    table.insert("i32".into(), AMQPValue::LongInt(i32::MIN));
    table.insert("u32".into(), AMQPValue::LongUInt(u32::MAX));
    table.insert("i64".into(), AMQPValue::LongLongInt(i64::MIN));
    table.insert("f32".into(), AMQPValue::Float(-1.25));
    table.insert("f64".into(), AMQPValue::Double(std::f64::consts::PI));
    table.insert("decimal".into(), AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 314_159 }));
    table.insert("text".into(), AMQPValue::LongString("héllo wörld".into()));
    table.insert("empty".into(), AMQPValue::LongString("".into()));
    table.insert("array".into(), AMQPValue::FieldArray(array));
    table.insert("empty-array".into(), AMQPValue::FieldArray(FieldArray::default()));
    table.insert("timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
    table.insert("table".into(), AMQPValue::FieldTable(nested));
    table.insert("empty-table".into(), AMQPValue::FieldTable(FieldTable::default()));
    table.insert("bytes".into(), AMQPValue::ByteArray(vec![0, 1, 254, 255].into()));
    table.insert("void".into(), AMQPValue::Void);
    table
}

/// Publish `headers` to a fresh queue and consume them back.
async fn headers_round_trip(headers: FieldTable) -> Option<FieldTable> {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let channel = confirmed_queue(&connection, "typed", FieldTable::default()).await;
    let properties = BasicProperties::default().with_headers(headers);
    let confirmation = publish_confirm(&channel, "", "typed", b"typed", properties).await;
    assert_eq!(confirmation, Confirmation::Ack(None));
    let mut consumer = consume(&channel, "typed").await;
    let delivery = next_delivery(&mut consumer, "the typed message").await;
    assert_eq!(delivery.data, b"typed");
    delivery.properties.headers().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_every_field_table_value_type_round_trips_exactly() {
    let sent = every_field_type();
    let received = headers_round_trip(sent.clone()).await.expect("headers");
    for (key, value) in sent.inner() {
        assert_eq!(received.inner().get(key), Some(value), "header {key}");
    }
    assert_eq!(received, sent, "no header added or lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_non_utf8_long_string_header_round_trips_as_long_string() {
    // AMQP long strings are octet strings; RabbitMQ hands them back as 'S' with the same bytes.
    // MAPPING.md keeps them as Bytes inside; the type seen by the consumer must not change.
    let bytes = vec![0xff, 0xfe, 0x00, b'a', 0xc3];
    let mut sent = FieldTable::default();
    sent.insert("raw".into(), AMQPValue::LongString(LongString::from(bytes.clone())));
    sent.insert("nested".into(), AMQPValue::FieldArray(vec![AMQPValue::LongString(bytes.into())].into()));
    let received = headers_round_trip(sent.clone()).await.expect("headers");
    assert_eq!(received, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_every_basic_property_round_trips() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let channel = confirmed_queue(&connection, "props", FieldTable::default()).await;
    let mut headers = FieldTable::default();
    headers.insert("h".into(), AMQPValue::LongString("v".into()));
    let full = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_expiration("60000".into())
        .with_message_id("message-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("lapin-conformance".into());
    let transient = BasicProperties::default().with_delivery_mode(1);
    // cluster-id is deprecated in 0-9-1; MAPPING.md says Wharf drops it.
    let with_cluster = full.clone().with_cluster_id("cluster-a".into());
    for (body, properties) in
        [(&b"full"[..], with_cluster), (b"transient", transient.clone()), (b"none", BasicProperties::default())]
    {
        let confirmation = publish_confirm(&channel, "", "props", body, properties).await;
        assert_eq!(confirmation, Confirmation::Ack(None));
    }
    let mut consumer = consume(&channel, "props").await;
    for (body, expected) in [(&b"full"[..], full), (b"transient", transient), (b"none", BasicProperties::default())] {
        let delivery = next_delivery(&mut consumer, "a message with properties").await;
        assert_eq!(delivery.data, body);
        assert_eq!(delivery.properties, expected, "{}", String::from_utf8_lossy(body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_plain_and_amqplain_logins_are_accepted() {
    let broker = Broker::start();
    for mechanism in ["plain", "amqplain"] {
        let uri = uri_with(&broker, "guest", "guest", &format!("?auth_mechanism={mechanism}"));
        let connection = within("connect", Connection::connect(&uri, ConnectionProperties::default()))
            .await
            .unwrap_or_else(|error| panic!("{mechanism}: {error}"));
        let channel = open_channel(&connection).await;
        let queue = format!("login-{mechanism}");
        declare(&channel, &queue, FieldTable::default()).await;
        assert_eq!(ready_count(&channel, &queue).await, 0);
        within("connection.close", connection.close(200, "bye".into())).await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_wrong_credentials_are_refused_403_access_refused() {
    let broker = Broker::start();
    // The reply text names the mechanism, which also shows lapin used the one asked for.
    for (mechanism, name) in [("plain", "PLAIN"), ("amqplain", "AMQPLAIN")] {
        for (user, pass) in [("guest", "wrong"), ("nobody", "guest")] {
            let uri = uri_with(&broker, user, pass, &format!("?auth_mechanism={mechanism}"));
            let result = within("connect", Connection::connect(&uri, ConnectionProperties::default())).await;
            let error = result.err().unwrap_or_else(|| panic!("{name} {user}:{pass} was accepted"));
            let expected = format!(
                "ACCESS_REFUSED - Login was refused using authentication mechanism {name}. For details see the broker logfile."
            );
            assert_eq!(amqp_error(&error), (403, expected), "{name} {user}:{pass}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_channel_error_closes_only_that_channel() {
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let busy = open_channel(&connection).await;
    declare(&busy, "alive", FieldTable::default()).await;
    within("confirm.select", busy.confirm_select(ConfirmSelectOptions::default())).await.expect("confirm.select");
    let mut consumer = consume(&busy, "alive").await;
    publish_acked(&busy, "alive", b"before").await;
    assert_eq!(next_delivery(&mut consumer, "before the error").await.data, b"before");

    let failing = open_channel(&connection).await;
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let error =
        within("passive queue.declare", failing.queue_declare("missing".into(), options, FieldTable::default()))
            .await
            .expect_err("a missing queue");
    assert_eq!(amqp_error(&error), (404, "NOT_FOUND - no queue 'missing' in vhost '/'".to_owned()));
    assert!(!failing.status().connected(), "the failing channel is closed");
    assert!(connection.status().connected(), "a channel error does not close the connection");

    // The other channel's consumer and publisher go on, and new channels open.
    publish_acked(&busy, "alive", b"after").await;
    assert_eq!(next_delivery(&mut consumer, "after the error").await.data, b"after");
    let fresh = open_channel(&connection).await;
    declare(&fresh, "fresh", FieldTable::default()).await;
    assert_eq!(ready_count(&fresh, "alive").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_many_channels_on_one_connection_work_concurrently() {
    const CHANNELS: usize = 32;
    const MESSAGES: u8 = 20;
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let mut channels = Vec::with_capacity(CHANNELS);
    for _ in 0..CHANNELS {
        channels.push(open_channel(&connection).await);
    }
    let tasks: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(n, channel)| {
            tokio::spawn(async move {
                let queue = format!("channel-{n}");
                declare(&channel, &queue, FieldTable::default()).await;
                within("confirm.select", channel.confirm_select(ConfirmSelectOptions::default()))
                    .await
                    .expect("confirm.select");
                let mut consumer = consume(&channel, &queue).await;
                for m in 0..MESSAGES {
                    publish_acked(&channel, &queue, format!("{n}/{m}").as_bytes()).await;
                }
                for m in 0..MESSAGES {
                    let delivery = next_delivery(&mut consumer, &queue).await;
                    assert_eq!(delivery.data, format!("{n}/{m}").as_bytes(), "{queue}");
                    within("basic.ack", delivery.ack(BasicAckOptions::default())).await.expect("ack");
                }
                channel.id()
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(CHANNELS);
    for task in futures_util::future::join_all(tasks).await {
        ids.push(task.expect("channel task"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), CHANNELS, "distinct channel numbers");
    assert!(connection.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_consumer_receives_only_prefetch_unacked_messages() {
    const PREFETCH: u16 = 3;
    let broker = Broker::start();
    let connection = connect(&broker).await;
    let setup = open_channel(&connection).await;
    declare(&setup, "prefetched", FieldTable::default()).await;
    within("confirm.select", setup.confirm_select(ConfirmSelectOptions::default())).await.expect("confirm.select");
    for n in 0..10u8 {
        publish_acked(&setup, "prefetched", &[n]).await;
    }
    let channel = open_channel(&connection).await;
    within("basic.qos", channel.basic_qos(PREFETCH, BasicQosOptions::default())).await.expect("basic.qos");
    let mut consumer = consume(&channel, "prefetched").await;
    let mut held = Vec::new();
    for n in 0..PREFETCH {
        let delivery = next_delivery(&mut consumer, "a prefetched message").await;
        assert_eq!(delivery.data, vec![n as u8]);
        held.push(delivery);
    }
    // Positive control above: deliveries flow. Now the window is full.
    if let Some(extra) = try_next_delivery(&mut consumer, SETTLE).await {
        panic!("a delivery beyond prefetch {PREFETCH}: {:?}", extra.data);
    }
    assert_eq!(ready_count(&setup, "prefetched").await, 10 - u32::from(PREFETCH));
    // One ack opens one slot.
    within("basic.ack", held.remove(0).ack(BasicAckOptions::default())).await.expect("ack");
    let fourth = next_delivery(&mut consumer, "the message after one ack").await;
    assert_eq!(fourth.data, vec![PREFETCH as u8]);
    held.push(fourth);
    if let Some(extra) = try_next_delivery(&mut consumer, SETTLE).await {
        panic!("a second delivery for one ack: {:?}", extra.data);
    }
    // Ack everything held with multiple=true; the rest comes, never more than PREFETCH unacked.
    let last = held.last().expect("held").delivery_tag;
    within("basic.ack multiple", channel.basic_ack(last, BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple");
    for n in (PREFETCH + 1)..10 {
        let delivery = next_delivery(&mut consumer, "the rest").await;
        assert_eq!(delivery.data, vec![n as u8]);
        within("basic.ack", delivery.ack(BasicAckOptions::default())).await.expect("ack");
    }
}
