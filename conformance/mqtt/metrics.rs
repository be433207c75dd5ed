//! The MQTT metrics on `/metrics` move with the traffic they count: connections, sessions,
//! packets and bytes by type, retained messages and QoS 1/2 deliveries in flight.

use std::time::Duration;

use crate::harness::Broker;
use crate::raw::{PUBACK, Publish, Raw};

/// The value of the first sample of `metrics` whose line starts with `name` (labels included).
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Poll `/metrics` until `name` reads `want` (metrics are updated by the connection tasks).
fn wait_for(broker: &Broker, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = broker.metrics();
        let got = sample(&metrics, name);
        if got == Some(want) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{name}: want {want}, got {got:?}\n{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mqtt_metrics_count_connections_packets_sessions_retained_and_inflight() {
    let broker = Broker::start();
    let mut subscriber = Raw::open(broker.mqtt_addr(), true, "metrics-sub");
    subscriber.subscribe(1, "m/#", 1);
    let mut publisher = Raw::open(broker.mqtt_addr(), false, "metrics-pub");
    wait_for(&broker, "wharf_mqtt_connections", 2.0);
    wait_for(&broker, "wharf_mqtt_sessions", 2.0);

    publisher.send(&Publish { retain: true, ..Publish::new("m/retained", 1, b"kept").id(7) }.encode());
    publisher.expect_kind(PUBACK, "PUBLISH QoS 1");
    wait_for(&broker, "wharf_mqtt_retained_messages", 1.0);
    // Delivered and not acknowledged: one delivery in flight.
    let delivery = subscriber.expect_publish("the retained message's delivery");
    wait_for(&broker, "wharf_mqtt_inflight_messages", 1.0);
    subscriber.send(&crate::raw::ack(PUBACK, delivery.packet_id.expect("QoS 1 has a packet id")));
    wait_for(&broker, "wharf_mqtt_inflight_messages", 0.0);

    let metrics = broker.metrics();
    for name in [
        "wharf_mqtt_packets_received_total{type=\"PUBLISH\"}",
        "wharf_mqtt_packets_received_total{type=\"SUBSCRIBE\"}",
        "wharf_mqtt_packets_sent_total{type=\"PUBLISH\"}",
        "wharf_mqtt_packets_sent_total{type=\"CONNACK\"}",
        "wharf_mqtt_bytes_received_total",
        "wharf_mqtt_bytes_sent_total",
    ] {
        let value = sample(&metrics, name).unwrap_or(0.0);
        assert!(value >= 1.0, "{name} should count the traffic, got {value}\n{metrics}");
    }
    drop(publisher);
    wait_for(&broker, "wharf_mqtt_connections", 1.0);
    // A clean session ends with its connection.
    wait_for(&broker, "wharf_mqtt_sessions", 1.0);
}
