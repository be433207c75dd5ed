//! Shared subscriptions after their last member leaves [MQTT-4.8.2]: the group's queue goes with
//! its last subscription, so a group formed later does not receive what was published meanwhile.

use std::time::Duration;

use crate::harness::Broker;
use crate::raw::{PUBACK, Publish, Raw, UNSUBACK, unsubscribe_with};

#[test]
fn mqtt5_4_8_2_shared_group_ends_with_its_last_member() {
    let broker = Broker::start();
    let mut first = Raw::open(broker.mqtt_addr(), true, "share-first");
    first.subscribe(1, "$share/g/share/t", 1);
    let mut publisher = Raw::open(broker.mqtt_addr(), false, "share-pub");
    publisher.send(&Publish::new("share/t", 1, b"while subscribed").id(1).encode());
    publisher.expect_kind(PUBACK, "PUBLISH while the group has a member");
    let got = first.receive_acking(1, Duration::from_millis(200), "the group's member gets the message");
    assert_eq!(got[0].payload, b"while subscribed");

    first.send(&unsubscribe_with(0xA2, true, 2, &["$share/g/share/t"]));
    first.expect_kind(UNSUBACK, "UNSUBSCRIBE");
    publisher.send(&Publish::new("share/t", 1, b"no group").id(2).encode());
    publisher.expect_kind(PUBACK, "PUBLISH after the last member left");

    let mut second = Raw::open(broker.mqtt_addr(), true, "share-second");
    second.subscribe(1, "$share/g/share/t", 1);
    publisher.send(&Publish::new("share/t", 1, b"new group").id(3).encode());
    publisher.expect_kind(PUBACK, "PUBLISH to the new group");
    let got = second.receive_acking(1, Duration::from_millis(500), "the new group's member");
    let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"new group"[..]], "nothing published while the group had no member");
}
