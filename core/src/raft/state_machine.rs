//! The openraft state machine of one group: [`StateMachineStore`] applies committed proposals to a
//! [`ReplicatedState`] held in memory, hands the effects to the node's runtime, and builds, saves,
//! loads and installs snapshots through the shared [`Storage`]. [`StateReader`] lets the runtime read
//! the state while Raft runs. Touches only its group's snapshot in the storage.

use std::fmt;
use std::io::Cursor;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::log_store::{check_version, encode_versioned};
use super::storage::{Storage, StorageError, run_io, validate_group_name};
use super::{GroupConfig, Proposal, ReplicatedState, Replies};

/// Receives the effects produced by one `apply` call, in order, after the call has applied all its
/// entries (and released the state). Called only when there are effects. Must not block: it runs
/// on the state machine's task; hand the effects to a channel.
///
/// Effects are produced again when entries are re-applied after a restart (openraft replays the
/// log between the last snapshot and the last committed entry): the runtime must treat them as
/// idempotent.
pub type EffectSink<E> = Arc<dyn Fn(Vec<E>) + Send + Sync>;

type RaftResult<T> = Result<T, openraft::StorageError<u64>>;

/// Everything the state machine holds, behind one lock so that a snapshot sees a consistent cut.
#[derive(Debug)]
struct Applied<S> {
    state: S,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    /// Committed time: the greatest proposal time applied so far, in ms since the Unix epoch.
    clock_ms: u64,
}

impl<S: Default> Default for Applied<S> {
    fn default() -> Self {
        Self { state: S::default(), last_applied: None, membership: StoredMembership::default(), clock_ms: 0 }
    }
}

/// The snapshot header, encoded (behind the version byte) before the state. Decoding it alone
/// gives a snapshot's metadata without decoding the whole state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotHeader {
    snapshot_id: String,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    clock_ms: u64,
}

impl SnapshotHeader {
    fn meta(&self) -> SnapshotMeta<u64, BasicNode> {
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        }
    }
}

/// A read handle on a group's state, for the node runtime. Cheap to clone.
pub struct StateReader<S> {
    applied: Arc<RwLock<Applied<S>>>,
}

impl<S> Clone for StateReader<S> {
    fn clone(&self) -> Self {
        Self { applied: Arc::clone(&self.applied) }
    }
}

impl<S> fmt::Debug for StateReader<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateReader").finish_non_exhaustive()
    }
}

impl<S> StateReader<S> {
    /// Run `f` on the current state. Holds a read lock for the duration of `f`, which delays
    /// `apply`: keep `f` short and never block or await in it.
    pub fn read<T>(&self, f: impl FnOnce(&S) -> T) -> T {
        f(&read_lock(&self.applied).state)
    }

    /// The index of the last applied entry (`None` before the first).
    pub fn last_applied_index(&self) -> Option<u64> {
        read_lock(&self.applied).last_applied.map(|id| id.index)
    }

    /// The committed clock: the greatest proposal time applied so far, in ms since the Unix epoch.
    pub fn clock_ms(&self) -> u64 {
        read_lock(&self.applied).clock_ms
    }
}

/// A poisoned lock means `ReplicatedState::apply` panicked mid-entry, which its contract forbids:
/// the state may be torn, so stop rather than serve it.
fn read_lock<S>(lock: &RwLock<Applied<S>>) -> RwLockReadGuard<'_, Applied<S>> {
    lock.read().unwrap_or_else(|_: PoisonError<_>| panic!("replicated state poisoned: an apply panicked"))
}

fn write_lock<S>(lock: &RwLock<Applied<S>>) -> RwLockWriteGuard<'_, Applied<S>> {
    lock.write().unwrap_or_else(|_: PoisonError<_>| panic!("replicated state poisoned: an apply panicked"))
}

/// The state machine of one Raft group. Cheap to clone; the clone is also the snapshot builder.
///
/// The state lives in memory; durability comes from snapshots (saved through [`Storage`]) plus the
/// log after them, which openraft replays at startup.
pub struct StateMachineStore<C, S: ReplicatedState> {
    group: Arc<str>,
    storage: Arc<dyn Storage>,
    applied: Arc<RwLock<Applied<S>>>,
    effects: EffectSink<S::Effect>,
    /// Makes snapshot ids unique: starts above the counter of the snapshot loaded at open.
    snapshot_counter: Arc<AtomicU64>,
    /// Serializes snapshot saves and remembers the last saved snapshot's last log id, so that a
    /// snapshot built concurrently with an install never replaces a newer one. A tokio mutex: it
    /// is held across the storage write's await.
    saved: Arc<tokio::sync::Mutex<Option<LogId<u64>>>>,
    _config: PhantomData<fn() -> C>,
}

impl<C, S: ReplicatedState> Clone for StateMachineStore<C, S> {
    fn clone(&self) -> Self {
        Self {
            group: Arc::clone(&self.group),
            storage: Arc::clone(&self.storage),
            applied: Arc::clone(&self.applied),
            effects: Arc::clone(&self.effects),
            snapshot_counter: Arc::clone(&self.snapshot_counter),
            saved: Arc::clone(&self.saved),
            _config: PhantomData,
        }
    }
}

impl<C, S: ReplicatedState> fmt::Debug for StateMachineStore<C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachineStore").field("group", &self.group).finish_non_exhaustive()
    }
}

/// Encode a snapshot: `[version][postcard(header)][postcard(state)]`.
fn encode_snapshot<S: Serialize>(header: &SnapshotHeader, state: &S) -> Result<Vec<u8>, StorageError> {
    let buf = encode_versioned(header, "snapshot header")?;
    postcard::to_extend(state, buf)
        .map_err(|e| StorageError::Malformed { what: "snapshot state", detail: format!("encode: {e}") })
}

/// Decode a snapshot's header, returning it and the encoded state after it.
fn decode_snapshot_header(bytes: &[u8]) -> Result<(SnapshotHeader, &[u8]), StorageError> {
    let body = check_version(bytes, "snapshot")?;
    postcard::take_from_bytes(body)
        .map_err(|e| StorageError::Malformed { what: "snapshot header", detail: e.to_string() })
}

fn decode_snapshot<S: ReplicatedState>(bytes: &[u8]) -> Result<(SnapshotHeader, S), StorageError> {
    let (header, rest) = decode_snapshot_header(bytes)?;
    let state = postcard::from_bytes(rest)
        .map_err(|e| StorageError::Malformed { what: "snapshot state", detail: e.to_string() })?;
    Ok((header, state))
}

/// The counter part of a snapshot id `"<term>-<index>-<counter>"`, if it has that form.
fn snapshot_id_counter(snapshot_id: &str) -> Option<u64> {
    snapshot_id.rsplit('-').next()?.parse().ok()
}

impl<C, S> StateMachineStore<C, S>
where
    S: ReplicatedState,
{
    /// Open `group`'s state machine: the state of its last saved snapshot, or the default state.
    /// openraft then replays the committed log after it.
    pub async fn open(
        group: &str,
        storage: Arc<dyn Storage>,
        effects: EffectSink<S::Effect>,
    ) -> Result<Self, StorageError> {
        validate_group_name(group)?;
        let group: Arc<str> = group.into();
        let name = Arc::clone(&group);
        let loaded = run_io(&storage, move |storage| storage.load_snapshot(&name)).await?;
        let (applied, counter, saved) = match loaded {
            Some(bytes) => {
                let (header, state) = decode_snapshot::<S>(&bytes)?;
                let counter = snapshot_id_counter(&header.snapshot_id).unwrap_or(0);
                let applied = Applied {
                    state,
                    last_applied: header.last_applied,
                    membership: header.membership,
                    clock_ms: header.clock_ms,
                };
                (applied, counter, header.last_applied)
            }
            None => (Applied::default(), 0, None),
        };
        Ok(Self {
            group,
            storage,
            applied: Arc::new(RwLock::new(applied)),
            effects,
            snapshot_counter: Arc::new(AtomicU64::new(counter)),
            saved: Arc::new(tokio::sync::Mutex::new(saved)),
            _config: PhantomData,
        })
    }

    /// A read handle on the state.
    pub fn reader(&self) -> StateReader<S> {
        StateReader { applied: Arc::clone(&self.applied) }
    }

    /// Save `bytes` as the group's snapshot unless a newer one is saved already.
    async fn save_if_newer(&self, last_applied: Option<LogId<u64>>, bytes: Vec<u8>) -> Result<(), StorageError> {
        let mut saved = self.saved.lock().await;
        if *saved > last_applied {
            return Ok(());
        }
        let group = Arc::clone(&self.group);
        run_io(&self.storage, move |storage| storage.save_snapshot(&group, &bytes)).await?;
        *saved = last_applied;
        Ok(())
    }
}

fn snapshot_write_err(e: StorageError) -> openraft::StorageError<u64> {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

fn snapshot_read_err(e: StorageError) -> openraft::StorageError<u64> {
    StorageIOError::read_snapshot(None, AnyError::new(&e)).into()
}

impl<C, S> RaftSnapshotBuilder<C> for StateMachineStore<C, S>
where
    C: GroupConfig<S>,
    S: ReplicatedState,
{
    async fn build_snapshot(&mut self) -> RaftResult<Snapshot<C>> {
        // Encode under the read lock, so that the snapshot is one consistent cut; applying waits
        // meanwhile, which is the price of not cloning the state.
        let (header, bytes) = {
            let applied = read_lock(&self.applied);
            let counter = self.snapshot_counter.fetch_add(1, Ordering::Relaxed) + 1;
            let (term, index) = applied.last_applied.map_or((0, 0), |id| (id.leader_id.term, id.index));
            let header = SnapshotHeader {
                snapshot_id: format!("{term}-{index}-{counter}"),
                last_applied: applied.last_applied,
                membership: applied.membership.clone(),
                clock_ms: applied.clock_ms,
            };
            let bytes = encode_snapshot(&header, &applied.state).map_err(snapshot_write_err)?;
            (header, bytes)
        };
        self.save_if_newer(header.last_applied, bytes.clone()).await.map_err(snapshot_write_err)?;
        tracing::debug!(group = %self.group, snapshot_id = %header.snapshot_id, bytes = bytes.len(), "snapshot built");
        Ok(Snapshot { meta: header.meta(), snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl<C, S> RaftStateMachine<C> for StateMachineStore<C, S>
where
    C: GroupConfig<S>,
    S: ReplicatedState,
{
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> RaftResult<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        let applied = read_lock(&self.applied);
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> RaftResult<Vec<C::R>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut effects = Vec::new();
        let replies = {
            let mut applied = write_lock(&self.applied);
            let applied = &mut *applied;
            entries
                .into_iter()
                .map(|entry| {
                    applied.last_applied = Some(entry.log_id);
                    match entry.payload {
                        EntryPayload::Normal(Proposal { time_ms, commands }) => {
                            // Committed time never goes backwards, whatever the proposers' clocks.
                            let now_ms = applied.clock_ms.max(time_ms);
                            applied.clock_ms = now_ms;
                            Replies(
                                commands
                                    .into_iter()
                                    .map(|command| applied.state.apply(now_ms, command, &mut effects))
                                    .collect(),
                            )
                        }
                        EntryPayload::Blank => Replies(Vec::new()),
                        EntryPayload::Membership(membership) => {
                            applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                            Replies(Vec::new())
                        }
                    }
                })
                .collect()
        };
        // After the lock is released: the sink may read the state.
        if !effects.is_empty() {
            (self.effects)(effects);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> RaftResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> RaftResult<()> {
        let bytes = snapshot.into_inner();
        let (header, state) = decode_snapshot::<S>(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        if header.last_applied != meta.last_log_id || header.membership != meta.last_membership {
            let detail = format!(
                "snapshot data is at {:?} with {}, its metadata says {:?} with {}",
                header.last_applied, header.membership, meta.last_log_id, meta.last_membership
            );
            let e = StorageError::Malformed { what: "installed snapshot", detail };
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)).into());
        }
        // The metadata is authoritative for the id; re-encode the header if the sender's differs.
        let (bytes, clock_ms) = if header.snapshot_id == meta.snapshot_id {
            (bytes, header.clock_ms)
        } else {
            let header = SnapshotHeader { snapshot_id: meta.snapshot_id.clone(), ..header };
            (encode_snapshot(&header, &state).map_err(snapshot_write_err)?, header.clock_ms)
        };
        // Save first: if saving fails, the state is unchanged and openraft stops the group.
        self.save_if_newer(meta.last_log_id, bytes).await.map_err(snapshot_write_err)?;
        if let Some(counter) = snapshot_id_counter(&meta.snapshot_id) {
            self.snapshot_counter.fetch_max(counter, Ordering::Relaxed);
        }
        *write_lock(&self.applied) =
            Applied { state, last_applied: meta.last_log_id, membership: meta.last_membership.clone(), clock_ms };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> RaftResult<Option<Snapshot<C>>> {
        let group = Arc::clone(&self.group);
        let Some(bytes) =
            run_io(&self.storage, move |storage| storage.load_snapshot(&group)).await.map_err(snapshot_read_err)?
        else {
            return Ok(None);
        };
        let (header, _) = decode_snapshot_header(&bytes).map_err(snapshot_read_err)?;
        Ok(Some(Snapshot { meta: header.meta(), snapshot: Box::new(Cursor::new(bytes)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_parse() {
        assert_eq!(snapshot_id_counter("3-120-7"), Some(7));
        assert_eq!(snapshot_id_counter("leader-snapshot"), None);
    }
}
