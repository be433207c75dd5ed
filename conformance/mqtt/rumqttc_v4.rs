//! MQTT 3.1.1 behaviour seen through a real client library, rumqttc: QoS 0/1/2 in both
//! directions, retained messages, wildcards and `$` topics, persistent and clean sessions,
//! session takeover, and the Will.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnAck, ConnectionError, Event, Incoming, LastWill, MqttOptions, Publish, QoS, SubscribeReasonCode,
};

use crate::harness::Broker;

rumqttc_client!();

/// Wait for extra messages after the expected ones.
const SETTLE: Duration = Duration::from_millis(500);

fn options(broker: &Broker, id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.mqtt_port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

async fn connect(broker: &Broker, id: &str) -> Client {
    Client::connect(options(broker, id)).await
}

fn persistent(broker: &Broker, id: &str) -> MqttOptions {
    let mut options = options(broker, id);
    options.set_clean_session(false);
    options
}

fn text(publish: &Publish) -> (String, String) {
    (publish.topic.clone(), String::from_utf8_lossy(&publish.payload).into_owned())
}

/// [MQTT-3.8.4-6]: each message arrives at the lower of its published QoS and the granted QoS,
/// for every QoS in both directions.
#[tokio::test]
async fn mqtt_3_8_4_6_qos_levels_both_directions() {
    let broker = Broker::start();
    let mut publisher = connect(&broker, "qos-pub").await;
    for granted in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut sub = connect(&broker, &format!("qos-sub-{}", granted as u8)).await;
        let filter = format!("qos/{}/#", granted as u8);
        assert_eq!(sub.subscribe(&filter, granted).await, vec![SubscribeReasonCode::Success(granted)], "SUBACK");
        for published in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let topic = format!("qos/{}/{}", granted as u8, published as u8);
            publisher.publish(&topic, published, false, format!("q{}", published as u8)).await;
            let got = sub.recv(&topic).await;
            assert_eq!(text(&got), (topic.clone(), format!("q{}", published as u8)));
            assert_eq!(got.qos as u8, (granted as u8).min(published as u8), "{topic}: delivered QoS");
        }
        sub.expect_no_publish(SETTLE, "one copy per message").await;
    }
}

/// [MQTT-3.3.1-5] stored, [MQTT-3.3.1-6] sent to new subscriptions (wildcards included) with
/// RETAIN 1 ([MQTT-3.3.1-8]), RETAIN 0 to existing subscribers ([MQTT-3.3.1-9]), and a zero-byte
/// retained message delivered normally but clearing the topic ([MQTT-3.3.1-10], [MQTT-3.3.1-11]).
#[tokio::test]
async fn mqtt_3_3_1_5_retained_messages() {
    let broker = Broker::start();
    let mut live = connect(&broker, "retain-live").await;
    live.subscribe("r/#", QoS::AtLeastOnce).await;
    let mut publisher = connect(&broker, "retain-pub").await;
    publisher.publish("r/a", QoS::AtLeastOnce, true, "A").await;
    publisher.publish("r/b/c", QoS::AtLeastOnce, true, "C").await;
    publisher.publish("r/a", QoS::AtLeastOnce, true, "A2").await;
    let got = live.recv_n(3, "live copies of retained publishes").await;
    assert!(got.iter().all(|p| !p.retain), "RETAIN must be 0 for an existing subscription [MQTT-3.3.1-9]: {got:?}");

    let mut one_level = connect(&broker, "retain-plus").await;
    one_level.subscribe("r/+", QoS::AtLeastOnce).await;
    let got = one_level.recv("retained r/a for r/+").await;
    assert_eq!(text(&got), ("r/a".into(), "A2".into()), "the last retained message replaces the earlier one");
    assert!(got.retain, "a retained message sent on subscribe has RETAIN 1 [MQTT-3.3.1-8]");
    one_level.expect_no_publish(SETTLE, "r/b/c does not match r/+").await;

    let mut all = connect(&broker, "retain-all").await;
    all.subscribe("r/#", QoS::AtLeastOnce).await;
    let mut got: Vec<_> = all.recv_n(2, "retained messages for r/#").await.iter().map(text).collect();
    got.sort();
    assert_eq!(got, vec![("r/a".into(), "A2".into()), ("r/b/c".into(), "C".into())]);
    drop(all);

    // A zero-byte retained message is forwarded as usual and removes the retained message.
    publisher.publish("r/a", QoS::AtLeastOnce, true, "").await;
    let cleared = live.recv("the zero-byte retained message").await;
    assert_eq!(text(&cleared), ("r/a".into(), String::new()), "a zero-byte retained message is delivered normally");
    let mut after = connect(&broker, "retain-after").await;
    after.subscribe("r/#", QoS::AtLeastOnce).await;
    let got = after.recv("retained r/b/c after r/a was cleared").await;
    assert_eq!(text(&got), ("r/b/c".into(), "C".into()));
    after.expect_no_publish(SETTLE, "r/a was cleared by a zero-byte retained message").await;
}

/// 4.7.1: `+` matches one level, `#` any number including the parent level; 4.7.2: a leading
/// wildcard does not match a topic starting with `$` ([MQTT-4.7.2-1]).
#[tokio::test]
async fn mqtt_4_7_1_wildcards() {
    let broker = Broker::start();
    let filters = ["w/+/x", "w/#", "+/+", "+", "w/+", "#"];
    let mut subs = Vec::new();
    for (n, filter) in filters.iter().enumerate() {
        let mut sub = connect(&broker, &format!("wildcard-{n}")).await;
        sub.subscribe(filter, QoS::AtLeastOnce).await;
        sub.subscribe("end", QoS::AtLeastOnce).await;
        subs.push(sub);
    }
    let mut publisher = connect(&broker, "wildcard-pub").await;
    let topics = ["w", "w/a", "w/a/x", "w/a/b/x", "w/x", "v/a", "w//x", "/w", "$w/a"];
    for topic in topics {
        publisher.publish(topic, QoS::AtLeastOnce, false, topic).await;
    }
    publisher.publish("end", QoS::AtLeastOnce, false, "end").await;
    let expected: [&[&str]; 6] = [
        &["w/a/x", "w//x"],
        &["w", "w/a", "w/a/x", "w/a/b/x", "w/x", "w//x"],
        &["w/a", "w/x", "v/a", "/w"],
        &["w"],
        &["w/a", "w/x"],
        &["w", "w/a", "w/a/x", "w/a/b/x", "w/x", "v/a", "w//x", "/w"],
    ];
    for ((filter, sub), expected) in filters.iter().zip(subs.iter_mut()).zip(expected) {
        let mut got = Vec::new();
        loop {
            let publish = sub.recv(&format!("messages for {filter}")).await;
            if publish.topic == "end" {
                break;
            }
            got.push(publish.topic);
        }
        // "end" also matches `+` and `#`: a second copy for the overlapping subscription is
        // allowed [MQTT-3.3.5-1], anything else is not.
        let mut extra_end = matches!(*filter, "+" | "#");
        while let Some(publish) = sub.try_recv(SETTLE).await {
            assert!(publish.topic == "end" && extra_end, "{filter}: unexpected {publish:?} after end (got {got:?})");
            extra_end = false;
        }
        assert_eq!(got, expected.iter().map(|t| t.to_string()).collect::<Vec<_>>(), "topics matched by {filter:?}");
    }
}

/// [MQTT-4.7.2-1]: `$SYS/broker/uptime` is published, and neither `#` nor `+/...` sees it.
#[tokio::test]
async fn mqtt_4_7_2_1_dollar_topics_not_matched_by_leading_wildcards() {
    let broker = Broker::builder().env("WHARF__MQTT__SYS_INTERVAL_SECS", 1).start();
    let mut hash = connect(&broker, "dollar-hash").await;
    hash.subscribe("#", QoS::AtMostOnce).await;
    let mut plus = connect(&broker, "dollar-plus").await;
    plus.subscribe("+/broker/uptime", QoS::AtMostOnce).await;
    let mut sys = connect(&broker, "dollar-sys").await;
    sys.subscribe("$SYS/broker/uptime", QoS::AtMostOnce).await;
    let uptime = sys.recv("$SYS/broker/uptime (published every second)").await;
    assert_eq!(uptime.topic, "$SYS/broker/uptime");
    // A second publication, so the wildcard subscribers certainly had one to (wrongly) receive.
    loop {
        let next = sys.recv("a second $SYS/broker/uptime publication").await;
        if !next.retain {
            break;
        }
    }
    // Control: `#` does receive ordinary topics.
    let mut publisher = connect(&broker, "dollar-pub").await;
    publisher.publish("ordinary/topic", QoS::AtLeastOnce, false, "x").await;
    let got = hash.recv("ordinary/topic for #").await;
    assert_eq!(got.topic, "ordinary/topic", "# must not receive $ topics [MQTT-4.7.2-1]: got {got:?}");
    hash.expect_no_publish(SETTLE, "$SYS topics for #").await;
    plus.expect_no_publish(Duration::from_millis(100), "$SYS topics for +/broker/uptime").await;
}

/// [MQTT-3.1.2-4] and [MQTT-3.1.2-5]: with CleanSession 0 the session (subscriptions and QoS 1
/// messages published while the client was away) survives the disconnection; Session Present
/// says so.
#[tokio::test]
async fn mqtt_3_1_2_5_persistent_session_keeps_messages() {
    let broker = Broker::start();
    let mut sub = Client::connect(persistent(&broker, "persistent-sub")).await;
    assert!(!sub.connack.session_present, "no session existed");
    sub.subscribe("persist/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = connect(&broker, "persistent-pub").await;
    publisher.publish("persist/t", QoS::AtLeastOnce, false, "while-away-1").await;
    publisher.publish("persist/t", QoS::AtLeastOnce, false, "while-away-2").await;
    let mut sub = Client::connect(persistent(&broker, "persistent-sub")).await;
    assert!(sub.connack.session_present, "the session must be resumed [MQTT-3.2.2-2]");
    let got: Vec<_> = sub.recv_n(2, "messages published while away").await.iter().map(text).collect();
    assert_eq!(got, vec![("persist/t".into(), "while-away-1".into()), ("persist/t".into(), "while-away-2".into())]);
    // The subscription itself was kept.
    publisher.publish("persist/t", QoS::AtLeastOnce, false, "live").await;
    assert_eq!(text(&sub.recv("live message on the kept subscription").await).1, "live");
    sub.expect_no_publish(SETTLE, "no duplicates").await;
}

/// [MQTT-3.1.2-6]: CleanSession 1 discards the previous session and its subscriptions.
#[tokio::test]
async fn mqtt_3_1_2_6_clean_session_discards_state() {
    let broker = Broker::start();
    let mut sub = Client::connect(persistent(&broker, "clean-sub")).await;
    sub.subscribe("clean/t", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let clean = connect(&broker, "clean-sub").await;
    assert!(!clean.connack.session_present, "CleanSession 1 never has Session Present [MQTT-3.2.2-1]");
    clean.disconnect().await;
    let mut publisher = connect(&broker, "clean-pub").await;
    publisher.publish("clean/t", QoS::AtLeastOnce, false, "lost").await;
    let mut sub = Client::connect(persistent(&broker, "clean-sub")).await;
    assert!(!sub.connack.session_present, "the clean connection discarded the session");
    // Control: a new subscription works, and the discarded one's message never arrives.
    sub.subscribe("clean/t", QoS::AtLeastOnce).await;
    publisher.publish("clean/t", QoS::AtLeastOnce, false, "after").await;
    let got = sub.recv("a message on the new subscription").await;
    assert_eq!(text(&got).1, "after", "the message published to the discarded session must not arrive");
    sub.expect_no_publish(SETTLE, "nothing else").await;
}

/// [MQTT-3.1.4-2]: a second connection with the same client id takes the session over and the
/// first is closed.
#[tokio::test]
async fn mqtt_3_1_4_2_session_takeover() {
    let broker = Broker::start();
    let mut first = connect(&broker, "takeover").await;
    first.subscribe("takeover/t", QoS::AtLeastOnce).await;
    let mut second = connect(&broker, "takeover").await;
    let error = first.expect_closed("the first connection after a takeover").await;
    eprintln!("first connection ended with {error:?}");
    second.subscribe("takeover/t", QoS::AtLeastOnce).await;
    second.publish("takeover/t", QoS::AtLeastOnce, false, "to-second").await;
    assert_eq!(text(&second.recv("a message on the new connection").await).1, "to-second");
}

/// [MQTT-3.1.2-8]: the Will is published when the connection is lost; [MQTT-3.1.2-10]: it is
/// discarded on DISCONNECT.
#[tokio::test]
async fn mqtt_3_1_2_8_will_on_abnormal_disconnect_only() {
    let broker = Broker::start();
    let mut watcher = connect(&broker, "will-watcher").await;
    watcher.subscribe("will/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str| {
        let mut options = options(&broker, id);
        options.set_last_will(LastWill::new(format!("will/{id}"), format!("{id} is gone"), QoS::AtLeastOnce, false));
        options
    };
    let polite = Client::connect(with_will("polite")).await;
    polite.disconnect().await;
    let crashed = Client::connect(with_will("crashed")).await;
    crashed.drop_connection();
    let got = watcher.recv("the will of the dropped connection").await;
    assert_eq!(text(&got), ("will/crashed".into(), "crashed is gone".into()), "only the dropped connection's will");
    watcher.expect_no_publish(SETTLE, "the will of the connection that sent DISCONNECT").await;
}
