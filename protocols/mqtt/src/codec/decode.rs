//! The decoder's entry points: frame one packet from the front of a byte buffer (fixed header, size
//! limit, completeness) and hand its body to the packet file's `read`. Pure: no IO, no connection
//! state beyond the version the caller passes.

use bytes::{Bytes, BytesMut};

use super::fixed_header::{self, FixedHeader, PacketType, Sender};
use super::wire::{Reader, malformed, protocol};
use super::{
    DecodeError, Packet, ProtocolVersion, auth, connack, connect, disconnect, ping, pub_response, publish, suback,
    subscribe, unsuback, unsubscribe,
};

/// What every packet `read` needs besides the bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context {
    /// The connection's version.
    pub(crate) version: ProtocolVersion,
    /// Who sent the packet.
    pub(crate) sender: Sender,
    /// The fixed header's flags (PUBLISH reads DUP, QoS and RETAIN from them).
    pub(crate) flags: u8,
}

impl Context {
    pub(crate) fn is_v5(&self) -> bool {
        self.version.is_v5()
    }
}

/// Decodes one packet a client sent, from the front of `buf` (the server side).
///
/// - `version`: `None` until the connection's CONNECT has been decoded; then only CONNECT is
///   acceptable ([MQTT-3.1.0-1]: anything else is `DecodeError::Protocol`). Afterwards, the version
///   of that CONNECT (`Connect::protocol`).
/// - `packet_size_max_bytes`: the largest whole packet (fixed header included) accepted. It is
///   checked as soon as the Remaining Length is known, before the body is waited for, so a client
///   cannot make the server buffer more than this: `DecodeError::TooLarge`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet, or the packet, having consumed
/// exactly its bytes from the front of `buf`. On `Ok(None)` and on every error `buf` is left as it
/// was. After an error the connection must be closed (in MQTT 5 after a CONNACK or DISCONNECT
/// carrying `DecodeError::reason_code`).
///
/// A client only sends CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE,
/// PINGREQ, DISCONNECT and (MQTT 5) AUTH: the server-to-client types are Protocol Errors here, as
/// are the reason codes and properties only a server may send (a Subscription Identifier in PUBLISH
/// [MQTT-3.3.4-6], server-only DISCONNECT and AUTH reason codes).
///
/// What stays with the caller because it needs connection state: a second CONNECT is a Protocol
/// Error ([MQTT-3.1.0-2]; this function decodes it like the first); Topic Alias above the Topic
/// Alias Maximum the server announced; more unacknowledged QoS > 0 PUBLISH packets than Receive
/// Maximum; packet identifiers in use; a non-zero Session Expiry Interval in DISCONNECT after a zero
/// one in CONNECT; AUTH without an Authentication Method in CONNECT; an empty client identifier with
/// Clean Session 0 in 3.1.1 (CONNACK 0x02, [MQTT-3.1.3-8]); a Payload Format Indicator of 1 on a
/// payload that is not UTF-8 (optional check, 0x99).
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    packet_size_max_bytes: u32,
) -> Result<Option<Packet>, DecodeError> {
    decode_from(buf, version, Sender::Client, packet_size_max_bytes)
}

/// Decodes one packet a server sent (the client side: used by tests, the fuzz round trip and any
/// future bridge). Same framing and rules as [`decode`], with the directions swapped: CONNACK,
/// SUBACK, UNSUBACK, PINGRESP are accepted, CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ are Protocol
/// Errors, a PUBLISH may carry several Subscription Identifiers, and a DISCONNECT may not carry a
/// Session Expiry Interval ([MQTT-3.14.2-2]).
pub fn decode_from_server(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    packet_size_max_bytes: u32,
) -> Result<Option<Packet>, DecodeError> {
    decode_from(buf, Some(version), Sender::Server, packet_size_max_bytes)
}

fn decode_from(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    sender: Sender,
    packet_size_max_bytes: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = fixed_header::parse(buf, version, sender, packet_size_max_bytes)? else {
        return Ok(None);
    };
    let frame_len = header.frame_len();
    if buf.len() < frame_len {
        return Ok(None);
    }
    // The body is read from a frozen split of the buffer so that binary fields and the PUBLISH
    // payload share its memory instead of being copied.
    let frame = buf.split_to(frame_len).freeze();
    let result = read_frame(&header, frame.slice(header.header_len..), version, sender);
    if result.is_err() {
        // Put the frame back: on an error the caller still sees the bytes (to peek at a refused
        // CONNECT's protocol level, say). A copy, but only on the way to closing the connection.
        let mut restored = BytesMut::with_capacity(frame.len() + buf.len());
        restored.extend_from_slice(&frame);
        restored.extend_from_slice(buf);
        *buf = restored;
    }
    result.map(Some)
}

fn read_frame(
    header: &FixedHeader,
    body: Bytes,
    version: Option<ProtocolVersion>,
    sender: Sender,
) -> Result<Packet, DecodeError> {
    let mut reader = Reader::new(body, version.is_some_and(ProtocolVersion::is_v5));
    match (header.packet_type, version) {
        (PacketType::Connect, _) => {
            // CONNECT carries its own version: it is read the same whether or not one came before.
            let connect = connect::read(&mut reader)?;
            if connect.protocol == Some(ProtocolVersion::V5) && !header.remaining_len_minimal {
                return Err(malformed("[MQTT-1.5.5-1] Remaining Length not in its shortest form"));
            }
            Ok(Packet::Connect(Box::new(connect)))
        }
        // The fixed header already refused everything but CONNECT before the version is known;
        // this arm keeps that so without a panic path.
        (_, None) => Err(protocol("[MQTT-3.1.0-1] the first packet must be CONNECT")),
        (packet_type, Some(version)) => {
            let context = Context { version, sender, flags: header.flags };
            read_body(packet_type, &mut reader, &context)
        }
    }
}

/// Reads the body of a packet once the connection's version is known.
fn read_body(packet_type: PacketType, reader: &mut Reader, context: &Context) -> Result<Packet, DecodeError> {
    Ok(match packet_type {
        PacketType::Connect => Packet::Connect(Box::new(connect::read(reader)?)),
        PacketType::ConnAck => Packet::ConnAck(connack::read(reader, context)?),
        PacketType::Publish => Packet::Publish(publish::read(reader, context)?),
        PacketType::PubAck => Packet::PubAck(pub_response::read(reader, context, packet_type)?),
        PacketType::PubRec => Packet::PubRec(pub_response::read(reader, context, packet_type)?),
        PacketType::PubRel => Packet::PubRel(pub_response::read(reader, context, packet_type)?),
        PacketType::PubComp => Packet::PubComp(pub_response::read(reader, context, packet_type)?),
        PacketType::Subscribe => Packet::Subscribe(subscribe::read(reader, context)?),
        PacketType::SubAck => Packet::SubAck(suback::read(reader, context)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(unsubscribe::read(reader, context)?),
        PacketType::UnsubAck => Packet::UnsubAck(unsuback::read(reader, context)?),
        PacketType::PingReq => ping::read(reader, packet_type).map(|()| Packet::PingReq)?,
        PacketType::PingResp => ping::read(reader, packet_type).map(|()| Packet::PingResp)?,
        PacketType::Disconnect => Packet::Disconnect(disconnect::read(reader, context)?),
        PacketType::Auth => Packet::Auth(auth::read(reader, context)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_partial_buffers_need_more_bytes_and_stay_untouched() {
        for partial in [&[][..], &[0xC0], &[0x30, 0x80], &[0x30, 0x05, 0x00, 0x01]] {
            let mut buf = BytesMut::from(partial);
            assert_eq!(decode(&mut buf, Some(ProtocolVersion::V5), 1024), Ok(None), "{partial:?}");
            assert_eq!(&buf[..], partial);
        }
    }

    #[test]
    fn consumes_exactly_one_packet() {
        let mut buf = BytesMut::from(&[0xC0, 0x00, 0xC0, 0x00, 0xE0][..]);
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V3_1_1), 1024), Ok(Some(Packet::PingReq)));
        assert_eq!(&buf[..], &[0xC0, 0x00, 0xE0]);
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V3_1_1), 1024), Ok(Some(Packet::PingReq)));
        assert_eq!(decode(&mut buf, Some(ProtocolVersion::V3_1_1), 1024), Ok(None));
        assert_eq!(&buf[..], &[0xE0]);
    }

    #[test]
    fn errors_leave_the_buffer_as_it_was() {
        // A CONNECT with the reserved flag set, followed by a PINGREQ.
        let bytes = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x01, 0, 0, 0xC0, 0];
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(decode(&mut buf, None, 1024), Err(DecodeError::Malformed(_))));
        assert_eq!(&buf[..], &bytes[..]);
    }

    #[test]
    fn too_large_is_reported_before_the_body_arrives() {
        // PUBLISH with a Remaining Length of 200: only the fixed header is in the buffer.
        let mut buf = BytesMut::from(&[0x30, 0xC8, 0x01][..]);
        assert_eq!(
            decode(&mut buf, Some(ProtocolVersion::V5), 100),
            Err(DecodeError::TooLarge { size: 203, max: 100 })
        );
        assert_eq!(buf.len(), 3);
    }
}
