//! Property test: random command sequences applied to a shard's state machine, checked step by
//! step against a simple reference model of one queue partition.
//!
//! The model lets the state machine choose which consumer gets a message (that is policy), but
//! checks that every choice is legal and that every fate is the one the rules give:
//! - a delivery is the head of the ready order (priority, then offset), to an attached consumer
//!   with spare prefetch, with the right redelivered flag and count;
//! - a dead-lettered message died for a reason that holds at that moment (rejected by the
//!   command, TTL passed, over the length limit, over the delivery limit);
//! - after every command no consumer with spare prefetch is left idle while messages are ready, no
//!   ready message is past its deadline, the length limit holds, and the counts agree;
//! - every published message is at the end acked, dead-lettered, purged or still held, never lost,
//!   never in two places.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use wharf_core::model::{ConnectionId, FieldValue, Message, QueueArgs, QueueId, QueueName};
use wharf_core::queue::{AttachRules, ConsumerId, Effect, Outcome, PartitionCaps};
use wharf_core::raft::ReplicatedState;
use wharf_core::shard::{PublishOutcome, ShardCommand, ShardReply, ShardState};

const TARGET: (QueueId, u32) = (QueueId(1), 0);
const LENGTH_MAX: u64 = 6;
const DELIVERY_LIMIT: u32 = 2;
/// Idempotency window: short enough that ticks make keys expire within a sequence.
const WINDOW_MS: u64 = 500;

#[derive(Debug, Clone)]
enum Op {
    Publish { priority: u8, ttl_ms: Option<u64>, key: Option<u8> },
    Attach { consumer: u64, prefetch: u32 },
    Detach { consumer: u64 },
    Settle { consumer: u64, pick: usize, outcome: u8 },
    Get { no_ack: bool },
    Tick { advance_ms: u64 },
    Purge,
    FinishDeadLetters,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, prop::option::of(1u64..50), prop::option::of(0u8..4))
            .prop_map(|(priority, ttl_ms, key)| Op::Publish { priority, ttl_ms, key }),
        1 => (0u64..3, 1u32..4).prop_map(|(consumer, prefetch)| Op::Attach { consumer, prefetch }),
        1 => (0u64..3).prop_map(|consumer| Op::Detach { consumer }),
        4 => (0u64..4, 0usize..4, 0u8..3).prop_map(|(consumer, pick, outcome)| Op::Settle { consumer, pick, outcome }),
        1 => any::<bool>().prop_map(|no_ack| Op::Get { no_ack }),
        2 => (0u64..40).prop_map(|advance_ms| Op::Tick { advance_ms }),
        1 => Just(Op::Purge),
        1 => Just(Op::FinishDeadLetters),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Ready,
    Held(u64),
    Dying,
}

#[derive(Debug, Clone)]
struct Msg {
    priority: u8,
    expires_at_ms: Option<u64>,
    count: u32,
    redelivered: bool,
    at: Where,
}

#[derive(Debug, Default)]
struct Model {
    now_ms: u64,
    next_offset: u64,
    msgs: BTreeMap<u64, Msg>,
    /// consumer seq → (prefetch, held offsets); seq 3 is the `basic.get` holder (prefetch 0).
    consumers: BTreeMap<u64, (u32, BTreeSet<u64>)>,
    acked: BTreeSet<u64>,
    /// Idempotency key → (offset, committed time) of the message first published with it.
    keys: BTreeMap<u8, (u64, u64)>,
    dead: BTreeMap<u64, String>,
    purged: BTreeSet<u64>,
}

const GETTER: u64 = 3;

fn cid(seq: u64) -> ConsumerId {
    ConsumerId { connection: ConnectionId { node: 1, incarnation: 1, seq: 0 }, seq }
}

impl Model {
    fn ready_order(&self) -> Vec<u64> {
        let mut ready: Vec<(Reverse<u8>, u64)> =
            self.msgs.iter().filter(|(_, m)| m.at == Where::Ready).map(|(&o, m)| (Reverse(m.priority), o)).collect();
        ready.sort();
        ready.into_iter().map(|(_, o)| o).collect()
    }

    fn ready_len(&self) -> u64 {
        self.msgs.values().filter(|m| m.at == Where::Ready).count() as u64
    }

    /// A delivery (or get) of `offset` to `consumer`: legal only for the head, with capacity.
    fn deliver(
        &mut self,
        consumer: u64,
        offset: u64,
        redelivered: bool,
        count: u32,
        no_ack: bool,
    ) -> Result<(), String> {
        let head = self.ready_order().first().copied();
        if head != Some(offset) {
            return Err(format!("delivered {offset} but the head is {head:?}"));
        }
        let msg = self.msgs.get(&offset).ok_or("delivered an unknown message")?;
        if msg.redelivered != redelivered || msg.count != count {
            return Err(format!("delivery of {offset}: flag/count {redelivered}/{count}, model {msg:?}"));
        }
        if no_ack {
            self.msgs.remove(&offset);
            self.acked.insert(offset);
            return Ok(());
        }
        let (prefetch, held) = self.consumers.get_mut(&consumer).ok_or(format!("delivery to unattached {consumer}"))?;
        if consumer != GETTER && held.len() as u32 >= *prefetch {
            return Err(format!("delivery to {consumer} beyond prefetch {prefetch}"));
        }
        held.insert(offset);
        self.msgs.get_mut(&offset).expect("checked").at = Where::Held(consumer);
        Ok(())
    }

    /// A message the state machine dead-lettered with `reason`: check the reason holds.
    fn die(
        &mut self,
        offset: u64,
        reason: &str,
        allowed_rejects: &BTreeSet<u64>,
        returned: &BTreeSet<u64>,
    ) -> Result<(), String> {
        let msg = self.msgs.get(&offset).ok_or(format!("dead-lettered unknown {offset}"))?.clone();
        let legal = match reason {
            "rejected" => allowed_rejects.contains(&offset),
            "expired" => msg.expires_at_ms.is_some_and(|at| at <= self.now_ms),
            "maxlen" => {
                msg.at == Where::Ready && self.ready_len() > LENGTH_MAX && self.ready_order().first() == Some(&offset)
            }
            "delivery_limit" => returned.contains(&offset) && msg.count > DELIVERY_LIMIT,
            _ => false,
        };
        if !legal {
            return Err(format!("{offset} dead-lettered as {reason} illegally: {msg:?} at {}", self.now_ms));
        }
        if let Where::Held(c) = msg.at {
            self.consumers.get_mut(&c).expect("holder").1.remove(&offset);
        }
        self.msgs.get_mut(&offset).expect("checked").at = Where::Dying;
        self.dead.insert(offset, reason.to_owned());
        Ok(())
    }

    /// Messages coming back from a consumer: count and flag; still ready unless they die next.
    fn give_back(&mut self, offset: u64) {
        if let Some(msg) = self.msgs.get_mut(&offset) {
            msg.count += 1;
            msg.redelivered = true;
            msg.at = Where::Ready;
        }
    }

    fn quiescent(&self, tick: bool) -> Result<(), String> {
        for (&offset, m) in &self.msgs {
            if m.at == Where::Ready
                && let Some(at) = m.expires_at_ms
                && (at < self.now_ms || (tick && at <= self.now_ms))
            {
                return Err(format!("ready message {offset} past its deadline {at} at {}", self.now_ms));
            }
        }
        if self.ready_len() > LENGTH_MAX {
            return Err(format!("ready {} over the length limit", self.ready_len()));
        }
        if self.ready_len() > 0 {
            for (&c, (prefetch, held)) in &self.consumers {
                if c != GETTER && (held.len() as u32) < *prefetch {
                    return Err(format!("consumer {c} idle with {} ready", self.ready_len()));
                }
            }
        }
        Ok(())
    }
}

fn reason_of(message: &Message) -> String {
    message.headers.get("x-last-death-reason").and_then(FieldValue::as_str).unwrap_or("none").to_owned()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut state = ShardState::default();
    let mut model = Model { now_ms: 1_000, ..Model::default() };
    let args = QueueArgs {
        length_max: Some(LENGTH_MAX),
        delivery_limit: Some(DELIVERY_LIMIT),
        priority_max: Some(2),
        dead_letter_exchange: Some("dlx".into()),
        ..QueueArgs::default()
    };
    let caps = PartitionCaps {
        messages_max: 1_000,
        bytes_max: 1 << 20,
        consumer_inflight_max: 100,
        consumers_max: 10,
        idempotency_window_ms: WINDOW_MS,
        idempotency_keys_max: 1_000,
        idempotency_key_bytes_max: 1 << 20,
    };
    let name = QueueName { vhost: "/".into(), name: "q".into() };
    let mut fx = Vec::new();
    state.apply(
        model.now_ms,
        ShardCommand::CreatePartition { queue: TARGET.0, partition: TARGET.1, name, args, caps },
        &mut fx,
    );
    let mut dying: BTreeSet<u64> = BTreeSet::new();

    for op in ops {
        let mut allowed_rejects = BTreeSet::new();
        let mut returned = BTreeSet::new();
        let mut tick = false;
        let mut get_no_ack = None;
        let command = match op.clone() {
            Op::Publish { priority, ttl_ms, key } => {
                let mut m = Message::new("ex", "rk", vec![0u8; 8]);
                m.properties.priority = Some(priority);
                m.properties.expiration_ms = ttl_ms;
                m.idempotency_key = key.map(|k| format!("key-{k}"));
                ShardCommand::Publish { targets: vec![TARGET], message: Arc::new(m) }
            }
            Op::Attach { consumer, prefetch } => {
                let rules = AttachRules { prefetch, ..AttachRules::default() };
                ShardCommand::Attach { consumer: cid(consumer), target: TARGET, rules }
            }
            Op::Detach { consumer } => {
                if let Some((_, held)) = model.consumers.remove(&consumer) {
                    for offset in held {
                        model.give_back(offset);
                        returned.insert(offset);
                    }
                }
                ShardCommand::Detach { consumer: cid(consumer), target: TARGET }
            }
            Op::Settle { consumer, pick, outcome } => {
                let held: Vec<u64> =
                    model.consumers.get(&consumer).map(|(_, h)| h.iter().copied().collect()).unwrap_or_default();
                let offsets: Vec<u64> = held.get(pick % held.len().max(1)).copied().into_iter().collect();
                let outcome = [Outcome::Ack, Outcome::Requeue, Outcome::Reject][outcome as usize];
                for &offset in &offsets {
                    model.consumers.get_mut(&consumer).expect("holder").1.remove(&offset);
                    match outcome {
                        Outcome::Ack => {
                            model.msgs.remove(&offset);
                            model.acked.insert(offset);
                        }
                        Outcome::Requeue => {
                            model.give_back(offset);
                            returned.insert(offset);
                        }
                        Outcome::Reject => {
                            allowed_rejects.insert(offset);
                        }
                    }
                }
                ShardCommand::Settle { consumer: cid(consumer), target: TARGET, offsets, outcome }
            }
            Op::Get { no_ack } => {
                model.consumers.entry(GETTER).or_insert((0, BTreeSet::new()));
                get_no_ack = Some(no_ack);
                ShardCommand::Get { holder: cid(GETTER), target: TARGET, no_ack }
            }
            Op::Tick { advance_ms } => {
                model.now_ms += advance_ms;
                tick = true;
                ShardCommand::Tick
            }
            Op::Purge => ShardCommand::Purge { target: TARGET },
            Op::FinishDeadLetters => {
                let offsets: Vec<u64> = dying.iter().copied().collect();
                for offset in &offsets {
                    model.msgs.remove(offset);
                }
                dying.clear();
                ShardCommand::DeadLettered { target: TARGET, offsets }
            }
        };
        fx.clear();
        let reply = state.apply(model.now_ms, command, &mut fx);

        // The command's own result first: a publish adds a message, a get takes the head.
        match (&op, &reply) {
            (Op::Publish { priority, ttl_ms, key }, ShardReply::Published(outcomes)) => {
                // A key within its window names the original: nothing new is stored.
                let now = model.now_ms;
                let remembered = key.and_then(|k| model.keys.get(&k).copied()).filter(|(_, at)| at + WINDOW_MS > now);
                if let Some((original, _)) = remembered {
                    prop_assert_eq!(outcomes.as_slice(), &[PublishOutcome::Duplicate(original)], "duplicate verdict");
                    prop_assert!(fx.is_empty(), "a duplicate changes nothing");
                    continue;
                }
                let offset = match outcomes.as_slice() {
                    [PublishOutcome::Stored(offset)] => *offset,
                    other => return Err(TestCaseError::fail(format!("publish refused: {other:?}"))),
                };
                if let Some(k) = key {
                    model.keys.insert(*k, (offset, now));
                }
                prop_assert_eq!(offset, model.next_offset, "offsets are dense");
                model.next_offset += 1;
                model.msgs.insert(
                    offset,
                    Msg {
                        priority: (*priority).min(2),
                        expires_at_ms: ttl_ms.map(|t| model.now_ms + t),
                        count: 0,
                        redelivered: false,
                        at: Where::Ready,
                    },
                );
            }
            (Op::Get { .. }, ShardReply::Got(Some(d))) => {
                model
                    .deliver(GETTER, d.position.offset, d.redelivered, d.delivery_count, get_no_ack == Some(true))
                    .map_err(TestCaseError::fail)?;
            }
            (Op::Get { .. }, ShardReply::Got(None)) => {}
            (Op::Purge, ShardReply::Purged(n)) => {
                let ready = model.ready_order();
                prop_assert_eq!(*n, ready.len() as u64);
                for offset in ready {
                    model.msgs.remove(&offset);
                    model.purged.insert(offset);
                }
            }
            (Op::Settle { .. }, ShardReply::Settled { unknown }) => prop_assert!(unknown.is_empty()),
            (Op::Attach { consumer, prefetch }, ShardReply::Attached { .. }) => {
                model.consumers.insert(*consumer, (*prefetch, BTreeSet::new()));
            }
            (Op::Attach { consumer, .. }, ShardReply::Error(_)) => {
                prop_assert!(model.consumers.contains_key(consumer), "attach refused for a new consumer");
            }
            (_, ShardReply::Error(e)) => return Err(TestCaseError::fail(format!("{op:?} failed: {e}"))),
            _ => {}
        }
        // Then the effects, in the order the state machine produced them.
        for effect in &fx {
            match effect {
                Effect::Deliver(d) => model
                    .deliver(d.consumer.seq, d.position.offset, d.redelivered, d.delivery_count, false)
                    .map_err(TestCaseError::fail)?,
                Effect::DeadLetter(dl) => {
                    let reason = reason_of(&dl.message);
                    model.die(dl.position.offset, &reason, &allowed_rejects, &returned).map_err(TestCaseError::fail)?;
                    dying.insert(dl.position.offset);
                }
                Effect::ConsumerCancelled(c) => return Err(TestCaseError::fail(format!("unexpected cancel of {c}"))),
            }
        }
        // Rejected offsets must all have died.
        for offset in &allowed_rejects {
            prop_assert!(model.dead.contains_key(offset), "rejected {} was not dead-lettered", offset);
        }
        model.quiescent(tick).map_err(TestCaseError::fail)?;
        let partition = state.partition(TARGET).expect("partition exists");
        partition.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert_eq!(partition.len(), model.msgs.len() as u64, "held messages disagree");
        prop_assert_eq!(partition.ready_len(), model.ready_len(), "ready messages disagree");
    }
    // Conservation: every offset ever assigned has exactly one fate.
    for offset in 0..model.next_offset {
        let fates = [
            model.msgs.contains_key(&offset) && !model.dead.contains_key(&offset),
            model.acked.contains(&offset),
            model.dead.contains_key(&offset),
            model.purged.contains(&offset),
        ];
        prop_assert_eq!(fates.iter().filter(|f| **f).count(), 1, "offset {} has fates {:?}", offset, fates);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn partition_matches_reference_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}
