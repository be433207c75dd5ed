//! End-to-end tests of the core API (`Core`): real Raft groups, proposers, state machines and
//! background tasks, on in-memory storage (restarts reopen the same `MemStorage`) or on fjall.

mod common;

use std::time::Duration;

use wharf_core::catalogue::{BindingSpec, Destination, ExchangeKind};
use wharf_core::model::{FieldValue, Headers, Message, Position};
use wharf_core::node::{ConsumeOptions, Consumer, ConsumerEvent, ExchangeSpec, QueueSpec};
use wharf_core::queue::{ConsumerId, Delivery, Outcome};
use wharf_core::raft::storage::MemStorage;
use wharf_core::{Core, CoreConfig, CoreError};

fn config() -> CoreConfig {
    common::memory_config(3)
}

async fn open(storage: &MemStorage) -> Core {
    common::open_on(config(), storage).await
}

fn args(pairs: &[(&str, FieldValue)]) -> Headers {
    let mut headers = Headers::new();
    for (name, value) in pairs {
        headers.push(*name, value.clone());
    }
    headers
}

async fn queue(core: &Core, name: &str, arguments: Headers) {
    let spec = QueueSpec { vhost: "/".into(), name: name.into(), durable: true, arguments, ..QueueSpec::default() };
    core.declare_queue(spec).await.expect("declare queue");
}

fn consumer_id(core: &Core, seq: u64) -> ConsumerId {
    ConsumerId { connection: core.new_connection(), seq }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await {
        Ok(Some(ConsumerEvent::Delivery(delivery))) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn nothing(consumer: &mut Consumer, millis: u64) {
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(millis), consumer.recv()).await {
        panic!("expected nothing, got {event:?}");
    }
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.message.payload).into_owned()
}

#[tokio::test]
async fn publish_consume_ack_through_exchanges() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "orders", Headers::new()).await;
    core.bind(
        BindingSpec {
            vhost: "/".into(),
            source: "amq.topic".into(),
            destination: Destination::Queue("orders".into()),
            routing_key: "orders.*.created".into(),
            arguments: Headers::new(),
        },
        None,
    )
    .await
    .expect("bind");
    let published =
        core.publish_confirmed("/", Message::new("amq.topic", "orders.eu.created", "a")).await.expect("publish");
    assert_eq!(published.positions.len(), 1);
    assert!(published.confirmed());
    let missed =
        core.publish_confirmed("/", Message::new("amq.topic", "orders.eu.shipped", "b")).await.expect("publish");
    assert!(missed.unroutable(), "no binding matches: unroutable (basic.return for mandatory)");
    core.publish_confirmed("/", Message::new("", "orders", "c")).await.expect("default exchange");

    let id = consumer_id(&core, 1);
    let mut consumer = core
        .consume("/", "orders", id, ConsumeOptions { prefetch: 10, no_ack: false, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    assert_eq!((body(&first), body(&second)), ("a".into(), "c".into()));
    assert_eq!(first.position, published.positions[0]);
    let unknown = core.settle(id, &[first.position, second.position], Outcome::Ack).await.expect("ack");
    assert!(unknown.is_empty());
    let again = core.settle(id, &[first.position], Outcome::Ack).await.expect("double ack");
    assert_eq!(again, vec![first.position], "a second ack of the same delivery is reported unknown");
    assert_eq!(core.queue_status("/", "orders").expect("status"), (0, 1));
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn publishing_to_missing_exchange_is_not_found() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let error = core.publish("/", Message::new("nope", "k", "x")).await.expect_err("no exchange");
    assert!(matches!(error, CoreError::NotFound(_)), "{error}");
    assert!(!error.is_retryable());
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn message_size_limit_is_enforced() {
    let storage = MemStorage::new();
    let mut config = config();
    config.limits.message_size_max_bytes = 1_000;
    let core = common::open_on(config, &storage).await;
    queue(&core, "q", Headers::new()).await;
    let error = core.publish("/", Message::new("", "q", vec![0u8; 1_001])).await.expect_err("too large");
    assert!(
        matches!(error, CoreError::LimitExceeded { limit: "limits.message_size_max_bytes", value: 1_001, max: 1_000 }),
        "{error}"
    );
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn nack_without_requeue_dead_letters_to_another_queue() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "dead", Headers::new()).await;
    let dlx = args(&[
        ("x-dead-letter-exchange", FieldValue::from("")),
        ("x-dead-letter-routing-key", FieldValue::from("dead")),
    ]);
    queue(&core, "work", dlx).await;
    core.publish_confirmed("/", Message::new("", "work", "poison")).await.expect("publish");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", "work", id, ConsumeOptions::default()).await.expect("consume");
    let delivery = next(&mut consumer).await;
    core.settle(id, &[delivery.position], Outcome::Reject).await.expect("reject");

    let dead_id = consumer_id(&core, 2);
    let mut dead = core.consume("/", "dead", dead_id, ConsumeOptions::default()).await.expect("consume dead");
    let died = next(&mut dead).await;
    assert_eq!(body(&died), "poison");
    assert_eq!(died.message.routing_key, "dead");
    let reason = died.message.headers.get("x-first-death-reason").and_then(FieldValue::as_str);
    assert_eq!(reason, Some("rejected"));
    // The source queue let go of it once the republish was confirmed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(core.queue_status("/", "work").expect("status").0, 0);
    consumer.cancel().await.expect("cancel");
    dead.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn delayed_delivery_and_ttl_follow_committed_time() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "later", Headers::new()).await;
    queue(&core, "short", args(&[("x-message-ttl", FieldValue::I32(50))])).await;
    let mut delayed = Message::new("", "later", "late");
    delayed.delay_ms = Some(300);
    core.publish_confirmed("/", delayed).await.expect("publish delayed");
    core.publish_confirmed("/", Message::new("", "short", "gone")).await.expect("publish ttl");

    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", "later", id, ConsumeOptions::default()).await.expect("consume");
    nothing(&mut consumer, 150).await;
    assert_eq!(body(&next(&mut consumer).await), "late");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(core.queue_status("/", "short").expect("status").0, 0, "expired by a tick");
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn delayed_message_exchange_delays_by_the_x_delay_header_in_publishes_and_transactions() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let delayed_type = args(&[("x-delayed-type", FieldValue::LongString("topic".into()))]);
    let kind = ExchangeKind::from_declare("x-delayed-message", &delayed_type).expect("delayed kind");
    assert_eq!((kind.routing(), kind.as_str()), (ExchangeKind::Topic, "x-delayed-message"));
    let spec = ExchangeSpec {
        vhost: "/".into(),
        name: "later".into(),
        kind,
        passive: false,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: delayed_type,
    };
    core.declare_exchange(spec).await.expect("declare delayed exchange");
    queue(&core, "due", Headers::new()).await;
    let binding = BindingSpec {
        vhost: "/".into(),
        source: "later".into(),
        destination: Destination::Queue("due".into()),
        routing_key: "jobs.#".into(),
        arguments: Headers::new(),
    };
    core.bind(binding, None).await.expect("bind");
    let with_delay = |body: &str, delay: FieldValue| {
        let mut message = Message::new("later", "jobs.mail", body.to_owned());
        message.headers.push("x-delay", delay);
        message
    };
    // Routed as a topic exchange; published last but not delayed (a negative x-delay is none).
    core.publish_confirmed("/", with_delay("slow", FieldValue::I32(400))).await.expect("publish");
    let mut txn = core.begin_txn();
    txn.publish("/", with_delay("staged", FieldValue::I64(200)));
    core.commit_txn(txn).await.expect("commit");
    core.publish_confirmed("/", with_delay("now", FieldValue::I32(-5))).await.expect("publish");
    let unroutable = core.publish_confirmed("/", Message::new("later", "mail", "x")).await.expect("publish");
    assert!(unroutable.unroutable(), "the delay does not change routing");

    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", "due", id, ConsumeOptions::default()).await.expect("consume");
    let now = next(&mut consumer).await;
    assert_eq!(body(&now), "now");
    assert_eq!(now.message.headers.get("x-delay"), Some(&FieldValue::I32(-5)), "an undelayed message is untouched");
    nothing(&mut consumer, 100).await;
    assert_eq!(body(&next(&mut consumer).await), "staged");
    let slow = next(&mut consumer).await;
    assert_eq!(body(&slow), "slow");
    assert_eq!(slow.message.headers.get("x-delay"), Some(&FieldValue::I32(-400)), "negated, as the plugin does");

    let too_long = with_delay("never", FieldValue::I64(i64::MAX));
    let error = core.publish("/", too_long).await.expect_err("over limits.delay_max_ms");
    assert!(matches!(error, CoreError::LimitExceeded { limit: "limits.delay_max_ms", .. }), "{error:?}");
    let missing = ExchangeKind::from_declare("x-delayed-message", &Headers::new()).expect_err("no x-delayed-type");
    assert!(missing.to_string().contains("'x-delayed-type' must be an existing exchange type"), "{missing}");
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_stopped_consumer_keeps_what_its_client_has_and_returns_the_rest() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "work", args(&[("x-single-active-consumer", FieldValue::Bool(true))])).await;
    for n in 0..4 {
        core.publish_confirmed("/", Message::new("", "work", format!("m{n}"))).await.expect("publish");
    }
    let first = consumer_id(&core, 1);
    let mut consumer = core
        .consume("/", "work", first, ConsumeOptions { prefetch: 3, no_ack: false, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    let kept = [next(&mut consumer).await, next(&mut consumer).await];
    let in_flight = next(&mut consumer).await; // delivered by the core, never shown to the client
    let standby = consumer_id(&core, 2);
    let mut other = core
        .consume("/", "work", standby, ConsumeOptions { prefetch: 10, no_ack: false, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    nothing(&mut other, 100).await; // single active consumer: the first one serves
    let keep = [(kept[0].position, kept[0].delivery_count), (kept[1].position, kept[1].delivery_count)];
    let stopped = consumer.stop(&keep).await.expect("stop");
    assert_eq!(stopped.consumers_left, 1, "the stopped consumer no longer counts");
    assert!(stopped.unread.is_empty(), "all three were read");
    // The standby becomes active and gets what the stopped one did not keep, in order, as never
    // delivered: its client never saw it.
    let returned = next(&mut other).await;
    assert_eq!((body(&returned), returned.redelivered, returned.delivery_count), (body(&in_flight), false, 0));
    assert_eq!(body(&next(&mut other).await), "m3");
    // The kept deliveries are still the stopped consumer's to settle.
    let unknown = core.settle(first, &[kept[0].position], Outcome::Ack).await.expect("ack");
    assert!(unknown.is_empty(), "a kept delivery can be acked after the stop");
    let unknown = core.settle(first, &[in_flight.position], Outcome::Ack).await.expect("ack");
    assert_eq!(unknown, vec![in_flight.position], "what was returned is no longer held");
    // Closing the connection returns what is still kept.
    core.close_connection(first.connection).await.expect("close");
    let back = next(&mut other).await;
    assert_eq!((body(&back), back.redelivered), (body(&kept[1]), true));
    other.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn queue_expires_when_unused() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "temp", args(&[("x-expires", FieldValue::I32(100))])).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while core.queue_status("/", "temp").is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "queue did not expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let spec = QueueSpec { vhost: "/".into(), name: "auto".into(), auto_delete: true, ..QueueSpec::default() };
    core.declare_queue(spec).await.expect("declare");
    let consumer = core.consume("/", "auto", consumer_id(&core, 1), ConsumeOptions::default()).await.expect("consume");
    assert!(core.queue_status("/", "auto").is_ok());
    consumer.cancel().await.expect("cancel");
    assert!(matches!(core.queue_status("/", "auto"), Err(CoreError::NotFound(_))));
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn exclusive_queue_is_deleted_with_its_connection_and_get_returns() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let owner = core.new_connection();
    let spec = QueueSpec {
        vhost: "/".into(),
        name: "mine".into(),
        exclusive: true,
        connection: Some(owner),
        ..QueueSpec::default()
    };
    core.declare_queue(spec.clone()).await.expect("declare");
    let other = QueueSpec { connection: Some(core.new_connection()), ..spec };
    let locked = core.declare_queue(other).await.expect_err("locked");
    assert!(matches!(locked, CoreError::ResourceLocked(_)), "{locked}");
    let stranger = consumer_id(&core, 1);
    let refused = core.consume("/", "mine", stranger, ConsumeOptions::default()).await.expect_err("locked");
    assert!(matches!(refused, CoreError::ResourceLocked(_)), "{refused}");
    let refused = core.get("/", "mine", stranger, true).await.expect_err("locked");
    assert!(matches!(refused, CoreError::ResourceLocked(_)), "{refused}");
    let refused = core.purge("/", "mine", Some(stranger.connection)).await.expect_err("locked");
    assert!(matches!(refused, CoreError::ResourceLocked(_)), "{refused}");
    let owned = ConsumerId { connection: owner, seq: 1 };
    core.consume("/", "mine", owned, ConsumeOptions::default())
        .await
        .expect("the owner consumes")
        .cancel()
        .await
        .expect("cancel");

    queue(&core, "shared", Headers::new()).await;
    core.publish_confirmed("/", Message::new("", "shared", "one")).await.expect("publish");
    let getter = core.new_connection();
    let holder = ConsumerId { connection: getter, seq: 0 };
    let got = core.get("/", "shared", holder, false).await.expect("get").expect("a message");
    assert_eq!(body(&got), "one");
    assert_eq!(core.queue_status("/", "shared").expect("status").0, 0);
    core.close_connection(getter).await.expect("close getter");
    assert_eq!(core.queue_status("/", "shared").expect("status").0, 1, "unsettled get returned on close");
    let again = core.get("/", "shared", holder, true).await.expect("get").expect("the message again");
    assert!(again.redelivered);

    core.close_connection(owner).await.expect("close owner");
    assert!(matches!(core.queue_status("/", "mine"), Err(CoreError::NotFound(_))));
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn reject_publish_overflow_is_a_negative_confirm() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let limited = args(&[("x-max-length", FieldValue::I32(1)), ("x-overflow", FieldValue::from("reject-publish"))]);
    queue(&core, "full", limited).await;
    assert!(core.publish_confirmed("/", Message::new("", "full", "1")).await.expect("first").confirmed());
    let refused = core.publish_confirmed("/", Message::new("", "full", "2")).await.expect("second");
    assert!(!refused.confirmed());
    assert_eq!(refused.rejected.len(), 1);
    assert_eq!(core.purge("/", "full", None).await.expect("purge"), 1);
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn fanout_to_partitioned_queues_and_headers_exchange() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "p", args(&[("x-partitions", FieldValue::I32(4))])).await;
    queue(&core, "h", Headers::new()).await;
    core.declare_exchange(ExchangeSpec {
        vhost: "/".into(),
        name: "fan".into(),
        kind: ExchangeKind::Fanout,
        passive: false,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: Headers::new(),
    })
    .await
    .expect("declare exchange");
    for (source, destination, arguments) in [
        ("fan", "p", Headers::new()),
        ("amq.headers", "h", args(&[("x-match", "any".into()), ("region", "eu".into()), ("tier", "gold".into())])),
    ] {
        let binding = BindingSpec {
            vhost: "/".into(),
            source: source.into(),
            destination: Destination::Queue(destination.into()),
            routing_key: String::new(),
            arguments,
        };
        core.bind(binding, None).await.expect("bind");
    }
    for i in 0..40 {
        let mut message = Message::new("fan", "", format!("m{i}"));
        message.partition_key = Some(format!("customer-{}", i % 5));
        core.publish_confirmed("/", message).await.expect("publish");
    }
    let id = consumer_id(&core, 1);
    let mut consumer = core
        .consume("/", "p", id, ConsumeOptions { prefetch: 100, no_ack: true, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    let mut per_partition: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for _ in 0..40 {
        let delivery = next(&mut consumer).await;
        per_partition.entry(delivery.position.partition).or_default().push(delivery.position.offset);
    }
    assert!(per_partition.len() > 1, "partition keys spread over partitions");
    for offsets in per_partition.values() {
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "order within a partition");
    }
    let mut message = Message::new("amq.headers", "", "eu");
    message.headers.push("region", "eu");
    assert_eq!(core.publish_confirmed("/", message).await.expect("publish").positions.len(), 1);
    let message = Message::new("amq.headers", "", "none");
    assert!(core.publish_confirmed("/", message).await.expect("publish").unroutable());
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn restart_returns_unacked_messages_and_forgets_transient_queues() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "durable", Headers::new()).await;
    let transient = QueueSpec { vhost: "/".into(), name: "transient".into(), durable: false, ..QueueSpec::default() };
    core.declare_queue(transient).await.expect("declare transient");
    for (name, durable) in [("transient-x", false), ("durable-x", true)] {
        core.declare_exchange(ExchangeSpec {
            vhost: "/".into(),
            name: name.into(),
            kind: ExchangeKind::Direct,
            passive: false,
            durable,
            auto_delete: false,
            internal: false,
            arguments: Headers::new(),
        })
        .await
        .expect("declare exchange");
    }
    for body in ["a", "b"] {
        core.publish_confirmed("/", Message::new("", "durable", body)).await.expect("publish");
    }
    let id = consumer_id(&core, 1);
    let mut consumer = core
        .consume("/", "durable", id, ConsumeOptions { prefetch: 1, no_ack: false, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    let held = next(&mut consumer).await;
    assert!(!held.redelivered);
    // The process dies with the consumer attached and its delivery unsettled: stop the groups
    // (no detach is ever proposed), then lose every write that was not durable.
    std::mem::forget(consumer);
    core.shutdown().await.expect("stop the groups");
    drop(core);
    storage.crash();

    let core = open(&storage).await;
    assert!(core.incarnation() > id.connection.incarnation);
    assert!(core.with_catalogue(|c| c.exchange("/", "transient-x").is_none()), "transient exchange survived");
    assert!(core.with_catalogue(|c| c.exchange("/", "durable-x").is_some()), "durable exchange lost");
    assert!(matches!(core.queue_status("/", "transient"), Err(CoreError::NotFound(_))), "transient queue survived");
    assert_eq!(core.queue_status("/", "durable").expect("status"), (2, 0), "the held message is back");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", "durable", id, ConsumeOptions::default()).await.expect("consume");
    let first = next(&mut consumer).await;
    assert_eq!(body(&first), "a");
    assert!(first.redelivered, "it may have been processed: redelivered");
    assert_eq!(first.delivery_count, 1);
    assert_eq!(body(&next(&mut consumer).await), "b");
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn fjall_restart_keeps_catalogue_and_messages_and_refuses_another_shard_count_or_node_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = CoreConfig::single_node(dir.path());
    config.raft_heartbeat_interval_ms = 50;
    config.raft_election_timeout_min_ms = 150;
    config.snapshot_logs_since_last = 20;
    let core = Core::open(config.clone()).await.expect("open");
    queue(&core, "kept", Headers::new()).await;
    for i in 0..100 {
        core.publish_confirmed("/", Message::new("", "kept", format!("{i}"))).await.expect("publish");
    }
    core.shutdown().await.expect("shutdown");
    drop(core);

    let core = Core::open(config.clone()).await.expect("reopen");
    assert_eq!(core.queue_status("/", "kept").expect("status").0, 100);
    let id = consumer_id(&core, 1);
    let mut consumer = core
        .consume("/", "kept", id, ConsumeOptions { prefetch: 0, no_ack: true, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    for i in 0..100 {
        assert_eq!(body(&next(&mut consumer).await), format!("{i}"));
    }
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
    drop(core);

    config.shard_count += 1;
    let error = Core::open(config.clone()).await.expect_err("shard count changed");
    assert!(error.to_string().contains("core.shard_count"), "{error}");

    // Another node's data directory is refused too, before anything is written to it.
    config.shard_count -= 1;
    config.node_id += 1;
    let error = Core::open(config.clone()).await.expect_err("another node id");
    assert!(error.to_string().contains("node.id: the data directory belongs to node 1"), "{error}");
    config.node_id -= 1;
    let core = Core::open(config).await.expect("the right node id still opens it");
    assert_eq!(core.queue_status("/", "kept").expect("status").0, 0, "consumed before");
    core.shutdown().await.expect("shutdown");
}

/// A single shard whose request queue holds 4 commands, one entry in flight, and queue `q`.
async fn overloadable() -> Core {
    let mut config = config();
    config.shard_count = 1;
    config.limits.pending_requests_max = 4;
    config.limits.pipeline_entries_max = 1;
    let core = common::open_on(config, &MemStorage::new()).await;
    queue(&core, "q", Headers::new()).await;
    core
}

#[tokio::test]
async fn overload_is_a_retryable_error() {
    let core = overloadable().await;
    let mut pending = Vec::new();
    let mut overloaded = None;
    for _ in 0..10_000 {
        match core.publish("/", Message::new("", "q", "x")).await {
            Ok(p) => pending.push(p),
            Err(error) => {
                overloaded = Some(error);
                break;
            }
        }
    }
    let error = overloaded.expect("the request queue filled up");
    assert!(matches!(error, CoreError::Overloaded(_)) && error.is_retryable(), "{error}");
    for p in pending {
        p.confirm().await.expect("queued publishes still commit");
    }
    core.shutdown().await.expect("shutdown");
}

/// A connection whose publishes must keep their order (MQTT) gets, once one of them failed with a
/// retryable error, every later one refused too, rather than stored ahead of the failed one (its
/// client sends them again, in order); until the connection is closed. Other connections are
/// not held back.
#[tokio::test]
async fn after_a_failed_ordered_publish_the_connections_later_ones_are_refused_until_it_closes() {
    let core = overloadable().await;
    let connection = core.new_connection();
    let mut outcomes = Vec::new();
    for n in 0..2_000 {
        let published = core.publish_ordered("/", Message::new("", "q", format!("{n}")), connection).await;
        outcomes.push(match published {
            Ok(pending) => tokio::spawn(pending.confirm()),
            Err(error) => tokio::spawn(async move { Err(error) }),
        });
    }
    let mut results = Vec::new();
    for outcome in outcomes {
        results.push(outcome.await.unwrap());
    }
    let first_failure = results.iter().position(Result::is_err).expect("the request queue filled up");
    assert!(first_failure > 0, "some were stored");
    for (n, result) in results.iter().enumerate().skip(first_failure) {
        let error = result.as_ref().expect_err(&format!("publish {n}, after {first_failure} failed, is refused"));
        assert!(error.is_retryable(), "{error}");
    }
    let stored = core.queue_status("/", "q").expect("status").0;
    assert_eq!(stored, first_failure as u64, "exactly those before the first failure are stored");

    // Another connection is not held back; this one is, until it closes.
    let other = core.new_connection();
    core.publish_ordered("/", Message::new("", "q", "other"), other).await.unwrap().confirm().await.expect("other");
    let held = core.publish_ordered("/", Message::new("", "q", "held"), connection).await.unwrap().confirm().await;
    assert!(held.is_err(), "still fenced: {held:?}");
    core.close_connection(connection).await.expect("close");
    core.publish_ordered("/", Message::new("", "q", "again"), connection)
        .await
        .unwrap()
        .confirm()
        .await
        .expect("again");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn dead_letter_cycles_without_rejection_are_dropped() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    // Expired messages go back to the same queue (default exchange, their own routing key): a
    // cycle with no consumer in it, which must end rather than loop forever.
    let looping = args(&[("x-message-ttl", FieldValue::I32(20)), ("x-dead-letter-exchange", FieldValue::from(""))]);
    queue(&core, "loop", looping).await;
    core.publish_confirmed("/", Message::new("", "loop", "round")).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Were it still cycling, it would reach a consumer between two expiries.
    let watcher = consumer_id(&core, 9);
    let mut watching = core.consume("/", "loop", watcher, ConsumeOptions::default()).await.expect("consume");
    nothing(&mut watching, 300).await;
    watching.cancel().await.expect("cancel");

    // A rejection is a consumer's decision: the message may come back to the same queue.
    queue(&core, "retry", args(&[("x-dead-letter-exchange", FieldValue::from(""))])).await;
    core.publish_confirmed("/", Message::new("", "retry", "again")).await.expect("publish");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", "retry", id, ConsumeOptions::default()).await.expect("consume");
    let first = next(&mut consumer).await;
    core.settle(id, &[first.position], Outcome::Reject).await.expect("reject");
    let back = next(&mut consumer).await;
    assert_eq!(body(&back), "again");
    assert_eq!(back.message.headers.get("x-first-death-reason").and_then(FieldValue::as_str), Some("rejected"));
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "doomed", args(&[("x-partitions", FieldValue::I32(2))])).await;
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", "doomed", id, ConsumeOptions::default()).await.expect("consume");
    core.delete_queue("/", "doomed", false, false, None).await.expect("delete");
    let event = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await.expect("an event");
    assert_eq!(event, Some(ConsumerEvent::Cancelled), "consumer cancel notification");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn if_unused_and_if_empty_are_checked() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "busy", Headers::new()).await;
    core.publish_confirmed("/", Message::new("", "busy", "x")).await.expect("publish");
    let not_empty = core.delete_queue("/", "busy", false, true, None).await.expect_err("not empty");
    assert!(matches!(not_empty, CoreError::PreconditionFailed(_)), "{not_empty}");
    let consumer = core.consume("/", "busy", consumer_id(&core, 1), ConsumeOptions::default()).await.expect("consume");
    let in_use = core.delete_queue("/", "busy", true, false, None).await.expect_err("in use");
    assert!(matches!(in_use, CoreError::PreconditionFailed(_)), "{in_use}");
    consumer.cancel().await.expect("cancel");
    assert_eq!(core.delete_queue("/", "busy", true, false, None).await.expect("delete"), 1, "held one message");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn no_ack_consumer_credit_is_renewed_and_prefetch_can_change() {
    let storage = MemStorage::new();
    let mut config = config();
    // A credit window of 4: the stream must renew credit many times to receive 50 messages.
    config.limits.consumer_inflight_max = 4;
    let core = common::open_on(config, &storage).await;
    queue(&core, "stream", Headers::new()).await;
    queue(&core, "acked", Headers::new()).await;
    for i in 0..50 {
        core.publish_confirmed("/", Message::new("", "stream", format!("{i}"))).await.expect("publish");
        core.publish_confirmed("/", Message::new("", "acked", format!("{i}"))).await.expect("publish");
    }
    let id = consumer_id(&core, 1);
    let mut stream = core
        .consume("/", "stream", id, ConsumeOptions { prefetch: 0, no_ack: true, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    for i in 0..50 {
        assert_eq!(body(&next(&mut stream).await), format!("{i}"));
    }
    assert_eq!(core.queue_status("/", "stream").expect("status").0, 0);

    let id = consumer_id(&core, 2);
    let mut acked = core
        .consume("/", "acked", id, ConsumeOptions { prefetch: 1, no_ack: false, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    let first = next(&mut acked).await;
    nothing(&mut acked, 100).await;
    core.set_prefetch(&acked, 3).await.expect("set prefetch");
    let more = [next(&mut acked).await, next(&mut acked).await];
    nothing(&mut acked, 100).await;
    assert_eq!((body(&first), body(&more[0]), body(&more[1])), ("0".into(), "1".into(), "2".into()));
    stream.cancel().await.expect("cancel");
    acked.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

fn with_key(queue: &str, body: &str, key: &str) -> Message {
    let mut message = Message::new("", queue, body.to_owned());
    message.idempotency_key = Some(key.into());
    message
}

#[tokio::test]
async fn idempotency_keys_give_a_duplicate_verdict_and_answer_was_it_committed() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "payments", args(&[("x-partitions", FieldValue::I32(3))])).await;
    let first = core.publish_confirmed("/", with_key("payments", "pay 10", "txn-1")).await.expect("publish");
    assert!(!first.is_duplicate());
    let original = first.positions[0];

    // The producer did not see the confirm and retries with the same key.
    let retry = core.publish_confirmed("/", with_key("payments", "pay 10", "txn-1")).await.expect("retry");
    assert!(retry.is_duplicate() && retry.confirmed(), "{retry:?}");
    assert_eq!(retry.duplicates, vec![original], "the original's position is returned");

    let found = core.idempotency_lookup("/", "payments", "txn-1").await.expect("lookup").expect("committed");
    assert_eq!(found.position, original);
    assert!(found.committed_ms > 0);
    assert_eq!(core.idempotency_lookup("/", "payments", "txn-2").await.expect("lookup"), None);

    // Consumed and acknowledged: a late retry still must not pay twice.
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", "payments", id, ConsumeOptions::default()).await.expect("consume");
    let delivery = next(&mut consumer).await;
    core.settle(id, &[delivery.position], Outcome::Ack).await.expect("ack");
    let late = core.publish_confirmed("/", with_key("payments", "pay 10", "txn-1")).await.expect("late retry");
    assert!(late.is_duplicate());
    nothing(&mut consumer, 100).await;

    let too_long = "k".repeat(257);
    let error = core.publish("/", with_key("payments", "x", &too_long)).await.expect_err("key too long");
    assert!(matches!(error, CoreError::LimitExceeded { limit: "limits.idempotency_key_len_max_bytes", .. }), "{error}");
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn concurrent_retries_of_one_key_store_it_once() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "orders", Headers::new()).await;
    // Sent together, before any is committed: Raft orders them, the first stores, the rest wait
    // for it and get its position.
    let mut pending = Vec::new();
    for _ in 0..20 {
        pending.push(core.publish("/", with_key("orders", "order 7", "order-7")).await.expect("publish"));
    }
    let mut stored = Vec::new();
    let mut duplicates = Vec::new();
    for p in pending {
        let published = p.confirm().await.expect("confirm");
        stored.extend(published.positions);
        duplicates.extend(published.duplicates);
    }
    assert_eq!(stored.len(), 1, "stored once");
    assert_eq!(duplicates.len(), 19);
    assert!(duplicates.iter().all(|d| *d == stored[0]));
    assert_eq!(core.queue_status("/", "orders").expect("status").0, 1);
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn idempotency_keys_survive_a_restart_and_expire_with_the_queue_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = CoreConfig::single_node(dir.path());
    config.raft_heartbeat_interval_ms = 50;
    config.raft_election_timeout_min_ms = 150;
    config.tick_interval_ms = 10;
    config.snapshot_logs_since_last = 5;
    let core = Core::open(config.clone()).await.expect("open");
    queue(&core, "kept", Headers::new()).await;
    queue(&core, "brief", args(&[("x-idempotency-window-ms", FieldValue::I32(200))])).await;
    let original = core.publish_confirmed("/", with_key("kept", "a", "k")).await.expect("publish").positions[0];
    for i in 0..20 {
        // Enough entries to cross snapshots: the registry must be in them.
        core.publish_confirmed("/", with_key("kept", "filler", &format!("f{i}"))).await.expect("publish");
    }
    core.shutdown().await.expect("shutdown");
    drop(core);

    let core = Core::open(config).await.expect("reopen");
    let retry = core.publish_confirmed("/", with_key("kept", "a", "k")).await.expect("retry");
    assert_eq!(retry.duplicates, vec![original], "the registry survived the restart");

    core.publish_confirmed("/", with_key("brief", "b", "short")).await.expect("publish");
    assert!(core.publish_confirmed("/", with_key("brief", "b", "short")).await.expect("retry").is_duplicate());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(core.idempotency_lookup("/", "brief", "short").await.expect("lookup"), None, "window over");
    let after = core.publish_confirmed("/", with_key("brief", "b", "short")).await.expect("publish");
    assert!(!after.is_duplicate(), "outside the window it is a new message");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_key_is_scoped_to_each_destination_queue() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "a", Headers::new()).await;
    queue(&core, "b", Headers::new()).await;
    for name in ["a", "b"] {
        let binding = BindingSpec {
            vhost: "/".into(),
            source: "amq.fanout".into(),
            destination: Destination::Queue(name.into()),
            routing_key: String::new(),
            arguments: Headers::new(),
        };
        core.bind(binding, None).await.expect("bind");
    }
    let mut message = Message::new("amq.fanout", "", "to both");
    message.idempotency_key = Some("k".into());
    let first = core.publish_confirmed("/", message.clone()).await.expect("publish");
    assert_eq!(first.positions.len(), 2, "one message per queue");
    let retry = core.publish_confirmed("/", message).await.expect("retry");
    assert!(retry.is_duplicate());
    assert_eq!(retry.duplicates.len(), 2, "each queue recognises it");
    // The same key sent straight to one queue is that queue's duplicate too.
    assert!(core.publish_confirmed("/", with_key("a", "direct", "k")).await.expect("publish").is_duplicate());
    core.shutdown().await.expect("shutdown");
}

/// Queues named `prefix0..` until two land on different shards (placement is by hash).
async fn queues_on_two_shards(core: &Core, prefix: &str) -> (String, String) {
    let mut seen: std::collections::BTreeMap<u32, String> = Default::default();
    for i in 0..32 {
        let name = format!("{prefix}{i}");
        queue(core, &name, Headers::new()).await;
        let id = core.with_catalogue(|c| c.queue("/", &name).map(|q| q.id)).expect("declared");
        let shard = wharf_core::placement::shard_for(id, 0, core.config().shard_count);
        seen.entry(shard).or_insert(name);
        if seen.len() >= 2 {
            let mut names = seen.into_values();
            return (names.next().expect("first"), names.next().expect("second"));
        }
    }
    panic!("32 queues all on one shard");
}

#[tokio::test]
async fn consume_transform_produce_commits_atomically_across_shards() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let (input, output) = queues_on_two_shards(&core, "ctp").await;
    core.publish_confirmed("/", Message::new("", &input, "order 1")).await.expect("publish");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", &input, id, ConsumeOptions::default()).await.expect("consume");
    let delivery = next(&mut consumer).await;

    let mut txn = core.begin_txn();
    txn.ack(id, &[delivery.position]);
    txn.publish("/", with_key(&output, "payment for order 1", "pay-order-1"));
    let committed = core.commit_txn(txn).await.expect("commit");
    assert_eq!(committed.published.len(), 1);
    assert_eq!(committed.published[0].positions.len(), 1);
    assert_eq!(core.queue_status("/", &input).expect("status").0, 0);
    assert_eq!(core.queue_status("/", &output).expect("status").0, 1);
    // The acknowledgement was part of the commit: the input is gone for good.
    assert_eq!(core.settle(id, &[delivery.position], Outcome::Ack).await.expect("ack"), vec![delivery.position]);
    // The coordinator forgot it once every participant applied the decision.
    assert_eq!(core.with_catalogue(|c| c.txns().count()), 0);
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_refused_transaction_changes_nothing_anywhere() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let (a, b) = queues_on_two_shards(&core, "refuse").await;
    core.publish_confirmed("/", with_key(&b, "already", "k-1")).await.expect("publish");
    core.publish_confirmed("/", Message::new("", &a, "input")).await.expect("publish");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", &a, id, ConsumeOptions::default()).await.expect("consume");
    let delivery = next(&mut consumer).await;

    // A duplicate key on one shard fails the whole transaction, with the reason.
    let mut txn = core.begin_txn();
    txn.ack(id, &[delivery.position]);
    txn.publish("/", Message::new("", &a, "new in a"));
    txn.publish("/", with_key(&b, "again", "k-1"));
    let error = core.commit_txn(txn).await.expect_err("duplicate key");
    assert!(error.to_string().contains("duplicate idempotency key 'k-1'"), "{error}");
    assert_eq!(core.queue_status("/", &a).expect("status").0, 0, "nothing published to a");
    assert_eq!(core.queue_status("/", &b).expect("status").0, 1, "nothing published to b");
    // The acknowledgement was discarded: the consumer still holds the delivery and may ack it.
    assert!(core.settle(id, &[delivery.position], Outcome::Requeue).await.expect("settle").is_empty());
    let again = next(&mut consumer).await;

    // Acknowledging a delivery one does not hold fails it too (AMQP: unknown delivery tag).
    let mut txn = core.begin_txn();
    txn.ack(id, &[Position { offset: again.position.offset + 100, ..again.position }]);
    txn.publish("/", Message::new("", &b, "not this"));
    let error = core.commit_txn(txn).await.expect_err("unknown delivery");
    assert!(error.to_string().contains("not held"), "{error}");
    assert_eq!(core.queue_status("/", &b).expect("status").0, 1);

    // A single-shard transaction is refused the same way.
    let mut txn = core.begin_txn();
    txn.publish("/", with_key(&b, "again", "k-1"));
    assert!(core.commit_txn(txn).await.is_err());
    assert_eq!(core.with_catalogue(|c| c.txns().count()), 0, "refused transactions are forgotten");
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

/// Consume an input from queue `a`, then run a transaction acknowledging it and publishing
/// `outputs` (queue, body), stopping at `stop`; then crash and restart. Returns the restarted core.
async fn transaction_crashing_at(
    storage: &MemStorage,
    prefix: &str,
    stop: wharf_core::node::TxnStop,
    outputs: &[(bool, &str)],
) -> (Core, String, String) {
    let core = open(storage).await;
    let (a, b) = queues_on_two_shards(&core, prefix).await;
    core.publish_confirmed("/", Message::new("", &a, "input")).await.expect("publish");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", &a, id, ConsumeOptions::default()).await.expect("consume");
    let delivery = next(&mut consumer).await;
    let mut txn = core.begin_txn();
    txn.ack(id, &[delivery.position]);
    for (to_a, body) in outputs {
        txn.publish("/", Message::new("", if *to_a { &a } else { &b }, body.to_string()));
    }
    assert!(core.commit_txn_until(txn, stop).await.expect("run to the stop").is_none());
    // The process dies there, its consumer still attached.
    std::mem::forget(consumer);
    core.shutdown().await.expect("stop");
    drop(core);
    storage.crash();
    (open(storage).await, a, b)
}

#[tokio::test]
async fn a_crash_after_some_prepares_aborts_and_returns_the_inputs() {
    let storage = MemStorage::new();
    let stop = wharf_core::node::TxnStop::AfterPrepared(1);
    let (core, a, b) = transaction_crashing_at(&storage, "crash", stop, &[(false, "output")]).await;
    // In doubt with no decision and a dead coordinator: aborted at start. The input is back,
    // redelivered; the output never appears.
    assert_eq!(core.queue_status("/", &a).expect("status").0, 1, "input returned");
    assert_eq!(core.queue_status("/", &b).expect("status").0, 0, "output invisible");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", &a, id, ConsumeOptions::default()).await.expect("consume");
    assert!(next(&mut consumer).await.redelivered);
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_crash_after_the_decision_commits_everywhere() {
    let storage = MemStorage::new();
    let stop = wharf_core::node::TxnStop::AfterDecision;
    let outputs = [(true, "output a"), (false, "output b")];
    let (core, a, b) = transaction_crashing_at(&storage, "decided", stop, &outputs).await;
    assert_eq!(core.queue_status("/", &a).expect("status").0, 1, "input acked, output a stored");
    assert_eq!(core.queue_status("/", &b).expect("status").0, 1, "output b stored");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", &a, id, ConsumeOptions::default()).await.expect("consume");
    assert_eq!(body(&next(&mut consumer).await), "output a");
    assert_eq!(core.with_catalogue(|c| c.txns().count()), 0, "forgotten once applied");
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_transaction_past_its_timeout_aborts() {
    let storage = MemStorage::new();
    let mut config = config();
    config.limits.txn_timeout_ms = 1;
    let core = common::open_on(config, &storage).await;
    let (a, b) = queues_on_two_shards(&core, "slow").await;
    let mut txn = core.begin_txn();
    txn.publish("/", Message::new("", &a, "x"));
    txn.publish("/", Message::new("", &b, "y"));
    // Begun, then the coordinator stalls past the deadline: only abort can be decided.
    let id = txn.id();
    assert!(core.commit_txn_until(txn, wharf_core::node::TxnStop::AfterBegin).await.expect("begin").is_none());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = core.with_catalogue(|c| c.txn(id).cloned());
    assert!(record.is_none() || record.as_ref().and_then(|r| r.decision) == Some(false), "{record:?}");
    assert_eq!(core.queue_status("/", &a).expect("status").0, 0);
    assert_eq!(core.queue_status("/", &b).expect("status").0, 0);
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_explicitly_prepared_transaction_waits_for_its_decision() {
    let storage = MemStorage::new();
    let mut config = config();
    config.limits.txn_timeout_ms = 400;
    let core = common::open_on(config, &storage).await;
    let (a, b) = queues_on_two_shards(&core, "explicit").await;
    core.publish_confirmed("/", Message::new("", &a, "input")).await.expect("input");
    let id = consumer_id(&core, 1);
    let mut consumer = core.consume("/", &a, id, ConsumeOptions::default()).await.expect("consume");
    let input = next(&mut consumer).await;

    // Prepared: the output is invisible and the input locked, until commit.
    let mut txn = core.begin_txn();
    txn.ack(id, &[input.position]);
    txn.publish("/", Message::new("", &b, "output"));
    let prepared = core.prepare_txn(txn, None).await.expect("prepare");
    assert_eq!(prepared.timeout_ms(), 400);
    assert_eq!(core.queue_status("/", &b).expect("status").0, 0, "invisible while prepared");
    let committed = core.finish_txn(prepared, true).await.expect("commit").expect("committed");
    assert_eq!(committed.published.len(), 1);
    assert_eq!(committed.published[0].positions.len(), 1, "{committed:?}");
    assert_eq!(core.queue_status("/", &b).expect("status").0, 1, "visible once committed");
    assert!(core.settle(id, &[input.position], Outcome::Ack).await.expect("settle").len() == 1, "acked by the txn");

    // Rolled back: nothing published, nothing acked.
    core.publish_confirmed("/", Message::new("", &a, "second")).await.expect("second");
    let second = next(&mut consumer).await;
    let mut txn = core.begin_txn();
    txn.ack(id, &[second.position]);
    txn.publish("/", Message::new("", &b, "never"));
    let prepared = core.prepare_txn(txn, None).await.expect("prepare");
    assert!(core.finish_txn(prepared, false).await.expect("abort").is_none());
    assert_eq!(core.queue_status("/", &b).expect("status").0, 1, "no second output");
    assert!(core.settle(id, &[second.position], Outcome::Ack).await.expect("settle").is_empty(), "still held");

    // Left past its deadline: rolled back whatever the late caller asks.
    let mut txn = core.begin_txn();
    txn.publish("/", Message::new("", &a, "late"));
    txn.publish("/", Message::new("", &b, "late"));
    let prepared = core.prepare_txn(txn, None).await.expect("prepare");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(core.finish_txn(prepared, true).await.expect("late commit").is_none(), "rolled back");
    assert_eq!(core.queue_status("/", &b).expect("status").0, 1);
    consumer.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn half_messages_are_invisible_until_their_producer_commits() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "orders", Headers::new()).await;
    let kept = core.prepare_half("/", Message::new("", "orders", "kept"), "shop").await.expect("prepare");
    let dropped = core.prepare_half("/", Message::new("", "orders", "dropped"), "shop").await.expect("prepare");
    assert_eq!(core.queue_status("/", "orders").expect("status").0, 0, "half messages are invisible");
    assert!(core.end_half(kept, true).await.expect("commit"));
    assert!(!core.end_half(dropped, false).await.expect("roll back"));
    let holder = consumer_id(&core, 1);
    let got = core.get("/", "orders", holder, true).await.expect("get").expect("the committed one");
    assert_eq!(body(&got), "kept");
    assert!(core.get("/", "orders", holder, true).await.expect("get").is_none());
    let again = core.end_half(kept, true).await.expect_err("already ended");
    assert!(matches!(again, CoreError::NotFound(_)), "{again}");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_silent_producer_is_checked_back_and_its_answer_applied() {
    let storage = MemStorage::new();
    let mut config = config();
    config.limits.half_message_check_interval_ms = 50;
    let core = common::open_on(config, &storage).await;
    queue(&core, "orders", Headers::new()).await;
    let mut checks = core.register_check_back("shop");
    let txn = core.prepare_half("/", Message::new("", "orders", "paid"), "shop").await.expect("prepare");

    // First question: the producer does not know yet. It is asked again later.
    let first = tokio::time::timeout(Duration::from_secs(5), checks.recv()).await.expect("asked").expect("open");
    assert_eq!(first.txn, txn);
    assert_eq!(first.message.as_ref().map(|m| body_of(m)), Some("paid".to_owned()));
    first.reply.send(None).expect("answer");
    let second = tokio::time::timeout(Duration::from_secs(5), checks.recv()).await.expect("asked again").expect("open");
    assert!(core.with_catalogue(|c| c.txn(txn).and_then(|r| r.half.as_ref().map(|h| h.checks))).unwrap_or(0) >= 1);
    // Now it knows: committed.
    second.reply.send(Some(true)).expect("answer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while core.queue_status("/", "orders").expect("status").0 == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the check-back answer was not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(core.with_catalogue(|c| c.txn(txn).is_none()), "forgotten once applied");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_undecided_half_message_is_rolled_back_at_its_age_limit() {
    let storage = MemStorage::new();
    let mut config = config();
    config.limits.half_message_age_max_ms = 150;
    let core = common::open_on(config, &storage).await;
    queue(&core, "orders", Headers::new()).await;
    let txn = core.prepare_half("/", Message::new("", "orders", "late"), "nobody").await.expect("prepare");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(core.with_catalogue(|c| c.txn(txn).is_none()), "rolled back and forgotten");
    assert_eq!(core.queue_status("/", "orders").expect("status").0, 0);
    let late = core.end_half(txn, true).await.expect_err("too late");
    assert!(matches!(late, CoreError::NotFound(_)), "{late}");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_pending_half_message_survives_a_crash_for_its_producer_to_decide() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "orders", Headers::new()).await;
    let txn = core.prepare_half("/", Message::new("", "orders", "after crash"), "shop").await.expect("prepare");
    core.shutdown().await.expect("stop");
    drop(core);
    storage.crash();
    let core = open(&storage).await;
    assert!(core.with_catalogue(|c| c.txn(txn).is_some()), "still pending: its producer decides, not the restart");
    assert_eq!(core.queue_status("/", "orders").expect("status").0, 0);
    assert!(core.end_half(txn, true).await.expect("commit after the restart"));
    assert_eq!(core.queue_status("/", "orders").expect("status").0, 1);
    core.shutdown().await.expect("shutdown");
}

fn body_of(message: &Message) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

/// MQTT 4.7.2 through the whole publish path: a binding with `x-exclude-dollar-topics` does not
/// take `$` topics with a wildcard first word; one without it (AMQP) does.
#[tokio::test]
async fn dollar_topics_skip_wildcard_bindings_that_exclude_them() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let rule = args(&[(wharf_core::catalogue::topic::EXCLUDE_DOLLAR_TOPICS, FieldValue::Bool(true))]);
    for (name, pattern, arguments) in
        [("mqtt-all", "#", rule.clone()), ("mqtt-sys", "$SYS.#", rule), ("amqp-all", "#", Headers::new())]
    {
        queue(&core, name, Headers::new()).await;
        let binding = BindingSpec {
            vhost: "/".into(),
            source: "amq.topic".into(),
            destination: Destination::Queue(name.into()),
            routing_key: pattern.into(),
            arguments,
        };
        core.bind(binding, None).await.expect("bind");
    }
    core.publish_confirmed("/", Message::new("amq.topic", "$SYS.broker.load", "sys")).await.expect("publish");
    core.publish_confirmed("/", Message::new("amq.topic", "sensors.t1", "plain")).await.expect("publish");
    assert_eq!(core.queue_status("/", "mqtt-all").expect("status").0, 1, "only the plain topic");
    assert_eq!(core.queue_status("/", "mqtt-sys").expect("status").0, 1, "only the $SYS topic");
    assert_eq!(core.queue_status("/", "amqp-all").expect("status").0, 2, "AMQP: $ is an ordinary character");
    let holder = consumer_id(&core, 1);
    let got = core.get("/", "mqtt-all", holder, true).await.expect("get").expect("a message");
    assert_eq!(body(&got), "plain");
    core.shutdown().await.expect("shutdown");
}

/// A delivery carries the committed time its message was stored at, the same after a restart that
/// restored the partition from a snapshot.
#[tokio::test]
async fn deliveries_carry_their_enqueued_time_across_a_restart() {
    let storage = MemStorage::new();
    let mut config = config();
    config.snapshot_logs_since_last = 5;
    let core = common::open_on(config.clone(), &storage).await;
    queue(&core, "q", Headers::new()).await;
    let before_ms = now_ms();
    core.publish_confirmed("/", Message::new("", "q", "first")).await.expect("publish");
    let after_ms = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..20 {
        // Enough entries to cross snapshots, and later enqueued times.
        core.publish_confirmed("/", Message::new("", "q", format!("filler {i}"))).await.expect("publish");
    }
    let holder = consumer_id(&core, 1);
    let first = core.get("/", "q", holder, false).await.expect("get").expect("a message");
    assert_eq!(body(&first), "first");
    assert!((before_ms..=after_ms).contains(&first.enqueued_ms), "{before_ms} <= {} <= {after_ms}", first.enqueued_ms);
    core.shutdown().await.expect("shutdown");
    drop(core);

    let core = common::open_on(config, &storage).await;
    let holder = consumer_id(&core, 1);
    let again = core.get("/", "q", holder, true).await.expect("get").expect("the message again");
    assert_eq!(body(&again), "first");
    assert!(again.redelivered);
    assert_eq!(again.enqueued_ms, first.enqueued_ms, "the stored time, not the redelivery time");
    let filler = core.get("/", "q", holder, true).await.expect("get").expect("a filler");
    assert!(filler.enqueued_ms >= first.enqueued_ms + 20, "each message keeps its own time");
    core.shutdown().await.expect("shutdown");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

/// The catalogue enforces the configured limits, not its built-in defaults, and a restart with
/// other limits adopts them.
#[tokio::test]
async fn configured_catalogue_limits_are_enforced_and_follow_restarts() {
    let storage = MemStorage::new();
    let mut limited = config();
    limited.limits.queues_max = 2;
    let core = common::open_on(limited.clone(), &storage).await;
    queue(&core, "one", Headers::new()).await;
    queue(&core, "two", Headers::new()).await;
    let spec = QueueSpec { vhost: "/".into(), name: "three".into(), durable: true, ..QueueSpec::default() };
    let refused = core.declare_queue(spec.clone()).await.expect_err("a third queue is over limits.queues_max");
    assert!(matches!(refused, CoreError::LimitExceeded { limit: "limits.queues_max", .. }), "{refused:?}");
    core.shutdown().await.expect("shutdown");

    limited.limits.queues_max = 3;
    let core = common::open_on(limited, &storage).await;
    core.declare_queue(spec).await.expect("the raised limit is adopted after a restart");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_exclusive_consumer_is_alone_on_its_queue() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "solo", args(&[("x-partitions", FieldValue::I32(2))])).await;
    let exclusive = ConsumeOptions { exclusive: true, ..ConsumeOptions::default() };
    let first = core.consume("/", "solo", consumer_id(&core, 1), exclusive).await.expect("exclusive on an idle queue");
    let error =
        core.consume("/", "solo", consumer_id(&core, 2), ConsumeOptions::default()).await.expect_err("locked out");
    assert_eq!(error.to_string(), "ACCESS_REFUSED - queue 'solo' in vhost '/' in exclusive use");
    first.cancel().await.expect("cancel");
    let second = core.consume("/", "solo", consumer_id(&core, 3), ConsumeOptions::default()).await.expect("free");
    let error = core.consume("/", "solo", consumer_id(&core, 4), exclusive).await.expect_err("others attached");
    assert!(matches!(error, CoreError::AccessRefused(_)), "{error:?}");
    second.cancel().await.expect("cancel");
    core.shutdown().await.expect("shutdown");
}
