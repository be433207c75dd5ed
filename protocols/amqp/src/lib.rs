//! Wharf's AMQP 0-9-1 front-end: framing over amq-protocol's codec (`frame`, no IO), the mapping
//! of AMQP onto the core's message model (`mapping`), and the per-connection engine that runs
//! the connection and channel state machines and translates methods into calls on
//! `wharf_core::Core`. Touches the core only through its public API; the `wharf` binary owns the
//! sockets and hands each connection's byte stream to [`serve`].

pub mod broker;
pub mod config;
pub mod connection;
pub mod frame;
pub mod mapping;

pub use broker::Broker;
pub use config::AmqpConfig;
pub use connection::serve;
