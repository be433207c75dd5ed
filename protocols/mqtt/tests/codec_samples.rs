//! Sample packets for the codec tests: one of every kind each side sends, valid for a version, with
//! every field that version carries. A module, not a test: `codec_roundtrip.rs` and
//! `codec_fuzz_corpus.rs` include it through `#[path]` (Cargo also builds it alone, with no tests).
//! Touches only the codec's public API.

#![allow(dead_code, reason = "each including test crate uses a different part of it")]

use bytes::Bytes;
use wharf_mqtt::codec::{
    Auth, ConnAck, ConnAckProperties, Connect, ConnectProperties, Disconnect, Packet, ProtocolVersion, PubResponse,
    Publish, PublishProperties, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
    WillProperties,
};

/// Every version this codec speaks.
pub const VERSIONS: [ProtocolVersion; 3] = [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5];

/// A short name for file names and messages.
pub fn version_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::V3_1 => "v31",
        ProtocolVersion::V3_1_1 => "v311",
        ProtocolVersion::V5 => "v5",
    }
}

fn user_properties(v5: bool) -> Vec<(String, String)> {
    if v5 { vec![("k".into(), "v".into()), ("k".into(), "w".into())] } else { vec![] }
}

fn response(v5: bool, packet_id: u16, reason_code: u8) -> PubResponse {
    if v5 {
        PubResponse {
            packet_id,
            reason_code: ReasonCode(reason_code),
            reason_string: Some("why".into()),
            user_properties: user_properties(v5),
        }
    } else {
        PubResponse { packet_id, ..PubResponse::default() }
    }
}

fn publish(v5: bool, from_server: bool) -> Publish {
    Publish {
        dup: true,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "sensors/kitchen/temperature".into(),
        packet_id: Some(42),
        properties: if v5 {
            PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval_secs: Some(120),
                topic_alias: Some(2),
                response_topic: Some("replies/kitchen".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: user_properties(v5),
                subscription_identifiers: if from_server { vec![1, 70_000] } else { vec![] },
                content_type: Some("text/plain".into()),
            }
        } else {
            PublishProperties::default()
        },
        payload: Bytes::from_static(b"21.5"),
    }
}

/// One packet of every kind a client sends in `version`, named.
pub fn from_client(version: ProtocolVersion) -> Vec<(&'static str, Packet)> {
    let v5 = version.is_v5();
    let connect = Connect {
        protocol: Some(version),
        clean_start: true,
        keep_alive_secs: 60,
        client_id: "sample-client".into(),
        will: Some(Will {
            topic: "clients/sample/status".into(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: if v5 {
                WillProperties {
                    will_delay_interval_secs: Some(10),
                    payload_format_indicator: Some(1),
                    message_expiry_interval_secs: Some(3600),
                    content_type: Some("text/plain".into()),
                    response_topic: Some("clients/sample/ack".into()),
                    correlation_data: Some(Bytes::from_static(b"c")),
                    user_properties: user_properties(v5),
                }
            } else {
                WillProperties::default()
            },
        }),
        username: Some("user".into()),
        password: Some(Bytes::from_static(b"pass")),
        properties: if v5 {
            ConnectProperties {
                session_expiry_interval_secs: Some(300),
                receive_maximum: Some(20),
                maximum_packet_size: Some(1 << 20),
                topic_alias_maximum: Some(10),
                request_response_information: Some(true),
                request_problem_information: Some(true),
                user_properties: user_properties(v5),
                authentication_method: Some("SCRAM-SHA-256".into()),
                authentication_data: Some(Bytes::from_static(b"n,,n=user,r=abc")),
            }
        } else {
            ConnectProperties::default()
        },
    };
    let mut packets = vec![
        ("connect", Packet::Connect(Box::new(connect))),
        ("connect_minimal", Packet::Connect(Box::new(Connect { protocol: Some(version), ..Connect::default() }))),
        ("publish_qos0", Packet::Publish(Publish { topic: "a/b".into(), ..Publish::default() })),
        ("publish_qos1", Packet::Publish(publish(v5, false))),
        (
            "publish_qos2",
            Packet::Publish(Publish {
                qos: QoS::ExactlyOnce,
                packet_id: Some(u16::MAX),
                topic: "t".into(),
                ..Publish::default()
            }),
        ),
        ("puback", Packet::PubAck(response(v5, 1, 0x10))),
        ("pubrec", Packet::PubRec(response(v5, 2, 0x80))),
        ("pubrel", Packet::PubRel(response(v5, 3, 0x92))),
        ("pubcomp", Packet::PubComp(response(v5, 4, 0x00))),
        ("puback_short", Packet::PubAck(PubResponse { packet_id: 5, ..PubResponse::default() })),
        (
            "subscribe",
            Packet::Subscribe(Subscribe {
                packet_id: 7,
                subscription_identifier: v5.then_some(268_435_455),
                user_properties: user_properties(v5),
                filters: vec![
                    (
                        "sensors/+/temperature".into(),
                        SubscriptionOptions {
                            qos: QoS::ExactlyOnce,
                            no_local: v5,
                            retain_as_published: v5,
                            retain_handling: if v5 { 2 } else { 0 },
                        },
                    ),
                    ("$share/workers/jobs/#".into(), SubscriptionOptions::default()),
                    ("#".into(), SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() }),
                ],
            }),
        ),
        (
            "unsubscribe",
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 8,
                user_properties: user_properties(v5),
                filters: vec!["sensors/+/temperature".into(), "#".into()],
            }),
        ),
        ("pingreq", Packet::PingReq),
        ("disconnect", Packet::Disconnect(Disconnect::default())),
    ];
    if v5 {
        packets.push((
            "disconnect_with_properties",
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
                session_expiry_interval_secs: Some(0),
                reason_string: Some("bye".into()),
                user_properties: user_properties(v5),
                server_reference: None,
            }),
        ));
        packets.push((
            "publish_topic_alias",
            Packet::Publish(Publish {
                topic: String::new(),
                properties: PublishProperties { topic_alias: Some(2), ..PublishProperties::default() },
                payload: Bytes::from_static(b"22.0"),
                ..Publish::default()
            }),
        ));
        packets.push((
            "auth",
            Packet::Auth(Auth {
                reason_code: ReasonCode::RE_AUTHENTICATE,
                authentication_method: Some("SCRAM-SHA-256".into()),
                authentication_data: Some(Bytes::from_static(b"proof")),
                reason_string: Some("again".into()),
                user_properties: user_properties(v5),
            }),
        ));
    }
    packets
}

/// One packet of every kind a server sends in `version`, named.
pub fn from_server(version: ProtocolVersion) -> Vec<(&'static str, Packet)> {
    let v5 = version.is_v5();
    let mut packets = vec![
        (
            "connack",
            Packet::ConnAck(ConnAck {
                session_present: true,
                reason_code: ReasonCode::SUCCESS,
                properties: if v5 {
                    ConnAckProperties {
                        session_expiry_interval_secs: Some(300),
                        receive_maximum: Some(100),
                        maximum_qos: Some(1),
                        retain_available: Some(true),
                        maximum_packet_size: Some(1 << 16),
                        assigned_client_identifier: Some("auto-7f3a".into()),
                        topic_alias_maximum: Some(16),
                        reason_string: Some("welcome".into()),
                        user_properties: user_properties(v5),
                        wildcard_subscription_available: Some(true),
                        subscription_identifiers_available: Some(true),
                        shared_subscription_available: Some(true),
                        server_keep_alive_secs: Some(30),
                        response_information: Some("responses/".into()),
                        server_reference: Some("other.example:1883".into()),
                        authentication_method: Some("SCRAM-SHA-256".into()),
                        authentication_data: Some(Bytes::from_static(b"v=signature")),
                    }
                } else {
                    ConnAckProperties::default()
                },
            }),
        ),
        (
            "connack_refused",
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: ReasonCode(if v5 { 0x86 } else { 0x04 }),
                properties: ConnAckProperties::default(),
            }),
        ),
        ("publish_qos1", Packet::Publish(publish(v5, true))),
        ("puback", Packet::PubAck(response(v5, 1, 0x00))),
        ("pubrec", Packet::PubRec(response(v5, 2, 0x10))),
        ("pubrel", Packet::PubRel(response(v5, 3, 0x00))),
        ("pubcomp", Packet::PubComp(response(v5, 4, 0x92))),
        (
            "suback",
            Packet::SubAck(SubAck {
                packet_id: 7,
                reason_string: v5.then(|| "partly".into()),
                user_properties: user_properties(v5),
                reason_codes: vec![ReasonCode::GRANTED_QOS_2, ReasonCode::GRANTED_QOS_0, ReasonCode::UNSPECIFIED_ERROR],
            }),
        ),
        (
            "unsuback",
            Packet::UnsubAck(UnsubAck {
                packet_id: 8,
                reason_string: v5.then(|| "done".into()),
                user_properties: user_properties(v5),
                reason_codes: if v5 { vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED] } else { vec![] },
            }),
        ),
        ("pingresp", Packet::PingResp),
    ];
    if v5 {
        packets.push((
            "disconnect",
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::SERVER_SHUTTING_DOWN,
                session_expiry_interval_secs: None,
                reason_string: Some("maintenance".into()),
                user_properties: user_properties(v5),
                server_reference: Some("other.example:1883".into()),
            }),
        ));
        packets.push(("auth_success", Packet::Auth(Auth::default())));
        packets.push((
            "auth_continue",
            Packet::Auth(Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                authentication_method: Some("SCRAM-SHA-256".into()),
                authentication_data: Some(Bytes::from_static(b"r=abcdef,s=salt,i=4096")),
                reason_string: None,
                user_properties: vec![],
            }),
        ));
    }
    packets
}
