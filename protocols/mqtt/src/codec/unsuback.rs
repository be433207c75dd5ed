//! UNSUBACK (MQTT 3.1.1 section 3.11, MQTT 5.0 section 3.11): `read` and `write`. Server to client
//! only; in 3.1 and 3.1.1 it is just a packet identifier. Touches nothing outside the codec.

use super::decode::Context;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::publish::read_packet_id;
use super::wire::{Reader, Sink, protocol, write_with_length};
use super::{DecodeError, ProtocolVersion, ReasonCode, UnsubAck};

const UNSUBACK_PROPERTIES: &[PropertyId] = &[PropertyId::ReasonString, PropertyId::UserProperty];

/// MQTT 5 UNSUBACK reason codes (table 3-9).
const UNSUBACK_REASON_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];

pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<UnsubAck, DecodeError> {
    let packet_id = read_packet_id(reader, "UNSUBACK")?;
    let mut unsuback = UnsubAck { packet_id, ..UnsubAck::default() };
    if context.is_v5() {
        let set = properties::read(reader, "UNSUBACK", UNSUBACK_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
        unsuback.reason_string = set.reason_string;
        unsuback.user_properties = set.user_properties;
        while !reader.is_empty() {
            let code = reader.u8("UNSUBACK reason code")?;
            if !UNSUBACK_REASON_CODES.contains(&code) {
                return Err(protocol(format!("[MQTT-3.11.3-2] UNSUBACK: reason code 0x{code:02X} is not allowed")));
            }
            unsuback.reason_codes.push(ReasonCode(code));
        }
        // One code per filter of the UNSUBSCRIBE, in order [MQTT-3.11.3-1]; it has at least one.
        if unsuback.reason_codes.is_empty() {
            return Err(protocol("UNSUBACK without a reason code"));
        }
    }
    reader.expect_end("UNSUBACK")?;
    Ok(unsuback)
}

/// Writes an UNSUBACK body; for 3.1 and 3.1.1 only the packet identifier.
pub(crate) fn write(unsuback: &UnsubAck, version: ProtocolVersion, sink: &mut dyn Sink) {
    sink.write_u16(unsuback.packet_id);
    if !version.is_v5() {
        return;
    }
    write_with_length(sink, &|sink| {
        properties::write_string(sink, PropertyId::ReasonString, unsuback.reason_string.as_deref());
        properties::write_user_properties(sink, &unsuback.user_properties);
    });
    for code in &unsuback.reason_codes {
        sink.write_u8(code.0);
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::codec::{Packet, decode_from_server, encode};

    #[test]
    fn v311_is_the_packet_identifier_alone() {
        let unsuback = UnsubAck { packet_id: 4, reason_codes: vec![ReasonCode::SUCCESS], ..UnsubAck::default() };
        let mut buf = BytesMut::new();
        encode(&Packet::UnsubAck(unsuback), ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0xB0, 2, 0, 4]);
        assert_eq!(
            decode_from_server(&mut buf, ProtocolVersion::V3_1_1, 1024),
            Ok(Some(Packet::UnsubAck(UnsubAck { packet_id: 4, ..UnsubAck::default() })))
        );
    }

    #[test]
    fn v5_round_trip() {
        let unsuback = UnsubAck {
            packet_id: 4,
            reason_string: None,
            user_properties: vec![("a".into(), "b".into())],
            reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
        };
        let packet = Packet::UnsubAck(unsuback);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        assert_eq!(decode_from_server(&mut buf, ProtocolVersion::V5, 1024), Ok(Some(packet)));
    }
}
