//! Wharf's core: the message model, the catalogue and routing, replicated queues, and the core API
//! every protocol front-end calls. It owns durable state; nothing else writes it.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of this crate.

pub mod alarms;
pub mod catalogue;
pub mod config;
pub mod error;
pub mod model;
pub mod node;
pub mod placement;
pub mod queue;
pub mod raft;
pub mod shard;

pub use config::{ConfigError, CoreConfig, Limits, StorageKind};
pub use error::{CoreError, CoreResult};
pub use node::{ClusterLink, Core, StateWrite};
