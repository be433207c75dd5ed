//! Will timing against session expiry: the will waits for its delay or for the end of the
//! session, whichever comes first [MQTT-3.1.3-9] (features.md: "fire on abnormal disconnect and
//! session expiry").

use std::time::{Duration, Instant};

use crate::harness::Broker;
use crate::raw::{Connect, Prop, Raw, Will, props};

/// A will with a 30 s delay from a session that expires 1 s after its connection is lost is
/// published when the session ends, about 1 s later, and not 30 s later.
#[test]
fn mqtt5_3_1_3_9_will_published_when_the_session_ends_before_the_delay() {
    let broker = Broker::start();
    let mut sub = Raw::open(broker.mqtt_addr(), true, "expiry-will-sub");
    sub.subscribe(1, "expiry/will", 1);
    let will = Will {
        topic: "expiry/will",
        payload: b"session over",
        qos: 1,
        retain: false,
        properties: props(&[Prop::Four(0x18, 30)]),
    };
    let connect = Connect::v5("expiry-will-client").properties(&[Prop::Four(0x11, 1)]).will(will);
    let (client, _) = Raw::session(broker.mqtt_addr(), &connect);
    let lost = Instant::now();
    client.drop_connection();
    let got = sub.receive_acking(1, Duration::from_millis(200), "the will at the end of the session");
    let waited = lost.elapsed();
    assert_eq!(got[0].payload, b"session over");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(10),
        "the will must come when the 1 s session ends, not at once nor after its 30 s delay: {waited:?}"
    );
}
