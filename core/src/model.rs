//! The internal message model shared by every protocol: messages, typed headers, properties and
//! positions. Pure data; touches nothing else.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A typed header value: a superset of AMQP 0-9-1 field values (as RabbitMQ reads them) and MQTT 5
/// user properties (which map to `LongString`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s`
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: value × 10^-scale.
    Decimal {
        /// Number of decimal digits.
        scale: u8,
        /// Unscaled value.
        value: u32,
    },
    /// `s` (short) and `S` (long) strings, also MQTT user property values.
    LongString(String),
    /// `x`: raw bytes.
    Bytes(Bytes),
    /// `T`: seconds since the Unix epoch.
    Timestamp(u64),
    /// `F`: a nested table.
    Table(Headers),
    /// `A`: an array.
    Array(Vec<FieldValue>),
    /// `V`: no value.
    Void,
    /// `S` holding bytes that are not UTF-8 (AMQP long strings are any bytes): kept apart from
    /// `x` so that it is delivered with the type it was published with.
    LongBytes(Bytes),
}

impl FieldValue {
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::LongString(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer of any width.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Self::I8(v) => v.into(),
            Self::U8(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I64(v) => v,
            _ => return None,
        })
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }
}

impl From<&str> for FieldValue {
    fn from(value: &str) -> Self {
        Self::LongString(value.to_owned())
    }
}

impl From<String> for FieldValue {
    fn from(value: String) -> Self {
        Self::LongString(value)
    }
}

/// An ordered list of named header values. Order is kept (MQTT 5 user properties are ordered and
/// may repeat a name); lookups return the first match, as RabbitMQ's table lookup does.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Headers(pub Vec<(String, FieldValue)>);

impl Headers {
    /// An empty list.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// The first value named `name`.
    pub fn get(&self, name: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(key, _)| key == name).map(|(_, value)| value)
    }

    /// Append a value (keeps any earlier value of the same name).
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<FieldValue>) {
        self.0.push((name.into(), value.into()));
    }

    /// Replace every value named `name` by one value at the place of the first, or append it.
    pub fn set(&mut self, name: &str, value: FieldValue) {
        match self.0.iter().position(|(key, _)| key == name) {
            Some(at) => {
                self.0[at].1 = value;
                let mut index = 0;
                self.0.retain(|(key, _)| {
                    index += 1;
                    index - 1 == at || key != name
                });
            }
            None => self.0.push((name.to_owned(), value)),
        }
    }

    /// Remove every value named `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(key, _)| key != name);
    }

    /// Iterate in order.
    pub fn iter(&self) -> impl Iterator<Item = &(String, FieldValue)> {
        self.0.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Approximate encoded size, used for byte limits.
    pub fn size_bytes(&self) -> u64 {
        self.0.iter().map(|(key, value)| key.len() as u64 + value_size_bytes(value)).sum()
    }
}

fn value_size_bytes(value: &FieldValue) -> u64 {
    match value {
        FieldValue::LongString(s) => s.len() as u64 + 4,
        FieldValue::Bytes(b) | FieldValue::LongBytes(b) => b.len() as u64 + 4,
        FieldValue::Table(t) => t.size_bytes() + 4,
        FieldValue::Array(a) => a.iter().map(value_size_bytes).sum::<u64>() + 4,
        _ => 9,
    }
}

/// AMQP delivery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DeliveryMode {
    /// 1: RabbitMQ may keep it in memory only. Wharf replicates it anyway.
    Transient,
    /// 2: persistent.
    #[default]
    Persistent,
}

/// Standard message properties: the union of AMQP basic properties and MQTT 5 publish properties.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Properties {
    /// AMQP content-type; MQTT 5 content type.
    pub content_type: Option<String>,
    /// AMQP content-encoding.
    pub content_encoding: Option<String>,
    /// AMQP correlation-id (a short string); MQTT 5 correlation data (bytes).
    pub correlation_id: Option<Bytes>,
    /// AMQP reply-to; MQTT 5 response topic.
    pub reply_to: Option<String>,
    /// Time to live from publication: AMQP expiration (ms); MQTT 5 message expiry interval (s×1000).
    pub expiration_ms: Option<u64>,
    /// AMQP priority (0-255; queues cap it at their `x-max-priority`).
    pub priority: Option<u8>,
    /// AMQP timestamp, seconds since the Unix epoch.
    pub timestamp_secs: Option<u64>,
    /// AMQP delivery-mode.
    pub delivery_mode: Option<DeliveryMode>,
    /// AMQP message-id.
    pub message_id: Option<String>,
    /// AMQP user-id.
    pub user_id: Option<String>,
    /// AMQP app-id.
    pub app_id: Option<String>,
    /// AMQP type.
    pub message_type: Option<String>,
    /// MQTT 5 payload format indicator (true: UTF-8).
    pub payload_utf8: Option<bool>,
}

impl Properties {
    /// Approximate size of the set properties, for byte limits.
    pub fn size_bytes(&self) -> u64 {
        let text = |v: &Option<String>| v.as_ref().map_or(0, |s| s.len() as u64);
        text(&self.content_type)
            + text(&self.content_encoding)
            + self.correlation_id.as_ref().map_or(0, |b| b.len() as u64)
            + text(&self.reply_to)
            + text(&self.message_id)
            + text(&self.user_id)
            + text(&self.app_id)
            + text(&self.message_type)
            + 32
    }
}

/// A message as published: the routing address, metadata and payload. Immutable once published;
/// shared by `Arc` between the Raft log entry, queue partitions and deliveries.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Message {
    /// Exchange it was published to ("" is the default exchange).
    pub exchange: String,
    /// Routing key (MQTT: the topic, translated to AMQP form by the front-end).
    pub routing_key: String,
    /// Standard properties.
    pub properties: Properties,
    /// Typed headers, order kept.
    pub headers: Headers,
    /// Idempotency key chosen by the publisher (used by the exactly-once registry).
    pub idempotency_key: Option<String>,
    /// Partition key: the partition of a partitioned queue is a hash of it (else of the routing key).
    pub partition_key: Option<String>,
    /// Delayed delivery: the message becomes visible this long after it is committed.
    pub delay_ms: Option<u64>,
    /// Payload bytes.
    pub payload: Bytes,
}

impl Message {
    /// A message with a payload and routing address and nothing else set.
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self { exchange: exchange.into(), routing_key: routing_key.into(), payload: payload.into(), ..Self::default() }
    }

    /// Bytes counted against queue byte limits (payload only, as RabbitMQ's `x-max-length-bytes`).
    pub fn payload_len(&self) -> u64 {
        self.payload.len() as u64
    }

    /// Bytes a Raft entry spends on this message, roughly.
    pub fn size_bytes(&self) -> u64 {
        self.payload.len() as u64
            + self.exchange.len() as u64
            + self.routing_key.len() as u64
            + self.properties.size_bytes()
            + self.headers.size_bytes()
    }
}

/// A shared, immutable message.
pub type MessageRef = Arc<Message>;

/// Identity of a queue, assigned by the catalogue when the queue is declared. A queue deleted and
/// declared again gets a new id, so stale commands about the old one find nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId(pub u64);

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q{}", self.0)
    }
}

/// Where a committed message lives: its queue, partition and offset in that partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Queue.
    pub queue: QueueId,
    /// Partition of the queue.
    pub partition: u32,
    /// Offset within the partition: dense, increasing, never reused.
    pub offset: u64,
}

/// A queue's name within its vhost.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueName {
    /// Virtual host.
    pub vhost: String,
    /// Queue name.
    pub name: String,
}

impl std::fmt::Display for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "queue '{}' in vhost '{}'", self.name, self.vhost)
    }
}

/// What a queue does when a publish would exceed its length or byte limit (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse the publish (the publisher gets a negative confirm).
    RejectPublish,
    /// Refuse the publish and dead-letter the refused message.
    RejectPublishDlx,
}

/// Queue arguments, parsed and validated from AMQP `x-` arguments by the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueArgs {
    /// `x-message-ttl`.
    pub message_ttl_ms: Option<u64>,
    /// `x-expires`: delete the queue after it is unused this long.
    pub expires_ms: Option<u64>,
    /// `x-max-length`: most ready messages.
    pub length_max: Option<u64>,
    /// `x-max-length-bytes`: most ready payload bytes.
    pub bytes_max: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-priority` (1-255); none: priorities are ignored.
    pub priority_max: Option<u8>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `x-delivery-limit`: dead-letter a message returned more often than this.
    pub delivery_limit: Option<u32>,
    /// `x-partitions` (Wharf): number of partitions, at least 1.
    pub partitions: u32,
    /// `x-idempotency-window-ms` (Wharf): how long this queue remembers idempotency keys; none:
    /// `limits.idempotency_window_ms`.
    pub idempotency_window_ms: Option<u64>,
}

impl Default for QueueArgs {
    fn default() -> Self {
        Self {
            message_ttl_ms: None,
            expires_ms: None,
            length_max: None,
            bytes_max: None,
            overflow: Overflow::DropHead,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            priority_max: None,
            single_active_consumer: false,
            delivery_limit: None,
            partitions: 1,
            idempotency_window_ms: None,
        }
    }
}

/// Identity of a client connection (AMQP connection, MQTT network connection, gRPC stream) on some
/// node. `incarnation` increases at every start of the node, so that state left by connections of
/// an earlier run (exclusive queues, consumers) can be recognised and cleaned up after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnectionId {
    /// Node the connection is on.
    pub node: u64,
    /// The node's incarnation (start counter) when the connection was accepted.
    pub incarnation: u64,
    /// Sequence number of the connection within that incarnation.
    pub seq: u64,
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.node, self.incarnation, self.seq)
    }
}

/// Identity of a transaction: the node and incarnation that began it and a sequence number, so it
/// is unique across the cluster and across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxnId {
    /// Node that began it.
    pub node: u64,
    /// That node's incarnation.
    pub incarnation: u64,
    /// Sequence number within the incarnation.
    pub seq: u64,
}

impl std::fmt::Display for TxnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "txn-{}.{}.{}", self.node, self.incarnation, self.seq)
    }
}

impl std::str::FromStr for TxnId {
    type Err = crate::error::CoreError;

    /// The inverse of `Display` (`txn-<node>.<incarnation>.<seq>`), for front-ends that hand ids
    /// to clients as text.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || crate::error::CoreError::InvalidArgument(format!("'{text}' is not a transaction id"));
        let (node, incarnation, seq) = text.strip_prefix("txn-").and_then(three_numbers).ok_or_else(invalid)?;
        Ok(Self { node, incarnation, seq })
    }
}

impl std::str::FromStr for ConnectionId {
    type Err = crate::error::CoreError;

    /// The inverse of `Display` (`<node>.<incarnation>.<seq>`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (node, incarnation, seq) = three_numbers(text)
            .ok_or_else(|| crate::error::CoreError::InvalidArgument(format!("'{text}' is not a connection id")))?;
        Ok(Self { node, incarnation, seq })
    }
}

/// `a.b.c` as three decimal numbers.
fn three_numbers(text: &str) -> Option<(u64, u64, u64)> {
    let mut parts = text.split('.').map(|part| part.parse::<u64>().ok());
    let numbers = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_back_from_their_text() {
        let txn = TxnId { node: 1, incarnation: 7, seq: 42 };
        assert_eq!(txn.to_string().parse::<TxnId>(), Ok(txn));
        let connection = ConnectionId { node: 3, incarnation: 2, seq: 9 };
        assert_eq!(connection.to_string().parse::<ConnectionId>(), Ok(connection));
        let consumer = crate::queue::ConsumerId { connection, seq: 5 };
        assert_eq!(consumer.to_string().parse::<crate::queue::ConsumerId>(), Ok(consumer));
        for bad in ["", "txn-", "txn-1.2", "txn-1.2.3.4", "txn-a.b.c", "1.2.3", "txn-1.2.-3"] {
            assert!(bad.parse::<TxnId>().is_err(), "{bad}");
        }
        for bad in ["1.2.3", "1.2/3", "1.2.3/x", "/4"] {
            assert!(bad.parse::<crate::queue::ConsumerId>().is_err(), "{bad}");
        }
    }
}
