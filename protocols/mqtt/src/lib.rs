//! Wharf's MQTT front-end: a strict codec for MQTT 3.1, 3.1.1 and 5.0 (`codec`, no IO), the
//! mapping of MQTT onto the core's message model, and the per-connection engine that translates
//! packets into calls on `wharf_core::Core`. Touches the core only through its public API; the
//! `wharf` binary owns the sockets and hands each connection's byte stream to [`serve`].

pub mod broker;
pub mod codec;
pub mod config;
pub mod connection;
pub mod mapping;
pub mod session;
pub mod topic;

pub use broker::Broker;
pub use config::MqttConfig;
pub use connection::serve;
