//! PINGREQ and PINGRESP (sections 3.12 and 3.13 of both specifications): `read` and `write`. Both
//! are a fixed header alone. Touches nothing outside the codec.

use super::DecodeError;
use super::fixed_header::PacketType;
use super::wire::Reader;

/// A ping has no variable header and no payload: any byte after the fixed header is malformed.
pub(crate) fn read(reader: &mut Reader, packet_type: PacketType) -> Result<(), DecodeError> {
    reader.expect_end(packet_type.name())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use crate::codec::{DecodeError, Packet, ProtocolVersion, decode, decode_from_server, encode, encoded_len};

    #[test]
    fn pings_are_two_bytes() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let mut buf = BytesMut::new();
            encode(&Packet::PingReq, version, &mut buf);
            encode(&Packet::PingResp, version, &mut buf);
            assert_eq!(&buf[..], &[0xC0, 0, 0xD0, 0]);
            assert_eq!(encoded_len(&Packet::PingReq, version), 2);
            assert_eq!(decode(&mut buf, Some(version), 2), Ok(Some(Packet::PingReq)));
            assert_eq!(decode_from_server(&mut buf, version, 2), Ok(Some(Packet::PingResp)));
        }
    }

    #[test]
    fn ping_with_a_body_is_malformed() {
        let mut buf = BytesMut::from(&[0xC0, 1, 0][..]);
        assert!(matches!(decode(&mut buf, Some(ProtocolVersion::V5), 16), Err(DecodeError::Malformed(_))));
    }
}
