//! The core's typed errors. Each says whether the caller may retry it; front-ends map them to their
//! own reply codes in one table each. Errors travel inside Raft replies, hence serde.

use serde::{Deserialize, Deserializer, Serialize};

/// An error from a core API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CoreError {
    /// The named object does not exist (AMQP 404).
    #[error("NOT_FOUND - {0}")]
    NotFound(String),
    /// The request contradicts existing state or arguments (AMQP 406).
    #[error("PRECONDITION_FAILED - {0}")]
    PreconditionFailed(String),
    /// The request touches a reserved or forbidden object (AMQP 403).
    #[error("ACCESS_REFUSED - {0}")]
    AccessRefused(String),
    /// The object is exclusively owned by another connection (AMQP 405).
    #[error("RESOURCE_LOCKED - {0}")]
    ResourceLocked(String),
    /// An argument is malformed (AMQP 406 or 501 depending on context).
    #[error("invalid argument - {0}")]
    InvalidArgument(String),
    /// A configured limit would be exceeded; `limit` is the configuration key.
    #[error("limit {limit} exceeded: {value} > {max}")]
    LimitExceeded {
        /// Configuration key of the limit.
        #[serde(deserialize_with = "limit_key")]
        limit: LimitKey,
        /// The requested value.
        value: u64,
        /// The configured maximum.
        max: u64,
    },
    /// This node does not lead the group that owns the request; retry (on the leader).
    #[error("not leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<u64>,
    },
    /// Too many requests are waiting; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The core is starting or shutting down; retry later or elsewhere.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Storage failed; the node stops accepting writes.
    #[error("storage failure: {0}")]
    Storage(String),
    /// An invariant broke: a bug. Reported rather than panicking the whole node.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    /// Whether the same request may succeed if retried later (possibly elsewhere).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::NotLeader { .. } | Self::Overloaded(_) | Self::Unavailable(_))
    }

    /// A stable, machine-readable name of the error's kind, for front-ends whose wire protocol
    /// carries one (the native API's error detail).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "NOT_FOUND",
            Self::PreconditionFailed(_) => "PRECONDITION_FAILED",
            Self::AccessRefused(_) => "ACCESS_REFUSED",
            Self::ResourceLocked(_) => "RESOURCE_LOCKED",
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::LimitExceeded { .. } => "LIMIT_EXCEEDED",
            Self::NotLeader { .. } => "NOT_LEADER",
            Self::Overloaded(_) => "OVERLOADED",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Storage(_) => "STORAGE",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

/// Every limit key an error may name; deserialising maps a key back onto its static name.
const LIMIT_KEYS: &[&str] = &[
    "limits.message_size_max_bytes",
    "limits.name_len_max_bytes",
    "limits.binding_key_len_max_bytes",
    "limits.queue_messages_max",
    "limits.queue_bytes_max",
    "limits.consumer_inflight_max",
    "limits.consumers_per_queue_max",
    "limits.batch_commands_max",
    "limits.batch_bytes_max",
    "limits.pipeline_entries_max",
    "limits.pending_requests_max",
    "limits.queues_max",
    "limits.exchanges_max",
    "limits.bindings_max",
    "limits.partitions_per_queue_max",
    "limits.delay_max_ms",
    "limits.idempotency_window_ms",
    "limits.idempotency_keys_max",
    "limits.idempotency_key_bytes_max",
    "limits.idempotency_key_len_max_bytes",
    "limits.txn_timeout_ms",
    "limits.txn_operations_max",
    "limits.half_message_check_interval_ms",
    "limits.half_message_age_max_ms",
    "limits.state_key_len_max_bytes",
    "limits.state_value_size_max_bytes",
    "limits.state_records_max",
];

/// The configuration key of a limit: always one of a fixed set of names.
pub type LimitKey = &'static str;

fn limit_key<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LimitKey, D::Error> {
    let key = String::deserialize(deserializer)?;
    Ok(LIMIT_KEYS.iter().find(|k| **k == key).copied().unwrap_or("limits.unknown"))
}

/// Result alias for core calls.
pub type CoreResult<T> = Result<T, CoreError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_split() {
        assert!(CoreError::NotLeader { leader: None }.is_retryable());
        assert!(CoreError::Overloaded("x".into()).is_retryable());
        assert!(!CoreError::NotFound("x".into()).is_retryable());
        assert!(!CoreError::Storage("x".into()).is_retryable());
    }

    #[test]
    fn codes_name_the_kind() {
        assert_eq!(CoreError::NotFound("x".into()).code(), "NOT_FOUND");
        assert_eq!(CoreError::LimitExceeded { limit: "limits.queues_max", value: 3, max: 2 }.code(), "LIMIT_EXCEEDED");
        assert_eq!(CoreError::NotLeader { leader: Some(2) }.code(), "NOT_LEADER");
    }

    #[test]
    fn limit_error_round_trips() {
        let error = CoreError::LimitExceeded { limit: "limits.queues_max", value: 3, max: 2 };
        let bytes = postcard::to_allocvec(&error).expect("encode");
        assert_eq!(postcard::from_bytes::<CoreError>(&bytes).expect("decode"), error);
    }
}
