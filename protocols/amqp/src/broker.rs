//! The AMQP front-end's node-wide state: the core, the settings, the count of open connections
//! and the shutdown signal every connection listens to. Reaches the core only through
//! `wharf_core::Core`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use wharf_core::{Core, CoreError};

use crate::config::AmqpConfig;

/// The AMQP 0-9-1 front-end of one node.
#[derive(Debug)]
pub struct Broker {
    pub(crate) core: Core,
    pub(crate) config: AmqpConfig,
    pub(crate) shutdown: watch::Sender<bool>,
    open: AtomicU64,
}

impl Broker {
    /// Start the front-end on a core, after checking the configuration.
    pub async fn start(core: Core, config: AmqpConfig) -> Result<Arc<Self>, CoreError> {
        config.validate().map_err(|(key, reason)| CoreError::InvalidArgument(format!("{key}: {reason}")))?;
        Ok(Arc::new(Self { core, config, shutdown: watch::channel(false).0, open: AtomicU64::new(0) }))
    }

    /// Ask every open connection to close: each is sent connection.close 320 CONNECTION_FORCED
    /// and closes its socket. Connections served afterwards are closed at once.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Connections currently open (from the protocol header to the socket's end).
    pub fn connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// The core this front-end runs on.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The front-end's settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    /// Count a connection as open until the returned guard drops.
    pub(crate) fn track(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(Arc::clone(self))
    }
}

/// Counts one open connection while it lives.
#[derive(Debug)]
pub(crate) struct OpenGuard(Arc<Broker>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
