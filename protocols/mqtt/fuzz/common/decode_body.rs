//! The body of the `decode` fuzz target, shared by `#[path]` with the stable test
//! `tests/codec_fuzz_corpus.rs` so CI runs it over the seed corpus without nightly. It feeds
//! arbitrary bytes to the decoder (before CONNECT, as 3.1.1 and as MQTT 5; as a server and as a
//! client) and checks the decoder's contract on every outcome, and that every packet that decodes
//! survives encode then decode unchanged. It touches only the codec's public API, and panics only
//! when a check fails.

use bytes::BytesMut;
use wharf_mqtt::codec::{self, DecodeError, Packet, ProtocolVersion};

/// Small, so inputs also reach the size limit.
pub const PACKET_SIZE_MAX_BYTES: u32 = 1024;

/// Runs every check on `data`.
pub fn run(data: &[u8]) {
    for version in [None, Some(ProtocolVersion::V3_1_1), Some(ProtocolVersion::V5)] {
        decode_stream(data, version, false);
    }
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        decode_stream(data, Some(version), true);
    }
}

/// Decodes packets from `data` until it runs out or fails, like a connection would: after a
/// CONNECT decoded before any version was known, later packets use that CONNECT's version.
fn decode_stream(data: &[u8], mut version: Option<ProtocolVersion>, from_server: bool) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        let result = match (from_server, version) {
            (true, Some(version)) => codec::decode_from_server(&mut buf, version, PACKET_SIZE_MAX_BYTES),
            _ => codec::decode(&mut buf, version, PACKET_SIZE_MAX_BYTES),
        };
        let packet = match result {
            Ok(Some(packet)) => packet,
            Ok(None) => {
                assert_eq!(buf, before, "Ok(None) must leave the buffer untouched");
                return;
            }
            Err(error) => {
                assert_eq!(buf, before, "an error must leave the buffer untouched");
                if let DecodeError::TooLarge { size, max } = error {
                    assert!(size > max, "TooLarge with size {size} <= max {max}");
                }
                // Every error maps to an MQTT 5 error reason code.
                assert!(error.reason_code().is_error());
                return;
            }
        };
        let consumed = before.len() - buf.len();
        assert!(consumed >= 2, "a packet is at least 2 bytes, consumed {consumed}");
        assert!(consumed <= PACKET_SIZE_MAX_BYTES as usize, "consumed {consumed} bytes, over the maximum");
        assert_eq!(&before[consumed..], &buf[..], "decode must consume from the front only");
        let packet_version = match (&packet, version) {
            (Packet::Connect(connect), _) => match connect.protocol {
                Some(protocol) => protocol,
                None => panic!("a decoded CONNECT always has a version: {connect:?}"),
            },
            (_, Some(version)) => version,
            (_, None) => panic!("{} decoded before CONNECT", packet.name()),
        };
        round_trip(&packet, packet_version, from_server);
        if version.is_none() {
            version = Some(packet_version);
        }
    }
}

fn round_trip(packet: &Packet, version: ProtocolVersion, from_server: bool) {
    let mut encoded = BytesMut::new();
    codec::encode(packet, version, &mut encoded);
    assert_eq!(encoded.len(), codec::encoded_len(packet, version), "encoded_len disagrees with encode for {packet:?}");
    let decoded = if from_server {
        codec::decode_from_server(&mut encoded, version, u32::MAX)
    } else {
        let connection_version = if matches!(packet, Packet::Connect(_)) { None } else { Some(version) };
        codec::decode(&mut encoded, connection_version, u32::MAX)
    };
    assert_eq!(decoded.as_ref(), Ok(&Some(packet.clone())), "round trip of {packet:?} in {version:?}");
    assert!(encoded.is_empty(), "re-decoding left {} bytes", encoded.len());
}
