//! Black-box AMQP 0-9-1 tests of the real `wharf` binary with real clients: Python's pika
//! (installed by `conformance/setup.sh`), lapin, rumqttc for the cross-protocol mapping, and a
//! byte-level client for framing rules. Shares the broker harness of the MQTT suite.

#[path = "../mqtt/harness.rs"]
#[allow(dead_code, reason = "shared with the MQTT suite; each suite uses part of it")]
mod harness;

mod cross_protocol;
mod lapin_client;
mod pika;
mod pika_basic;
mod pika_features;
mod raw;
mod restart;
