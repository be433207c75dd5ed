//! The encoder's entry points: write any packet, either direction, for a protocol version, and
//! measure it exactly beforehand. Pure: no IO.
//!
//! Every body is written through one `Sink` function, run once into a `Counter` (for the Remaining
//! Length and for `encoded_len`) and once into the buffer, so the two cannot disagree.

use bytes::BytesMut;

use super::fixed_header::first_byte;
use super::wire::{Sink, measure, variable_byte_integer_len};
use super::{
    Packet, ProtocolVersion, auth, connack, connect, disconnect, pub_response, publish, suback, subscribe, unsuback,
    unsubscribe,
};

/// Appends `packet`, encoded for a connection speaking `version`, to `buf`.
///
/// For 3.1 and 3.1.1 nothing MQTT 5 only is written: no properties, no reason codes except the
/// CONNACK return code and the SUBACK return codes (where every failure is written as 0x80). In MQTT
/// 5, PUBACK, PUBREC, PUBREL, PUBCOMP, DISCONNECT and AUTH use their short forms when the reason code
/// is 0 and there are no properties. The PUBLISH DUP flag is never written on QoS 0.
///
/// Preconditions, which every packet `decode` returns satisfies and which the server must keep for
/// packets it builds: strings and binary fields of at most 65,535 bytes (longer ones are truncated),
/// a packet identifier exactly when a PUBLISH has QoS > 0, a whole packet of at most 268,435,460
/// bytes, and nothing the version lacks that would change the meaning (AUTH before MQTT 5 is
/// written in its MQTT 5 form, which the peer refuses). Encoding never panics.
pub fn encode(packet: &Packet, version: ProtocolVersion, buf: &mut BytesMut) {
    let body = |sink: &mut dyn Sink| write_body(packet, version, sink);
    let body_len = measure(&body);
    buf.reserve(1 + variable_byte_integer_len(u32::try_from(body_len).unwrap_or(u32::MAX)) + body_len);
    buf.write_u8(first_byte(packet));
    buf.write_variable_byte_integer(u32::try_from(body_len).unwrap_or(u32::MAX));
    body(buf);
}

/// The exact number of bytes `encode` appends for `packet` and `version`: the server compares it
/// with the client's Maximum Packet Size before sending.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let body_len = measure(&|sink| write_body(packet, version, sink));
    1 + variable_byte_integer_len(u32::try_from(body_len).unwrap_or(u32::MAX)) + body_len
}

fn write_body(packet: &Packet, version: ProtocolVersion, sink: &mut dyn Sink) {
    match packet {
        Packet::Connect(connect) => connect::write(connect, version, sink),
        Packet::ConnAck(connack) => connack::write(connack, version, sink),
        Packet::Publish(publish) => publish::write(publish, version, sink),
        Packet::PubAck(response) | Packet::PubRec(response) | Packet::PubRel(response) | Packet::PubComp(response) => {
            pub_response::write(response, version, sink);
        }
        Packet::Subscribe(subscribe) => subscribe::write(subscribe, version, sink),
        Packet::SubAck(suback) => suback::write(suback, version, sink),
        Packet::Unsubscribe(unsubscribe) => unsubscribe::write(unsubscribe, version, sink),
        Packet::UnsubAck(unsuback) => unsuback::write(unsuback, version, sink),
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(disconnect) => disconnect::write(disconnect, version, sink),
        Packet::Auth(auth) => auth::write(auth, version, sink),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::codec::{Publish, QoS};

    #[test]
    fn encoded_len_matches_across_remaining_length_sizes() {
        for payload_len in [0, 100, 121, 122, 127, 128, 16_380, 16_384, 2_097_152] {
            let packet = Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                topic: "t".into(),
                packet_id: Some(1),
                payload: Bytes::from(vec![0; payload_len]),
                ..Publish::default()
            });
            for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
                let mut buf = BytesMut::new();
                encode(&packet, version, &mut buf);
                assert_eq!(buf.len(), encoded_len(&packet, version), "{payload_len} {version:?}");
            }
        }
    }
}
