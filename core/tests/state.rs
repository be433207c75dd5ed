//! End-to-end tests of front-end state records (`Core::state_write` and friends): real Raft
//! groups on in-memory storage (restarts reopen the same `MemStorage`, crashes drop what was not
//! synced) or on fjall (restarts across snapshots).

mod common;

use std::time::Duration;

use bytes::Bytes;
use wharf_core::model::{FieldValue, Headers};
use wharf_core::node::{ConsumeOptions, QueueSpec};
use wharf_core::queue::ConsumerId;
use wharf_core::raft::storage::MemStorage;
use wharf_core::{Core, CoreConfig, CoreError, StateWrite};

fn config() -> CoreConfig {
    common::memory_config(2)
}

async fn open(storage: &MemStorage) -> Core {
    common::open_on(config(), storage).await
}

async fn queue(core: &Core, vhost: &str, name: &str, durable: bool) {
    let spec = QueueSpec { vhost: vhost.into(), name: name.into(), durable, ..QueueSpec::default() };
    core.declare_queue(spec).await.expect("declare queue");
}

/// Every record of a vhost, as text.
fn records(core: &Core, vhost: &str) -> Vec<(String, String)> {
    core.state_scan(vhost, "")
        .into_iter()
        .map(|(key, value)| (key, String::from_utf8_lossy(&value).into_owned()))
        .collect()
}

fn keys(core: &Core, vhost: &str) -> Vec<String> {
    records(core, vhost).into_iter().map(|(key, _)| key).collect()
}

#[tokio::test]
async fn put_get_scan_and_delete_prefix() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    core.state_write(
        "/",
        vec![
            StateWrite::put("session/c1/sub/a", "1"),
            StateWrite::put("session/c1/sub/b", "1"),
            StateWrite::put("session/c10/sub/a", "2"),
            StateWrite::put("retained/x", "r"),
        ],
    )
    .await
    .expect("write");
    // The caller's own writes are visible once the call returned.
    assert_eq!(core.state_get("/", "retained/x"), Some(Bytes::from("r")));
    assert_eq!(core.state_get("/", "retained/y"), None);
    assert_eq!(core.state_get("nope", "retained/x"), None);
    let c1: Vec<String> = core.state_scan("/", "session/c1/").into_iter().map(|(key, _)| key).collect();
    assert_eq!(c1, ["session/c1/sub/a", "session/c1/sub/b"], "sorted, and c10 is not under c1/");

    // Writes apply in order: a later write of the same key wins, a delete removes.
    core.state_write(
        "/",
        vec![
            StateWrite::put("retained/x", "old"),
            StateWrite::put("retained/x", "new"),
            StateWrite::delete("session/c1/sub/b"),
            StateWrite::delete("never/there"),
        ],
    )
    .await
    .expect("write");
    assert_eq!(core.state_get("/", "retained/x"), Some(Bytes::from("new")));
    assert_eq!(core.state_delete_prefix("/", "session/").await.expect("delete prefix"), 2);
    assert_eq!(records(&core, "/"), [("retained/x".to_owned(), "new".to_owned())]);
    assert_eq!(core.state_delete_prefix("/", "session/").await.expect("delete prefix"), 0);
    core.state_write("/", Vec::new()).await.expect("nothing to write");

    for error in [
        core.state_write("nope", vec![StateWrite::put("k", "v")]).await.expect_err("unknown vhost"),
        core.state_write("nope", Vec::new()).await.expect_err("unknown vhost"),
        core.state_delete_prefix("nope", "").await.expect_err("unknown vhost"),
    ] {
        assert!(matches!(error, CoreError::NotFound(_)), "{error}");
    }
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_write_breaking_a_limit_or_naming_a_missing_owner_writes_nothing() {
    let storage = MemStorage::new();
    let mut config = config();
    config.limits.state_key_len_max_bytes = 8;
    config.limits.message_size_max_bytes = 100;
    config.limits.state_value_size_max_bytes = 100;
    config.limits.batch_bytes_max = 1_000;
    config.limits.state_records_max = 3;
    let core = common::open_on(config, &storage).await;
    queue(&core, "/", "owner", true).await;
    core.state_write("/", vec![StateWrite::put("a", "1"), StateWrite::put("b", "1")]).await.expect("write");
    let before = records(&core, "/");

    let cases: Vec<(Vec<StateWrite>, &str)> = vec![
        (vec![StateWrite::put("c", "2"), StateWrite::put("123456789", "2")], "limits.state_key_len_max_bytes"),
        (vec![StateWrite::put("c", "2"), StateWrite::put("d", vec![0u8; 101])], "limits.state_value_size_max_bytes"),
        (vec![StateWrite::put("c", "2"), StateWrite::put("d", "2")], "limits.state_records_max"),
        ((0..11).map(|i| StateWrite::put(format!("k{i}"), vec![0u8; 100])).collect(), "limits.batch_bytes_max"),
    ];
    for (writes, key) in cases {
        let error = core.state_write("/", writes).await.expect_err("refused");
        assert!(matches!(error, CoreError::LimitExceeded { limit, .. } if limit == key), "{key}: {error}");
        assert!(!error.is_retryable());
        assert_eq!(records(&core, "/"), before, "{key}: nothing written");
    }
    let error = core
        .state_write("/", vec![StateWrite::put("c", "2"), StateWrite::put_owned("d", "2", "missing")])
        .await
        .expect_err("no owner");
    assert!(matches!(error, CoreError::NotFound(_)), "{error}");
    assert_eq!(records(&core, "/"), before, "nothing written");
    let error = core.state_delete_prefix("/", "123456789").await.expect_err("prefix too long");
    assert!(matches!(error, CoreError::LimitExceeded { limit: "limits.state_key_len_max_bytes", .. }), "{error}");

    // One write alone may be as large as a value may be, whatever the batch bound; at the record
    // bound, replacing and deleting still work.
    core.state_write("/", vec![StateWrite::put_owned("c", vec![1u8; 100], "owner")]).await.expect("third record");
    core.state_write("/", vec![StateWrite::delete("a"), StateWrite::put("d", "3")]).await.expect("no growth");
    assert_eq!(keys(&core, "/"), ["b", "c", "d"]);
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn owned_records_go_with_their_queue_by_every_path() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    let owner = core.new_connection();
    queue(&core, "/", "deleted", true).await;
    let exclusive = QueueSpec {
        vhost: "/".into(),
        name: "exclusive".into(),
        exclusive: true,
        connection: Some(owner),
        ..QueueSpec::default()
    };
    core.declare_queue(exclusive).await.expect("declare exclusive");
    let expiring = QueueSpec {
        vhost: "/".into(),
        name: "expiring".into(),
        durable: true,
        arguments: Headers(vec![("x-expires".into(), FieldValue::I32(200))]),
        ..QueueSpec::default()
    };
    core.declare_queue(expiring).await.expect("declare expiring");
    let auto = QueueSpec { vhost: "/".into(), name: "auto".into(), auto_delete: true, ..QueueSpec::default() };
    core.declare_queue(auto).await.expect("declare auto-delete");
    let id = ConsumerId { connection: core.new_connection(), seq: 1 };
    let consumer = core.consume("/", "auto", id, ConsumeOptions::default()).await.expect("consume");
    let mut writes = vec![StateWrite::put("free", "v")];
    for name in ["deleted", "exclusive", "expiring", "auto"] {
        writes.push(StateWrite::put_owned(format!("{name}/1"), "v", name));
        writes.push(StateWrite::put_owned(format!("{name}/2"), "v", name));
    }
    core.state_write("/", writes).await.expect("write");
    assert_eq!(records(&core, "/").len(), 9);

    core.delete_queue("/", "deleted", false, false, None).await.expect("queue.delete");
    assert!(!keys(&core, "/").iter().any(|key| key.starts_with("deleted/")), "queue.delete");
    core.close_connection(owner).await.expect("close");
    assert!(!keys(&core, "/").iter().any(|key| key.starts_with("exclusive/")), "exclusive owner closed");
    consumer.cancel().await.expect("cancel");
    assert!(!keys(&core, "/").iter().any(|key| key.starts_with("auto/")), "auto-delete");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while keys(&core, "/").iter().any(|key| key.starts_with("expiring/")) {
        assert!(tokio::time::Instant::now() < deadline, "x-expires did not take the records");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(core.queue_status("/", "expiring").is_err(), "x-expires");
    assert_eq!(keys(&core, "/"), ["free"], "records owned by no queue stay");

    // A vhost's deletion takes every record in it, owned or not.
    core.create_vhost("v2").await.expect("vhost");
    queue(&core, "v2", "q", true).await;
    core.state_write("v2", vec![StateWrite::put("free", "v"), StateWrite::put_owned("owned", "v", "q")])
        .await
        .expect("write");
    core.delete_vhost("v2").await.expect("delete vhost");
    core.create_vhost("v2").await.expect("vhost again");
    assert!(records(&core, "v2").is_empty(), "the vhost's records went with it");
    assert_eq!(keys(&core, "/"), ["free"], "other vhosts keep theirs");
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn records_are_synced_before_the_write_returns() {
    let storage = MemStorage::new();
    let core = open(&storage).await;
    queue(&core, "/", "session", true).await;
    core.state_write("/", vec![StateWrite::put_owned("s/1", "a", "session"), StateWrite::put("r/1", "b")])
        .await
        .expect("write");
    // The power goes out right after the call returned: whatever was not synced is lost.
    storage.crash();
    core.shutdown().await.expect("stop the groups");
    drop(core);
    let core = open(&storage).await;
    assert_eq!(records(&core, "/"), [("r/1".to_owned(), "b".to_owned()), ("s/1".to_owned(), "a".to_owned())]);
    core.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn records_survive_a_restart_across_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = CoreConfig::single_node(dir.path());
    config.raft_heartbeat_interval_ms = 50;
    config.raft_election_timeout_min_ms = 150;
    config.snapshot_logs_since_last = 5;
    let core = Core::open(config.clone()).await.expect("open");
    queue(&core, "/", "session", true).await;
    queue(&core, "/", "transient", false).await;
    for i in 0..20 {
        // Enough entries to cross meta snapshots: the records must be in them.
        core.state_write("/", vec![StateWrite::put_owned(format!("s/{i:02}"), format!("{i}"), "session")])
            .await
            .expect("write");
    }
    core.state_write("/", vec![StateWrite::put("retained/t", "r"), StateWrite::put_owned("t/1", "x", "transient")])
        .await
        .expect("write");
    core.shutdown().await.expect("shutdown");
    drop(core);
    assert!(dir.path().join("snapshots/meta.snap").exists(), "no meta snapshot: the test would not cover one");

    let core = Core::open(config.clone()).await.expect("reopen");
    let sessions = core.state_scan("/", "s/");
    assert_eq!(sessions.len(), 20);
    assert_eq!(sessions[7], ("s/07".to_owned(), Bytes::from("7")));
    assert_eq!(core.state_get("/", "retained/t"), Some(Bytes::from("r")));
    assert_eq!(core.state_get("/", "t/1"), None, "a transient queue does not survive, nor do its records");
    // The owner index was rebuilt from the snapshot: deleting the owner still finds its records.
    core.delete_queue("/", "session", false, false, None).await.expect("delete");
    assert_eq!(keys(&core, "/"), ["retained/t"]);
    core.shutdown().await.expect("shutdown");
}
