//! Topic names and filters past AMQP's 255-byte short strings: MQTT allows 65,535 bytes, and a
//! subscription to a long filter receives what is published to a long topic.

use std::time::Duration;

use crate::harness::Broker;
use crate::raw::{PUBACK, Publish, Raw};

#[test]
fn mqtt_4_7_3_long_topic_names_and_filters() {
    let broker = Broker::start();
    let base = "level/".repeat(170);
    let filter = format!("{base}+");
    let topic = format!("{base}leaf");
    assert!(filter.len() > 1000);
    let mut sub = Raw::open(broker.mqtt_addr(), true, "long-filter-sub");
    sub.subscribe(1, &filter, 1);
    let mut publisher = Raw::open(broker.mqtt_addr(), false, "long-topic-pub");
    publisher.send(&Publish::new(&topic, 1, b"deep").encode());
    publisher.expect_kind(PUBACK, "PUBLISH to a long topic");
    let got = sub.receive_acking(1, Duration::from_millis(300), "a message on a long topic");
    assert_eq!(got[0].topic, topic);
    assert_eq!(got[0].payload, b"deep");
}
