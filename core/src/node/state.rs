//! The core API for front-end state records ([`crate::catalogue::state`]): small keyed values a
//! protocol front-end keeps replicated (an MQTT front-end: its sessions' subscriptions and QoS 2
//! packet ids, and retained messages). Writes are meta-group commands, so they are committed
//! (fsynced) before the call returns, replicated, and kept in the catalogue's snapshots; reads are
//! from this node's replica. Touches the meta group only.

use bytes::Bytes;

use super::Core;
use crate::catalogue::state::{StateCaps, StateWrite};
use crate::catalogue::{MetaCommand, MetaReply};
use crate::error::{CoreError, CoreResult};

impl Core {
    /// Write state records of `vhost`, in order, all or none (a key written twice keeps its last
    /// write). Returns once the writes are committed and applied: a [`Core::state_get`] or
    /// [`Core::state_scan`] on this node made after it returned sees them.
    ///
    /// A record with an `owner` is deleted with that queue, however the queue is deleted.
    ///
    /// Errors, with nothing written: an unknown vhost, or an owner queue missing from it
    /// (`NotFound`); a key, a value or the resulting number of records over its limit
    /// (`LimitExceeded` naming `limits.state_key_len_max_bytes`, `limits.state_value_size_max_bytes`
    /// or `limits.state_records_max`); several writes together larger than
    /// `limits.batch_bytes_max` (`LimitExceeded`: one Raft entry carries them all; a single write
    /// may be larger, as a single message may).
    pub async fn state_write(&self, vhost: &str, writes: Vec<StateWrite>) -> CoreResult<()> {
        self.check_open()?;
        let caps = self.state_caps();
        // The state machine checks again (with the same caps, carried in the command); checking
        // here keeps an oversized record out of the log.
        let mut size_bytes = 0u64;
        for write in &writes {
            caps.check(write)?;
            size_bytes = size_bytes.saturating_add(write.size_bytes());
        }
        let batch_bytes_max = self.inner.config.limits.batch_bytes_max;
        if writes.len() > 1 && size_bytes > batch_bytes_max {
            return Err(CoreError::LimitExceeded {
                limit: "limits.batch_bytes_max",
                value: size_bytes,
                max: batch_bytes_max,
            });
        }
        if writes.is_empty() {
            // Nothing to commit; the answer is still the one a commit would give.
            if !self.inner.meta.reader.read(|c| c.has_vhost(vhost)) {
                return Err(CoreError::NotFound(format!("no vhost '{vhost}'")));
            }
            return Ok(());
        }
        let command = MetaCommand::WriteState { vhost: vhost.into(), writes, caps };
        self.meta_sized(command, size_bytes).await.map(drop)
    }

    /// Delete the state records of `vhost` whose key starts with `prefix` (every record of the
    /// vhost for an empty prefix), in one command; returns how many there were. Errors: unknown
    /// vhost (`NotFound`); a prefix longer than `limits.state_key_len_max_bytes`.
    pub async fn state_delete_prefix(&self, vhost: &str, prefix: &str) -> CoreResult<u64> {
        self.check_open()?;
        self.state_caps().check_key(prefix)?;
        let command = MetaCommand::DeleteStatePrefix { vhost: vhost.into(), prefix: prefix.into() };
        match self.meta_sized(command, prefix.len() as u64 + 64).await? {
            MetaReply::StateDeleted(count) => Ok(count),
            other => Err(CoreError::Internal(format!("state prefix deletion answered {other:?}"))),
        }
    }

    /// The value of state record `key` in `vhost`, from this node's replica (`None` for an unknown
    /// vhost too).
    pub fn state_get(&self, vhost: &str, key: &str) -> Option<Bytes> {
        self.inner.meta.reader.read(|c| c.state_get(vhost, key).cloned())
    }

    /// The state records of `vhost` whose key starts with `prefix`, sorted by key, from this node's
    /// replica. The copy is made under the catalogue's read lock, which holds up the meta group's
    /// apply meanwhile: keep prefixes narrow. (Values are reference-counted, not copied.)
    pub fn state_scan(&self, vhost: &str, prefix: &str) -> Vec<(String, Bytes)> {
        self.inner
            .meta
            .reader
            .read(|c| c.state_scan(vhost, prefix).map(|(key, value)| (key.clone(), value.clone())).collect())
    }

    /// The bounds on state records this node enforces, from its configured limits.
    fn state_caps(&self) -> StateCaps {
        let limits = &self.inner.config.limits;
        StateCaps {
            key_len_max_bytes: limits.state_key_len_max_bytes,
            value_size_max_bytes: limits.state_value_size_max_bytes,
            records_max: limits.state_records_max,
        }
    }
}
