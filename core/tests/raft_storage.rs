//! Raft storage tests: openraft's own storage suite against the log store and state machine on
//! both storage backends, and restart tests of whole groups (state, vote, log state, snapshots and
//! purging survive a restart; acknowledged writes survive a simulated power loss). Touches only
//! temporary directories and in-memory storage.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, BasicNode, Raft, StorageIOError};
use tempfile::TempDir;
use wharf_core::raft::Proposal;
use wharf_core::raft::group::{GroupStart, raft_config, start_group, wait_for_leader};
use wharf_core::raft::log_store::LogStore;
use wharf_core::raft::network::ClusterNetwork;
use wharf_core::raft::state_machine::{EffectSink, StateMachineStore, StateReader};
use wharf_core::raft::storage::{FjallStorage, MemStorage, Storage, Syncer};
use wharf_core::raft::transport::NoPeers;

#[path = "common/counters.rs"]
mod counters;

use counters::{CounterCommand, CounterEffect, Counters, TestConfig};

type TestLogStore = LogStore<TestConfig>;
type TestStateMachine = StateMachineStore<TestConfig, Counters>;

fn no_effects() -> EffectSink<CounterEffect> {
    Arc::new(|_| {})
}

fn suite_err(e: impl std::error::Error + 'static) -> openraft::StorageError<u64> {
    StorageIOError::write(AnyError::new(&e)).into()
}

async fn stores(storage: Arc<dyn Storage>) -> Result<(TestLogStore, TestStateMachine), openraft::StorageError<u64>> {
    let syncer = Syncer::new(Arc::clone(&storage)).map_err(suite_err)?;
    let log = LogStore::new("suite", Arc::clone(&storage), syncer).map_err(suite_err)?;
    let sm = StateMachineStore::open("suite", storage, no_effects()).await.map_err(suite_err)?;
    Ok((log, sm))
}

// ------------------------------------------------------------------------------------------------
// openraft's storage suite

struct FjallBuilder;

impl StoreBuilder<TestConfig, TestLogStore, TestStateMachine, TempDir> for FjallBuilder {
    async fn build(&self) -> Result<(TempDir, TestLogStore, TestStateMachine), openraft::StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(suite_err)?;
        let storage = FjallStorage::open(dir.path()).map_err(suite_err)?;
        let (log, sm) = stores(Arc::new(storage)).await?;
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TestConfig, TestLogStore, TestStateMachine> for MemBuilder {
    async fn build(&self) -> Result<((), TestLogStore, TestStateMachine), openraft::StorageError<u64>> {
        let (log, sm) = stores(Arc::new(MemStorage::new())).await?;
        Ok(((), log, sm))
    }
}

#[test]
fn openraft_suite_on_fjall_storage() {
    Suite::test_all(FjallBuilder).unwrap();
}

#[test]
fn openraft_suite_on_mem_storage() {
    Suite::test_all(MemBuilder).unwrap();
}

// ------------------------------------------------------------------------------------------------
// Whole groups

const GROUP: &str = "shard-0";
const NODE_ID: u64 = 1;
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a run of proposals should leave behind.
#[derive(Debug, Default)]
struct Expected {
    values: BTreeMap<String, u64>,
    commands: u64,
}

fn config(snapshot_logs_since_last: u64) -> Arc<openraft::Config> {
    raft_config(50, 150, snapshot_logs_since_last, 5_000).unwrap()
}

struct Group {
    raft: Raft<TestConfig>,
    reader: StateReader<Counters>,
    effects: Arc<Mutex<Vec<CounterEffect>>>,
}

async fn start(storage: &Arc<dyn Storage>, syncer: &Syncer, snapshot_logs_since_last: u64) -> Group {
    start_named(GROUP, storage, syncer, snapshot_logs_since_last).await
}

async fn start_named(name: &str, storage: &Arc<dyn Storage>, syncer: &Syncer, snapshot_logs_since_last: u64) -> Group {
    let effects = Arc::new(Mutex::new(Vec::new()));
    let sink_effects = Arc::clone(&effects);
    let sink: EffectSink<CounterEffect> = Arc::new(move |batch| sink_effects.lock().unwrap().extend(batch));
    let voters = BTreeMap::from([(NODE_ID, BasicNode::default())]);
    let start = GroupStart {
        name,
        node_id: NODE_ID,
        raft_config: config(snapshot_logs_since_last),
        voters,
        elect_first: false,
        form: true,
    };
    let (raft, reader) = start_group::<TestConfig, Counters, _>(
        start,
        ClusterNetwork::new(name, Arc::new(NoPeers)),
        Arc::clone(storage),
        syncer.clone(),
        sink,
    )
    .await
    .unwrap();
    assert_eq!(wait_for_leader(&raft, TIMEOUT).await.unwrap(), NODE_ID);
    Group { raft, reader, effects }
}

/// Propose `count` single-command entries (numbered from `first`) and check each reply.
async fn propose(group: &Group, expected: &mut Expected, first: u64, count: u64) {
    for n in first..first + count {
        let key = format!("k{}", n % 7);
        // Times go up and down: committed time must still never go backwards.
        let time_ms = 1_000_000 + if n % 3 == 0 { n / 2 } else { n * 10 };
        let proposal = Proposal { time_ms, commands: vec![CounterCommand::Add { key: key.clone(), delta: n }] };
        let response = group.raft.client_write(proposal).await.unwrap();
        let value = expected.values.entry(key).or_default();
        *value += n;
        expected.commands += 1;
        assert_eq!(response.data.0, vec![*value], "reply to proposal {n}");
    }
}

fn assert_state(reader: &StateReader<Counters>, expected: &Expected) {
    reader.read(|state| {
        assert_eq!(state.values, expected.values);
        assert_eq!(state.applied_commands, expected.commands);
    });
}

/// Wait until every clone of the storage is dropped (the Raft tasks finish shortly after
/// `shutdown` returns), so that it can be reopened.
async fn wait_released(storage: Weak<dyn Storage>) {
    let deadline = Instant::now() + TIMEOUT;
    while storage.strong_count() > 0 {
        assert!(Instant::now() < deadline, "storage still in use after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a group, writes, takes snapshots, shuts down, and checks what a restart finds.
/// `reopen` gives the storage again after the first instance is released.
async fn restart_scenario(first: Arc<dyn Storage>, reopen: impl Fn() -> Arc<dyn Storage>) {
    const PROPOSALS: u64 = 300;
    const SNAPSHOT_EVERY: u64 = 40;

    let mut expected = Expected::default();
    assert_eq!(first.next_incarnation(0).unwrap(), 1);
    let syncer = Syncer::new(Arc::clone(&first)).unwrap();
    let group = start(&first, &syncer, SNAPSHOT_EVERY).await;
    propose(&group, &mut expected, 1, PROPOSALS).await;
    assert_state(&group.reader, &expected);
    assert_eq!(group.effects.lock().unwrap().len() as u64, PROPOSALS, "one effect per command");

    // Snapshots follow the policy and the log is purged behind them.
    let metrics = group
        .raft
        .wait(Some(TIMEOUT))
        .metrics(
            |m| {
                m.snapshot.is_some_and(|s| s.index + SNAPSHOT_EVERY > PROPOSALS)
                    && m.purged.is_some_and(|p| p.index > 1)
            },
            "snapshot taken and log purged",
        )
        .await
        .unwrap();
    let vote = metrics.vote;
    let last_log_index = metrics.last_log_index.unwrap();
    let purged = metrics.purged.unwrap();
    let clock_ms = group.reader.clock_ms();
    assert!(clock_ms >= 1_000_000 + (PROPOSALS - 1) * 10, "clock is the max proposal time, got {clock_ms}");
    assert!(group.reader.last_applied_index().unwrap() >= last_log_index);

    group.raft.shutdown().await.unwrap();
    let Group { raft, reader, .. } = group;
    drop((raft, reader, syncer));
    let weak = Arc::downgrade(&first);
    drop(first);
    wait_released(weak).await;

    // What is on storage, seen through the log store and state machine.
    let storage = reopen();
    assert_eq!(storage.next_incarnation(0).unwrap(), 2, "incarnation survives restarts");
    assert!(storage.first_index(GROUP).unwrap().unwrap() > 1, "log purged");
    {
        let syncer = Syncer::new(Arc::clone(&storage)).unwrap();
        let mut log = TestLogStore::new(GROUP, Arc::clone(&storage), syncer).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        let log_state = log.get_log_state().await.unwrap();
        assert_eq!(log_state.last_log_id.map(|id| id.index), Some(last_log_index));
        assert!(log_state.last_purged_log_id >= Some(purged), "{log_state:?} vs purged {purged}");
        assert!(log.read_committed().await.unwrap().is_some());

        let mut sm = TestStateMachine::open(GROUP, Arc::clone(&storage), no_effects()).await.unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().expect("a snapshot was saved");
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied, snapshot.meta.last_log_id, "state machine opens at its snapshot");
        assert!(applied.unwrap().index >= log_state.last_purged_log_id.unwrap().index);
    }

    // The restarted group has the full state, and goes on.
    let syncer = Syncer::new(Arc::clone(&storage)).unwrap();
    let group = start(&storage, &syncer, SNAPSHOT_EVERY).await;
    group
        .raft
        .wait(Some(TIMEOUT))
        .metrics(|m| m.last_applied.is_some_and(|a| a.index >= last_log_index), "log re-applied")
        .await
        .unwrap();
    assert_state(&group.reader, &expected);
    assert!(group.reader.clock_ms() >= clock_ms, "committed clock restored");
    propose(&group, &mut expected, PROPOSALS + 1, 10).await;
    assert_state(&group.reader, &expected);
    group.raft.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_group_restarts_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let first: Arc<dyn Storage> = Arc::new(FjallStorage::open(&path).unwrap());
    restart_scenario(first, || Arc::new(FjallStorage::open(&path).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_group_restarts_with_its_state() {
    let mem = MemStorage::new();
    let first: Arc<dyn Storage> = Arc::new(mem.clone());
    restart_scenario(first, || Arc::new(mem.clone())).await;
}

/// Every write acknowledged to a client survives a power loss: the log entries were synced before
/// the flush callback completed, and the vote before `save_vote` returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_crash() {
    let mem = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    let syncer = Syncer::new(Arc::clone(&storage)).unwrap();
    let mut expected = Expected::default();
    let group = start(&storage, &syncer, 1_000).await;
    propose(&group, &mut expected, 1, 50).await;
    let vote = group.raft.metrics().borrow().vote;
    group.raft.shutdown().await.unwrap();
    drop((group, syncer));
    let weak = Arc::downgrade(&storage);
    drop(storage);
    wait_released(weak).await;

    mem.crash();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    let syncer = Syncer::new(Arc::clone(&storage)).unwrap();
    let mut log = TestLogStore::new(GROUP, Arc::clone(&storage), syncer.clone()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert!(log.get_log_state().await.unwrap().last_log_id.unwrap().index >= 50);

    let group = start(&storage, &syncer, 1_000).await;
    group
        .raft
        .wait(Some(TIMEOUT))
        .metrics(|m| m.last_applied.is_some_and(|a| a.index >= 51), "log re-applied")
        .await
        .unwrap();
    assert_state(&group.reader, &expected);
    group.raft.shutdown().await.unwrap();
}

/// `save_vote` is durable when it returns, even with no later write to carry it to disk.
#[tokio::test]
async fn saved_vote_survives_a_crash() {
    let mem = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    let syncer = Syncer::new(Arc::clone(&storage)).unwrap();
    let mut log = TestLogStore::new(GROUP, Arc::clone(&storage), syncer.clone()).unwrap();
    let vote = openraft::Vote::new(3, NODE_ID);
    log.save_vote(&vote).await.unwrap();
    log.save_committed(Some(openraft::testing::log_id(3, NODE_ID, 0))).await.unwrap();
    mem.crash();
    let mut log = TestLogStore::new(GROUP, storage, syncer).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    // The committed id is deliberately not synced: a crash may lose it, and openraft copes.
    assert_eq!(log.read_committed().await.unwrap(), None);
}

/// Several groups share one storage and one syncer, writing concurrently; each keeps its own log
/// and state across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_share_one_fjall_storage() {
    const GROUPS: usize = 4;
    const PROPOSALS: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FjallStorage::open(dir.path()).unwrap());
    let syncer = Syncer::new(Arc::clone(&storage)).unwrap();

    let names: Vec<String> = (0..GROUPS).map(|i| format!("shard-{i}")).collect();
    let mut tasks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let group = start_named(name, &storage, &syncer, 25).await;
        tasks.push(tokio::spawn(async move {
            let mut expected = Expected::default();
            // Different groups write different amounts, so their logs differ.
            propose(&group, &mut expected, 1, PROPOSALS + i as u64).await;
            assert_state(&group.reader, &expected);
            group.raft.shutdown().await.unwrap();
            expected
        }));
    }
    let mut expected = Vec::new();
    for task in tasks {
        expected.push(task.await.unwrap());
    }
    drop(syncer);
    let weak = Arc::downgrade(&storage);
    drop(storage);
    wait_released(weak).await;

    let storage: Arc<dyn Storage> = Arc::new(FjallStorage::open(dir.path()).unwrap());
    let syncer = Syncer::new(Arc::clone(&storage)).unwrap();
    for (name, expected) in names.iter().zip(&expected) {
        let group = start_named(name, &storage, &syncer, 25).await;
        group
            .raft
            .wait(Some(TIMEOUT))
            .metrics(|m| m.last_applied.is_some_and(|a| a.index > expected.commands), "log re-applied")
            .await
            .unwrap();
        assert_state(&group.reader, expected);
        group.raft.shutdown().await.unwrap();
    }
}
