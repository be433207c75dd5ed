//! Round trips through the codec's public API: `decode(encode(p)) == p` for every packet type in
//! every version (the hand-written samples), then for generated packets (proptest), with
//! `encoded_len` checked against what `encode` wrote each time. Touches only the codec's public API.

#[path = "codec_samples.rs"]
mod samples;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use wharf_mqtt::codec::{
    Auth, ConnAck, ConnAckProperties, Connect, ConnectProperties, DecodeError, Disconnect, Packet, ProtocolVersion,
    PubResponse, Publish, PublishProperties, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will, WillProperties, decode, decode_from_server, encode, encoded_len,
};

use samples::VERSIONS;

/// Encodes, checks the length, decodes from the given side and checks nothing is left.
fn round_trip(packet: &Packet, version: ProtocolVersion, from_client: bool) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf);
    assert_eq!(buf.len(), encoded_len(packet, version), "encoded_len of {packet:?}");
    let decoded = if from_client {
        let connection_version = if matches!(packet, Packet::Connect(_)) { None } else { Some(version) };
        decode(&mut buf, connection_version, u32::MAX)
    } else {
        decode_from_server(&mut buf, version, u32::MAX)
    };
    if decoded.is_ok() {
        assert!(buf.is_empty(), "{} bytes left after {packet:?}", buf.len());
    }
    decoded
}

#[test]
fn every_packet_type_round_trips_in_every_version() {
    for version in VERSIONS {
        for (name, packet) in samples::from_client(version) {
            assert_eq!(round_trip(&packet, version, true), Ok(Some(packet)), "client {name} {version:?}");
        }
        for (name, packet) in samples::from_server(version) {
            assert_eq!(round_trip(&packet, version, false), Ok(Some(packet)), "server {name} {version:?}");
        }
    }
}

#[test]
fn samples_cover_every_packet_type_in_every_version() {
    const ALL: [&str; 15] = [
        "AUTH",
        "CONNACK",
        "CONNECT",
        "DISCONNECT",
        "PINGREQ",
        "PINGRESP",
        "PUBACK",
        "PUBCOMP",
        "PUBLISH",
        "PUBREC",
        "PUBREL",
        "SUBACK",
        "SUBSCRIBE",
        "UNSUBACK",
        "UNSUBSCRIBE",
    ];
    for version in VERSIONS {
        let mut names: Vec<&str> =
            samples::from_client(version).iter().chain(&samples::from_server(version)).map(|(_, p)| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        let expected: Vec<&str> = ALL.iter().copied().filter(|name| version.is_v5() || *name != "AUTH").collect();
        assert_eq!(names, expected, "{version:?}");
    }
}

#[test]
fn packets_only_the_other_side_sends_are_protocol_errors() {
    for version in VERSIONS {
        for (name, packet) in samples::from_server(version) {
            // PUBLISH, the acknowledgements, MQTT 5 DISCONNECT and AUTH go both ways.
            if matches!(packet, Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp) {
                assert!(
                    matches!(round_trip(&packet, version, true), Err(DecodeError::Protocol(_))),
                    "{name} from a client, {version:?}"
                );
            }
        }
        for (name, packet) in samples::from_client(version) {
            if matches!(packet, Packet::Connect(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) | Packet::PingReq) {
                assert!(
                    matches!(round_trip(&packet, version, false), Err(DecodeError::Protocol(_))),
                    "{name} from a server, {version:?}"
                );
            }
        }
    }
}

// ----- generated packets -------------------------------------------------------------------------

/// Any UTF-8 string the decoder accepts: no U+0000 (Rust strings hold no surrogates).
fn text() -> impl Strategy<Value = String> {
    "[^\\x00]{0,6}"
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z0-9/$ é]{1,10}"
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_owned()), "[a-z$]{0,3}"];
    (proptest::option::of("[a-z]{1,4}"), prop::collection::vec(level, 1..4), any::<bool>()).prop_map(
        |(share, levels, multi_level)| {
            let mut filter = levels.join("/");
            if multi_level {
                filter.push_str("/#");
            } else if filter.is_empty() {
                // A topic filter is never empty [MQTT-4.7.3-1].
                filter.push('#');
            }
            match share {
                Some(group) => format!("$share/{group}/{filter}"),
                None => filter,
            }
        },
    )
}

fn blob() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..12).prop_map(Bytes::from)
}

fn user_properties(v5: bool) -> BoxedStrategy<Vec<(String, String)>> {
    if v5 { prop::collection::vec((text(), text()), 0..3).boxed() } else { Just(Vec::new()).boxed() }
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn reason_code(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    prop::sample::select(codes).prop_map(ReasonCode)
}

fn subscription_identifier() -> impl Strategy<Value = u32> {
    1..=268_435_455u32
}

fn will(v5: bool) -> impl Strategy<Value = Will> {
    let properties = if v5 {
        (
            any::<Option<u32>>(),
            proptest::option::of(0..=1u8),
            any::<Option<u32>>(),
            proptest::option::of(text()),
            proptest::option::of(topic_name()),
            proptest::option::of(blob()),
            user_properties(true),
        )
            .prop_map(|(delay, format, expiry, content_type, response_topic, correlation, user)| WillProperties {
                will_delay_interval_secs: delay,
                payload_format_indicator: format,
                message_expiry_interval_secs: expiry,
                content_type,
                response_topic,
                correlation_data: correlation,
                user_properties: user,
            })
            .boxed()
    } else {
        Just(WillProperties::default()).boxed()
    };
    (topic_name(), blob(), qos(), any::<bool>(), properties)
        .prop_map(|(topic, payload, qos, retain, properties)| Will { topic, payload, qos, retain, properties })
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    let properties = if v5 {
        (
            any::<Option<u32>>(),
            proptest::option::of(1..=u16::MAX),
            proptest::option::of(1..=u32::MAX),
            any::<Option<u16>>(),
            any::<Option<bool>>(),
            any::<Option<bool>>(),
            user_properties(true),
            proptest::option::of((text(), proptest::option::of(blob()))),
        )
            .prop_map(|(expiry, receive, packet_size, alias_max, response, problem, user, auth)| {
                let (authentication_method, authentication_data) = match auth {
                    Some((method, data)) => (Some(method), data),
                    None => (None, None),
                };
                ConnectProperties {
                    session_expiry_interval_secs: expiry,
                    receive_maximum: receive,
                    maximum_packet_size: packet_size,
                    topic_alias_maximum: alias_max,
                    request_response_information: response,
                    request_problem_information: problem,
                    user_properties: user,
                    authentication_method,
                    authentication_data,
                }
            })
            .boxed()
    } else {
        Just(ConnectProperties::default()).boxed()
    };
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        proptest::option::of(will(v5)),
        proptest::option::of(text()),
        proptest::option::of(blob()),
        properties,
    )
        .prop_map(move |(clean_start, keep_alive_secs, client_id, will, username, password, properties)| {
            // 3.1 and 3.1.1 refuse a password without a user name [MQTT-3.1.2-22].
            let username = if password.is_some() && !v5 { Some(username.unwrap_or_default()) } else { username };
            Packet::Connect(Box::new(Connect {
                protocol: Some(version),
                clean_start,
                keep_alive_secs,
                client_id,
                will,
                username,
                password,
                properties,
            }))
        })
}

fn publish(version: ProtocolVersion, from_server: bool) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    let properties = if v5 {
        let subscription_identifiers = if from_server {
            prop::collection::vec(subscription_identifier(), 0..3).boxed()
        } else {
            Just(Vec::new()).boxed()
        };
        (
            proptest::option::of(0..=1u8),
            any::<Option<u32>>(),
            proptest::option::of(1..=u16::MAX),
            proptest::option::of(topic_name()),
            proptest::option::of(blob()),
            user_properties(true),
            subscription_identifiers,
            proptest::option::of(text()),
        )
            .prop_map(|(format, expiry, alias, response_topic, correlation, user, ids, content_type)| {
                PublishProperties {
                    payload_format_indicator: format,
                    message_expiry_interval_secs: expiry,
                    topic_alias: alias,
                    response_topic,
                    correlation_data: correlation,
                    user_properties: user,
                    subscription_identifiers: ids,
                    content_type,
                }
            })
            .boxed()
    } else {
        Just(PublishProperties::default()).boxed()
    };
    (any::<bool>(), qos(), any::<bool>(), topic_name(), packet_id(), properties, blob(), any::<bool>()).prop_map(
        move |(dup, qos, retain, topic, packet_id, properties, payload, drop_topic)| {
            let at_most_once = qos == QoS::AtMostOnce;
            // An empty Topic Name is valid in MQTT 5 when a Topic Alias stands for it.
            let topic = if drop_topic && properties.topic_alias.is_some() { String::new() } else { topic };
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: (!at_most_once).then_some(packet_id),
                properties,
                payload,
            })
        },
    )
}

fn pub_response(v5: bool, codes: &'static [u8]) -> impl Strategy<Value = PubResponse> {
    let fields = if v5 {
        (reason_code(codes), proptest::option::of(text()), user_properties(true)).boxed()
    } else {
        Just((ReasonCode::SUCCESS, None, Vec::new())).boxed()
    };
    (packet_id(), fields).prop_map(|(packet_id, (reason_code, reason_string, user_properties))| PubResponse {
        packet_id,
        reason_code,
        reason_string,
        user_properties,
    })
}

const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];

fn acknowledgement(v5: bool) -> impl Strategy<Value = Packet> {
    prop_oneof![
        pub_response(v5, PUBACK_CODES).prop_map(Packet::PubAck),
        pub_response(v5, PUBACK_CODES).prop_map(Packet::PubRec),
        pub_response(v5, PUBREL_CODES).prop_map(Packet::PubRel),
        pub_response(v5, PUBREL_CODES).prop_map(Packet::PubComp),
    ]
}

fn subscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let options = (qos(), any::<bool>(), any::<bool>(), 0..=2u8).prop_map(
        move |(qos, no_local, retain_as_published, retain_handling)| {
            if v5 {
                SubscriptionOptions { qos, no_local, retain_as_published, retain_handling }
            } else {
                SubscriptionOptions { qos, ..SubscriptionOptions::default() }
            }
        },
    );
    let identifier = if v5 { proptest::option::of(subscription_identifier()).boxed() } else { Just(None).boxed() };
    (packet_id(), identifier, user_properties(v5), prop::collection::vec((topic_filter(), options), 1..4)).prop_map(
        |(packet_id, subscription_identifier, user_properties, mut filters)| {
            // No Local on a shared subscription is a Protocol Error [MQTT-3.8.3-4].
            for (filter, options) in &mut filters {
                if filter.starts_with("$share/") {
                    options.no_local = false;
                }
            }
            Packet::Subscribe(Subscribe { packet_id, subscription_identifier, user_properties, filters })
        },
    )
}

fn unsubscribe(v5: bool) -> impl Strategy<Value = Packet> {
    (packet_id(), user_properties(v5), prop::collection::vec(topic_filter(), 1..4)).prop_map(
        |(packet_id, user_properties, filters)| {
            Packet::Unsubscribe(Unsubscribe { packet_id, user_properties, filters })
        },
    )
}

fn disconnect(v5: bool, from_server: bool) -> BoxedStrategy<Packet> {
    if !v5 {
        return Just(Packet::Disconnect(Disconnect::default())).boxed();
    }
    const CLIENT: &[u8] = &[0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99];
    const SERVER: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98,
        0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    // A server never sends a Session Expiry Interval in DISCONNECT [MQTT-3.14.2-2].
    let expiry = if from_server { Just(None).boxed() } else { any::<Option<u32>>().boxed() };
    (
        reason_code(if from_server { SERVER } else { CLIENT }),
        expiry,
        proptest::option::of(text()),
        user_properties(true),
        proptest::option::of(text()),
    )
        .prop_map(|(reason_code, session_expiry_interval_secs, reason_string, user_properties, server_reference)| {
            Packet::Disconnect(Disconnect {
                reason_code,
                session_expiry_interval_secs,
                reason_string,
                user_properties,
                server_reference,
            })
        })
        .boxed()
}

fn auth(from_server: bool) -> impl Strategy<Value = Packet> {
    let codes: &'static [u8] = if from_server { &[0x00, 0x18] } else { &[0x18, 0x19] };
    (reason_code(codes), text(), proptest::option::of(blob()), proptest::option::of(text()), user_properties(true))
        .prop_map(|(reason_code, method, authentication_data, reason_string, user_properties)| {
            Packet::Auth(Auth {
                reason_code,
                authentication_method: Some(method),
                authentication_data,
                reason_string,
                user_properties,
            })
        })
}

fn connack(v5: bool) -> impl Strategy<Value = Packet> {
    const CODES: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A,
        0x9B, 0x9C, 0x9D, 0x9F,
    ];
    const V3_CODES: &[u8] = &[0, 1, 2, 3, 4, 5];
    let properties = if v5 {
        (
            (
                any::<Option<u32>>(),
                proptest::option::of(1..=u16::MAX),
                proptest::option::of(0..=1u8),
                any::<Option<bool>>(),
                proptest::option::of(1..=u32::MAX),
                proptest::option::of(text()),
                any::<Option<u16>>(),
                proptest::option::of(text()),
            ),
            (
                user_properties(true),
                any::<Option<bool>>(),
                any::<Option<bool>>(),
                any::<Option<bool>>(),
                any::<Option<u16>>(),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of((text(), proptest::option::of(blob()))),
            ),
        )
            .prop_map(
                |(
                    (expiry, receive, max_qos, retain, packet_size, assigned, alias_max, reason),
                    (user, wildcard, identifiers, shared, keep_alive, response, reference, auth),
                )| {
                    let (authentication_method, authentication_data) = match auth {
                        Some((method, data)) => (Some(method), data),
                        None => (None, None),
                    };
                    ConnAckProperties {
                        session_expiry_interval_secs: expiry,
                        receive_maximum: receive,
                        maximum_qos: max_qos,
                        retain_available: retain,
                        maximum_packet_size: packet_size,
                        assigned_client_identifier: assigned,
                        topic_alias_maximum: alias_max,
                        reason_string: reason,
                        user_properties: user,
                        wildcard_subscription_available: wildcard,
                        subscription_identifiers_available: identifiers,
                        shared_subscription_available: shared,
                        server_keep_alive_secs: keep_alive,
                        response_information: response,
                        server_reference: reference,
                        authentication_method,
                        authentication_data,
                    }
                },
            )
            .boxed()
    } else {
        Just(ConnAckProperties::default()).boxed()
    };
    (any::<bool>(), reason_code(if v5 { CODES } else { V3_CODES }), properties).prop_map(
        |(session_present, reason_code, properties)| {
            // Session Present only with success [MQTT-3.2.2-6].
            let session_present = session_present && reason_code == ReasonCode::SUCCESS;
            Packet::ConnAck(ConnAck { session_present, reason_code, properties })
        },
    )
}

fn suback(v5: bool) -> impl Strategy<Value = Packet> {
    const CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
    const V3_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80];
    let reason_string = if v5 { proptest::option::of(text()).boxed() } else { Just(None).boxed() };
    (
        packet_id(),
        reason_string,
        user_properties(v5),
        prop::collection::vec(reason_code(if v5 { CODES } else { V3_CODES }), 1..4),
    )
        .prop_map(|(packet_id, reason_string, user_properties, reason_codes)| {
            Packet::SubAck(SubAck { packet_id, reason_string, user_properties, reason_codes })
        })
}

fn unsuback(v5: bool) -> BoxedStrategy<Packet> {
    const CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
    if !v5 {
        return packet_id()
            .prop_map(|packet_id| Packet::UnsubAck(UnsubAck { packet_id, ..UnsubAck::default() }))
            .boxed();
    }
    (packet_id(), proptest::option::of(text()), user_properties(true), prop::collection::vec(reason_code(CODES), 1..4))
        .prop_map(|(packet_id, reason_string, user_properties, reason_codes)| {
            Packet::UnsubAck(UnsubAck { packet_id, reason_string, user_properties, reason_codes })
        })
        .boxed()
}

/// Any packet a client may send in `version`.
fn client_packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let common = prop_oneof![
        connect(version),
        publish(version, false),
        acknowledgement(v5),
        subscribe(v5),
        unsubscribe(v5),
        Just(Packet::PingReq),
        disconnect(v5, false),
    ];
    if v5 { prop_oneof![6 => common, 1 => auth(false)].boxed() } else { common.boxed() }
}

/// Any packet a server may send in `version`.
fn server_packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let common = prop_oneof![
        connack(v5),
        publish(version, true),
        acknowledgement(v5),
        suback(v5),
        unsuback(v5),
        Just(Packet::PingResp)
    ];
    if v5 { prop_oneof![6 => common, 1 => disconnect(true, true), 1 => auth(true)].boxed() } else { common.boxed() }
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop::sample::select(&VERSIONS[..])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn generated_client_packets_round_trip(
        (version, packet) in version().prop_flat_map(|version| (Just(version), client_packet(version)))
    ) {
        prop_assert_eq!(round_trip(&packet, version, true), Ok(Some(packet)));
    }

    #[test]
    fn generated_server_packets_round_trip(
        (version, packet) in version().prop_flat_map(|version| (Just(version), server_packet(version)))
    ) {
        prop_assert_eq!(round_trip(&packet, version, false), Ok(Some(packet)));
    }

    /// Splitting a packet anywhere gives "need more bytes" (buffer untouched) until it is whole.
    #[test]
    fn every_prefix_is_incomplete(
        (version, packet) in version().prop_flat_map(|version| (Just(version), client_packet(version)))
    ) {
        let mut whole = BytesMut::new();
        encode(&packet, version, &mut whole);
        let connection_version = if matches!(packet, Packet::Connect(_)) { None } else { Some(version) };
        for len in 0..whole.len() {
            let mut prefix = BytesMut::from(&whole[..len]);
            prop_assert_eq!(decode(&mut prefix, connection_version, u32::MAX), Ok(None));
            prop_assert_eq!(prefix.len(), len);
        }
    }
}
