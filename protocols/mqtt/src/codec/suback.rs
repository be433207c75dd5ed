//! SUBACK (MQTT 3.1.1 section 3.9, MQTT 5.0 section 3.9): `read` and `write`. Server to client
//! only. Touches nothing outside the codec.

use super::decode::Context;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::publish::read_packet_id;
use super::wire::{Reader, Sink, protocol, write_with_length};
use super::{DecodeError, ProtocolVersion, ReasonCode, SubAck};

const SUBACK_PROPERTIES: &[PropertyId] = &[PropertyId::ReasonString, PropertyId::UserProperty];

/// 3.1.1 return codes: 0x00, 0x01, 0x02 and 0x80 [MQTT-3.9.3-2].
const SUBACK_RETURN_CODES_V3: &[u8] = &[0x00, 0x01, 0x02, 0x80];

/// MQTT 5 SUBACK reason codes (table 3-8).
const SUBACK_REASON_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];

/// 3.1.1's only failure return code.
const V3_FAILURE: u8 = 0x80;

pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<SubAck, DecodeError> {
    let packet_id = read_packet_id(reader, "SUBACK")?;
    let mut suback = SubAck { packet_id, ..SubAck::default() };
    let allowed = if context.is_v5() {
        let set = properties::read(reader, "SUBACK", SUBACK_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
        suback.reason_string = set.reason_string;
        suback.user_properties = set.user_properties;
        SUBACK_REASON_CODES
    } else {
        SUBACK_RETURN_CODES_V3
    };
    while !reader.is_empty() {
        let code = reader.u8("SUBACK reason code")?;
        if !allowed.contains(&code) {
            return Err(protocol(format!("[MQTT-3.9.3-2] SUBACK: reason code 0x{code:02X} is not allowed")));
        }
        suback.reason_codes.push(ReasonCode(code));
    }
    // One code per filter of the SUBSCRIBE [MQTT-3.8.4-6], which has at least one.
    if suback.reason_codes.is_empty() {
        return Err(protocol("SUBACK without a reason code"));
    }
    Ok(suback)
}

/// Writes a SUBACK body. For 3.1 and 3.1.1 every failure code (0x80 and above) is written as 0x80,
/// the only failure 3.1.1 has, so the server can pass MQTT 5 codes whatever the version.
pub(crate) fn write(suback: &SubAck, version: ProtocolVersion, sink: &mut dyn Sink) {
    sink.write_u16(suback.packet_id);
    if version.is_v5() {
        write_with_length(sink, &|sink| {
            properties::write_string(sink, PropertyId::ReasonString, suback.reason_string.as_deref());
            properties::write_user_properties(sink, &suback.user_properties);
        });
    }
    for code in &suback.reason_codes {
        let byte = if !version.is_v5() && code.is_error() { V3_FAILURE } else { code.0 };
        sink.write_u8(byte);
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::codec::{Packet, decode_from_server, encode};

    #[test]
    fn v311_maps_every_failure_to_0x80() {
        let suback = SubAck {
            packet_id: 2,
            reason_codes: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED],
            ..SubAck::default()
        };
        let mut buf = BytesMut::new();
        encode(&Packet::SubAck(suback), ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0x90, 4, 0, 2, 0x01, 0x80]);
    }

    #[test]
    fn v5_round_trip() {
        let suback = SubAck {
            packet_id: 2,
            reason_string: Some("partly".into()),
            user_properties: vec![],
            reason_codes: vec![ReasonCode::GRANTED_QOS_2, ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED],
        };
        let packet = Packet::SubAck(suback);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        assert_eq!(decode_from_server(&mut buf, ProtocolVersion::V5, 1024), Ok(Some(packet)));
    }
}
