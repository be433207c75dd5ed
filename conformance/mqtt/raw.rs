//! A tiny raw-TCP MQTT client for byte-level tests: builds packets (well-formed or deliberately
//! not), sends them, and reads whole packets back or notices that the server closed the
//! connection. Blocking std sockets with timeouts; no MQTT state beyond framing.
//!
//! Packet builders take the wire values as they are (protocol level, flag bits, raw topic bytes),
//! so a test can break exactly one rule at a time.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longest wait for a reply the test expects.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the server to close a connection after a violation.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

// Control packet types (the high nibble of the first byte).
pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;
pub const AUTH: u8 = 15;

/// MQTT 5 property identifiers used by the tests.
pub mod prop {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// Bytes as spaced hex, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

// ----- encoding ---------------------------------------------------------------------------------

/// A Variable Byte Integer.
pub fn varint(mut value: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return out;
        }
    }
}

/// A length-prefixed string or binary field.
pub fn field(bytes: &[u8]) -> Vec<u8> {
    let len = u16::try_from(bytes.len()).expect("field under 64 KiB");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// A whole packet: the first byte, the Remaining Length, the rest.
pub fn packet(first_byte: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend(varint(rest.len()));
    out.extend_from_slice(rest);
    out
}

/// One MQTT 5 property.
#[derive(Debug, Clone)]
pub enum Prop<'a> {
    Byte(u8, u8),
    Two(u8, u16),
    Four(u8, u32),
    Str(u8, &'a str),
    Bin(u8, &'a [u8]),
}

/// A property section: its length, then the properties in the order given (duplicates allowed, so
/// tests can send invalid ones).
pub fn props(list: &[Prop<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for property in list {
        match *property {
            Prop::Byte(id, value) => body.extend([id, value]),
            Prop::Two(id, value) => {
                body.push(id);
                body.extend(value.to_be_bytes());
            }
            Prop::Four(id, value) => {
                body.push(id);
                body.extend(value.to_be_bytes());
            }
            Prop::Str(id, value) => {
                body.push(id);
                body.extend(field(value.as_bytes()));
            }
            Prop::Bin(id, value) => {
                body.push(id);
                body.extend(field(value));
            }
        }
    }
    let mut out = varint(body.len());
    out.extend(body);
    out
}

/// A Will in a CONNECT.
#[derive(Debug, Clone)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Properties (encoded with [`props`]); empty for none.
    pub properties: Vec<u8>,
}

/// A CONNECT packet. `level` 5 adds the property sections; any other level leaves them out.
#[derive(Debug, Clone)]
pub struct Connect<'a> {
    pub protocol_name: &'a str,
    pub level: u8,
    pub clean: bool,
    pub keep_alive: u16,
    pub client_id: &'a [u8],
    /// MQTT 5 CONNECT properties (encoded with [`props`]); empty for none.
    pub properties: Vec<u8>,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// Replaces the computed Connect Flags byte (to send invalid combinations).
    pub flags: Option<u8>,
}

impl<'a> Connect<'a> {
    /// MQTT 3.1.1 (level 4), clean session, keep alive 60 s.
    pub fn v4(client_id: &'a str) -> Self {
        Self {
            protocol_name: "MQTT",
            level: 4,
            clean: true,
            keep_alive: 60,
            client_id: client_id.as_bytes(),
            properties: Vec::new(),
            will: None,
            username: None,
            password: None,
            flags: None,
        }
    }

    /// MQTT 5 (level 5), clean start, keep alive 60 s, no properties.
    pub fn v5(client_id: &'a str) -> Self {
        Self { level: 5, ..Self::v4(client_id) }
    }

    pub fn clean(mut self, clean: bool) -> Self {
        self.clean = clean;
        self
    }

    pub fn keep_alive(mut self, secs: u16) -> Self {
        self.keep_alive = secs;
        self
    }

    pub fn properties(mut self, list: &[Prop<'_>]) -> Self {
        self.properties = props(list);
        self
    }

    pub fn will(mut self, will: Will<'a>) -> Self {
        self.will = Some(will);
        self
    }

    /// The Connect Flags byte these fields imply.
    pub fn computed_flags(&self) -> u8 {
        let mut flags = 0;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3);
            if will.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        flags
    }

    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut body = field(self.protocol_name.as_bytes());
        body.push(self.level);
        body.push(self.flags.unwrap_or_else(|| self.computed_flags()));
        body.extend(self.keep_alive.to_be_bytes());
        if v5 {
            body.extend(if self.properties.is_empty() { props(&[]) } else { self.properties.clone() });
        }
        body.extend(field(self.client_id));
        if let Some(will) = &self.will {
            if v5 {
                body.extend(if will.properties.is_empty() { props(&[]) } else { will.properties.clone() });
            }
            body.extend(field(will.topic.as_bytes()));
            body.extend(field(will.payload));
        }
        if let Some(username) = self.username {
            body.extend(field(username.as_bytes()));
        }
        if let Some(password) = self.password {
            body.extend(field(password));
        }
        packet(CONNECT << 4, &body)
    }
}

/// A PUBLISH packet. `properties: Some(..)` makes it an MQTT 5 one.
#[derive(Debug, Clone)]
pub struct Publish<'a> {
    pub topic: &'a [u8],
    /// The QoS bits as sent (3 is invalid on purpose).
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub packet_id: u16,
    pub properties: Option<Vec<u8>>,
    pub payload: &'a [u8],
}

impl<'a> Publish<'a> {
    /// An MQTT 3.1.1 PUBLISH; a QoS above 0 gets packet id 1.
    pub fn new(topic: &'a str, qos: u8, payload: &'a [u8]) -> Self {
        Self { topic: topic.as_bytes(), qos, dup: false, retain: false, packet_id: 1, properties: None, payload }
    }

    /// The same with an MQTT 5 property section.
    pub fn v5(mut self, list: &[Prop<'_>]) -> Self {
        self.properties = Some(props(list));
        self
    }

    /// Make it MQTT 5 or 3.1.1 (no properties).
    pub fn version5(self, v5: bool) -> Self {
        if v5 { self.v5(&[]) } else { self }
    }

    pub fn id(mut self, packet_id: u16) -> Self {
        self.packet_id = packet_id;
        self
    }

    pub fn dup(mut self, dup: bool) -> Self {
        self.dup = dup;
        self
    }

    pub fn raw_topic(mut self, topic: &'a [u8]) -> Self {
        self.topic = topic;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let first = (PUBLISH << 4) | (u8::from(self.dup) << 3) | ((self.qos & 3) << 1) | u8::from(self.retain);
        let mut body = field(self.topic);
        if self.qos != 0 {
            body.extend(self.packet_id.to_be_bytes());
        }
        if let Some(properties) = &self.properties {
            body.extend(properties);
        }
        body.extend_from_slice(self.payload);
        packet(first, &body)
    }
}

/// SUBSCRIBE with the given first byte (0x82 is the valid one), filters with their option bytes,
/// and MQTT 5 properties when `properties` is `Some`.
pub fn subscribe_with(
    first_byte: u8,
    packet_id: u16,
    filters: &[(&str, u8)],
    properties: Option<&[Prop<'_>]>,
) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if let Some(list) = properties {
        body.extend(props(list));
    }
    for (filter, options) in filters {
        body.extend(field(filter.as_bytes()));
        body.push(*options);
    }
    packet(first_byte, &body)
}

/// A valid SUBSCRIBE (MQTT 5 when `v5`, with no properties).
pub fn subscribe(v5: bool, packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    subscribe_with((SUBSCRIBE << 4) | 0x02, packet_id, filters, v5.then_some(&[]))
}

/// UNSUBSCRIBE with the given first byte (`(UNSUBSCRIBE << 4) | 2` is the valid one).
pub fn unsubscribe_with(first_byte: u8, v5: bool, packet_id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if v5 {
        body.extend(props(&[]));
    }
    for filter in filters {
        body.extend(field(filter.as_bytes()));
    }
    packet(first_byte, &body)
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP with a packet id only (reason Success), with the valid flags.
pub fn ack(kind: u8, packet_id: u16) -> Vec<u8> {
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    packet((kind << 4) | flags, &packet_id.to_be_bytes())
}

pub fn pingreq() -> Vec<u8> {
    vec![PINGREQ << 4, 0]
}

/// DISCONNECT: MQTT 3.1.1 has no body; MQTT 5 a reason code and an empty property section.
pub fn disconnect(v5: bool, reason: u8) -> Vec<u8> {
    if v5 { packet(DISCONNECT << 4, &[reason, 0]) } else { vec![DISCONNECT << 4, 0] }
}

// ----- decoding ---------------------------------------------------------------------------------

/// A whole packet read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub first_byte: u8,
    pub body: Vec<u8>,
}

/// A decoded MQTT 5 property value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    Int(u32),
    Str(String),
    Bin(Vec<u8>),
    Pair(String, String),
}

/// Decoded MQTT 5 properties, in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props(pub Vec<(u8, PropValue)>);

impl Props {
    pub fn int(&self, id: u8) -> Option<u32> {
        self.0.iter().find_map(|(i, v)| match v {
            PropValue::Int(n) if *i == id => Some(*n),
            _ => None,
        })
    }
}

/// A reader over a packet's body; panics (failing the test) on a short body.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> &'a [u8] {
        let end = self.at + len;
        assert!(end <= self.bytes.len(), "{}: truncated ({}): {}", self.what, self.bytes.len(), hex(self.bytes));
        let out = &self.bytes[self.at..end];
        self.at = end;
        out
    }

    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }

    fn u16(&mut self) -> u16 {
        let b = self.take(2);
        u16::from_be_bytes([b[0], b[1]])
    }

    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    fn varint(&mut self) -> u32 {
        let mut value = 0u32;
        for shift in 0..4 {
            let byte = self.u8();
            value |= u32::from(byte & 0x7F) << (7 * shift);
            if byte & 0x80 == 0 {
                return value;
            }
        }
        panic!("{}: Variable Byte Integer longer than 4 bytes: {}", self.what, hex(self.bytes));
    }

    fn bin(&mut self) -> Vec<u8> {
        let len = usize::from(self.u16());
        self.take(len).to_vec()
    }

    fn string(&mut self) -> String {
        let bytes = self.bin();
        String::from_utf8(bytes).unwrap_or_else(|e| panic!("{}: invalid UTF-8 string: {e}", self.what))
    }

    fn rest(&mut self) -> &'a [u8] {
        let out = &self.bytes[self.at..];
        self.at = self.bytes.len();
        out
    }

    fn is_empty(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn props(&mut self) -> Props {
        let len = self.varint() as usize;
        let end = self.at + len;
        let mut out = Vec::new();
        while self.at < end {
            let id = self.u8();
            let value = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => PropValue::Int(self.u8().into()),
                0x13 | 0x21 | 0x22 | 0x23 => PropValue::Int(self.u16().into()),
                0x02 | 0x11 | 0x18 | 0x27 => PropValue::Int(self.u32()),
                0x0B => PropValue::Int(self.varint()),
                0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => PropValue::Str(self.string()),
                0x09 | 0x16 => PropValue::Bin(self.bin()),
                0x26 => {
                    let name = self.string();
                    PropValue::Pair(name, self.string())
                }
                other => panic!("{}: unknown property 0x{other:02x}: {}", self.what, hex(self.bytes)),
            };
            out.push((id, value));
        }
        assert_eq!(self.at, end, "{}: property section overran: {}", self.what, hex(self.bytes));
        Props(out)
    }
}

/// A decoded CONNACK.
#[derive(Debug, Clone)]
pub struct ConnAck {
    pub session_present: bool,
    /// The 3.1.1 return code or the MQTT 5 reason code.
    pub code: u8,
    pub properties: Props,
}

/// A decoded PUBLISH.
#[derive(Debug, Clone)]
pub struct PublishIn {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub packet_id: Option<u16>,
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.first_byte >> 4
    }

    /// The whole packet as sent on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        packet(self.first_byte, &self.body)
    }

    fn cursor<'a>(&'a self, what: &'a str) -> Cursor<'a> {
        Cursor { bytes: &self.body, at: 0, what }
    }

    pub fn connack(&self, v5: bool) -> ConnAck {
        assert_eq!(self.kind(), CONNACK, "expected CONNACK, got {}", hex(&self.bytes()));
        let mut c = self.cursor("CONNACK");
        let flags = c.u8();
        let code = c.u8();
        let properties = if v5 { c.props() } else { Props::default() };
        assert!(c.is_empty(), "CONNACK has trailing bytes: {}", hex(&self.bytes()));
        ConnAck { session_present: flags & 1 == 1, code, properties }
    }

    /// The reason code of an MQTT 5 DISCONNECT (0x00 when the body is empty).
    pub fn disconnect_reason(&self) -> u8 {
        assert_eq!(self.kind(), DISCONNECT, "expected DISCONNECT, got {}", hex(&self.bytes()));
        self.body.first().copied().unwrap_or(0)
    }

    /// The packet id of an acknowledgement packet.
    pub fn packet_id(&self) -> u16 {
        self.cursor("packet id").u16()
    }

    /// SUBACK or UNSUBACK: the packet id and the return/reason codes.
    pub fn suback(&self, v5: bool) -> (u16, Vec<u8>) {
        let mut c = self.cursor("SUBACK");
        let id = c.u16();
        if v5 {
            c.props();
        }
        (id, c.rest().to_vec())
    }

    pub fn publish(&self, v5: bool) -> PublishIn {
        assert_eq!(self.kind(), PUBLISH, "expected PUBLISH, got {}", hex(&self.bytes()));
        let qos = (self.first_byte >> 1) & 3;
        let mut c = self.cursor("PUBLISH");
        let topic = c.string();
        let packet_id = (qos > 0).then(|| c.u16());
        if v5 {
            c.props();
        }
        PublishIn {
            dup: self.first_byte & 0x08 != 0,
            qos,
            retain: self.first_byte & 1 != 0,
            topic,
            packet_id,
            payload: c.rest().to_vec(),
        }
    }
}

/// What reading from the connection gave.
#[derive(Debug)]
pub enum Next {
    Packet(Packet),
    /// End of stream or connection reset.
    Closed,
    Timeout,
}

/// One raw connection.
#[derive(Debug)]
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
    /// The closure was a reset (the server's socket refused what we sent), not an end of stream.
    reset: bool,
    /// MQTT 5 framing for the helpers that decode.
    pub v5: bool,
}

impl Raw {
    pub fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&address, REPLY_TIMEOUT)
            .unwrap_or_else(|error| panic!("connect to {address}: {error}"));
        stream.set_nodelay(true).expect("nodelay");
        Self { stream, buf: Vec::new(), closed: false, reset: false, v5: false }
    }

    /// Send bytes; panics if the connection is already broken.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|error| panic!("sending {}: {error}", hex(bytes)));
    }

    /// Send bytes the server may refuse by closing (a write error is not a failure).
    pub fn send_lenient(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Send bytes, returning the write error (a reset connection fails with broken pipe).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Whether the connection ended with a reset rather than in order (end of stream).
    pub fn closed_by_reset(&self) -> bool {
        self.reset
    }

    /// Close the socket without DISCONNECT (an abnormal disconnection).
    pub fn drop_connection(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The next whole packet, or closure, or nothing within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(packet) = self.take_packet() {
                return Next::Packet(packet);
            }
            if self.closed {
                return Next::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Next::Timeout;
            }
            self.stream.set_read_timeout(Some(deadline - now)).expect("read timeout");
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                // Reset, aborted, broken pipe: the server closed the connection.
                Err(error) => {
                    self.reset = matches!(error.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted);
                    self.closed = true;
                }
            }
        }
    }

    fn take_packet(&mut self) -> Option<Packet> {
        let mut len = 0usize;
        let mut at = 1;
        loop {
            let byte = *self.buf.get(at)?;
            len |= usize::from(byte & 0x7F) << (7 * (at - 1));
            at += 1;
            if byte & 0x80 == 0 {
                break;
            }
            assert!(at <= 4, "server sent a Remaining Length longer than 4 bytes: {}", hex(&self.buf));
        }
        if self.buf.len() < at + len {
            return None;
        }
        let body = self.buf[at..at + len].to_vec();
        let first_byte = self.buf[0];
        self.buf.drain(..at + len);
        Some(Packet { first_byte, body })
    }

    /// The next packet; panics on closure or timeout.
    pub fn expect_packet(&mut self, what: &str) -> Packet {
        match self.next(REPLY_TIMEOUT) {
            Next::Packet(packet) => packet,
            Next::Closed => panic!("{what}: expected a packet, the server closed the connection"),
            Next::Timeout => panic!("{what}: expected a packet, nothing within {REPLY_TIMEOUT:?}"),
        }
    }

    /// The next packet, which must be of `kind`.
    pub fn expect_kind(&mut self, kind: u8, what: &str) -> Packet {
        let packet = self.expect_packet(what);
        assert_eq!(packet.kind(), kind, "{what}: expected packet type {kind}, got {}", hex(&packet.bytes()));
        packet
    }

    /// The next PUBLISH, decoded.
    pub fn expect_publish(&mut self, what: &str) -> PublishIn {
        let v5 = self.v5;
        self.expect_kind(PUBLISH, what).publish(v5)
    }

    /// Nothing arrives within `wait` (the connection may stay open).
    pub fn expect_silence(&mut self, wait: Duration, what: &str) {
        match self.next(wait) {
            Next::Timeout => {}
            Next::Packet(packet) => panic!("{what}: expected nothing, got {}", hex(&packet.bytes())),
            Next::Closed => panic!("{what}: expected nothing, the server closed the connection"),
        }
    }

    /// The server closes the connection without sending anything (first).
    pub fn expect_closed(&mut self, what: &str) {
        match self.next(CLOSE_TIMEOUT) {
            Next::Closed => {}
            Next::Packet(packet) => {
                panic!("{what}: expected the connection to be closed without a reply, got {}", hex(&packet.bytes()))
            }
            Next::Timeout => panic!("{what}: the connection is still open {CLOSE_TIMEOUT:?} later"),
        }
    }

    /// The connection is closed within the close timeout, whatever arrives before (returned).
    pub fn expect_eventually_closed(&mut self, what: &str) -> Vec<Packet> {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let mut packets = Vec::new();
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Next::Closed => return packets,
                Next::Packet(packet) => packets.push(packet),
                Next::Timeout => panic!(
                    "{what}: the connection is still open {CLOSE_TIMEOUT:?} later (received: {:?})",
                    packets.iter().map(|p| hex(&p.bytes())).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// An MQTT 5 DISCONNECT whose reason code is one of `reasons`, then closure. Returns the code.
    pub fn expect_disconnect(&mut self, reasons: &[u8], what: &str) -> u8 {
        let packet = match self.next(CLOSE_TIMEOUT) {
            Next::Packet(packet) => packet,
            Next::Closed => {
                panic!("{what}: the connection was closed without DISCONNECT (expected reason {})", codes(reasons))
            }
            Next::Timeout => {
                panic!("{what}: no DISCONNECT (expected reason {}) within {CLOSE_TIMEOUT:?}", codes(reasons))
            }
        };
        assert_eq!(
            packet.kind(),
            DISCONNECT,
            "{what}: expected DISCONNECT with reason {}, got {}",
            codes(reasons),
            hex(&packet.bytes())
        );
        let reason = packet.disconnect_reason();
        assert!(
            reasons.contains(&reason),
            "{what}: DISCONNECT reason 0x{reason:02x}, expected {} (packet {})",
            codes(reasons),
            hex(&packet.bytes())
        );
        let rest = self.expect_eventually_closed(what);
        assert!(
            rest.is_empty(),
            "{what}: packets after DISCONNECT: {:?}",
            rest.iter().map(|p| hex(&p.bytes())).collect::<Vec<_>>()
        );
        reason
    }

    /// After a violation: 3.1.1 closes without a reply, MQTT 5 sends DISCONNECT with one of
    /// `reasons` first.
    pub fn expect_refused(&mut self, reasons: &[u8], what: &str) {
        if self.v5 {
            self.expect_disconnect(reasons, what);
        } else {
            self.expect_closed(what);
        }
    }

    /// A CONNACK, then closure; the CONNACK decoded.
    pub fn expect_connack_then_close(&mut self, v5: bool, what: &str) -> ConnAck {
        let connack = self.expect_kind(CONNACK, what).connack(v5);
        let rest = self.expect_eventually_closed(what);
        assert!(
            rest.is_empty(),
            "{what}: packets after CONNACK: {:?}",
            rest.iter().map(|p| hex(&p.bytes())).collect::<Vec<_>>()
        );
        connack
    }

    /// Connect with `connect` and expect a successful CONNACK.
    pub fn session(address: SocketAddr, connect: &Connect<'_>) -> (Self, ConnAck) {
        let mut raw = Self::connect(address);
        raw.v5 = connect.level == 5;
        raw.send(&connect.encode());
        let connack = raw.expect_kind(CONNACK, "CONNECT").connack(raw.v5);
        assert_eq!(connack.code, 0, "CONNACK refused the connection: {connack:?}");
        (raw, connack)
    }

    /// Like [`Raw::session`], but `None` when the server cannot be reached or does not accept (for
    /// clients that retry while a broker restarts).
    pub fn try_session(address: SocketAddr, connect: &Connect<'_>) -> Option<(Self, ConnAck)> {
        let stream = TcpStream::connect_timeout(&address, REPLY_TIMEOUT).ok()?;
        stream.set_nodelay(true).ok()?;
        let mut raw = Self { stream, buf: Vec::new(), closed: false, reset: false, v5: connect.level == 5 };
        raw.stream.write_all(&connect.encode()).ok()?;
        match raw.next(REPLY_TIMEOUT) {
            Next::Packet(packet) if packet.kind() == CONNACK => {
                let connack = packet.connack(raw.v5);
                (connack.code == 0).then_some((raw, connack))
            }
            _ => None,
        }
    }

    /// An MQTT 3.1.1 (or, with `v5`, MQTT 5) clean session with client id `client_id`.
    pub fn open(address: SocketAddr, v5: bool, client_id: &str) -> Self {
        let connect = if v5 { Connect::v5(client_id) } else { Connect::v4(client_id) };
        Self::session(address, &connect).0
    }

    /// SUBSCRIBE to `filter` at `qos` and expect a SUBACK granting it.
    pub fn subscribe(&mut self, packet_id: u16, filter: &str, qos: u8) {
        let v5 = self.v5;
        self.send(&subscribe(v5, packet_id, &[(filter, qos)]));
        let (id, codes) = self.expect_kind(SUBACK, "SUBSCRIBE").suback(v5);
        assert_eq!((id, codes), (packet_id, vec![qos]), "SUBACK for {filter}");
    }

    /// Receive PUBLISHes, acknowledging each (PUBACK; PUBREC, then PUBCOMP for the PUBREL), until
    /// `count` arrived, then keep reading for `settle` to catch any extra one. Panics if fewer
    /// than `count` arrive within the reply timeout, or the connection closes.
    pub fn receive_acking(&mut self, count: usize, settle: Duration, what: &str) -> Vec<PublishIn> {
        let v5 = self.v5;
        let mut got: Vec<PublishIn> = Vec::new();
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut settle_until = (count == 0).then(|| Instant::now() + settle);
        loop {
            let until = settle_until.unwrap_or(deadline);
            let now = Instant::now();
            if now >= until {
                if settle_until.is_some() {
                    return got;
                }
                let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
                panic!("{what}: expected {count} PUBLISHes within {REPLY_TIMEOUT:?}, got {}: {topics:?}", got.len());
            }
            match self.next(until - now) {
                Next::Packet(packet) => match packet.kind() {
                    PUBLISH => {
                        let message = packet.publish(v5);
                        match (message.qos, message.packet_id) {
                            (1, Some(id)) => self.send(&ack(PUBACK, id)),
                            (2, Some(id)) => self.send(&ack(PUBREC, id)),
                            _ => {}
                        }
                        got.push(message);
                        if got.len() >= count && settle_until.is_none() {
                            settle_until = Some(Instant::now() + settle);
                        }
                    }
                    PUBREL => self.send(&ack(PUBCOMP, packet.packet_id())),
                    _ => panic!("{what}: unexpected packet {}", hex(&packet.bytes())),
                },
                Next::Closed => panic!("{what}: the server closed the connection after {} PUBLISHes", got.len()),
                Next::Timeout => {}
            }
        }
    }

    /// PINGREQ answered by PINGRESP: the connection is alive and its input is in sync.
    pub fn ping(&mut self) {
        self.send(&pingreq());
        let packet = self.expect_packet("PINGREQ");
        assert_eq!(packet.bytes(), vec![PINGRESP << 4, 0], "PINGREQ must be answered by PINGRESP");
    }
}

fn codes(reasons: &[u8]) -> String {
    reasons.iter().map(|r| format!("0x{r:02x}")).collect::<Vec<_>>().join(" or ")
}
