//! Black-box MQTT conformance tests of the real `wharf` binary: each test starts its own broker
//! (`harness`) and talks to it with a raw byte-level client (`raw`, tests in `packets`), rumqttc
//! (`rumqttc_v4`, `rumqttc_v5`), Eclipse Paho for Python (`paho`) and Mosquitto's command-line
//! clients (`mosquitto`), and crashes it (`restart`). Tests are named after the normative
//! statement they check: `mqtt_3_1_2_24_...` is [MQTT-3.1.2-24] of MQTT 3.1.1, `mqtt5_...` one of
//! MQTT 5.0; where a statement has no number, its section.
//!
//! Paho and Mosquitto come from `conformance/setup.sh` (run by `.ci/run`); without them those tests
//! fail and say so.

#[macro_use]
mod rumqttc_client;

#[allow(dead_code, reason = "shared with the AMQP suite; each suite uses part of it")]
mod harness;
mod metrics;
mod mosquitto;
mod mqttjs;
mod packets;
mod paho;
mod pipelining;
mod raw;
mod restart;
mod rumqttc_v4;
mod rumqttc_v5;
mod shared;
mod topics;
mod wills;
