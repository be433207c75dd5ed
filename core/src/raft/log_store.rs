//! The openraft log store of one group: [`LogStore`] implements `RaftLogReader` and
//! `RaftLogStorage` (storage-v2) over a shared [`Storage`], encoding entries and metadata with
//! postcard behind a version byte. Touches only its group's entries and metadata in the storage,
//! and the node's [`Syncer`] for group commit.

use std::collections::BTreeMap;
use std::fmt::{self, Debug};
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftTypeConfig, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::storage::{Durability, Storage, StorageError, SyncCallback, Syncer, WriteJob, run_io, validate_group_name};

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
/// and a decode of every message per entry. Older entries are read from storage. Entries not yet
/// written to the storage (their write still queued at the syncer) stay beyond this bound.
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
    /// The index up to which the log is written to the storage: set by the syncer's thread as it
    /// runs this group's writes, in order. Entries above it live only in `tail`.
    written: Arc<AtomicU64>,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            group: Arc::clone(&self.group),
            storage: Arc::clone(&self.storage),
            syncer: self.syncer.clone(),
            tail: Arc::clone(&self.tail),
            written: Arc::clone(&self.written),
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
            written: Arc::new(AtomicU64::new(0)),
            _config: PhantomData,
        })
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry<C>>> {
        // Every operation on the map is a single insert/remove/split: consistent even if a panic
        // poisoned the lock.
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries `[start, end)` held by the in-memory tail, and the index where the tail begins:
    /// the entries of the range below it are to be read from the storage (where they are
    /// written: only written entries leave the tail). `None` when the tail is empty.
    fn read_tail(&self, start: u64, end: Option<u64>) -> Option<(Vec<Entry<C>>, u64)> {
        let tail = self.tail();
        let first = *tail.keys().next()?;
        let last = *tail.keys().next_back()?;
        let end = end.unwrap_or(last + 1).min(last + 1);
        let from = start.max(first);
        // The tail is contiguous (appends follow each other; truncate and purge cut its ends).
        let entries =
            if from < end { tail.range(from..end).map(|(_, entry)| entry.clone()).collect() } else { Vec::new() };
        Some((entries, first))
    }

    /// Queue a write of this group's log at the syncer, behind every write queued before it, and
    /// wait until it has run (not synced). Log writes go through the syncer's thread, in order:
    /// made on a runtime worker, a write would wait there for any fdatasync in progress.
    async fn write_in_order(
        &self,
        f: impl FnOnce(&dyn Storage, &str) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: SyncCallback = Box::new(move |result| {
            let _ = tx.send(result);
        });
        self.syncer.write(self.group_job(f), done);
        match rx.await {
            Ok(result) => result.map_err(|e| StorageError::Task(format!("log write: {e}"))),
            Err(_) => Err(StorageError::Task("log write abandoned by the sync thread".into())),
        }
    }

    /// `f` on this group, as a job for the syncer.
    fn group_job(&self, f: impl FnOnce(&dyn Storage, &str) -> Result<(), StorageError> + Send + 'static) -> WriteJob {
        let group = Arc::clone(&self.group);
        Box::new(move |storage| f(storage, &group))
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

impl<C> LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64, Node = BasicNode, Entry = Entry<C>>,
    C::D: Clone,
    EntryPayload<C>: Serialize + DeserializeOwned,
{
    /// Append `entries` (readable when this returns) and complete `done` once they are durable.
    fn append_entries(&self, entries: Vec<Entry<C>>, done: SyncCallback) -> Result<(), StorageError> {
        let encoded = entries
            .iter()
            .map(|entry| Ok((entry.log_id.index, encode_entry(entry)?)))
            .collect::<Result<Vec<_>, StorageError>>()?;
        let Some(&(last_index, _)) = encoded.last() else {
            self.syncer.submit(done);
            return Ok(());
        };
        // Readable as soon as this returns, as openraft requires: from the tail until written.
        {
            let mut tail = self.tail();
            for entry in entries {
                tail.insert(entry.log_id.index, entry);
            }
            let written = self.written.load(Ordering::Acquire);
            while tail.len() > TAIL_ENTRIES_MAX && tail.first_key_value().is_some_and(|(&index, _)| index <= written) {
                tail.pop_first();
            }
        }
        // Written and made durable by the shared syncer, which completes `done` after a sync that
        // starts after the write: one fdatasync for every append queued meanwhile, of every group
        // on the node.
        let written = Arc::clone(&self.written);
        let write = self.group_job(move |storage, group| {
            storage.append(group, encoded)?;
            written.store(last_index, Ordering::Release);
            Ok(())
        });
        self.syncer.write_then_sync(write, done);
        Ok(())
    }
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
        let (from_tail, tail_first) = match self.read_tail(start, end) {
            Some((entries, first)) if start >= first => return Ok(entries),
            Some((entries, first)) => (entries, Some(first)),
            None => (Vec::new(), None),
        };
        // Below the tail: written entries, read from the storage.
        let stored_end = match (end, tail_first) {
            (Some(end), Some(first)) => Some(end.min(first)),
            (end, first) => end.or(first),
        };
        let raw =
            self.io(move |storage, group| storage.read_range(group, start, stored_end)).await.map_err(read_err)?;
        let mut entries = raw
            .iter()
            .map(|(index, bytes)| decode_entry::<C>(*index, bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err)?;
        entries.extend(from_tail);
        Ok(entries)
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
        // Entries whose writes are still queued are in the tail, and newer.
        let last_log_id = self.tail().values().next_back().map(|entry| entry.log_id).max(last_log_id);
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
        // Queued behind the log's writes and not awaited: it is only read at startup.
        let bytes = encode_versioned(&committed, "committed").map_err(write_err)?;
        let write =
            self.group_job(move |storage, group| storage.put_meta(group, COMMITTED_KEY, &bytes, Durability::Buffered));
        let group = Arc::clone(&self.group);
        self.syncer.write(
            write,
            Box::new(move |result| {
                if let Err(error) = result {
                    tracing::error!(%group, %error, "saving the committed log id failed");
                }
            }),
        );
        Ok(())
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
        let done: SyncCallback = Box::new(move |result: Result<(), io::Error>| callback.log_io_completed(result));
        self.append_entries(entries.into_iter().collect(), done).map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> RaftResult<()> {
        let from_index = log_id.index;
        drop(self.tail().split_off(&from_index));
        // In order behind the appends still queued; the next append comes after this returns.
        let written = Arc::clone(&self.written);
        self.write_in_order(move |storage, group| {
            storage.truncate(group, from_index)?;
            written.fetch_min(from_index.saturating_sub(1), Ordering::AcqRel);
            Ok(())
        })
        .await
        .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> RaftResult<()> {
        let bytes = encode_versioned(&log_id, "purged log id").map_err(write_err)?;
        let upto_index = log_id.index;
        {
            let mut tail = self.tail();
            *tail = tail.split_off(&upto_index.saturating_add(1));
        }
        self.write_in_order(move |storage, group| storage.purge(group, upto_index, &[(PURGED_KEY, &bytes)]))
            .await
            .map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use openraft::CommittedLeaderId;

    use super::*;
    use crate::node::MetaTypes;
    use crate::raft::storage::MemStorage;

    fn blank(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<MetaTypes>> {
        indexes
            .map(|index| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
                payload: EntryPayload::Blank,
            })
            .collect()
    }

    fn indexes(entries: &[Entry<MetaTypes>]) -> Vec<u64> {
        entries.iter().map(|entry| entry.log_id.index).collect()
    }

    /// Appends return before their writes run (the syncer's thread writes them, in order): until
    /// then the tail must serve them, however many there are, and a read spanning written and
    /// unwritten entries must combine the storage and the tail.
    #[tokio::test]
    async fn entries_waiting_to_be_written_are_read_from_the_tail_and_kept_there() {
        let mem = MemStorage::new();
        let storage: Arc<dyn Storage> = Arc::new(mem.clone());
        let syncer = Syncer::threaded(Arc::clone(&storage)).unwrap();
        let mut log = LogStore::<MetaTypes>::new("meta", storage, syncer.clone()).unwrap();
        let (tx, rx) = mpsc::channel();
        let done = |tx: &mpsc::Sender<bool>| -> SyncCallback {
            let tx = tx.clone();
            Box::new(move |result| tx.send(result.is_ok()).unwrap())
        };
        log.append_entries(blank(1..=2_000), done(&tx)).unwrap();
        assert!(rx.recv().unwrap());
        assert_eq!(mem.read_range("meta", 0, None).unwrap().len(), 2_000);

        // Hold the syncer's thread: the next appends queue behind this job, unwritten.
        let (gate, gated) = mpsc::channel::<()>();
        syncer.write(
            Box::new(move |_| {
                let _ = gated.recv();
                Ok(())
            }),
            Box::new(|_| {}),
        );
        log.append_entries(blank(2_001..=3_000), done(&tx)).unwrap();
        log.append_entries(blank(3_001..=4_000), done(&tx)).unwrap();
        assert_eq!(mem.read_range("meta", 0, None).unwrap().len(), 2_000, "nothing more written yet");
        assert!(log.tail().len() > TAIL_ENTRIES_MAX, "unwritten entries are never dropped from the tail");
        assert_eq!(indexes(&log.try_get_log_entries(1..=4_000).await.unwrap()), (1..=4_000).collect::<Vec<_>>());
        assert_eq!(indexes(&log.try_get_log_entries(1_500..2_500).await.unwrap()), (1_500..2_500).collect::<Vec<_>>());
        assert_eq!(indexes(&log.try_get_log_entries(3_990..).await.unwrap()), (3_990..=4_000).collect::<Vec<_>>());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|id| id.index), Some(4_000), "the last entry is the tail's");

        gate.send(()).unwrap();
        assert!(rx.recv().unwrap() && rx.recv().unwrap());
        assert_eq!(mem.read_range("meta", 0, None).unwrap().len(), 4_000);
        // Written now: the next append trims the tail back to its bound.
        log.append_entries(blank(4_001..=4_001), done(&tx)).unwrap();
        assert!(rx.recv().unwrap());
        assert_eq!(log.tail().len(), TAIL_ENTRIES_MAX);
        assert_eq!(indexes(&log.try_get_log_entries(1..=4_001).await.unwrap()), (1..=4_001).collect::<Vec<_>>());

        // Truncate and purge run in order behind the writes.
        log.truncate(LogId::new(CommittedLeaderId::new(1, 0), 3_501)).await.unwrap();
        log.purge(LogId::new(CommittedLeaderId::new(1, 0), 100)).await.unwrap();
        assert_eq!(indexes(&log.try_get_log_entries(..).await.unwrap()), (101..=3_500).collect::<Vec<_>>());
        assert_eq!(mem.read_range("meta", 0, None).unwrap().len(), 3_400);
    }

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
