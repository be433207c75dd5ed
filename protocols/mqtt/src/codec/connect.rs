//! CONNECT (MQTT 3.1.1 section 3.1, MQTT 5.0 section 3.1): `read` and `write`. The one packet that
//! carries its own protocol version. Touches nothing outside the codec.

use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::topic;
use super::wire::{Reader, Sink, malformed, protocol, write_with_length};
use super::{Connect, ConnectProperties, DecodeError, ProtocolVersion, QoS, Will, WillProperties};

const CONNECT_PROPERTIES: &[PropertyId] = &[
    PropertyId::SessionExpiryInterval,
    PropertyId::ReceiveMaximum,
    PropertyId::MaximumPacketSize,
    PropertyId::TopicAliasMaximum,
    PropertyId::RequestResponseInformation,
    PropertyId::RequestProblemInformation,
    PropertyId::UserProperty,
    PropertyId::AuthenticationMethod,
    PropertyId::AuthenticationData,
];

const WILL_PROPERTIES: &[PropertyId] = &[
    PropertyId::WillDelayInterval,
    PropertyId::PayloadFormatIndicator,
    PropertyId::MessageExpiryInterval,
    PropertyId::ContentType,
    PropertyId::ResponseTopic,
    PropertyId::CorrelationData,
    PropertyId::UserProperty,
];

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN_START: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;
const WILL_QOS_SHIFT: u8 = 3;

/// The version a protocol name and level ask for.
///
/// `MQTT` 4 and 5 and `MQIsdp` 3 are spoken. A known name with another level is
/// `UnsupportedProtocolVersion` (3.1.1 [MQTT-3.1.2-2]: CONNACK 0x01; 5.0: CONNACK 0x84). Any other
/// name is a Protocol Error: the bytes parse, but they are not this protocol, and [MQTT-3.1.2-1]
/// forbids processing such a CONNECT further.
fn protocol_version(name: &str, level: u8) -> Result<ProtocolVersion, DecodeError> {
    match (name, level) {
        ("MQTT", 4) => Ok(ProtocolVersion::V3_1_1),
        ("MQTT", 5) => Ok(ProtocolVersion::V5),
        ("MQIsdp", 3) => Ok(ProtocolVersion::V3_1),
        ("MQTT" | "MQIsdp", _) => Err(DecodeError::UnsupportedProtocolVersion { name: name.to_owned(), level }),
        _ => Err(DecodeError::UnknownProtocolName(name.to_owned())),
    }
}

/// Reads a CONNECT body. Rule numbers are MQTT 5.0's, then 3.1.1's where they differ.
pub(crate) fn read(reader: &mut Reader) -> Result<Connect, DecodeError> {
    let name = reader.string("CONNECT protocol name")?;
    let level = reader.u8("CONNECT protocol level")?;
    let version = protocol_version(&name, level)?;
    let v5 = version.is_v5();
    reader.set_v5(v5);

    let flags = reader.u8("CONNECT flags")?;
    // Each rule names its MQTT 5.0 statement, then its 3.1.1 one: both make these packets malformed
    // (5.0 says so for the reserved flag and Will QoS 3; the rest are the same flag-byte grammar).
    if flags & FLAG_RESERVED != 0 {
        return Err(malformed("[MQTT-3.1.2-3] CONNECT reserved flag is set"));
    }
    let will_flag = flags & FLAG_WILL != 0;
    let will_qos_bits = (flags >> WILL_QOS_SHIFT) & 0b11;
    let will_retain = flags & FLAG_WILL_RETAIN != 0;
    if !will_flag && will_qos_bits != 0 {
        return Err(malformed("[MQTT-3.1.2-11] / 3.1.1 [MQTT-3.1.2-13] Will QoS set without the Will Flag"));
    }
    if !will_flag && will_retain {
        return Err(malformed("[MQTT-3.1.2-13] / 3.1.1 [MQTT-3.1.2-15] Will Retain set without the Will Flag"));
    }
    let Some(will_qos) = QoS::from_bits(will_qos_bits) else {
        return Err(malformed("[MQTT-3.1.2-12] / 3.1.1 [MQTT-3.1.2-14] Will QoS 3"));
    };
    let username_flag = flags & FLAG_USERNAME != 0;
    let password_flag = flags & FLAG_PASSWORD != 0;
    // MQTT 5 allows a password without a user name; 3.1 and 3.1.1 do not.
    if password_flag && !username_flag && !v5 {
        return Err(malformed("3.1.1 [MQTT-3.1.2-22] Password Flag set without the User Name Flag"));
    }
    let keep_alive_secs = reader.u16("CONNECT keep alive")?;

    let properties = if v5 { read_properties(reader)? } else { ConnectProperties::default() };

    let client_id = reader.string("CONNECT client identifier")?;
    let will = if will_flag {
        let properties = if v5 { read_will_properties(reader)? } else { WillProperties::default() };
        let topic = reader.string("CONNECT will topic")?;
        if let Err(why) = topic::check_topic_name(&topic) {
            return Err(DecodeError::TopicNameInvalid(format!("will topic {topic:?}: {why}")));
        }
        let payload = reader.binary("CONNECT will payload")?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(reader.string("CONNECT user name")?) } else { None };
    let password = if password_flag { Some(reader.binary("CONNECT password")?) } else { None };
    // Bytes after the last field the flags announce: a field present without its flag
    // ([MQTT-3.1.2-16], [MQTT-3.1.2-18]; 3.1.1 [MQTT-3.1.2-18], [MQTT-3.1.2-20]).
    reader.expect_end("CONNECT")?;

    Ok(Connect {
        protocol: Some(version),
        clean_start: flags & FLAG_CLEAN_START != 0,
        keep_alive_secs,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn read_properties(reader: &mut Reader) -> Result<ConnectProperties, DecodeError> {
    let set = properties::read(reader, "CONNECT", CONNECT_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
    if set.authentication_data.is_some() && set.authentication_method.is_none() {
        return Err(protocol("CONNECT: Authentication Data without an Authentication Method"));
    }
    Ok(ConnectProperties {
        session_expiry_interval_secs: set.session_expiry_interval_secs,
        receive_maximum: set.receive_maximum,
        maximum_packet_size: set.maximum_packet_size,
        topic_alias_maximum: set.topic_alias_maximum,
        request_response_information: set.request_response_information,
        request_problem_information: set.request_problem_information,
        user_properties: set.user_properties,
        authentication_method: set.authentication_method,
        authentication_data: set.authentication_data,
    })
}

fn read_will_properties(reader: &mut Reader) -> Result<WillProperties, DecodeError> {
    let set = properties::read(reader, "CONNECT will", WILL_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
    Ok(WillProperties {
        will_delay_interval_secs: set.will_delay_interval_secs,
        payload_format_indicator: set.payload_format_indicator,
        message_expiry_interval_secs: set.message_expiry_interval_secs,
        content_type: set.content_type,
        response_topic: set.response_topic,
        correlation_data: set.correlation_data,
        user_properties: set.user_properties,
    })
}

/// Writes a CONNECT body for `version` (the `protocol` field is not consulted: the connection's
/// version decides the protocol name and level).
pub(crate) fn write(connect: &Connect, version: ProtocolVersion, sink: &mut dyn Sink) {
    let (name, level) = match version {
        ProtocolVersion::V3_1 => ("MQIsdp", 3),
        ProtocolVersion::V3_1_1 => ("MQTT", 4),
        ProtocolVersion::V5 => ("MQTT", 5),
    };
    sink.write_string(name);
    sink.write_u8(level);
    let mut flags = 0;
    if connect.clean_start {
        flags |= FLAG_CLEAN_START;
    }
    if let Some(will) = &connect.will {
        flags |= FLAG_WILL | ((will.qos as u8) << WILL_QOS_SHIFT);
        if will.retain {
            flags |= FLAG_WILL_RETAIN;
        }
    }
    if connect.username.is_some() {
        flags |= FLAG_USERNAME;
    }
    if connect.password.is_some() {
        flags |= FLAG_PASSWORD;
    }
    sink.write_u8(flags);
    sink.write_u16(connect.keep_alive_secs);
    if version.is_v5() {
        write_with_length(sink, &|sink| write_properties(&connect.properties, sink));
    }
    sink.write_string(&connect.client_id);
    if let Some(will) = &connect.will {
        if version.is_v5() {
            write_with_length(sink, &|sink| write_will_properties(&will.properties, sink));
        }
        sink.write_string(&will.topic);
        sink.write_binary(&will.payload);
    }
    if let Some(username) = &connect.username {
        sink.write_string(username);
    }
    if let Some(password) = &connect.password {
        sink.write_binary(password);
    }
}

fn write_properties(p: &ConnectProperties, sink: &mut dyn Sink) {
    properties::write_u32(sink, PropertyId::SessionExpiryInterval, p.session_expiry_interval_secs);
    properties::write_u16(sink, PropertyId::ReceiveMaximum, p.receive_maximum);
    properties::write_u32(sink, PropertyId::MaximumPacketSize, p.maximum_packet_size);
    properties::write_u16(sink, PropertyId::TopicAliasMaximum, p.topic_alias_maximum);
    properties::write_bool(sink, PropertyId::RequestResponseInformation, p.request_response_information);
    properties::write_bool(sink, PropertyId::RequestProblemInformation, p.request_problem_information);
    properties::write_user_properties(sink, &p.user_properties);
    properties::write_string(sink, PropertyId::AuthenticationMethod, p.authentication_method.as_deref());
    properties::write_binary(sink, PropertyId::AuthenticationData, p.authentication_data.as_deref());
}

fn write_will_properties(p: &WillProperties, sink: &mut dyn Sink) {
    properties::write_u32(sink, PropertyId::WillDelayInterval, p.will_delay_interval_secs);
    properties::write_byte(sink, PropertyId::PayloadFormatIndicator, p.payload_format_indicator);
    properties::write_u32(sink, PropertyId::MessageExpiryInterval, p.message_expiry_interval_secs);
    properties::write_string(sink, PropertyId::ContentType, p.content_type.as_deref());
    properties::write_string(sink, PropertyId::ResponseTopic, p.response_topic.as_deref());
    properties::write_binary(sink, PropertyId::CorrelationData, p.correlation_data.as_deref());
    properties::write_user_properties(sink, &p.user_properties);
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::codec::{Packet, decode, encode};

    fn full(version: ProtocolVersion) -> Connect {
        let v5 = version.is_v5();
        Connect {
            protocol: Some(version),
            clean_start: true,
            keep_alive_secs: 30,
            client_id: "client-1".into(),
            will: Some(Will {
                topic: "last/will".into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: if v5 {
                    WillProperties {
                        will_delay_interval_secs: Some(5),
                        payload_format_indicator: Some(1),
                        message_expiry_interval_secs: Some(60),
                        content_type: Some("text/plain".into()),
                        response_topic: Some("reply/here".into()),
                        correlation_data: Some(Bytes::from_static(b"id")),
                        user_properties: vec![("k".into(), "v".into())],
                    }
                } else {
                    WillProperties::default()
                },
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"secret")),
            properties: if v5 {
                ConnectProperties {
                    session_expiry_interval_secs: Some(3600),
                    receive_maximum: Some(10),
                    maximum_packet_size: Some(65_536),
                    topic_alias_maximum: Some(5),
                    request_response_information: Some(true),
                    request_problem_information: Some(false),
                    user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
                    authentication_method: Some("SCRAM-SHA-256".into()),
                    authentication_data: Some(Bytes::from_static(b"first")),
                }
            } else {
                ConnectProperties::default()
            },
        }
    }

    #[test]
    fn round_trips_in_every_version() {
        for version in [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let packet = Packet::Connect(Box::new(full(version)));
            let mut buf = BytesMut::new();
            encode(&packet, version, &mut buf);
            assert_eq!(decode(&mut buf, None, u32::MAX), Ok(Some(packet)), "{version:?}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn minimal_v311_connect_bytes() {
        let connect = Connect { protocol: Some(ProtocolVersion::V3_1_1), client_id: "a".into(), ..Connect::default() };
        let mut buf = BytesMut::new();
        encode(&Packet::Connect(Box::new(connect)), ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0, 0, 0, 0, 1, b'a']);
    }

    #[test]
    fn v5_password_without_user_name_is_allowed() {
        let connect = Connect {
            protocol: Some(ProtocolVersion::V5),
            password: Some(Bytes::from_static(b"token")),
            ..Connect::default()
        };
        let packet = Packet::Connect(Box::new(connect));
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        assert_eq!(decode(&mut buf, None, u32::MAX), Ok(Some(packet)));
    }
}
