//! AMQP 0-9-1 on the wire, byte for byte, against the real binary: a small blocking client over
//! `std::net::TcpStream` whose frame and method encoders are written here (not taken from the
//! code under test), used to break one rule of the protocol header, framing, channels, content or
//! handshake at a time. Each test checks the reply code (RabbitMQ's, as
//! `protocols/amqp/MAPPING.md` documents it; the text where it documents one) and that the
//! server then closes the socket. Also the handshake timeout, heartbeats, and AMQP over TLS with
//! pika. Touches only the brokers it starts and loopback sockets.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::{Broker, python, run_with_timeout};

/// Longest wait for a frame the server must send.
const PATIENCE: Duration = Duration::from_secs(5);
/// Longest wait for the AMQP port to accept after the broker said it is ready (the listeners are
/// bound one after the other).
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// The only protocol header Wharf speaks: AMQP 0-9-1.
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size.
const FRAME_HEADER_BYTES: usize = 7;
/// Bytes of a frame that are not payload: the 7-byte header and the frame-end octet.
const FRAME_OVERHEAD_BYTES: u32 = 8;
/// AMQP 0-9-1's `frame-min-size`.
const FRAME_MIN_SIZE_BYTES: u32 = 4096;

/// A method's class id and method id.
type MethodId = (u16, u16);

const CONNECTION_START: MethodId = (10, 10);
const CONNECTION_START_OK: MethodId = (10, 11);
const CONNECTION_TUNE: MethodId = (10, 30);
const CONNECTION_TUNE_OK: MethodId = (10, 31);
const CONNECTION_OPEN: MethodId = (10, 40);
const CONNECTION_OPEN_OK: MethodId = (10, 41);
const CONNECTION_CLOSE: MethodId = (10, 50);
const CONNECTION_CLOSE_OK: MethodId = (10, 51);
const CHANNEL_OPEN: MethodId = (20, 10);
const CHANNEL_OPEN_OK: MethodId = (20, 11);
const CHANNEL_CLOSE: MethodId = (20, 40);
const CHANNEL_CLOSE_OK: MethodId = (20, 41);
const QUEUE_DECLARE: MethodId = (50, 10);
const QUEUE_DECLARE_OK: MethodId = (50, 11);
const BASIC_PUBLISH: MethodId = (60, 40);
const BASIC_GET: MethodId = (60, 70);
const BASIC_GET_OK: MethodId = (60, 71);
const BASIC_GET_EMPTY: MethodId = (60, 72);

/// The class of `basic`, the only content class.
const CLASS_BASIC: u16 = 60;

const NOT_FOUND: u16 = 404;
const FRAME_ERROR: u16 = 501;
const SYNTAX_ERROR: u16 = 502;
const CHANNEL_ERROR: u16 = 504;
const UNEXPECTED_FRAME: u16 = 505;
const NOT_ALLOWED: u16 = 530;

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// The arguments of a method, field by field in the spec's order.
#[derive(Debug, Default)]
struct Args(Vec<u8>);

impl Args {
    fn octet(mut self, value: u8) -> Self {
        self.0.push(value);
        self
    }

    fn short(mut self, value: u16) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    fn long(mut self, value: u32) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    fn shortstr(mut self, value: &str) -> Self {
        let len = u8::try_from(value.len()).expect("a short string is at most 255 bytes");
        self.0.push(len);
        self.0.extend_from_slice(value.as_bytes());
        self
    }

    fn longstr(mut self, value: &[u8]) -> Self {
        let len = u32::try_from(value.len()).expect("a long string is at most 4 GiB");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(value);
        self
    }

    fn empty_table(self) -> Self {
        self.long(0)
    }

    /// Consecutive bit fields, packed into one octet from the least significant bit.
    fn bits(self, bits: &[bool]) -> Self {
        assert!(bits.len() <= 8, "one octet holds 8 bits");
        let octet = bits.iter().enumerate().fold(0u8, |octet, (i, bit)| octet | (u8::from(*bit) << i));
        self.octet(octet)
    }
}

/// A whole frame: type, channel, size, payload, frame-end.
fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let size = u32::try_from(payload.len()).expect("payload fits a frame");
    let mut out = Vec::with_capacity(payload.len() + FRAME_OVERHEAD_BYTES as usize);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

/// Only the 7-byte header of a frame announcing `size` payload bytes (the payload never follows).
fn frame_header_only(kind: u8, channel: u16, size: u32) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out
}

fn method(channel: u16, (class_id, method_id): MethodId, args: Args) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + args.0.len());
    payload.extend_from_slice(&class_id.to_be_bytes());
    payload.extend_from_slice(&method_id.to_be_bytes());
    payload.extend_from_slice(&args.0);
    frame(FRAME_METHOD, channel, &payload)
}

/// A content header of class `basic` with no properties.
fn content_header(channel: u16, body_size: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(14);
    payload.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes()); // weight
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes()); // property flags: none
    frame(FRAME_HEADER, channel, &payload)
}

fn content_body(channel: u16, body: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, body)
}

fn heartbeat() -> Vec<u8> {
    frame(FRAME_HEARTBEAT, 0, &[])
}

fn start_ok() -> Vec<u8> {
    let args = Args::default().empty_table().shortstr("PLAIN").longstr(b"\0guest\0guest").shortstr("en_US");
    method(0, CONNECTION_START_OK, args)
}

fn tune_ok(tune: Tune) -> Vec<u8> {
    method(0, CONNECTION_TUNE_OK, Args::default().short(tune.channel_max).long(tune.frame_max).short(tune.heartbeat))
}

fn connection_open(vhost: &str) -> Vec<u8> {
    // virtual-host, reserved-1 (capabilities), reserved-2 (insist).
    method(0, CONNECTION_OPEN, Args::default().shortstr(vhost).shortstr("").bits(&[false]))
}

fn connection_close() -> Vec<u8> {
    method(0, CONNECTION_CLOSE, Args::default().short(200).shortstr("bye").short(0).short(0))
}

fn connection_close_ok() -> Vec<u8> {
    method(0, CONNECTION_CLOSE_OK, Args::default())
}

fn channel_open(channel: u16) -> Vec<u8> {
    method(channel, CHANNEL_OPEN, Args::default().shortstr(""))
}

fn channel_close_ok(channel: u16) -> Vec<u8> {
    method(channel, CHANNEL_CLOSE_OK, Args::default())
}

/// queue.declare, waiting for declare-ok (not durable, not exclusive, not auto-delete).
fn queue_declare(channel: u16, queue: &str, passive: bool) -> Vec<u8> {
    // reserved-1, queue, passive, durable, exclusive, auto-delete, no-wait, arguments.
    let args = Args::default().short(0).shortstr(queue).bits(&[passive, false, false, false, false]).empty_table();
    method(channel, QUEUE_DECLARE, args)
}

/// basic.publish to the default exchange (neither mandatory nor immediate).
fn basic_publish(channel: u16, routing_key: &str) -> Vec<u8> {
    // reserved-1, exchange, routing-key, mandatory, immediate.
    method(channel, BASIC_PUBLISH, Args::default().short(0).shortstr("").shortstr(routing_key).bits(&[false, false]))
}

/// basic.get with no-ack (the message is settled on delivery).
fn basic_get(channel: u16, queue: &str) -> Vec<u8> {
    method(channel, BASIC_GET, Args::default().short(0).shortstr(queue).bits(&[true]))
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Method { channel: u16, id: MethodId, args: Vec<u8> },
    Header { channel: u16, class_id: u16, body_size: u64 },
    Body { channel: u16, payload: Vec<u8> },
    Heartbeat { channel: u16 },
    Other { kind: u8, channel: u16, payload: Vec<u8> },
}

/// Why no frame was read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadError {
    /// The server closed the socket (EOF or reset).
    Closed,
    /// Nothing (complete) arrived in time; the socket is still open.
    TimedOut,
    /// The bytes are not a frame.
    Malformed(String),
}

/// Reads the fields of a method's arguments in order.
#[derive(Debug)]
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn take(&mut self, len: usize) -> &'a [u8] {
        let taken = self.bytes.get(self.at..self.at + len).unwrap_or_else(|| {
            panic!("method arguments end early: want {len} bytes at {} of {:?}", self.at, self.bytes)
        });
        self.at += len;
        taken
    }

    fn octet(&mut self) -> u8 {
        self.take(1)[0]
    }

    fn short(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().expect("2 bytes"))
    }

    fn long(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().expect("4 bytes"))
    }

    fn longlong(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().expect("8 bytes"))
    }

    fn shortstr(&mut self) -> String {
        let len = usize::from(self.octet());
        String::from_utf8(self.take(len).to_vec()).expect("short string is UTF-8")
    }

    fn longstr(&mut self) -> Vec<u8> {
        let len = self.long() as usize;
        self.take(len).to_vec()
    }
}

/// connection.close or channel.close (same arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Close {
    code: u16,
    text: String,
    /// The class and method that caused it ((0, 0) when none).
    failing: MethodId,
}

impl Close {
    fn parse(args: &[u8]) -> Self {
        let mut fields = Fields::new(args);
        let code = fields.short();
        let text = fields.shortstr();
        let failing = (fields.short(), fields.short());
        Self { code, text, failing }
    }
}

/// The values of connection.tune (and of tune-ok).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tune {
    channel_max: u16,
    frame_max: u32,
    heartbeat: u16,
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// One connection to the broker; every read has a deadline.
#[derive(Debug)]
struct Client {
    stream: TcpStream,
    /// Bytes read and not yet taken as frames.
    buf: Vec<u8>,
}

impl Client {
    /// Connect (retrying while the port refuses, for at most [`CONNECT_PATIENCE`]); nothing sent.
    fn connect(port: u16) -> Self {
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + CONNECT_PATIENCE;
        loop {
            match TcpStream::connect_timeout(&address, PATIENCE) {
                Ok(stream) => {
                    stream.set_nodelay(true).expect("nodelay");
                    stream.set_write_timeout(Some(PATIENCE)).expect("write timeout");
                    return Self { stream, buf: Vec::new() };
                }
                Err(error) if error.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                    sleep(Duration::from_millis(50));
                }
                Err(error) => panic!("cannot connect to {address}: {error}"),
            }
        }
    }

    /// Connect and complete the handshake as a well-behaved client: tune-ok echoes the server's
    /// channel_max and frame_max (as clients do) with heartbeats off, then `/` is opened.
    fn open(broker: &Broker) -> Self {
        let mut client = Self::connect(broker.amqp_port());
        client.handshake(|tune| Tune { heartbeat: 0, ..tune });
        client
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap_or_else(|error| panic!("sending {} bytes failed: {error}", bytes.len()));
    }

    /// Send when the server may already have closed the socket.
    fn send_if_open(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Read more bytes into the buffer, waiting until `deadline` at most.
    fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadError::TimedOut);
        }
        // A zero timeout would mean "block forever".
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(wait)).expect("read timeout");
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(ReadError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(ReadError::TimedOut)
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => Ok(()),
            Err(error)
                if matches!(
                    error.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
                ) =>
            {
                Err(ReadError::Closed)
            }
            Err(error) => panic!("read failed: {error}"),
        }
    }

    /// The next frame, waiting `patience` at most.
    fn read_frame(&mut self, patience: Duration) -> Result<Frame, ReadError> {
        let deadline = Instant::now() + patience;
        loop {
            if self.buf.len() >= FRAME_HEADER_BYTES {
                let size = u32::from_be_bytes(self.buf[3..7].try_into().expect("4 bytes")) as usize;
                let whole = FRAME_HEADER_BYTES + size + 1;
                if self.buf.len() >= whole {
                    let bytes: Vec<u8> = self.buf.drain(..whole).collect();
                    return decode_frame(&bytes);
                }
            }
            self.fill(deadline)?;
        }
    }

    /// The next frame that is not a heartbeat; panics if none arrives within [`PATIENCE`].
    fn next_frame(&mut self) -> Frame {
        loop {
            match self.read_frame(PATIENCE) {
                Ok(Frame::Heartbeat { .. }) => continue,
                Ok(frame) => return frame,
                Err(error) => panic!("expected a frame, got {error:?}"),
            }
        }
    }

    /// The arguments of the next method, which must be `id` on `channel`.
    fn expect_method(&mut self, channel: u16, id: MethodId) -> Vec<u8> {
        match self.next_frame() {
            Frame::Method { channel: got_channel, id: got_id, args } if got_channel == channel && got_id == id => args,
            Frame::Method { channel: 0, id: CONNECTION_CLOSE, args } => {
                panic!(
                    "expected {id:?} on channel {channel}, the server closed the connection: {:?}",
                    Close::parse(&args)
                )
            }
            other => panic!("expected {id:?} on channel {channel}, got {other:?}"),
        }
    }

    /// Send the protocol header and do start-ok (PLAIN guest/guest), tune-ok (`tune_ok` of the
    /// server's tune) and open `/`. Returns the server's tune.
    fn handshake(&mut self, tune_ok: impl FnOnce(Tune) -> Tune) -> Tune {
        let offered = self.start_and_tune();
        self.send(&self::tune_ok(tune_ok(offered)));
        self.send(&connection_open("/"));
        self.expect_method(0, CONNECTION_OPEN_OK);
        offered
    }

    /// Protocol header, start, start-ok, tune: the server's tune, before tune-ok.
    fn start_and_tune(&mut self) -> Tune {
        self.send(PROTOCOL_HEADER);
        self.expect_method(0, CONNECTION_START);
        self.send(&start_ok());
        let args = self.expect_method(0, CONNECTION_TUNE);
        let mut fields = Fields::new(&args);
        Tune { channel_max: fields.short(), frame_max: fields.long(), heartbeat: fields.short() }
    }

    fn open_channel(&mut self, channel: u16) {
        self.send(&channel_open(channel));
        self.expect_method(channel, CHANNEL_OPEN_OK);
    }

    fn declare_queue(&mut self, channel: u16, queue: &str) {
        self.send(&queue_declare(channel, queue, false));
        self.expect_method(channel, QUEUE_DECLARE_OK);
    }

    /// Publish `body` to `queue` through the default exchange in one body frame.
    fn publish(&mut self, channel: u16, queue: &str, body: &[u8]) {
        self.send(&basic_publish(channel, queue));
        self.send(&content_header(channel, body.len() as u64));
        self.send(&content_body(channel, body));
    }

    /// basic.get with no-ack: the body of the message at the head of `queue`, or `None` when it
    /// is empty.
    fn get(&mut self, channel: u16, queue: &str) -> Option<Vec<u8>> {
        self.send(&basic_get(channel, queue));
        match self.next_frame() {
            Frame::Method { channel: got, id: BASIC_GET_EMPTY, .. } if got == channel => return None,
            Frame::Method { channel: got, id: BASIC_GET_OK, .. } if got == channel => {}
            other => panic!("expected basic.get-ok or get-empty on channel {channel}, got {other:?}"),
        }
        let body_size = match self.next_frame() {
            Frame::Header { channel: got, class_id: CLASS_BASIC, body_size } if got == channel => body_size,
            other => panic!("expected a content header on channel {channel}, got {other:?}"),
        };
        let mut body = Vec::new();
        while (body.len() as u64) < body_size {
            match self.next_frame() {
                Frame::Body { channel: got, payload } if got == channel => body.extend_from_slice(&payload),
                other => panic!("expected a content body on channel {channel}, got {other:?}"),
            }
        }
        assert_eq!(body.len() as u64, body_size, "the bodies add up to the header's size");
        Some(body)
    }

    /// The next frame must be connection.close; returns it.
    fn expect_connection_close(&mut self) -> Close {
        match self.next_frame() {
            Frame::Method { channel: 0, id: CONNECTION_CLOSE, args } => Close::parse(&args),
            other => panic!("expected connection.close, got {other:?}"),
        }
    }

    /// The next frame must be channel.close on `channel`; returns it.
    fn expect_channel_close(&mut self, channel: u16) -> Close {
        let args = self.expect_method(channel, CHANNEL_CLOSE);
        Close::parse(&args)
    }

    /// The server closes the socket within [`PATIENCE`] without sending another frame (but
    /// heartbeats).
    fn expect_socket_closed(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.read_frame(deadline.saturating_duration_since(Instant::now())) {
                Err(ReadError::Closed) => return,
                Ok(Frame::Heartbeat { .. }) => continue,
                Ok(frame) => panic!("expected the socket to close, got {frame:?}"),
                Err(error) => panic!("expected the socket to close within {PATIENCE:?}, got {error:?}"),
            }
        }
    }

    /// The socket is still open and nothing but heartbeats arrives for `quiet`.
    fn expect_open_and_silent(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        loop {
            match self.read_frame(deadline.saturating_duration_since(Instant::now())) {
                Err(ReadError::TimedOut) => return,
                Ok(Frame::Heartbeat { .. }) => continue,
                other => panic!("expected nothing for {quiet:?}, got {other:?}"),
            }
        }
    }

    /// Everything the server writes until it closes the socket (at most `patience`).
    fn read_until_closed(&mut self, patience: Duration) -> Vec<u8> {
        let deadline = Instant::now() + patience;
        loop {
            match self.fill(deadline) {
                Ok(()) => continue,
                Err(ReadError::Closed) => return std::mem::take(&mut self.buf),
                Err(error) => panic!("the server did not close the socket within {patience:?}: {error:?}"),
            }
        }
    }
}

fn decode_frame(bytes: &[u8]) -> Result<Frame, ReadError> {
    let kind = bytes[0];
    let channel = u16::from_be_bytes([bytes[1], bytes[2]]);
    let payload = &bytes[FRAME_HEADER_BYTES..bytes.len() - 1];
    let end = bytes[bytes.len() - 1];
    if end != FRAME_END {
        return Err(ReadError::Malformed(format!("frame-end {end:#04x} in {bytes:?}")));
    }
    Ok(match kind {
        FRAME_METHOD if payload.len() >= 4 => Frame::Method {
            channel,
            id: (u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]])),
            args: payload[4..].to_vec(),
        },
        FRAME_HEADER if payload.len() >= 12 => {
            let mut fields = Fields::new(payload);
            let class_id = fields.short();
            let _weight = fields.short();
            Frame::Header { channel, class_id, body_size: fields.longlong() }
        }
        FRAME_BODY => Frame::Body { channel, payload: payload.to_vec() },
        FRAME_HEARTBEAT => Frame::Heartbeat { channel },
        _ => Frame::Other { kind, channel, payload: payload.to_vec() },
    })
}

/// The server ends the connection for a connection-level error: connection.close with `code`
/// arrives, and after our close-ok (which it may not wait for) the socket closes. Returns the
/// close to check its text.
fn assert_connection_closed_with(client: &mut Client, code: u16) -> Close {
    let close = client.expect_connection_close();
    assert_eq!(close.code, code, "reply code of {close:?}");
    client.send_if_open(&connection_close_ok());
    client.expect_socket_closed();
    close
}

/// A broker with an open connection and channel 1 on it.
fn broker_with_channel() -> (Broker, Client) {
    let broker = Broker::start();
    let mut client = Client::open(&broker);
    client.open_channel(1);
    (broker, client)
}

// ---------------------------------------------------------------------------------------------
// Protocol header (AMQP 0-9-1 section 4.2.2)
// ---------------------------------------------------------------------------------------------

#[test]
fn protocol_header_is_answered_with_connection_start_0_9_plain_en_us() {
    let broker = Broker::start();
    let mut client = Client::connect(broker.amqp_port());
    client.send(PROTOCOL_HEADER);
    let args = client.expect_method(0, CONNECTION_START);
    let mut fields = Fields::new(&args);
    assert_eq!((fields.octet(), fields.octet()), (0, 9), "version-major, version-minor");
    let properties_len = fields.long() as usize;
    fields.take(properties_len);
    let mechanisms = String::from_utf8(fields.longstr()).expect("mechanisms are text");
    assert!(mechanisms.split(' ').any(|m| m == "PLAIN"), "mechanisms: {mechanisms}");
    assert_eq!(fields.longstr(), b"en_US", "locales");
}

#[test]
fn protocol_header_of_another_version_is_answered_with_0_9_1_and_closed() {
    let broker = Broker::start();
    let mut client = Client::connect(broker.amqp_port());
    // AMQP 0-10: a version the server does not speak.
    client.send(b"AMQP\x00\x00\x0a\x00");
    assert_eq!(client.read_until_closed(PATIENCE), PROTOCOL_HEADER);
}

#[test]
fn bytes_that_are_not_a_protocol_header_are_answered_with_0_9_1_and_closed() {
    let broker = Broker::start();
    let mut client = Client::connect(broker.amqp_port());
    client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(client.read_until_closed(PATIENCE), PROTOCOL_HEADER);
}

// ---------------------------------------------------------------------------------------------
// Framing (section 4.2.3): 501 FRAME_ERROR, then the socket closes
// ---------------------------------------------------------------------------------------------

#[test]
fn frame_with_a_bad_frame_end_octet_is_501_frame_error() {
    let (_broker, mut client) = broker_with_channel();
    let mut bad = channel_open(2);
    *bad.last_mut().expect("a frame") = 0x00;
    client.send(&bad);
    let close = assert_connection_closed_with(&mut client, FRAME_ERROR);
    assert!(close.text.starts_with("FRAME_ERROR - "), "{close:?}");
}

#[test]
fn frame_header_announcing_more_than_the_negotiated_frame_max_is_501_before_the_body() {
    let broker = Broker::start();
    let mut client = Client::connect(broker.amqp_port());
    client.handshake(|tune| Tune { frame_max: FRAME_MIN_SIZE_BYTES, heartbeat: 0, ..tune });
    client.open_channel(1);
    client.declare_queue(1, "fits");
    // Positive control: a body frame of exactly frame_max bytes is accepted.
    let body = vec![7u8; (FRAME_MIN_SIZE_BYTES - FRAME_OVERHEAD_BYTES) as usize];
    client.publish(1, "fits", &body);
    assert_eq!(client.get(1, "fits"), Some(body));
    // A body frame announcing twice frame_max: only its 7-byte header is sent.
    client.send(&basic_publish(1, "fits"));
    client.send(&content_header(1, 2 * u64::from(FRAME_MIN_SIZE_BYTES)));
    client.send(&frame_header_only(FRAME_BODY, 1, 2 * FRAME_MIN_SIZE_BYTES));
    let close = assert_connection_closed_with(&mut client, FRAME_ERROR);
    assert!(close.text.starts_with("FRAME_ERROR - "), "{close:?}");
}

#[test]
fn frame_header_announcing_4_gib_is_501_before_the_body() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&frame_header_only(FRAME_METHOD, 1, 0xFFFF_FFF0));
    assert_connection_closed_with(&mut client, FRAME_ERROR);
}

#[test]
fn unknown_frame_type_is_501_frame_error() {
    let (_broker, mut client) = broker_with_channel();
    // 0-9-1 has method (1), header (2), body (3) and heartbeat (8) frames.
    client.send(&frame(9, 0, &[]));
    let close = assert_connection_closed_with(&mut client, FRAME_ERROR);
    assert!(close.text.starts_with("FRAME_ERROR - "), "{close:?}");
}

// RabbitMQ looks the class and method ids up before decoding (`rabbit_command_assembler:
// analyze_frame` calls `lookup_method_name`), and an unknown pair exits the connection process
// with `{unknown_method_id, Id}`: the socket is closed, the connection is over. Wharf does the same
// but first says why, with 502 SYNTAX_ERROR (MAPPING.md: "502 unparsable method").

#[test]
fn unknown_class_id_ends_the_connection_502_syntax_error() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&method(1, (99, 10), Args::default()));
    let close = assert_connection_closed_with(&mut client, SYNTAX_ERROR);
    assert!(close.text.starts_with("SYNTAX_ERROR - "), "{close:?}");
}

#[test]
fn unknown_method_id_of_a_known_class_ends_the_connection_502_syntax_error() {
    let (_broker, mut client) = broker_with_channel();
    // basic has no method 99.
    client.send(&method(1, (CLASS_BASIC, 99), Args::default()));
    let close = assert_connection_closed_with(&mut client, SYNTAX_ERROR);
    assert!(close.text.starts_with("SYNTAX_ERROR - "), "{close:?}");
}

// ---------------------------------------------------------------------------------------------
// Channels (section 4.2.5 and RabbitMQ's channel errors): 504 CHANNEL_ERROR closes the connection
// ---------------------------------------------------------------------------------------------

#[test]
fn method_on_a_channel_never_opened_is_504_expected_channel_open() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&queue_declare(3, "q", false));
    let close = assert_connection_closed_with(&mut client, CHANNEL_ERROR);
    assert_eq!(close.text, "CHANNEL_ERROR - expected 'channel.open'");
    assert_eq!(close.failing, QUEUE_DECLARE, "the failing method");
}

#[test]
fn second_channel_open_on_an_open_channel_is_504_second_channel_open_seen() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&channel_open(1));
    let close = assert_connection_closed_with(&mut client, CHANNEL_ERROR);
    assert_eq!(close.text, "CHANNEL_ERROR - second 'channel.open' seen");
    assert_eq!(close.failing, CHANNEL_OPEN, "the failing method");
}

#[test]
fn channel_number_above_the_negotiated_channel_max_is_504_channel_error() {
    let broker = Broker::builder().env("WHARF__AMQP__CHANNEL_MAX", 10).start();
    let mut client = Client::connect(broker.amqp_port());
    // The server offers 10; the client lowers it to 3.
    let offered = client.handshake(|tune| Tune { channel_max: 3, heartbeat: 0, ..tune });
    assert_eq!(offered.channel_max, 10, "connection.tune offers amqp.channel_max");
    client.open_channel(3);
    client.send(&channel_open(4));
    let close = assert_connection_closed_with(&mut client, CHANNEL_ERROR);
    assert!(close.text.starts_with("CHANNEL_ERROR - "), "{close:?}");
}

#[test]
fn methods_on_a_channel_closed_by_the_server_are_ignored_until_close_ok() {
    let (_broker, mut client) = broker_with_channel();
    client.open_channel(2);
    // A channel error: channel 1 is closed by the server, the connection stays.
    client.send(&queue_declare(1, "missing", true));
    let close = client.expect_channel_close(1);
    assert_eq!(close.code, NOT_FOUND, "{close:?}");
    // Before close-ok: a declare that would create a queue, and a publish, both ignored.
    client.send(&queue_declare(1, "ignored", false));
    client.publish(1, "ignored", b"ignored");
    // Frames are handled in order: had the declare been answered, its declare-ok would come before
    // this channel's reply.
    client.send(&queue_declare(2, "control", false));
    client.expect_method(2, QUEUE_DECLARE_OK);
    client.send(&queue_declare(2, "ignored", true));
    let close = client.expect_channel_close(2);
    assert_eq!(close.code, NOT_FOUND, "the ignored declare created no queue: {close:?}");
    client.send(&channel_close_ok(2));
    // After close-ok the channel number can be opened again.
    client.send(&channel_close_ok(1));
    client.open_channel(1);
    client.declare_queue(1, "after");
}

#[test]
fn methods_after_the_server_closed_the_connection_are_ignored_until_close_ok() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&queue_declare(3, "q", false));
    let close = client.expect_connection_close();
    assert_eq!(close.code, CHANNEL_ERROR, "{close:?}");
    // Neither answered: no channel.open-ok, no declare-ok before the socket closes.
    client.send(&channel_open(2));
    client.send(&queue_declare(1, "q", false));
    client.send(&connection_close_ok());
    client.expect_socket_closed();
}

// ---------------------------------------------------------------------------------------------
// Content (section 4.2.6)
// ---------------------------------------------------------------------------------------------

#[test]
fn content_frames_may_interleave_with_frames_of_other_channels() {
    let (_broker, mut client) = broker_with_channel();
    client.declare_queue(1, "interleaved");
    client.send(&basic_publish(1, "interleaved"));
    client.open_channel(2);
    client.send(&content_header(1, 5));
    client.send(&queue_declare(2, "other", false));
    client.expect_method(2, QUEUE_DECLARE_OK);
    client.send(&content_body(1, b"ab"));
    client.send(&content_body(1, b"cde"));
    assert_eq!(client.get(2, "interleaved"), Some(b"abcde".to_vec()));
}

#[test]
fn content_header_without_basic_publish_is_505_unexpected_frame() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&content_header(1, 3));
    let close = assert_connection_closed_with(&mut client, UNEXPECTED_FRAME);
    assert_eq!(close.text, "UNEXPECTED_FRAME - expected method frame, got non method frame instead", "{close:?}");
}

#[test]
fn content_body_without_basic_publish_is_505_unexpected_frame() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&content_body(1, b"abc"));
    let close = assert_connection_closed_with(&mut client, UNEXPECTED_FRAME);
    assert_eq!(close.text, "UNEXPECTED_FRAME - expected method frame, got non method frame instead", "{close:?}");
}

#[test]
fn content_body_where_the_content_header_is_due_is_505_unexpected_frame() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&basic_publish(1, "q"));
    client.send(&content_body(1, b"abc"));
    let close = assert_connection_closed_with(&mut client, UNEXPECTED_FRAME);
    assert_eq!(
        close.text,
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
    );
}

#[test]
fn method_where_the_content_header_is_due_is_505_unexpected_frame() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&basic_publish(1, "q"));
    client.send(&queue_declare(1, "q", false));
    let close = assert_connection_closed_with(&mut client, UNEXPECTED_FRAME);
    assert_eq!(
        close.text,
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
    );
}

#[test]
fn method_where_a_content_body_is_due_is_505_unexpected_frame() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&basic_publish(1, "q"));
    client.send(&content_header(1, 5));
    client.send(&queue_declare(1, "q", false));
    let close = assert_connection_closed_with(&mut client, UNEXPECTED_FRAME);
    assert_eq!(close.text, "UNEXPECTED_FRAME - expected content body, got non content body frame instead");
}

// RabbitMQ names the method whose content was being assembled (basic.publish) in the close, as
// the spec asks for the method that caused it (rabbit_command_assembler's `unexpected_frame`).
#[test]
fn unexpected_frame_close_names_basic_publish_as_the_failing_method() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&basic_publish(1, "q"));
    client.send(&queue_declare(1, "q", false));
    let close = assert_connection_closed_with(&mut client, UNEXPECTED_FRAME);
    assert_eq!(close.failing, BASIC_PUBLISH, "{close:?}");
}

#[test]
fn content_body_larger_than_the_announced_size_is_501_frame_error() {
    let (_broker, mut client) = broker_with_channel();
    client.declare_queue(1, "sized");
    // Positive control: bodies adding up to the announced size make a message.
    client.send(&basic_publish(1, "sized"));
    client.send(&content_header(1, 5));
    client.send(&content_body(1, b"ab"));
    client.send(&content_body(1, b"cde"));
    assert_eq!(client.get(1, "sized"), Some(b"abcde".to_vec()));
    client.send(&basic_publish(1, "sized"));
    client.send(&content_header(1, 5));
    client.send(&content_body(1, b"abcdefghij"));
    let close = assert_connection_closed_with(&mut client, FRAME_ERROR);
    assert!(close.text.starts_with("FRAME_ERROR - "), "{close:?}");
    assert_eq!(close.failing, BASIC_PUBLISH, "{close:?}");
}

// ---------------------------------------------------------------------------------------------
// Handshake, close, timers (sections 4.2.3, 4.2.7 and connection.tune)
// ---------------------------------------------------------------------------------------------

#[test]
fn tune_ok_with_frame_max_below_4096_is_530_not_allowed() {
    let broker = Broker::start();
    let mut client = Client::connect(broker.amqp_port());
    client.start_and_tune();
    client.send(&tune_ok(Tune { channel_max: 0, frame_max: 1024, heartbeat: 0 }));
    let close = assert_connection_closed_with(&mut client, NOT_ALLOWED);
    assert!(close.text.starts_with("NOT_ALLOWED - ") && close.text.contains("frame_max"), "{close:?}");
}

#[test]
fn client_connection_close_is_answered_with_close_ok_then_the_socket_closes() {
    let (_broker, mut client) = broker_with_channel();
    client.send(&connection_close());
    client.expect_method(0, CONNECTION_CLOSE_OK);
    client.expect_socket_closed();
}

#[test]
fn silent_client_is_closed_after_the_handshake_timeout() {
    let broker = Broker::builder().env("WHARF__AMQP__CONNECT_TIMEOUT_SECS", 1).start();
    // Positive control: a client that finishes the handshake in time is not closed by this timer.
    let finished_at = Instant::now();
    let mut finished = Client::open(&broker);
    // One that sends nothing at all, and one that stops after connection.start.
    let silent_at = Instant::now();
    let mut silent = Client::connect(broker.amqp_port());
    let mut stalled = Client::connect(broker.amqp_port());
    stalled.send(PROTOCOL_HEADER);
    stalled.expect_method(0, CONNECTION_START);
    silent.expect_open_and_silent(Duration::from_millis(500));
    silent.expect_socket_closed();
    let waited = silent_at.elapsed();
    assert!(waited >= Duration::from_secs(1), "closed after {waited:?}, before the 1 s timeout");
    stalled.expect_socket_closed();
    // Well past the timeout (the server checks it once a second).
    sleep(Duration::from_secs(3).saturating_sub(finished_at.elapsed()));
    finished.open_channel(1);
    finished.declare_queue(1, "still-open");
}

#[test]
fn heartbeats_are_sent_and_a_client_silent_for_two_intervals_is_closed() {
    let broker = Broker::builder().env("WHARF__AMQP__HEARTBEAT_SECS", 1).start();
    let mut client = Client::connect(broker.amqp_port());
    let offered = client.handshake(|tune| tune);
    assert_eq!(offered.heartbeat, 1, "connection.tune offers amqp.heartbeat_secs");
    // While the client sends heartbeats, the connection lives and the server's heartbeats arrive.
    let lively_until = Instant::now() + Duration::from_secs(3);
    let mut heartbeats = 0;
    while Instant::now() < lively_until {
        client.send(&heartbeat());
        match client.read_frame(Duration::from_millis(400)) {
            Ok(Frame::Heartbeat { channel: 0 }) => heartbeats += 1,
            Err(ReadError::TimedOut) => {}
            other => panic!("expected heartbeats only, got {other:?}"),
        }
    }
    assert!(heartbeats >= 2, "{heartbeats} heartbeats from the server in 3 s with a 1 s interval");
    client.send(&heartbeat());
    let silent_since = Instant::now();
    client.open_channel(1);
    // Now silent: closed once two intervals pass without a byte from the client.
    let deadline = silent_since + Duration::from_secs(8);
    loop {
        match client.read_frame(deadline.saturating_duration_since(Instant::now())) {
            Ok(Frame::Heartbeat { channel: 0 }) => continue,
            Err(ReadError::Closed) => break,
            other => panic!("expected heartbeats then the socket closing, got {other:?}"),
        }
    }
    let silent_for = silent_since.elapsed();
    assert!(
        silent_for >= Duration::from_secs(2) && silent_for <= Duration::from_secs(6),
        "closed after {silent_for:?} of silence with a 1 s heartbeat"
    );
}

// AMQP 0-9-1 connection.tune-ok: "heartbeat: ... Zero means the client does not want a
// heartbeat." RabbitMQ takes the client's tune-ok value as the interval (rabbit_reader starts its
// heartbeater with it), so 0 turns heartbeats off whatever the server offered.
#[test]
fn tune_ok_heartbeat_zero_turns_heartbeats_off() {
    let broker = Broker::builder().env("WHARF__AMQP__HEARTBEAT_SECS", 1).start();
    let mut client = Client::connect(broker.amqp_port());
    client.handshake(|tune| Tune { heartbeat: 0, ..tune });
    let quiet = Duration::from_millis(3500);
    let read = client.read_frame(quiet);
    assert_eq!(read, Err(ReadError::TimedOut), "expected no frame (not even a heartbeat) for {quiet:?}");
    client.open_channel(1);
}

// ---------------------------------------------------------------------------------------------
// AMQP over TLS
// ---------------------------------------------------------------------------------------------

/// pika over TLS (the harness's self-signed certificate as the only CA, host name checked):
/// declare, publish with confirms, consume and ack, then the queue is empty.
const PIKA_TLS_SCENARIO: &str = r#"
import ssl, sys
import pika

port, cafile = int(sys.argv[1]), sys.argv[2]
context = ssl.create_default_context(cafile=cafile)
parameters = pika.ConnectionParameters(
    host="127.0.0.1", port=port, ssl_options=pika.SSLOptions(context, server_hostname="localhost"),
    socket_timeout=10, blocked_connection_timeout=10)
connection = pika.BlockingConnection(parameters)
channel = connection.channel()
channel.confirm_delivery()
channel.queue_declare(queue="over-tls")
bodies = [f"message {i}".encode() for i in range(20)]
for body in bodies:
    # With confirms on, basic_publish raises unless the broker acks.
    channel.basic_publish(exchange="", routing_key="over-tls", body=body)
received = []
for method, properties, body in channel.consume("over-tls", inactivity_timeout=10):
    if method is None:
        raise SystemExit(f"only {len(received)} of {len(bodies)} messages within 10 s")
    received.append(body)
    channel.basic_ack(method.delivery_tag)
    if len(received) == len(bodies):
        break
channel.cancel()
assert received == bodies, received
count = channel.queue_declare(queue="over-tls", passive=True).method.message_count
assert count == 0, f"{count} messages left after the acks"
connection.close()
print("ok")
"#;

#[test]
fn pika_over_tls_publishes_with_confirms_and_consumes() {
    let broker = Broker::builder().tls().start();
    let port = broker.amqp_tls_port().expect("the AMQP TLS listener");
    let (_, files) = broker.tls().expect("a certificate");
    let mut command = Command::new(python());
    command.arg("-c").arg(PIKA_TLS_SCENARIO).arg(port.to_string()).arg(&files.cert);
    let (status, stdout, stderr) = run_with_timeout(&mut command, Duration::from_secs(60));
    assert!(status.success() && stdout.trim() == "ok", "pika over TLS failed: {status}\n{stdout}{stderr}");
    // The TLS port speaks TLS only: a plain AMQP header gets no connection.start.
    let mut plain = Client::connect(port);
    plain.send(PROTOCOL_HEADER);
    assert!(
        !matches!(plain.read_frame(Duration::from_secs(2)), Ok(Frame::Method { id: CONNECTION_START, .. })),
        "the TLS listener answered plain AMQP"
    );
}
