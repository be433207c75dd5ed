//! Front-end state records: small keyed values that a protocol front-end keeps in the catalogue,
//! so that they are committed before a write returns, replicated, snapshotted and restored with it.
//! The MQTT front-end keeps its sessions' subscriptions and QoS 2 packet-id state, and retained
//! messages, here. Deterministic data and the catalogue commands over it; touches only the
//! catalogue.
//!
//! Keys are opaque strings in their vhost's namespace, ordered bytewise, so that the records under
//! a prefix are one range. A record may be owned by a queue of its vhost: whatever deletes the
//! queue (`queue.delete`, the vhost's deletion, its exclusive owner closing, auto-delete,
//! `x-expires`, a restart dropping transient queues) deletes the queue's records in the same
//! command, because every one of those paths ends in [`Catalogue`]'s `remove_queue` or in a vhost
//! deletion.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize, Serializer};

use super::{Catalogue, MetaReply, no_queue, no_vhost};
use crate::error::{CoreError, CoreResult};

/// Bytes a Raft entry spends on one write besides its key, value and owner (lengths, tags).
const WRITE_OVERHEAD_BYTES: u64 = 16;

/// One write of a state record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateWrite {
    /// The record's key, unique within its vhost.
    pub key: String,
    /// The new value; `None` deletes the record (deleting a missing record is no error).
    pub value: Option<Bytes>,
    /// The name of a queue in the same vhost that owns the record: deleting that queue, by any
    /// path, deletes the record. Ignored when `value` is `None`.
    pub owner: Option<String>,
}

impl StateWrite {
    /// Store `value` under `key`, owned by no queue.
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self { key: key.into(), value: Some(value.into()), owner: None }
    }

    /// Store `value` under `key`, owned by queue `owner`.
    pub fn put_owned(key: impl Into<String>, value: impl Into<Bytes>, owner: impl Into<String>) -> Self {
        Self { key: key.into(), value: Some(value.into()), owner: Some(owner.into()) }
    }

    /// Delete the record under `key`.
    pub fn delete(key: impl Into<String>) -> Self {
        Self { key: key.into(), value: None, owner: None }
    }

    /// Bytes a Raft entry spends on this write, roughly.
    pub fn size_bytes(&self) -> u64 {
        let value = self.value.as_ref().map_or(0, |value| value.len() as u64);
        let owner = self.owner.as_ref().map_or(0, |owner| owner.len() as u64);
        self.key.len() as u64 + value + owner + WRITE_OVERHEAD_BYTES
    }
}

/// Bounds on state records. Carried in each write command, so that every replica enforces the
/// numbers the proposing node was configured with (`limits.state_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCaps {
    /// Longest key, in bytes.
    pub key_len_max_bytes: u32,
    /// Largest value, in bytes.
    pub value_size_max_bytes: u64,
    /// Most records in the catalogue, every vhost together.
    pub records_max: u64,
}

impl StateCaps {
    /// Check one write's key and value against the bounds.
    pub fn check(&self, write: &StateWrite) -> CoreResult<()> {
        self.check_key(&write.key)?;
        if let Some(value) = &write.value {
            let size = value.len() as u64;
            if size > self.value_size_max_bytes {
                return Err(CoreError::LimitExceeded {
                    limit: "limits.state_value_size_max_bytes",
                    value: size,
                    max: self.value_size_max_bytes,
                });
            }
        }
        Ok(())
    }

    /// Check a key (or a key prefix) against the bound on key length.
    pub fn check_key(&self, key: &str) -> CoreResult<()> {
        let len = key.len() as u64;
        if len > u64::from(self.key_len_max_bytes) {
            return Err(CoreError::LimitExceeded {
                limit: "limits.state_key_len_max_bytes",
                value: len,
                max: self.key_len_max_bytes.into(),
            });
        }
        Ok(())
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    value: Bytes,
    owner: Option<String>,
}

/// One vhost's records, and the owned ones indexed by owner so that deleting a queue finds its
/// records without a scan.
///
/// Serialised as the records alone (the index would double the keys in every snapshot); the index
/// is rebuilt when a snapshot is read back.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(from = "BTreeMap<String, Record>")]
pub(super) struct Records {
    by_key: BTreeMap<String, Record>,
    /// (owner queue, key) of every owned record.
    owned: BTreeSet<(String, String)>,
}

impl Serialize for Records {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.by_key.serialize(serializer)
    }
}

impl From<BTreeMap<String, Record>> for Records {
    fn from(by_key: BTreeMap<String, Record>) -> Self {
        let owned = by_key
            .iter()
            .filter_map(|(key, record)| record.owner.as_ref().map(|owner| (owner.clone(), key.clone())))
            .collect();
        Self { by_key, owned }
    }
}

impl Records {
    /// Number of records.
    pub(super) fn len(&self) -> u64 {
        self.by_key.len() as u64
    }

    fn contains(&self, key: &str) -> bool {
        self.by_key.contains_key(key)
    }

    /// The records whose key starts with `prefix`, by key.
    fn scan<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Bytes)> + 'a {
        self.by_key
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(key, record)| (key, &record.value))
    }

    fn put(&mut self, key: String, value: Bytes, owner: Option<String>) {
        if let Some(owner) = &owner {
            self.owned.insert((owner.clone(), key.clone()));
        }
        let previous = self.by_key.insert(key.clone(), Record { value, owner: owner.clone() });
        // A new owner (or none) replaces the old one in the index.
        if let Some(old) = previous.and_then(|record| record.owner)
            && Some(&old) != owner.as_ref()
        {
            self.owned.remove(&(old, key));
        }
    }

    /// Remove one record; returns whether it was there.
    fn remove(&mut self, key: &str) -> bool {
        let Some(record) = self.by_key.remove(key) else { return false };
        if let Some(owner) = record.owner {
            self.owned.remove(&(owner, key.to_owned()));
        }
        true
    }

    /// Remove every record whose key starts with `prefix`; returns how many there were.
    fn remove_prefix(&mut self, prefix: &str) -> u64 {
        let keys: Vec<String> = self.scan(prefix).map(|(key, _)| key.clone()).collect();
        for key in &keys {
            self.remove(key);
        }
        keys.len() as u64
    }

    /// Remove every record owned by queue `owner`; returns how many there were.
    pub(super) fn remove_owned_by(&mut self, owner: &str) -> u64 {
        let keys: Vec<String> = self
            .owned
            .range((owner.to_owned(), String::new())..)
            .take_while(|(by, _)| by == owner)
            .map(|(_, key)| key.clone())
            .collect();
        for key in &keys {
            self.remove(key);
        }
        keys.len() as u64
    }

    /// Every owned record as (owner, key), by owner: for the catalogue's invariant checks.
    #[cfg(test)]
    pub(super) fn owned(&self) -> &BTreeSet<(String, String)> {
        &self.owned
    }

    /// The owner index recomputed from the records: for the catalogue's invariant checks.
    #[cfg(test)]
    pub(super) fn owned_recomputed(&self) -> BTreeSet<(String, String)> {
        Self::from(self.by_key.clone()).owned
    }
}

impl Catalogue {
    /// The value of state record `key` in `vhost`.
    pub fn state_get(&self, vhost: &str, key: &str) -> Option<&Bytes> {
        self.vhosts.get(vhost)?.state.by_key.get(key).map(|record| &record.value)
    }

    /// The state records of `vhost` whose key starts with `prefix`, by key.
    pub fn state_scan<'a>(&'a self, vhost: &str, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Bytes)> {
        self.vhosts.get(vhost).into_iter().flat_map(move |host| host.state.scan(prefix))
    }

    /// Number of state records, every vhost together.
    pub fn state_record_count(&self) -> u64 {
        self.tally.state_records
    }

    /// Apply `writes` in order, all or none: every write is checked (key and value sizes, owner
    /// queue, the resulting record count) before any is applied.
    pub(super) fn write_state(
        &mut self,
        vhost: &str,
        writes: Vec<StateWrite>,
        caps: StateCaps,
    ) -> CoreResult<MetaReply> {
        let host = self.vhosts.get(vhost).ok_or_else(|| no_vhost(vhost))?;
        // Whether each key written exists once the writes before it applied: a key written twice
        // counts once, as its last write leaves it.
        let mut exists_after: BTreeMap<&str, bool> = BTreeMap::new();
        for write in &writes {
            caps.check(write)?;
            if write.value.is_some()
                && let Some(owner) = &write.owner
                && !host.queues.contains_key(owner)
            {
                return Err(no_queue(vhost, owner));
            }
            exists_after.insert(&write.key, write.value.is_some());
        }
        let before = self.tally.state_records;
        let mut after = before;
        for (key, exists) in exists_after {
            match (host.state.contains(key), exists) {
                (false, true) => after += 1,
                (true, false) => after -= 1,
                _ => {}
            }
        }
        // Writes that do not add records pass even above the bound (say, after it was lowered), so
        // that records can always be replaced or deleted.
        if after > caps.records_max && after > before {
            return Err(CoreError::LimitExceeded {
                limit: "limits.state_records_max",
                value: after,
                max: caps.records_max,
            });
        }
        let Some(host) = self.vhosts.get_mut(vhost) else { return Err(no_vhost(vhost)) };
        for write in writes {
            match write.value {
                Some(value) => host.state.put(write.key, value, write.owner),
                None => {
                    host.state.remove(&write.key);
                }
            }
        }
        self.tally.state_records = after;
        Ok(MetaReply::Ok)
    }

    /// Delete the state records of `vhost` whose key starts with `prefix`.
    pub(super) fn delete_state_prefix(&mut self, vhost: &str, prefix: &str) -> CoreResult<MetaReply> {
        let host = self.vhosts.get_mut(vhost).ok_or_else(|| no_vhost(vhost))?;
        let deleted = host.state.remove_prefix(prefix);
        self.tally.state_records = self.tally.state_records.saturating_sub(deleted);
        Ok(MetaReply::StateDeleted(deleted))
    }
}
