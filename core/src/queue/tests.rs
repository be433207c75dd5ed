//! Unit tests of one partition's rules, one behaviour each.

use super::*;
use crate::model::{Message, Overflow, QueueArgs};

const CAPS: PartitionCaps = PartitionCaps {
    messages_max: 1_000,
    bytes_max: 1 << 20,
    consumer_inflight_max: 100,
    consumers_max: 10,
    idempotency_window_ms: 10_000,
    idempotency_keys_max: 100,
    idempotency_key_bytes_max: 1 << 16,
};

fn partition(args: QueueArgs) -> Partition {
    Partition::new(QueueId(7), 0, QueueName { vhost: "/".into(), name: "q".into() }, args, CAPS, 1_000)
}

fn consumer(seq: u64) -> ConsumerId {
    ConsumerId { connection: ConnectionId { node: 1, incarnation: 1, seq: 1 }, seq }
}

fn message(body: &str) -> MessageRef {
    Arc::new(Message::new("ex", "rk", body.as_bytes().to_vec()))
}

fn with_priority(body: &str, priority: u8) -> MessageRef {
    let mut m = Message::new("ex", "rk", body.as_bytes().to_vec());
    m.properties.priority = Some(priority);
    Arc::new(m)
}

fn bodies(effects: &[Effect]) -> Vec<(u64, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver(d) => Some((d.consumer.seq, String::from_utf8_lossy(&d.message.payload).into_owned())),
            _ => None,
        })
        .collect()
}

fn offsets(effects: &[Effect]) -> Vec<u64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver(d) => Some(d.position.offset),
            _ => None,
        })
        .collect()
}

fn dead_letters(effects: &[Effect]) -> Vec<&DeadLetter> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::DeadLetter(d) => Some(d),
            _ => None,
        })
        .collect()
}

#[test]
fn delivers_in_order_and_ack_removes() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    for body in ["a", "b", "c"] {
        assert!(matches!(p.publish(1_000, message(body), &mut fx), Enqueued::Stored(_)));
    }
    assert!(fx.is_empty());
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    assert_eq!(bodies(&fx), vec![(1, "a".into()), (1, "b".into()), (1, "c".into())]);
    assert_eq!(p.unacked_len(), 3);
    let unknown = p.settle(1_000, consumer(1), &[0, 1, 2, 9], Outcome::Ack, &mut fx);
    assert_eq!(unknown, vec![9]);
    assert!(p.is_empty());
    p.check_invariants().expect("invariants");
}

#[test]
fn round_robin_between_consumers() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    p.attach(1_000, consumer(2), 10, false, 0, &mut fx).expect("attach");
    for body in ["a", "b", "c", "d"] {
        p.publish(1_000, message(body), &mut fx);
    }
    assert_eq!(bodies(&fx), vec![(1, "a".into()), (2, "b".into()), (1, "c".into()), (2, "d".into())]);
}

#[test]
fn prefetch_bounds_unacked() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.attach(1_000, consumer(1), 2, false, 0, &mut fx).expect("attach");
    for body in ["a", "b", "c"] {
        p.publish(1_000, message(body), &mut fx);
    }
    assert_eq!(offsets(&fx), vec![0, 1]);
    fx.clear();
    p.settle(1_000, consumer(1), &[0], Outcome::Ack, &mut fx);
    assert_eq!(offsets(&fx), vec![2]);
}

#[test]
fn requeue_redelivers_in_original_place_with_count() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    for body in ["a", "b"] {
        p.publish(1_000, message(body), &mut fx);
    }
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    fx.clear();
    p.settle(1_000, consumer(1), &[0], Outcome::Requeue, &mut fx);
    let Some(Effect::Deliver(d)) = fx.first() else { panic!("no redelivery: {fx:?}") };
    assert_eq!(d.position.offset, 0, "requeued message goes back to the head");
    assert!(d.redelivered);
    assert_eq!(d.delivery_count, 1);
}

#[test]
fn consumer_leaving_returns_its_messages_to_others() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.publish(1_000, message("a"), &mut fx);
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    p.attach(1_000, consumer(2), 1, false, 0, &mut fx).expect("attach");
    fx.clear();
    assert!(p.detach(1_000, consumer(1), &mut fx));
    assert_eq!(bodies(&fx), vec![(2, "a".into())]);
    p.check_invariants().expect("invariants");
}

#[test]
fn reject_dead_letters_with_x_death() {
    let args = QueueArgs {
        dead_letter_exchange: Some("dlx".into()),
        dead_letter_routing_key: Some("dead".into()),
        ..QueueArgs::default()
    };
    let mut p = partition(args);
    let mut fx = Vec::new();
    let mut m = Message::new("ex", "rk", b"a".to_vec());
    m.properties.expiration_ms = Some(60_000);
    p.publish(1_000, Arc::new(m), &mut fx);
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    fx.clear();
    p.settle(2_000, consumer(1), &[0], Outcome::Reject, &mut fx);
    let dead = dead_letters(&fx);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].exchange, "dlx");
    assert_eq!(dead[0].routing_key, "dead");
    let headers = &dead[0].message.headers;
    let Some(FieldValue::Array(deaths)) = headers.get("x-death") else { panic!("no x-death: {headers:?}") };
    let FieldValue::Table(death) = &deaths[0] else { panic!("x-death entry not a table") };
    assert_eq!(death.get("reason").and_then(FieldValue::as_str), Some("rejected"));
    assert_eq!(death.get("queue").and_then(FieldValue::as_str), Some("q"));
    assert_eq!(death.get("count").and_then(FieldValue::as_i64), Some(1));
    assert_eq!(death.get("original-expiration").and_then(FieldValue::as_str), Some("60000"));
    assert_eq!(dead[0].message.properties.expiration_ms, None);
    assert_eq!(headers.get("x-first-death-reason").and_then(FieldValue::as_str), Some("rejected"));
    // Held until the leader says it was republished; a new leader would find it again.
    assert_eq!(p.len(), 1);
    assert_eq!(p.dead_lettering().len(), 1);
    p.dead_lettered(&[0]);
    assert!(p.is_empty());
    p.check_invariants().expect("invariants");
}

#[test]
fn repeated_death_in_same_queue_counts() {
    let args = QueueArgs { dead_letter_exchange: Some("dlx".into()), ..QueueArgs::default() };
    let mut p = partition(args);
    let mut fx = Vec::new();
    p.publish(1_000, message("a"), &mut fx);
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    p.settle(1_000, consumer(1), &[0], Outcome::Reject, &mut fx);
    let again = dead_letters(&fx)[0].message.clone();
    fx.clear();
    p.publish(1_000, again, &mut fx);
    p.settle(1_000, consumer(1), &[1], Outcome::Reject, &mut fx);
    let dead = dead_letters(&fx);
    let Some(FieldValue::Array(deaths)) = dead[0].message.headers.get("x-death") else { panic!("no x-death") };
    assert_eq!(deaths.len(), 1, "same queue and reason share one entry");
    let FieldValue::Table(death) = &deaths[0] else { panic!("not a table") };
    assert_eq!(death.get("count").and_then(FieldValue::as_i64), Some(2));
}

#[test]
fn reject_without_dead_letter_exchange_drops() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.publish(1_000, message("a"), &mut fx);
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    fx.clear();
    p.settle(1_000, consumer(1), &[0], Outcome::Reject, &mut fx);
    assert!(fx.is_empty());
    assert!(p.is_empty());
}

#[test]
fn max_length_drops_head() {
    let mut p = partition(QueueArgs { length_max: Some(2), ..QueueArgs::default() });
    let mut fx = Vec::new();
    for body in ["a", "b", "c"] {
        p.publish(1_000, message(body), &mut fx);
    }
    assert_eq!(p.ready_len(), 2);
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    assert_eq!(bodies(&fx), vec![(1, "b".into()), (1, "c".into())]);
}

#[test]
fn max_length_reject_publish() {
    let mut p = partition(QueueArgs { length_max: Some(1), overflow: Overflow::RejectPublish, ..QueueArgs::default() });
    let mut fx = Vec::new();
    assert_eq!(p.publish(1_000, message("a"), &mut fx), Enqueued::Stored(0));
    assert_eq!(p.publish(1_000, message("b"), &mut fx), Enqueued::Rejected);
    assert_eq!(p.len(), 1);
}

#[test]
fn max_length_reject_publish_dlx_dead_letters_the_refused() {
    let args = QueueArgs {
        length_max: Some(1),
        overflow: Overflow::RejectPublishDlx,
        dead_letter_exchange: Some("dlx".into()),
        ..QueueArgs::default()
    };
    let mut p = partition(args);
    let mut fx = Vec::new();
    p.publish(1_000, message("a"), &mut fx);
    assert_eq!(p.publish(1_000, message("b"), &mut fx), Enqueued::Rejected);
    let dead = dead_letters(&fx);
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].message.payload[..], b"b");
    p.check_invariants().expect("invariants");
}

#[test]
fn max_bytes_drops_head() {
    let mut p = partition(QueueArgs { bytes_max: Some(5), ..QueueArgs::default() });
    let mut fx = Vec::new();
    p.publish(1_000, message("aaa"), &mut fx);
    p.publish(1_000, message("bbb"), &mut fx);
    assert_eq!(p.ready_len(), 1);
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    assert_eq!(bodies(&fx), vec![(1, "bbb".into())]);
}

#[test]
fn capacity_cap_refuses_whatever_the_arguments() {
    let mut p = Partition::new(
        QueueId(1),
        0,
        QueueName { vhost: "/".into(), name: "q".into() },
        QueueArgs::default(),
        PartitionCaps { messages_max: 2, ..CAPS },
        0,
    );
    let mut fx = Vec::new();
    p.publish(0, message("a"), &mut fx);
    p.publish(0, message("b"), &mut fx);
    assert_eq!(p.publish(0, message("c"), &mut fx), Enqueued::Rejected);
}

#[test]
fn priorities_deliver_highest_first_capped_at_max() {
    let mut p = partition(QueueArgs { priority_max: Some(5), ..QueueArgs::default() });
    let mut fx = Vec::new();
    p.publish(1_000, with_priority("low", 1), &mut fx);
    p.publish(1_000, with_priority("capped", 200), &mut fx);
    p.publish(1_000, with_priority("high", 5), &mut fx);
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    // 200 is capped at 5 and is older than "high": both priority 5, then offset order.
    assert_eq!(bodies(&fx), vec![(1, "capped".into()), (1, "high".into()), (1, "low".into())]);
}

#[test]
fn priorities_ignored_without_max_priority() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.publish(1_000, with_priority("low", 1), &mut fx);
    p.publish(1_000, with_priority("high", 9), &mut fx);
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    assert_eq!(bodies(&fx), vec![(1, "low".into()), (1, "high".into())]);
}

#[test]
fn queue_ttl_expires_at_tick_and_dead_letters() {
    let args =
        QueueArgs { message_ttl_ms: Some(100), dead_letter_exchange: Some("dlx".into()), ..QueueArgs::default() };
    let mut p = partition(args);
    let mut fx = Vec::new();
    p.publish(1_000, message("a"), &mut fx);
    assert_eq!(p.next_deadline_ms(), Some(1_100));
    p.tick(1_099, &mut fx);
    assert!(fx.is_empty());
    p.tick(1_100, &mut fx);
    let dead = dead_letters(&fx);
    assert_eq!(dead.len(), 1);
    let Some(FieldValue::Array(deaths)) = dead[0].message.headers.get("x-death") else { panic!("no x-death") };
    let FieldValue::Table(death) = &deaths[0] else { panic!("not a table") };
    assert_eq!(death.get("reason").and_then(FieldValue::as_str), Some("expired"));
}

#[test]
fn per_message_ttl_takes_the_smaller() {
    let mut p = partition(QueueArgs { message_ttl_ms: Some(1_000), ..QueueArgs::default() });
    let mut fx = Vec::new();
    let mut m = Message::new("ex", "rk", b"a".to_vec());
    m.properties.expiration_ms = Some(10);
    p.publish(1_000, Arc::new(m), &mut fx);
    p.tick(1_010, &mut fx);
    assert!(p.is_empty());
}

#[test]
fn ttl_zero_delivers_to_a_waiting_consumer_or_expires() {
    let mut p = partition(QueueArgs { message_ttl_ms: Some(0), ..QueueArgs::default() });
    let mut fx = Vec::new();
    p.publish(1_000, message("gone"), &mut fx);
    assert!(p.is_empty(), "no consumer: expired at once");
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    p.publish(1_000, message("taken"), &mut fx);
    assert_eq!(bodies(&fx), vec![(1, "taken".into())]);
}

#[test]
fn expired_unacked_message_is_not_requeued() {
    let mut p = partition(QueueArgs { message_ttl_ms: Some(100), ..QueueArgs::default() });
    let mut fx = Vec::new();
    p.publish(1_000, message("a"), &mut fx);
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    p.tick(5_000, &mut fx);
    assert_eq!(p.len(), 1, "checked-out messages do not expire");
    p.settle(5_000, consumer(1), &[0], Outcome::Requeue, &mut fx);
    assert!(p.is_empty(), "returned after its deadline: expired");
}

#[test]
fn delayed_message_is_invisible_until_due() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    let mut m = Message::new("ex", "rk", b"later".to_vec());
    m.delay_ms = Some(500);
    p.publish(1_000, Arc::new(m), &mut fx);
    p.publish(1_000, message("now"), &mut fx);
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    assert_eq!(bodies(&fx), vec![(1, "now".into())]);
    assert_eq!(p.next_deadline_ms(), Some(1_500));
    fx.clear();
    p.tick(1_499, &mut fx);
    assert!(fx.is_empty());
    p.tick(1_500, &mut fx);
    assert_eq!(bodies(&fx), vec![(1, "later".into())]);
    p.check_invariants().expect("invariants");
}

#[test]
fn single_active_consumer_fails_over_in_attach_order() {
    let mut p = partition(QueueArgs { single_active_consumer: true, ..QueueArgs::default() });
    let mut fx = Vec::new();
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    p.attach(1_000, consumer(2), 10, false, 0, &mut fx).expect("attach");
    assert!(p.is_active(consumer(1)));
    assert!(!p.is_active(consumer(2)));
    for body in ["a", "b"] {
        p.publish(1_000, message(body), &mut fx);
    }
    assert_eq!(bodies(&fx), vec![(1, "a".into()), (1, "b".into())]);
    fx.clear();
    p.detach(1_000, consumer(1), &mut fx);
    assert_eq!(bodies(&fx), vec![(2, "a".into()), (2, "b".into())], "the next consumer takes over, in order");
}

#[test]
fn delivery_limit_dead_letters() {
    let args = QueueArgs { delivery_limit: Some(1), dead_letter_exchange: Some("dlx".into()), ..QueueArgs::default() };
    let mut p = partition(args);
    let mut fx = Vec::new();
    p.publish(1_000, message("poison"), &mut fx);
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    p.settle(1_000, consumer(1), &[0], Outcome::Requeue, &mut fx);
    assert!(dead_letters(&fx).is_empty(), "first return is within the limit");
    fx.clear();
    p.settle(1_000, consumer(1), &[0], Outcome::Requeue, &mut fx);
    let dead = dead_letters(&fx);
    assert_eq!(dead.len(), 1);
    let Some(FieldValue::Array(deaths)) = dead[0].message.headers.get("x-death") else { panic!("no x-death") };
    let FieldValue::Table(death) = &deaths[0] else { panic!("not a table") };
    assert_eq!(death.get("reason").and_then(FieldValue::as_str), Some("delivery_limit"));
}

#[test]
fn get_with_and_without_ack() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    for body in ["a", "b"] {
        p.publish(1_000, message(body), &mut fx);
    }
    let first = p.get(1_000, consumer(9), true, &mut fx).expect("a message");
    assert_eq!(&first.message.payload[..], b"a");
    assert_eq!(first.ready_after, 1);
    let second = p.get(1_000, consumer(9), false, &mut fx).expect("a message");
    assert_eq!(second.position.offset, 1);
    assert!(p.get(1_000, consumer(9), false, &mut fx).is_none());
    assert_eq!(p.len(), 1, "held by the getter until settled");
    p.detach(1_000, consumer(9), &mut fx);
    assert_eq!(p.ready_len(), 1, "the getter's channel closed: returned");
    p.check_invariants().expect("invariants");
}

#[test]
fn purge_keeps_unacked() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    for body in ["a", "b", "c"] {
        p.publish(1_000, message(body), &mut fx);
    }
    p.attach(1_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    assert_eq!(p.purge(), 2);
    assert_eq!(p.len(), 1);
    p.check_invariants().expect("invariants");
}

#[test]
fn no_ack_consumer_uses_credit() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    for body in ["a", "b", "c"] {
        p.publish(1_000, message(body), &mut fx);
    }
    p.attach(1_000, consumer(1), 0, true, 2, &mut fx).expect("attach");
    assert_eq!(offsets(&fx), vec![0, 1]);
    assert_eq!(p.len(), 1, "no-ack deliveries are settled on sending");
    fx.clear();
    p.add_credit(1_000, consumer(1), 5, &mut fx);
    assert_eq!(offsets(&fx), vec![2]);
}

#[test]
fn consumer_cap_is_enforced() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    for seq in 0..u64::from(CAPS.consumers_max) {
        p.attach(1_000, consumer(seq), 1, false, 0, &mut fx).expect("attach");
    }
    assert_eq!(p.attach(1_000, consumer(99), 1, false, 0, &mut fx), Err(AttachError::TooMany(10)));
    assert_eq!(p.attach(1_000, consumer(0), 1, false, 0, &mut fx), Err(AttachError::Duplicate));
}

#[test]
fn queue_expiry_counts_from_last_use_without_consumers() {
    let mut p = partition(QueueArgs { expires_ms: Some(1_000), ..QueueArgs::default() });
    let mut fx = Vec::new();
    assert!(!p.expired(1_999));
    assert!(p.expired(2_000));
    p.attach(2_000, consumer(1), 1, false, 0, &mut fx).expect("attach");
    assert!(!p.expired(10_000), "a consumer keeps it alive");
    p.detach(10_000, consumer(1), &mut fx);
    assert!(!p.expired(10_999));
    assert!(p.expired(11_000));
}

fn keyed(body: &str, key: &str) -> MessageRef {
    let mut m = Message::new("ex", "rk", body.as_bytes().to_vec());
    m.idempotency_key = Some(key.into());
    Arc::new(m)
}

#[test]
fn a_repeated_key_is_not_stored_again_even_after_the_original_was_consumed() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    assert_eq!(p.publish(1_000, keyed("a", "k1"), &mut fx), Enqueued::Stored(0));
    assert_eq!(p.publish(1_000, keyed("b", "k2"), &mut fx), Enqueued::Stored(1));
    assert_eq!(p.publish(1_500, keyed("a again", "k1"), &mut fx), Enqueued::Duplicate(0));
    assert_eq!(p.len(), 2);
    p.attach(2_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    p.settle(2_000, consumer(1), &[0, 1], Outcome::Ack, &mut fx);
    assert!(p.is_empty());
    assert_eq!(p.publish(3_000, keyed("a, third time", "k1"), &mut fx), Enqueued::Duplicate(0));
    assert_eq!(p.idempotency_key("k1", 3_000), Some(KeyRecord { offset: 0, committed_ms: 1_000 }));
    p.check_invariants().expect("invariants");
}

#[test]
fn keys_are_forgotten_after_their_window_on_committed_time() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.publish(1_000, keyed("a", "k"), &mut fx);
    assert_eq!(p.next_deadline_ms(), Some(11_000), "a tick is due when the window ends");
    assert_eq!(p.publish(10_999, keyed("a", "k"), &mut fx), Enqueued::Duplicate(0));
    assert!(p.idempotency_key("k", 11_000).is_none(), "outside the window at 11 000");
    p.tick(11_000, &mut fx);
    assert_eq!(p.idempotency_key_count(), 0);
    assert_eq!(p.publish(11_000, keyed("a", "k"), &mut fx), Enqueued::Stored(1), "a new message now");
    p.check_invariants().expect("invariants");
}

#[test]
fn the_queue_window_overrides_the_default() {
    let mut p = partition(QueueArgs { idempotency_window_ms: Some(100), ..QueueArgs::default() });
    let mut fx = Vec::new();
    p.publish(1_000, keyed("a", "k"), &mut fx);
    assert_eq!(p.publish(1_100, keyed("a", "k"), &mut fx), Enqueued::Stored(1));
}

#[test]
fn key_count_and_bytes_bounds_forget_the_oldest() {
    let caps = PartitionCaps { idempotency_keys_max: 2, idempotency_key_bytes_max: 10, ..CAPS };
    let name = QueueName { vhost: "/".into(), name: "q".into() };
    let mut p = Partition::new(QueueId(7), 0, name, QueueArgs::default(), caps, 0);
    let mut fx = Vec::new();
    for key in ["k1", "k2", "k3"] {
        p.publish(1_000, keyed("x", key), &mut fx);
    }
    assert!(p.idempotency_key("k1", 1_000).is_none(), "count bound: the oldest went");
    assert!(p.idempotency_key("k3", 1_000).is_some());
    p.publish(1_000, keyed("x", "a-long-key"), &mut fx);
    assert_eq!(p.idempotency_key_count(), 1, "10 bytes: only the 10-byte key fits");
    p.check_invariants().expect("invariants");
}

#[test]
fn a_refused_publish_does_not_take_its_key() {
    let args = QueueArgs { length_max: Some(1), overflow: Overflow::RejectPublish, ..QueueArgs::default() };
    let mut p = partition(args);
    let mut fx = Vec::new();
    p.publish(1_000, message("full"), &mut fx);
    assert_eq!(p.publish(1_000, keyed("x", "k"), &mut fx), Enqueued::Rejected);
    assert!(p.idempotency_key("k", 1_000).is_none());
    p.purge();
    assert_eq!(p.publish(1_000, keyed("x", "k"), &mut fx), Enqueued::Stored(1), "the retry is stored");
}

#[test]
fn enqueued_time_is_the_storing_entry_time_through_delay_requeue_and_snapshot() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    let mut delayed = Message::new("ex", "rk", b"later".to_vec());
    delayed.delay_ms = Some(500);
    p.publish(1_000, Arc::new(delayed), &mut fx);
    p.publish(1_200, message("now"), &mut fx);
    p.attach(1_300, consumer(1), 10, false, 0, &mut fx).expect("attach");
    let enqueued = |fx: &[Effect]| -> Vec<(String, u64)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Deliver(d) => Some((String::from_utf8_lossy(&d.message.payload).into_owned(), d.enqueued_ms)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(enqueued(&fx), [("now".to_owned(), 1_200)], "delivered later, stored at 1200");
    fx.clear();
    p.tick(1_500, &mut fx);
    assert_eq!(enqueued(&fx), [("later".to_owned(), 1_000)], "the delay does not move it");
    fx.clear();
    p.settle(2_000, consumer(1), &[1], Outcome::Requeue, &mut fx);
    assert_eq!(enqueued(&fx), [("now".to_owned(), 1_200)], "nor does a requeue");

    // It is part of the state: a snapshot carries it.
    let bytes = postcard::to_allocvec(&p).expect("serialise");
    let mut restored: Partition = postcard::from_bytes(&bytes).expect("deserialise");
    fx.clear();
    restored.detach(3_000, consumer(1), &mut fx);
    let got = restored.get(3_000, consumer(2), true, &mut fx).expect("a message");
    assert_eq!(got.enqueued_ms, 1_000);
    let got = restored.get(3_000, consumer(2), true, &mut fx).expect("a message");
    assert_eq!(got.enqueued_ms, 1_200);
    restored.check_invariants().expect("invariants");
}

fn rules(prefetch: u32, priority: i32, exclusive: bool) -> AttachRules {
    AttachRules { prefetch, no_ack: false, credit: 0, priority, exclusive, credit_limited: false }
}

#[test]
fn higher_priority_consumers_are_served_first_and_equals_in_turn() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.attach_with(1_000, consumer(1), rules(10, 0, false), &mut fx).expect("attach");
    p.attach_with(1_000, consumer(2), rules(2, 5, false), &mut fx).expect("attach");
    p.attach_with(1_000, consumer(3), rules(2, 5, false), &mut fx).expect("attach");
    for body in ["a", "b", "c", "d", "e", "f"] {
        p.publish(1_000, message(body), &mut fx);
    }
    // Priority 5 in turn until both are at their prefetch, then priority 0.
    let got = bodies(&fx);
    assert_eq!(got[..4], [(2, "a".into()), (3, "b".into()), (2, "c".into()), (3, "d".into())]);
    assert_eq!(got[4..], [(1, "e".into()), (1, "f".into())]);
    // When a high one has room again it is served before the low one.
    fx.clear();
    p.settle(1_000, consumer(2), &[0], Outcome::Ack, &mut fx);
    p.publish(1_000, message("g"), &mut fx);
    assert_eq!(bodies(&fx), vec![(2, "g".into())]);
    p.check_invariants().expect("invariants");
}

#[test]
fn an_exclusive_consumer_needs_an_idle_queue_and_keeps_others_out() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    p.attach(1_000, consumer(1), 10, false, 0, &mut fx).expect("attach");
    assert_eq!(p.attach_with(1_000, consumer(2), rules(10, 0, true), &mut fx), Err(AttachError::ExclusiveInUse));
    assert!(p.detach(1_000, consumer(1), &mut fx));
    p.attach_with(1_000, consumer(2), rules(10, 0, true), &mut fx).expect("exclusive on an idle queue");
    assert_eq!(p.attach(1_000, consumer(3), 10, false, 0, &mut fx), Err(AttachError::ExclusiveInUse));
    // A basic.get holder is not a consumer: gets still work.
    p.publish(1_000, message("a"), &mut fx);
    assert!(p.detach(1_000, consumer(2), &mut fx));
    p.attach(1_000, consumer(3), 10, false, 0, &mut fx).expect("free again");
}

#[test]
fn a_credit_limited_consumer_takes_only_what_it_was_granted_and_leaves_the_rest() {
    let mut p = partition(QueueArgs::default());
    let mut fx = Vec::new();
    let limited = AttachRules { credit: 0, credit_limited: true, ..rules(0, 0, false) };
    p.attach_with(1_000, consumer(1), limited, &mut fx).expect("attach");
    for body in ["a", "b", "c"] {
        p.publish(1_000, message(body), &mut fx);
    }
    assert!(bodies(&fx).is_empty(), "no credit: nothing delivered, nothing held");
    p.attach_with(1_000, consumer(2), rules(1, 0, false), &mut fx).expect("attach");
    assert_eq!(bodies(&fx), vec![(2, "a".into())], "the others are there for other consumers");
    fx.clear();
    assert!(p.add_credit(1_000, consumer(1), 1, &mut fx));
    assert_eq!(bodies(&fx), vec![(1, "b".into())], "one granted, one delivered");
    // An ack frees prefetch room, not credit: the credit is spent.
    fx.clear();
    p.settle(1_000, consumer(1), &[1], Outcome::Ack, &mut fx);
    assert!(bodies(&fx).is_empty());
    assert!(p.add_credit(1_000, consumer(1), 5, &mut fx));
    assert_eq!(bodies(&fx), vec![(1, "c".into())]);
    p.check_invariants().expect("invariants");
}
