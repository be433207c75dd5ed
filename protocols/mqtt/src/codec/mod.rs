//! The MQTT wire codec: packet types for MQTT 3.1, 3.1.1 and 5.0, a strict decoder and an encoder.
//! Pure functions over byte buffers; no IO, no broker state.
//!
//! The types are MQTT 5's (a superset): for 3.1 and 3.1.1 the decoder leaves properties empty and
//! the encoder writes none. The decoder rejects every malformed packet the specifications name, and
//! tells *incomplete* (`Ok(None)`: read more bytes) from *malformed* from *too large* (checked from
//! the fixed header, before the body is buffered).
//!
//! Layout: `decode.rs` and `encode.rs` are the entry points and `fixed_header.rs` frames packets;
//! each packet has a file with its `read` and `write` (`pub_response.rs` serves the four
//! acknowledgements, `ping.rs` both pings); `properties.rs` reads and writes MQTT 5 property blocks,
//! `topic.rs` holds the topic name and filter grammar, `wire.rs` the primitives.

use bytes::Bytes;

mod auth;
mod connack;
mod connect;
mod decode;
mod disconnect;
mod encode;
mod fixed_header;
mod ping;
mod properties;
mod pub_response;
mod publish;
mod suback;
mod subscribe;
pub mod topic;
mod unsuback;
mod unsubscribe;
mod wire;

pub use decode::{decode, decode_from_server};
pub use encode::{encode, encoded_len};
pub use properties::PropertyId;

/// The protocol level of a connection (CONNECT's "Protocol Level" byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (protocol name `MQIsdp`, level 3).
    V3_1,
    /// MQTT 3.1.1 (protocol name `MQTT`, level 4).
    V3_1_1,
    /// MQTT 5.0 (protocol name `MQTT`, level 5).
    V5,
}

impl ProtocolVersion {
    /// The "Protocol Level" byte.
    pub fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }

    /// Whether this version carries properties and reason codes (MQTT 5).
    pub fn is_v5(self) -> bool {
        self == Self::V5
    }
}

/// A quality-of-service level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    /// At most once.
    #[default]
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS of a 2-bit value; `None` for 3 (malformed).
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// An MQTT 5 reason code (also the 3.1.1 CONNACK return codes and SUBACK return codes, which use
/// the same byte positions: see the constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReasonCode(pub u8);

#[expect(missing_docs, reason = "the names are the specification's reason code names")]
impl ReasonCode {
    pub const SUCCESS: Self = Self(0x00);
    pub const NORMAL_DISCONNECTION: Self = Self(0x00);
    pub const GRANTED_QOS_0: Self = Self(0x00);
    pub const GRANTED_QOS_1: Self = Self(0x01);
    pub const GRANTED_QOS_2: Self = Self(0x02);
    pub const DISCONNECT_WITH_WILL_MESSAGE: Self = Self(0x04);
    pub const NO_MATCHING_SUBSCRIBERS: Self = Self(0x10);
    pub const NO_SUBSCRIPTION_EXISTED: Self = Self(0x11);
    pub const CONTINUE_AUTHENTICATION: Self = Self(0x18);
    pub const RE_AUTHENTICATE: Self = Self(0x19);
    pub const UNSPECIFIED_ERROR: Self = Self(0x80);
    pub const MALFORMED_PACKET: Self = Self(0x81);
    pub const PROTOCOL_ERROR: Self = Self(0x82);
    pub const IMPLEMENTATION_SPECIFIC_ERROR: Self = Self(0x83);
    pub const UNSUPPORTED_PROTOCOL_VERSION: Self = Self(0x84);
    pub const CLIENT_IDENTIFIER_NOT_VALID: Self = Self(0x85);
    pub const BAD_USER_NAME_OR_PASSWORD: Self = Self(0x86);
    pub const NOT_AUTHORIZED: Self = Self(0x87);
    pub const SERVER_UNAVAILABLE: Self = Self(0x88);
    pub const SERVER_BUSY: Self = Self(0x89);
    pub const BANNED: Self = Self(0x8A);
    pub const SERVER_SHUTTING_DOWN: Self = Self(0x8B);
    pub const BAD_AUTHENTICATION_METHOD: Self = Self(0x8C);
    pub const KEEP_ALIVE_TIMEOUT: Self = Self(0x8D);
    pub const SESSION_TAKEN_OVER: Self = Self(0x8E);
    pub const TOPIC_FILTER_INVALID: Self = Self(0x8F);
    pub const TOPIC_NAME_INVALID: Self = Self(0x90);
    pub const PACKET_IDENTIFIER_IN_USE: Self = Self(0x91);
    pub const PACKET_IDENTIFIER_NOT_FOUND: Self = Self(0x92);
    pub const RECEIVE_MAXIMUM_EXCEEDED: Self = Self(0x93);
    pub const TOPIC_ALIAS_INVALID: Self = Self(0x94);
    pub const PACKET_TOO_LARGE: Self = Self(0x95);
    pub const MESSAGE_RATE_TOO_HIGH: Self = Self(0x96);
    pub const QUOTA_EXCEEDED: Self = Self(0x97);
    pub const ADMINISTRATIVE_ACTION: Self = Self(0x98);
    pub const PAYLOAD_FORMAT_INVALID: Self = Self(0x99);
    pub const RETAIN_NOT_SUPPORTED: Self = Self(0x9A);
    pub const QOS_NOT_SUPPORTED: Self = Self(0x9B);
    pub const USE_ANOTHER_SERVER: Self = Self(0x9C);
    pub const SERVER_MOVED: Self = Self(0x9D);
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: Self = Self(0x9E);
    pub const CONNECTION_RATE_EXCEEDED: Self = Self(0x9F);
    pub const MAXIMUM_CONNECT_TIME: Self = Self(0xA0);
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: Self = Self(0xA1);
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: Self = Self(0xA2);

    /// Whether this is an error (0x80 and above).
    pub fn is_error(self) -> bool {
        self.0 >= 0x80
    }
}

/// MQTT 3.1 / 3.1.1 CONNACK return codes (the "Connect Return code" byte).
pub mod v3_connack {
    /// Connection accepted.
    pub const ACCEPTED: u8 = 0x00;
    /// The server does not support the level of the MQTT protocol requested.
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    /// The client identifier is correct UTF-8 but not allowed by the server.
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    /// The MQTT service is unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    /// The data in the user name or password is malformed.
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x04;
    /// The client is not authorized to connect.
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// A user property (MQTT 5): a name/value pair; order is kept and names may repeat.
pub type UserProperty = (String, String);

/// Every MQTT control packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// CONNECT (client to server).
    Connect(Box<Connect>),
    /// CONNACK (server to client).
    ConnAck(ConnAck),
    /// PUBLISH (both directions).
    Publish(Publish),
    /// PUBACK (QoS 1 acknowledgement).
    PubAck(PubResponse),
    /// PUBREC (QoS 2, part 1).
    PubRec(PubResponse),
    /// PUBREL (QoS 2, part 2).
    PubRel(PubResponse),
    /// PUBCOMP (QoS 2, part 3).
    PubComp(PubResponse),
    /// SUBSCRIBE (client to server).
    Subscribe(Subscribe),
    /// SUBACK (server to client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client to server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server to client).
    UnsubAck(UnsubAck),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (client to server; also server to client in MQTT 5).
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 only).
    Auth(Auth),
}

impl Packet {
    /// The packet type's name, as the specification writes it (for logs and metrics labels).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connect(_) => "CONNECT",
            Self::ConnAck(_) => "CONNACK",
            Self::Publish(_) => "PUBLISH",
            Self::PubAck(_) => "PUBACK",
            Self::PubRec(_) => "PUBREC",
            Self::PubRel(_) => "PUBREL",
            Self::PubComp(_) => "PUBCOMP",
            Self::Subscribe(_) => "SUBSCRIBE",
            Self::SubAck(_) => "SUBACK",
            Self::Unsubscribe(_) => "UNSUBSCRIBE",
            Self::UnsubAck(_) => "UNSUBACK",
            Self::PingReq => "PINGREQ",
            Self::PingResp => "PINGRESP",
            Self::Disconnect(_) => "DISCONNECT",
            Self::Auth(_) => "AUTH",
        }
    }
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Connect {
    /// Protocol level (and name: `MQIsdp` for 3.1, `MQTT` otherwise).
    pub protocol: Option<ProtocolVersion>,
    /// Clean Session (3.1.1) / Clean Start (5).
    pub clean_start: bool,
    /// Keep Alive, seconds (0: off).
    pub keep_alive_secs: u16,
    /// Client Identifier (may be empty).
    pub client_id: String,
    /// The will, when the Will Flag is set.
    pub will: Option<Will>,
    /// User Name.
    pub username: Option<String>,
    /// Password (binary data).
    pub password: Option<Bytes>,
    /// MQTT 5 CONNECT properties.
    pub properties: ConnectProperties,
}

/// MQTT 5 CONNECT properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnectProperties {
    /// Session Expiry Interval (0x11), seconds.
    pub session_expiry_interval_secs: Option<u32>,
    /// Receive Maximum (0x21); never 0.
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size (0x27), bytes; never 0.
    pub maximum_packet_size: Option<u32>,
    /// Topic Alias Maximum (0x22).
    pub topic_alias_maximum: Option<u16>,
    /// Request Response Information (0x19): 0 or 1.
    pub request_response_information: Option<bool>,
    /// Request Problem Information (0x17): 0 or 1.
    pub request_problem_information: Option<bool>,
    /// User Property (0x26), in order.
    pub user_properties: Vec<UserProperty>,
    /// Authentication Method (0x15).
    pub authentication_method: Option<String>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Will {
    /// Will Topic.
    pub topic: String,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// MQTT 5 will properties.
    pub properties: WillProperties,
}

/// MQTT 5 will properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WillProperties {
    /// Will Delay Interval (0x18), seconds.
    pub will_delay_interval_secs: Option<u32>,
    /// Payload Format Indicator (0x01): 0 bytes, 1 UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval (0x02), seconds.
    pub message_expiry_interval_secs: Option<u32>,
    /// Content Type (0x03).
    pub content_type: Option<String>,
    /// Response Topic (0x08).
    pub response_topic: Option<String>,
    /// Correlation Data (0x09).
    pub correlation_data: Option<Bytes>,
    /// User Property (0x26), in order.
    pub user_properties: Vec<UserProperty>,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnAck {
    /// Session Present.
    pub session_present: bool,
    /// The reason code (MQTT 5) or the return code (3.1, 3.1.1: see [`v3_connack`]).
    pub reason_code: ReasonCode,
    /// MQTT 5 CONNACK properties.
    pub properties: ConnAckProperties,
}

/// MQTT 5 CONNACK properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConnAckProperties {
    /// Session Expiry Interval (0x11), seconds.
    pub session_expiry_interval_secs: Option<u32>,
    /// Receive Maximum (0x21).
    pub receive_maximum: Option<u16>,
    /// Maximum QoS (0x24): 0 or 1 (absent means 2).
    pub maximum_qos: Option<u8>,
    /// Retain Available (0x25).
    pub retain_available: Option<bool>,
    /// Maximum Packet Size (0x27), bytes.
    pub maximum_packet_size: Option<u32>,
    /// Assigned Client Identifier (0x12).
    pub assigned_client_identifier: Option<String>,
    /// Topic Alias Maximum (0x22).
    pub topic_alias_maximum: Option<u16>,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
    /// Wildcard Subscription Available (0x28).
    pub wildcard_subscription_available: Option<bool>,
    /// Subscription Identifiers Available (0x29).
    pub subscription_identifiers_available: Option<bool>,
    /// Shared Subscription Available (0x2A).
    pub shared_subscription_available: Option<bool>,
    /// Server Keep Alive (0x13), seconds.
    pub server_keep_alive_secs: Option<u16>,
    /// Response Information (0x1A).
    pub response_information: Option<String>,
    /// Server Reference (0x1C).
    pub server_reference: Option<String>,
    /// Authentication Method (0x15).
    pub authentication_method: Option<String>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Publish {
    /// DUP flag (never set with QoS 0: the decoder refuses it).
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic Name (may be empty in MQTT 5 when a Topic Alias is given). Never contains wildcards.
    pub topic: String,
    /// Packet Identifier: present (and non-zero) exactly when QoS > 0.
    pub packet_id: Option<u16>,
    /// MQTT 5 PUBLISH properties.
    pub properties: PublishProperties,
    /// Payload.
    pub payload: Bytes,
}

/// MQTT 5 PUBLISH properties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublishProperties {
    /// Payload Format Indicator (0x01): 0 bytes, 1 UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval (0x02), seconds.
    pub message_expiry_interval_secs: Option<u32>,
    /// Topic Alias (0x23); never 0.
    pub topic_alias: Option<u16>,
    /// Response Topic (0x08); never contains wildcards.
    pub response_topic: Option<String>,
    /// Correlation Data (0x09).
    pub correlation_data: Option<Bytes>,
    /// User Property (0x26), in order.
    pub user_properties: Vec<UserProperty>,
    /// Subscription Identifier (0x0B), server to client only; may repeat; never 0.
    pub subscription_identifiers: Vec<u32>,
    /// Content Type (0x03).
    pub content_type: Option<String>,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP: a packet identifier, and in MQTT 5 a reason code and
/// properties (both omitted on the wire when the code is 0 and there are no properties).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PubResponse {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// Reason code (MQTT 5; 0 for 3.1.1).
    pub reason_code: ReasonCode,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
}

/// Subscription options of one topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local (MQTT 5): never receive one's own publications.
    pub no_local: bool,
    /// Retain As Published (MQTT 5).
    pub retain_as_published: bool,
    /// Retain Handling (MQTT 5): 0 send retained on subscribe, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Subscribe {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// Subscription Identifier (0x0B), 1..=268_435_455.
    pub subscription_identifier: Option<u32>,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
    /// Topic filters (at least one), each valid (wildcards well placed, shared form well formed).
    pub filters: Vec<(String, SubscriptionOptions)>,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubAck {
    /// Packet Identifier.
    pub packet_id: u16,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
    /// One per filter: granted QoS (0, 1, 2) or a failure (0x80 and up; 3.1.1 has only 0x80).
    pub reason_codes: Vec<ReasonCode>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Unsubscribe {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
    /// Topic filters (at least one).
    pub filters: Vec<String>,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UnsubAck {
    /// Packet Identifier.
    pub packet_id: u16,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
    /// One per filter (MQTT 5 only; 3.1.1 UNSUBACK has no payload).
    pub reason_codes: Vec<ReasonCode>,
}

/// DISCONNECT.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Disconnect {
    /// Reason code (MQTT 5).
    pub reason_code: ReasonCode,
    /// Session Expiry Interval (0x11), seconds (client to server only).
    pub session_expiry_interval_secs: Option<u32>,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
    /// Server Reference (0x1C), server to client only.
    pub server_reference: Option<String>,
}

/// AUTH (MQTT 5).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Auth {
    /// Reason code (0x00, 0x18, 0x19).
    pub reason_code: ReasonCode,
    /// Authentication Method (0x15).
    pub authentication_method: Option<String>,
    /// Authentication Data (0x16).
    pub authentication_data: Option<Bytes>,
    /// Reason String (0x1F).
    pub reason_string: Option<String>,
    /// User Property (0x26).
    pub user_properties: Vec<UserProperty>,
}

/// Why bytes could not be decoded. ("Need more bytes" is not an error: `decode` returns `Ok(None)`.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The packet is longer than the allowed maximum (known from the fixed header, before the
    /// body is read). MQTT 5: 0x95 Packet too large.
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The packet's full size, bytes.
        size: u64,
        /// The maximum, bytes.
        max: u64,
    },
    /// The bytes break the packet's grammar. MQTT 5: 0x81 Malformed Packet.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// Well-formed bytes that break a protocol rule. MQTT 5: 0x82 Protocol Error.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A PUBLISH or will topic name that is not allowed: a wildcard, or empty where no Topic Alias
    /// can stand for it. (U+0000 and ill-formed UTF-8 are `Malformed`, as [MQTT-1.5.4-2] says.)
    /// MQTT 5: 0x90.
    #[error("topic name invalid: {0}")]
    TopicNameInvalid(String),
    /// A SUBSCRIBE/UNSUBSCRIBE topic filter that is malformed (`a/b#`, `+a`, empty, bad `$share`).
    /// MQTT 5: 0x8F is the SUBACK code for a well-formed filter the server refuses; a filter that
    /// breaks the grammar ([MQTT-4.7.1-2], [MQTT-4.7.1-3], [MQTT-4.7.3-1], [MQTT-4.8.2-1],
    /// [MQTT-4.8.2-2]) makes the packet malformed (0x81), which is this variant's `reason_code`, for
    /// DISCONNECT.
    #[error("topic filter invalid: {0}")]
    TopicFilterInvalid(String),
    /// A Topic Alias of 0 [MQTT-3.3.2-8] (an alias above the maximum is the server's check, as
    /// only it knows the maximum). MQTT 5: DISCONNECT 0x94 Topic Alias invalid.
    #[error("topic alias invalid: {0}")]
    TopicAliasInvalid(String),
    /// CONNECT whose protocol name is neither `MQTT` nor `MQIsdp`: the server closes the connection
    /// without a CONNACK [MQTT-3.1.2-1] (it cannot know which protocol's CONNACK to send).
    #[error("unknown protocol name {0:?}")]
    UnknownProtocolName(String),
    /// CONNECT with a known protocol name and a level this server does not speak. 3.1.1: CONNACK 0x01;
    /// MQTT 5: CONNACK 0x84.
    #[error("unsupported protocol: name {name:?}, level {level}")]
    UnsupportedProtocolVersion {
        /// The protocol name read.
        name: String,
        /// The protocol level read.
        level: u8,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code to send in CONNACK or DISCONNECT for this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::TooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            Self::Malformed(_) | Self::TopicFilterInvalid(_) => ReasonCode::MALFORMED_PACKET,
            Self::Protocol(_) | Self::UnknownProtocolName(_) => ReasonCode::PROTOCOL_ERROR,
            Self::TopicAliasInvalid(_) => ReasonCode::TOPIC_ALIAS_INVALID,
            Self::TopicNameInvalid(_) => ReasonCode::TOPIC_NAME_INVALID,
            Self::UnsupportedProtocolVersion { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}
