//! PUBACK, PUBREC, PUBREL and PUBCOMP (sections 3.4 to 3.7 of both specifications): `read` and
//! `write`. One file because the four share one layout (packet identifier, then in MQTT 5 an
//! optional reason code and optional properties) and differ only in their reason codes. Touches
//! nothing outside the codec.

use super::decode::Context;
use super::fixed_header::PacketType;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::publish::read_packet_id;
use super::wire::{Reader, Sink, protocol, write_with_length};
use super::{DecodeError, ProtocolVersion, PubResponse, ReasonCode};

const PUB_RESPONSE_PROPERTIES: &[PropertyId] = &[PropertyId::ReasonString, PropertyId::UserProperty];

/// PUBACK and PUBREC reason codes (tables 3-4 and 3-5).
const PUBACK_REASON_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];

/// PUBREL and PUBCOMP reason codes (tables 3-6 and 3-7).
const PUBREL_REASON_CODES: &[u8] = &[0x00, 0x92];

/// The reason codes `packet_type` allows, and the statement requiring them.
fn reason_codes(packet_type: PacketType) -> (&'static [u8], &'static str) {
    match packet_type {
        PacketType::PubRec => (PUBACK_REASON_CODES, "[MQTT-3.5.2-1]"),
        PacketType::PubRel => (PUBREL_REASON_CODES, "[MQTT-3.6.2-1]"),
        PacketType::PubComp => (PUBREL_REASON_CODES, "[MQTT-3.7.2-1]"),
        _ => (PUBACK_REASON_CODES, "[MQTT-3.4.2-1]"),
    }
}

/// Reads the body. In MQTT 5 the short forms are valid: Remaining Length 2 (reason code 0, no
/// properties) and 3 (a reason code, no property length) (sections 3.4.2.1 and 3.4.2.2.1). A reason
/// code the packet does not have is a Protocol Error (the bytes parse; the value is not allowed).
pub(crate) fn read(
    reader: &mut Reader,
    context: &Context,
    packet_type: PacketType,
) -> Result<PubResponse, DecodeError> {
    let name = packet_type.name();
    let packet_id = read_packet_id(reader, name)?;
    let mut response = PubResponse { packet_id, ..PubResponse::default() };
    if context.is_v5() && !reader.is_empty() {
        let code = reader.u8(&format!("{name} reason code"))?;
        let (allowed, rule) = reason_codes(packet_type);
        if !allowed.contains(&code) {
            return Err(protocol(format!("{rule} {name}: reason code 0x{code:02X} is not allowed")));
        }
        response.reason_code = ReasonCode(code);
        if !reader.is_empty() {
            let set = properties::read(reader, name, PUB_RESPONSE_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
            response.reason_string = set.reason_string;
            response.user_properties = set.user_properties;
        }
    }
    reader.expect_end(name)?;
    Ok(response)
}

/// Writes the body: in MQTT 5 the shortest form that carries the same content (no reason code when
/// it is 0 without properties, no property length without properties).
pub(crate) fn write(response: &PubResponse, version: ProtocolVersion, sink: &mut dyn Sink) {
    sink.write_u16(response.packet_id);
    if !version.is_v5() {
        return;
    }
    let has_properties = response.reason_string.is_some() || !response.user_properties.is_empty();
    if response.reason_code == ReasonCode::SUCCESS && !has_properties {
        return;
    }
    sink.write_u8(response.reason_code.0);
    if has_properties {
        write_with_length(sink, &|sink| {
            properties::write_string(sink, PropertyId::ReasonString, response.reason_string.as_deref());
            properties::write_user_properties(sink, &response.user_properties);
        });
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::codec::{Packet, decode, encode};

    fn decode_v5(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        decode(&mut BytesMut::from(bytes), Some(ProtocolVersion::V5), 1024)
    }

    #[test]
    fn v5_short_forms_decode_and_encode() {
        let ok = PubResponse { packet_id: 7, ..PubResponse::default() };
        assert_eq!(decode_v5(&[0x40, 2, 0, 7]), Ok(Some(Packet::PubAck(ok.clone()))));
        assert_eq!(decode_v5(&[0x40, 3, 0, 7, 0]), Ok(Some(Packet::PubAck(ok.clone()))));
        assert_eq!(decode_v5(&[0x40, 4, 0, 7, 0, 0]), Ok(Some(Packet::PubAck(ok.clone()))));
        let mut buf = BytesMut::new();
        encode(&Packet::PubAck(ok), ProtocolVersion::V5, &mut buf);
        assert_eq!(&buf[..], &[0x40, 2, 0, 7]);

        let not_found = PubResponse { packet_id: 7, reason_code: ReasonCode(0x92), ..PubResponse::default() };
        let mut buf = BytesMut::new();
        encode(&Packet::PubRel(not_found.clone()), ProtocolVersion::V5, &mut buf);
        assert_eq!(&buf[..], &[0x62, 3, 0, 7, 0x92]);
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V5), 1024), Ok(Some(Packet::PubRel(not_found))));
    }

    #[test]
    fn v311_writes_only_the_packet_identifier() {
        let response = PubResponse {
            packet_id: 1,
            reason_code: ReasonCode(0x80),
            reason_string: Some("no".into()),
            user_properties: vec![],
        };
        let mut buf = BytesMut::new();
        encode(&Packet::PubComp(response), ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0x70, 2, 0, 1]);
    }
}
