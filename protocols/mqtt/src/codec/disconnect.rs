//! DISCONNECT (MQTT 3.1.1 section 3.14, MQTT 5.0 section 3.14): `read` and `write`. Client to
//! server in 3.1.1; both directions in MQTT 5. Touches nothing outside the codec.

use super::decode::Context;
use super::fixed_header::Sender;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::wire::{Reader, Sink, protocol, write_with_length};
use super::{DecodeError, Disconnect, ProtocolVersion, ReasonCode};

const DISCONNECT_PROPERTIES: &[PropertyId] = &[
    PropertyId::SessionExpiryInterval,
    PropertyId::ReasonString,
    PropertyId::UserProperty,
    PropertyId::ServerReference,
];

/// The DISCONNECT reason codes either side may send (table 3-10, "Client or Server").
const DISCONNECT_REASON_CODES_BOTH: &[u8] =
    &[0x00, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99];

/// Sent by the client only.
const DISCONNECT_REASON_CODES_CLIENT: &[u8] = &[0x04];

/// Sent by the server only.
const DISCONNECT_REASON_CODES_SERVER: &[u8] =
    &[0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2];

/// Reads the body. 3.1 and 3.1.1: empty. MQTT 5: Remaining Length 0 means reason code 0 and no
/// properties, 1 means a reason code and no properties (sections 3.14.2.1, 3.14.2.2.1). A reason
/// code the sender may not use is a Protocol Error [MQTT-3.14.2-1].
pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<Disconnect, DecodeError> {
    let mut disconnect = Disconnect::default();
    if context.is_v5() && !reader.is_empty() {
        let code = reader.u8("DISCONNECT reason code")?;
        let own = match context.sender {
            Sender::Client => DISCONNECT_REASON_CODES_CLIENT,
            Sender::Server => DISCONNECT_REASON_CODES_SERVER,
        };
        if !DISCONNECT_REASON_CODES_BOTH.contains(&code) && !own.contains(&code) {
            return Err(protocol(format!(
                "[MQTT-3.14.2-1] DISCONNECT: reason code 0x{code:02X} is not one the {} may send",
                if context.sender == Sender::Client { "client" } else { "server" }
            )));
        }
        disconnect.reason_code = ReasonCode(code);
        if !reader.is_empty() {
            let set =
                properties::read(reader, "DISCONNECT", DISCONNECT_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
            if context.sender == Sender::Server && set.session_expiry_interval_secs.is_some() {
                return Err(protocol("[MQTT-3.14.2-2] DISCONNECT from the server carries a Session Expiry Interval"));
            }
            disconnect.session_expiry_interval_secs = set.session_expiry_interval_secs;
            disconnect.reason_string = set.reason_string;
            disconnect.user_properties = set.user_properties;
            disconnect.server_reference = set.server_reference;
        }
    }
    // A 3.1.1 DISCONNECT has no body at all; an MQTT 5 one ends with its properties.
    reader.expect_end("DISCONNECT")?;
    Ok(disconnect)
}

/// Writes the body: nothing in 3.1 and 3.1.1; in MQTT 5 the shortest form carrying the content.
pub(crate) fn write(disconnect: &Disconnect, version: ProtocolVersion, sink: &mut dyn Sink) {
    if !version.is_v5() {
        return;
    }
    let has_properties = disconnect.session_expiry_interval_secs.is_some()
        || disconnect.reason_string.is_some()
        || !disconnect.user_properties.is_empty()
        || disconnect.server_reference.is_some();
    if disconnect.reason_code == ReasonCode::NORMAL_DISCONNECTION && !has_properties {
        return;
    }
    sink.write_u8(disconnect.reason_code.0);
    if has_properties {
        write_with_length(sink, &|sink| {
            properties::write_u32(sink, PropertyId::SessionExpiryInterval, disconnect.session_expiry_interval_secs);
            properties::write_string(sink, PropertyId::ReasonString, disconnect.reason_string.as_deref());
            properties::write_user_properties(sink, &disconnect.user_properties);
            properties::write_string(sink, PropertyId::ServerReference, disconnect.server_reference.as_deref());
        });
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::codec::{Packet, decode, decode_from_server, encode};

    #[test]
    fn v5_short_forms() {
        let decode_v5 = |bytes: &[u8]| decode(&mut BytesMut::from(bytes), Some(ProtocolVersion::V5), 16);
        assert_eq!(decode_v5(&[0xE0, 0]), Ok(Some(Packet::Disconnect(Disconnect::default()))));
        let with_will = Disconnect { reason_code: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE, ..Disconnect::default() };
        assert_eq!(decode_v5(&[0xE0, 1, 0x04]), Ok(Some(Packet::Disconnect(with_will.clone()))));
        assert_eq!(decode_v5(&[0xE0, 2, 0x04, 0]), Ok(Some(Packet::Disconnect(with_will.clone()))));
        let mut buf = BytesMut::new();
        encode(&Packet::Disconnect(with_will), ProtocolVersion::V5, &mut buf);
        assert_eq!(&buf[..], &[0xE0, 1, 0x04]);
    }

    #[test]
    fn v5_server_disconnect_round_trip() {
        let disconnect = Disconnect {
            reason_code: ReasonCode::SERVER_MOVED,
            server_reference: Some("elsewhere:1883".into()),
            reason_string: Some("moved".into()),
            ..Disconnect::default()
        };
        let packet = Packet::Disconnect(disconnect);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        assert_eq!(decode_from_server(&mut buf, ProtocolVersion::V5, 1024), Ok(Some(packet)));
    }

    #[test]
    fn v311_is_empty() {
        let disconnect = Disconnect { reason_code: ReasonCode::UNSPECIFIED_ERROR, ..Disconnect::default() };
        let mut buf = BytesMut::new();
        encode(&Packet::Disconnect(disconnect), ProtocolVersion::V3_1_1, &mut buf);
        assert_eq!(&buf[..], &[0xE0, 0]);
    }
}
