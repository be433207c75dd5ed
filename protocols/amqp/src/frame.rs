//! AMQP 0-9-1 framing over amq-protocol's parser and generator: the protocol header check, the
//! frame_max check made from the 7-byte frame header before the body is buffered, the frame-end
//! check, and content splitting. No IO; "need more bytes" is its own error, distinct from
//! malformed input and from a frame that is too large.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::basic::AMQPProperties;

/// The header this server speaks (and answers a wrong header with).
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Bytes of a frame that are not payload: type, channel, size (7) and frame-end (1).
pub const FRAME_OVERHEAD_BYTES: u32 = 8;

const FRAME_HEADER_BYTES: usize = 7;
const FRAME_END: u8 = 0xCE;

/// Why bytes did not decode into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed; nothing is wrong yet.
    #[error("incomplete frame")]
    Incomplete,
    /// The protocol header is not AMQP 0-9-1.
    #[error("bad protocol header")]
    BadProtocolHeader,
    /// The frame header announces more than the negotiated frame_max (501 FRAME_ERROR).
    #[error("frame size {size} exceeds frame_max {max}")]
    TooLarge {
        /// Whole frame size announced, bytes.
        size: u64,
        /// The negotiated maximum, bytes.
        max: u32,
    },
    /// The byte after the payload is not frame-end (501 FRAME_ERROR).
    #[error("bad frame end marker {0:#04x}")]
    BadFrameEnd(u8),
    /// Unknown frame type (501 FRAME_ERROR).
    #[error("unknown frame type {0}")]
    BadType(u8),
    /// The payload does not parse (502 SYNTAX_ERROR).
    #[error("malformed frame payload of type {0}")]
    Malformed(u8),
}

/// Check the 8-byte protocol header at the start of `buf`.
pub fn check_protocol_header(buf: &[u8]) -> Result<(), FrameError> {
    let len = buf.len().min(PROTOCOL_HEADER.len());
    if buf[..len] != PROTOCOL_HEADER[..len] {
        return Err(FrameError::BadProtocolHeader);
    }
    if len < PROTOCOL_HEADER.len() {
        return Err(FrameError::Incomplete);
    }
    Ok(())
}

/// Decode one frame from the start of `buf`, refusing a frame larger than `frame_max` bytes
/// (whole frame) as soon as its 7-byte header is there. Returns the frame and the bytes it used.
pub fn decode(buf: &[u8], frame_max: u32) -> Result<(AMQPFrame, usize), FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Incomplete);
    }
    let kind = buf[0];
    if !matches!(kind, 1 | 2 | 3 | 8) {
        return Err(FrameError::BadType(kind));
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    let whole = u64::from(size) + u64::from(FRAME_OVERHEAD_BYTES);
    if whole > u64::from(frame_max) {
        return Err(FrameError::TooLarge { size: whole, max: frame_max });
    }
    let total = whole as usize;
    if buf.len() < total {
        return Err(FrameError::Incomplete);
    }
    if buf[total - 1] != FRAME_END {
        return Err(FrameError::BadFrameEnd(buf[total - 1]));
    }
    match parse_frame(&buf[..total]) {
        Ok((_, frame)) => Ok((frame, total)),
        Err(_) => Err(FrameError::Malformed(kind)),
    }
}

/// Append the encoding of `frame` to `out`.
pub fn encode(frame: &AMQPFrame, out: &mut Vec<u8>) -> Result<(), String> {
    let buf = std::mem::take(out);
    match gen_frame(frame)(WriteContext::from(buf)) {
        Ok(context) => {
            *out = context.into_inner().0;
            Ok(())
        }
        Err(error) => Err(format!("frame generation failed: {error:?}")),
    }
}

/// Append a content header and body frames (each at most `frame_max` bytes) to `out`.
pub fn encode_content(
    channel: u16,
    properties: AMQPProperties,
    body: &[u8],
    frame_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let header = AMQPContentHeader { class_id: 60, body_size: body.len() as u64, properties };
    encode(&AMQPFrame::Header(channel, header), out)?;
    let chunk = (frame_max - FRAME_OVERHEAD_BYTES) as usize;
    for part in body.chunks(chunk) {
        encode(&AMQPFrame::Body(channel, part.to_vec()), out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{AMQPClass, channel};

    fn method(channel_id: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let frame = AMQPFrame::Method(channel_id, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})));
        encode(&frame, &mut out).expect("encode");
        out
    }

    #[test]
    fn round_trip_and_incomplete() {
        let bytes = method(3);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], 4096), Err(FrameError::Incomplete), "cut at {cut}");
        }
        let (frame, used) = decode(&bytes, 4096).expect("decode");
        assert_eq!(used, bytes.len());
        assert_eq!(frame.channel_id(), 3);
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        // Type 3 (body), channel 1, size ~4 GiB: refused before any body byte arrives.
        let header = [3, 0, 1, 0xFF, 0xFF, 0xFF, 0xF0];
        assert!(matches!(decode(&header, 131_072), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn bad_frame_end_and_type() {
        let mut bytes = method(1);
        let last = bytes.len() - 1;
        bytes[last] = 0;
        assert_eq!(decode(&bytes, 4096), Err(FrameError::BadFrameEnd(0)));
        bytes[0] = 9;
        assert_eq!(decode(&bytes, 4096), Err(FrameError::BadType(9)));
    }

    #[test]
    fn protocol_header() {
        assert_eq!(check_protocol_header(b"AMQP"), Err(FrameError::Incomplete));
        assert_eq!(check_protocol_header(PROTOCOL_HEADER), Ok(()));
        assert_eq!(check_protocol_header(b"AMQP\x00\x00\x09\x00"), Err(FrameError::BadProtocolHeader));
        assert_eq!(check_protocol_header(b"GET / HT"), Err(FrameError::BadProtocolHeader));
    }

    #[test]
    fn content_is_split_at_frame_max() {
        let mut out = Vec::new();
        encode_content(1, AMQPProperties::default(), &[7u8; 10_000], 4096, &mut out).expect("encode");
        let mut at = 0;
        let mut bodies = Vec::new();
        while at < out.len() {
            let (frame, used) = decode(&out[at..], 4096).expect("decode");
            at += used;
            if let AMQPFrame::Body(_, body) = frame {
                bodies.push(body.len());
            }
        }
        assert_eq!(bodies, vec![4088, 4088, 1824]);
    }
}
