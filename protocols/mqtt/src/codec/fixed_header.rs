//! The fixed header: packet type and flags (byte 1) and the Remaining Length. Everything checked
//! here is checked before the body is buffered: the packet type against the version and the
//! direction, the flags, the Remaining Length's encoding, and the size limit. Touches nothing outside
//! the codec.

use super::wire::{malformed, parse_variable_byte_integer, protocol, variable_byte_integer_len};
use super::{DecodeError, Packet, ProtocolVersion, QoS};

/// Who sent the bytes being decoded. It decides which packet types, reason codes and properties are
/// acceptable: a server decodes what clients send, a client what servers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sender {
    Client,
    Server,
}

/// The control packet types (MQTT 5.0 section 2.1.2; 0 is reserved, and 15 is reserved in 3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Connect,
            2 => Self::ConnAck,
            3 => Self::Publish,
            4 => Self::PubAck,
            5 => Self::PubRec,
            6 => Self::PubRel,
            7 => Self::PubComp,
            8 => Self::Subscribe,
            9 => Self::SubAck,
            10 => Self::Unsubscribe,
            11 => Self::UnsubAck,
            12 => Self::PingReq,
            13 => Self::PingResp,
            14 => Self::Disconnect,
            15 => Self::Auth,
            _ => return None,
        })
    }

    pub(crate) fn of(packet: &Packet) -> Self {
        match packet {
            Packet::Connect(_) => Self::Connect,
            Packet::ConnAck(_) => Self::ConnAck,
            Packet::Publish(_) => Self::Publish,
            Packet::PubAck(_) => Self::PubAck,
            Packet::PubRec(_) => Self::PubRec,
            Packet::PubRel(_) => Self::PubRel,
            Packet::PubComp(_) => Self::PubComp,
            Packet::Subscribe(_) => Self::Subscribe,
            Packet::SubAck(_) => Self::SubAck,
            Packet::Unsubscribe(_) => Self::Unsubscribe,
            Packet::UnsubAck(_) => Self::UnsubAck,
            Packet::PingReq => Self::PingReq,
            Packet::PingResp => Self::PingResp,
            Packet::Disconnect(_) => Self::Disconnect,
            Packet::Auth(_) => Self::Auth,
        }
    }

    /// The specification's name, for error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::ConnAck => "CONNACK",
            Self::Publish => "PUBLISH",
            Self::PubAck => "PUBACK",
            Self::PubRec => "PUBREC",
            Self::PubRel => "PUBREL",
            Self::PubComp => "PUBCOMP",
            Self::Subscribe => "SUBSCRIBE",
            Self::SubAck => "SUBACK",
            Self::Unsubscribe => "UNSUBSCRIBE",
            Self::UnsubAck => "UNSUBACK",
            Self::PingReq => "PINGREQ",
            Self::PingResp => "PINGRESP",
            Self::Disconnect => "DISCONNECT",
            Self::Auth => "AUTH",
        }
    }

    /// Whether `sender` may send this packet type in `version`.
    fn may_be_sent_by(self, sender: Sender, version: ProtocolVersion) -> bool {
        match self {
            Self::Connect | Self::Subscribe | Self::Unsubscribe | Self::PingReq => sender == Sender::Client,
            Self::ConnAck | Self::SubAck | Self::UnsubAck | Self::PingResp => sender == Sender::Server,
            Self::Publish | Self::PubAck | Self::PubRec | Self::PubRel | Self::PubComp | Self::Auth => true,
            // A server sends DISCONNECT only from MQTT 5 on; in 3.1.1 it just closes the connection.
            Self::Disconnect => sender == Sender::Client || version.is_v5(),
        }
    }

    /// The fixed flags of every type but PUBLISH (whose flags carry DUP, QoS and RETAIN).
    fn required_flags(self) -> u8 {
        match self {
            Self::PubRel | Self::Subscribe | Self::Unsubscribe => 0b0010,
            _ => 0b0000,
        }
    }
}

/// A parsed fixed header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FixedHeader {
    pub(crate) packet_type: PacketType,
    /// The low four bits of byte 1.
    pub(crate) flags: u8,
    /// Byte 1 plus the Remaining Length's bytes.
    pub(crate) header_len: usize,
    pub(crate) remaining_len: u32,
    /// Whether the Remaining Length used its shortest encoding (MQTT 5 requires it, [MQTT-1.5.5-1];
    /// kept so a CONNECT read before the version is known can be checked once it is).
    pub(crate) remaining_len_minimal: bool,
}

impl FixedHeader {
    /// The whole packet's size, bytes.
    pub(crate) fn frame_len(&self) -> usize {
        // A Remaining Length is at most 268,435,455: it fits a usize on every target with an MQTT
        // server, and saturating keeps a 16-bit target from wrapping.
        self.header_len.saturating_add(usize::try_from(self.remaining_len).unwrap_or(usize::MAX))
    }
}

/// Parses the fixed header at the start of `buf`: `Ok(None)` when more bytes are needed for it.
///
/// `version` is `None` before CONNECT (only CONNECT is acceptable then). Checks, in order: packet
/// type 0 (and 15 before MQTT 5) is malformed; before CONNECT anything else is a Protocol Error
/// [MQTT-3.1.0-1]; a type `sender` may not send is a Protocol Error; fixed-header flags other than the
/// required ones are malformed ([MQTT-2.2.2-2] in 3.1.1, [MQTT-2.1.3-1] in 5.0), with PUBLISH QoS 3
/// ([MQTT-3.3.1-4]) and DUP set on QoS 0 ([MQTT-3.3.1-2]); then the Remaining Length (at most four
/// bytes, shortest form in MQTT 5); then the whole size against `packet_size_max_bytes`.
pub(crate) fn parse(
    buf: &[u8],
    version: Option<ProtocolVersion>,
    sender: Sender,
    packet_size_max_bytes: u32,
) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let code = first >> 4;
    let flags = first & 0x0F;
    let Some(packet_type) = PacketType::from_code(code) else {
        return Err(malformed("packet type 0 is reserved (section 2.1.2)"));
    };
    let Some(version) = version else {
        if packet_type != PacketType::Connect {
            return Err(protocol(format!(
                "[MQTT-3.1.0-1] the first packet must be CONNECT, got {}",
                packet_type.name()
            )));
        }
        check_flags(packet_type, flags, None)?;
        return remaining_length(buf, packet_type, flags, None, packet_size_max_bytes);
    };
    if packet_type == PacketType::Auth && !version.is_v5() {
        return Err(malformed("packet type 15 is reserved before MQTT 5 (3.1.1 section 2.2.1)"));
    }
    if !packet_type.may_be_sent_by(sender, version) {
        let sender = match sender {
            Sender::Client => "a client",
            Sender::Server => "a server",
        };
        return Err(protocol(format!("{} may not be sent by {sender}", packet_type.name())));
    }
    check_flags(packet_type, flags, Some(version))?;
    remaining_length(buf, packet_type, flags, Some(version), packet_size_max_bytes)
}

fn check_flags(packet_type: PacketType, flags: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    let rule = if version == Some(ProtocolVersion::V5) { "[MQTT-2.1.3-1]" } else { "[MQTT-2.2.2-2]" };
    if packet_type == PacketType::Publish {
        let qos_bits = (flags >> 1) & 0b11;
        let Some(qos) = QoS::from_bits(qos_bits) else {
            return Err(malformed("[MQTT-3.3.1-4] PUBLISH with both QoS bits set"));
        };
        if qos == QoS::AtMostOnce && flags & 0b1000 != 0 {
            return Err(malformed("[MQTT-3.3.1-2] PUBLISH with DUP set on QoS 0"));
        }
        return Ok(());
    }
    let required = packet_type.required_flags();
    // MQTT 3.1 sent PUBREL, SUBSCRIBE and UNSUBSCRIBE "at QoS 1" and set DUP on their retries;
    // 3.1.1 made the flags fixed. Accepting DUP there keeps 3.1 clients working.
    let tolerated_dup = version == Some(ProtocolVersion::V3_1) && required == 0b0010 && flags == 0b1010;
    if flags != required && !tolerated_dup {
        return Err(malformed(format!(
            "{rule} {} fixed header flags must be 0b{required:04b}, got 0b{flags:04b}",
            packet_type.name()
        )));
    }
    Ok(())
}

fn remaining_length(
    buf: &[u8],
    packet_type: PacketType,
    flags: u8,
    version: Option<ProtocolVersion>,
    packet_size_max_bytes: u32,
) -> Result<Option<FixedHeader>, DecodeError> {
    let Some((remaining_len, len)) = parse_variable_byte_integer(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let remaining_len_minimal = len == variable_byte_integer_len(remaining_len);
    if version == Some(ProtocolVersion::V5) && !remaining_len_minimal {
        return Err(malformed("[MQTT-1.5.5-1] Remaining Length not in its shortest form"));
    }
    let header_len = 1 + len;
    let size = header_len as u64 + u64::from(remaining_len);
    if size > u64::from(packet_size_max_bytes) {
        return Err(DecodeError::TooLarge { size, max: u64::from(packet_size_max_bytes) });
    }
    Ok(Some(FixedHeader { packet_type, flags, header_len, remaining_len, remaining_len_minimal }))
}

/// Byte 1 of `packet`'s fixed header.
pub(crate) fn first_byte(packet: &Packet) -> u8 {
    let packet_type = PacketType::of(packet);
    let flags = match packet {
        Packet::Publish(publish) => {
            // DUP is meaningless on QoS 0 and the receiver must refuse it [MQTT-3.3.1-2], so it is
            // never written there.
            let dup = publish.dup && publish.qos != QoS::AtMostOnce;
            (u8::from(dup) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain)
        }
        _ => packet_type.required_flags(),
    };
    ((packet_type as u8) << 4) | flags
}
