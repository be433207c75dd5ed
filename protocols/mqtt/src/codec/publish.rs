//! PUBLISH (MQTT 3.1.1 section 3.3, MQTT 5.0 section 3.3): `read` and `write`. Both directions.
//! The fixed header already checked QoS 3 and DUP on QoS 0. Touches nothing outside the codec.

use super::decode::Context;
use super::fixed_header::Sender;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::topic;
use super::wire::{Reader, Sink, malformed, protocol, write_with_length};
use super::{DecodeError, ProtocolVersion, Publish, PublishProperties, QoS};

const PUBLISH_PROPERTIES: &[PropertyId] = &[
    PropertyId::PayloadFormatIndicator,
    PropertyId::MessageExpiryInterval,
    PropertyId::TopicAlias,
    PropertyId::ResponseTopic,
    PropertyId::CorrelationData,
    PropertyId::UserProperty,
    PropertyId::SubscriptionIdentifier,
    PropertyId::ContentType,
];

pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<Publish, DecodeError> {
    let flags = context.flags;
    let Some(qos) = QoS::from_bits((flags >> 1) & 0b11) else {
        return Err(malformed("[MQTT-3.3.1-4] PUBLISH with both QoS bits set"));
    };
    let topic = reader.string("PUBLISH topic name")?;
    // [MQTT-2.3.1-5] / 5.0 [MQTT-2.2.1-2]: a QoS 0 PUBLISH has no packet identifier, so for it
    // the bytes after the topic (and properties) are all payload.
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(read_packet_id(reader, "PUBLISH")?) };
    let properties =
        if context.is_v5() { read_properties(reader, context.sender)? } else { PublishProperties::default() };
    if topic.is_empty() {
        // MQTT 5 allows an empty Topic Name with a Topic Alias (the alias maps to the topic); the
        // caller resolves the alias. Without one it is a Protocol Error (section 3.3.2.1).
        if context.is_v5() {
            if properties.topic_alias.is_none() {
                return Err(protocol("PUBLISH: zero-length Topic Name without a Topic Alias"));
            }
        } else {
            return Err(DecodeError::TopicNameInvalid("[MQTT-4.7.3-1] PUBLISH topic name is empty".into()));
        }
    } else if let Err(why) = topic::check_topic_name(&topic) {
        return Err(DecodeError::TopicNameInvalid(format!("PUBLISH topic {topic:?}: {why}")));
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        properties,
        payload: reader.rest(),
    })
}

/// A packet identifier, which must not be 0 (3.1.1 [MQTT-2.3.1-1], 5.0 [MQTT-2.2.1-3]). The
/// specification does not say which error; 0 parses but is forbidden, so it is a Protocol Error.
pub(crate) fn read_packet_id(reader: &mut Reader, packet: &str) -> Result<u16, DecodeError> {
    let id = reader.u16(&format!("{packet} packet identifier"))?;
    if id == 0 {
        return Err(protocol(format!("[MQTT-2.2.1-3] / 3.1.1 [MQTT-2.3.1-1] {packet}: packet identifier 0")));
    }
    Ok(id)
}

fn read_properties(reader: &mut Reader, sender: Sender) -> Result<PublishProperties, DecodeError> {
    let set = properties::read(reader, "PUBLISH", PUBLISH_PROPERTIES, SubscriptionIdentifiers::Repeatable)?;
    if sender == Sender::Client && !set.subscription_identifiers.is_empty() {
        return Err(protocol("[MQTT-3.3.4-6] PUBLISH from a client carries a Subscription Identifier"));
    }
    Ok(PublishProperties {
        payload_format_indicator: set.payload_format_indicator,
        message_expiry_interval_secs: set.message_expiry_interval_secs,
        topic_alias: set.topic_alias,
        response_topic: set.response_topic,
        correlation_data: set.correlation_data,
        user_properties: set.user_properties,
        subscription_identifiers: set.subscription_identifiers,
        content_type: set.content_type,
    })
}

/// Writes a PUBLISH body. Preconditions (the decoder guarantees them for what it returns): a packet
/// identifier exactly when QoS > 0 (0 is written if it is missing), a topic without wildcards.
pub(crate) fn write(publish: &Publish, version: ProtocolVersion, sink: &mut dyn Sink) {
    sink.write_string(&publish.topic);
    if publish.qos != QoS::AtMostOnce {
        sink.write_u16(publish.packet_id.unwrap_or(0));
    }
    if version.is_v5() {
        write_with_length(sink, &|sink| write_properties(&publish.properties, sink));
    }
    sink.write_bytes(&publish.payload);
}

fn write_properties(p: &PublishProperties, sink: &mut dyn Sink) {
    properties::write_byte(sink, PropertyId::PayloadFormatIndicator, p.payload_format_indicator);
    properties::write_u32(sink, PropertyId::MessageExpiryInterval, p.message_expiry_interval_secs);
    properties::write_u16(sink, PropertyId::TopicAlias, p.topic_alias);
    properties::write_string(sink, PropertyId::ResponseTopic, p.response_topic.as_deref());
    properties::write_binary(sink, PropertyId::CorrelationData, p.correlation_data.as_deref());
    properties::write_user_properties(sink, &p.user_properties);
    for &id in &p.subscription_identifiers {
        properties::write_variable_byte_integer(sink, PropertyId::SubscriptionIdentifier, id);
    }
    properties::write_string(sink, PropertyId::ContentType, p.content_type.as_deref());
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::codec::{Packet, decode, decode_from_server, encode};

    #[test]
    fn v311_qos1_bytes() {
        let publish = Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "a/b".into(),
            packet_id: Some(10),
            payload: Bytes::from_static(b"hi"),
            ..Publish::default()
        };
        let packet = Packet::Publish(publish);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0x3B, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']);
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V3_1_1), 1024), Ok(Some(packet)));
    }

    #[test]
    fn v5_empty_topic_with_alias_and_server_subscription_identifiers() {
        let publish = Publish {
            qos: QoS::ExactlyOnce,
            topic: String::new(),
            packet_id: Some(1),
            properties: PublishProperties {
                topic_alias: Some(3),
                subscription_identifiers: vec![1, 268_435_455],
                ..PublishProperties::default()
            },
            ..Publish::default()
        };
        let packet = Packet::Publish(publish);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        let mut from_client = buf.clone();
        assert_eq!(decode_from_server(&mut buf, ProtocolVersion::V5, 1024), Ok(Some(packet)));
        assert!(matches!(decode(&mut from_client, Some(ProtocolVersion::V5), 1024), Err(DecodeError::Protocol(_))));
    }

    #[test]
    fn dup_is_never_written_on_qos_0() {
        let packet = Packet::Publish(Publish { dup: true, topic: "t".into(), ..Publish::default() });
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(buf[0], 0x30);
    }
}
