//! Durable storage shared by every Raft group on a node: the [`Storage`] trait, its production
//! implementation on fjall and snapshot files ([`FjallStorage`]), an in-memory implementation for
//! tests and simulation ([`MemStorage`]), and the [`Syncer`] that lets many groups share one
//! fdatasync. Touches the filesystem under the data directory and nothing else; it knows nothing of
//! openraft (the log store and state machine adapters translate).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

/// Longest group name, in bytes. Group names become fjall keyspace names (at most 255 bytes,
/// including our prefix) and snapshot file names (at most 255 bytes on common filesystems).
pub const GROUP_NAME_LEN_MAX: usize = 200;

/// Most jobs (writes and flush callbacks) taken by one round of the sync thread. A burst beyond
/// this waits for the next sync, so the round (and the latency of its first callback) stays
/// bounded.
pub const SYNC_ROUND_JOBS_MAX: usize = 65_536;

/// Name of the fjall keyspace holding per-group metadata and node-wide counters.
const META_KEYSPACE: &str = "raft_meta";
/// Prefix of the fjall keyspace holding one group's log entries.
const LOG_KEYSPACE_PREFIX: &str = "raft_log.";
/// Metadata key of the node's incarnation counter. Group metadata keys are `<group>:<key>` with a
/// non-empty group name, so a key starting with `:` collides with none of them.
const INCARNATION_KEY: &str = ":incarnation";
/// Suffix of a group's snapshot file under `<data_dir>/snapshots/`.
const SNAPSHOT_SUFFIX: &str = ".snap";
/// Suffix of a snapshot being written, before the rename that publishes it.
const SNAPSHOT_TMP_SUFFIX: &str = ".snap.tmp";

/// An error from a [`Storage`] operation. Every variant is fatal for the group that hit it: Raft
/// cannot continue without its log.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The fjall database failed (IO, corruption, or poisoned after an earlier failed sync).
    #[error("fjall: {0}")]
    Fjall(#[from] fjall::Error),
    /// A filesystem operation on a snapshot file or directory failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A group name is empty, too long, or has characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid group name {name:?}: {reason}")]
    InvalidGroupName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Stored bytes could not be decoded: corruption, or a format this build does not know.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// An earlier sync failed, so the storage refuses every later write and sync: after a failed
    /// fsync the kernel may have dropped dirty pages, and nothing written since can be trusted.
    #[error("storage poisoned: an earlier sync failed; restart the node")]
    Poisoned,
    /// A sync failure injected by a test ([`MemStorage::inject_sync_failure`]).
    #[error("injected sync failure")]
    Injected,
    /// The blocking task running a storage call panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
}

/// How durable a metadata write must be when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written, readable, and durable after the next [`Storage::sync`] (or any later synced write).
    Buffered,
    /// Durable, together with every earlier write, when the call returns.
    Synced,
}

/// Byte storage for the Raft logs, metadata and snapshots of every group on one node.
///
/// Entries are opaque bytes keyed by `(group, index)`; metadata values are small opaque bytes keyed
/// by `(group, key)`; a snapshot is one opaque blob per group. The caller owns every encoding.
///
/// An implementation must guarantee:
/// - **Atomic writes**: every write call (`append`, `truncate`, `purge`, `put_meta`,
///   `save_snapshot`) is applied entirely or not at all, also across a crash.
/// - **Read your writes**: when a write call returns, reads see it, whether synced or not.
/// - **Ordered durability**: writes become durable in the order they were made; if a write is
///   durable after a crash, so is every write made before it. (The log store relies on this: a
///   committed index written after some entries never survives a crash without them.)
/// - **Sync**: when [`Storage::sync`] returns `Ok`, every write that returned before the call began
///   is durable. A synced write ([`Durability::Synced`], `save_snapshot`, `next_incarnation`) is
///   durable when it returns, and makes every earlier write durable too.
/// - **Fail-stop**: after a sync or synced write fails, every later write and sync fails (with
///   [`StorageError::Poisoned`] or the backend's equivalent) until the process restarts.
/// - **Independence**: groups never see each other's entries, metadata or snapshots.
/// - Calls may come from any thread, concurrently. Calls for one group that modify its log are
///   serialized by the caller (one Raft core per group), and so are its `save_snapshot` calls.
///
/// Calls are synchronous and may block on IO; when [`Storage::blocks_on_io`] says so, async callers
/// must run them off the async runtime's worker threads ([`run_io`] does).
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// Whether calls may block on disk IO. `false` lets callers run them inline, which keeps an
    /// in-memory backend free of threads (deterministic under simulation).
    fn blocks_on_io(&self) -> bool;

    /// Write `entries` (index, bytes) to `group`'s log, replacing entries with the same index,
    /// without waiting for durability. Indexes must follow the group's last index without a gap
    /// (the caller's invariant; implementations need not check it).
    fn append(&self, group: &str, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StorageError>;

    /// Make every earlier write, of every group, durable.
    fn sync(&self) -> Result<(), StorageError>;

    /// Delete `group`'s entries with index `>= from_index` (conflicting suffix). Not synced.
    fn truncate(&self, group: &str, from_index: u64) -> Result<(), StorageError>;

    /// Delete `group`'s entries with index `<= upto_index` (compacted prefix) and put the metadata
    /// `meta` (key, value) in the same atomic write, so that a crash never separates the deletion
    /// from the record of it. Not synced.
    fn purge(&self, group: &str, upto_index: u64, meta: &[(&str, &[u8])]) -> Result<(), StorageError>;

    /// `group`'s entries with `start <= index < end` (`end == None`: no upper bound), in index
    /// order. Missing indexes are skipped.
    fn read_range(&self, group: &str, start: u64, end: Option<u64>) -> Result<Vec<(u64, Vec<u8>)>, StorageError>;

    /// The lowest index present in `group`'s log.
    fn first_index(&self, group: &str) -> Result<Option<u64>, StorageError>;

    /// The highest-indexed entry present in `group`'s log.
    fn last_entry(&self, group: &str) -> Result<Option<(u64, Vec<u8>)>, StorageError>;

    /// Set `group`'s metadata `key` to `value`.
    fn put_meta(&self, group: &str, key: &str, value: &[u8], durability: Durability) -> Result<(), StorageError>;

    /// `group`'s metadata `key`.
    fn get_meta(&self, group: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Replace `group`'s snapshot with `data`, durably (synced when the call returns).
    fn save_snapshot(&self, group: &str, data: &[u8]) -> Result<(), StorageError>;

    /// `group`'s last saved snapshot.
    fn load_snapshot(&self, group: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Increment the node's incarnation counter, durably, and return the new value: one more than
    /// the last, and at least `at_least` (1 on the first start with `at_least` 0). Called once per
    /// process start; distinguishes this run's ids from earlier runs', and, with the wall clock as
    /// `at_least`, from the runs of an earlier data directory of the same node id.
    fn next_incarnation(&self, at_least: u64) -> Result<u64, StorageError>;
}

/// Run a storage call from async code: on tokio's blocking pool when the storage blocks on IO, so
/// that a slow disk never stalls the runtime's worker threads; inline otherwise.
pub async fn run_io<T, F>(storage: &Arc<dyn Storage>, f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Storage) -> Result<T, StorageError> + Send + 'static,
{
    if !storage.blocks_on_io() {
        return f(storage.as_ref());
    }
    let storage = Arc::clone(storage);
    tokio::task::spawn_blocking(move || f(storage.as_ref())).await.map_err(|e| StorageError::Task(e.to_string()))?
}

/// Check that `name` can name a group: 1 to [`GROUP_NAME_LEN_MAX`] bytes of `[A-Za-z0-9_.-]`, not
/// starting with `.` (it becomes a file name and a keyspace name).
pub fn validate_group_name(name: &str) -> Result<(), StorageError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > GROUP_NAME_LEN_MAX {
        Some("longer than GROUP_NAME_LEN_MAX bytes")
    } else if name.starts_with('.') {
        Some("starts with '.'")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.') {
        Some("characters outside [A-Za-z0-9_.-]")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StorageError::InvalidGroupName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

/// The metadata key of `(group, key)` in a flat key space. Group names cannot contain `:`, so the
/// first `:` separates the two and no two pairs collide.
fn meta_key(group: &str, key: &str) -> String {
    format!("{group}:{key}")
}

/// Log entry keys are big-endian indexes, so that key order is index order.
fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StorageError::Malformed { what: "log key", detail: format!("{} bytes, want 8", key.len()) })?;
    Ok(u64::from_be_bytes(bytes))
}

// ------------------------------------------------------------------------------------------------
// fjall

/// Production storage: one fjall database at `<data_dir>/db` holding a keyspace of log entries per
/// group and one keyspace of metadata, and snapshot files `<data_dir>/snapshots/<group>.snap`.
///
/// fjall is opened with `manual_journal_persist(true)`: writes go to its journal buffer and become
/// durable only at [`Storage::sync`] or a synced write, so that durability is decided here (one
/// fdatasync per group-commit batch) rather than per write.
pub struct FjallStorage {
    data_dir: PathBuf,
    snapshot_dir: PathBuf,
    db: Database,
    meta: Keyspace,
    /// Open log keyspaces by group name. A std mutex: it is held only for a map lookup (and for
    /// the rare keyspace creation), never across IO that waits on the disk.
    logs: Mutex<HashMap<String, Keyspace>>,
    /// By group, the first log index not yet purged, once this process has purged the group: the
    /// next purge deletes from there by key, without iterating over the tombstones that earlier
    /// purges left (until compaction drops them, a scan from the log's start reads every one, and
    /// the purge after each snapshot would slow down as they pile up).
    purged_below: Mutex<HashMap<String, u64>>,
    /// Set when a snapshot file's fsync failed. fjall poisons itself when its journal sync fails;
    /// this covers the files fjall does not own.
    poisoned: AtomicBool,
    /// Serializes snapshot file writes, so two never share a temporary file, and the
    /// read-increment-write of the incarnation counter.
    write_lock: Mutex<()>,
}

impl fmt::Debug for FjallStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallStorage")
            .field("data_dir", &self.data_dir)
            .field("poisoned", &self.poisoned.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl FjallStorage {
    /// Open (or create) the storage under `data_dir`. Blocks on IO: call it before starting the
    /// runtime's work, or through `spawn_blocking`.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<Self, StorageError> {
        let data_dir = data_dir.as_ref().to_path_buf();
        let snapshot_dir = data_dir.join("snapshots");
        create_dir_durably(&snapshot_dir)?;
        remove_stale_snapshot_temps(&snapshot_dir)?;

        let db = Database::builder(data_dir.join("db")).manual_journal_persist(true).open()?;
        let meta = db.keyspace(META_KEYSPACE, KeyspaceCreateOptions::default)?;
        Ok(Self {
            data_dir,
            snapshot_dir,
            db,
            meta,
            logs: Mutex::new(HashMap::new()),
            purged_below: Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
            write_lock: Mutex::new(()),
        })
    }

    /// The directory this storage was opened on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn check_poisoned(&self) -> Result<(), StorageError> {
        if self.poisoned.load(Ordering::Acquire) { Err(StorageError::Poisoned) } else { Ok(()) }
    }

    fn log_keyspace(&self, group: &str) -> Result<Keyspace, StorageError> {
        let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(keyspace) = logs.get(group) {
            return Ok(keyspace.clone());
        }
        validate_group_name(group)?;
        let keyspace = self.db.keyspace(&format!("{LOG_KEYSPACE_PREFIX}{group}"), log_keyspace_options)?;
        logs.insert(group.to_owned(), keyspace.clone());
        Ok(keyspace)
    }

    /// Keys of `keyspace` in `range`, collected before deleting them: fjall has no range delete.
    fn keys_in(keyspace: &Keyspace, range: impl std::ops::RangeBounds<[u8; 8]>) -> Result<Vec<Vec<u8>>, StorageError> {
        keyspace.range(range).map(|guard| Ok(guard.key()?.to_vec())).collect()
    }

    fn snapshot_path(&self, group: &str, suffix: &str) -> Result<PathBuf, StorageError> {
        validate_group_name(group)?;
        Ok(self.snapshot_dir.join(format!("{group}{suffix}")))
    }
}

impl Storage for FjallStorage {
    fn blocks_on_io(&self) -> bool {
        true
    }

    fn append(&self, group: &str, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let keyspace = self.log_keyspace(group)?;
        let mut batch = self.db.batch();
        for (index, bytes) in entries {
            batch.insert(&keyspace, index_key(index), bytes);
        }
        batch.commit()?;
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.check_poisoned()?;
        // fdatasync is enough: the journal's length is data for fdatasync's purposes, and fjall
        // fsyncs files and directories itself when it rotates journals or writes tables.
        self.db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    fn truncate(&self, group: &str, from_index: u64) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let keyspace = self.log_keyspace(group)?;
        let keys = Self::keys_in(&keyspace, index_key(from_index)..)?;
        let mut batch = self.db.batch();
        for key in keys {
            batch.remove(&keyspace, key);
        }
        batch.commit()?;
        Ok(())
    }

    fn purge(&self, group: &str, upto_index: u64, meta: &[(&str, &[u8])]) -> Result<(), StorageError> {
        self.check_poisoned()?;
        let keyspace = self.log_keyspace(group)?;
        let known = self.purged_below.lock().unwrap_or_else(PoisonError::into_inner).get(group).copied();
        // The log is contiguous from its first entry to its last: the entries to delete are the
        // indexes from the first one left up to `upto_index`.
        let from = match known {
            // A jump far past the known start (a follower that installed a snapshot) would
            // write a tombstone for each missing index: look for the first entry instead.
            Some(from) if upto_index.saturating_sub(from) <= PURGE_BY_INDEX_MAX => from,
            _ => match keyspace.first_key_value() {
                Some(guard) => key_index(&guard.key()?)?,
                None => upto_index.saturating_add(1),
            },
        };
        let mut batch = self.db.batch();
        for (key, value) in meta {
            batch.insert(&self.meta, meta_key(group, key), *value);
        }
        for index in from..=upto_index {
            batch.remove(&keyspace, index_key(index));
        }
        batch.commit()?;
        // `from` is never below what was purged before, so this never moves back.
        let below = from.max(upto_index.saturating_add(1));
        self.purged_below.lock().unwrap_or_else(PoisonError::into_inner).insert(group.to_owned(), below);
        Ok(())
    }

    fn read_range(&self, group: &str, start: u64, end: Option<u64>) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let keyspace = self.log_keyspace(group)?;
        let iter = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => keyspace.range(index_key(start)..index_key(end)),
            None => keyspace.range(index_key(start)..),
        };
        iter.map(|guard| {
            let (key, value) = guard.into_inner()?;
            Ok((key_index(&key)?, value.to_vec()))
        })
        .collect()
    }

    fn first_index(&self, group: &str) -> Result<Option<u64>, StorageError> {
        let keyspace = self.log_keyspace(group)?;
        match keyspace.first_key_value() {
            Some(guard) => Ok(Some(key_index(&guard.key()?)?)),
            None => Ok(None),
        }
    }

    fn last_entry(&self, group: &str) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let keyspace = self.log_keyspace(group)?;
        match keyspace.last_key_value() {
            Some(guard) => {
                let (key, value) = guard.into_inner()?;
                Ok(Some((key_index(&key)?, value.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn put_meta(&self, group: &str, key: &str, value: &[u8], durability: Durability) -> Result<(), StorageError> {
        self.check_poisoned()?;
        validate_group_name(group)?;
        let mut batch = self.db.batch();
        if durability == Durability::Synced {
            batch = batch.durability(Some(PersistMode::SyncData));
        }
        batch.insert(&self.meta, meta_key(group, key), value);
        batch.commit()?;
        Ok(())
    }

    fn get_meta(&self, group: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        validate_group_name(group)?;
        Ok(self.meta.get(meta_key(group, key))?.map(|value| value.to_vec()))
    }

    fn save_snapshot(&self, group: &str, data: &[u8]) -> Result<(), StorageError> {
        let path = self.snapshot_path(group, SNAPSHOT_SUFFIX)?;
        let tmp = self.snapshot_path(group, SNAPSHOT_TMP_SUFFIX)?;
        let _guard = self.write_lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.check_poisoned()?;

        // Earlier writes first, so that the snapshot is never durable ahead of them (ordered
        // durability spans the journal and the snapshot files).
        self.db.persist(PersistMode::SyncData)?;
        // Write a temporary file, fsync it, rename it over the old snapshot, then fsync the
        // directory: a crash leaves either the old snapshot or the new one, never a torn file.
        let mut file = File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
        file.write_all(data).map_err(|e| io_err("write", &tmp, e))?;
        if let Err(e) = file.sync_all() {
            self.poisoned.store(true, Ordering::Release);
            return Err(io_err("fsync", &tmp, e));
        }
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| io_err("rename", &tmp, e))?;
        if let Err(e) = sync_dir(&self.snapshot_dir) {
            self.poisoned.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    fn load_snapshot(&self, group: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.snapshot_path(group, SNAPSHOT_SUFFIX)?;
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StorageError::Io { op: "read", path, source }),
        }
    }

    fn next_incarnation(&self, at_least: u64) -> Result<u64, StorageError> {
        let _guard = self.write_lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.check_poisoned()?;
        let previous = decode_incarnation(self.meta.get(INCARNATION_KEY)?.as_deref())?;
        let next = (previous + 1).max(at_least);
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&self.meta, INCARNATION_KEY, next.to_be_bytes());
        batch.commit()?;
        Ok(next)
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> StorageError {
    StorageError::Io { op, path: path.to_path_buf(), source }
}

/// Create `dir` (and parents) and fsync its parent, so that the directory entry survives a crash.
fn create_dir_durably(dir: &Path) -> Result<(), StorageError> {
    fs::create_dir_all(dir).map_err(|source| StorageError::Io {
        op: "create directory",
        path: dir.to_path_buf(),
        source,
    })?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// fsync a directory, making renames and creations in it durable.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| StorageError::Io {
        op: "fsync directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Remove temporary snapshot files left by a crash during a snapshot write.
fn remove_stale_snapshot_temps(dir: &Path) -> Result<(), StorageError> {
    let entries =
        fs::read_dir(dir).map_err(|source| StorageError::Io { op: "list", path: dir.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| StorageError::Io { op: "list", path: dir.to_path_buf(), source })?;
        if entry.file_name().to_string_lossy().ends_with(SNAPSHOT_TMP_SUFFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|source| StorageError::Io { op: "remove", path, source })?;
        }
    }
    Ok(())
}

/// The stored incarnation counter (0 when none is stored yet).
fn decode_incarnation(value: Option<&[u8]>) -> Result<u64, StorageError> {
    let Some(value) = value else { return Ok(0) };
    let bytes: [u8; 8] = value.try_into().map_err(|_| StorageError::Malformed {
        what: "incarnation",
        detail: format!("{} bytes, want 8", value.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Options of a Raft log keyspace. A log entry is written once, read at most once from disk (the
/// log store keeps recent entries in memory), and deleted when a snapshot covers it: key-value
/// separation keeps large entries out of compaction, which otherwise rewrites every one of them
/// several times; compression is off because payloads are often compressed already and the CPU is
/// better spent elsewhere.
fn log_keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
        .with_kv_separation(Some(
            fjall::KvSeparationOptions::default()
                .compression(fjall::CompressionType::None)
                .separation_threshold(LOG_SEPARATION_THRESHOLD_BYTES),
        ))
}

/// Most log indexes a purge deletes one by one from where the last purge ended, without first
/// looking up the first entry present.
const PURGE_BY_INDEX_MAX: u64 = 1 << 20;

/// Log entries at least this large are stored in blob files (key-value separation).
const LOG_SEPARATION_THRESHOLD_BYTES: u32 = 4 * 1024;

// ------------------------------------------------------------------------------------------------
// In memory

/// In-memory storage for tests and deterministic simulation: no threads, no IO, no clock.
///
/// It models durability: writes are visible at once but become durable only at a sync (or a
/// synced write), and [`MemStorage::crash`] drops every write not yet durable, as a power loss
/// would. Clones share the data, so a test can "restart" a node by opening its groups again on a
/// clone.
#[derive(Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    /// What reads see.
    live: MemData,
    /// What a crash leaves.
    durable: MemData,
    /// Writes applied to `live` but not yet to `durable`, in order.
    unsynced: Vec<MemOp>,
    syncs: u64,
    fail_next_sync: bool,
    poisoned: bool,
}

#[derive(Clone, Default)]
struct MemData {
    logs: BTreeMap<String, BTreeMap<u64, Bytes>>,
    meta: BTreeMap<String, Bytes>,
    snapshots: BTreeMap<String, Bytes>,
}

enum MemOp {
    Append { group: String, entries: Vec<(u64, Bytes)> },
    Truncate { group: String, from_index: u64 },
    Purge { group: String, upto_index: u64 },
    PutMeta { key: String, value: Bytes },
    Snapshot { group: String, data: Bytes },
}

impl MemData {
    fn apply(&mut self, op: &MemOp) {
        match op {
            MemOp::Append { group, entries } => {
                let log = self.logs.entry(group.clone()).or_default();
                for (index, bytes) in entries {
                    log.insert(*index, bytes.clone());
                }
            }
            MemOp::Truncate { group, from_index } => {
                if let Some(log) = self.logs.get_mut(group) {
                    drop(log.split_off(from_index));
                }
            }
            MemOp::Purge { group, upto_index } => {
                if let Some(log) = self.logs.get_mut(group) {
                    *log = match upto_index.checked_add(1) {
                        Some(keep_from) => log.split_off(&keep_from),
                        None => BTreeMap::new(),
                    };
                }
            }
            MemOp::PutMeta { key, value } => {
                self.meta.insert(key.clone(), value.clone());
            }
            MemOp::Snapshot { group, data } => {
                self.snapshots.insert(group.clone(), data.clone());
            }
        }
    }
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemStorage")
            .field("groups", &inner.live.logs.len())
            .field("unsynced", &inner.unsynced.len())
            .field("syncs", &inner.syncs)
            .field("poisoned", &inner.poisoned)
            .finish()
    }
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulate a power loss: forget every write that is not durable. Clears an injected failure's
    /// poison too, as a restarted process would. Groups running on this storage must be shut down
    /// first; reopen them afterwards.
    pub fn crash(&self) {
        let mut inner = self.lock();
        inner.live = inner.durable.clone();
        inner.unsynced.clear();
        inner.fail_next_sync = false;
        inner.poisoned = false;
    }

    /// Make the next sync (or synced write) fail, poisoning the storage as a real fsync failure
    /// does.
    pub fn inject_sync_failure(&self) {
        self.lock().fail_next_sync = true;
    }

    /// How many syncs have succeeded (synced writes included): lets tests observe group commit.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic while holding this lock can only come from a bug in this file; the data itself
        // is always consistent between statements, so carry on.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, op: MemOp, durability: Durability) -> Result<(), StorageError> {
        let mut inner = self.lock();
        if inner.poisoned {
            return Err(StorageError::Poisoned);
        }
        inner.live.apply(&op);
        inner.unsynced.push(op);
        if durability == Durability::Synced {
            Self::sync_locked(&mut inner)?;
        }
        Ok(())
    }

    fn sync_locked(inner: &mut MemInner) -> Result<(), StorageError> {
        if inner.poisoned {
            return Err(StorageError::Poisoned);
        }
        if inner.fail_next_sync {
            inner.fail_next_sync = false;
            inner.poisoned = true;
            return Err(StorageError::Injected);
        }
        let MemInner { durable, unsynced, .. } = inner;
        for op in unsynced.drain(..) {
            durable.apply(&op);
        }
        inner.syncs += 1;
        Ok(())
    }
}

impl Storage for MemStorage {
    fn blocks_on_io(&self) -> bool {
        false
    }

    fn append(&self, group: &str, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StorageError> {
        validate_group_name(group)?;
        let entries = entries.into_iter().map(|(index, bytes)| (index, Bytes::from(bytes))).collect();
        self.write(MemOp::Append { group: group.to_owned(), entries }, Durability::Buffered)
    }

    fn sync(&self) -> Result<(), StorageError> {
        Self::sync_locked(&mut self.lock())
    }

    fn truncate(&self, group: &str, from_index: u64) -> Result<(), StorageError> {
        validate_group_name(group)?;
        self.write(MemOp::Truncate { group: group.to_owned(), from_index }, Durability::Buffered)
    }

    fn purge(&self, group: &str, upto_index: u64, meta: &[(&str, &[u8])]) -> Result<(), StorageError> {
        validate_group_name(group)?;
        // One lock for the metadata and the deletion: a crash (which takes the same lock) can
        // never fall between them, and ordered durability keeps them together on disk.
        let mut inner = self.lock();
        if inner.poisoned {
            return Err(StorageError::Poisoned);
        }
        let mut ops: Vec<MemOp> = meta
            .iter()
            .map(|(key, value)| MemOp::PutMeta { key: meta_key(group, key), value: Bytes::copy_from_slice(value) })
            .collect();
        ops.push(MemOp::Purge { group: group.to_owned(), upto_index });
        for op in ops {
            inner.live.apply(&op);
            inner.unsynced.push(op);
        }
        Ok(())
    }

    fn read_range(&self, group: &str, start: u64, end: Option<u64>) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        validate_group_name(group)?;
        let inner = self.lock();
        let Some(log) = inner.live.logs.get(group) else { return Ok(Vec::new()) };
        let entries = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => log.range(start..end),
            None => log.range(start..),
        };
        Ok(entries.map(|(index, bytes)| (*index, bytes.to_vec())).collect())
    }

    fn first_index(&self, group: &str) -> Result<Option<u64>, StorageError> {
        validate_group_name(group)?;
        Ok(self.lock().live.logs.get(group).and_then(|log| log.keys().next().copied()))
    }

    fn last_entry(&self, group: &str) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        validate_group_name(group)?;
        let inner = self.lock();
        Ok(inner
            .live
            .logs
            .get(group)
            .and_then(|log| log.last_key_value())
            .map(|(index, bytes)| (*index, bytes.to_vec())))
    }

    fn put_meta(&self, group: &str, key: &str, value: &[u8], durability: Durability) -> Result<(), StorageError> {
        validate_group_name(group)?;
        self.write(MemOp::PutMeta { key: meta_key(group, key), value: Bytes::copy_from_slice(value) }, durability)
    }

    fn get_meta(&self, group: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        validate_group_name(group)?;
        Ok(self.lock().live.meta.get(&meta_key(group, key)).map(|value| value.to_vec()))
    }

    fn save_snapshot(&self, group: &str, data: &[u8]) -> Result<(), StorageError> {
        validate_group_name(group)?;
        self.write(MemOp::Snapshot { group: group.to_owned(), data: Bytes::copy_from_slice(data) }, Durability::Synced)
    }

    fn load_snapshot(&self, group: &str) -> Result<Option<Vec<u8>>, StorageError> {
        validate_group_name(group)?;
        Ok(self.lock().live.snapshots.get(group).map(|data| data.to_vec()))
    }

    fn next_incarnation(&self, at_least: u64) -> Result<u64, StorageError> {
        let mut inner = self.lock();
        if inner.poisoned {
            return Err(StorageError::Poisoned);
        }
        let previous = decode_incarnation(inner.live.meta.get(INCARNATION_KEY).map(|v| v.as_ref()))?;
        let next = (previous + 1).max(at_least);
        let op = MemOp::PutMeta { key: INCARNATION_KEY.to_owned(), value: Bytes::copy_from_slice(&next.to_be_bytes()) };
        inner.live.apply(&op);
        inner.unsynced.push(op);
        Self::sync_locked(&mut inner)?;
        Ok(next)
    }
}

// ------------------------------------------------------------------------------------------------
// Group commit

/// Called once the writes submitted before it are durable (`Ok`) or can no longer become durable
/// (`Err`). Type-erased so that groups of different Raft type configs share one [`Syncer`].
pub type SyncCallback = Box<dyn FnOnce(Result<(), io::Error>) + Send + 'static>;

/// A write handed to the [`Syncer`], run on its thread in submission order.
pub type WriteJob = Box<dyn FnOnce(&dyn Storage) -> Result<(), StorageError> + Send + 'static>;

/// One request to the sync thread.
struct Job {
    /// Run first, in the order jobs were submitted.
    write: Option<WriteJob>,
    /// Completed after the write (`synced == false`) or after a sync that follows it.
    done: SyncCallback,
    synced: bool,
}

/// Group commit across Raft groups: runs the log stores' writes and completes their flush
/// callbacks after a sync of the [`Storage`].
///
/// A log store hands its writes ([`Syncer::write_then_sync`], [`Syncer::write`]) to a dedicated
/// thread that runs them in submission order. The thread takes every job queued, runs the writes,
/// calls [`Storage::sync`] once, and completes the callbacks of those that wait for durability;
/// jobs queued while that sync runs wait for the next one. Appends from many groups (and many
/// appends of one group) thus share one fdatasync: fjall has no group commit of its own, and one
/// fdatasync per append caps a disk at ~10 k appends/s.
///
/// Why the writes run on the thread too, and not on the appending task: fjall holds its journal's
/// lock for the length of an fdatasync, so a write made elsewhere during a sync blocks until the
/// sync ends. On a runtime worker thread that stalls every task queued behind it (connections,
/// Raft cores) for the length of an fdatasync. Why a dedicated thread rather than a tokio task:
/// `sync` blocks, which must not happen on a worker, and a `spawn_blocking` per sync would give
/// up the natural batching of one long-lived consumer.
///
/// Fail-stop: once a write or a sync fails, every later job fails too (a storage error is fatal
/// for the groups; writes after a failed one would leave a gap in a log).
///
/// Inline mode (for storages that do not block, e.g. [`MemStorage`]) runs each job on the
/// caller's task: no threads, so simulation stays deterministic.
///
/// One `Syncer` per storage, cloned into every group. Dropping the last clone stops the thread and
/// waits for it (at most one sync), so that the storage is released when the groups are gone.
#[derive(Clone)]
pub struct Syncer {
    inner: Arc<SyncerInner>,
}

struct SyncerInner {
    storage: Arc<dyn Storage>,
    /// `None` in inline mode.
    thread: Option<SyncThread>,
}

struct SyncThread {
    tx: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl fmt::Debug for Syncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Syncer")
            .field("storage", &self.inner.storage)
            .field("threaded", &self.inner.thread.is_some())
            .finish()
    }
}

impl Syncer {
    /// A syncer suited to `storage`: threaded when its calls block on IO, inline otherwise.
    pub fn new(storage: Arc<dyn Storage>) -> Result<Self, StorageError> {
        if storage.blocks_on_io() { Self::threaded(storage) } else { Ok(Self::inline(storage)) }
    }

    /// A syncer with its own sync thread.
    pub fn threaded(storage: Arc<dyn Storage>) -> Result<Self, StorageError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_storage = Arc::clone(&storage);
        let handle = std::thread::Builder::new()
            .name("wharf-raft-sync".into())
            .spawn(move || sync_loop(thread_storage.as_ref(), &rx))
            .map_err(|source| StorageError::Io { op: "spawn sync thread", path: PathBuf::new(), source })?;
        let thread = SyncThread { tx: Some(tx), handle: Some(handle) };
        Ok(Self { inner: Arc::new(SyncerInner { storage, thread: Some(thread) }) })
    }

    /// A syncer that runs every job on the submitting task. Only for storages that do not block
    /// on IO.
    pub fn inline(storage: Arc<dyn Storage>) -> Self {
        Self { inner: Arc::new(SyncerInner { storage, thread: None }) }
    }

    /// The storage this syncer syncs.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    /// Complete `done` after a sync that begins after this call: every write that returned before
    /// this call, and every job submitted before it, is then durable. Never blocks in threaded mode.
    pub fn submit(&self, done: SyncCallback) {
        self.enqueue(Job { write: None, done, synced: true });
    }

    /// Run `write` after the jobs submitted before it, then complete `done` once it is durable
    /// (after a sync that follows it). Never blocks in threaded mode.
    pub fn write_then_sync(&self, write: WriteJob, done: SyncCallback) {
        self.enqueue(Job { write: Some(write), done, synced: true });
    }

    /// Run `write` after the jobs submitted before it and complete `done` with its result, without
    /// waiting for a sync. Never blocks in threaded mode.
    pub fn write(&self, write: WriteJob, done: SyncCallback) {
        self.enqueue(Job { write: Some(write), done, synced: false });
    }

    fn enqueue(&self, job: Job) {
        let Some(thread) = &self.inner.thread else {
            let storage = self.inner.storage.as_ref();
            let mut result = job.write.map_or(Ok(()), |write| write(storage));
            if job.synced && result.is_ok() {
                result = storage.sync();
            }
            (job.done)(result.map_err(io::Error::other));
            return;
        };
        let Some(tx) = &thread.tx else {
            (job.done)(Err(io::Error::other("sync thread stopped")));
            return;
        };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            (job.done)(Err(io::Error::other("sync thread stopped")));
        }
    }
}

impl Drop for SyncerInner {
    fn drop(&mut self) {
        let Some(thread) = &mut self.thread else { return };
        // Closing the channel ends the loop once queued jobs are completed.
        drop(thread.tx.take());
        if let Some(handle) = thread.handle.take() {
            if handle.thread().id() == std::thread::current().id() {
                return;
            }
            if handle.join().is_err() {
                tracing::error!("raft sync thread panicked");
            }
        }
    }
}

fn sync_loop(storage: &dyn Storage, rx: &mpsc::Receiver<Job>) {
    let mut batch = Vec::new();
    let mut waiting = Vec::new();
    // The first failure, repeated to every later job (fail-stop).
    let mut failed: Option<String> = None;
    let fail = |failed: &Option<String>| failed.as_ref().map(|e| io::Error::other(e.clone()));
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < SYNC_ROUND_JOBS_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        for Job { write, done, synced } in batch.drain(..) {
            if let Some(error) = fail(&failed) {
                done(Err(error));
                continue;
            }
            if let Some(write) = write
                && let Err(e) = write(storage)
            {
                tracing::error!(error = %e, "raft log write failed");
                failed = Some(e.to_string());
                done(Err(io::Error::other(e.to_string())));
                continue;
            }
            if synced { waiting.push(done) } else { done(Ok(())) }
        }
        if waiting.is_empty() {
            continue;
        }
        if failed.is_none()
            && let Err(e) = storage.sync()
        {
            tracing::error!(error = %e, callbacks = waiting.len(), "raft log sync failed");
            failed = Some(e.to_string());
        }
        for done in waiting.drain(..) {
            done(fail(&failed).map_or(Ok(()), Err));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    fn exercise(storage: &dyn Storage) {
        let g = "shard-1";
        assert_eq!(storage.first_index(g).unwrap(), None);
        storage.append(g, (1..=10).map(|i| (i, vec![i as u8; 3])).collect()).unwrap();
        storage.append("other", vec![(1, b"x".to_vec())]).unwrap();
        assert_eq!(storage.first_index(g).unwrap(), Some(1));
        assert_eq!(storage.last_entry(g).unwrap(), Some((10, vec![10; 3])));
        let got = storage.read_range(g, 3, Some(6)).unwrap();
        assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(storage.read_range(g, 6, Some(6)).unwrap().is_empty());

        storage.truncate(g, 8).unwrap();
        assert_eq!(storage.last_entry(g).unwrap().map(|(i, _)| i), Some(7));
        storage.purge(g, 4, &[("purged", b"4")]).unwrap();
        assert_eq!(storage.first_index(g).unwrap(), Some(5));
        assert_eq!(storage.get_meta(g, "purged").unwrap(), Some(b"4".to_vec()));
        assert_eq!(storage.read_range(g, 0, None).unwrap().len(), 3);
        assert_eq!(storage.read_range("other", 0, None).unwrap().len(), 1);

        storage.put_meta(g, "vote", b"v1", Durability::Synced).unwrap();
        assert_eq!(storage.get_meta(g, "vote").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(storage.get_meta("other", "vote").unwrap(), None);

        assert_eq!(storage.load_snapshot(g).unwrap(), None);
        storage.save_snapshot(g, b"snap-1").unwrap();
        storage.save_snapshot(g, b"snap-2").unwrap();
        assert_eq!(storage.load_snapshot(g).unwrap(), Some(b"snap-2".to_vec()));

        assert_eq!(storage.next_incarnation(0).unwrap(), 1);
        assert_eq!(storage.next_incarnation(0).unwrap(), 2);
        assert!(matches!(storage.append("../etc", vec![]), Err(StorageError::InvalidGroupName { .. })));
        storage.sync().unwrap();
    }

    #[test]
    fn mem_storage_operations() {
        exercise(&MemStorage::new());
    }

    #[test]
    fn fjall_storage_operations_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = FjallStorage::open(dir.path()).unwrap();
            exercise(&storage);
        }
        let storage = FjallStorage::open(dir.path()).unwrap();
        assert_eq!(storage.first_index("shard-1").unwrap(), Some(5));
        assert_eq!(storage.last_entry("shard-1").unwrap(), Some((7, vec![7; 3])));
        assert_eq!(storage.get_meta("shard-1", "vote").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(storage.load_snapshot("shard-1").unwrap(), Some(b"snap-2".to_vec()));
        assert_eq!(storage.next_incarnation(0).unwrap(), 3);
        // A floor (the wall clock) lifts it, once; the count goes on from there.
        assert_eq!(storage.next_incarnation(1_000).unwrap(), 1_000);
        assert_eq!(storage.next_incarnation(5).unwrap(), 1_001);
    }

    /// Purges one after another (each from where the last ended, as after every snapshot), after
    /// a reopen (where the last one ended is not known), and past a gap (a follower's log after it
    /// installed a snapshot) delete exactly the entries up to their index.
    fn successive_purges(storage: &dyn Storage) -> Vec<u64> {
        let g = "shard-2";
        let indexes = |storage: &dyn Storage| -> Vec<u64> {
            storage.read_range(g, 0, None).unwrap().into_iter().map(|(i, _)| i).collect()
        };
        storage.append(g, (1..=20).map(|i| (i, vec![1])).collect()).unwrap();
        storage.purge(g, 5, &[]).unwrap();
        assert_eq!(indexes(storage), (6..=20).collect::<Vec<_>>());
        storage.purge(g, 12, &[]).unwrap();
        assert_eq!(indexes(storage), (13..=20).collect::<Vec<_>>());
        // Purging below what is already gone deletes nothing more.
        storage.purge(g, 9, &[]).unwrap();
        assert_eq!(indexes(storage), (13..=20).collect::<Vec<_>>());
        // The log restarts far ahead, after a snapshot was installed.
        storage.purge(g, 20, &[]).unwrap();
        let far = 20 + PURGE_BY_INDEX_MAX * 3;
        storage.append(g, (far..far + 10).map(|i| (i, vec![2])).collect()).unwrap();
        storage.purge(g, far + 4, &[]).unwrap();
        assert_eq!(indexes(storage), (far + 5..far + 10).collect::<Vec<_>>());
        indexes(storage)
    }

    #[test]
    fn successive_purges_delete_exactly_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let left = {
            let storage = FjallStorage::open(dir.path()).unwrap();
            successive_purges(&storage)
        };
        assert_eq!(successive_purges(&MemStorage::new()), left);
        // After a reopen the storage finds the first entry again.
        let storage = FjallStorage::open(dir.path()).unwrap();
        let last = *left.last().unwrap();
        storage.purge("shard-2", last - 1, &[]).unwrap();
        assert_eq!(storage.first_index("shard-2").unwrap(), Some(last));
    }

    #[test]
    fn mem_crash_keeps_only_synced_writes() {
        let storage = MemStorage::new();
        storage.append("g", vec![(1, b"a".to_vec())]).unwrap();
        storage.sync().unwrap();
        storage.append("g", vec![(2, b"b".to_vec())]).unwrap();
        storage.put_meta("g", "committed", b"2", Durability::Buffered).unwrap();
        storage.crash();
        assert_eq!(storage.last_entry("g").unwrap(), Some((1, b"a".to_vec())));
        assert_eq!(storage.get_meta("g", "committed").unwrap(), None);

        // A synced write makes earlier writes durable too.
        storage.append("g", vec![(2, b"b".to_vec())]).unwrap();
        storage.put_meta("g", "vote", b"v", Durability::Synced).unwrap();
        storage.crash();
        assert_eq!(storage.last_entry("g").unwrap(), Some((2, b"b".to_vec())));
    }

    #[test]
    fn failed_sync_poisons() {
        let storage = MemStorage::new();
        storage.append("g", vec![(1, b"a".to_vec())]).unwrap();
        storage.inject_sync_failure();
        assert!(matches!(storage.sync(), Err(StorageError::Injected)));
        assert!(matches!(storage.sync(), Err(StorageError::Poisoned)));
        assert!(matches!(storage.append("g", vec![(2, b"b".to_vec())]), Err(StorageError::Poisoned)));
    }

    /// A storage whose first sync waits at a barrier, so that a test can queue callbacks while a
    /// sync is in progress.
    #[derive(Debug)]
    struct GatedSync {
        inner: MemStorage,
        gate: Arc<Barrier>,
        gated: AtomicBool,
    }

    impl Storage for GatedSync {
        fn blocks_on_io(&self) -> bool {
            true
        }
        fn append(&self, group: &str, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StorageError> {
            self.inner.append(group, entries)
        }
        fn sync(&self) -> Result<(), StorageError> {
            if !self.gated.swap(true, Ordering::SeqCst) {
                self.gate.wait(); // sync started
                self.gate.wait(); // test queued more callbacks
            }
            self.inner.sync()
        }
        fn truncate(&self, group: &str, from_index: u64) -> Result<(), StorageError> {
            self.inner.truncate(group, from_index)
        }
        fn purge(&self, group: &str, upto_index: u64, meta: &[(&str, &[u8])]) -> Result<(), StorageError> {
            self.inner.purge(group, upto_index, meta)
        }
        fn read_range(&self, group: &str, start: u64, end: Option<u64>) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
            self.inner.read_range(group, start, end)
        }
        fn first_index(&self, group: &str) -> Result<Option<u64>, StorageError> {
            self.inner.first_index(group)
        }
        fn last_entry(&self, group: &str) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
            self.inner.last_entry(group)
        }
        fn put_meta(&self, group: &str, key: &str, value: &[u8], durability: Durability) -> Result<(), StorageError> {
            self.inner.put_meta(group, key, value, durability)
        }
        fn get_meta(&self, group: &str, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
            self.inner.get_meta(group, key)
        }
        fn save_snapshot(&self, group: &str, data: &[u8]) -> Result<(), StorageError> {
            self.inner.save_snapshot(group, data)
        }
        fn load_snapshot(&self, group: &str) -> Result<Option<Vec<u8>>, StorageError> {
            self.inner.load_snapshot(group)
        }
        fn next_incarnation(&self, at_least: u64) -> Result<u64, StorageError> {
            self.inner.next_incarnation(at_least)
        }
    }

    /// A callback that reports `(n, succeeded)` on `tx`.
    fn report(tx: &mpsc::Sender<(u32, bool)>, n: u32) -> SyncCallback {
        let tx = tx.clone();
        Box::new(move |result: Result<(), io::Error>| tx.send((n, result.is_ok())).unwrap())
    }

    #[test]
    fn syncer_completes_queued_callbacks_with_one_sync() {
        let mem = MemStorage::new();
        let gate = Arc::new(Barrier::new(2));
        let storage: Arc<dyn Storage> =
            Arc::new(GatedSync { inner: mem.clone(), gate: Arc::clone(&gate), gated: AtomicBool::new(false) });
        let syncer = Syncer::threaded(storage).unwrap();
        let (tx, rx) = mpsc::channel();

        let done = |n: u32| report(&tx, n);
        syncer.submit(done(0));
        gate.wait(); // the first sync is now running
        for n in 1..=20 {
            syncer.submit(done(n));
        }
        gate.wait(); // let it finish
        let mut completed: Vec<(u32, bool)> = (0..=20).map(|_| rx.recv().unwrap()).collect();
        completed.sort_unstable();
        assert_eq!(completed, (0..=20).map(|n| (n, true)).collect::<Vec<_>>());
        // One sync for the first callback, one for the twenty queued behind it.
        assert_eq!(mem.sync_count(), 2);
    }

    #[test]
    fn syncer_reports_sync_failure() {
        let mem = MemStorage::new();
        let syncer = Syncer::threaded(Arc::new(mem.clone())).unwrap();
        mem.inject_sync_failure();
        let (tx, rx) = mpsc::channel();
        for _ in 0..3 {
            let tx = tx.clone();
            syncer.submit(Box::new(move |result| tx.send(result.is_ok()).unwrap()));
        }
        assert_eq!((0..3).map(|_| rx.recv().unwrap()).collect::<Vec<_>>(), vec![false; 3]);
    }

    #[test]
    fn syncer_runs_writes_in_order_and_completes_after_a_sync() {
        let mem = MemStorage::new();
        let syncer = Syncer::threaded(Arc::new(mem.clone())).unwrap();
        let (tx, rx) = mpsc::channel();
        let done = |n: u32| report(&tx, n);
        let append = |index: u64| -> WriteJob { Box::new(move |storage| storage.append("g", vec![(index, vec![1])])) };
        syncer.write_then_sync(append(1), done(1));
        syncer.write(append(2), done(2));
        syncer.write_then_sync(append(3), done(3));
        let mut completed: Vec<(u32, bool)> = (0..3).map(|_| rx.recv().unwrap()).collect();
        completed.sort_unstable();
        assert_eq!(completed, vec![(1, true), (2, true), (3, true)]);
        // What the synced callbacks reported survives a crash.
        mem.crash();
        assert_eq!(mem.read_range("g", 0, None).unwrap().iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn syncer_fails_every_job_after_a_failed_write() {
        let mem = MemStorage::new();
        let syncer = Syncer::threaded(Arc::new(mem.clone())).unwrap();
        let (tx, rx) = mpsc::channel();
        let done = |n: u32| report(&tx, n);
        syncer.write_then_sync(Box::new(|_| Err(StorageError::Poisoned)), done(1));
        syncer.write_then_sync(Box::new(|storage| storage.append("g", vec![(1, vec![1])])), done(2));
        syncer.submit(done(3));
        let completed: Vec<(u32, bool)> = (0..3).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(completed, vec![(1, false), (2, false), (3, false)]);
        assert!(mem.read_range("g", 0, None).unwrap().is_empty(), "nothing after a failed write is written");
    }

    #[test]
    fn group_names() {
        for ok in ["meta", "shard-0", "a.b_c", "X9"] {
            validate_group_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a:b", "é", &"x".repeat(GROUP_NAME_LEN_MAX + 1)] {
            assert!(validate_group_name(bad).is_err(), "{bad:?}");
        }
    }
}
