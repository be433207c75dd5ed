//! One queue partition as a deterministic state: its messages, their delivery state, its consumers,
//! and the rules (TTL, length limits, priorities, delays, dead-lettering, single active consumer,
//! delivery limit). Pure logic: no IO, no clock (time is passed in), no hash-ordered iteration.
//! Touches only `crate::model`.

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{
    ConnectionId, FieldValue, Headers, Message, MessageRef, Overflow, Position, QueueArgs, QueueId, QueueName, TxnId,
};

/// Identity of a consumer: its connection and a number unique within that connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConsumerId {
    /// The connection it belongs to.
    pub connection: ConnectionId,
    /// Unique within the connection (the front-end's choice, e.g. channel and tag number).
    pub seq: u64,
}

impl std::fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.connection, self.seq)
    }
}

impl std::str::FromStr for ConsumerId {
    type Err = crate::error::CoreError;

    /// The inverse of `Display` (`<connection>/<seq>`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || crate::error::CoreError::InvalidArgument(format!("'{text}' is not a consumer id"));
        let (connection, seq) = text.split_once('/').ok_or_else(invalid)?;
        Ok(Self { connection: connection.parse().map_err(|_| invalid())?, seq: seq.parse().map_err(|_| invalid())? })
    }
}

/// Capacity bounds of a partition, fixed when it is created (from the configured limits), so that
/// every replica enforces the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionCaps {
    /// Most messages held (ready, delayed, unacked, dead-lettering): bounds memory.
    pub messages_max: u64,
    /// Most payload bytes held.
    pub bytes_max: u64,
    /// Most unacked deliveries per consumer when its prefetch is 0 (unlimited).
    pub consumer_inflight_max: u32,
    /// Most consumers attached.
    pub consumers_max: u32,
    /// How long idempotency keys are remembered when the queue sets no window.
    pub idempotency_window_ms: u64,
    /// Most idempotency keys remembered.
    pub idempotency_keys_max: u64,
    /// Most bytes of idempotency keys remembered.
    pub idempotency_key_bytes_max: u64,
}

/// Where and when the message published with an idempotency key was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Its offset in the partition.
    pub offset: u64,
    /// The committed time of the entry that stored it, milliseconds since the Unix epoch.
    pub committed_ms: u64,
}

/// How a consumer settles deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done: remove the message (AMQP ack).
    Ack,
    /// Put it back for redelivery (AMQP nack/reject with requeue).
    Requeue,
    /// Refuse it: dead-letter it with reason `rejected`, or drop it (AMQP nack/reject without requeue).
    Reject,
}

/// Why a message is dead-lettered; the names are RabbitMQ's `x-death` reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeathReason {
    /// Rejected without requeue.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// Dropped from the head by a length limit, or refused by `reject-publish-dlx`.
    Maxlen,
    /// Returned more often than the delivery limit.
    DeliveryLimit,
}

impl DeathReason {
    /// RabbitMQ's name for the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Maxlen => "maxlen",
            Self::DeliveryLimit => "delivery_limit",
        }
    }
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Who receives it.
    pub consumer: ConsumerId,
    /// Where it lives (the consumer settles by offset).
    pub position: Position,
    /// The message.
    pub message: MessageRef,
    /// Whether it may have been delivered before.
    pub redelivered: bool,
    /// How often it was returned before this delivery (RabbitMQ's `x-delivery-count`).
    pub delivery_count: u32,
    /// Messages still ready in the partition after this one (AMQP `basic.get-ok` message-count).
    pub ready_after: u64,
    /// Committed time of the Raft entry that stored the message in this queue, milliseconds since
    /// the Unix epoch. Replicas agree on it and it survives restarts, so a front-end can tell how
    /// long the message has waited (MQTT 5 sends a message's remaining expiry interval).
    pub enqueued_ms: u64,
}

/// A message leaving its queue for the dead-letter exchange. The partition keeps it until the
/// leader reports it republished (`dead_lettered`), so a crash in between loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Where it was.
    pub position: Position,
    /// Exchange to republish to.
    pub exchange: String,
    /// Routing keys to republish with (the queue's `x-dead-letter-routing-key`, else the message's).
    pub routing_key: String,
    /// The message with its `x-death` headers updated and its `expiration` removed.
    pub message: MessageRef,
}

/// Something a partition asks its runtime to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Hand a delivery to a (local) consumer.
    Deliver(Delivery),
    /// Republish a dead-lettered message (the leader does it).
    DeadLetter(DeadLetter),
    /// The consumer was cancelled by the broker (queue deleted): AMQP `basic.cancel` notification.
    ConsumerCancelled(ConsumerId),
}

/// The result of offering a message to a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enqueued {
    /// Stored at this offset.
    Stored(u64),
    /// Not stored: its idempotency key was committed before, at this offset.
    Duplicate(u64),
    /// Refused by `x-overflow: reject-publish(-dlx)` or by the partition's capacity.
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    /// In no index: only between two steps of one command (never after a command completes).
    Held,
    Ready,
    Delayed {
        visible_at_ms: u64,
    },
    CheckedOut(ConsumerId),
    DeadLettering,
    /// Acknowledged by `consumer` inside a prepared transaction: neither deliverable nor
    /// returnable until the transaction commits (removed) or aborts (back to the consumer).
    Locked {
        txn: TxnId,
        consumer: ConsumerId,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    message: MessageRef,
    priority: u8,
    /// Committed time of the entry that stored it (a delay or a requeue does not change it).
    enqueued_ms: u64,
    /// When it stops being deliverable (set when it becomes ready).
    expires_at_ms: Option<u64>,
    delivery_count: u32,
    redelivered: bool,
    state: State,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Consumer {
    /// Unacked deliveries allowed (ack mode); 0 means the partition's inflight cap.
    prefetch: u32,
    /// Deliveries allowed before more credit is granted (no-ack mode, and ack mode when
    /// `credit_limited`).
    credit: u32,
    no_ack: bool,
    /// Credit limits deliveries in ack mode too (on top of the prefetch): the native API's
    /// consumers, which hold nothing they were not granted.
    credit_limited: bool,
    /// A `basic.get` holder: never receives pushed deliveries.
    passive: bool,
    checked_out: BTreeSet<u64>,
    /// AMQP `x-priority`: consumers of a higher priority are served first; lower ones only
    /// when every higher one is at its prefetch (RabbitMQ's consumer priorities).
    priority: i32,
    /// AMQP `basic.consume` exclusive: no other consumer may attach while it is.
    exclusive: bool,
}

/// One queue partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Partition {
    queue: QueueId,
    partition: u32,
    name: QueueName,
    args: QueueArgs,
    caps: PartitionCaps,
    next_offset: u64,
    messages: BTreeMap<u64, Stored>,
    /// Ready messages, highest priority first, then by offset (so a requeued message goes back to
    /// its original place, as in RabbitMQ).
    ready: BTreeSet<(Reverse<u8>, u64)>,
    ready_bytes: u64,
    total_bytes: u64,
    delayed: BTreeSet<(u64, u64)>,
    expiring: BTreeSet<(u64, u64)>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    /// Service order of pushing consumers: round robin rotates it; with single active consumer the
    /// front is the active one.
    order: VecDeque<ConsumerId>,
    last_used_ms: u64,
    keys: KeyRegistry,
    /// Offsets locked by each prepared transaction (the messages in `State::Locked`), so that
    /// the decision finds them without scanning the partition.
    locked: BTreeMap<TxnId, Vec<u64>>,
}

/// The idempotency registry of a partition: key → where and when its message was committed, and
/// the same keys in commit order (committed time never decreases), so that expiry and the count
/// and byte bounds always forget the oldest first.
///
/// The map is a hash map: the registry only looks keys up and never iterates the map, so its
/// order cannot reach any reply (determinism holds), and with up to a million keys per partition a
/// lookup costs one hash rather than twenty string comparisons. It is serialised as the ordered
/// list alone, from which the map is rebuilt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "Vec<(Arc<str>, KeyRecord)>", into = "Vec<(Arc<str>, KeyRecord)>")]
struct KeyRegistry {
    map: std::collections::HashMap<Arc<str>, KeyRecord>,
    order: VecDeque<Arc<str>>,
    bytes: u64,
}

impl From<Vec<(Arc<str>, KeyRecord)>> for KeyRegistry {
    fn from(list: Vec<(Arc<str>, KeyRecord)>) -> Self {
        let mut registry = Self::default();
        for (key, record) in list {
            registry.bytes += key.len() as u64;
            registry.map.insert(Arc::clone(&key), record);
            registry.order.push_back(key);
        }
        registry
    }
}

impl From<KeyRegistry> for Vec<(Arc<str>, KeyRecord)> {
    fn from(registry: KeyRegistry) -> Self {
        registry
            .order
            .into_iter()
            .filter_map(|key| registry.map.get(&key).copied().map(|record| (key, record)))
            .collect()
    }
}

impl Partition {
    /// A new, empty partition.
    pub fn new(
        queue: QueueId,
        partition: u32,
        name: QueueName,
        args: QueueArgs,
        caps: PartitionCaps,
        now_ms: u64,
    ) -> Self {
        Self {
            queue,
            partition,
            name,
            args,
            caps,
            next_offset: 0,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            ready_bytes: 0,
            total_bytes: 0,
            delayed: BTreeSet::new(),
            expiring: BTreeSet::new(),
            consumers: BTreeMap::new(),
            order: VecDeque::new(),
            last_used_ms: now_ms,
            keys: KeyRegistry::default(),
            locked: BTreeMap::new(),
        }
    }

    fn key_window_ms(&self) -> u64 {
        self.args.idempotency_window_ms.unwrap_or(self.caps.idempotency_window_ms)
    }

    /// Where and when the message with idempotency key `key` was committed, if the key is within
    /// its window at `now_ms`.
    pub fn idempotency_key(&self, key: &str, now_ms: u64) -> Option<KeyRecord> {
        let window = self.key_window_ms();
        self.keys.map.get(key).copied().filter(|record| record.committed_ms.saturating_add(window) > now_ms)
    }

    /// Idempotency keys remembered.
    pub fn idempotency_key_count(&self) -> u64 {
        self.keys.map.len() as u64
    }

    /// Forget keys whose window ended by `now_ms`.
    fn expire_keys(&mut self, now_ms: u64) {
        let window = self.key_window_ms();
        while self.oldest_key_ms().is_some_and(|at| at.saturating_add(window) <= now_ms) {
            self.forget_oldest_key();
        }
    }

    fn oldest_key_ms(&self) -> Option<u64> {
        let oldest = self.keys.order.front()?;
        self.keys.map.get(oldest).map(|record| record.committed_ms)
    }

    fn forget_oldest_key(&mut self) {
        if let Some(key) = self.keys.order.pop_front() {
            self.keys.bytes -= key.len() as u64;
            let removed = self.keys.map.remove(&key);
            debug_assert!(removed.is_some(), "key order and key map hold the same keys");
        }
    }

    fn remember_key(&mut self, key: &str, offset: u64, now_ms: u64) {
        // One allocation shared by the map and the order.
        let key: Arc<str> = Arc::from(key);
        self.keys.map.insert(Arc::clone(&key), KeyRecord { offset, committed_ms: now_ms });
        self.keys.bytes += key.len() as u64;
        self.keys.order.push_back(key);
        while self.keys.map.len() as u64 > self.caps.idempotency_keys_max
            || self.keys.bytes > self.caps.idempotency_key_bytes_max
        {
            self.forget_oldest_key();
        }
    }

    /// The queue's arguments.
    pub fn args(&self) -> &QueueArgs {
        &self.args
    }

    /// Ready messages.
    pub fn ready_len(&self) -> u64 {
        self.ready.len() as u64
    }

    /// All messages held (ready, delayed, unacked, dead-lettering).
    pub fn len(&self) -> u64 {
        self.messages.len() as u64
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Unacked deliveries.
    pub fn unacked_len(&self) -> u64 {
        self.consumers.values().map(|c| c.checked_out.len() as u64).sum()
    }

    /// The queue this partition belongs to.
    pub fn queue_name(&self) -> &QueueName {
        &self.name
    }

    /// Pushing consumers attached (basic.get holders excluded).
    pub fn consumer_count(&self) -> u32 {
        self.order.len() as u32
    }

    /// The next offset to be assigned.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Whether the queue's `x-expires` has passed: no consumers and unused since then.
    pub fn expired(&self, now_ms: u64) -> bool {
        match self.args.expires_ms {
            Some(expires) => self.order.is_empty() && now_ms.saturating_sub(self.last_used_ms) >= expires,
            None => false,
        }
    }

    /// The earliest time at which a tick would change something (a delay ending, a TTL passing).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let keys = self.oldest_key_ms().map(|at| at.saturating_add(self.key_window_ms()));
        let delayed = self.delayed.first().map(|&(at, _)| at);
        let expiring = self.expiring.first().map(|&(at, _)| at);
        let expires = self.args.expires_ms.filter(|_| self.order.is_empty()).map(|e| self.last_used_ms + e);
        [delayed, expiring, expires, keys].into_iter().flatten().min()
    }

    /// Messages waiting to be republished to the dead-letter exchange, for a new leader to resume.
    pub fn dead_lettering(&self) -> Vec<DeadLetter> {
        self.messages
            .iter()
            .filter(|(_, s)| s.state == State::DeadLettering)
            .filter_map(|(&offset, s)| self.dead_letter_job(offset, s, DeathReason::Rejected, None))
            .collect()
    }

    /// Whether the message at `offset` waits to be republished to the dead-letter exchange.
    pub fn is_dead_lettering(&self, offset: u64) -> bool {
        self.messages.get(&offset).is_some_and(|s| s.state == State::DeadLettering)
    }

    fn position(&self, offset: u64) -> Position {
        Position { queue: self.queue, partition: self.partition, offset }
    }

    fn priority_of(&self, message: &Message) -> u8 {
        // Without x-max-priority RabbitMQ ignores priorities; with it, higher values are capped.
        match self.args.priority_max {
            Some(max) => message.properties.priority.unwrap_or(0).min(max),
            None => 0,
        }
    }

    fn ttl_ms(&self, message: &Message) -> Option<u64> {
        match (self.args.message_ttl_ms, message.properties.expiration_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Offer a published message. Returns where it was stored or that it was refused.
    pub fn publish(&mut self, now_ms: u64, message: MessageRef, effects: &mut Vec<Effect>) -> Enqueued {
        // `store` takes the message; this handle keeps its key readable afterwards.
        let handle = Arc::clone(&message);
        let key = handle.idempotency_key.as_deref();
        if let Some(key) = key {
            self.expire_keys(now_ms);
            if let Some(record) = self.keys.map.get(key) {
                return Enqueued::Duplicate(record.offset);
            }
        }
        let outcome = self.store(now_ms, message, effects);
        if let (Some(key), Enqueued::Stored(offset)) = (key, outcome) {
            self.remember_key(key, offset, now_ms);
        }
        outcome
    }

    fn store(&mut self, now_ms: u64, message: MessageRef, effects: &mut Vec<Effect>) -> Enqueued {
        let size = message.payload_len();
        // The hard caps protect memory whatever the queue's own arguments say.
        if self.len() >= self.caps.messages_max || self.total_bytes + size > self.caps.bytes_max {
            return Enqueued::Rejected;
        }
        let delay = message.delay_ms.filter(|&d| d > 0);
        if delay.is_none() && self.would_overflow(size) {
            match self.args.overflow {
                Overflow::DropHead => {}
                Overflow::RejectPublish => return Enqueued::Rejected,
                Overflow::RejectPublishDlx => {
                    // RabbitMQ dead-letters the refused message (reason maxlen) and nacks it.
                    let offset = self.allocate(message, 0, now_ms);
                    self.dead_letter(offset, DeathReason::Maxlen, now_ms, effects);
                    return Enqueued::Rejected;
                }
            }
        }
        let priority = self.priority_of(&message);
        let offset = self.allocate(message, priority, now_ms);
        match delay {
            Some(delay) => {
                let visible_at_ms = now_ms.saturating_add(delay);
                self.set_state(offset, State::Delayed { visible_at_ms });
                self.delayed.insert((visible_at_ms, offset));
            }
            None => {
                self.make_ready(offset, now_ms, true);
                self.enforce_length(now_ms, effects);
            }
        }
        self.dispatch(now_ms, effects);
        // A TTL of 0 means: deliver now or never (RabbitMQ).
        if self.messages.get(&offset).is_some_and(|s| s.state == State::Ready && s.expires_at_ms == Some(now_ms)) {
            self.dead_letter(offset, DeathReason::Expired, now_ms, effects);
        }
        Enqueued::Stored(offset)
    }

    fn would_overflow(&self, size: u64) -> bool {
        let too_long = self.args.length_max.is_some_and(|max| self.ready_len() + 1 > max);
        let too_big = self.args.bytes_max.is_some_and(|max| self.ready_bytes + size > max);
        too_long || too_big
    }

    /// Store a message under a new offset at committed time `now_ms`. Its state is set by the
    /// caller right after.
    fn allocate(&mut self, message: MessageRef, priority: u8, now_ms: u64) -> u64 {
        let offset = self.next_offset;
        self.next_offset += 1;
        self.total_bytes += message.payload_len();
        let stored = Stored {
            message,
            priority,
            enqueued_ms: now_ms,
            expires_at_ms: None,
            delivery_count: 0,
            redelivered: false,
            state: State::Held,
        };
        let previous = self.messages.insert(offset, stored);
        assert!(previous.is_none(), "offset {offset} reused");
        offset
    }

    fn set_state(&mut self, offset: u64, state: State) {
        if let Some(stored) = self.messages.get_mut(&offset) {
            stored.state = state;
        }
    }

    /// Make a message ready. `fresh` starts its TTL; a returned message keeps its deadline.
    fn make_ready(&mut self, offset: u64, now_ms: u64, fresh: bool) {
        let ttl = self.messages.get(&offset).and_then(|s| self.ttl_ms(&s.message));
        let Some(stored) = self.messages.get_mut(&offset) else { return };
        if fresh {
            stored.expires_at_ms = ttl.map(|ttl| now_ms.saturating_add(ttl));
        }
        stored.state = State::Ready;
        self.ready.insert((Reverse(stored.priority), offset));
        self.ready_bytes += stored.message.payload_len();
        if let Some(at) = stored.expires_at_ms {
            self.expiring.insert((at, offset));
        }
    }

    /// Take a ready message out of the ready set (it stays in `messages`, `Held`).
    fn unready(&mut self, offset: u64) {
        let Some(stored) = self.messages.get_mut(&offset) else { return };
        if stored.state != State::Ready {
            return;
        }
        stored.state = State::Held;
        self.ready.remove(&(Reverse(stored.priority), offset));
        self.ready_bytes -= stored.message.payload_len();
        if let Some(at) = stored.expires_at_ms {
            self.expiring.remove(&(at, offset));
        }
    }

    fn remove(&mut self, offset: u64) -> Option<Stored> {
        self.unready(offset);
        let stored = self.messages.remove(&offset)?;
        if let State::Delayed { visible_at_ms } = stored.state {
            self.delayed.remove(&(visible_at_ms, offset));
        }
        self.total_bytes -= stored.message.payload_len();
        Some(stored)
    }

    fn enforce_length(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        loop {
            let too_long = self.args.length_max.is_some_and(|max| self.ready_len() > max);
            let too_big = self.args.bytes_max.is_some_and(|max| self.ready_bytes > max);
            if !(too_long || too_big) {
                return;
            }
            // RabbitMQ drops from the head: the message a consumer would get next.
            let Some(&(_, offset)) = self.ready.first() else { return };
            self.dead_letter(offset, DeathReason::Maxlen, now_ms, effects);
        }
    }

    /// Move a message out of the queue: to the dead-letter exchange if there is one, else drop it.
    fn dead_letter(&mut self, offset: u64, reason: DeathReason, now_ms: u64, effects: &mut Vec<Effect>) {
        if self.args.dead_letter_exchange.is_none() {
            self.remove(offset);
            return;
        }
        self.unready(offset);
        if let Some(stored) = self.messages.get(&offset)
            && let State::Delayed { visible_at_ms } = stored.state
        {
            self.delayed.remove(&(visible_at_ms, offset));
        }
        let Some(stored) = self.messages.get(&offset) else { return };
        let job = self.dead_letter_job(offset, stored, reason, Some(now_ms));
        if let Some(job) = job {
            // Keep the message with its death recorded, so a resumed leader republishes the same.
            if let Some(stored) = self.messages.get_mut(&offset) {
                stored.message = Arc::clone(&job.message);
                stored.state = State::DeadLettering;
            }
            effects.push(Effect::DeadLetter(job));
        }
    }

    /// Build the republish job. With `now_ms` the `x-death` headers are added; without, the
    /// stored message already carries them (resuming after a leader change).
    fn dead_letter_job(
        &self,
        offset: u64,
        stored: &Stored,
        reason: DeathReason,
        now_ms: Option<u64>,
    ) -> Option<DeadLetter> {
        let exchange = self.args.dead_letter_exchange.clone()?;
        let routing_key =
            self.args.dead_letter_routing_key.clone().unwrap_or_else(|| stored.message.routing_key.clone());
        let message = match now_ms {
            Some(now_ms) => Arc::new(with_death(&stored.message, &self.name.name, reason, now_ms)),
            None => Arc::clone(&stored.message),
        };
        Some(DeadLetter { position: self.position(offset), exchange, routing_key, message })
    }

    /// The leader republished these dead-lettered messages: forget them.
    pub fn dead_lettered(&mut self, offsets: &[u64]) {
        for &offset in offsets {
            if self.messages.get(&offset).is_some_and(|s| s.state == State::DeadLettering) {
                self.remove(offset);
            }
        }
    }

    /// Attach a consumer of priority 0, not exclusive. Fails when the partition has its most
    /// consumers.
    pub fn attach(
        &mut self,
        now_ms: u64,
        consumer: ConsumerId,
        prefetch: u32,
        no_ack: bool,
        credit: u32,
        effects: &mut Vec<Effect>,
    ) -> Result<(), AttachError> {
        let rules = AttachRules { prefetch, no_ack, credit, ..AttachRules::default() };
        self.attach_with(now_ms, consumer, rules, effects)
    }

    /// Attach a consumer. Fails when the partition has its most consumers, and when exclusivity
    /// is broken: an exclusive consumer asks while others are attached, or another asks while an
    /// exclusive one is.
    pub fn attach_with(
        &mut self,
        now_ms: u64,
        consumer: ConsumerId,
        rules: AttachRules,
        effects: &mut Vec<Effect>,
    ) -> Result<(), AttachError> {
        if self.consumers.contains_key(&consumer) {
            return Err(AttachError::Duplicate);
        }
        if self.order.len() as u32 >= self.caps.consumers_max {
            return Err(AttachError::TooMany(self.caps.consumers_max));
        }
        let exclusive_attached = self.order.iter().any(|c| self.consumers.get(c).is_some_and(|s| s.exclusive));
        if exclusive_attached || (rules.exclusive && !self.order.is_empty()) {
            return Err(AttachError::ExclusiveInUse);
        }
        let AttachRules { prefetch, no_ack, credit, priority, exclusive, credit_limited } = rules;
        let state = Consumer {
            prefetch,
            credit,
            no_ack,
            credit_limited,
            passive: false,
            checked_out: BTreeSet::new(),
            priority,
            exclusive,
        };
        self.consumers.insert(consumer, state);
        self.order.push_back(consumer);
        self.last_used_ms = now_ms;
        self.dispatch(now_ms, effects);
        Ok(())
    }

    /// Whether `consumer` is the one receiving messages of a single-active-consumer queue (always
    /// true for other queues).
    pub fn is_active(&self, consumer: ConsumerId) -> bool {
        !self.args.single_active_consumer || self.order.front() == Some(&consumer)
    }

    /// Detach a consumer (or `basic.get` holder): its unacked messages return to the queue.
    /// Returns whether it was attached.
    pub fn detach(&mut self, now_ms: u64, consumer: ConsumerId, effects: &mut Vec<Effect>) -> bool {
        let Some(state) = self.consumers.remove(&consumer) else { return false };
        self.order.retain(|c| *c != consumer);
        for offset in state.checked_out {
            self.return_message(offset, now_ms, effects);
        }
        self.last_used_ms = now_ms;
        self.dispatch(now_ms, effects);
        true
    }

    /// Stop a consumer without detaching it (AMQP `basic.cancel`): it gets nothing more (it becomes
    /// a holder, like a `basic.get` one) and keeps the deliveries at `keep`, which its client has
    /// and may still settle; every other delivery it holds (sent but never handed to the client)
    /// returns to the queue now as never delivered (not marked redelivered, not counted against
    /// `x-delivery-limit`). `keep` names each delivery by offset and delivery count: a message
    /// the client gave back (requeue) and that came to this consumer again before the stop is a
    /// new delivery the client never saw, and is not kept. Returns whether it was attached.
    pub fn stop(&mut self, now_ms: u64, consumer: ConsumerId, keep: &[(u64, u32)], effects: &mut Vec<Effect>) -> bool {
        let Some(state) = self.consumers.get(&consumer) else { return false };
        let kept: BTreeSet<u64> = keep
            .iter()
            .filter(|(offset, count)| {
                state.checked_out.contains(offset)
                    && self.messages.get(offset).is_some_and(|stored| stored.delivery_count == *count)
            })
            .map(|(offset, _)| *offset)
            .collect();
        let Some(state) = self.consumers.get_mut(&consumer) else { return false };
        let returned: Vec<u64> = state.checked_out.difference(&kept).copied().collect();
        state.checked_out.retain(|offset| kept.contains(offset));
        state.passive = true;
        if state.checked_out.is_empty() {
            self.consumers.remove(&consumer);
        }
        self.order.retain(|c| *c != consumer);
        for offset in returned {
            self.unsend(offset, now_ms, effects);
        }
        self.last_used_ms = now_ms;
        self.dispatch(now_ms, effects);
        true
    }

    /// A checked-out message its consumer's client never saw goes back as it was.
    fn unsend(&mut self, offset: u64, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(stored) = self.messages.get(&offset) else { return };
        if stored.expires_at_ms.is_some_and(|at| at <= now_ms) {
            self.dead_letter(offset, DeathReason::Expired, now_ms, effects);
        } else {
            self.make_ready(offset, now_ms, false);
        }
    }

    /// Change a consumer's prefetch (AMQP `basic.qos` applied to an existing consumer).
    pub fn set_prefetch(
        &mut self,
        now_ms: u64,
        consumer: ConsumerId,
        prefetch: u32,
        effects: &mut Vec<Effect>,
    ) -> bool {
        let Some(state) = self.consumers.get_mut(&consumer) else { return false };
        state.prefetch = prefetch;
        self.dispatch(now_ms, effects);
        true
    }

    /// Grant a no-ack or credit-limited consumer more credit.
    pub fn add_credit(&mut self, now_ms: u64, consumer: ConsumerId, credit: u32, effects: &mut Vec<Effect>) -> bool {
        let Some(state) = self.consumers.get_mut(&consumer) else { return false };
        state.credit = state.credit.saturating_add(credit);
        self.dispatch(now_ms, effects);
        true
    }

    /// Settle deliveries held by `consumer`. Offsets it does not hold are reported back (AMQP
    /// `PRECONDITION_FAILED - unknown delivery tag` is the front-end's business).
    pub fn settle(
        &mut self,
        now_ms: u64,
        consumer: ConsumerId,
        offsets: &[u64],
        outcome: Outcome,
        effects: &mut Vec<Effect>,
    ) -> Vec<u64> {
        let mut unknown = Vec::new();
        for &offset in offsets {
            let held = self.consumers.get_mut(&consumer).is_some_and(|c| c.checked_out.remove(&offset));
            if !held {
                unknown.push(offset);
                continue;
            }
            match outcome {
                Outcome::Ack => {
                    self.remove(offset);
                }
                Outcome::Requeue => self.return_message(offset, now_ms, effects),
                Outcome::Reject => self.dead_letter(offset, DeathReason::Rejected, now_ms, effects),
            }
        }
        self.dispatch(now_ms, effects);
        unknown
    }

    /// A checked-out message comes back: it counts as a failed delivery.
    fn return_message(&mut self, offset: u64, now_ms: u64, effects: &mut Vec<Effect>) {
        let limit = self.args.delivery_limit;
        let Some(stored) = self.messages.get_mut(&offset) else { return };
        stored.delivery_count = stored.delivery_count.saturating_add(1);
        stored.redelivered = true;
        let count = stored.delivery_count;
        let expired = stored.expires_at_ms.is_some_and(|at| at <= now_ms);
        if limit.is_some_and(|limit| count > limit) {
            self.dead_letter(offset, DeathReason::DeliveryLimit, now_ms, effects);
        } else if expired {
            self.dead_letter(offset, DeathReason::Expired, now_ms, effects);
        } else {
            self.make_ready(offset, now_ms, false);
        }
    }

    /// `basic.get`: take the next ready message. With `no_ack` it is removed at once; otherwise it
    /// is held by `holder` until settled.
    pub fn get(
        &mut self,
        now_ms: u64,
        holder: ConsumerId,
        no_ack: bool,
        effects: &mut Vec<Effect>,
    ) -> Option<Delivery> {
        self.last_used_ms = now_ms;
        self.expire(now_ms.saturating_add(1), now_ms, effects);
        let &(_, offset) = self.ready.first()?;
        self.unready(offset);
        let ready_after = self.ready_len();
        let stored = self.messages.get(&offset)?;
        let delivery = Delivery {
            consumer: holder,
            position: self.position(offset),
            message: Arc::clone(&stored.message),
            redelivered: stored.redelivered,
            delivery_count: stored.delivery_count,
            ready_after,
            enqueued_ms: stored.enqueued_ms,
        };
        if no_ack {
            self.remove(offset);
        } else {
            let holder_state = self.consumers.entry(holder).or_insert_with(|| Consumer {
                prefetch: 0,
                credit: 0,
                no_ack: false,
                credit_limited: false,
                passive: true,
                checked_out: BTreeSet::new(),
                priority: 0,
                exclusive: false,
            });
            holder_state.checked_out.insert(offset);
            self.set_state(offset, State::CheckedOut(holder));
        }
        Some(delivery)
    }

    /// Remove every ready message; returns how many. Unacked messages stay, as in RabbitMQ.
    pub fn purge(&mut self) -> u64 {
        let offsets: Vec<u64> = self.ready.iter().map(|&(_, offset)| offset).collect();
        for &offset in &offsets {
            self.remove(offset);
        }
        offsets.len() as u64
    }

    /// Mark the queue used (redeclared), for `x-expires`.
    pub fn touch(&mut self, now_ms: u64) {
        self.last_used_ms = now_ms;
    }

    /// Advance time: forget expired idempotency keys, end delays, expire messages, then deliver.
    pub fn tick(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        self.expire_keys(now_ms);
        while let Some(&(at, offset)) = self.delayed.first() {
            if at > now_ms {
                break;
            }
            self.delayed.remove(&(at, offset));
            self.make_ready(offset, now_ms, true);
        }
        self.expire(now_ms.saturating_add(1), now_ms, effects);
        self.enforce_length(now_ms, effects);
        self.dispatch(now_ms, effects);
    }

    /// Expire ready messages whose deadline is before `until_ms` (exclusive).
    fn expire(&mut self, until_ms: u64, now_ms: u64, effects: &mut Vec<Effect>) {
        while let Some(&(at, offset)) = self.expiring.first() {
            if at >= until_ms {
                break;
            }
            self.dead_letter(offset, DeathReason::Expired, now_ms, effects);
        }
    }

    /// Cancel every consumer (the queue is being deleted).
    pub fn cancel_all(&mut self, effects: &mut Vec<Effect>) {
        for consumer in std::mem::take(&mut self.order) {
            effects.push(Effect::ConsumerCancelled(consumer));
        }
        self.consumers.clear();
    }

    /// Consumers belonging to connections of `node` from an incarnation before `incarnation`.
    pub fn stale_consumers(&self, node: u64, incarnation: u64) -> Vec<ConsumerId> {
        self.consumers
            .keys()
            .filter(|c| c.connection.node == node && c.connection.incarnation < incarnation)
            .copied()
            .collect()
    }

    /// Whether idempotency key `key` is remembered (committed and within its window) at `now_ms`.
    pub fn has_key(&self, key: &str, now_ms: u64) -> bool {
        self.idempotency_key(key, now_ms).is_some()
    }

    /// Offsets among `offsets` that `consumer` does not hold (so cannot acknowledge).
    pub fn not_held(&self, consumer: ConsumerId, offsets: &[u64]) -> Vec<u64> {
        let held = self.consumers.get(&consumer).map(|c| &c.checked_out);
        offsets.iter().copied().filter(|o| !held.is_some_and(|h| h.contains(o))).collect()
    }

    /// Lock deliveries `consumer` acknowledged inside prepared transaction `txn` (the caller checked
    /// it holds them): they leave the consumer, and nobody else can get them, until the decision.
    pub fn lock(&mut self, txn: TxnId, consumer: ConsumerId, offsets: &[u64]) {
        for &offset in offsets {
            let held = self.consumers.get_mut(&consumer).is_some_and(|c| c.checked_out.remove(&offset));
            if held {
                self.set_state(offset, State::Locked { txn, consumer });
                self.locked.entry(txn).or_default().push(offset);
            }
        }
    }

    /// The transaction committed: its locked deliveries are acknowledged.
    pub fn commit_locked(&mut self, now_ms: u64, txn: TxnId, effects: &mut Vec<Effect>) {
        for offset in self.locked.remove(&txn).unwrap_or_default() {
            self.remove(offset);
        }
        self.dispatch(now_ms, effects);
    }

    /// The transaction aborted: its acknowledgements are discarded, as AMQP's `tx.rollback` does.
    /// The deliveries go back to their consumer if it is still attached, else back to the queue.
    pub fn abort_locked(&mut self, now_ms: u64, txn: TxnId, effects: &mut Vec<Effect>) {
        for offset in self.locked.remove(&txn).unwrap_or_default() {
            let Some(State::Locked { consumer, .. }) = self.messages.get(&offset).map(|s| s.state) else { continue };
            match self.consumers.get_mut(&consumer) {
                Some(holder) => {
                    holder.checked_out.insert(offset);
                    self.set_state(offset, State::CheckedOut(consumer));
                }
                None => self.return_message(offset, now_ms, effects),
            }
        }
        self.dispatch(now_ms, effects);
    }

    /// Whether `consumer` is attached (pushing or holding `basic.get` deliveries).
    pub fn has_consumer(&self, consumer: ConsumerId) -> bool {
        self.consumers.contains_key(&consumer)
    }

    fn capacity(&self, consumer: &Consumer) -> bool {
        if consumer.passive {
            return false;
        }
        if consumer.no_ack || consumer.credit_limited {
            if consumer.credit == 0 {
                return false;
            }
            if consumer.no_ack {
                return true;
            }
        }
        let prefetch = if consumer.prefetch == 0 { self.caps.consumer_inflight_max } else { consumer.prefetch };
        (consumer.checked_out.len() as u64) < u64::from(prefetch.min(self.caps.consumer_inflight_max))
    }

    /// Hand ready messages to consumers with capacity: round robin, or only the active one.
    fn dispatch(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        // Strictly before now: a message whose deadline is now may still go to a waiting consumer
        // (a TTL of 0 means "deliver immediately or expire").
        self.expire(now_ms, now_ms, effects);
        // Returned messages count again: the length limit holds after every command.
        self.enforce_length(now_ms, effects);
        if self.args.single_active_consumer {
            while let Some(&active) = self.order.front() {
                if !self.deliver_one(active, effects) {
                    break;
                }
            }
            return;
        }
        if self.order.iter().any(|c| self.consumers.get(c).is_some_and(|s| s.priority != 0)) {
            self.dispatch_by_priority(effects);
            return;
        }
        // Each pass gives at most one message to every consumer in order, rotating the one served
        // to the back, until a full pass delivers nothing.
        let mut idle = 0;
        while idle < self.order.len() && !self.ready.is_empty() {
            let Some(consumer) = self.order.pop_front() else { break };
            self.order.push_back(consumer);
            if self.deliver_one(consumer, effects) {
                idle = 0;
            } else {
                idle += 1;
            }
        }
    }

    /// Consumer priorities: each message goes to the first consumer, in round-robin order, of the
    /// highest priority that has capacity; the one served moves to the back.
    fn dispatch_by_priority(&mut self, effects: &mut Vec<Effect>) {
        while !self.ready.is_empty() {
            let able = |c: &ConsumerId| self.consumers.get(c).filter(|state| self.capacity(state));
            let Some(top) = self.order.iter().filter_map(|c| able(c).map(|state| state.priority)).max() else {
                return;
            };
            let Some(at) = self.order.iter().position(|c| able(c).is_some_and(|state| state.priority == top)) else {
                return;
            };
            let Some(consumer) = self.order.remove(at) else { return };
            self.order.push_back(consumer);
            if !self.deliver_one(consumer, effects) {
                return;
            }
        }
    }

    fn deliver_one(&mut self, consumer: ConsumerId, effects: &mut Vec<Effect>) -> bool {
        let Some(state) = self.consumers.get(&consumer) else { return false };
        if !self.capacity(state) {
            return false;
        }
        let Some(&(_, offset)) = self.ready.first() else { return false };
        self.unready(offset);
        let ready_after = self.ready_len();
        let Some(stored) = self.messages.get(&offset) else { return false };
        let delivery = Delivery {
            consumer,
            position: self.position(offset),
            message: Arc::clone(&stored.message),
            redelivered: stored.redelivered,
            delivery_count: stored.delivery_count,
            ready_after,
            enqueued_ms: stored.enqueued_ms,
        };
        let no_ack = match self.consumers.get_mut(&consumer) {
            Some(state) if state.no_ack => {
                state.credit -= 1;
                true
            }
            Some(state) => {
                if state.credit_limited {
                    state.credit -= 1;
                }
                state.checked_out.insert(offset);
                false
            }
            None => false,
        };
        if no_ack {
            self.remove(offset);
        } else {
            self.set_state(offset, State::CheckedOut(consumer));
        }
        effects.push(Effect::Deliver(delivery));
        true
    }

    /// Check the internal bookkeeping; used by tests and debug assertions.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut ready = 0;
        let mut ready_bytes = 0;
        let mut total_bytes = 0;
        for (&offset, stored) in &self.messages {
            total_bytes += stored.message.payload_len();
            match stored.state {
                State::Ready => {
                    ready += 1;
                    ready_bytes += stored.message.payload_len();
                    if !self.ready.contains(&(Reverse(stored.priority), offset)) {
                        return Err(format!("ready message {offset} missing from the ready set"));
                    }
                }
                State::Delayed { visible_at_ms } => {
                    if !self.delayed.contains(&(visible_at_ms, offset)) {
                        return Err(format!("delayed message {offset} missing from the delay set"));
                    }
                }
                State::CheckedOut(consumer) => {
                    if !self.consumers.get(&consumer).is_some_and(|c| c.checked_out.contains(&offset)) {
                        return Err(format!("message {offset} checked out to {consumer} which does not hold it"));
                    }
                }
                State::Locked { txn, .. } => {
                    if !self.locked.get(&txn).is_some_and(|offsets| offsets.contains(&offset)) {
                        return Err(format!("message {offset} locked by {txn} missing from the lock index"));
                    }
                }
                State::DeadLettering => {}
                State::Held => return Err(format!("message {offset} left held between commands")),
            }
            if offset >= self.next_offset {
                return Err(format!("offset {offset} beyond next offset {}", self.next_offset));
            }
        }
        let indexed: usize = self.locked.values().map(Vec::len).sum();
        let locked = self.messages.values().filter(|s| matches!(s.state, State::Locked { .. })).count();
        if indexed != locked {
            return Err(format!("lock index holds {indexed} offsets for {locked} locked messages"));
        }
        let times: Vec<u64> =
            self.keys.order.iter().filter_map(|k| self.keys.map.get(k)).map(|r| r.committed_ms).collect();
        if self.keys.map.len() != self.keys.order.len()
            || times.len() != self.keys.order.len()
            || times.windows(2).any(|w| w[0] > w[1])
            || self.keys.bytes != self.keys.order.iter().map(|k| k.len() as u64).sum::<u64>()
        {
            return Err("idempotency key order disagrees with the key map".into());
        }
        if ready != self.ready.len() || ready_bytes != self.ready_bytes || total_bytes != self.total_bytes {
            return Err("ready/byte counters disagree with the messages".into());
        }
        for (consumer, state) in &self.consumers {
            for offset in &state.checked_out {
                if self.messages.get(offset).map(|s| s.state) != Some(State::CheckedOut(*consumer)) {
                    return Err(format!("{consumer} holds {offset} which is not checked out to it"));
                }
            }
        }
        Ok(())
    }
}

/// Why a consumer could not attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    /// The consumer id is already attached.
    Duplicate,
    /// The partition has this many consumers already.
    TooMany(u32),
    /// An exclusive consumer is attached, or one asked for exclusivity while others are.
    ExclusiveInUse,
}

/// How a consumer attaches to a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AttachRules {
    /// Unacked deliveries allowed (ack mode); 0: the partition's inflight cap.
    pub prefetch: u32,
    /// Deliveries are settled on sending (flow-controlled by credit).
    pub no_ack: bool,
    /// Initial credit for a no-ack or credit-limited consumer.
    pub credit: u32,
    /// Consumer priority (higher first).
    pub priority: i32,
    /// No other consumer while this one is attached.
    pub exclusive: bool,
    /// Credit limits deliveries in ack mode too (on top of the prefetch).
    pub credit_limited: bool,
}

/// The message as republished to a dead-letter exchange: RabbitMQ's `x-death` history (one table
/// per (queue, reason), newest first, with a count), the `x-first-death-*` and `x-last-death-*`
/// headers, and no `expiration` (kept as `original-expiration`) so it does not expire again at once.
fn with_death(message: &Message, queue: &str, reason: DeathReason, now_ms: u64) -> Message {
    let mut message = message.clone();
    let mut deaths: Vec<FieldValue> = match message.headers.get("x-death") {
        Some(FieldValue::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    let same = |item: &FieldValue| match item {
        FieldValue::Table(t) => {
            t.get("queue").and_then(FieldValue::as_str) == Some(queue)
                && t.get("reason").and_then(FieldValue::as_str) == Some(reason.as_str())
        }
        _ => false,
    };
    let previous_count = deaths
        .iter()
        .position(same)
        .map(|at| deaths.remove(at))
        .and_then(|item| match item {
            FieldValue::Table(t) => t.get("count").and_then(FieldValue::as_i64),
            _ => None,
        })
        .unwrap_or(0);
    let mut death = Headers::new();
    death.push("count", FieldValue::I64(previous_count + 1));
    death.push("reason", reason.as_str());
    death.push("queue", queue);
    death.push("time", FieldValue::Timestamp(now_ms / 1000));
    death.push("exchange", message.exchange.as_str());
    death.push("routing-keys", FieldValue::Array(vec![FieldValue::from(message.routing_key.as_str())]));
    if let Some(expiration) = message.properties.expiration_ms.take() {
        death.push("original-expiration", expiration.to_string());
    }
    deaths.insert(0, FieldValue::Table(death));
    let first = message.headers.get("x-first-death-reason").is_none();
    message.headers.set("x-death", FieldValue::Array(deaths));
    if first {
        message.headers.set("x-first-death-reason", reason.as_str().into());
        message.headers.set("x-first-death-queue", queue.into());
        message.headers.set("x-first-death-exchange", message.exchange.clone().into());
    }
    message.headers.set("x-last-death-reason", reason.as_str().into());
    message.headers.set("x-last-death-queue", queue.into());
    message.headers.set("x-last-death-exchange", message.exchange.clone().into());
    message
}
