//! Set-up shared by the core's end-to-end tests: a fast single-node configuration on in-memory
//! storage. Touches nothing but the core it opens.

use std::sync::Arc;

use wharf_core::raft::storage::MemStorage;
use wharf_core::{Core, CoreConfig, StorageKind};

/// A single node on in-memory storage with `shard_count` shards and short timers, so ticks,
/// elections and expiries happen within a test's patience.
pub fn memory_config(shard_count: u32) -> CoreConfig {
    let mut config = CoreConfig::single_node("/nonexistent");
    config.storage = StorageKind::Memory;
    config.shard_count = shard_count;
    config.tick_interval_ms = 10;
    config.raft_heartbeat_interval_ms = 50;
    config.raft_election_timeout_min_ms = 150;
    config
}

/// Open a core with `config` on `storage` (a clone shares the same in-memory data, so reopening
/// is a restart).
#[allow(dead_code, reason = "not every test binary opens a single node")]
pub async fn open_on(config: CoreConfig, storage: &MemStorage) -> Core {
    Core::open_on(config, Arc::new(storage.clone())).await.expect("open core")
}
