//! AUTH (MQTT 5.0 section 3.15): `read` and `write`. Both directions; packet type 15 is reserved
//! before MQTT 5 (the fixed header refuses it there). Touches nothing outside the codec.

use super::decode::Context;
use super::fixed_header::Sender;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::wire::{Reader, Sink, protocol, write_with_length};
use super::{Auth, DecodeError, ProtocolVersion, ReasonCode};

const AUTH_PROPERTIES: &[PropertyId] = &[
    PropertyId::AuthenticationMethod,
    PropertyId::AuthenticationData,
    PropertyId::ReasonString,
    PropertyId::UserProperty,
];

/// Reason codes by sender (table 3-11): 0x00 Success from the server, 0x18 Continue from either,
/// 0x19 Re-authenticate from the client.
fn allowed_reason_code(code: u8, sender: Sender) -> bool {
    match code {
        0x18 => true,
        0x00 => sender == Sender::Server,
        0x19 => sender == Sender::Client,
        _ => false,
    }
}

/// Reads the body. Remaining Length 0 is the short form of Success without properties (section
/// 3.15.2.1); otherwise a reason code and a property block follow (the specification gives AUTH no
/// reason-code-only form), and the block must hold an Authentication Method ("It is a Protocol Error
/// to omit the Authentication Method").
pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<Auth, DecodeError> {
    let short_form = reader.is_empty();
    let code = if short_form { 0x00 } else { reader.u8("AUTH reason code")? };
    if !allowed_reason_code(code, context.sender) {
        return Err(protocol(format!(
            "[MQTT-3.15.2-1] AUTH: reason code 0x{code:02X} is not allowed from this sender"
        )));
    }
    let mut auth = Auth { reason_code: ReasonCode(code), ..Auth::default() };
    if short_form {
        return Ok(auth);
    }
    let set = properties::read(reader, "AUTH", AUTH_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
    if set.authentication_method.is_none() {
        return Err(protocol("AUTH without an Authentication Method"));
    }
    auth.authentication_method = set.authentication_method;
    auth.authentication_data = set.authentication_data;
    auth.reason_string = set.reason_string;
    auth.user_properties = set.user_properties;
    reader.expect_end("AUTH")?;
    Ok(auth)
}

/// Writes the body: the short form (nothing) for Success without properties, else the reason code
/// and the properties. AUTH does not exist before MQTT 5; asked for one there, this writes the MQTT
/// 5 form, which the peer will refuse as malformed: the server must not send it.
pub(crate) fn write(auth: &Auth, _version: ProtocolVersion, sink: &mut dyn Sink) {
    let has_properties = auth.authentication_method.is_some()
        || auth.authentication_data.is_some()
        || auth.reason_string.is_some()
        || !auth.user_properties.is_empty();
    if auth.reason_code == ReasonCode::SUCCESS && !has_properties {
        return;
    }
    sink.write_u8(auth.reason_code.0);
    write_with_length(sink, &|sink| {
        properties::write_string(sink, PropertyId::AuthenticationMethod, auth.authentication_method.as_deref());
        properties::write_binary(sink, PropertyId::AuthenticationData, auth.authentication_data.as_deref());
        properties::write_string(sink, PropertyId::ReasonString, auth.reason_string.as_deref());
        properties::write_user_properties(sink, &auth.user_properties);
    });
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::codec::{Packet, decode, decode_from_server, encode};

    #[test]
    fn continue_round_trips_from_either_side() {
        let auth = Auth {
            reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
            authentication_method: Some("SCRAM-SHA-1".into()),
            authentication_data: Some(Bytes::from_static(b"c=biws")),
            reason_string: None,
            user_properties: vec![],
        };
        let packet = Packet::Auth(auth);
        let mut buf = BytesMut::new();
        encode(&packet, ProtocolVersion::V5, &mut buf);
        let mut again = buf.clone();
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V5), 1024), Ok(Some(packet.clone())));
        assert_eq!(decode_from_server(&mut again, ProtocolVersion::V5, 1024), Ok(Some(packet)));
    }

    #[test]
    fn success_short_form_is_from_the_server_only() {
        let mut buf = BytesMut::new();
        encode(&Packet::Auth(Auth::default()), ProtocolVersion::V5, &mut buf);
        assert_eq!(&buf[..], &[0xF0, 0]);
        let mut from_client = buf.clone();
        assert_eq!(decode_from_server(&mut buf, ProtocolVersion::V5, 16), Ok(Some(Packet::Auth(Auth::default()))));
        assert!(matches!(decode(&mut from_client, Some(ProtocolVersion::V5), 16), Err(DecodeError::Protocol(_))));
    }
}
