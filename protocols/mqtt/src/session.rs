//! What an MQTT session keeps in the core, and under which names: the session queue, the session
//! record (subscriptions, expiry), QoS 2 packet-identifier state in both directions, and retained
//! messages. Encodings and key names only; the connection engine does the reads and writes.
//!
//! State record keys use U+0000 as separator: MQTT forbids it in client identifiers and topics,
//! so a prefix scan for one client never reaches another.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wharf_core::model::{Message, Position};

use crate::codec::{QoS, SubscriptionOptions};

/// Prefix of every MQTT session queue; the client id follows.
pub const SESSION_QUEUE_PREFIX: &str = "mqtt.session.";
/// Prefix of every shared-subscription queue.
pub const SHARED_QUEUE_PREFIX: &str = "mqtt.share.";

/// The queue holding a client's messages.
pub fn session_queue(client_id: &str) -> String {
    format!("{SESSION_QUEUE_PREFIX}{client_id}")
}

/// The queue of a shared subscription group and filter. Names past `name_len_max` bytes are
/// shortened with a hash so any legal filter can be shared.
pub fn shared_queue(group: &str, filter: &str, name_len_max: usize) -> String {
    let name = format!("{SHARED_QUEUE_PREFIX}{group}.{filter}");
    if name.len() <= name_len_max {
        return name;
    }
    let hash = fnv1a64(name.as_bytes());
    let keep = name_len_max.saturating_sub(17);
    let mut cut = keep.min(name.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}.{hash:016x}", &name[..cut])
}

/// FNV-1a, 64 bits: stable across builds and platforms (std's hasher is not), for queue names.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Key of a client's session record.
pub fn session_key(client_id: &str) -> String {
    format!("mqtt\0session\0{client_id}")
}

/// Prefix of every session record.
pub const SESSION_KEY_PREFIX: &str = "mqtt\0session\0";

/// Prefix of a client's inbound QoS 2 records (one per packet identifier: its epoch).
pub fn inbound_qos2_prefix(client_id: &str) -> String {
    format!("mqtt\0in2\0{client_id}\0")
}

/// Key of an inbound QoS 2 record.
pub fn inbound_qos2_key(client_id: &str, packet_id: u16) -> String {
    format!("{}{packet_id}", inbound_qos2_prefix(client_id))
}

/// Prefix of a client's outbound QoS 2 records (PUBREL sent, PUBCOMP awaited).
pub fn released_prefix(client_id: &str) -> String {
    format!("mqtt\0rel\0{client_id}\0")
}

/// Key of an outbound QoS 2 record.
pub fn released_key(client_id: &str, packet_id: u16) -> String {
    format!("{}{packet_id}", released_prefix(client_id))
}

/// The records of a per-packet-id scan (`inbound_qos2_prefix`, `released_prefix`) by packet id,
/// decoded; unreadable ones are left out.
pub fn by_packet_id<T>(
    records: Vec<(String, bytes::Bytes)>,
    decode: impl Fn(&[u8]) -> Option<T>,
) -> std::collections::HashMap<u16, T> {
    records
        .into_iter()
        .filter_map(|(key, value)| Some((key.rsplit('\0').next()?.parse().ok()?, decode(&value)?)))
        .collect()
}

/// Prefix of retained messages; the topic name follows.
pub const RETAINED_KEY_PREFIX: &str = "mqtt\0retained\0";

/// Key of the retained message of a topic.
pub fn retained_key(topic: &str) -> String {
    format!("{RETAINED_KEY_PREFIX}{topic}")
}

/// A subscription as the session record keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// Granted QoS (0, 1, 2).
    pub qos: u8,
    /// No Local.
    pub no_local: bool,
    /// Retain As Published.
    pub retain_as_published: bool,
    /// Retain Handling.
    pub retain_handling: u8,
    /// Subscription Identifier.
    pub identifier: Option<u32>,
}

impl StoredSubscription {
    /// From the SUBSCRIBE options.
    pub fn new(options: &SubscriptionOptions, identifier: Option<u32>) -> Self {
        Self {
            qos: options.qos as u8,
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            retain_handling: options.retain_handling,
            identifier,
        }
    }

    /// The granted QoS.
    pub fn qos(&self) -> QoS {
        QoS::from_bits(self.qos).unwrap_or(QoS::AtMostOnce)
    }
}

/// A will message as the session keeps it (the will is part of the session state, MQTT 5
/// section 4.1), so that a will pending when the broker stops is published after it restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredWill {
    /// Will Topic.
    pub topic: String,
    /// Will Retain.
    pub retain: bool,
    /// Will Delay Interval, seconds.
    pub delay_secs: u32,
    /// The message to publish, already mapped (see `mapping::message_from_publish`).
    pub message: Message,
}

/// A session, as stored in the core (owned by its session queue: deleting the queue deletes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Unique per session incarnation: part of the idempotency keys of inbound QoS 2 messages, so
    /// a new session reusing packet identifiers is never mistaken for the old one.
    pub uid: String,
    /// Session Expiry Interval, seconds (`u32::MAX`: never).
    pub expiry_secs: u32,
    /// Whether a connection holds the session (as of the last write).
    pub connected: bool,
    /// When the last connection ended, milliseconds since the Unix epoch.
    pub disconnected_at_ms: u64,
    /// Subscriptions by topic filter (shared ones under their full `$share/...` filter).
    pub subscriptions: BTreeMap<String, StoredSubscription>,
    /// The will of the connection holding the session, or of the last one if it ended without
    /// DISCONNECT and the will is still waiting for its delay.
    pub will: Option<StoredWill>,
}

impl SessionRecord {
    /// Encode for the state store.
    pub fn encode(&self) -> bytes::Bytes {
        postcard::to_stdvec(self).map(bytes::Bytes::from).unwrap_or_default()
    }

    /// Decode from the state store; `None` if unreadable.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }
}

/// Encode a position (outbound QoS 2 record).
pub fn encode_position(position: &Position) -> bytes::Bytes {
    postcard::to_stdvec(position).map(bytes::Bytes::from).unwrap_or_default()
}

/// Decode a position.
pub fn decode_position(bytes: &[u8]) -> Option<Position> {
    postcard::from_bytes(bytes).ok()
}

/// Encode an epoch (inbound QoS 2 record).
pub fn encode_epoch(epoch: u32) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&epoch.to_be_bytes())
}

/// Decode an epoch.
pub fn decode_epoch(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// A retained message and when it was stored, so its Message Expiry Interval keeps running while
/// it is retained [MQTT-3.3.2-5].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetainedRecord {
    /// When it was stored, milliseconds since the Unix epoch.
    pub stored_ms: u64,
    /// The message as published.
    pub message: Message,
}

impl RetainedRecord {
    /// Encode for the state store.
    pub fn encode(&self) -> bytes::Bytes {
        postcard::to_stdvec(self).map(bytes::Bytes::from).unwrap_or_default()
    }

    /// Decode from the state store; `None` if unreadable.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }

    /// The message as it is to be sent at `now_ms`: its expiry reduced by the time it was
    /// retained, or `None` once expired.
    pub fn current(mut self, now_ms: u64) -> Option<Message> {
        if let Some(ttl_ms) = self.message.properties.expiration_ms {
            let retained_ms = now_ms.saturating_sub(self.stored_ms);
            if retained_ms >= ttl_ms {
                return None;
            }
            self.message.properties.expiration_ms = Some(ttl_ms - retained_ms);
        }
        Some(self.message)
    }
}

/// The packet identifier of a delivery towards a client: a function of where the message lives,
/// so that a message re-sent after a reconnect or a broker restart carries its original packet
/// identifier [MQTT-4.4.0-1] without a write per delivery. Two inflight messages that map to the
/// same identifier are sent one after the other.
pub fn packet_id_for(position: &Position) -> u16 {
    let spread = position.queue.0.wrapping_mul(0x9E37_79B9).wrapping_add(u64::from(position.partition) * 7919);
    ((position.offset.wrapping_add(spread) % 65_535) + 1) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_core::model::QueueId;

    #[test]
    fn consecutive_offsets_get_distinct_packet_ids() {
        let ids: std::collections::BTreeSet<u16> =
            (0..65_535u64).map(|offset| packet_id_for(&Position { queue: QueueId(7), partition: 0, offset })).collect();
        assert_eq!(ids.len(), 65_535);
        assert!(!ids.contains(&0));
    }

    #[test]
    fn long_shared_queue_names_are_shortened_stably() {
        let filter = "a/".repeat(200);
        let name = shared_queue("g", &filter, 255);
        assert!(name.len() <= 255);
        assert_eq!(name, shared_queue("g", &filter, 255));
        assert_ne!(name, shared_queue("h", &filter, 255));
        assert_eq!(shared_queue("g", "a/b", 255), "mqtt.share.g.a/b");
    }

    #[test]
    fn records_round_trip() {
        let mut record = SessionRecord {
            uid: "1.2.3".into(),
            expiry_secs: 60,
            connected: true,
            disconnected_at_ms: 5,
            subscriptions: BTreeMap::new(),
            will: Some(StoredWill {
                topic: "w".into(),
                retain: true,
                delay_secs: 5,
                message: Message::new("amq.topic", "w", "gone"),
            }),
        };
        record.subscriptions.insert(
            "a/#".into(),
            StoredSubscription {
                qos: 2,
                no_local: true,
                retain_as_published: false,
                retain_handling: 1,
                identifier: Some(9),
            },
        );
        assert_eq!(SessionRecord::decode(&record.encode()), Some(record));
        assert_eq!(decode_epoch(&encode_epoch(77)), Some(77));
    }

    // [MQTT-3.3.2-5]: a retained message's expiry keeps running while it is retained.
    #[test]
    fn mqtt_3_3_2_5_retained_messages_expire() {
        let mut message = Message::new("amq.topic", "t", "x");
        message.properties.expiration_ms = Some(10_000);
        let record = RetainedRecord { stored_ms: 1_000, message };
        let decoded = RetainedRecord::decode(&record.encode()).expect("round trip");
        assert_eq!(decoded.clone().current(4_000).and_then(|m| m.properties.expiration_ms), Some(7_000));
        assert_eq!(decoded.current(11_000), None);
        let forever = RetainedRecord { stored_ms: 0, message: Message::new("amq.topic", "t", "x") };
        assert!(forever.current(u64::MAX).is_some());
    }
}
