//! Wire primitives every packet file shares: a bounds-checked `Reader` over one frame's bytes, the
//! `Sink` the encoder writes through (a buffer, or a `Counter` that only measures), and variable
//! byte integers. Pure functions over bytes; touches nothing outside the codec.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::DecodeError;

/// The largest value a variable byte integer can hold (four bytes of seven bits).
pub(crate) const VARIABLE_BYTE_INTEGER_MAX: u32 = 268_435_455;

/// The longest a variable byte integer may be on the wire.
pub(crate) const VARIABLE_BYTE_INTEGER_LEN_MAX: usize = 4;

/// The longest string or binary field: its length prefix is two bytes.
pub(crate) const FIELD_LEN_MAX: usize = u16::MAX as usize;

/// Shorthand for a malformed-packet error.
pub(crate) fn malformed(message: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(message.into())
}

/// Shorthand for a protocol error.
pub(crate) fn protocol(message: impl Into<String>) -> DecodeError {
    DecodeError::Protocol(message.into())
}

/// Parses a variable byte integer at the start of `bytes`: `Ok(None)` when `bytes` ends before the
/// integer does, else the value and how many bytes it took. A fourth byte with its continuation bit
/// set is malformed whatever follows, so that is reported without waiting for more bytes.
pub(crate) fn parse_variable_byte_integer(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (index, &byte) in bytes.iter().take(VARIABLE_BYTE_INTEGER_LEN_MAX).enumerate() {
        value |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((value, index + 1)));
        }
    }
    if bytes.len() >= VARIABLE_BYTE_INTEGER_LEN_MAX {
        return Err(malformed("variable byte integer longer than 4 bytes"));
    }
    Ok(None)
}

/// How many bytes the shortest encoding of `value` takes. Values above the maximum are not
/// representable; for them this counts the five bytes `Sink::write_variable_byte_integer` writes.
pub(crate) fn variable_byte_integer_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        2_097_152..=VARIABLE_BYTE_INTEGER_MAX => 4,
        _ => 5,
    }
}

/// A cursor over one frame's bytes (or a part of it, such as a property block). Every read checks
/// the bounds first: running out of bytes inside a frame whose length is already known is malformed,
/// never "incomplete".
#[derive(Debug)]
pub(crate) struct Reader {
    bytes: Bytes,
    /// MQTT 5 requires the shortest encoding of variable byte integers [MQTT-1.5.5-1]; 3.1.1 does not.
    v5: bool,
}

impl Reader {
    pub(crate) fn new(bytes: Bytes, v5: bool) -> Self {
        Self { bytes, v5 }
    }

    /// Switches the variable byte integer rule once CONNECT has revealed the version.
    pub(crate) fn set_v5(&mut self, v5: bool) {
        self.v5 = v5;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn need(&self, len: usize, what: &str) -> Result<(), DecodeError> {
        if self.bytes.len() < len {
            return Err(malformed(format!("{what}: needs {len} bytes, {} left", self.bytes.len())));
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.bytes.get_u8())
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.bytes.get_u16())
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.bytes.get_u32())
    }

    pub(crate) fn variable_byte_integer(&mut self, what: &str) -> Result<u32, DecodeError> {
        let Some((value, len)) = parse_variable_byte_integer(&self.bytes)? else {
            return Err(malformed(format!("{what}: truncated variable byte integer")));
        };
        if self.v5 && len != variable_byte_integer_len(value) {
            return Err(malformed(format!("[MQTT-1.5.5-1] {what}: variable byte integer not in its shortest form")));
        }
        self.bytes.advance(len);
        Ok(value)
    }

    /// The next `len` bytes, shared with the frame (no copy).
    pub(crate) fn take(&mut self, len: usize, what: &str) -> Result<Bytes, DecodeError> {
        self.need(len, what)?;
        Ok(self.bytes.split_to(len))
    }

    /// A reader over the next `len` bytes (a property block), with the same rules.
    pub(crate) fn sub_reader(&mut self, len: u32, what: &str) -> Result<Reader, DecodeError> {
        let len = usize::try_from(len).map_err(|_| malformed(format!("{what}: length does not fit in memory")))?;
        let bytes = self.take(len, what)?;
        Ok(Reader { bytes, v5: self.v5 })
    }

    /// Binary Data: a two-byte length, then that many bytes.
    pub(crate) fn binary(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// A UTF-8 Encoded String: well-formed UTF-8 (which excludes surrogates) without U+0000. Both
    /// 3.1.1 ([MQTT-1.5.3-1], [MQTT-1.5.3-2]) and 5.0 ([MQTT-1.5.4-1], [MQTT-1.5.4-2], "it is a
    /// Malformed Packet") forbid those; the other code points 5.0 discourages are left to the server.
    pub(crate) fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let bytes = self.binary(what)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|error| malformed(format!("[MQTT-1.5.4-1] {what}: ill-formed UTF-8 ({error})")))?;
        if text.contains('\0') {
            return Err(malformed(format!("[MQTT-1.5.4-2] {what}: contains U+0000")));
        }
        Ok(text.to_owned())
    }

    /// Everything left (a PUBLISH payload).
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.bytes)
    }

    /// Trailing bytes after a packet's last field make it malformed.
    pub(crate) fn expect_end(&self, what: &str) -> Result<(), DecodeError> {
        if !self.bytes.is_empty() {
            return Err(malformed(format!("{what}: {} unexpected trailing bytes", self.bytes.len())));
        }
        Ok(())
    }
}

/// Where the encoder writes: a `BytesMut`, or a `Counter` that only adds up lengths. Writing every
/// packet through this one trait is what makes `encoded_len` exact by construction: it runs the
/// same code as `encode`. Object safe, so a body can be written twice (measured, then written)
/// through one closure.
pub(crate) trait Sink {
    fn write_u8(&mut self, value: u8);
    fn write_bytes(&mut self, bytes: &[u8]);

    fn write_u16(&mut self, value: u16) {
        self.write_bytes(&value.to_be_bytes());
    }

    fn write_u32(&mut self, value: u32) {
        self.write_bytes(&value.to_be_bytes());
    }

    /// Shortest form. Values above the maximum cannot be represented; the caller's precondition
    /// (packets within the size limits) excludes them, and writing five bytes keeps this panic-free.
    fn write_variable_byte_integer(&mut self, value: u32) {
        let mut rest = value;
        loop {
            let mut byte = (rest & 0x7F) as u8;
            rest >>= 7;
            if rest > 0 {
                byte |= 0x80;
            }
            self.write_u8(byte);
            if rest == 0 {
                break;
            }
        }
    }

    /// Binary Data, truncated at 65,535 bytes (a precondition: the caller keeps fields that short).
    fn write_binary(&mut self, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(FIELD_LEN_MAX)];
        self.write_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
        self.write_bytes(bytes);
    }

    /// A UTF-8 Encoded String, truncated at a character boundary at or below 65,535 bytes (a
    /// precondition violation, but the frame stays well formed).
    fn write_string(&mut self, text: &str) {
        let text = &text[..text.floor_char_boundary(FIELD_LEN_MAX)];
        self.write_binary(text.as_bytes());
    }
}

impl Sink for BytesMut {
    fn write_u8(&mut self, value: u8) {
        self.put_u8(value);
    }

    fn write_bytes(&mut self, bytes: &[u8]) {
        self.put_slice(bytes);
    }
}

/// A sink that only counts bytes.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    pub(crate) len: usize,
}

impl Sink for Counter {
    fn write_u8(&mut self, _value: u8) {
        self.len += 1;
    }

    fn write_bytes(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
    }
}

/// How many bytes `body` writes.
pub(crate) fn measure(body: &dyn Fn(&mut dyn Sink)) -> usize {
    let mut counter = Counter::default();
    body(&mut counter);
    counter.len
}

/// Writes `body` preceded by its length as a variable byte integer (a property block).
pub(crate) fn write_with_length(sink: &mut dyn Sink, body: &dyn Fn(&mut dyn Sink)) {
    let len = measure(body);
    sink.write_variable_byte_integer(u32::try_from(len).unwrap_or(u32::MAX));
    body(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_byte_integer_boundaries_round_trip() {
        for value in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, VARIABLE_BYTE_INTEGER_MAX] {
            let mut buf = BytesMut::new();
            buf.write_variable_byte_integer(value);
            assert_eq!(buf.len(), variable_byte_integer_len(value), "{value}");
            assert_eq!(parse_variable_byte_integer(&buf), Ok(Some((value, buf.len()))));
        }
    }

    #[test]
    fn variable_byte_integer_needs_more_bytes_or_is_too_long() {
        assert_eq!(parse_variable_byte_integer(&[]), Ok(None));
        assert_eq!(parse_variable_byte_integer(&[0x80, 0x80, 0x80]), Ok(None));
        assert!(matches!(parse_variable_byte_integer(&[0x80, 0x80, 0x80, 0x80]), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn non_minimal_variable_byte_integer_is_malformed_only_in_v5() {
        let mut v5 = Reader::new(Bytes::from_static(&[0x80, 0x00]), true);
        assert!(matches!(v5.variable_byte_integer("x"), Err(DecodeError::Malformed(_))));
        let mut v3 = Reader::new(Bytes::from_static(&[0x80, 0x00]), false);
        assert_eq!(v3.variable_byte_integer("x"), Ok(0));
    }

    #[test]
    fn strings_reject_ill_formed_utf8_and_null() {
        let mut surrogate = Reader::new(Bytes::from_static(&[0, 3, 0xED, 0xA0, 0x80]), true);
        assert!(matches!(surrogate.string("x"), Err(DecodeError::Malformed(_))));
        let mut null = Reader::new(Bytes::from_static(&[0, 2, b'a', 0]), true);
        assert!(matches!(null.string("x"), Err(DecodeError::Malformed(_))));
        let mut short = Reader::new(Bytes::from_static(&[0, 5, b'a']), true);
        assert!(matches!(short.string("x"), Err(DecodeError::Malformed(_))));
        let mut ok = Reader::new(Bytes::from_static(&[0, 2, 0xC3, 0xA9]), true);
        assert_eq!(ok.string("x").as_deref(), Ok("é"));
    }

    #[test]
    fn counter_measures_what_bytes_mut_writes() {
        let body = |sink: &mut dyn Sink| {
            sink.write_u8(1);
            sink.write_u16(2);
            sink.write_u32(3);
            sink.write_variable_byte_integer(300);
            sink.write_string("héllo");
            sink.write_binary(&[1, 2, 3]);
        };
        let mut buf = BytesMut::new();
        body(&mut buf);
        assert_eq!(measure(&body), buf.len());
    }

    #[test]
    fn over_long_string_is_truncated_on_a_character_boundary() {
        let text = "é".repeat(40_000);
        let mut buf = BytesMut::new();
        buf.write_string(&text);
        let mut reader = Reader::new(buf.freeze(), true);
        let read = reader.string("x").unwrap();
        assert!(read.len() <= FIELD_LEN_MAX);
        assert_eq!(read.len() % 2, 0);
    }
}
