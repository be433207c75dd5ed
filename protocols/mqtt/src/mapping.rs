//! The mapping between an MQTT PUBLISH and the core's message model (documented in MAPPING.md).
//! Pure functions; touches nothing but the two data models.
//!
//! MQTT facts that have no place in the message model (the publish QoS, the RETAIN flag, the
//! publisher's client id for No Local) travel as headers with the reserved prefix `x-mqtt-`. They
//! are written before any user property, and a delivery strips only the first header of each of
//! these names, so a user property that happens to use one of them survives the round trip.

use bytes::Bytes;
use wharf_core::model::{FieldValue, Headers, Message, Properties};

use crate::codec::{PublishProperties, QoS};
use crate::topic;

/// Header: the QoS the message was published with (`U8`).
pub const HEADER_QOS: &str = "x-mqtt-qos";
/// Header: the RETAIN flag of the original PUBLISH (`Bool`).
pub const HEADER_RETAIN: &str = "x-mqtt-retain";
/// Header: the client id of the MQTT publisher (for No Local).
pub const HEADER_PUBLISHER: &str = "x-mqtt-publisher";
/// Header: the MQTT topic of a retained message sent to one session queue on subscribe (its
/// routing key there is the queue's name).
pub const HEADER_TOPIC: &str = "x-mqtt-topic";
/// Header: the filter a retained message was sent for on subscribe.
pub const HEADER_RETAINED_FOR: &str = "x-mqtt-retained-for";
/// The internal headers, stripped (first occurrence each) on delivery to MQTT.
const INTERNAL_HEADERS: [&str; 5] = [HEADER_QOS, HEADER_RETAIN, HEADER_PUBLISHER, HEADER_TOPIC, HEADER_RETAINED_FOR];

/// User property whose value becomes the core's idempotency key.
pub const USER_PROPERTY_IDEMPOTENCY_KEY: &str = "idempotency-key";
/// User property whose value becomes the core's partition key.
pub const USER_PROPERTY_PARTITION_KEY: &str = "partition-key";

/// The core message of an MQTT PUBLISH (its topic already resolved from any alias).
pub fn message_from_publish(
    exchange: &str,
    topic_name: &str,
    qos: QoS,
    retain: bool,
    properties: &PublishProperties,
    payload: Bytes,
    publisher: &str,
) -> Message {
    let mut message = Message::new(exchange, topic::topic_to_routing_key(topic_name), payload);
    let mut headers = Headers::new();
    headers.push(HEADER_QOS, FieldValue::U8(qos as u8));
    if retain {
        headers.push(HEADER_RETAIN, FieldValue::Bool(true));
    }
    headers.push(HEADER_PUBLISHER, publisher);
    for (name, value) in &properties.user_properties {
        headers.push(name.clone(), value.as_str());
        if name == USER_PROPERTY_IDEMPOTENCY_KEY && message.idempotency_key.is_none() {
            message.idempotency_key = Some(value.clone());
        }
        if name == USER_PROPERTY_PARTITION_KEY && message.partition_key.is_none() {
            message.partition_key = Some(value.clone());
        }
    }
    message.headers = headers;
    message.properties = Properties {
        content_type: properties.content_type.clone(),
        correlation_id: properties.correlation_data.clone(),
        reply_to: properties.response_topic.as_deref().map(topic::topic_to_routing_key),
        expiration_ms: properties.message_expiry_interval_secs.map(|secs| u64::from(secs) * 1000),
        payload_utf8: properties.payload_format_indicator.map(|indicator| indicator == 1),
        ..Properties::default()
    };
    message
}

/// What a delivered core message becomes in an MQTT PUBLISH (before the subscription decides QoS,
/// RETAIN and identifiers).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Topic name.
    pub topic: String,
    /// QoS it was published with (a message from another protocol counts as QoS 2: the
    /// subscription's QoS decides).
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// The MQTT client id that published it, if one did.
    pub publisher: Option<String>,
    /// The filter it was sent for as a retained message on subscribe.
    pub retained_for: Option<String>,
    /// Properties (without topic alias and subscription identifiers).
    pub properties: PublishProperties,
    /// Payload.
    pub payload: Bytes,
}

/// The MQTT view of a delivered message; `None` once its expiry has passed.
///
/// `enqueued_ms` is when the core stored it and `now_ms` the current time: MQTT 5 sends the
/// Message Expiry Interval minus the time the message waited [MQTT-3.3.2-6].
pub fn outgoing_from_message(message: &Message, enqueued_ms: u64, now_ms: u64) -> Option<Outgoing> {
    let mut stripped = [false; INTERNAL_HEADERS.len()];
    let mut qos = QoS::ExactlyOnce;
    let mut retain = false;
    let mut publisher = None;
    let mut topic_header = None;
    let mut retained_for = None;
    let mut user_properties = Vec::new();
    for (name, value) in &message.headers.0 {
        if let Some(index) = INTERNAL_HEADERS.iter().position(|internal| internal == name)
            && !stripped[index]
        {
            stripped[index] = true;
            match INTERNAL_HEADERS[index] {
                HEADER_QOS => {
                    qos = value.as_i64().and_then(|v| QoS::from_bits(v as u8)).unwrap_or(QoS::ExactlyOnce);
                }
                HEADER_RETAIN => retain = value.as_bool().unwrap_or(false),
                HEADER_PUBLISHER => publisher = value.as_str().map(str::to_owned),
                HEADER_TOPIC => topic_header = value.as_str().map(str::to_owned),
                _ => retained_for = value.as_str().map(str::to_owned),
            }
            continue;
        }
        user_properties.push((name.clone(), field_to_string(value)));
    }
    let properties = &message.properties;
    let message_expiry_interval_secs = match properties.expiration_ms {
        Some(ttl_ms) => {
            let waited_ms = now_ms.saturating_sub(enqueued_ms);
            if waited_ms >= ttl_ms {
                return None;
            }
            // Rounded up: a message with 300 ms left must not be announced as already expired.
            Some(u32::try_from((ttl_ms - waited_ms).div_ceil(1000)).unwrap_or(u32::MAX))
        }
        None => None,
    };
    let topic = topic_header.unwrap_or_else(|| topic::routing_key_to_topic(&message.routing_key));
    Some(Outgoing {
        topic,
        qos,
        retain,
        publisher,
        retained_for,
        properties: PublishProperties {
            payload_format_indicator: properties.payload_utf8.map(u8::from),
            message_expiry_interval_secs,
            topic_alias: None,
            response_topic: properties.reply_to.as_deref().map(topic::routing_key_to_topic),
            correlation_data: properties.correlation_id.clone(),
            user_properties,
            subscription_identifiers: Vec::new(),
            content_type: properties.content_type.clone(),
        },
        payload: message.payload.clone(),
    })
}

/// A header value as an MQTT user property value (MQTT user properties are strings).
fn field_to_string(value: &FieldValue) -> String {
    match value {
        FieldValue::LongString(text) => text.clone(),
        FieldValue::Bool(v) => v.to_string(),
        FieldValue::F32(v) => v.to_string(),
        FieldValue::F64(v) => v.to_string(),
        FieldValue::Decimal { scale, value } => {
            let digits = value.to_string();
            let scale = usize::from(*scale);
            if scale == 0 {
                digits
            } else {
                let padded = format!("{digits:0>width$}", width = scale + 1);
                let (whole, fraction) = padded.split_at(padded.len() - scale);
                format!("{whole}.{fraction}")
            }
        }
        FieldValue::Bytes(bytes) | FieldValue::LongBytes(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        FieldValue::Timestamp(secs) => secs.to_string(),
        FieldValue::Table(table) => {
            let parts: Vec<String> =
                table.0.iter().map(|(name, value)| format!("{name}={}", field_to_string(value))).collect();
            format!("{{{}}}", parts.join(","))
        }
        FieldValue::Array(values) => {
            let parts: Vec<String> = values.iter().map(field_to_string).collect();
            format!("[{}]", parts.join(","))
        }
        FieldValue::Void => String::new(),
        other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips_through_the_message_model() {
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval_secs: Some(60),
            response_topic: Some("reply/to.me".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![
                ("a".into(), "1".into()),
                (HEADER_QOS.into(), "user's own".into()),
                ("a".into(), "2".into()),
                (USER_PROPERTY_IDEMPOTENCY_KEY.into(), "k1".into()),
            ],
            content_type: Some("text/plain".into()),
            ..PublishProperties::default()
        };
        let message =
            message_from_publish("amq.topic", "a/b.c", QoS::AtLeastOnce, true, &properties, "hi".into(), "client-1");
        assert_eq!(message.routing_key, "a.b/c");
        assert_eq!(message.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(message.properties.reply_to.as_deref(), Some("reply.to/me"));
        let out = outgoing_from_message(&message, 1_000, 11_000).expect("not expired");
        assert_eq!(out.topic, "a/b.c");
        assert_eq!(out.qos, QoS::AtLeastOnce);
        assert!(out.retain);
        assert_eq!(out.publisher.as_deref(), Some("client-1"));
        assert_eq!(out.properties.user_properties, properties.user_properties);
        assert_eq!(out.properties.message_expiry_interval_secs, Some(50));
        assert_eq!(out.properties.response_topic.as_deref(), Some("reply/to.me"));
        assert_eq!(out.properties.correlation_data, properties.correlation_data);
        assert_eq!(out.properties.payload_format_indicator, Some(1));
        assert_eq!(out.properties.content_type.as_deref(), Some("text/plain"));
    }

    // [MQTT-3.3.2-5]: a message whose expiry has passed is not delivered.
    #[test]
    fn mqtt_3_3_2_5_expired_messages_are_not_delivered() {
        let properties = PublishProperties { message_expiry_interval_secs: Some(1), ..PublishProperties::default() };
        let message = message_from_publish("amq.topic", "t", QoS::AtMostOnce, false, &properties, "x".into(), "c");
        assert!(outgoing_from_message(&message, 0, 999).is_some());
        assert_eq!(
            outgoing_from_message(&message, 0, 999).and_then(|o| o.properties.message_expiry_interval_secs),
            Some(1)
        );
        assert!(outgoing_from_message(&message, 0, 1_000).is_none());
    }

    #[test]
    fn amqp_headers_become_string_user_properties() {
        let mut message = Message::new("amq.topic", "a.b", "x");
        message.headers.push("n", FieldValue::I32(-5));
        message.headers.push("d", FieldValue::Decimal { scale: 2, value: 5 });
        message.headers.push("t", FieldValue::Bool(true));
        let out = outgoing_from_message(&message, 0, 0).expect("no expiry");
        assert_eq!(out.qos, QoS::ExactlyOnce);
        assert_eq!(
            out.properties.user_properties,
            vec![("n".into(), "-5".into()), ("d".into(), "0.05".into()), ("t".into(), "true".into())]
        );
    }
}
