//! MQTT 5 behaviour seen through a real client library, rumqttc's `v5` module: QoS in both
//! directions, sessions with Session Expiry, takeover (DISCONNECT 0x8E), assigned client
//! identifiers, Wills and Will Delay, shared subscriptions, PUBLISH properties (user properties,
//! content type, payload format, response topic, correlation data, message expiry, subscription
//! identifiers), subscription options (No Local, Retain As Published, Retain Handling), topic
//! aliases both ways, Maximum Packet Size, Response Information, and Wharf's idempotency keys.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, DisconnectReasonCode, Filter, LastWill, LastWillProperties, Publish, PublishProperties, RetainForwardRule,
    SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, Incoming, MqttOptions, StateError};
use tokio::time::Instant;

use crate::harness::Broker;

rumqttc_client!();

/// Wait for extra messages after the expected ones.
const SETTLE: Duration = Duration::from_millis(500);

impl Client {
    /// PUBLISH with properties and wait for its acknowledgement.
    async fn publish_with(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
        properties: PublishProperties,
    ) -> Option<Incoming> {
        let payload: Vec<u8> = payload.into();
        self.client.publish_with_properties(topic, qos, retain, payload, properties).await.expect("queue PUBLISH");
        self.await_publish_ack(topic, qos).await
    }

    /// One SUBSCRIBE with these filters and Subscription Identifier; the SUBACK's codes.
    async fn subscribe_with(&mut self, filters: Vec<Filter>, id: Option<usize>) -> Vec<SubscribeReasonCode> {
        let what = filters.iter().map(|f| f.path.clone()).collect::<Vec<_>>().join(", ");
        let properties = SubscribeProperties { id, user_properties: Vec::new() };
        self.client.subscribe_many_with_properties(filters, properties).await.expect("queue SUBSCRIBE");
        self.await_suback(&what).await
    }
}

fn options(broker: &Broker, id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.mqtt_port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

async fn connect(broker: &Broker, id: &str) -> Client {
    Client::connect(options(broker, id)).await
}

/// Clean Start 0 and a Session Expiry Interval.
fn persistent(broker: &Broker, id: &str, expiry_secs: u32) -> MqttOptions {
    let mut options = options(broker, id);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(expiry_secs));
    options
}

fn text(publish: &Publish) -> (String, String) {
    (String::from_utf8_lossy(&publish.topic).into_owned(), String::from_utf8_lossy(&publish.payload).into_owned())
}

fn properties(publish: &Publish) -> PublishProperties {
    publish.properties.clone().unwrap_or_default()
}

fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

/// [MQTT-3.8.4-8]: each message arrives at the lower of its published QoS and the granted QoS.
#[tokio::test]
async fn mqtt5_3_8_4_8_qos_levels_both_directions() {
    let broker = Broker::start();
    let mut publisher = connect(&broker, "qos5-pub").await;
    for granted in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut sub = connect(&broker, &format!("qos5-sub-{}", granted as u8)).await;
        let filter = format!("qos5/{}/#", granted as u8);
        assert_eq!(sub.subscribe(&filter, granted).await, vec![SubscribeReasonCode::Success(granted)], "SUBACK");
        for published in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let topic = format!("qos5/{}/{}", granted as u8, published as u8);
            publisher.publish(&topic, published, false, format!("q{}", published as u8)).await;
            let got = sub.recv(&topic).await;
            assert_eq!(text(&got), (topic.clone(), format!("q{}", published as u8)));
            assert_eq!(got.qos as u8, (granted as u8).min(published as u8), "{topic}: delivered QoS");
        }
        sub.expect_no_publish(SETTLE, "one copy per message").await;
    }
}

/// [MQTT-3.1.2-5]: Clean Start 0 with a Session Expiry Interval resumes the session, with the QoS
/// 1 messages published while the client was away; Session Present is 1 ([MQTT-3.2.2-3]).
#[tokio::test]
async fn mqtt5_3_1_2_5_session_resumed_with_expiry() {
    let broker = Broker::start();
    let mut sub = Client::connect(persistent(&broker, "resume-sub", 300)).await;
    assert!(!sub.connack.session_present, "no session existed");
    sub.subscribe("resume/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = connect(&broker, "resume-pub").await;
    publisher.publish("resume/t", QoS::AtLeastOnce, false, "away-1").await;
    publisher.publish("resume/t", QoS::AtLeastOnce, false, "away-2").await;
    let mut sub = Client::connect(persistent(&broker, "resume-sub", 300)).await;
    assert!(sub.connack.session_present, "the session must be resumed");
    let got: Vec<_> = sub.recv_n(2, "messages published while away").await.iter().map(text).collect();
    assert_eq!(got, vec![("resume/t".into(), "away-1".into()), ("resume/t".into(), "away-2".into())]);
    sub.expect_no_publish(SETTLE, "no duplicates").await;
}

/// [MQTT-3.1.2-4]: Clean Start 1 discards the session; and a session with Session Expiry 0 (or
/// none) ends with its connection (3.1.2.11.2).
#[tokio::test]
async fn mqtt5_3_1_2_4_clean_start_and_expiry_zero_end_the_session() {
    let broker = Broker::start();
    let mut publisher = connect(&broker, "end-pub").await;

    let mut sub = Client::connect(persistent(&broker, "end-clean", 300)).await;
    sub.subscribe("end/clean", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut clean = Client::connect({
        let mut o = options(&broker, "end-clean");
        o.set_session_expiry_interval(Some(300));
        o
    })
    .await;
    assert!(!clean.connack.session_present, "Clean Start 1 never resumes a session");
    publisher.publish("end/clean", QoS::AtLeastOnce, false, "x").await;
    clean.expect_no_publish(SETTLE, "the discarded session's subscription").await;
    clean.disconnect().await;

    let mut sub = Client::connect({
        let mut o = options(&broker, "end-zero");
        o.set_clean_start(false);
        o
    })
    .await;
    sub.subscribe("end/zero", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut sub = Client::connect(persistent(&broker, "end-zero", 300)).await;
    assert!(!sub.connack.session_present, "a session without Session Expiry ends at disconnection");
    // Control: the new session's own subscription works; the old one's is gone.
    sub.subscribe("end/other", QoS::AtLeastOnce).await;
    publisher.publish("end/zero", QoS::AtLeastOnce, false, "old").await;
    publisher.publish("end/other", QoS::AtLeastOnce, false, "new").await;
    assert_eq!(text(&sub.recv("the new subscription's message").await), ("end/other".into(), "new".into()));
    sub.expect_no_publish(SETTLE, "nothing else").await;
}

/// [MQTT-3.1.4-3]: a second connection with the same client id takes over; the first gets
/// DISCONNECT 0x8E (Session taken over).
#[tokio::test]
async fn mqtt5_3_1_4_3_session_takeover_0x8e() {
    let broker = Broker::start();
    let mut first = connect(&broker, "takeover5").await;
    let mut second = connect(&broker, "takeover5").await;
    match first.expect_closed("the first connection after a takeover").await {
        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
            assert_eq!(reason_code, DisconnectReasonCode::SessionTakenOver, "DISCONNECT reason");
        }
        other => panic!("expected DISCONNECT 0x8E (Session taken over), the connection ended with {other:?}"),
    }
    second.subscribe("takeover5/t", QoS::AtLeastOnce).await;
    second.publish("takeover5/t", QoS::AtLeastOnce, false, "x").await;
    assert_eq!(text(&second.recv("a message on the new connection").await).1, "x");
}

/// [MQTT-3.1.3-6], [MQTT-3.1.3-7]: an empty client id gets a unique identifier, returned as
/// Assigned Client Identifier.
#[tokio::test]
async fn mqtt5_3_1_3_7_assigned_client_identifier() {
    let broker = Broker::start();
    let mut a = connect(&broker, "").await;
    let mut b = connect(&broker, "").await;
    let assigned = |client: &Client| {
        client.connack.properties.as_ref().and_then(|p| p.assigned_client_identifier.clone()).unwrap_or_default()
    };
    let (id_a, id_b) = (assigned(&a), assigned(&b));
    assert!(!id_a.is_empty() && !id_b.is_empty(), "CONNACK must carry Assigned Client Identifier: {:?}", a.connack);
    assert_ne!(id_a, id_b, "assigned identifiers must be unique");
    // Both connections are live sessions of their own.
    a.subscribe("assigned/t", QoS::AtLeastOnce).await;
    b.publish("assigned/t", QoS::AtLeastOnce, false, "hello").await;
    assert_eq!(text(&a.recv("a message between the two").await).1, "hello");
}

fn will(topic: &str, payload: &str, delay_secs: Option<u32>) -> LastWill {
    let properties = LastWillProperties {
        delay_interval: delay_secs,
        payload_format_indicator: Some(1),
        message_expiry_interval: None,
        content_type: Some("text/plain".into()),
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("z".into(), "1".into()), ("a".into(), "2".into())],
    };
    LastWill::new(topic, payload, QoS::AtLeastOnce, false, Some(properties))
}

/// [MQTT-3.1.2-8]: the Will is published when the connection is lost, with its properties
/// ([MQTT-3.1.3-10]: user properties in order); [MQTT-3.1.2-10]: DISCONNECT 0x00 discards it.
#[tokio::test]
async fn mqtt5_3_1_2_8_will_on_abnormal_disconnect_only() {
    let broker = Broker::start();
    let mut watcher = connect(&broker, "will5-watcher").await;
    watcher.subscribe("will5/#", QoS::AtLeastOnce).await;
    let mut polite = options(&broker, "will5-polite");
    polite.set_last_will(will("will5/polite", "polite is gone", None));
    Client::connect(polite).await.disconnect().await;
    let mut crashed = options(&broker, "will5-crashed");
    crashed.set_last_will(will("will5/crashed", "crashed is gone", None));
    Client::connect(crashed).await.drop_connection();
    let got = watcher.recv("the will of the dropped connection").await;
    assert_eq!(text(&got), ("will5/crashed".into(), "crashed is gone".into()), "only the dropped connection's will");
    let props = properties(&got);
    assert_eq!(props.content_type.as_deref(), Some("text/plain"), "Will Content Type");
    assert_eq!(props.payload_format_indicator, Some(1), "Will Payload Format Indicator");
    assert_eq!(props.user_properties, vec![("z".to_owned(), "1".to_owned()), ("a".to_owned(), "2".to_owned())]);
    watcher.expect_no_publish(SETTLE, "the will of the connection that sent DISCONNECT").await;
}

/// 3.1.3.2.2: a Will with a Will Delay Interval of 2 s is published about 2 s after the connection
/// is lost, and not at all if the client reconnects within the delay ([MQTT-3.1.3-9]).
#[tokio::test]
async fn mqtt5_3_1_3_9_will_delay_interval() {
    let broker = Broker::start();
    let mut watcher = connect(&broker, "delay-watcher").await;
    watcher.subscribe("delay/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str| {
        let mut o = options(&broker, id);
        o.set_session_expiry_interval(Some(60));
        o.set_last_will(will(&format!("delay/{id}"), id, Some(2)));
        o
    };
    let gone = Client::connect(with_will("delay-gone")).await;
    let back = Client::connect(with_will("delay-back")).await;
    let lost_at = Instant::now();
    gone.drop_connection();
    back.drop_connection();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut resumed = options(&broker, "delay-back");
    resumed.set_clean_start(false);
    resumed.set_session_expiry_interval(Some(60));
    let back = Client::connect(resumed).await;
    assert!(back.connack.session_present, "delay-back's session must still exist");

    let got = watcher.recv("the delayed will").await;
    let waited = lost_at.elapsed();
    assert_eq!(
        text(&got),
        ("delay/delay-gone".into(), "delay-gone".into()),
        "only the will of the client that stayed away"
    );
    assert!(
        waited >= Duration::from_millis(1900) && waited <= Duration::from_secs(4),
        "the will arrived {waited:?} after the connection was lost, expected about 2 s (Will Delay Interval)"
    );
    // The reconnected client's will would have been due at the same time.
    watcher
        .expect_no_publish(Duration::from_millis(1500), "the will of the client that reconnected within the delay")
        .await;
    back.disconnect().await;
}

/// Collect the messages two members of a shared subscription receive until `total` arrived.
async fn collect_shared(a: &mut Client, b: &mut Client, total: usize) -> (Vec<String>, Vec<String>) {
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while got_a.len() + got_b.len() < total && Instant::now() < deadline {
        if let Some(p) = a.try_recv(Duration::from_millis(20)).await {
            got_a.push(text(&p).1);
        }
        if let Some(p) = b.try_recv(Duration::from_millis(20)).await {
            got_b.push(text(&p).1);
        }
    }
    a.expect_no_publish(SETTLE, "more shared messages").await;
    b.expect_no_publish(Duration::from_millis(50), "more shared messages").await;
    (got_a, got_b)
}

/// 4.8.2: each message of a shared subscription goes to exactly one member, and the members share
/// the work.
#[tokio::test]
async fn mqtt5_4_8_2_shared_subscription_competing_members() {
    let broker = Broker::start();
    let mut a = connect(&broker, "shared-a").await;
    let mut b = connect(&broker, "shared-b").await;
    for member in [&mut a, &mut b] {
        assert_eq!(
            member.subscribe("$share/workers/jobs/+", QoS::AtLeastOnce).await,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
    }
    let mut publisher = connect(&broker, "shared-pub").await;
    let total = 20;
    for n in 0..total {
        publisher.publish(&format!("jobs/{}", n % 3), QoS::AtLeastOnce, false, format!("job-{n}")).await;
    }
    let (got_a, got_b) = collect_shared(&mut a, &mut b, total).await;
    let set_a: BTreeSet<&String> = got_a.iter().collect();
    let set_b: BTreeSet<&String> = got_b.iter().collect();
    assert_eq!(set_a.len(), got_a.len(), "member a received a message twice: {got_a:?}");
    assert_eq!(set_b.len(), got_b.len(), "member b received a message twice: {got_b:?}");
    assert!(set_a.is_disjoint(&set_b), "a message went to both members: {got_a:?} / {got_b:?}");
    assert_eq!(got_a.len() + got_b.len(), total, "every message to one member: a {got_a:?}, b {got_b:?}");
    assert!(!got_a.is_empty() && !got_b.is_empty(), "both members should get messages: a {got_a:?}, b {got_b:?}");
}

/// 4.8.2: QoS 1 messages a member received but did not acknowledge go to another member when the
/// first one's session ends.
#[tokio::test]
async fn mqtt5_4_8_2_shared_subscription_redelivery_after_member_leaves() {
    let broker = Broker::start();
    let mut lazy_options = options(&broker, "shared-lazy");
    lazy_options.set_manual_acks(true);
    let mut lazy = Client::connect(lazy_options).await;
    lazy.subscribe("$share/g/tasks", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "shared-redeliver-pub").await;
    for n in 0..3 {
        publisher.publish("tasks", QoS::AtLeastOnce, false, format!("task-{n}")).await;
    }
    let held: Vec<String> = lazy.recv_n(3, "messages held without PUBACK").await.iter().map(|p| text(p).1).collect();
    let mut worker = connect(&broker, "shared-worker").await;
    worker.subscribe("$share/g/tasks", QoS::AtLeastOnce).await;
    worker.expect_no_publish(SETTLE, "messages still held by the other member").await;
    lazy.drop_connection();
    let mut redelivered: Vec<String> =
        worker.recv_n(3, "messages the leaving member never acknowledged").await.iter().map(|p| text(p).1).collect();
    redelivered.sort();
    assert_eq!(redelivered, held, "the unacknowledged messages must go to the remaining member");
    worker.expect_no_publish(SETTLE, "duplicates").await;
}

/// [MQTT-3.3.2-17], [MQTT-3.3.2-18]: user properties are forwarded unaltered and in order.
#[tokio::test]
async fn mqtt5_3_3_2_17_user_properties_forwarded_in_order() {
    let broker = Broker::start();
    let mut sub = connect(&broker, "user-props-sub").await;
    sub.subscribe("props/user", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "user-props-pub").await;
    let user_properties: Vec<(String, String)> = [("b", "1"), ("a", "2"), ("b", "3"), ("empty", ""), ("ünï", "cödé")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let props = PublishProperties { user_properties: user_properties.clone(), ..PublishProperties::default() };
    publisher.publish_with("props/user", QoS::AtLeastOnce, false, "x", props).await;
    let got = sub.recv("the message with user properties").await;
    assert_eq!(properties(&got).user_properties, user_properties, "user properties, in order");
}

/// [MQTT-3.3.2-4] Payload Format Indicator, [MQTT-3.3.2-20] Content Type, [MQTT-3.3.2-15]
/// Response Topic and [MQTT-3.3.2-16] Correlation Data are forwarded unaltered.
#[tokio::test]
async fn mqtt5_3_3_2_4_publish_properties_forwarded() {
    let broker = Broker::start();
    let mut sub = connect(&broker, "pub-props-sub").await;
    sub.subscribe("props/all", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "pub-props-pub").await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json; charset=utf-8".into()),
        response_topic: Some("replies/pub-props".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr\xff")),
        ..PublishProperties::default()
    };
    publisher.publish_with("props/all", QoS::AtLeastOnce, false, r#"{"a":1}"#, sent.clone()).await;
    let got = properties(&sub.recv("the message with properties").await);
    assert_eq!(got.payload_format_indicator, sent.payload_format_indicator, "Payload Format Indicator");
    assert_eq!(got.content_type, sent.content_type, "Content Type");
    assert_eq!(got.response_topic, sent.response_topic, "Response Topic");
    assert_eq!(got.correlation_data, sent.correlation_data, "Correlation Data");
    // And absent ones stay absent.
    publisher.publish("props/all", QoS::AtLeastOnce, false, "bare").await;
    let bare = properties(&sub.recv("a message without properties").await);
    assert_eq!(
        (bare.payload_format_indicator, bare.content_type, bare.response_topic, bare.correlation_data),
        (None, None, None, None),
        "properties that were not sent"
    );
}

/// [MQTT-3.3.2-5]: a message whose Message Expiry Interval passed before delivery began is not
/// delivered; [MQTT-3.3.2-6]: a delivered one carries the interval minus the time it waited.
#[tokio::test]
async fn mqtt5_3_3_2_5_message_expiry() {
    let broker = Broker::start();
    let mut sub = Client::connect(persistent(&broker, "expiry-sub", 300)).await;
    sub.subscribe("expiry/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = connect(&broker, "expiry-pub").await;
    let expiring = |secs| PublishProperties { message_expiry_interval: Some(secs), ..PublishProperties::default() };
    publisher.publish_with("expiry/t", QoS::AtLeastOnce, false, "short", expiring(1)).await;
    publisher.publish_with("expiry/t", QoS::AtLeastOnce, false, "long", expiring(60)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut sub = Client::connect(persistent(&broker, "expiry-sub", 300)).await;
    assert!(sub.connack.session_present, "the session must be resumed");
    let got = sub.recv("the message that has not expired").await;
    assert_eq!(text(&got).1, "long", "the message with a 1 s expiry waited 2.5 s and must not be delivered");
    let left = properties(&got).message_expiry_interval.expect("a delivered message keeps its Message Expiry Interval");
    assert!((1..=58).contains(&left), "Message Expiry Interval {left}: expected 60 minus the 2.5 s it waited");
    sub.expect_no_publish(SETTLE, "the expired message").await;
}

/// [MQTT-3.3.4-3], [MQTT-3.3.4-4]: one copy for overlapping subscriptions, carrying every
/// matching Subscription Identifier, at the highest granted QoS ([MQTT-3.3.4-2]).
#[tokio::test]
async fn mqtt5_3_3_4_4_subscription_identifiers_for_overlapping_subscriptions() {
    let broker = Broker::start();
    let mut sub = connect(&broker, "sub-ids").await;
    sub.subscribe_with(vec![filter("ids/#", QoS::AtLeastOnce)], Some(1)).await;
    sub.subscribe_with(vec![filter("ids/+", QoS::ExactlyOnce)], Some(2)).await;
    sub.subscribe_with(vec![filter("ids/a/b", QoS::AtMostOnce)], None).await;
    sub.subscribe_with(vec![filter("ids/z", QoS::AtMostOnce)], Some(268_435_455)).await;
    let mut publisher = connect(&broker, "sub-ids-pub").await;
    let cases: [(&str, &[usize], QoS); 3] = [
        ("ids/a", &[1, 2], QoS::ExactlyOnce),
        ("ids/a/b", &[1], QoS::AtLeastOnce),
        ("ids/z", &[1, 2, 268_435_455], QoS::ExactlyOnce),
    ];
    for (topic, ids, qos) in cases {
        publisher.publish(topic, QoS::ExactlyOnce, false, topic).await;
        let got = sub.recv(topic).await;
        assert_eq!(text(&got).0, topic);
        let mut got_ids = properties(&got).subscription_identifiers;
        got_ids.sort_unstable();
        assert_eq!(got_ids, ids.to_vec(), "{topic}: Subscription Identifiers");
        assert_eq!(got.qos, qos, "{topic}: the highest QoS granted by the matching subscriptions");
        sub.expect_no_publish(SETTLE, &format!("a second copy of {topic}")).await;
    }
}

/// [MQTT-3.8.3-3]: with No Local, a client's own messages are not sent back to it.
#[tokio::test]
async fn mqtt5_3_8_3_3_no_local() {
    let broker = Broker::start();
    let mut client = connect(&broker, "no-local").await;
    let mut quiet = filter("nl/t", QoS::AtLeastOnce);
    quiet.nolocal = true;
    client.subscribe_with(vec![quiet, filter("nl/u", QoS::AtLeastOnce)], None).await;
    client.publish("nl/t", QoS::AtLeastOnce, false, "own-t").await;
    client.publish("nl/u", QoS::AtLeastOnce, false, "own-u").await;
    let mut other = connect(&broker, "no-local-other").await;
    other.publish("nl/t", QoS::AtLeastOnce, false, "other-t").await;
    let got: Vec<_> = client.recv_n(2, "messages for the No Local client").await.iter().map(text).collect();
    assert_eq!(got, vec![("nl/u".into(), "own-u".into()), ("nl/t".into(), "other-t".into())]);
    client.expect_no_publish(SETTLE, "its own message on the No Local subscription").await;
}

/// [MQTT-3.3.1-12], [MQTT-3.3.1-13]: RETAIN on forwarded messages is 0 unless Retain As Published
/// is set, then it is the published flag.
#[tokio::test]
async fn mqtt5_3_3_1_12_retain_as_published() {
    let broker = Broker::start();
    let mut keep = connect(&broker, "rap-keep").await;
    let mut rap = filter("rap/t", QoS::AtLeastOnce);
    rap.preserve_retain = true;
    keep.subscribe_with(vec![rap], None).await;
    let mut clear = connect(&broker, "rap-clear").await;
    clear.subscribe("rap/t", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "rap-pub").await;
    publisher.publish("rap/t", QoS::AtLeastOnce, true, "retained").await;
    publisher.publish("rap/t", QoS::AtLeastOnce, false, "plain").await;
    let got_keep: Vec<_> =
        keep.recv_n(2, "Retain As Published 1").await.iter().map(|p| (text(p).1, p.retain)).collect();
    let got_clear: Vec<_> =
        clear.recv_n(2, "Retain As Published 0").await.iter().map(|p| (text(p).1, p.retain)).collect();
    assert_eq!(got_keep, vec![("retained".into(), true), ("plain".into(), false)], "Retain As Published 1");
    assert_eq!(got_clear, vec![("retained".into(), false), ("plain".into(), false)], "Retain As Published 0");
}

/// [MQTT-3.3.1-9] Retain Handling 0 sends retained messages on every subscribe,
/// [MQTT-3.3.1-10] 1 only for a new subscription, [MQTT-3.3.1-11] 2 never.
#[tokio::test]
async fn mqtt5_3_3_1_9_retain_handling() {
    let broker = Broker::start();
    let mut publisher = connect(&broker, "rh-pub").await;
    publisher.publish("rh/t", QoS::AtLeastOnce, true, "kept").await;
    let with = |rule: RetainForwardRule| {
        let mut f = filter("rh/t", QoS::AtLeastOnce);
        f.retain_forward_rule = rule;
        vec![f]
    };

    let mut always = connect(&broker, "rh-0").await;
    for n in 1..=2 {
        always.subscribe_with(with(RetainForwardRule::OnEverySubscribe), None).await;
        let got = always.recv(&format!("Retain Handling 0, subscribe #{n}")).await;
        assert_eq!((text(&got).1.as_str(), got.retain), ("kept", true), "Retain Handling 0, subscribe #{n}");
    }

    let mut new_only = connect(&broker, "rh-1").await;
    new_only.subscribe_with(with(RetainForwardRule::OnNewSubscribe), None).await;
    let got = new_only.recv("Retain Handling 1 on a new subscription").await;
    assert_eq!(text(&got).1, "kept");
    new_only.subscribe_with(with(RetainForwardRule::OnNewSubscribe), None).await;
    new_only.expect_no_publish(SETTLE, "Retain Handling 1 on an existing subscription").await;
    // Control: the same client gets it again with Retain Handling 0.
    new_only.subscribe_with(with(RetainForwardRule::OnEverySubscribe), None).await;
    assert_eq!(text(&new_only.recv("Retain Handling 0 after 1").await).1, "kept");

    let mut never = connect(&broker, "rh-2").await;
    never.subscribe_with(with(RetainForwardRule::Never), None).await;
    publisher.publish("rh/t", QoS::AtLeastOnce, false, "live").await;
    let got = never.recv("a live message with Retain Handling 2").await;
    assert_eq!(text(&got).1, "live", "Retain Handling 2 must not send the retained message");
    never.expect_no_publish(SETTLE, "anything else with Retain Handling 2").await;
}

/// [MQTT-3.3.2-12]: the server accepts the client's topic aliases (set, used, remapped).
#[tokio::test]
async fn mqtt5_3_3_2_12_client_topic_aliases() {
    let broker = Broker::start();
    let mut sub = connect(&broker, "alias-in-sub").await;
    sub.subscribe("ta/#", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "alias-in-pub").await;
    let max = publisher.connack.properties.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    assert!(max >= 1, "the server should announce a Topic Alias Maximum (default 64): {:?}", publisher.connack);
    let alias = |n| PublishProperties { topic_alias: Some(n), ..PublishProperties::default() };
    let steps = [("ta/t", "1"), ("", "2"), ("", "3"), ("ta/u", "4"), ("", "5")];
    for (topic, payload) in steps {
        publisher.publish_with(topic, QoS::AtLeastOnce, false, payload, alias(1)).await;
    }
    let got: Vec<_> = sub.recv_n(5, "messages published with alias 1").await.iter().map(text).collect();
    let expected: Vec<(String, String)> = [("ta/t", "1"), ("ta/t", "2"), ("ta/t", "3"), ("ta/u", "4"), ("ta/u", "5")]
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
    assert_eq!(got, expected);
}

/// [MQTT-3.3.2-11]: to a client with Topic Alias Maximum 2 the server may send aliases, never
/// above 2 (nor 0), and every alias it uses resolves to the right topic.
#[tokio::test]
async fn mqtt5_3_3_2_11_server_topic_aliases_within_client_maximum() {
    let broker = Broker::start();
    let mut sub_options = options(&broker, "alias-out-sub");
    sub_options.set_topic_alias_max(Some(2));
    let mut sub = Client::connect(sub_options).await;
    sub.subscribe("sa/#", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "alias-out-pub").await;
    let topics = ["sa/a", "sa/a", "sa/b", "sa/b", "sa/c", "sa/c", "sa/a", "sa/b"];
    for (n, topic) in topics.iter().enumerate() {
        publisher.publish(topic, QoS::AtLeastOnce, false, n.to_string()).await;
    }
    let mut aliases: HashMap<u16, String> = HashMap::new();
    let mut used = 0;
    for (n, expected) in topics.iter().enumerate() {
        let got = sub.recv(&format!("message {n}")).await;
        let (topic, payload) = text(&got);
        let alias = properties(&got).topic_alias;
        if let Some(alias) = alias {
            assert!((1..=2).contains(&alias), "message {n}: Topic Alias {alias} outside 1..=2");
        }
        let resolved = match (topic.is_empty(), alias) {
            (false, Some(alias)) => {
                aliases.insert(alias, topic.clone());
                topic
            }
            (false, None) => topic,
            (true, Some(alias)) => {
                used += 1;
                aliases.get(&alias).cloned().unwrap_or_else(|| panic!("message {n}: alias {alias} was never mapped"))
            }
            (true, None) => panic!("message {n}: empty topic without a Topic Alias"),
        };
        assert_eq!((resolved.as_str(), payload), (*expected, n.to_string()), "message {n}");
    }
    assert!(used > 0, "the server never sent a PUBLISH with an empty topic and an alias");
}

/// [MQTT-3.1.2-24], [MQTT-3.1.2-25]: a message larger than the client's Maximum Packet Size is
/// not sent to it (and the rest of the stream continues).
#[tokio::test]
async fn mqtt5_3_1_2_25_packet_over_client_maximum_not_sent() {
    let broker = Broker::start();
    let mut small = options(&broker, "max-size-sub");
    small.set_max_packet_size(Some(256));
    let mut sub = Client::connect(small).await;
    sub.subscribe("mps/t", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "max-size-pub").await;
    publisher.publish("mps/t", QoS::AtLeastOnce, false, vec![b'x'; 1000]).await;
    publisher.publish("mps/t", QoS::AtLeastOnce, false, "small").await;
    let got = sub.recv("the message under the maximum").await;
    assert_eq!(text(&got).1, "small", "the 1000-byte message must not be sent to a client with a 256-byte maximum");
    sub.expect_no_publish(SETTLE, "the oversized message").await;
}

/// [MQTT-3.1.2-28] and 3.2.2.3.15: Response Information only when requested (1), usable as a
/// topic prefix.
#[tokio::test]
async fn mqtt5_3_1_2_28_request_response_information() {
    let broker = Broker::start();
    let info = |client: &Client| client.connack.properties.as_ref().and_then(|p| p.response_information.clone());
    let plain = connect(&broker, "rri-none").await;
    assert_eq!(info(&plain), None, "Response Information without a request");
    let mut zero = options(&broker, "rri-zero");
    zero.set_request_response_info(Some(0));
    assert_eq!(info(&Client::connect(zero).await), None, "Response Information with Request Response Information 0");
    let mut one = options(&broker, "rri-one");
    one.set_request_response_info(Some(1));
    let mut requester = Client::connect(one).await;
    let prefix = info(&requester).expect("Response Information with Request Response Information 1");
    assert!(!prefix.is_empty() && !prefix.contains(['+', '#']), "Response Information {prefix:?} as a topic prefix");
    let reply_topic = format!("{prefix}/reply");
    requester.subscribe(&format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let mut responder = connect(&broker, "rri-responder").await;
    responder.publish(&reply_topic, QoS::AtLeastOnce, false, "answer").await;
    assert_eq!(
        text(&requester.recv("a reply on the Response Information topic").await),
        (reply_topic, "answer".into())
    );
}

/// Wharf's idempotency keys: two QoS 1 PUBLISHes with the same `idempotency-key` user property
/// are stored once; the second PUBACK says `idempotency-verdict: duplicate`.
#[tokio::test]
async fn wharf_idempotency_key_deduplicates_publishes() {
    let broker = Broker::start();
    let mut sub = connect(&broker, "idem-sub").await;
    sub.subscribe("idem/t", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "idem-pub").await;
    let keyed = |key: &str| PublishProperties {
        user_properties: vec![("idempotency-key".into(), key.into())],
        ..PublishProperties::default()
    };
    let verdict = |ack: Option<Incoming>| match ack {
        Some(Incoming::PubAck(ack)) => ack.properties.map(|p| p.user_properties).unwrap_or_default(),
        other => panic!("expected a PUBACK, got {other:?}"),
    };
    let first = verdict(publisher.publish_with("idem/t", QoS::AtLeastOnce, false, "k1", keyed("k-1")).await);
    assert!(!first.iter().any(|(k, _)| k == "idempotency-verdict"), "first PUBACK: {first:?}");
    let second = verdict(publisher.publish_with("idem/t", QoS::AtLeastOnce, false, "k1", keyed("k-1")).await);
    assert!(
        second.contains(&("idempotency-verdict".to_owned(), "duplicate".to_owned())),
        "the second PUBACK must carry idempotency-verdict: duplicate, got {second:?}"
    );
    publisher.publish_with("idem/t", QoS::AtLeastOnce, false, "k2", keyed("k-2")).await;
    let got: Vec<_> = sub.recv_n(2, "one message per key").await.iter().map(|p| text(p).1).collect();
    assert_eq!(got, vec!["k1".to_owned(), "k2".to_owned()], "the duplicate must not be delivered");
    sub.expect_no_publish(SETTLE, "the duplicate").await;
}
