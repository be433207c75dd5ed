//! Byte-level conformance with the raw client: every malformed-packet and protocol-error rule in
//! MQTT 3.1.1 and 5.0 (3.1.1: the connection is closed, with no CONNACK for a bad CONNECT; MQTT 5:
//! CONNACK or DISCONNECT with the reason code first), keep alive, flow control, and the exact
//! bytes of successful exchanges (session present, PINGRESP, QoS 2 with a retransmission).
//!
//! Each test starts its own broker and checks both protocol versions where the rule exists in
//! both. Before a violation a test shows that the well-formed variant of the same packet is
//! accepted on the same connection, so a closure is caused by the violation and nothing else.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::harness::Broker;
use crate::raw::{
    self, CLOSE_TIMEOUT, CONNACK, Connect, Next, PINGREQ, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, Prop, Publish, Raw,
    SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, Will, ack, hex, packet, prop, subscribe, subscribe_with,
    unsubscribe_with,
};

// MQTT 5 reason codes.
const MALFORMED: u8 = 0x81;
const PROTOCOL_ERROR: u8 = 0x82;
const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
const NOT_AUTHORIZED: u8 = 0x87;
const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
const TOPIC_FILTER_INVALID: u8 = 0x8F;
const TOPIC_NAME_INVALID: u8 = 0x90;
const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
const TOPIC_ALIAS_INVALID: u8 = 0x94;
const PACKET_TOO_LARGE: u8 = 0x95;

/// Wait for extra packets after the expected ones (a duplicate would be sent right behind).
const SETTLE: Duration = Duration::from_millis(500);

fn label(v5: bool) -> &'static str {
    if v5 { "MQTT 5" } else { "MQTT 3.1.1" }
}

/// `prefix` with a number never used before in this process: each connection of a test gets its
/// own client id, so a closing connection's session clean-up never meets the next one.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// An empty MQTT 5 property list, or none for 3.1.1.
fn no_props(v5: bool) -> Option<&'static [Prop<'static>]> {
    if v5 { Some(&[]) } else { None }
}

/// A CONNECT of the given version.
fn connect(v5: bool, client_id: &str) -> Connect<'_> {
    if v5 { Connect::v5(client_id) } else { Connect::v4(client_id) }
}

/// Send a CONNECT that breaks a rule: 3.1.1 closes with no CONNACK; MQTT 5 answers CONNACK with
/// one of `reasons` (and Session Present 0), then closes.
fn expect_connect_refused(broker: &Broker, v5: bool, connect_bytes: &[u8], reasons: &[u8], what: &str) {
    let what = format!("{} {what}", label(v5));
    let mut raw = Raw::connect(broker.mqtt_addr());
    raw.send_lenient(connect_bytes);
    if v5 {
        let connack = raw.expect_connack_then_close(true, &what);
        assert!(
            reasons.contains(&connack.code),
            "{what}: CONNACK reason 0x{:02x}, expected one of {reasons:02x?}",
            connack.code
        );
        assert!(!connack.session_present, "{what}: Session Present must be 0 in a refusing CONNACK [MQTT-3.2.2-6]");
    } else {
        raw.expect_closed(&what);
    }
}

/// Open a session, check it works with `control` (bytes, the packet type answering them), send
/// `bad`, and expect 3.1.1 to close and MQTT 5 to DISCONNECT with one of `reasons`.
fn expect_packet_refused(
    broker: &Broker,
    v5: bool,
    client_id: &str,
    control: Option<(&[u8], u8)>,
    bad: &[u8],
    reasons: &[u8],
    what: &str,
) {
    let what = format!("{} {what} ({})", label(v5), hex(bad));
    let mut raw = Raw::open(broker.mqtt_addr(), v5, &unique(client_id));
    if let Some((bytes, answer)) = control {
        raw.send(bytes);
        raw.expect_kind(answer, &format!("{what}: the well-formed variant"));
    } else {
        raw.ping();
    }
    raw.send_lenient(bad);
    raw.expect_refused(reasons, &what);
}

// ----- CONNECT ----------------------------------------------------------------------------------

#[test]
fn mqtt_3_1_0_1_first_packet_must_be_connect() {
    let broker = Broker::start();
    let firsts: [(&str, Vec<u8>); 4] = [
        ("PINGREQ", raw::pingreq()),
        ("PUBLISH", Publish::new("a/b", 0, b"x").encode()),
        ("SUBSCRIBE", subscribe(false, 1, &[("a/b", 0)])),
        ("DISCONNECT", raw::disconnect(false, 0)),
    ];
    for (name, bytes) in firsts {
        let mut raw = Raw::connect(broker.mqtt_addr());
        raw.send_lenient(&bytes);
        raw.expect_closed(&format!("{name} as the first packet"));
    }
    // Control: CONNECT as the first packet is accepted.
    Raw::open(broker.mqtt_addr(), false, "first-connect").ping();
}

#[test]
fn mqtt_3_1_0_2_second_connect_is_protocol_error() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let id = format!("second-connect-{v5}");
        let bytes = connect(v5, &id).encode();
        expect_packet_refused(&broker, v5, &id, None, &bytes, &[PROTOCOL_ERROR], "second CONNECT");
    }
}

#[test]
fn mqtt_3_1_2_1_wrong_protocol_name() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let mut bad = connect(v5, "wrong-name");
        bad.protocol_name = "MQTX";
        let bytes = bad.encode();
        let what = format!("{} CONNECT with protocol name MQTX ({})", label(v5), hex(&bytes));
        let mut raw = Raw::connect(broker.mqtt_addr());
        raw.send_lenient(&bytes);
        // The server MAY close at once or (MQTT 5) answer CONNACK 0x84 first; it must not accept.
        for reply in raw.expect_eventually_closed(&what) {
            assert_eq!(reply.kind(), CONNACK, "{what}: unexpected {}", hex(&reply.bytes()));
            if reply.body.len() == 2 {
                assert_ne!(reply.body[1], 0, "{what}: CONNACK accepted the connection");
            } else {
                let code = reply.connack(true).code;
                assert_eq!(
                    code,
                    UNSUPPORTED_PROTOCOL_VERSION,
                    "{what}: an MQTT 5 CONNACK refusing it must say 0x84 (Unsupported Protocol Version), got {}",
                    hex(&reply.bytes())
                );
            }
        }
    }
}

#[test]
fn mqtt_3_1_2_2_unsupported_protocol_level() {
    let broker = Broker::start();
    for level in [6u8, 0, 2, 255] {
        let mut bad = Connect::v4("bad-level");
        bad.level = level;
        let what = format!("CONNECT with protocol level {level}");
        let mut raw = Raw::connect(broker.mqtt_addr());
        raw.send_lenient(&bad.encode());
        let reply = raw.expect_packet(&what);
        assert_eq!(
            reply.bytes(),
            vec![CONNACK << 4, 2, 0, 1],
            "{what}: expected a 3.1.1 CONNACK 0x01 (unacceptable protocol level), got {}",
            hex(&reply.bytes())
        );
        raw.expect_closed(&format!("{what}, after CONNACK"));
    }
}

#[test]
fn mqtt_3_1_2_3_connect_reserved_flag() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let mut bad = connect(v5, "reserved-flag");
        bad.flags = Some(bad.computed_flags() | 0x01);
        expect_connect_refused(&broker, v5, &bad.encode(), &[MALFORMED], "CONNECT with the reserved flag set");
    }
}

/// MQTT 5: [MQTT-3.1.2-11] and [MQTT-3.1.2-13].
#[test]
fn mqtt_3_1_2_13_will_qos_and_retain_without_will_flag() {
    let broker = Broker::start();
    for v5 in [false, true] {
        for (extra, name) in [(0x08u8, "Will QoS 1"), (0x10, "Will QoS 2"), (0x20, "Will Retain")] {
            let mut bad = connect(v5, "will-bits");
            bad.flags = Some(bad.computed_flags() | extra);
            expect_connect_refused(
                &broker,
                v5,
                &bad.encode(),
                &[MALFORMED],
                &format!("CONNECT with {name} and no Will Flag"),
            );
        }
    }
}

/// MQTT 5: [MQTT-3.1.2-12].
#[test]
fn mqtt_3_1_2_14_will_qos_3() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let will = Will { topic: "will/t", payload: b"gone", qos: 0, retain: false, properties: Vec::new() };
        let mut bad = connect(v5, "will-qos3").will(will);
        bad.flags = Some(bad.computed_flags() | 0x18);
        expect_connect_refused(&broker, v5, &bad.encode(), &[MALFORMED], "CONNECT with Will QoS 3");
    }
}

#[test]
fn mqtt_3_1_2_22_password_without_username() {
    let broker = Broker::start();
    let mut bad = Connect::v4("password-only");
    bad.password = Some(b"secret");
    expect_connect_refused(&broker, false, &bad.encode(), &[], "CONNECT with a Password and no User Name");
}

#[test]
fn mqtt_3_1_3_8_empty_client_id_requires_clean_session() {
    let broker = Broker::start();
    let mut raw = Raw::connect(broker.mqtt_addr());
    raw.send(&Connect::v4("").clean(false).encode());
    let reply = raw.expect_packet("empty client id with CleanSession 0");
    assert_eq!(
        reply.bytes(),
        vec![CONNACK << 4, 2, 0, 2],
        "expected CONNACK 0x02 (identifier rejected), got {}",
        hex(&reply.bytes())
    );
    raw.expect_closed("empty client id with CleanSession 0, after CONNACK");
    // [MQTT-3.1.3-6]: with CleanSession 1 an empty client id is accepted.
    let (mut raw, _) = Raw::session(broker.mqtt_addr(), &Connect::v4(""));
    raw.ping();
}

#[test]
fn mqtt_1_5_3_1_invalid_utf8_client_id() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let mut bad = connect(v5, "");
        bad.client_id = b"bad\xc3\x28id";
        expect_connect_refused(&broker, v5, &bad.encode(), &[MALFORMED], "CONNECT with an ill-formed UTF-8 client id");
    }
}

/// MQTT 5: [MQTT-4.12.0-1] (the server does not support the method: 0x8C or 0x87, then close).
#[test]
fn mqtt5_4_12_0_1_unsupported_authentication_method() {
    let broker = Broker::start();
    let bad = Connect::v5("auth-method").properties(&[
        Prop::Str(prop::AUTHENTICATION_METHOD, "SCRAM-SHA-1"),
        Prop::Bin(prop::AUTHENTICATION_DATA, b"client-first"),
    ]);
    expect_connect_refused(
        &broker,
        true,
        &bad.encode(),
        &[BAD_AUTHENTICATION_METHOD, NOT_AUTHORIZED],
        "CONNECT with an Authentication Method",
    );
}

#[test]
fn mqtt5_4_12_0_7_auth_without_authentication_method() {
    let broker = Broker::start();
    let auth_bare = packet(raw::AUTH << 4, &[0x18, 0]);
    let mut with_method = vec![0x18];
    with_method.extend(raw::props(&[Prop::Str(prop::AUTHENTICATION_METHOD, "SCRAM-SHA-1")]));
    let auth_method = packet(raw::AUTH << 4, &with_method);
    for (bad, what) in [(auth_bare, "AUTH without properties"), (auth_method, "AUTH with a method not in CONNECT")] {
        expect_packet_refused(&broker, true, "auth", None, &bad, &[PROTOCOL_ERROR], what);
    }
}

#[test]
fn mqtt5_2_2_2_2_duplicate_property_is_protocol_error() {
    let broker = Broker::start();
    let bad = Connect::v5("dup-prop")
        .properties(&[Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 10), Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 20)]);
    expect_connect_refused(
        &broker,
        true,
        &bad.encode(),
        &[PROTOCOL_ERROR],
        "CONNECT with Session Expiry Interval twice",
    );

    let control = Publish::new("dup/prop", 1, b"x").v5(&[Prop::Four(prop::MESSAGE_EXPIRY_INTERVAL, 10)]).encode();
    for (list, name) in [
        (
            vec![Prop::Four(prop::MESSAGE_EXPIRY_INTERVAL, 10), Prop::Four(prop::MESSAGE_EXPIRY_INTERVAL, 20)],
            "Message Expiry Interval",
        ),
        (vec![Prop::Str(prop::CONTENT_TYPE, "a"), Prop::Str(prop::CONTENT_TYPE, "b")], "Content Type"),
        (
            vec![Prop::Byte(prop::PAYLOAD_FORMAT_INDICATOR, 1), Prop::Byte(prop::PAYLOAD_FORMAT_INDICATOR, 1)],
            "Payload Format Indicator",
        ),
    ] {
        let bad = Publish::new("dup/prop", 1, b"x").id(2).v5(&list).encode();
        expect_packet_refused(
            &broker,
            true,
            "dup-prop-publish",
            Some((&control, PUBACK)),
            &bad,
            &[PROTOCOL_ERROR],
            &format!("PUBLISH with {name} twice"),
        );
    }
}

// ----- fixed header -----------------------------------------------------------------------------

#[test]
fn mqtt_2_2_2_2_reserved_fixed_header_flags() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let cases: [(&str, Vec<u8>); 4] = [
            ("PINGREQ with flags 0001", vec![(PINGREQ << 4) | 1, 0]),
            ("DISCONNECT with flags 0100", {
                let mut d = raw::disconnect(v5, 0);
                d[0] |= 0x04;
                d
            }),
            ("UNSUBSCRIBE with flags 0000", unsubscribe_with(UNSUBSCRIBE << 4, v5, 1, &["a/b"])),
            ("PUBACK with flags 1000", packet((PUBACK << 4) | 0x08, &1u16.to_be_bytes())),
        ];
        for (what, bad) in cases {
            expect_packet_refused(&broker, v5, "reserved-flags", None, &bad, &[MALFORMED], what);
        }
    }
}

#[test]
fn mqtt_2_2_3_remaining_length_over_four_bytes() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let bad = [PUBLISH << 4, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
        expect_packet_refused(&broker, v5, "long-length", None, &bad, &[MALFORMED], "Remaining Length of 5 bytes");
    }
}

#[test]
fn mqtt_3_12_1_pingreq_with_remaining_length() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = raw::pingreq();
        let bad = packet(PINGREQ << 4, &[0]);
        expect_packet_refused(
            &broker,
            v5,
            "ping-body",
            Some((&control, raw::PINGRESP)),
            &bad,
            &[MALFORMED],
            "PINGREQ with a body",
        );
    }
}

// ----- PUBLISH ----------------------------------------------------------------------------------

#[test]
fn mqtt_3_3_1_4_publish_qos_3() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = Publish::new("qos/three", 1, b"x").version5(v5).encode();
        let bad = Publish::new("qos/three", 3, b"x").id(2).version5(v5).encode();
        expect_packet_refused(&broker, v5, "qos3", Some((&control, PUBACK)), &bad, &[MALFORMED], "PUBLISH with QoS 3");
    }
}

#[test]
fn mqtt_3_3_1_2_dup_set_for_qos_0() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = Publish::new("dup/zero", 1, b"x").dup(true).version5(v5).encode();
        let bad = Publish::new("dup/zero", 0, b"x").dup(true).version5(v5).encode();
        expect_packet_refused(
            &broker,
            v5,
            "dup0",
            Some((&control, PUBACK)),
            &bad,
            &[MALFORMED, PROTOCOL_ERROR],
            "PUBLISH with DUP 1 and QoS 0",
        );
    }
}

#[test]
fn mqtt_3_3_2_2_publish_topic_with_wildcards() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = Publish::new("plain/topic", 1, b"x").version5(v5).encode();
        for topic in ["a/+", "a/#", "+", "#", "a/b+c"] {
            let bad = Publish::new(topic, 1, b"x").id(2).version5(v5).encode();
            expect_packet_refused(
                &broker,
                v5,
                "wildcard-topic",
                Some((&control, PUBACK)),
                &bad,
                &[MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID],
                &format!("PUBLISH to {topic:?}"),
            );
        }
    }
}

/// MQTT 5: an empty Topic Name without a Topic Alias is a Protocol Error (3.3.2.1).
#[test]
fn mqtt_4_7_3_1_publish_empty_topic() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = Publish::new("non/empty", 1, b"x").version5(v5).encode();
        let bad = Publish::new("", 1, b"x").id(2).version5(v5).encode();
        expect_packet_refused(
            &broker,
            v5,
            "empty-topic",
            Some((&control, PUBACK)),
            &bad,
            &[MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID],
            "PUBLISH with an empty topic",
        );
    }
}

/// MQTT 5: [MQTT-1.5.4-2].
#[test]
fn mqtt_1_5_3_2_null_character_in_topic() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = Publish::new("no/null", 1, b"x").version5(v5).encode();
        let bad = Publish::new("", 1, b"x").raw_topic(b"a/\0/b").id(2).version5(v5).encode();
        expect_packet_refused(
            &broker,
            v5,
            "null-topic",
            Some((&control, PUBACK)),
            &bad,
            &[MALFORMED],
            "PUBLISH topic with U+0000",
        );
        let control = subscribe(v5, 1, &[("no/null", 0)]);
        let bad = subscribe(v5, 2, &[("a/\0/b", 0)]);
        expect_packet_refused(
            &broker,
            v5,
            "null-filter",
            Some((&control, SUBACK)),
            &bad,
            &[MALFORMED],
            "SUBSCRIBE filter with U+0000",
        );
    }
}

/// MQTT 5: [MQTT-1.5.4-1].
#[test]
fn mqtt_1_5_3_1_invalid_utf8_topic() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = Publish::new("valid/é", 1, b"x").version5(v5).encode();
        for (topic, name) in [
            (&b"a/\xff"[..], "byte 0xFF"),
            (b"a/\xc3\x28", "a bad continuation byte"),
            (b"a/\xed\xa0\x80", "an encoded surrogate U+D800"),
            (b"a/\xc0\xaf", "an overlong encoding"),
        ] {
            let bad = Publish::new("", 1, b"x").raw_topic(topic).id(2).version5(v5).encode();
            expect_packet_refused(
                &broker,
                v5,
                "utf8-topic",
                Some((&control, PUBACK)),
                &bad,
                &[MALFORMED],
                &format!("PUBLISH topic with {name}"),
            );
        }
    }
}

// ----- PUBREL -----------------------------------------------------------------------------------

#[test]
fn mqtt_3_6_1_1_pubrel_reserved_flags() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let what = format!("{} PUBREL with flags 0000", label(v5));
        let mut raw = Raw::open(broker.mqtt_addr(), v5, "pubrel-flags");
        // Control: a whole QoS 2 exchange with the valid PUBREL.
        raw.send(&Publish::new("pubrel/flags", 2, b"x").id(1).version5(v5).encode());
        assert_eq!(raw.expect_kind(PUBREC, &what).packet_id(), 1);
        raw.send(&ack(PUBREL, 1));
        assert_eq!(raw.expect_kind(PUBCOMP, &what).packet_id(), 1);
        raw.send(&Publish::new("pubrel/flags", 2, b"x").id(2).version5(v5).encode());
        assert_eq!(raw.expect_kind(PUBREC, &what).packet_id(), 2);
        raw.send_lenient(&packet(PUBREL << 4, &2u16.to_be_bytes()));
        raw.expect_refused(&[MALFORMED], &what);
    }
}

// ----- SUBSCRIBE and UNSUBSCRIBE ----------------------------------------------------------------

#[test]
fn mqtt_3_8_1_1_subscribe_reserved_flags() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = subscribe(v5, 1, &[("sub/flags", 1)]);
        for first in [0x80u8, 0x83, 0x8A] {
            let bad = subscribe_with(first, 2, &[("sub/flags", 1)], no_props(v5));
            expect_packet_refused(
                &broker,
                v5,
                "sub-flags",
                Some((&control, SUBACK)),
                &bad,
                &[MALFORMED],
                &format!("SUBSCRIBE with first byte 0x{first:02x}"),
            );
        }
    }
}

/// MQTT 5: [MQTT-3.8.3-2].
#[test]
fn mqtt_3_8_3_3_subscribe_without_filters() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = subscribe(v5, 1, &[("sub/none", 1)]);
        let bad = subscribe_with((SUBSCRIBE << 4) | 2, 2, &[], no_props(v5));
        expect_packet_refused(
            &broker,
            v5,
            "sub-none",
            Some((&control, SUBACK)),
            &bad,
            &[PROTOCOL_ERROR],
            "SUBSCRIBE without a topic filter",
        );
    }
}

#[test]
fn mqtt_3_10_3_2_unsubscribe_without_filters() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = unsubscribe_with((UNSUBSCRIBE << 4) | 2, v5, 1, &["unsub/none"]);
        let bad = unsubscribe_with((UNSUBSCRIBE << 4) | 2, v5, 2, &[]);
        expect_packet_refused(
            &broker,
            v5,
            "unsub-none",
            Some((&control, UNSUBACK)),
            &bad,
            &[PROTOCOL_ERROR],
            "UNSUBSCRIBE without a topic filter",
        );
    }
}

/// 3.1.1 [MQTT-3-8.3-4] (reserved bits or QoS 3: malformed); MQTT 5 [MQTT-3.8.3-5] (reserved bits:
/// malformed), and Maximum QoS 3, Retain Handling 3 and No Local on a shared subscription
/// ([MQTT-3.8.3-4]): protocol errors (3.8.3.1).
#[test]
fn mqtt_3_8_3_4_subscribe_reserved_option_bits() {
    let broker = Broker::start();
    let v4_cases = [(0x04u8, "reserved bit 2"), (0x80, "reserved bit 7"), (0x03, "QoS 3")];
    for (options, name) in v4_cases {
        let control = subscribe(false, 1, &[("sub/opts", 1)]);
        let bad = subscribe(false, 2, &[("sub/opts", options)]);
        expect_packet_refused(
            &broker,
            false,
            "sub-opts",
            Some((&control, SUBACK)),
            &bad,
            &[],
            &format!("SUBSCRIBE options with {name}"),
        );
    }
    let v5_cases = [
        ("sub/opts", 0x41u8, "reserved bit 6", MALFORMED),
        ("sub/opts", 0x81, "reserved bit 7", MALFORMED),
        ("sub/opts", 0x03, "Maximum QoS 3", PROTOCOL_ERROR),
        ("sub/opts", 0x31, "Retain Handling 3", PROTOCOL_ERROR),
        ("$share/g/sub/opts", 0x05, "No Local on a shared subscription", PROTOCOL_ERROR),
    ];
    for (filter, options, name, reason) in v5_cases {
        // Control: the valid option bits on the same filter are accepted (QoS 2, Retain As
        // Published, Retain Handling 2, and No Local where allowed).
        let valid = if filter.starts_with("$share/") { 0x2A } else { 0x2E };
        let mut raw = Raw::open(broker.mqtt_addr(), true, &unique("sub-opts5"));
        raw.send(&subscribe(true, 1, &[(filter, valid)]));
        let (_, codes) = raw.expect_kind(SUBACK, name).suback(true);
        assert_eq!(codes, vec![2], "MQTT 5 SUBSCRIBE {filter} with options 0x{valid:02x}");
        raw.send_lenient(&subscribe(true, 2, &[(filter, options)]));
        raw.expect_refused(&[reason], &format!("MQTT 5 SUBSCRIBE options with {name}"));
    }
}

/// [MQTT-4.7.1-2] ('#' last and alone in its level) and [MQTT-4.7.1-3] ('+' alone in its level).
#[test]
fn mqtt_4_7_1_2_invalid_wildcard_filters() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let control = subscribe(v5, 1, &[("a/+/#", 1)]);
        for filter in ["a/b#", "a/#/b", "#/a", "a+/b", "a/+b", "a/b+"] {
            let bad = subscribe(v5, 2, &[(filter, 1)]);
            expect_packet_refused(
                &broker,
                v5,
                "bad-wildcard",
                Some((&control, SUBACK)),
                &bad,
                &[MALFORMED, PROTOCOL_ERROR, TOPIC_FILTER_INVALID],
                &format!("SUBSCRIBE to {filter:?}"),
            );
        }
    }
}

// ----- limits -----------------------------------------------------------------------------------

/// The server's Maximum Packet Size is announced, and a bigger packet is DISCONNECT 0x95.
#[test]
fn mqtt5_3_2_2_15_packet_too_large() {
    let broker = Broker::builder().env("WHARF__MQTT__PACKET_SIZE_MAX_BYTES", 1024).start();
    let (mut raw, connack) = Raw::session(broker.mqtt_addr(), &Connect::v5("too-large"));
    assert_eq!(
        connack.properties.int(prop::MAXIMUM_PACKET_SIZE),
        Some(1024),
        "CONNACK Maximum Packet Size: {connack:?}"
    );
    let fits = vec![b'x'; 900];
    raw.send(&Publish::new("size/ok", 1, &fits).v5(&[]).encode());
    raw.expect_kind(PUBACK, "a 900-byte PUBLISH under the maximum");
    let big = vec![b'x'; 2000];
    raw.send_lenient(&Publish::new("size/big", 1, &big).id(2).v5(&[]).encode());
    raw.expect_disconnect(&[PACKET_TOO_LARGE], "MQTT 5 PUBLISH of 2000 bytes over a 1024-byte maximum");

    let mut raw = Raw::open(broker.mqtt_addr(), false, "too-large-v4");
    raw.send(&Publish::new("size/ok", 1, &fits).encode());
    raw.expect_kind(PUBACK, "3.1.1 PUBLISH under the maximum");
    raw.send_lenient(&Publish::new("size/big", 1, &big).id(2).encode());
    raw.expect_closed("3.1.1 PUBLISH of 2000 bytes over a 1024-byte maximum");
}

/// The server enforces the Receive Maximum it announces.
#[test]
fn mqtt5_3_3_4_7_receive_maximum_exceeded() {
    let broker = Broker::builder().env("WHARF__MQTT__RECEIVE_MAXIMUM", 2).start();
    let (mut raw, connack) = Raw::session(broker.mqtt_addr(), &Connect::v5("receive-max"));
    assert_eq!(connack.properties.int(prop::RECEIVE_MAXIMUM), Some(2), "CONNACK Receive Maximum: {connack:?}");
    let publish = |id: u16| Publish::new("recv/max", 2, b"x").id(id).v5(&[]).encode();
    // Two unacknowledged QoS 2 PUBLISHes (PUBREC received, no PUBREL sent) fill the quota.
    for id in [1, 2] {
        raw.send(&publish(id));
        assert_eq!(raw.expect_kind(PUBREC, "PUBLISH within the Receive Maximum").packet_id(), id);
    }
    // Completing one frees a slot.
    raw.send(&ack(PUBREL, 1));
    assert_eq!(raw.expect_kind(PUBCOMP, "PUBREL 1").packet_id(), 1);
    raw.send(&publish(3));
    assert_eq!(raw.expect_kind(PUBREC, "PUBLISH in the freed slot").packet_id(), 3);
    // Ids 2 and 3 are outstanding: a third is one too many.
    raw.send_lenient(&publish(4));
    raw.expect_disconnect(&[RECEIVE_MAXIMUM_EXCEEDED], "a third unacknowledged QoS 2 PUBLISH with Receive Maximum 2");
}

/// [MQTT-4.13.1-1]: the server closes after a protocol error, and should send DISCONNECT with the
/// reason first. A client still sending when the server closes (here the PUBRELs a QoS 2 publisher
/// sends while it reads its backlog of PUBRECs, as the Paho interoperability suite's
/// `test_flow_control2` does) can still write, reads the DISCONNECT, and sees the connection end
/// in order: a reset would fail its writes and can destroy the DISCONNECT before it is read.
#[test]
fn mqtt5_4_13_1_1_disconnect_reaches_a_client_still_sending() {
    let broker = Broker::builder().env("WHARF__MQTT__RECEIVE_MAXIMUM", 2).start();
    let (mut raw, _) = Raw::session(broker.mqtt_addr(), &Connect::v5("linger"));
    let publish = |id: u16| Publish::new("linger/t", 2, b"x").id(id).v5(&[]).encode();
    // Three unacknowledged QoS 2 PUBLISHes in one write: the third exceeds Receive Maximum 2.
    let burst: Vec<u8> = [1, 2, 3].into_iter().flat_map(publish).collect();
    raw.send(&burst);
    // Give the server time to send DISCONNECT and finish its teardown, then write more without
    // having read anything.
    sleep(Duration::from_secs(1));
    for id in [1, 2] {
        if let Err(error) = raw.try_send(&ack(PUBREL, id)) {
            panic!("PUBREL {id} written after the server's DISCONNECT: {error} (the connection was reset)");
        }
        sleep(Duration::from_millis(100));
    }
    let mut packets = Vec::new();
    loop {
        match raw.next(CLOSE_TIMEOUT) {
            Next::Packet(packet) => packets.push(packet),
            Next::Closed => break,
            Next::Timeout => panic!("the connection is still open {CLOSE_TIMEOUT:?} after DISCONNECT"),
        }
    }
    let shown: Vec<String> = packets.iter().map(|p| hex(&p.bytes())).collect();
    let (last, before) = packets.split_last().unwrap_or_else(|| panic!("nothing before the close: {shown:?}"));
    assert_eq!(last.kind(), raw::DISCONNECT, "the last packet before the close: {shown:?}");
    assert_eq!(last.disconnect_reason(), RECEIVE_MAXIMUM_EXCEEDED, "DISCONNECT reason: {shown:?}");
    assert!(before.iter().all(|p| p.kind() == PUBREC), "only PUBRECs may precede the DISCONNECT: {shown:?}");
    assert!(!raw.closed_by_reset(), "the connection ended with a reset, not in order, after {shown:?}");
}

/// The server does not send more unacknowledged QoS 1/2 PUBLISHes than the client's Receive
/// Maximum.
#[test]
fn mqtt5_3_3_4_9_server_respects_client_receive_maximum() {
    let broker = Broker::start();
    let connect = Connect::v5("client-recv-max").properties(&[Prop::Two(prop::RECEIVE_MAXIMUM, 2)]);
    let (mut sub, _) = Raw::session(broker.mqtt_addr(), &connect);
    sub.subscribe(1, "window/t", 1);
    let mut publisher = Raw::open(broker.mqtt_addr(), true, "client-recv-max-pub");
    for n in 0..5u16 {
        publisher.send(&Publish::new("window/t", 1, format!("m{n}").as_bytes()).id(n + 1).v5(&[]).encode());
        publisher.expect_kind(PUBACK, "publisher PUBACK");
    }
    let first = sub.expect_publish("first of the window");
    let second = sub.expect_publish("second of the window");
    sub.expect_silence(Duration::from_secs(1), "a third PUBLISH while two are unacknowledged (Receive Maximum 2)");
    // Acknowledging one lets exactly one more through.
    sub.send(&ack(PUBACK, first.packet_id.expect("QoS 1 has an id")));
    let third = sub.expect_publish("after one PUBACK");
    sub.expect_silence(SETTLE, "a fourth PUBLISH while two are unacknowledged");
    let payloads: Vec<Vec<u8>> = [first, second, third].into_iter().map(|m| m.payload).collect();
    assert_eq!(payloads, vec![b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()], "delivery order");
}

// ----- topic aliases (MQTT 5) -------------------------------------------------------------------

#[test]
fn mqtt5_3_3_2_8_topic_alias_zero() {
    let broker = Broker::start();
    let control = Publish::new("alias/zero", 1, b"x").v5(&[Prop::Two(prop::TOPIC_ALIAS, 1)]).encode();
    let bad = Publish::new("alias/zero", 1, b"x").id(2).v5(&[Prop::Two(prop::TOPIC_ALIAS, 0)]).encode();
    expect_packet_refused(
        &broker,
        true,
        "alias-zero",
        Some((&control, PUBACK)),
        &bad,
        &[TOPIC_ALIAS_INVALID],
        "Topic Alias 0",
    );
}

/// [MQTT-3.3.2-9] (above the announced maximum: 0x94) and [MQTT-3.3.2-12] (every alias up to the
/// maximum is accepted and resolved).
#[test]
fn mqtt5_3_3_2_9_topic_alias_above_maximum() {
    let broker = Broker::builder().env("WHARF__MQTT__TOPIC_ALIAS_MAX", 2).start();
    let mut sub = Raw::open(broker.mqtt_addr(), false, "alias-sub");
    sub.subscribe(1, "alias/#", 1);
    let (mut raw, connack) = Raw::session(broker.mqtt_addr(), &Connect::v5("alias-max"));
    assert_eq!(connack.properties.int(prop::TOPIC_ALIAS_MAXIMUM), Some(2), "CONNACK Topic Alias Maximum: {connack:?}");
    raw.send(&Publish::new("alias/x", 1, b"set").id(1).v5(&[Prop::Two(prop::TOPIC_ALIAS, 2)]).encode());
    raw.expect_kind(PUBACK, "PUBLISH setting alias 2");
    raw.send(&Publish::new("", 1, b"used").id(2).v5(&[Prop::Two(prop::TOPIC_ALIAS, 2)]).encode());
    raw.expect_kind(PUBACK, "PUBLISH using alias 2");
    let got = sub.receive_acking(2, SETTLE, "messages published with alias 2");
    let got: Vec<(&str, &[u8])> = got.iter().map(|m| (m.topic.as_str(), m.payload.as_slice())).collect();
    assert_eq!(got, vec![("alias/x", &b"set"[..]), ("alias/x", &b"used"[..])]);
    raw.send_lenient(&Publish::new("alias/y", 1, b"x").id(3).v5(&[Prop::Two(prop::TOPIC_ALIAS, 3)]).encode());
    raw.expect_disconnect(&[TOPIC_ALIAS_INVALID], "Topic Alias 3 above the maximum of 2");
}

/// 3.3.2.3.4: an empty Topic Name with an alias that has no mapping is a Protocol Error.
#[test]
fn mqtt5_3_3_2_3_4_unmapped_topic_alias() {
    let broker = Broker::start();
    let control = Publish::new("alias/known", 1, b"x").v5(&[Prop::Two(prop::TOPIC_ALIAS, 1)]).encode();
    let bad = Publish::new("", 1, b"x").id(2).v5(&[Prop::Two(prop::TOPIC_ALIAS, 2)]).encode();
    expect_packet_refused(
        &broker,
        true,
        "alias-unknown",
        Some((&control, PUBACK)),
        &bad,
        &[PROTOCOL_ERROR],
        "empty topic with an unmapped Topic Alias",
    );
}

// ----- keep alive -------------------------------------------------------------------------------

/// Keep alive 1 s: packets every 0.9 s keep the connection; after silence the server closes it
/// 1.5 s after the last packet (MQTT 5: DISCONNECT 0x8D first).
fn keep_alive_check(v5: bool) {
    let broker = Broker::start();
    let what = format!("{} keep alive 1 s", label(v5));
    let (mut raw, connack) = Raw::session(broker.mqtt_addr(), &connect(v5, "keep-alive").keep_alive(1));
    if let Some(server) = connack.properties.int(prop::SERVER_KEEP_ALIVE) {
        assert_eq!(server, 1, "{what}: Server Keep Alive changed an allowed Keep Alive");
    }
    for _ in 0..3 {
        sleep(Duration::from_millis(900));
        raw.ping();
    }
    let last_sent = Instant::now();
    raw.send(&raw::pingreq());
    raw.expect_kind(raw::PINGRESP, &what);
    if v5 {
        raw.expect_disconnect(&[KEEP_ALIVE_TIMEOUT], &what);
    } else {
        raw.expect_closed(&what);
    }
    let elapsed = last_sent.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed <= Duration::from_millis(3000),
        "{what}: closed {elapsed:?} after the last packet, expected 1.5 s (one and a half keep alives)"
    );
}

#[test]
fn mqtt_3_1_2_24_keep_alive_disconnect() {
    keep_alive_check(false);
}

#[test]
fn mqtt5_3_1_2_22_keep_alive_disconnect() {
    keep_alive_check(true);
}

/// With `mqtt.keep_alive_max_secs` 2, a larger (or zero) Keep Alive is answered with Server Keep
/// Alive 2, which the server then enforces; an allowed one is kept.
#[test]
fn mqtt5_3_2_2_21_server_keep_alive() {
    let broker = Broker::builder().env("WHARF__MQTT__KEEP_ALIVE_MAX_SECS", 2).start();
    let (_, connack) = Raw::session(broker.mqtt_addr(), &Connect::v5("ska-zero").keep_alive(0));
    assert_eq!(connack.properties.int(prop::SERVER_KEEP_ALIVE), Some(2), "Keep Alive 0: {connack:?}");
    let (_, connack) = Raw::session(broker.mqtt_addr(), &Connect::v5("ska-one").keep_alive(1));
    if let Some(server) = connack.properties.int(prop::SERVER_KEEP_ALIVE) {
        assert_eq!(server, 1, "Keep Alive 1 is allowed and must not change: {connack:?}");
    }
    let connected = Instant::now();
    let (mut raw, connack) = Raw::session(broker.mqtt_addr(), &Connect::v5("ska-big").keep_alive(60));
    assert_eq!(connack.properties.int(prop::SERVER_KEEP_ALIVE), Some(2), "Keep Alive 60: {connack:?}");
    raw.expect_disconnect(&[KEEP_ALIVE_TIMEOUT], "silence after Server Keep Alive 2");
    let elapsed = connected.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2900) && elapsed <= Duration::from_millis(4500),
        "closed {elapsed:?} after CONNECT, expected 3 s (1.5 x Server Keep Alive 2)"
    );
}

// ----- successful exchanges ---------------------------------------------------------------------

/// [MQTT-3.2.2-1] to [MQTT-3.2.2-3] (MQTT 5: [MQTT-3.2.2-2], -3): Session Present reflects
/// whether a session was resumed.
#[test]
fn mqtt_3_2_2_2_connack_session_present() {
    let broker = Broker::start();
    let expiry = [Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 300)];
    for v5 in [false, true] {
        let id = format!("session-present-{v5}");
        let persistent = || {
            let c = connect(v5, &id).clean(false);
            if v5 { c.properties(&expiry) } else { c }
        };
        let steps = [
            (persistent(), false, "first persistent connection"),
            (persistent(), true, "second persistent connection"),
            (connect(v5, &id).clean(true), false, "clean connection"),
            (persistent(), false, "persistent connection after the clean one ended the session"),
        ];
        for (connect, expected, step) in steps {
            let (mut raw, connack) = Raw::session(broker.mqtt_addr(), &connect);
            assert_eq!(connack.session_present, expected, "{} {step}: Session Present", label(v5));
            raw.send(&raw::disconnect(v5, 0));
            raw.expect_eventually_closed(step);
        }
    }
}

#[test]
fn mqtt_3_12_4_1_pingreq_answered_by_pingresp() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let mut raw = Raw::open(broker.mqtt_addr(), v5, "ping");
        for _ in 0..3 {
            raw.ping();
        }
    }
}

/// The receiver of a QoS 2 PUBLISH answers a retransmission (DUP 1, same packet id) before PUBREL
/// with PUBREC again, and does not deliver the message twice; after PUBCOMP the id is free for a
/// new message. MQTT 5: [MQTT-4.3.3-9].
#[test]
fn mqtt_4_3_3_2_qos2_retransmitted_publish_delivered_once() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let what = label(v5);
        let topic = format!("qos2/dup/{v5}");
        let mut sub = Raw::open(broker.mqtt_addr(), false, &format!("qos2-sub-{v5}"));
        sub.subscribe(1, &topic, 2);
        let mut publisher = Raw::open(broker.mqtt_addr(), v5, &format!("qos2-pub-{v5}"));
        let first = Publish::new(&topic, 2, b"once").id(7).version5(v5);
        publisher.send(&first.encode());
        assert_eq!(publisher.expect_kind(PUBREC, what).packet_id(), 7, "{what}: PUBREC");
        publisher.send(&first.clone().dup(true).encode());
        let again = publisher.expect_kind(PUBREC, &format!("{what}: retransmitted PUBLISH before PUBREL"));
        assert_eq!(again.packet_id(), 7, "{what}: PUBREC for the retransmission");
        publisher.send(&ack(PUBREL, 7));
        assert_eq!(publisher.expect_kind(PUBCOMP, what).packet_id(), 7, "{what}: PUBCOMP");
        publisher.send(&Publish::new(&topic, 2, b"next").id(7).version5(v5).encode());
        assert_eq!(publisher.expect_kind(PUBREC, what).packet_id(), 7);
        publisher.send(&ack(PUBREL, 7));
        assert_eq!(publisher.expect_kind(PUBCOMP, what).packet_id(), 7);
        let got = sub.receive_acking(2, SETTLE, what);
        let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
        assert_eq!(payloads, vec![&b"once"[..], &b"next"[..]], "{what}: the subscriber's messages");
        assert!(got.iter().all(|m| m.qos == 2 && !m.retain), "{what}: delivered at QoS 2, RETAIN 0: {got:?}");
    }
}

/// On reconnection to a persistent session, unacknowledged PUBLISHes are sent again with DUP 1
/// and their original packet ids ([MQTT-3.3.1-1]).
#[test]
fn mqtt_4_4_0_1_unacknowledged_publish_resent_on_reconnect() {
    let broker = Broker::start();
    let expiry = [Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 300)];
    for v5 in [false, true] {
        let id = format!("resend-{v5}");
        let topic = format!("resend/{v5}");
        let persistent = || {
            let c = connect(v5, &id).clean(false);
            if v5 { c.properties(&expiry) } else { c }
        };
        let (mut sub, _) = Raw::session(broker.mqtt_addr(), &persistent());
        sub.subscribe(1, &topic, 1);
        let mut publisher = Raw::open(broker.mqtt_addr(), false, &format!("resend-pub-{v5}"));
        publisher.send(&Publish::new(&topic, 1, b"unacked").encode());
        publisher.expect_kind(PUBACK, "publisher PUBACK");
        let first = sub.expect_publish("first delivery");
        assert!(!first.dup, "{}: DUP on the first delivery", label(v5));
        sub.drop_connection();
        let (mut sub, connack) = Raw::session(broker.mqtt_addr(), &persistent());
        assert!(connack.session_present, "{}: the session must be resumed", label(v5));
        let again = sub.expect_publish("redelivery after reconnecting");
        assert_eq!(again.payload, b"unacked", "{}: redelivered message", label(v5));
        assert!(again.dup, "{}: a redelivered PUBLISH must have DUP 1", label(v5));
        assert_eq!(again.packet_id, first.packet_id, "{}: a redelivered PUBLISH keeps its packet id", label(v5));
        sub.send(&ack(PUBACK, again.packet_id.expect("QoS 1")));
        sub.expect_silence(SETTLE, "after acknowledging the redelivery");
    }
}

/// MQTT 5 DISCONNECT 0x04 publishes the Will; DISCONNECT 0x00 discards it ([MQTT-3.14.4-3]).
#[test]
fn mqtt5_3_14_2_1_disconnect_with_will_message() {
    let broker = Broker::start();
    let mut watcher = Raw::open(broker.mqtt_addr(), false, "will-watcher");
    watcher.subscribe(1, "will/#", 1);
    for (id, reason) in [("will-normal", 0x00u8), ("will-with-will", 0x04)] {
        let topic = format!("will/{id}");
        let will = Will { topic: &topic, payload: id.as_bytes(), qos: 1, retain: false, properties: Vec::new() };
        let (mut raw, _) = Raw::session(broker.mqtt_addr(), &Connect::v5(id).will(will));
        raw.send(&raw::disconnect(true, reason));
        raw.expect_eventually_closed(id);
    }
    let got = watcher.receive_acking(1, SETTLE, "the will of DISCONNECT 0x04");
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, vec!["will/will-with-will"], "only the DISCONNECT 0x04 will is published");
}

// ----- more session and delivery rules ----------------------------------------------------------

/// [MQTT-3.1.3-9] (3.1.1: CONNACK 0x02) and MQTT 5 [MQTT-3.1.3-8] (CONNACK 0x85): a client id
/// the server refuses (longer than `mqtt.client_id_len_max_bytes`) is answered, then closed.
#[test]
fn mqtt_3_1_3_9_rejected_client_id() {
    let broker = Broker::builder().env("WHARF__MQTT__CLIENT_ID_LEN_MAX_BYTES", 23).start();
    let long = "x".repeat(24);
    // Control: 23 bytes is accepted [MQTT-3.1.3-5].
    Raw::open(broker.mqtt_addr(), false, &"y".repeat(23)).ping();
    for v5 in [false, true] {
        let what = format!("{} CONNECT with a 24-byte client id over the 23-byte maximum", label(v5));
        let mut raw = Raw::connect(broker.mqtt_addr());
        raw.send_lenient(&connect(v5, &long).encode());
        let connack = raw.expect_connack_then_close(v5, &what);
        assert_eq!(connack.code, if v5 { 0x85 } else { 0x02 }, "{what}: CONNACK code");
    }
}

/// 3.1.2.11.2 and [MQTT-3.1.2-23]: a session is kept for its Session Expiry Interval after the
/// connection closes, and gone once the interval has passed.
#[test]
fn mqtt5_3_1_2_23_session_expiry_interval() {
    let broker = Broker::start();
    for (id, expiry) in [("expiry-short", 1u32), ("expiry-long", 60)] {
        let connect = Connect::v5(id).clean(false).properties(&[Prop::Four(prop::SESSION_EXPIRY_INTERVAL, expiry)]);
        let (mut raw, _) = Raw::session(broker.mqtt_addr(), &connect);
        raw.subscribe(1, "expiry/t", 1);
        raw.send(&raw::disconnect(true, 0));
        raw.expect_eventually_closed(id);
    }
    sleep(Duration::from_millis(2500));
    for (id, expected) in [("expiry-short", false), ("expiry-long", true)] {
        let connect = Connect::v5(id).clean(false).properties(&[Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 60)]);
        let (_, connack) = Raw::session(broker.mqtt_addr(), &connect);
        assert_eq!(connack.session_present, expected, "{id}: Session Present 2.5 s after disconnecting");
    }
}

/// [MQTT-3.14.2-2]: a DISCONNECT may not set a non-zero Session Expiry Interval when CONNECT had
/// 0; the server answers DISCONNECT 0x82, and the session still ends with the connection.
#[test]
fn mqtt5_3_14_2_2_disconnect_cannot_extend_a_zero_session_expiry() {
    let broker = Broker::start();
    let (mut raw, _) = Raw::session(broker.mqtt_addr(), &Connect::v5("expiry-zero").clean(false));
    raw.subscribe(1, "expiry/zero", 1);
    let mut body = vec![0x00];
    body.extend(raw::props(&[Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 60)]));
    raw.send_lenient(&packet(raw::DISCONNECT << 4, &body));
    raw.expect_disconnect(&[PROTOCOL_ERROR], "DISCONNECT with Session Expiry Interval 60 after CONNECT with none");
    let connect = Connect::v5("expiry-zero").clean(false).properties(&[Prop::Four(prop::SESSION_EXPIRY_INTERVAL, 60)]);
    let (_, connack) = Raw::session(broker.mqtt_addr(), &connect);
    assert!(!connack.session_present, "the session must have ended with the connection");
}

/// [MQTT-3.1.2-17]: a Will with Will Retain 1 is published as a retained message.
#[test]
fn mqtt_3_1_2_17_will_retain() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let topic = format!("will-retain/{v5}");
        let will = Will { topic: &topic, payload: b"last words", qos: 1, retain: true, properties: Vec::new() };
        let (raw, _) = Raw::session(broker.mqtt_addr(), &connect(v5, &format!("will-retain-{v5}")).will(will));
        raw.drop_connection();
        // The will is published asynchronously: poll with new subscribers until it is retained.
        let deadline = Instant::now() + raw::REPLY_TIMEOUT;
        loop {
            let mut sub = Raw::open(broker.mqtt_addr(), false, &unique("will-retain-sub"));
            sub.subscribe(1, &topic, 1);
            let got = sub.receive_acking(0, Duration::from_millis(300), "retained will");
            if let Some(message) = got.first() {
                assert_eq!((message.payload.as_slice(), message.retain), (&b"last words"[..], true), "{}", label(v5));
                break;
            }
            assert!(Instant::now() < deadline, "{}: the will was not retained", label(v5));
        }
    }
}

/// [MQTT-3.10.4-2]: after UNSUBSCRIBE no new messages are sent for the filter; MQTT 5 UNSUBACK
/// says 0x11 (No subscription existed) for a filter that was not subscribed.
#[test]
fn mqtt_3_10_4_2_unsubscribe_stops_delivery() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let topic = format!("unsub/{v5}");
        let mut sub = Raw::open(broker.mqtt_addr(), v5, &format!("unsub-{v5}"));
        sub.subscribe(1, &topic, 1);
        sub.subscribe(2, "unsub/control", 1);
        let mut publisher = Raw::open(broker.mqtt_addr(), false, &format!("unsub-pub-{v5}"));
        publisher.send(&Publish::new(&topic, 1, b"before").encode());
        publisher.expect_kind(PUBACK, "publish before UNSUBSCRIBE");
        assert_eq!(sub.receive_acking(1, Duration::ZERO, "before UNSUBSCRIBE")[0].payload, b"before");
        sub.send(&unsubscribe_with((UNSUBSCRIBE << 4) | 2, v5, 3, &[&topic, "unsub/never"]));
        let (id, codes) = sub.expect_kind(UNSUBACK, "UNSUBSCRIBE").suback(v5);
        assert_eq!(id, 3, "UNSUBACK packet id");
        if v5 {
            assert_eq!(codes, vec![0x00, 0x11], "MQTT 5 UNSUBACK reason codes");
        } else {
            assert!(codes.is_empty(), "3.1.1 UNSUBACK has no payload: {codes:?}");
        }
        publisher.send(&Publish::new(&topic, 1, b"after").id(2).encode());
        publisher.expect_kind(PUBACK, "publish after UNSUBSCRIBE");
        publisher.send(&Publish::new("unsub/control", 1, b"control").id(3).encode());
        publisher.expect_kind(PUBACK, "control publish");
        let got = sub.receive_acking(1, SETTLE, "after UNSUBSCRIBE");
        let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
        assert_eq!(payloads, vec![&b"control"[..]], "{}: only the still-subscribed topic", label(v5));
    }
}

/// 4.3.3: a PUBREL is always answered by PUBCOMP with its packet id, also for an id with no QoS
/// 2 exchange (MQTT 5: reason 0x00 or 0x92, Packet Identifier not found).
#[test]
fn mqtt_4_3_3_pubrel_for_unknown_packet_id() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let mut raw = Raw::open(broker.mqtt_addr(), v5, &format!("pubrel-unknown-{v5}"));
        raw.send(&ack(PUBREL, 99));
        let comp = raw.expect_kind(PUBCOMP, "PUBREL for packet id 99");
        assert_eq!(comp.packet_id(), 99, "{}: PUBCOMP packet id", label(v5));
        let reason = comp.body.get(2).copied().unwrap_or(0);
        assert!(reason == 0x00 || (v5 && reason == 0x92), "{}: PUBCOMP {}", label(v5), hex(&comp.bytes()));
        raw.ping();
    }
}

/// [MQTT-4.6.0-2], [MQTT-4.6.0-3]: acknowledgements in the order of the PUBLISHes;
/// [MQTT-4.6.0-6]: a topic is an Ordered Topic, delivered in the order published.
#[test]
fn mqtt_4_6_0_6_ordered_topic() {
    let broker = Broker::start();
    let mut sub = Raw::open(broker.mqtt_addr(), false, "ordered-sub");
    sub.subscribe(1, "ordered/t", 2);
    let mut publisher = Raw::open(broker.mqtt_addr(), false, "ordered-pub");
    let count: u16 = 100;
    for n in 1..=count {
        let qos = if n % 2 == 0 { 1 } else { 2 };
        publisher.send(&Publish::new("ordered/t", qos, n.to_string().as_bytes()).id(n).encode());
    }
    // PUBACKs and PUBRECs come back in the order of the PUBLISHes.
    let mut acked = Vec::new();
    while acked.len() < usize::from(count) {
        let reply = publisher.expect_packet("acknowledgements of pipelined PUBLISHes");
        let id = reply.packet_id();
        match reply.kind() {
            PUBACK | PUBREC => acked.push(id),
            PUBCOMP => {}
            _ => panic!("unexpected {}", hex(&reply.bytes())),
        }
        if reply.kind() == PUBREC {
            publisher.send(&ack(PUBREL, id));
        }
    }
    assert_eq!(acked, (1..=count).collect::<Vec<_>>(), "PUBACK/PUBREC order");
    let got = sub.receive_acking(usize::from(count), SETTLE, "the ordered messages");
    let numbers: Vec<u16> = got.iter().map(|m| String::from_utf8_lossy(&m.payload).parse().expect("number")).collect();
    assert_eq!(numbers, (1..=count).collect::<Vec<_>>(), "delivery order");
}

/// A QoS 1 PUBLISH the broker could not store for now (here its shard's request queue is full:
/// `limits.pending_requests_max` 1 against a pipelined burst) is never acknowledged. MQTT 3.1.1
/// has no negative PUBACK, so the server closes the connection instead, and the client sends the
/// message again on its next one [MQTT-4.4.0-1]. Every PUBACK it did send is for a stored message.
#[test]
fn mqtt311_a_publish_not_stored_is_not_acknowledged_but_the_connection_closed() {
    let broker = Broker::builder().env("WHARF__LIMITS__PENDING_REQUESTS_MAX", 1).start();
    let mut subscriber = Raw::open(broker.mqtt_addr(), false, "not-stored-sub");
    subscriber.subscribe(1, "not/stored", 1);
    let (mut publisher, _) = Raw::session(broker.mqtt_addr(), &Connect::v4("not-stored-pub"));
    let ids: Vec<u16> = (1..=2_000).collect();
    let payloads: Vec<[u8; 2]> = ids.iter().map(|id| id.to_be_bytes()).collect();
    let burst: Vec<u8> = ids
        .iter()
        .zip(&payloads)
        .flat_map(|(id, payload)| Publish::new("not/stored", 1, payload).id(*id).encode())
        .collect();
    publisher.send_lenient(&burst);
    let mut acked = std::collections::BTreeSet::new();
    let closed = loop {
        match publisher.next(CLOSE_TIMEOUT) {
            Next::Packet(packet) if packet.kind() == PUBACK => {
                acked.insert(packet.packet_id());
            }
            Next::Packet(packet) => panic!("unexpected {packet:?}"),
            Next::Closed => break true,
            Next::Timeout => break false,
        }
    };
    assert!(closed, "all {} PUBLISHes acknowledged: the burst never found the queue full", acked.len());
    assert!(acked.len() < ids.len(), "every PUBLISH acknowledged, yet the connection was closed");
    let mut delivered = std::collections::BTreeSet::new();
    while let Next::Packet(packet) = subscriber.next(Duration::from_secs(3)) {
        if packet.kind() == PUBLISH {
            let message = packet.publish(false);
            delivered.insert(u16::from_be_bytes([message.payload[0], message.payload[1]]));
            subscriber.send(&ack(PUBACK, packet.packet_id()));
        }
    }
    let lost: Vec<_> = acked.difference(&delivered).take(10).collect();
    assert!(lost.is_empty(), "acknowledged but never stored: {lost:?} ({} acknowledged)", acked.len());
}
