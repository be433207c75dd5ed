//! CONNACK (MQTT 3.1.1 section 3.2, MQTT 5.0 section 3.2): `read` and `write`. Server to client
//! only. Touches nothing outside the codec.

use super::decode::Context;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::wire::{Reader, Sink, malformed, protocol, write_with_length};
use super::{ConnAck, ConnAckProperties, DecodeError, ProtocolVersion, ReasonCode, v3_connack};

const CONNACK_PROPERTIES: &[PropertyId] = &[
    PropertyId::SessionExpiryInterval,
    PropertyId::ReceiveMaximum,
    PropertyId::MaximumQos,
    PropertyId::RetainAvailable,
    PropertyId::MaximumPacketSize,
    PropertyId::AssignedClientIdentifier,
    PropertyId::TopicAliasMaximum,
    PropertyId::ReasonString,
    PropertyId::UserProperty,
    PropertyId::WildcardSubscriptionAvailable,
    PropertyId::SubscriptionIdentifierAvailable,
    PropertyId::SharedSubscriptionAvailable,
    PropertyId::ServerKeepAlive,
    PropertyId::ResponseInformation,
    PropertyId::ServerReference,
    PropertyId::AuthenticationMethod,
    PropertyId::AuthenticationData,
];

/// The MQTT 5 CONNACK reason codes (table 3-1).
const CONNACK_REASON_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B,
    0x9C, 0x9D, 0x9F,
];

const FLAG_SESSION_PRESENT: u8 = 0x01;

pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<ConnAck, DecodeError> {
    let flags = reader.u8("CONNACK acknowledge flags")?;
    if flags & !FLAG_SESSION_PRESENT != 0 {
        return Err(malformed("[MQTT-3.2.2-1] CONNACK acknowledge flags bits 7-1 are reserved"));
    }
    let session_present = flags & FLAG_SESSION_PRESENT != 0;
    let code = reader.u8("CONNACK reason code")?;
    let allowed =
        if context.is_v5() { CONNACK_REASON_CODES.contains(&code) } else { code <= v3_connack::NOT_AUTHORIZED };
    if !allowed {
        return Err(protocol(format!("CONNACK: reason code 0x{code:02X} is not a CONNACK code")));
    }
    if session_present && code != 0 {
        return Err(protocol("[MQTT-3.2.2-6] / 3.1.1 [MQTT-3.2.2-4] CONNACK: Session Present with a non-zero code"));
    }
    let properties = if context.is_v5() { read_properties(reader)? } else { ConnAckProperties::default() };
    reader.expect_end("CONNACK")?;
    Ok(ConnAck { session_present, reason_code: ReasonCode(code), properties })
}

fn read_properties(reader: &mut Reader) -> Result<ConnAckProperties, DecodeError> {
    let set = properties::read(reader, "CONNACK", CONNACK_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
    Ok(ConnAckProperties {
        session_expiry_interval_secs: set.session_expiry_interval_secs,
        receive_maximum: set.receive_maximum,
        maximum_qos: set.maximum_qos,
        retain_available: set.retain_available,
        maximum_packet_size: set.maximum_packet_size,
        assigned_client_identifier: set.assigned_client_identifier,
        topic_alias_maximum: set.topic_alias_maximum,
        reason_string: set.reason_string,
        user_properties: set.user_properties,
        wildcard_subscription_available: set.wildcard_subscription_available,
        subscription_identifiers_available: set.subscription_identifiers_available,
        shared_subscription_available: set.shared_subscription_available,
        server_keep_alive_secs: set.server_keep_alive_secs,
        response_information: set.response_information,
        server_reference: set.server_reference,
        authentication_method: set.authentication_method,
        authentication_data: set.authentication_data,
    })
}

/// Writes a CONNACK body. For 3.1 and 3.1.1 `reason_code` is the return code (see
/// [`v3_connack`]) and the properties are dropped.
pub(crate) fn write(connack: &ConnAck, version: ProtocolVersion, sink: &mut dyn Sink) {
    sink.write_u8(if connack.session_present { FLAG_SESSION_PRESENT } else { 0 });
    sink.write_u8(connack.reason_code.0);
    if version.is_v5() {
        write_with_length(sink, &|sink| write_properties(&connack.properties, sink));
    }
}

fn write_properties(p: &ConnAckProperties, sink: &mut dyn Sink) {
    properties::write_u32(sink, PropertyId::SessionExpiryInterval, p.session_expiry_interval_secs);
    properties::write_u16(sink, PropertyId::ReceiveMaximum, p.receive_maximum);
    properties::write_byte(sink, PropertyId::MaximumQos, p.maximum_qos);
    properties::write_bool(sink, PropertyId::RetainAvailable, p.retain_available);
    properties::write_u32(sink, PropertyId::MaximumPacketSize, p.maximum_packet_size);
    properties::write_string(sink, PropertyId::AssignedClientIdentifier, p.assigned_client_identifier.as_deref());
    properties::write_u16(sink, PropertyId::TopicAliasMaximum, p.topic_alias_maximum);
    properties::write_string(sink, PropertyId::ReasonString, p.reason_string.as_deref());
    properties::write_user_properties(sink, &p.user_properties);
    properties::write_bool(sink, PropertyId::WildcardSubscriptionAvailable, p.wildcard_subscription_available);
    properties::write_bool(sink, PropertyId::SubscriptionIdentifierAvailable, p.subscription_identifiers_available);
    properties::write_bool(sink, PropertyId::SharedSubscriptionAvailable, p.shared_subscription_available);
    properties::write_u16(sink, PropertyId::ServerKeepAlive, p.server_keep_alive_secs);
    properties::write_string(sink, PropertyId::ResponseInformation, p.response_information.as_deref());
    properties::write_string(sink, PropertyId::ServerReference, p.server_reference.as_deref());
    properties::write_string(sink, PropertyId::AuthenticationMethod, p.authentication_method.as_deref());
    properties::write_binary(sink, PropertyId::AuthenticationData, p.authentication_data.as_deref());
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::codec::{Packet, decode_from_server, encode};

    #[test]
    fn v311_bytes() {
        let connack = ConnAck { session_present: true, ..ConnAck::default() };
        let mut buf = BytesMut::new();
        encode(&Packet::ConnAck(connack), ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0x20, 2, 1, 0]);
    }

    #[test]
    fn v5_round_trip_with_every_property() {
        let connack = ConnAck {
            session_present: false,
            reason_code: ReasonCode::SUCCESS,
            properties: ConnAckProperties {
                session_expiry_interval_secs: Some(10),
                receive_maximum: Some(100),
                maximum_qos: Some(1),
                retain_available: Some(false),
                maximum_packet_size: Some(1024),
                assigned_client_identifier: Some("auto-1".into()),
                topic_alias_maximum: Some(10),
                reason_string: Some("ok".into()),
                user_properties: vec![("x".into(), "y".into())],
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(false),
                server_keep_alive_secs: Some(60),
                response_information: Some("resp/".into()),
                server_reference: Some("other:1883".into()),
                authentication_method: Some("m".into()),
                authentication_data: Some(Bytes::from_static(b"d")),
            },
        };
        let packet = Packet::ConnAck(connack);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        assert_eq!(decode_from_server(&mut buf, ProtocolVersion::V5, u32::MAX), Ok(Some(packet)));
    }
}
