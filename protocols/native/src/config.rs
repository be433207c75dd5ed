//! Settings and limits of the native gRPC front-end, with their defaults and why. Plain data; the
//! `wharf` binary fills it from its configuration layers.

use serde::Deserialize;

/// How the native front-end behaves and what it allows. Every limit has its unit last.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NativeConfig {
    /// Largest gRPC message accepted, bytes (a larger one is refused with RESOURCE_EXHAUSTED
    /// before it is decoded). Also the largest one sent.
    pub grpc_message_size_max_bytes: u32,
    /// Concurrent HTTP/2 streams (calls) per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    pub streams_per_connection_max: u32,
    /// Messages in one PublishBatch call.
    pub batch_messages_max: u32,
    /// Transactions begun and not yet finished on this node, all clients together.
    pub transactions_open_max: u32,
    /// Seconds an open (begun, not prepared) transaction may go without a call before it is
    /// discarded, as a client that went away would leave it.
    pub txn_idle_secs: u32,
    /// Deliveries granted to a consumer and not yet sent, plus those the broker holds for it: a
    /// `credit` request that would grant more is refused.
    pub consumer_credit_max: u32,
    /// Interval of HTTP/2 keepalive pings to idle clients, seconds (0: none).
    pub keepalive_secs: u32,
    /// Time a client has to answer a keepalive ping before its connection is closed, seconds.
    pub keepalive_timeout_secs: u32,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            // gRPC's own default is 4 MiB; the core's message limit is the real bound, and a batch
            // of messages needs room above it.
            grpc_message_size_max_bytes: 16 * 1024 * 1024,
            streams_per_connection_max: 1_024,
            batch_messages_max: 1_000,
            transactions_open_max: 10_000,
            txn_idle_secs: 60,
            consumer_credit_max: 10_000,
            keepalive_secs: 60,
            keepalive_timeout_secs: 20,
        }
    }
}

impl NativeConfig {
    /// Refuse inconsistent values, naming the key.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let positive = [
            ("native.grpc_message_size_max_bytes", self.grpc_message_size_max_bytes),
            ("native.streams_per_connection_max", self.streams_per_connection_max),
            ("native.batch_messages_max", self.batch_messages_max),
            ("native.transactions_open_max", self.transactions_open_max),
            ("native.txn_idle_secs", self.txn_idle_secs),
            ("native.consumer_credit_max", self.consumer_credit_max),
            ("native.keepalive_timeout_secs", self.keepalive_timeout_secs),
        ];
        match positive.into_iter().find(|(_, value)| *value == 0) {
            Some((key, _)) => Err((key, "must be at least 1")),
            None if self.grpc_message_size_max_bytes < 1024 => {
                Err(("native.grpc_message_size_max_bytes", "must be at least 1024"))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(NativeConfig::default().validate(), Ok(()));
    }

    #[test]
    fn zero_limits_are_refused_by_name() {
        let config = NativeConfig { batch_messages_max: 0, ..NativeConfig::default() };
        assert_eq!(config.validate().map_err(|e| e.0), Err("native.batch_messages_max"));
        let config = NativeConfig { grpc_message_size_max_bytes: 10, ..NativeConfig::default() };
        assert_eq!(config.validate().map_err(|e| e.0), Err("native.grpc_message_size_max_bytes"));
    }
}
