//! Core configuration and limits: plain data handed in by the binary (`src/`); the core never
//! reads files or the environment itself.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which storage backend holds the Raft logs and snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// fjall under `data_dir`: the production backend.
    #[default]
    Fjall,
    /// In memory: for tests and simulation; nothing survives the process.
    Memory,
}

/// Everything the core needs to start a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoreConfig {
    /// This node's id in the cluster; fixed at first start (a data directory written under another
    /// id is refused).
    pub node_id: u64,
    /// Directory of the fjall database and snapshots.
    pub data_dir: PathBuf,
    /// Storage backend.
    pub storage: StorageKind,
    /// Number of shard Raft groups (partitions are spread over them). Fixed at first start:
    /// changing it later is refused, because partitions are placed by hash over this count.
    pub shard_count: u32,
    /// A snapshot is taken after this many applied entries since the last one, after which the log
    /// before it is purged: this bounds disk use under steady load.
    pub snapshot_logs_since_last: u64,
    /// Raft heartbeat interval.
    pub raft_heartbeat_interval_ms: u64,
    /// Raft election timeout, lower bound (upper bound is twice this).
    pub raft_election_timeout_min_ms: u64,
    /// How long a leader waits for a follower to take one piece of a snapshot (a follower too far
    /// behind the purged log catches up by snapshot; its last piece includes installing it).
    pub raft_install_snapshot_timeout_ms: u64,
    /// How often the leader proposes a time tick so that TTLs, delays and queue expiry advance.
    pub tick_interval_ms: u64,
    /// Limits.
    pub limits: Limits,
    /// Memory and disk alarms.
    pub alarms: crate::alarms::AlarmConfig,
}

impl CoreConfig {
    /// A single-node configuration storing under `data_dir`, with default limits.
    pub fn single_node(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id: 1,
            data_dir: data_dir.into(),
            storage: StorageKind::Fjall,
            shard_count: 4,
            snapshot_logs_since_last: 5_000,
            raft_heartbeat_interval_ms: 100,
            raft_election_timeout_min_ms: 300,
            raft_install_snapshot_timeout_ms: 5_000,
            tick_interval_ms: 100,
            limits: Limits::default(),
            alarms: crate::alarms::AlarmConfig::default(),
        }
    }

    /// Check internal consistency; the error names the key and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &'static str, reason: String| Err(ConfigError { key, reason });
        if self.shard_count == 0 || self.shard_count > SHARD_COUNT_MAX {
            return fail("shard_count", format!("must be between 1 and {SHARD_COUNT_MAX}"));
        }
        if self.alarms.check_interval_ms == 0 {
            return fail("alarms.check_interval_ms", "must be at least 1".into());
        }
        if self.snapshot_logs_since_last == 0 {
            return fail("snapshot_logs_since_last", "must be at least 1".into());
        }
        if self.raft_heartbeat_interval_ms == 0 {
            return fail("raft_heartbeat_interval_ms", "must be at least 1".into());
        }
        if self.raft_install_snapshot_timeout_ms == 0 {
            return fail("raft_install_snapshot_timeout_ms", "must be at least 1".into());
        }
        if self.raft_election_timeout_min_ms <= self.raft_heartbeat_interval_ms {
            return fail("raft_election_timeout_min_ms", "must be greater than raft_heartbeat_interval_ms".into());
        }
        if self.tick_interval_ms == 0 {
            return fail("tick_interval_ms", "must be at least 1".into());
        }
        self.limits.validate()
    }
}

/// Upper bound on `shard_count`: each shard is a Raft group with its own tasks.
pub const SHARD_COUNT_MAX: u32 = 1024;

/// A configuration value that is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}: {reason}")]
pub struct ConfigError {
    /// The key, relative to the core's section.
    pub key: &'static str,
    /// Why it is refused.
    pub reason: String,
}

/// Limits enforced by the core, each with its unit in its name. Every one is configurable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest message payload accepted, in bytes. RabbitMQ's default `max_message_size` is 16 MiB;
    /// a Raft entry carries whole messages, so large payloads cost replication latency.
    pub message_size_max_bytes: u64,
    /// Longest exchange, queue, vhost or routing key name (AMQP short strings are 255 bytes).
    pub name_len_max_bytes: u32,
    /// Longest binding key (pattern). AMQP's own are short strings (255 bytes) on the wire; MQTT
    /// topic filters, bound as topic patterns, can be 65,535 bytes.
    pub binding_key_len_max_bytes: u32,
    /// Most messages held by one queue partition (ready, unacked and delayed) when the queue sets
    /// no `x-max-length`; the whole state machine lives in memory, so this bounds memory.
    pub queue_messages_max: u64,
    /// Most payload bytes held by one queue partition when the queue sets no `x-max-length-bytes`.
    pub queue_bytes_max: u64,
    /// Most unacknowledged deliveries one consumer may hold on one partition; a prefetch of 0
    /// (unlimited in AMQP) means this.
    pub consumer_inflight_max: u32,
    /// Most consumers attached to one queue partition.
    pub consumers_per_queue_max: u32,
    /// Most commands packed into one Raft entry by group commit.
    pub batch_commands_max: u32,
    /// Most payload bytes packed into one Raft entry by group commit.
    pub batch_bytes_max: u64,
    /// Most Raft entries proposed but not yet committed per group (pipelining depth). Measured on
    /// openraft 0.9: one entry in flight, taking everything that queued meanwhile, beats several
    /// smaller entries (each entry costs a fixed round of log IO, commit and apply).
    pub pipeline_entries_max: u32,
    /// Most requests waiting for a shard's group commit before callers get `Overloaded`.
    pub pending_requests_max: u32,
    /// Most queues in the catalogue.
    pub queues_max: u32,
    /// Most exchanges in the catalogue.
    pub exchanges_max: u32,
    /// Most bindings in the catalogue.
    pub bindings_max: u32,
    /// Most partitions of one queue.
    pub partitions_per_queue_max: u32,
    /// Longest delivery delay accepted, in milliseconds.
    pub delay_max_ms: u64,
    /// How long an idempotency key is remembered after its message was committed, unless the queue
    /// sets `x-idempotency-window-ms`. Measured on committed time, so replicas agree.
    pub idempotency_window_ms: u64,
    /// Most idempotency keys remembered per queue partition; beyond it the oldest are forgotten
    /// before their window ends.
    pub idempotency_keys_max: u64,
    /// Most bytes of idempotency keys remembered per queue partition (oldest forgotten first).
    pub idempotency_key_bytes_max: u64,
    /// Longest idempotency key accepted, in bytes.
    pub idempotency_key_len_max_bytes: u32,
    /// Time a multi-shard transaction has from its start to its commit decision; past it, it can
    /// only abort, and a participant left prepared by a crash resolves it then at the latest.
    pub txn_timeout_ms: u64,
    /// Most operations (publishes and acknowledged deliveries) in one transaction.
    pub txn_operations_max: u32,
    /// How often the broker asks the producer of a half message still undecided (check-back).
    pub half_message_check_interval_ms: u64,
    /// Age after which an undecided half message is rolled back.
    pub half_message_age_max_ms: u64,
    /// Longest front-end state record key, in bytes. An MQTT topic can be 65,535 bytes, and a
    /// retained message's key is its topic behind a short prefix.
    pub state_key_len_max_bytes: u32,
    /// Largest front-end state record value, in bytes. A retained MQTT message is stored whole as
    /// one record: its payload (up to `message_size_max_bytes`) plus its properties.
    pub state_value_size_max_bytes: u64,
    /// Most front-end state records on a node, all vhosts together. Records live in the catalogue,
    /// which is held in memory and serialised whole into each of its snapshots.
    pub state_records_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            message_size_max_bytes: 16 * 1024 * 1024,
            name_len_max_bytes: 255,
            binding_key_len_max_bytes: 65_535,
            queue_messages_max: 1_000_000,
            queue_bytes_max: 1024 * 1024 * 1024,
            consumer_inflight_max: 10_000,
            consumers_per_queue_max: 10_000,
            batch_commands_max: 4_096,
            batch_bytes_max: 16 * 1024 * 1024,
            pipeline_entries_max: 1,
            pending_requests_max: 100_000,
            queues_max: 100_000,
            exchanges_max: 100_000,
            bindings_max: 1_000_000,
            partitions_per_queue_max: 256,
            delay_max_ms: 365 * 24 * 3600 * 1000,
            idempotency_window_ms: 7 * 24 * 3600 * 1000,
            idempotency_keys_max: 1_000_000,
            idempotency_key_bytes_max: 64 * 1024 * 1024,
            idempotency_key_len_max_bytes: 256,
            txn_timeout_ms: 30_000,
            txn_operations_max: 10_000,
            half_message_check_interval_ms: 60_000,
            half_message_age_max_ms: 15 * 60_000,
            state_key_len_max_bytes: 65_600,
            state_value_size_max_bytes: 17 * 1024 * 1024,
            state_records_max: 10_000_000,
        }
    }
}

impl Limits {
    /// Check that every limit is positive and that related limits agree.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&'static str, u64); 27] = [
            ("limits.message_size_max_bytes", self.message_size_max_bytes),
            ("limits.name_len_max_bytes", self.name_len_max_bytes.into()),
            ("limits.binding_key_len_max_bytes", self.binding_key_len_max_bytes.into()),
            ("limits.queue_messages_max", self.queue_messages_max),
            ("limits.queue_bytes_max", self.queue_bytes_max),
            ("limits.consumer_inflight_max", self.consumer_inflight_max.into()),
            ("limits.consumers_per_queue_max", self.consumers_per_queue_max.into()),
            ("limits.batch_commands_max", self.batch_commands_max.into()),
            ("limits.batch_bytes_max", self.batch_bytes_max),
            ("limits.pipeline_entries_max", self.pipeline_entries_max.into()),
            ("limits.pending_requests_max", self.pending_requests_max.into()),
            ("limits.queues_max", self.queues_max.into()),
            ("limits.exchanges_max", self.exchanges_max.into()),
            ("limits.bindings_max", self.bindings_max.into()),
            ("limits.partitions_per_queue_max", self.partitions_per_queue_max.into()),
            ("limits.delay_max_ms", self.delay_max_ms),
            ("limits.idempotency_window_ms", self.idempotency_window_ms),
            ("limits.idempotency_keys_max", self.idempotency_keys_max),
            ("limits.idempotency_key_bytes_max", self.idempotency_key_bytes_max),
            ("limits.idempotency_key_len_max_bytes", self.idempotency_key_len_max_bytes.into()),
            ("limits.txn_timeout_ms", self.txn_timeout_ms),
            ("limits.txn_operations_max", self.txn_operations_max.into()),
            ("limits.half_message_check_interval_ms", self.half_message_check_interval_ms),
            ("limits.half_message_age_max_ms", self.half_message_age_max_ms),
            ("limits.state_key_len_max_bytes", self.state_key_len_max_bytes.into()),
            ("limits.state_value_size_max_bytes", self.state_value_size_max_bytes),
            ("limits.state_records_max", self.state_records_max),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError { key, reason: "must be at least 1".into() });
            }
        }
        if self.name_len_max_bytes > 255 {
            return Err(ConfigError {
                key: "limits.name_len_max_bytes",
                reason: "must be at most 255 (AMQP short string)".into(),
            });
        }
        if self.batch_bytes_max < self.message_size_max_bytes {
            return Err(ConfigError {
                key: "limits.batch_bytes_max",
                reason: "must be at least limits.message_size_max_bytes, or a largest message could never be committed"
                    .into(),
            });
        }
        if self.state_value_size_max_bytes < self.message_size_max_bytes {
            return Err(ConfigError {
                key: "limits.state_value_size_max_bytes",
                reason: "must be at least limits.message_size_max_bytes, or a largest message could not be retained"
                    .into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        CoreConfig::single_node("/tmp/x").validate().expect("defaults valid");
    }

    #[test]
    fn zero_limit_is_refused_with_its_key() {
        let mut config = CoreConfig::single_node("/tmp/x");
        config.limits.batch_commands_max = 0;
        let error = config.validate().expect_err("zero refused");
        assert_eq!(error.key, "limits.batch_commands_max");
    }

    #[test]
    fn batch_smaller_than_message_is_refused() {
        let mut config = CoreConfig::single_node("/tmp/x");
        config.limits.batch_bytes_max = 1024;
        assert_eq!(config.validate().expect_err("refused").key, "limits.batch_bytes_max");
    }

    #[test]
    fn state_value_smaller_than_message_is_refused() {
        let mut config = CoreConfig::single_node("/tmp/x");
        config.limits.state_value_size_max_bytes = config.limits.message_size_max_bytes - 1;
        assert_eq!(config.validate().expect_err("refused").key, "limits.state_value_size_max_bytes");
    }
}
