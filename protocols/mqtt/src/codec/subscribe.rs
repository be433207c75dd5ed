//! SUBSCRIBE (MQTT 3.1.1 section 3.8, MQTT 5.0 section 3.8): `read` and `write`. Client to server
//! only. Touches nothing outside the codec.

use super::decode::Context;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::publish::read_packet_id;
use super::topic;
use super::wire::{Reader, Sink, malformed, protocol, write_with_length};
use super::{DecodeError, ProtocolVersion, QoS, Subscribe, SubscriptionOptions};

const SUBSCRIBE_PROPERTIES: &[PropertyId] = &[PropertyId::SubscriptionIdentifier, PropertyId::UserProperty];

const OPTION_NO_LOCAL: u8 = 0x04;
const OPTION_RETAIN_AS_PUBLISHED: u8 = 0x08;
const OPTION_RETAIN_HANDLING_SHIFT: u8 = 4;

pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<Subscribe, DecodeError> {
    let packet_id = read_packet_id(reader, "SUBSCRIBE")?;
    let mut subscribe = Subscribe { packet_id, ..Subscribe::default() };
    if context.is_v5() {
        let set = properties::read(reader, "SUBSCRIBE", SUBSCRIBE_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
        subscribe.subscription_identifier = set.subscription_identifiers.first().copied();
        subscribe.user_properties = set.user_properties;
    }
    while !reader.is_empty() {
        let filter = reader.string("SUBSCRIBE topic filter")?;
        let byte = reader.u8("SUBSCRIBE subscription options")?;
        let options = if context.is_v5() { read_options_v5(byte)? } else { read_options_v3(byte)? };
        if let Err(why) = topic::check_topic_filter(&filter) {
            return Err(DecodeError::TopicFilterInvalid(format!("SUBSCRIBE filter {filter:?}: {why}")));
        }
        if context.is_v5() && options.no_local && topic::parse_shared(&filter).is_some() {
            return Err(protocol(format!("[MQTT-3.8.3-4] SUBSCRIBE: No Local set on shared subscription {filter:?}")));
        }
        subscribe.filters.push((filter, options));
    }
    if subscribe.filters.is_empty() {
        return Err(protocol("[MQTT-3.8.3-2] / 3.1.1 [MQTT-3.8.3-3] SUBSCRIBE without a topic filter"));
    }
    Ok(subscribe)
}

/// 3.1 and 3.1.1: the byte is the requested QoS; "The Server MUST treat a SUBSCRIBE packet as
/// malformed ... if any of Reserved bits in the payload are non-zero, or QoS is not 0,1 or 2"
/// [MQTT-3-8.3-4].
fn read_options_v3(byte: u8) -> Result<SubscriptionOptions, DecodeError> {
    if byte & !0b11 != 0 {
        return Err(malformed(format!(
            "[MQTT-3-8.3-4] SUBSCRIBE requested QoS byte 0x{byte:02X} has reserved bits set"
        )));
    }
    let Some(qos) = QoS::from_bits(byte) else {
        return Err(malformed("[MQTT-3-8.3-4] SUBSCRIBE requested QoS 3"));
    };
    Ok(SubscriptionOptions { qos, ..SubscriptionOptions::default() })
}

/// MQTT 5 Subscription Options (section 3.8.3.1): reserved bits 6-7 make the packet malformed
/// [MQTT-3.8.3-5]; Maximum QoS 3 and Retain Handling 3 are Protocol Errors (the specification says
/// "It is a Protocol Error" for both).
fn read_options_v5(byte: u8) -> Result<SubscriptionOptions, DecodeError> {
    if byte & 0xC0 != 0 {
        return Err(malformed(format!("[MQTT-3.8.3-5] SUBSCRIBE options 0x{byte:02X} have reserved bits set")));
    }
    let Some(qos) = QoS::from_bits(byte & 0b11) else {
        return Err(protocol("SUBSCRIBE: Maximum QoS 3"));
    };
    let retain_handling = (byte >> OPTION_RETAIN_HANDLING_SHIFT) & 0b11;
    if retain_handling == 3 {
        return Err(protocol("SUBSCRIBE: Retain Handling 3"));
    }
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & OPTION_NO_LOCAL != 0,
        retain_as_published: byte & OPTION_RETAIN_AS_PUBLISHED != 0,
        retain_handling,
    })
}

/// Writes a SUBSCRIBE body. For 3.1 and 3.1.1 only each filter's QoS is written.
pub(crate) fn write(subscribe: &Subscribe, version: ProtocolVersion, sink: &mut dyn Sink) {
    sink.write_u16(subscribe.packet_id);
    if version.is_v5() {
        write_with_length(sink, &|sink| {
            if let Some(id) = subscribe.subscription_identifier {
                properties::write_variable_byte_integer(sink, PropertyId::SubscriptionIdentifier, id);
            }
            properties::write_user_properties(sink, &subscribe.user_properties);
        });
    }
    for (filter, options) in &subscribe.filters {
        sink.write_string(filter);
        let mut byte = options.qos as u8;
        if version.is_v5() {
            if options.no_local {
                byte |= OPTION_NO_LOCAL;
            }
            if options.retain_as_published {
                byte |= OPTION_RETAIN_AS_PUBLISHED;
            }
            byte |= (options.retain_handling & 0b11) << OPTION_RETAIN_HANDLING_SHIFT;
        }
        sink.write_u8(byte);
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::codec::{Packet, decode, encode};

    #[test]
    fn v5_options_round_trip() {
        let subscribe = Subscribe {
            packet_id: 9,
            subscription_identifier: Some(300),
            user_properties: vec![("k".into(), "v".into())],
            filters: vec![
                (
                    "a/+/#".into(),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                ),
                ("$share/g/x".into(), SubscriptionOptions { retain_handling: 1, ..SubscriptionOptions::default() }),
            ],
        };
        let packet = Packet::Subscribe(subscribe);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V5), 1024), Ok(Some(packet)));
    }

    #[test]
    fn v311_bytes() {
        let subscribe = Subscribe {
            packet_id: 1,
            filters: vec![(
                "a".into(),
                SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() },
            )],
            ..Subscribe::default()
        };
        let packet = Packet::Subscribe(subscribe);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0x82, 6, 0, 1, 0, 1, b'a', 1]);
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V3_1_1), 1024), Ok(Some(packet)));
    }
}
