//! Packets sent back to back in one segment, without waiting for answers (as Paho does with
//! CONNECT and SUBSCRIBE): each is handled, in order, including those buffered while an MQTT 3.1.1
//! connection was not being read (its flow control).

use std::time::Duration;

use crate::harness::Broker;
use crate::raw::{CONNACK, Connect, PUBACK, Publish, Raw, SUBACK, subscribe};

#[test]
fn mqtt_3_1_4_subscribe_pipelined_behind_connect() {
    let broker = Broker::start();
    for v5 in [false, true] {
        let client_id = if v5 { "pipelined-v5" } else { "pipelined-v311" };
        let connect = if v5 { Connect::v5(client_id) } else { Connect::v4(client_id) };
        let mut both = connect.encode();
        both.extend(subscribe(v5, 1, &[("pipe/t", 1)]));
        let mut raw = Raw::connect(broker.mqtt_addr());
        raw.v5 = v5;
        raw.send(&both);
        raw.expect_kind(CONNACK, "CONNECT");
        raw.expect_kind(SUBACK, "the SUBSCRIBE that came in the same segment");
        let mut publisher = Raw::open(broker.mqtt_addr(), false, &format!("{client_id}-pub"));
        publisher.send(&Publish::new("pipe/t", 1, b"after").encode());
        publisher.expect_kind(PUBACK, "PUBLISH");
        let got = raw.receive_acking(1, Duration::from_millis(200), "the subscription made in the pipelined packet");
        assert_eq!(got[0].payload, b"after");
    }
}

/// With `mqtt.receive_maximum` 2 an MQTT 3.1.1 connection stops being read after two QoS 1
/// PUBLISHes; ten sent in one segment are still all acknowledged, in order [MQTT-4.6.0-2].
#[test]
fn mqtt_4_6_0_2_pipelined_publishes_beyond_the_read_window_are_all_acknowledged() {
    let broker = Broker::builder().env("WHARF__MQTT__RECEIVE_MAXIMUM", 2).start();
    let mut raw = Raw::open(broker.mqtt_addr(), false, "pipelined-publisher");
    let mut burst = Vec::new();
    for id in 1..=10u16 {
        burst.extend(Publish::new("pipe/burst", 1, b"x").id(id).encode());
    }
    raw.send(&burst);
    for id in 1..=10u16 {
        let ack = raw.expect_kind(PUBACK, "PUBACK of a pipelined PUBLISH");
        assert_eq!(ack.packet_id(), id, "PUBACKs in PUBLISH order");
    }
}
