//! MQTT 5 properties: their identifiers, the one property-block reader every packet uses (with the
//! rules that hold for a property wherever it appears: no duplicates, value ranges) and the writers.
//! Each packet file says which identifiers it allows and moves the values into its own struct.
//! Touches nothing outside the codec.

use bytes::Bytes;

use super::topic;
use super::wire::{Reader, Sink, malformed, protocol};
use super::{DecodeError, UserProperty};

/// An MQTT 5 property identifier (section 2.2.2.2). All are one byte long in MQTT 5.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[expect(missing_docs, reason = "the names are the specification's property names")]
pub enum PropertyId {
    PayloadFormatIndicator = 0x01,
    MessageExpiryInterval = 0x02,
    ContentType = 0x03,
    ResponseTopic = 0x08,
    CorrelationData = 0x09,
    SubscriptionIdentifier = 0x0B,
    SessionExpiryInterval = 0x11,
    AssignedClientIdentifier = 0x12,
    ServerKeepAlive = 0x13,
    AuthenticationMethod = 0x15,
    AuthenticationData = 0x16,
    RequestProblemInformation = 0x17,
    WillDelayInterval = 0x18,
    RequestResponseInformation = 0x19,
    ResponseInformation = 0x1A,
    ServerReference = 0x1C,
    ReasonString = 0x1F,
    ReceiveMaximum = 0x21,
    TopicAliasMaximum = 0x22,
    TopicAlias = 0x23,
    MaximumQos = 0x24,
    RetainAvailable = 0x25,
    UserProperty = 0x26,
    MaximumPacketSize = 0x27,
    WildcardSubscriptionAvailable = 0x28,
    SubscriptionIdentifierAvailable = 0x29,
    SharedSubscriptionAvailable = 0x2A,
}

impl PropertyId {
    /// The identifier of a byte; `None` for a byte no property uses (a Malformed Packet).
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::PayloadFormatIndicator,
            0x02 => Self::MessageExpiryInterval,
            0x03 => Self::ContentType,
            0x08 => Self::ResponseTopic,
            0x09 => Self::CorrelationData,
            0x0B => Self::SubscriptionIdentifier,
            0x11 => Self::SessionExpiryInterval,
            0x12 => Self::AssignedClientIdentifier,
            0x13 => Self::ServerKeepAlive,
            0x15 => Self::AuthenticationMethod,
            0x16 => Self::AuthenticationData,
            0x17 => Self::RequestProblemInformation,
            0x18 => Self::WillDelayInterval,
            0x19 => Self::RequestResponseInformation,
            0x1A => Self::ResponseInformation,
            0x1C => Self::ServerReference,
            0x1F => Self::ReasonString,
            0x21 => Self::ReceiveMaximum,
            0x22 => Self::TopicAliasMaximum,
            0x23 => Self::TopicAlias,
            0x24 => Self::MaximumQos,
            0x25 => Self::RetainAvailable,
            0x26 => Self::UserProperty,
            0x27 => Self::MaximumPacketSize,
            0x28 => Self::WildcardSubscriptionAvailable,
            0x29 => Self::SubscriptionIdentifierAvailable,
            0x2A => Self::SharedSubscriptionAvailable,
            _ => return None,
        })
    }

    /// The identifier byte.
    pub fn byte(self) -> u8 {
        self as u8
    }
}

/// Every property a block may hold, as read; each packet moves out the ones it allows (the reader
/// refused the others).
#[derive(Debug, Default)]
pub(crate) struct PropertySet {
    pub(crate) payload_format_indicator: Option<u8>,
    pub(crate) message_expiry_interval_secs: Option<u32>,
    pub(crate) content_type: Option<String>,
    pub(crate) response_topic: Option<String>,
    pub(crate) correlation_data: Option<Bytes>,
    pub(crate) subscription_identifiers: Vec<u32>,
    pub(crate) session_expiry_interval_secs: Option<u32>,
    pub(crate) assigned_client_identifier: Option<String>,
    pub(crate) server_keep_alive_secs: Option<u16>,
    pub(crate) authentication_method: Option<String>,
    pub(crate) authentication_data: Option<Bytes>,
    pub(crate) request_problem_information: Option<bool>,
    pub(crate) will_delay_interval_secs: Option<u32>,
    pub(crate) request_response_information: Option<bool>,
    pub(crate) response_information: Option<String>,
    pub(crate) server_reference: Option<String>,
    pub(crate) reason_string: Option<String>,
    pub(crate) receive_maximum: Option<u16>,
    pub(crate) topic_alias_maximum: Option<u16>,
    pub(crate) topic_alias: Option<u16>,
    pub(crate) maximum_qos: Option<u8>,
    pub(crate) retain_available: Option<bool>,
    pub(crate) user_properties: Vec<UserProperty>,
    pub(crate) maximum_packet_size: Option<u32>,
    pub(crate) wildcard_subscription_available: Option<bool>,
    pub(crate) subscription_identifiers_available: Option<bool>,
    pub(crate) shared_subscription_available: Option<bool>,
}

/// Whether a Subscription Identifier may appear more than once: only in a PUBLISH a server sends
/// (one per matching subscription, [MQTT-3.3.4-4]); everywhere else a repeat is a Protocol Error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubscriptionIdentifiers {
    AtMostOne,
    Repeatable,
}

/// Reads a property block: its length, then properties until exactly that many bytes are used.
///
/// Which error for which rule, following the specification's wording and its definitions (a
/// Malformed Packet "cannot be parsed", a Protocol Error is parsed data the protocol does not allow):
/// - an identifier no property has, a length running past the packet, a value running past the
///   block: Malformed (0x81);
/// - a known property this packet does not allow, a repeat ("It is a Protocol Error to include ...
///   more than once"), a value out of range (0 for Receive Maximum, Maximum Packet Size, Topic Alias
///   and Subscription Identifier; above 1 for the boolean bytes, Payload Format Indicator and
///   Maximum QoS), a Response Topic with wildcards: Protocol Error (0x82).
pub(crate) fn read(
    reader: &mut Reader,
    packet: &str,
    allowed: &[PropertyId],
    subscription_identifiers: SubscriptionIdentifiers,
) -> Result<PropertySet, DecodeError> {
    let len = reader.variable_byte_integer(&format!("{packet} property length"))?;
    let mut block = reader.sub_reader(len, &format!("{packet} properties"))?;
    let mut set = PropertySet::default();
    while !block.is_empty() {
        let byte = block.u8("property identifier")?;
        let id = PropertyId::from_byte(byte)
            .ok_or_else(|| malformed(format!("{packet}: unknown property identifier 0x{byte:02X}")))?;
        if !allowed.contains(&id) {
            return Err(protocol(format!("{packet}: property {id:?} is not allowed in this packet")));
        }
        let what = format!("{packet} property {id:?}");
        let what = what.as_str();
        match id {
            PropertyId::PayloadFormatIndicator => {
                let value = block.u8(what)?;
                if value > 1 {
                    return Err(protocol(format!("{what}: {value} is neither 0 nor 1")));
                }
                set_once(&mut set.payload_format_indicator, value, what)?;
            }
            PropertyId::MessageExpiryInterval => {
                set_once(&mut set.message_expiry_interval_secs, block.u32(what)?, what)?
            }
            PropertyId::ContentType => set_once(&mut set.content_type, block.string(what)?, what)?,
            PropertyId::ResponseTopic => {
                let value = block.string(what)?;
                // [MQTT-3.3.2-14]: a Response Topic is a Topic Name, so no wildcards (and not empty).
                if let Err(why) = topic::check_topic_name(&value) {
                    return Err(protocol(format!("[MQTT-3.3.2-14] {what}: {why}")));
                }
                set_once(&mut set.response_topic, value, what)?;
            }
            PropertyId::CorrelationData => set_once(&mut set.correlation_data, block.binary(what)?, what)?,
            PropertyId::SubscriptionIdentifier => {
                let value = block.variable_byte_integer(what)?;
                if value == 0 {
                    return Err(protocol(format!("{what}: 0 is not allowed")));
                }
                if subscription_identifiers == SubscriptionIdentifiers::AtMostOne
                    && !set.subscription_identifiers.is_empty()
                {
                    return Err(protocol(format!("{what}: included more than once")));
                }
                set.subscription_identifiers.push(value);
            }
            PropertyId::SessionExpiryInterval => {
                set_once(&mut set.session_expiry_interval_secs, block.u32(what)?, what)?
            }
            PropertyId::AssignedClientIdentifier => {
                set_once(&mut set.assigned_client_identifier, block.string(what)?, what)?;
            }
            PropertyId::ServerKeepAlive => set_once(&mut set.server_keep_alive_secs, block.u16(what)?, what)?,
            PropertyId::AuthenticationMethod => set_once(&mut set.authentication_method, block.string(what)?, what)?,
            PropertyId::AuthenticationData => set_once(&mut set.authentication_data, block.binary(what)?, what)?,
            PropertyId::RequestProblemInformation => {
                set_once(&mut set.request_problem_information, boolean(block.u8(what)?, what)?, what)?;
            }
            PropertyId::WillDelayInterval => set_once(&mut set.will_delay_interval_secs, block.u32(what)?, what)?,
            PropertyId::RequestResponseInformation => {
                set_once(&mut set.request_response_information, boolean(block.u8(what)?, what)?, what)?;
            }
            PropertyId::ResponseInformation => set_once(&mut set.response_information, block.string(what)?, what)?,
            PropertyId::ServerReference => set_once(&mut set.server_reference, block.string(what)?, what)?,
            PropertyId::ReasonString => set_once(&mut set.reason_string, block.string(what)?, what)?,
            PropertyId::ReceiveMaximum => {
                set_once(&mut set.receive_maximum, non_zero_u16(block.u16(what)?, what)?, what)?
            }
            PropertyId::TopicAliasMaximum => set_once(&mut set.topic_alias_maximum, block.u16(what)?, what)?,
            PropertyId::TopicAlias => {
                // [MQTT-3.3.2-8]: a Topic Alias of 0 is not permitted (DISCONNECT 0x94).
                let alias = block.u16(what)?;
                if alias == 0 {
                    return Err(DecodeError::TopicAliasInvalid(format!("[MQTT-3.3.2-8] {what}: 0 is not allowed")));
                }
                set_once(&mut set.topic_alias, alias, what)?;
            }
            PropertyId::MaximumQos => {
                let value = block.u8(what)?;
                if value > 1 {
                    return Err(protocol(format!("{what}: {value} is neither 0 nor 1")));
                }
                set_once(&mut set.maximum_qos, value, what)?;
            }
            PropertyId::RetainAvailable => set_once(&mut set.retain_available, boolean(block.u8(what)?, what)?, what)?,
            PropertyId::UserProperty => {
                let name = block.string(what)?;
                let value = block.string(what)?;
                set.user_properties.push((name, value));
            }
            PropertyId::MaximumPacketSize => {
                let value = block.u32(what)?;
                if value == 0 {
                    return Err(protocol(format!("{what}: 0 is not allowed")));
                }
                set_once(&mut set.maximum_packet_size, value, what)?;
            }
            PropertyId::WildcardSubscriptionAvailable => {
                set_once(&mut set.wildcard_subscription_available, boolean(block.u8(what)?, what)?, what)?;
            }
            PropertyId::SubscriptionIdentifierAvailable => {
                set_once(&mut set.subscription_identifiers_available, boolean(block.u8(what)?, what)?, what)?;
            }
            PropertyId::SharedSubscriptionAvailable => {
                set_once(&mut set.shared_subscription_available, boolean(block.u8(what)?, what)?, what)?;
            }
        }
    }
    Ok(set)
}

fn set_once<T>(slot: &mut Option<T>, value: T, what: &str) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(protocol(format!("{what}: included more than once")));
    }
    *slot = Some(value);
    Ok(())
}

fn boolean(value: u8, what: &str) -> Result<bool, DecodeError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(protocol(format!("{what}: {value} is neither 0 nor 1"))),
    }
}

fn non_zero_u16(value: u16, what: &str) -> Result<u16, DecodeError> {
    if value == 0 {
        return Err(protocol(format!("{what}: 0 is not allowed")));
    }
    Ok(value)
}

// Writers: each writes nothing for an absent property, so a packet's property writer is a list of
// calls in the order of its struct's fields.

pub(crate) fn write_byte(sink: &mut dyn Sink, id: PropertyId, value: Option<u8>) {
    if let Some(value) = value {
        sink.write_u8(id.byte());
        sink.write_u8(value);
    }
}

pub(crate) fn write_bool(sink: &mut dyn Sink, id: PropertyId, value: Option<bool>) {
    write_byte(sink, id, value.map(u8::from));
}

pub(crate) fn write_u16(sink: &mut dyn Sink, id: PropertyId, value: Option<u16>) {
    if let Some(value) = value {
        sink.write_u8(id.byte());
        sink.write_u16(value);
    }
}

pub(crate) fn write_u32(sink: &mut dyn Sink, id: PropertyId, value: Option<u32>) {
    if let Some(value) = value {
        sink.write_u8(id.byte());
        sink.write_u32(value);
    }
}

pub(crate) fn write_variable_byte_integer(sink: &mut dyn Sink, id: PropertyId, value: u32) {
    sink.write_u8(id.byte());
    sink.write_variable_byte_integer(value);
}

pub(crate) fn write_string(sink: &mut dyn Sink, id: PropertyId, value: Option<&str>) {
    if let Some(value) = value {
        sink.write_u8(id.byte());
        sink.write_string(value);
    }
}

pub(crate) fn write_binary(sink: &mut dyn Sink, id: PropertyId, value: Option<&[u8]>) {
    if let Some(value) = value {
        sink.write_u8(id.byte());
        sink.write_binary(value);
    }
}

pub(crate) fn write_user_properties(sink: &mut dyn Sink, user_properties: &[UserProperty]) {
    for (name, value) in user_properties {
        sink.write_u8(PropertyId::UserProperty.byte());
        sink.write_string(name);
        sink.write_string(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_identifier_round_trips_through_its_byte() {
        for byte in 0..=u8::MAX {
            if let Some(id) = PropertyId::from_byte(byte) {
                assert_eq!(id.byte(), byte);
            }
        }
    }

    fn read_block(bytes: &'static [u8], allowed: &[PropertyId]) -> Result<PropertySet, DecodeError> {
        let mut reader = Reader::new(Bytes::from_static(bytes), true);
        read(&mut reader, "TEST", allowed, SubscriptionIdentifiers::AtMostOne)
    }

    #[test]
    fn user_properties_repeat_in_order() {
        let set =
            read_block(&[12, 0x26, 0, 1, b'a', 0, 1, b'b', 0x26, 0, 0, 0, 0], &[PropertyId::UserProperty]).unwrap();
        assert_eq!(set.user_properties, vec![("a".into(), "b".into()), (String::new(), String::new())]);
    }

    #[test]
    fn block_length_must_match_its_properties() {
        // The length says 2 but the Receive Maximum needs 3 bytes.
        assert!(matches!(read_block(&[2, 0x21, 0, 1], &[PropertyId::ReceiveMaximum]), Err(DecodeError::Malformed(_))));
        // The length runs past the packet.
        assert!(matches!(read_block(&[9, 0x21, 0, 1], &[PropertyId::ReceiveMaximum]), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn unknown_identifier_is_malformed_and_misplaced_one_a_protocol_error() {
        assert!(matches!(read_block(&[2, 0x04, 0], &[]), Err(DecodeError::Malformed(_))));
        assert!(matches!(read_block(&[3, 0x21, 0, 1], &[]), Err(DecodeError::Protocol(_))));
    }
}
