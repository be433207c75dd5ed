//! The openraft log store of one group: [`LogStore`] implements `RaftLogReader` and
//! `RaftLogStorage` (storage-v2) over a shared [`Storage`], encoding entries and metadata with
//! postcard behind a version byte. Touches only its group's entries and metadata in the storage,
//! and the node's [`Syncer`] for group commit.

use std::collections::BTreeMap;
use std::fmt::{self, Debug};
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftTypeConfig, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::storage::{Durability, Storage, StorageError, Syncer, run_io, validate_group_name};

/// Version byte in front of every encoded entry and metadata value. postcard is not
/// self-describing: a change to an encoded type must bump this, and decoding refuses versions it
/// does not know rather than misreading them. Version 2: the catalogue holds front-end state
/// records (and their limits), and a stored message its enqueued time. Version 3: consumers have
/// a priority and may be exclusive. Version 4: consumers may be limited by credit in ack mode.
const FORMAT_VERSION: u8 = 4;

/// Metadata key of the last saved vote.
const VOTE_KEY: &str = "vote";
/// Metadata key of the last saved committed log id.
const COMMITTED_KEY: &str = "committed";
/// Metadata key of the last purged log id.
const PURGED_KEY: &str = "purged";

/// Most recently appended entries kept decoded in memory. openraft 0.9 reads every committed entry
/// back from the log store to apply it; serving those reads from memory saves a storage round trip
/// and a decode of every message per entry. Older entries are read from storage.
const TAIL_ENTRIES_MAX: usize = 1_024;

type RaftResult<T> = Result<T, openraft::StorageError<u64>>;

/// The log of one Raft group, stored in a [`Storage`] shared with the node's other groups.
///
/// Cheap to clone: clones share the storage and serve as the log reader.
///
/// Entries are stored as `[FORMAT_VERSION][postcard(log id)][postcard(payload)]`, so that the log id
/// of the last entry can be read without decoding its (possibly large) payload.
pub struct LogStore<C: RaftTypeConfig> {
    group: Arc<str>,
    storage: Arc<dyn Storage>,
    syncer: Syncer,
    /// The last appended entries, exactly as stored (kept in step by append, truncate, purge).
    tail: Arc<Mutex<BTreeMap<u64, Entry<C>>>>,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            group: Arc::clone(&self.group),
            storage: Arc::clone(&self.storage),
            syncer: self.syncer.clone(),
            tail: Arc::clone(&self.tail),
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").field("group", &self.group).finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig> LogStore<C>
where
    C::D: Clone,
{
    /// The log of `group` in `storage`. `syncer` must sync that same storage (share one per
    /// storage between all groups): appends are durable only once it has synced.
    pub fn new(group: &str, storage: Arc<dyn Storage>, syncer: Syncer) -> Result<Self, StorageError> {
        validate_group_name(group)?;
        Ok(Self {
            group: group.into(),
            storage,
            syncer,
            tail: Arc::new(Mutex::new(BTreeMap::new())),
            _config: PhantomData,
        })
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry<C>>> {
        // Every operation on the map is a single insert/remove/split: consistent even if a panic
        // poisoned the lock.
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries `[start, end)` from the in-memory tail, if it holds every one of them.
    fn read_tail(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry<C>>> {
        let tail = self.tail();
        let first = *tail.keys().next()?;
        let last = *tail.keys().next_back()?;
        let end = end.unwrap_or(last + 1).min(last + 1);
        if start < first || start > end {
            return None;
        }
        // The tail is contiguous (appends follow each other; truncate and purge cut its ends).
        Some(tail.range(start..end).map(|(_, entry)| entry.clone()).collect())
    }

    /// Run a storage call that does not wait for the disk (a write to fjall's memtable and journal
    /// buffer, no sync) inline: handing it to the blocking pool costs more than the call.
    fn io_now<T>(&self, f: impl FnOnce(&dyn Storage, &str) -> Result<T, StorageError>) -> Result<T, StorageError> {
        f(self.storage.as_ref(), &self.group)
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    async fn io<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Storage, &str) -> Result<T, StorageError> + Send + 'static,
    {
        let group = Arc::clone(&self.group);
        run_io(&self.storage, move |storage| f(storage, &group)).await
    }

    async fn read_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StorageError> {
        let bytes = self.io(move |storage, group| storage.get_meta(group, key)).await?;
        bytes.map(|bytes| decode_versioned(&bytes, key)).transpose()
    }
}

/// Encode `value` behind the format version byte.
pub(crate) fn encode_versioned<T: Serialize + ?Sized>(value: &T, what: &'static str) -> Result<Vec<u8>, StorageError> {
    postcard::to_extend(value, vec![FORMAT_VERSION])
        .map_err(|e| StorageError::Malformed { what, detail: format!("encode: {e}") })
}

/// Decode a value written by [`encode_versioned`].
pub(crate) fn decode_versioned<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StorageError> {
    let body = check_version(bytes, what)?;
    postcard::from_bytes(body).map_err(|e| StorageError::Malformed { what, detail: e.to_string() })
}

/// The body after the format version byte, refusing versions this build does not know.
pub(crate) fn check_version<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a [u8], StorageError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => Ok(body),
        Some((version, _)) => {
            Err(StorageError::Malformed { what, detail: format!("unknown format version {version}") })
        }
        None => Err(StorageError::Malformed { what, detail: "empty".into() }),
    }
}

fn encode_entry<C>(entry: &Entry<C>) -> Result<Vec<u8>, StorageError>
where
    C: RaftTypeConfig<NodeId = u64>,
    EntryPayload<C>: Serialize,
{
    let buf = encode_versioned(&entry.log_id, "log entry")?;
    postcard::to_extend(&entry.payload, buf)
        .map_err(|e| StorageError::Malformed { what: "log entry", detail: format!("encode: {e}") })
}

fn decode_log_id(bytes: &[u8]) -> Result<(LogId<u64>, &[u8]), StorageError> {
    let body = check_version(bytes, "log entry")?;
    postcard::take_from_bytes(body).map_err(|e| StorageError::Malformed { what: "log entry id", detail: e.to_string() })
}

fn decode_entry<C>(index: u64, bytes: &[u8]) -> Result<Entry<C>, StorageError>
where
    C: RaftTypeConfig<NodeId = u64>,
    EntryPayload<C>: DeserializeOwned,
{
    let (log_id, rest) = decode_log_id(bytes)?;
    if log_id.index != index {
        return Err(StorageError::Malformed {
            what: "log entry",
            detail: format!("stored under index {index} but has log id {log_id}"),
        });
    }
    let payload = postcard::from_bytes(rest)
        .map_err(|e| StorageError::Malformed { what: "log entry payload", detail: e.to_string() })?;
    Ok(Entry { log_id, payload })
}

fn read_err(e: StorageError) -> openraft::StorageError<u64> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn write_err(e: StorageError) -> openraft::StorageError<u64> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

/// `[start, end)` of a range of indexes; `end == None` means unbounded.
fn index_bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&start) => start,
        Bound::Excluded(&start) => start.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&end) => end.checked_add(1),
        Bound::Excluded(&end) => Some(end),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, Entry = Entry<C>>,
    C::D: Clone,
    EntryPayload<C>: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> RaftResult<Vec<C::Entry>> {
        let (start, end) = index_bounds(&range);
        if let Some(entries) = self.read_tail(start, end) {
            return Ok(entries);
        }
        let raw = self.io(move |storage, group| storage.read_range(group, start, end)).await.map_err(read_err)?;
        raw.iter().map(|(index, bytes)| decode_entry::<C>(*index, bytes)).collect::<Result<_, _>>().map_err(read_err)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, Entry = Entry<C>>,
    C::D: Clone,
    EntryPayload<C>: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> RaftResult<LogState<C>> {
        let last_purged_log_id: Option<LogId<u64>> = self.read_meta(PURGED_KEY).await.map_err(read_err)?;
        let last = self.io(|storage, group| storage.last_entry(group)).await.map_err(read_err)?;
        let last_log_id = match last {
            Some((_, bytes)) => Some(decode_log_id(&bytes).map_err(read_err)?.0),
            None => None,
        };
        // Purge deletes entries and records the purged id atomically, so a present entry is
        // always newer than the purged id; `max` keeps the answer right even if it were not.
        let last_log_id = std::cmp::max(last_log_id, last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> RaftResult<()> {
        let bytes = encode_versioned(vote, "vote").map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        // Synced: a vote must never be forgotten, or this node could vote twice in one term.
        self.io(move |storage, group| storage.put_meta(group, VOTE_KEY, &bytes, Durability::Synced))
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> RaftResult<Option<Vote<u64>>> {
        self.read_meta(VOTE_KEY).await.map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> RaftResult<()> {
        // Not synced: losing it only means a restart re-applies less of the log at startup (the
        // rest is applied once the leader commits again). Ordered durability guarantees that a
        // durable committed id never points past durable entries.
        let bytes = encode_versioned(&committed, "committed").map_err(write_err)?;
        self.io_now(|storage, group| storage.put_meta(group, COMMITTED_KEY, &bytes, Durability::Buffered))
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> RaftResult<Option<LogId<u64>>> {
        let committed: Option<Option<LogId<u64>>> = self.read_meta(COMMITTED_KEY).await.map_err(read_err)?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> RaftResult<()>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<C>> = entries.into_iter().collect();
        let encoded = entries
            .iter()
            .map(|entry| Ok((entry.log_id.index, encode_entry(entry)?)))
            .collect::<Result<Vec<_>, StorageError>>()
            .map_err(write_err)?;
        if !encoded.is_empty() {
            // Written, not synced: readable as soon as this returns, as openraft requires.
            self.io_now(|storage, group| storage.append(group, encoded)).map_err(write_err)?;
            let mut tail = self.tail();
            for entry in entries {
                tail.insert(entry.log_id.index, entry);
            }
            while tail.len() > TAIL_ENTRIES_MAX {
                tail.pop_first();
            }
        }
        // Durability comes from the shared syncer, which completes this callback after a sync
        // that starts after the write above: one fdatasync for every append queued meanwhile, of
        // every group on the node.
        self.syncer.submit(Box::new(move |result: Result<(), io::Error>| callback.log_io_completed(result)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> RaftResult<()> {
        let from_index = log_id.index;
        drop(self.tail().split_off(&from_index));
        self.io(move |storage, group| storage.truncate(group, from_index)).await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> RaftResult<()> {
        let bytes = encode_versioned(&log_id, "purged log id").map_err(write_err)?;
        let upto_index = log_id.index;
        {
            let mut tail = self.tail();
            *tail = tail.split_off(&upto_index.saturating_add(1));
        }
        self.io(move |storage, group| storage.purge(group, upto_index, &[(PURGED_KEY, &bytes)]))
            .await
            .map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_decoding_refuses_unknown_versions() {
        let bytes = encode_versioned(&42u64, "test").unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode_versioned::<u64>(&bytes, "test").unwrap(), 42);
        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        assert!(matches!(decode_versioned::<u64>(&future, "test"), Err(StorageError::Malformed { .. })));
        assert!(decode_versioned::<u64>(&[], "test").is_err());
    }

    #[test]
    fn index_bounds_cover_every_range_form() {
        assert_eq!(index_bounds(&(3..7)), (3, Some(7)));
        assert_eq!(index_bounds(&(3..=7)), (3, Some(8)));
        assert_eq!(index_bounds(&(3..)), (3, None));
        assert_eq!(index_bounds(&(..7)), (0, Some(7)));
        assert_eq!(index_bounds(&(0..=u64::MAX)), (0, None));
    }
}
