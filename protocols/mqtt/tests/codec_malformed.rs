//! Raw-byte tests of the decoder's validation: one test per rule and version, each asserting the
//! exact error variant and the MQTT 5 reason code it maps to. The prefix is the version (`mqtt_`
//! for 3.1.1, `mqtt5_` for 5.0, `mqtt31_` for 3.1); a number after it is the normative statement
//! the test checks (`mqtt5_3_1_2_3_...` checks [MQTT-3.1.2-3] of 5.0), and rules the specification
//! states without a number get a descriptive name only.
//! Also the few "this must still decode" cases next to the rules they border. Touches only the
//! codec's public API.

use bytes::BytesMut;
use wharf_mqtt::codec::{
    Auth, DecodeError, Disconnect, Packet, ProtocolVersion, PubResponse, QoS, ReasonCode, decode, decode_from_server,
};

const V31: ProtocolVersion = ProtocolVersion::V3_1;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

const MAX_BYTES: u32 = 1 << 20;

// ----- byte builders -------------------------------------------------------------------------------

fn variable_byte_integer(mut value: usize) -> Vec<u8> {
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

/// A whole packet: byte 1, the Remaining Length, the body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(variable_byte_integer(body.len()));
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string or binary field.
fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn text(value: &str) -> Vec<u8> {
    field(value.as_bytes())
}

/// An MQTT 5 property block: its length, then the properties.
fn properties(bytes: &[u8]) -> Vec<u8> {
    let mut out = variable_byte_integer(bytes.len());
    out.extend_from_slice(bytes);
    out
}

/// A 3.1.1 CONNECT with `flags`, keep alive 60, and `payload` after the variable header.
fn connect_v311(flags: u8, payload: &[u8]) -> Vec<u8> {
    connect_with("MQTT", 4, flags, None, payload)
}

/// An MQTT 5 CONNECT with `flags`, the CONNECT property block `props`, then `payload`.
fn connect_v5(flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
    connect_with("MQTT", 5, flags, Some(props), payload)
}

fn connect_with(name: &str, level: u8, flags: u8, props: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    let mut body = text(name);
    body.extend([level, flags, 0, 60]);
    if let Some(props) = props {
        body.extend(properties(props));
    }
    body.extend_from_slice(payload);
    frame(0x10, &body)
}

/// A PUBLISH with byte 1 `first`, `topic`, an optional packet identifier, MQTT 5 properties when
/// `props` is given, and `payload`.
fn publish(first: u8, topic: &str, packet_id: Option<u16>, props: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
    let mut body = text(topic);
    if let Some(id) = packet_id {
        body.extend(id.to_be_bytes());
    }
    if let Some(props) = props {
        body.extend(properties(props));
    }
    body.extend_from_slice(payload);
    frame(first, &body)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ----- decoding and assertions ------------------------------------------------------------------

/// Decodes what a client sent; `version` is the connection's (`None` before CONNECT).
fn from_client(bytes: &[u8], version: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let result = decode(&mut buf, version, MAX_BYTES);
    match &result {
        Ok(Some(_)) => assert!(buf.is_empty(), "{} bytes left over", buf.len()),
        _ => assert_eq!(&buf[..], bytes, "the buffer must be untouched"),
    }
    result
}

fn from_server(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode_from_server(&mut buf, version, MAX_BYTES)
}

fn client_error(bytes: &[u8], version: Option<ProtocolVersion>) -> DecodeError {
    match from_client(bytes, version) {
        Err(error) => error,
        Ok(packet) => panic!("expected an error for {bytes:02X?}, decoded {packet:?}"),
    }
}

fn server_error(bytes: &[u8], version: ProtocolVersion) -> DecodeError {
    match from_server(bytes, version) {
        Err(error) => error,
        Ok(packet) => panic!("expected an error for {bytes:02X?}, decoded {packet:?}"),
    }
}

fn decoded(bytes: &[u8], version: Option<ProtocolVersion>) -> Packet {
    match from_client(bytes, version) {
        Ok(Some(packet)) => packet,
        other => panic!("expected a packet from {bytes:02X?}, got {other:?}"),
    }
}

#[track_caller]
fn assert_malformed(error: DecodeError) {
    assert!(matches!(error, DecodeError::Malformed(_)), "expected Malformed, got {error:?}");
    assert_eq!(error.reason_code(), ReasonCode::MALFORMED_PACKET);
}

#[track_caller]
fn assert_protocol(error: DecodeError) {
    assert!(matches!(error, DecodeError::Protocol(_)), "expected Protocol, got {error:?}");
    assert_eq!(error.reason_code(), ReasonCode::PROTOCOL_ERROR);
}

#[track_caller]
fn assert_topic_name_invalid(error: DecodeError) {
    assert!(matches!(error, DecodeError::TopicNameInvalid(_)), "expected TopicNameInvalid, got {error:?}");
    assert_eq!(error.reason_code(), ReasonCode::TOPIC_NAME_INVALID);
}

#[track_caller]
fn assert_topic_filter_invalid(error: DecodeError) {
    assert!(matches!(error, DecodeError::TopicFilterInvalid(_)), "expected TopicFilterInvalid, got {error:?}");
    assert_eq!(error.reason_code(), ReasonCode::MALFORMED_PACKET);
}

// ----- fixed header ---------------------------------------------------------------------------------

#[test]
fn mqtt_packet_type_0_is_reserved() {
    assert_malformed(client_error(&[0x00, 0x00], Some(V311)));
    assert_malformed(client_error(&[0x00, 0x00], None));
}

#[test]
fn mqtt5_packet_type_0_is_reserved() {
    assert_malformed(client_error(&[0x00, 0x00], Some(V5)));
}

#[test]
fn mqtt_packet_type_15_is_reserved() {
    assert_malformed(client_error(&[0xF0, 0x00], Some(V311)));
    assert_malformed(client_error(&[0xF0, 0x00], Some(V31)));
    assert_malformed(server_error(&[0xF0, 0x00], V311));
}

#[test]
fn mqtt5_auth_is_packet_type_15() {
    let auth = cat(&[&[0x19], &properties(&cat(&[&[0x15], &text("SCRAM")]))]);
    assert!(matches!(decoded(&frame(0xF0, &auth), Some(V5)), Packet::Auth(_)));
}

/// Every packet type a client sends, with its required flags, then each wrong flag value.
const CLIENT_TYPES: [(u8, &str); 9] = [
    (0x10, "CONNECT"),
    (0x40, "PUBACK"),
    (0x50, "PUBREC"),
    (0x62, "PUBREL"),
    (0x70, "PUBCOMP"),
    (0x82, "SUBSCRIBE"),
    (0xA2, "UNSUBSCRIBE"),
    (0xC0, "PINGREQ"),
    (0xE0, "DISCONNECT"),
];

fn assert_every_wrong_flag_is_malformed(version: ProtocolVersion, types: &[(u8, &str)]) {
    for &(first, name) in types {
        for flags in 0..16u8 {
            let wrong = (first & 0xF0) | flags;
            if wrong == first {
                continue;
            }
            // A body that would be fine with the right flags: the flags alone are at fault.
            let version_for = if name == "CONNECT" { None } else { Some(version) };
            let error = client_error(&frame(wrong, &[0, 1]), version_for);
            assert!(matches!(error, DecodeError::Malformed(_)), "{name} flags {flags:04b}: {error:?}");
        }
    }
}

#[test]
fn mqtt_2_2_2_2_invalid_fixed_header_flags_are_malformed() {
    assert_every_wrong_flag_is_malformed(V311, &CLIENT_TYPES);
}

#[test]
fn mqtt5_2_1_3_1_invalid_fixed_header_flags_are_malformed() {
    let mut types = CLIENT_TYPES.to_vec();
    types.push((0xF0, "AUTH"));
    assert_every_wrong_flag_is_malformed(V5, &types);
}

#[test]
fn mqtt_3_6_1_1_pubrel_flags() {
    assert_malformed(client_error(&[0x60, 2, 0, 1], Some(V311)));
    assert_eq!(
        decoded(&[0x62, 2, 0, 1], Some(V311)),
        Packet::PubRel(PubResponse { packet_id: 1, ..Default::default() })
    );
}

#[test]
fn mqtt5_3_6_1_1_pubrel_flags() {
    assert_malformed(client_error(&[0x60, 2, 0, 1], Some(V5)));
}

#[test]
fn mqtt_3_8_1_1_subscribe_flags() {
    assert_malformed(client_error(&frame(0x80, &cat(&[&[0, 1], &text("a"), &[0]])), Some(V311)));
}

#[test]
fn mqtt5_3_8_1_1_subscribe_flags() {
    assert_malformed(client_error(&frame(0x80, &cat(&[&[0, 1, 0], &text("a"), &[0]])), Some(V5)));
}

#[test]
fn mqtt_3_10_1_1_unsubscribe_flags() {
    assert_malformed(client_error(&frame(0xA0, &cat(&[&[0, 1], &text("a")])), Some(V311)));
}

#[test]
fn mqtt5_3_10_1_1_unsubscribe_flags() {
    assert_malformed(client_error(&frame(0xA0, &cat(&[&[0, 1, 0], &text("a")])), Some(V5)));
}

#[test]
fn mqtt_3_14_1_1_disconnect_reserved_flags() {
    assert_malformed(client_error(&[0xE1, 0], Some(V311)));
}

#[test]
fn mqtt5_3_14_1_1_disconnect_reserved_flags() {
    assert_malformed(client_error(&[0xE8, 0], Some(V5)));
}

#[test]
fn mqtt5_3_15_1_1_auth_reserved_flags() {
    assert_malformed(client_error(&[0xF1, 0], Some(V5)));
}

#[test]
fn mqtt31_dup_on_pubrel_subscribe_unsubscribe_is_tolerated() {
    // MQTT 3.1 sent these "at QoS 1" and set DUP on retries; 3.1.1 fixed the flags.
    assert!(matches!(decoded(&[0x6A, 2, 0, 1], Some(V31)), Packet::PubRel(_)));
    assert!(matches!(decoded(&frame(0x8A, &cat(&[&[0, 1], &text("a"), &[0]])), Some(V31)), Packet::Subscribe(_)));
    assert!(matches!(decoded(&frame(0xAA, &cat(&[&[0, 1], &text("a")])), Some(V31)), Packet::Unsubscribe(_)));
    assert_malformed(client_error(&[0x6A, 2, 0, 1], Some(V311)));
}

#[test]
fn mqtt_remaining_length_longer_than_4_bytes() {
    // Refused as soon as the fourth byte shows a continuation, without waiting for more.
    assert_malformed(client_error(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], Some(V311)));
    assert_malformed(client_error(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], Some(V311)));
}

#[test]
fn mqtt5_remaining_length_longer_than_4_bytes() {
    assert_malformed(client_error(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], Some(V5)));
}

#[test]
fn mqtt5_1_5_5_1_remaining_length_not_in_shortest_form() {
    assert_malformed(client_error(&[0xC0, 0x80, 0x00], Some(V5)));
    // Before the version is known: checked once the CONNECT turns out to be MQTT 5.
    let connect = connect_v5(0x02, &[], &text("c"));
    let mut padded = vec![0x10, (connect.len() as u8 - 2) | 0x80, 0x00];
    padded.extend_from_slice(&connect[2..]);
    assert_malformed(client_error(&padded, None));
}

#[test]
fn mqtt_remaining_length_not_in_shortest_form_is_accepted() {
    // 3.1.1 asks for no shortest form; only MQTT 5 does [MQTT-1.5.5-1].
    assert_eq!(decoded(&[0xC0, 0x80, 0x00], Some(V311)), Packet::PingReq);
    let connect = connect_v311(0x02, &text("c"));
    let mut padded = vec![0x10, (connect.len() as u8 - 2) | 0x80, 0x00];
    padded.extend_from_slice(&connect[2..]);
    assert!(matches!(decoded(&padded, None), Packet::Connect(_)));
}

#[test]
fn packet_too_large_is_refused_from_the_fixed_header() {
    for version in [Some(V311), Some(V5), None] {
        let first = if version.is_none() { 0x10 } else { 0x30 };
        // Remaining Length 16,384: three bytes of header, no body yet.
        let mut buf = BytesMut::from(&[first, 0x80, 0x80, 0x01][..]);
        let error = decode(&mut buf, version, 1000).unwrap_err();
        assert_eq!(error, DecodeError::TooLarge { size: 16_388, max: 1000 });
        assert_eq!(error.reason_code(), ReasonCode::PACKET_TOO_LARGE);
        assert_eq!(buf.len(), 4, "untouched");
    }
    // Exactly the maximum is fine.
    let mut buf = BytesMut::from(&[0xC0, 0][..]);
    assert_eq!(decode(&mut buf, Some(V5), 2), Ok(Some(Packet::PingReq)));
}

#[test]
fn incomplete_packets_need_more_bytes_and_leave_the_buffer_untouched() {
    let whole = publish(0x32, "a/b", Some(1), None, b"payload");
    for len in 0..whole.len() {
        assert_eq!(from_client(&whole[..len], Some(V311)), Ok(None), "prefix of {len} bytes");
    }
    assert!(matches!(decoded(&whole, Some(V311)), Packet::Publish(_)));
}

// ----- CONNECT ----------------------------------------------------------------------------------------

#[test]
fn mqtt_3_1_0_1_first_packet_must_be_connect() {
    assert_protocol(client_error(&[0xC0, 0], None));
    assert_protocol(client_error(&publish(0x30, "a", None, None, b""), None));
}

#[test]
fn mqtt5_3_1_0_1_first_packet_must_be_connect() {
    let auth = frame(0xF0, &cat(&[&[0x18], &properties(&cat(&[&[0x15], &text("m")]))]));
    assert_protocol(client_error(&auth, None));
}

#[test]
fn mqtt_3_1_0_2_second_connect_is_decoded_for_the_caller_to_refuse() {
    assert!(matches!(decoded(&connect_v311(0x02, &text("c")), Some(V311)), Packet::Connect(_)));
}

#[test]
fn mqtt_3_1_2_1_unknown_protocol_name() {
    let error = client_error(&connect_with("MQTX", 4, 0x02, None, &text("c")), None);
    assert_eq!(error, DecodeError::UnknownProtocolName("MQTX".into()));
}

#[test]
fn mqtt5_3_1_2_1_unknown_protocol_name() {
    let error = client_error(&connect_with("mqtt", 5, 0x02, Some(&[]), &text("c")), None);
    assert_eq!(error, DecodeError::UnknownProtocolName("mqtt".into()));
}

#[test]
fn mqtt_3_1_2_2_unsupported_protocol_level() {
    for (name, level) in [("MQTT", 3), ("MQTT", 6), ("MQIsdp", 4)] {
        let error = client_error(&connect_with(name, level, 0x02, None, &text("c")), None);
        assert_eq!(error, DecodeError::UnsupportedProtocolVersion { name: name.into(), level });
        assert_eq!(error.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
    }
}

#[test]
fn mqtt5_3_1_2_2_unsupported_protocol_version() {
    let error = client_error(&connect_with("MQTT", 6, 0x02, Some(&[]), &text("c")), None);
    assert_eq!(error, DecodeError::UnsupportedProtocolVersion { name: "MQTT".into(), level: 6 });
    assert_eq!(error.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
}

#[test]
fn mqtt31_connect_is_mqisdp_level_3() {
    let Packet::Connect(connect) = decoded(&connect_with("MQIsdp", 3, 0x02, None, &text("c")), None) else {
        panic!("not a CONNECT");
    };
    assert_eq!(connect.protocol, Some(V31));
    assert!(connect.clean_start);
}

#[test]
fn mqtt_3_1_2_3_connect_reserved_flag() {
    assert_malformed(client_error(&connect_v311(0x03, &text("c")), None));
}

#[test]
fn mqtt5_3_1_2_3_connect_reserved_flag() {
    assert_malformed(client_error(&connect_v5(0x03, &[], &text("c")), None));
}

#[test]
fn mqtt_3_1_2_13_will_qos_without_will_flag() {
    assert_malformed(client_error(&connect_v311(0x0A, &text("c")), None));
}

#[test]
fn mqtt5_3_1_2_11_will_qos_without_will_flag() {
    assert_malformed(client_error(&connect_v5(0x12, &[], &text("c")), None));
}

#[test]
fn mqtt_3_1_2_14_will_qos_3() {
    let payload = cat(&[&text("c"), &text("will/topic"), &field(b"bye")]);
    assert_malformed(client_error(&connect_v311(0x1E, &payload), None));
}

#[test]
fn mqtt5_3_1_2_12_will_qos_3_malformed() {
    let payload = cat(&[&text("c"), &properties(&[]), &text("will/topic"), &field(b"bye")]);
    assert_malformed(client_error(&connect_v5(0x1E, &[], &payload), None));
}

#[test]
fn mqtt_3_1_2_15_will_retain_without_will_flag() {
    assert_malformed(client_error(&connect_v311(0x22, &text("c")), None));
}

#[test]
fn mqtt5_3_1_2_13_will_retain_without_will_flag() {
    assert_malformed(client_error(&connect_v5(0x22, &[], &text("c")), None));
}

#[test]
fn mqtt_3_1_2_9_will_flag_without_will_fields() {
    assert_malformed(client_error(&connect_v311(0x06, &text("c")), None));
}

#[test]
fn mqtt5_3_1_2_9_will_flag_without_will_fields() {
    assert_malformed(client_error(&connect_v5(0x06, &[], &text("c")), None));
}

#[test]
fn mqtt_3_1_2_19_user_name_flag_without_user_name() {
    assert_malformed(client_error(&connect_v311(0x82, &text("c")), None));
}

#[test]
fn mqtt5_3_1_2_17_user_name_flag_without_user_name() {
    assert_malformed(client_error(&connect_v5(0x82, &[], &text("c")), None));
}

#[test]
fn mqtt_3_1_2_18_user_name_without_user_name_flag() {
    // The user name is then trailing bytes.
    assert_malformed(client_error(&connect_v311(0x02, &cat(&[&text("c"), &text("user")])), None));
}

#[test]
fn mqtt5_3_1_2_16_user_name_without_user_name_flag() {
    assert_malformed(client_error(&connect_v5(0x02, &[], &cat(&[&text("c"), &text("user")])), None));
}

#[test]
fn mqtt_3_1_2_22_password_without_user_name() {
    assert_malformed(client_error(&connect_v311(0x42, &cat(&[&text("c"), &field(b"pw")])), None));
}

#[test]
fn mqtt31_password_without_user_name() {
    let bytes = connect_with("MQIsdp", 3, 0x42, None, &cat(&[&text("c"), &field(b"pw")]));
    assert_malformed(client_error(&bytes, None));
}

#[test]
fn mqtt5_3_1_2_19_password_without_user_name_is_allowed() {
    let Packet::Connect(connect) = decoded(&connect_v5(0x42, &[], &cat(&[&text("c"), &field(b"pw")])), None) else {
        panic!("not a CONNECT");
    };
    assert_eq!(connect.username, None);
    assert_eq!(connect.password.as_deref(), Some(&b"pw"[..]));
}

#[test]
fn mqtt_1_5_3_1_ill_formed_utf8() {
    // A UTF-16 surrogate encoded in UTF-8, then an overlong encoding.
    for bad in [&[0xED, 0xA0, 0x80][..], &[0xC0, 0xAF]] {
        assert_malformed(client_error(&connect_v311(0x02, &field(bad)), None));
    }
}

#[test]
fn mqtt5_1_5_4_1_ill_formed_utf8() {
    assert_malformed(client_error(&connect_v5(0x02, &[], &field(&[0xFF])), None));
    // In a topic name too: ill-formed UTF-8 is malformed before any topic rule applies.
    let mut body = field(&[0xFF]);
    body.extend(properties(&[]));
    assert_malformed(client_error(&frame(0x30, &body), Some(V5)));
}

#[test]
fn mqtt_1_5_3_2_null_character() {
    assert_malformed(client_error(&connect_v311(0x02, &text("a\0b")), None));
    assert_malformed(client_error(&publish(0x30, "a\0", None, None, b""), Some(V311)));
}

#[test]
fn mqtt5_1_5_4_2_null_character() {
    assert_malformed(client_error(&connect_v5(0x02, &[], &text("\0")), None));
    // In a user property too.
    let user = cat(&[&[0x26], &text("k\0"), &text("v")]);
    assert_malformed(client_error(&connect_v5(0x02, &user, &text("c")), None));
}

#[test]
fn mqtt_3_1_3_10_will_topic_must_be_a_topic_name() {
    for topic in ["a/#", "+", ""] {
        let payload = cat(&[&text("c"), &text(topic), &field(b"bye")]);
        assert_topic_name_invalid(client_error(&connect_v311(0x06, &payload), None));
    }
}

#[test]
fn mqtt5_3_1_3_11_will_topic_must_be_a_topic_name() {
    let payload = cat(&[&text("c"), &properties(&[]), &text("a/+"), &field(b"bye")]);
    assert_topic_name_invalid(client_error(&connect_v5(0x06, &[], &payload), None));
}

#[test]
fn mqtt_connect_trailing_bytes_after_the_payload() {
    assert_malformed(client_error(&connect_v311(0x02, &cat(&[&text("c"), &[0]])), None));
}

// ----- MQTT 5 properties (CONNECT and will) ---------------------------------------------------------

fn connect_with_properties(props: &[u8]) -> DecodeError {
    client_error(&connect_v5(0x02, props, &text("c")), None)
}

#[test]
fn mqtt5_connect_receive_maximum_zero() {
    assert_protocol(connect_with_properties(&[0x21, 0, 0]));
}

#[test]
fn mqtt5_connect_maximum_packet_size_zero() {
    assert_protocol(connect_with_properties(&[0x27, 0, 0, 0, 0]));
}

#[test]
fn mqtt5_connect_request_response_information_above_1() {
    assert_protocol(connect_with_properties(&[0x19, 2]));
}

#[test]
fn mqtt5_connect_request_problem_information_above_1() {
    assert_protocol(connect_with_properties(&[0x17, 2]));
}

#[test]
fn mqtt5_connect_property_included_twice() {
    assert_protocol(connect_with_properties(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]));
    assert_protocol(connect_with_properties(&[0x22, 0, 1, 0x22, 0, 1]));
    assert_protocol(connect_with_properties(&cat(&[&[0x15], &text("m"), &[0x15], &text("m")])));
}

#[test]
fn mqtt5_connect_authentication_data_without_method() {
    assert_protocol(connect_with_properties(&cat(&[&[0x16], &field(b"data")])));
}

#[test]
fn mqtt5_connect_user_property_may_repeat() {
    let props = cat(&[&[0x26], &text("k"), &text("1"), &[0x26], &text("k"), &text("2")]);
    let Packet::Connect(connect) = decoded(&connect_v5(0x02, &props, &text("c")), None) else {
        panic!("not a CONNECT");
    };
    assert_eq!(connect.properties.user_properties, vec![("k".into(), "1".into()), ("k".into(), "2".into())]);
}

#[test]
fn mqtt5_connect_property_not_allowed_in_connect() {
    // Topic Alias (0x23) belongs to PUBLISH.
    assert_protocol(connect_with_properties(&[0x23, 0, 1]));
    // Will Delay Interval (0x18) belongs to the will properties.
    assert_protocol(connect_with_properties(&[0x18, 0, 0, 0, 1]));
}

#[test]
fn mqtt5_unknown_property_identifier() {
    assert_malformed(connect_with_properties(&[0x04, 0]));
    assert_malformed(connect_with_properties(&[0x80, 0x01, 0]));
}

#[test]
fn mqtt5_property_length_runs_past_the_packet() {
    let mut body = text("MQTT");
    body.extend([5, 0x02, 0, 60, 50, 0x21, 0, 1]);
    assert_malformed(client_error(&frame(0x10, &body), None));
}

#[test]
fn mqtt5_property_runs_past_the_property_length() {
    // The block says 2 bytes, Receive Maximum needs 3; the third byte is then read as the payload.
    let mut body = text("MQTT");
    body.extend([5, 0x02, 0, 60, 2, 0x21, 0, 1]);
    body.extend(text("c"));
    assert_malformed(client_error(&frame(0x10, &body), None));
}

#[test]
fn mqtt5_1_5_5_1_property_length_not_in_shortest_form() {
    let mut body = text("MQTT");
    body.extend([5, 0x02, 0, 60, 0x80, 0x00]);
    body.extend(text("c"));
    assert_malformed(client_error(&frame(0x10, &body), None));
}

fn connect_with_will_properties(will_props: &[u8]) -> DecodeError {
    let payload = cat(&[&text("c"), &properties(will_props), &text("will"), &field(b"bye")]);
    client_error(&connect_v5(0x06, &[], &payload), None)
}

#[test]
fn mqtt5_will_payload_format_indicator_above_1() {
    assert_protocol(connect_with_will_properties(&[0x01, 2]));
}

#[test]
fn mqtt5_will_property_included_twice() {
    assert_protocol(connect_with_will_properties(&[0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 1]));
}

#[test]
fn mqtt5_will_property_not_allowed() {
    // A Subscription Identifier has no place in a will.
    assert_protocol(connect_with_will_properties(&[0x0B, 1]));
}

#[test]
fn mqtt5_3_3_2_14_will_response_topic_with_wildcard() {
    assert_protocol(connect_with_will_properties(&cat(&[&[0x08], &text("replies/#")])));
}

// ----- PUBLISH ------------------------------------------------------------------------------------------

#[test]
fn mqtt_3_3_1_2_dup_with_qos_0() {
    assert_malformed(client_error(&publish(0x38, "a", None, None, b""), Some(V311)));
}

#[test]
fn mqtt5_3_3_1_2_dup_with_qos_0() {
    assert_malformed(client_error(&publish(0x38, "a", None, Some(&[]), b""), Some(V5)));
}

#[test]
fn mqtt_3_3_1_4_publish_qos_3() {
    assert_malformed(client_error(&publish(0x36, "a", Some(1), None, b""), Some(V311)));
}

#[test]
fn mqtt5_3_3_1_4_publish_qos_3_malformed() {
    assert_malformed(client_error(&publish(0x36, "a", Some(1), Some(&[]), b""), Some(V5)));
}

#[test]
fn mqtt_3_3_2_2_topic_name_with_wildcard() {
    for topic in ["a/+", "#", "a/b#", "+x"] {
        assert_topic_name_invalid(client_error(&publish(0x30, topic, None, None, b""), Some(V311)));
    }
}

#[test]
fn mqtt5_3_3_2_2_topic_name_with_wildcard() {
    assert_topic_name_invalid(client_error(&publish(0x30, "a/#", None, Some(&[]), b""), Some(V5)));
}

#[test]
fn mqtt_4_7_3_1_empty_topic_name() {
    assert_topic_name_invalid(client_error(&publish(0x30, "", None, None, b""), Some(V311)));
}

#[test]
fn mqtt5_empty_topic_name_without_topic_alias() {
    assert_protocol(client_error(&publish(0x30, "", None, Some(&[]), b""), Some(V5)));
}

#[test]
fn mqtt5_empty_topic_name_with_topic_alias() {
    let Packet::Publish(publish) = decoded(&publish(0x30, "", None, Some(&[0x23, 0, 5]), b"x"), Some(V5)) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(publish.topic, "");
    assert_eq!(publish.properties.topic_alias, Some(5));
}

#[test]
fn mqtt5_3_3_2_8_topic_alias_zero() {
    let error = client_error(&publish(0x30, "a", None, Some(&[0x23, 0, 0]), b""), Some(V5));
    assert!(matches!(error, DecodeError::TopicAliasInvalid(_)), "{error:?}");
    assert_eq!(error.reason_code(), ReasonCode::TOPIC_ALIAS_INVALID);
}

#[test]
fn mqtt5_publish_property_included_twice() {
    assert_protocol(client_error(&publish(0x30, "a", None, Some(&[0x23, 0, 1, 0x23, 0, 2]), b""), Some(V5)));
    assert_protocol(client_error(
        &publish(0x30, "a", None, Some(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 1]), b""),
        Some(V5),
    ));
}

#[test]
fn mqtt5_3_3_2_14_response_topic_with_wildcard() {
    let props = cat(&[&[0x08], &text("replies/+")]);
    assert_protocol(client_error(&publish(0x30, "a", None, Some(&props), b""), Some(V5)));
}

#[test]
fn mqtt5_publish_payload_format_indicator_above_1() {
    assert_protocol(client_error(&publish(0x30, "a", None, Some(&[0x01, 2]), b""), Some(V5)));
}

#[test]
fn mqtt5_publish_property_not_allowed_in_publish() {
    assert_protocol(client_error(&publish(0x30, "a", None, Some(&[0x11, 0, 0, 0, 1]), b""), Some(V5)));
}

#[test]
fn mqtt5_3_3_4_6_subscription_identifier_from_a_client() {
    assert_protocol(client_error(&publish(0x30, "a", None, Some(&[0x0B, 1]), b""), Some(V5)));
}

#[test]
fn mqtt5_3_3_4_4_server_publish_repeats_subscription_identifiers() {
    let bytes = publish(0x30, "a", None, Some(&[0x0B, 1, 0x0B, 0xFF, 0xFF, 0xFF, 0x7F]), b"");
    let Ok(Some(Packet::Publish(publish))) = from_server(&bytes, V5) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(publish.properties.subscription_identifiers, vec![1, 268_435_455]);
}

#[test]
fn mqtt5_publish_subscription_identifier_zero() {
    assert_protocol(server_error(&publish(0x30, "a", None, Some(&[0x0B, 0]), b""), V5));
}

#[test]
fn mqtt5_publish_subscription_identifier_longer_than_4_bytes() {
    assert_malformed(server_error(&publish(0x30, "a", None, Some(&[0x0B, 0x80, 0x80, 0x80, 0x80, 0x01]), b""), V5));
}

#[test]
fn mqtt_2_3_1_1_publish_packet_identifier_zero() {
    assert_protocol(client_error(&publish(0x32, "a", Some(0), None, b""), Some(V311)));
}

#[test]
fn mqtt5_2_2_1_3_publish_packet_identifier_zero() {
    assert_protocol(client_error(&publish(0x34, "a", Some(0), Some(&[]), b""), Some(V5)));
}

#[test]
fn mqtt_2_3_1_5_qos_0_publish_has_no_packet_identifier() {
    // The two bytes after the topic are payload, not an identifier.
    let Packet::Publish(publish) = decoded(&publish(0x30, "a", Some(7), None, b""), Some(V311)) else {
        panic!("not a PUBLISH");
    };
    assert_eq!(publish.packet_id, None);
    assert_eq!(&publish.payload[..], &[0, 7]);
}

#[test]
fn mqtt_publish_truncated_topic() {
    assert_malformed(client_error(&[0x30, 3, 0, 5, b'a'], Some(V311)));
}

// ----- PUBACK, PUBREC, PUBREL, PUBCOMP ---------------------------------------------------------------

const ACKS: [(u8, &str); 4] = [(0x40, "PUBACK"), (0x50, "PUBREC"), (0x62, "PUBREL"), (0x70, "PUBCOMP")];

#[test]
fn mqtt_acknowledgement_length_must_be_2() {
    for (first, name) in ACKS {
        assert_malformed(client_error(&[first, 3, 0, 1, 0], Some(V311)));
        assert_malformed(client_error(&[first, 1, 0], Some(V311)));
        assert!(from_client(&[first, 2, 0, 1], Some(V311)).is_ok(), "{name}");
    }
}

#[test]
fn mqtt_2_3_1_1_acknowledgement_packet_identifier_zero() {
    for (first, _) in ACKS {
        assert_protocol(client_error(&[first, 2, 0, 0], Some(V311)));
    }
}

#[test]
fn mqtt5_acknowledgement_short_forms_are_valid() {
    for (first, name) in ACKS {
        let expected = PubResponse { packet_id: 9, ..PubResponse::default() };
        for bytes in [&[first, 2, 0, 9][..], &[first, 3, 0, 9, 0], &[first, 4, 0, 9, 0, 0]] {
            let packet = decoded(bytes, Some(V5));
            let response = match packet {
                Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => r,
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(response, expected, "{name} {bytes:02X?}");
        }
    }
}

#[test]
fn mqtt5_3_4_2_1_puback_reason_code() {
    assert_protocol(client_error(&[0x40, 3, 0, 1, 0x01], Some(V5)));
    assert_protocol(client_error(&[0x40, 3, 0, 1, 0x92], Some(V5)));
    assert!(from_client(&[0x40, 3, 0, 1, 0x10], Some(V5)).is_ok());
}

#[test]
fn mqtt5_3_5_2_1_pubrec_reason_code() {
    assert_protocol(client_error(&[0x50, 3, 0, 1, 0x92], Some(V5)));
    assert!(from_client(&[0x50, 3, 0, 1, 0x99], Some(V5)).is_ok());
}

#[test]
fn mqtt5_3_6_2_1_pubrel_reason_code() {
    assert_protocol(client_error(&[0x62, 3, 0, 1, 0x10], Some(V5)));
    assert_protocol(client_error(&[0x62, 3, 0, 1, 0x80], Some(V5)));
    assert!(from_client(&[0x62, 3, 0, 1, 0x92], Some(V5)).is_ok());
}

#[test]
fn mqtt5_3_7_2_1_pubcomp_reason_code() {
    assert_protocol(client_error(&[0x70, 3, 0, 1, 0x87], Some(V5)));
}

#[test]
fn mqtt5_acknowledgement_reason_string_included_twice() {
    let props = cat(&[&[0x1F], &text("a"), &[0x1F], &text("b")]);
    assert_protocol(client_error(&frame(0x40, &cat(&[&[0, 1, 0x80], &properties(&props)])), Some(V5)));
}

#[test]
fn mqtt5_acknowledgement_property_not_allowed() {
    assert_protocol(client_error(&frame(0x40, &cat(&[&[0, 1, 0x80], &properties(&[0x23, 0, 1])])), Some(V5)));
}

#[test]
fn mqtt5_acknowledgement_trailing_bytes_after_properties() {
    assert_malformed(client_error(&[0x40, 5, 0, 1, 0x00, 0x00, 0xFF], Some(V5)));
}

#[test]
fn mqtt5_2_2_1_3_acknowledgement_packet_identifier_zero() {
    assert_protocol(client_error(&[0x50, 2, 0, 0], Some(V5)));
}

// ----- SUBSCRIBE -----------------------------------------------------------------------------------------

fn subscribe_v311(filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = vec![0, 1];
    for (filter, options) in filters {
        body.extend(text(filter));
        body.push(*options);
    }
    frame(0x82, &body)
}

fn subscribe_v5(props: &[u8], filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend(properties(props));
    for (filter, options) in filters {
        body.extend(text(filter));
        body.push(*options);
    }
    frame(0x82, &body)
}

#[test]
fn mqtt_3_8_3_3_subscribe_without_topic_filter() {
    assert_protocol(client_error(&subscribe_v311(&[]), Some(V311)));
}

#[test]
fn mqtt5_3_8_3_2_subscribe_without_topic_filter() {
    assert_protocol(client_error(&subscribe_v5(&[], &[]), Some(V5)));
}

#[test]
fn mqtt_3_8_3_4_subscribe_reserved_bits_in_requested_qos() {
    for options in [0x04, 0x40, 0x81] {
        assert_malformed(client_error(&subscribe_v311(&[("a", options)]), Some(V311)));
    }
}

#[test]
fn mqtt_3_8_3_4_subscribe_requested_qos_3() {
    assert_malformed(client_error(&subscribe_v311(&[("a", 3)]), Some(V311)));
}

#[test]
fn mqtt5_3_8_3_5_subscription_options_reserved_bits() {
    for options in [0x40, 0x80, 0xC1] {
        assert_malformed(client_error(&subscribe_v5(&[], &[("a", options)]), Some(V5)));
    }
}

#[test]
fn mqtt5_subscribe_maximum_qos_3() {
    assert_protocol(client_error(&subscribe_v5(&[], &[("a", 0x03)]), Some(V5)));
}

#[test]
fn mqtt5_subscribe_retain_handling_3() {
    assert_protocol(client_error(&subscribe_v5(&[], &[("a", 0x30)]), Some(V5)));
}

#[test]
fn mqtt5_subscribe_options_decode() {
    let Packet::Subscribe(subscribe) = decoded(&subscribe_v5(&[], &[("a", 0x2E)]), Some(V5)) else {
        panic!("not a SUBSCRIBE");
    };
    let (_, options) = &subscribe.filters[0];
    assert_eq!(
        (options.qos, options.no_local, options.retain_as_published, options.retain_handling),
        (QoS::ExactlyOnce, true, true, 2)
    );
}

#[test]
fn mqtt5_3_8_3_4_no_local_on_shared_subscription() {
    assert_protocol(client_error(&subscribe_v5(&[], &[("$share/g/a", 0x04)]), Some(V5)));
    assert!(from_client(&subscribe_v5(&[], &[("$share/g/a", 0x00)]), Some(V5)).is_ok());
}

#[test]
fn mqtt5_subscribe_subscription_identifier_zero() {
    assert_protocol(client_error(&subscribe_v5(&[0x0B, 0], &[("a", 0)]), Some(V5)));
}

#[test]
fn mqtt5_subscribe_subscription_identifier_included_twice() {
    assert_protocol(client_error(&subscribe_v5(&[0x0B, 1, 0x0B, 2], &[("a", 0)]), Some(V5)));
}

#[test]
fn mqtt5_subscribe_property_not_allowed() {
    assert_protocol(client_error(&subscribe_v5(&[0x1F, 0, 0], &[("a", 0)]), Some(V5)));
}

#[test]
fn mqtt_2_3_1_1_subscribe_packet_identifier_zero() {
    assert_protocol(client_error(&frame(0x82, &cat(&[&[0, 0], &text("a"), &[0]])), Some(V311)));
}

#[test]
fn mqtt5_2_2_1_3_subscribe_packet_identifier_zero() {
    assert_protocol(client_error(&frame(0x82, &cat(&[&[0, 0, 0], &text("a"), &[0]])), Some(V5)));
}

#[test]
fn mqtt_subscribe_filter_without_options_byte() {
    assert_malformed(client_error(&frame(0x82, &cat(&[&[0, 1], &text("a")])), Some(V311)));
}

#[test]
fn mqtt_4_7_1_2_multi_level_wildcard_not_last_or_not_alone() {
    for filter in ["a/#/b", "a#", "#/", "a/b#"] {
        assert_topic_filter_invalid(client_error(&subscribe_v311(&[(filter, 0)]), Some(V311)));
    }
}

#[test]
fn mqtt5_4_7_1_2_multi_level_wildcard_not_last_or_not_alone() {
    assert_topic_filter_invalid(client_error(&subscribe_v5(&[], &[("a/#/b", 0)]), Some(V5)));
}

#[test]
fn mqtt_4_7_1_3_single_level_wildcard_not_alone_in_its_level() {
    for filter in ["a+", "+a/b", "a/++"] {
        assert_topic_filter_invalid(client_error(&subscribe_v311(&[(filter, 0)]), Some(V311)));
    }
}

#[test]
fn mqtt5_4_7_1_3_single_level_wildcard_not_alone_in_its_level() {
    assert_topic_filter_invalid(client_error(&subscribe_v5(&[], &[("a/b+", 0)]), Some(V5)));
}

#[test]
fn mqtt_4_7_3_1_empty_topic_filter() {
    assert_topic_filter_invalid(client_error(&subscribe_v311(&[("", 0)]), Some(V311)));
}

#[test]
fn mqtt5_4_7_3_1_empty_topic_filter() {
    assert_topic_filter_invalid(client_error(&subscribe_v5(&[], &[("", 0)]), Some(V5)));
}

#[test]
fn mqtt5_4_8_2_1_shared_subscription_needs_a_share_name() {
    for filter in ["$share//a", "$share/"] {
        assert_topic_filter_invalid(client_error(&subscribe_v5(&[], &[(filter, 0)]), Some(V5)));
    }
}

#[test]
fn mqtt5_4_8_2_2_share_name_without_wildcards_then_a_filter() {
    for filter in ["$share/+/a", "$share/g#/a", "$share/g", "$share/g/", "$share/g/a#"] {
        assert_topic_filter_invalid(client_error(&subscribe_v5(&[], &[(filter, 0)]), Some(V5)));
    }
}

#[test]
fn mqtt_shared_subscription_form_is_checked_in_3_1_1_too() {
    assert_topic_filter_invalid(client_error(&subscribe_v311(&[("$share/+/a", 0)]), Some(V311)));
    assert!(from_client(&subscribe_v311(&[("$share/g/a/#", 1)]), Some(V311)).is_ok());
}

// ----- UNSUBSCRIBE ---------------------------------------------------------------------------------------

#[test]
fn mqtt_3_10_3_2_unsubscribe_without_topic_filter() {
    assert_protocol(client_error(&frame(0xA2, &[0, 1]), Some(V311)));
}

#[test]
fn mqtt5_3_10_3_2_unsubscribe_without_topic_filter() {
    assert_protocol(client_error(&frame(0xA2, &[0, 1, 0]), Some(V5)));
}

#[test]
fn mqtt_3_10_3_1_unsubscribe_invalid_topic_filter() {
    assert_topic_filter_invalid(client_error(&frame(0xA2, &cat(&[&[0, 1], &text("a/#/b")])), Some(V311)));
}

#[test]
fn mqtt5_3_10_3_1_unsubscribe_invalid_topic_filter() {
    assert_topic_filter_invalid(client_error(&frame(0xA2, &cat(&[&[0, 1, 0], &text("")])), Some(V5)));
}

#[test]
fn mqtt5_unsubscribe_property_not_allowed() {
    assert_protocol(client_error(&frame(0xA2, &cat(&[&[0, 1, 2, 0x0B, 1], &text("a")])), Some(V5)));
}

#[test]
fn mqtt_2_3_1_1_unsubscribe_packet_identifier_zero() {
    assert_protocol(client_error(&frame(0xA2, &cat(&[&[0, 0], &text("a")])), Some(V311)));
}

// ----- PINGREQ, DISCONNECT -------------------------------------------------------------------------------

#[test]
fn mqtt_pingreq_with_a_body() {
    assert_malformed(client_error(&[0xC0, 1, 0], Some(V311)));
}

#[test]
fn mqtt5_pingreq_with_a_body() {
    assert_malformed(client_error(&[0xC0, 1, 0], Some(V5)));
}

#[test]
fn mqtt_pingresp_with_a_body() {
    assert_malformed(server_error(&[0xD0, 1, 0], V311));
}

#[test]
fn mqtt_disconnect_with_a_body() {
    assert_malformed(client_error(&[0xE0, 1, 0], Some(V311)));
}

#[test]
fn mqtt5_disconnect_short_forms_are_valid() {
    assert_eq!(decoded(&[0xE0, 0], Some(V5)), Packet::Disconnect(Disconnect::default()));
    assert_eq!(
        decoded(&[0xE0, 1, 0x04], Some(V5)),
        Packet::Disconnect(Disconnect { reason_code: ReasonCode(0x04), ..Disconnect::default() })
    );
}

#[test]
fn mqtt5_3_14_2_1_disconnect_reason_code() {
    assert_protocol(client_error(&[0xE0, 1, 0x01], Some(V5)));
    // Server-only codes from a client, and the client-only one from a server.
    assert_protocol(client_error(&[0xE0, 1, 0x8B], Some(V5)));
    assert_protocol(client_error(&[0xE0, 1, 0x8E], Some(V5)));
    assert_protocol(server_error(&[0xE0, 1, 0x04], V5));
    assert!(from_server(&[0xE0, 1, 0x8B], V5).is_ok());
}

#[test]
fn mqtt5_3_14_2_2_session_expiry_interval_from_a_server() {
    assert_protocol(server_error(&frame(0xE0, &cat(&[&[0x00], &properties(&[0x11, 0, 0, 0, 1])])), V5));
    assert!(from_client(&frame(0xE0, &cat(&[&[0x00], &properties(&[0x11, 0, 0, 0, 1])])), Some(V5)).is_ok());
}

#[test]
fn mqtt5_disconnect_property_included_twice() {
    let props = cat(&[&[0x1C], &text("a"), &[0x1C], &text("b")]);
    assert_protocol(client_error(&frame(0xE0, &cat(&[&[0x00], &properties(&props)])), Some(V5)));
}

#[test]
fn mqtt_a_server_sends_no_disconnect_in_3_1_1() {
    assert_protocol(server_error(&[0xE0, 0], V311));
}

// ----- AUTH ------------------------------------------------------------------------------------------

fn auth_method() -> Vec<u8> {
    cat(&[&[0x15], &text("SCRAM-SHA-256")])
}

#[test]
fn mqtt5_3_15_2_1_auth_reason_code() {
    assert_protocol(client_error(&frame(0xF0, &cat(&[&[0x01], &properties(&auth_method())])), Some(V5)));
    // Success is the server's; Re-authenticate is the client's.
    assert_protocol(client_error(&frame(0xF0, &cat(&[&[0x00], &properties(&auth_method())])), Some(V5)));
    assert_protocol(client_error(&[0xF0, 0], Some(V5)));
    assert_protocol(server_error(&frame(0xF0, &cat(&[&[0x19], &properties(&auth_method())])), V5));
}

#[test]
fn mqtt5_auth_without_authentication_method() {
    assert_protocol(client_error(&frame(0xF0, &cat(&[&[0x18], &properties(&[])])), Some(V5)));
}

#[test]
fn mqtt5_auth_reason_code_without_properties() {
    // Only Remaining Length 0 may omit the properties.
    assert_malformed(client_error(&[0xF0, 1, 0x18], Some(V5)));
}

#[test]
fn mqtt5_auth_success_short_form_from_the_server() {
    assert_eq!(from_server(&[0xF0, 0], V5), Ok(Some(Packet::Auth(Auth::default()))));
}

// ----- directions ------------------------------------------------------------------------------------

#[test]
fn server_to_client_packets_from_a_client_are_protocol_errors() {
    for version in [V311, V5] {
        for bytes in [&[0x20, 2, 0, 0][..], &[0x90, 3, 0, 1, 0], &[0xB0, 2, 0, 1], &[0xD0, 0]] {
            assert_protocol(client_error(bytes, Some(version)));
        }
    }
}

#[test]
fn client_to_server_packets_from_a_server_are_protocol_errors() {
    for version in [V311, V5] {
        assert_protocol(server_error(&[0xC0, 0], version));
        assert_protocol(server_error(&connect_v311(0x02, &text("c")), version));
    }
}

// ----- CONNACK, SUBACK, UNSUBACK (what a server sends) ---------------------------------------------------

#[test]
fn mqtt_connack_reserved_flags() {
    assert_malformed(server_error(&[0x20, 2, 0x02, 0], V311));
}

#[test]
fn mqtt5_3_2_2_1_connack_reserved_flags() {
    assert_malformed(server_error(&[0x20, 3, 0x80, 0, 0], V5));
}

#[test]
fn mqtt_3_2_2_4_session_present_with_a_refusal() {
    assert_protocol(server_error(&[0x20, 2, 0x01, 0x05], V311));
}

#[test]
fn mqtt5_3_2_2_6_session_present_with_a_refusal() {
    assert_protocol(server_error(&[0x20, 3, 0x01, 0x87, 0], V5));
}

#[test]
fn mqtt_connack_return_code_reserved() {
    assert_protocol(server_error(&[0x20, 2, 0, 6], V311));
}

#[test]
fn mqtt5_connack_reason_code_not_allowed() {
    assert_protocol(server_error(&[0x20, 3, 0, 0x8E, 0], V5));
}

#[test]
fn mqtt_connack_trailing_bytes() {
    assert_malformed(server_error(&[0x20, 3, 0, 0, 0], V311));
}

#[test]
fn mqtt5_connack_property_values() {
    // Maximum QoS, Retain Available and the three "available" flags are 0 or 1; Receive Maximum
    // and Maximum Packet Size are never 0.
    for props in [
        &[0x24, 2][..],
        &[0x25, 2],
        &[0x28, 2],
        &[0x29, 2],
        &[0x2A, 2],
        &[0x21, 0, 0],
        &[0x27, 0, 0, 0, 0],
        &[0x24, 0, 0x24, 1],
    ] {
        assert_protocol(server_error(&frame(0x20, &cat(&[&[0, 0], &properties(props)])), V5));
    }
}

#[test]
fn mqtt5_connack_property_not_allowed() {
    assert_protocol(server_error(&frame(0x20, &cat(&[&[0, 0], &properties(&[0x18, 0, 0, 0, 1])])), V5));
}

#[test]
fn mqtt_3_9_3_2_suback_return_code_reserved() {
    assert_protocol(server_error(&[0x90, 3, 0, 1, 0x03], V311));
    assert_protocol(server_error(&[0x90, 3, 0, 1, 0x87], V311));
}

#[test]
fn mqtt5_3_9_3_2_suback_reason_code() {
    assert_protocol(server_error(&[0x90, 4, 0, 1, 0, 0x03], V5));
}

#[test]
fn mqtt_unsuback_length_must_be_2() {
    assert_malformed(server_error(&[0xB0, 3, 0, 1, 0], V311));
}

#[test]
fn mqtt5_3_11_3_2_unsuback_reason_code() {
    assert_protocol(server_error(&[0xB0, 4, 0, 1, 0, 0x01], V5));
}
