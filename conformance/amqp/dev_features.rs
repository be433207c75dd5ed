//! Temporary test target while this part of the AMQP suite is written; merged into main.rs.

#[path = "../mqtt/harness.rs"]
#[allow(dead_code, reason = "shared with the MQTT suite; each suite uses part of it")]
mod harness;

#[path = "pika_features.rs"]
mod pika_features;
