//! The core as a three-node cluster in one process: every node on its own in-memory storage, the
//! nodes joined by the in-process switchboard. A queue declared on one node is published to on
//! another and consumed on the third; followers forward their commands to each group's leader and
//! deliver to their own consumers from their own replicas; when a node holding leaderships stops,
//! the others elect new leaders and carry on, and no confirmed message is lost or delivered twice.
//! Touches only in-memory storage.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use wharf_core::model::Message;
use wharf_core::node::{ConsumeOptions, Consumer, ConsumerEvent, QueueSpec};
use wharf_core::queue::{ConsumerId, Outcome};
use wharf_core::raft::storage::MemStorage;
use wharf_core::raft::transport::{RaftService, Switchboard};
use wharf_core::{ClusterLink, Core, CoreConfig, CoreError};

const NODES: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Open nodes 1..=3 at once (each waits for a majority to elect leaders).
async fn cluster(board: &Arc<Switchboard>) -> Vec<Core> {
    cluster_with(board, |_| {}).await
}

/// [`cluster`], each node's configuration changed by `adjust` first.
async fn cluster_with(board: &Arc<Switchboard>, adjust: impl Fn(&mut CoreConfig)) -> Vec<Core> {
    let mut opening = Vec::new();
    for id in 1..=NODES {
        opening.push(open_node(board, id, &adjust));
    }
    let mut cores = Vec::new();
    for opened in opening {
        cores.push(tokio::time::timeout(TIMEOUT, opened).await.expect("nodes open").unwrap().expect("open core"));
    }
    cores
}

/// Start opening node `id` of the three (attached to `board` at once), its configuration changed
/// by `adjust`.
fn open_node(
    board: &Arc<Switchboard>,
    id: u64,
    adjust: impl Fn(&mut CoreConfig),
) -> tokio::task::JoinHandle<Result<Core, CoreError>> {
    open_node_on(board, id, MemStorage::new(), false, adjust)
}

/// [`open_node`] on `storage`; with `join`, as a node joining the running cluster (peers 1..=3
/// and itself), which waits to be added.
fn open_node_on(
    board: &Arc<Switchboard>,
    id: u64,
    storage: MemStorage,
    join: bool,
    adjust: impl Fn(&mut CoreConfig),
) -> tokio::task::JoinHandle<Result<Core, CoreError>> {
    let voters: BTreeMap<u64, String> =
        (1..=NODES).chain(join.then_some(id)).map(|id| (id, format!("node-{id}"))).collect();
    let mut config = common::memory_config(2);
    adjust(&mut config);
    config.node_id = id;
    let service = Arc::new(RaftService::new());
    board.attach(id, Arc::clone(&service));
    let link = ClusterLink { voters, transport: board.transport(id), service, join };
    tokio::spawn(Core::open_in(config, Arc::new(storage), Some(link)))
}

/// Publish `payload` with its own idempotency key, retrying while leadership moves: a retry of a
/// publish that was committed after all is answered as a duplicate, not stored twice.
async fn publish(core: &Core, payload: &str) {
    let mut message = Message::new("", "orders", payload.to_owned());
    message.idempotency_key = Some(payload.to_owned());
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match core.publish_confirmed("/", message.clone()).await {
            Ok(published) => {
                assert!(published.confirmed() && !published.unroutable(), "{payload}: {published:?}");
                return;
            }
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("publish {payload}: {error}"),
        }
    }
}

/// Receive and ack until `count` messages came; return their payloads in delivery order.
async fn consume(core: &Core, consumer: &mut Consumer, id: ConsumerId, count: usize) -> Vec<String> {
    let mut received = Vec::new();
    while received.len() < count {
        match tokio::time::timeout(TIMEOUT, consumer.recv()).await {
            Ok(Some(ConsumerEvent::Delivery(delivery))) => {
                received.push(String::from_utf8_lossy(&delivery.message.payload).into_owned());
                core.settle(id, &[delivery.position], Outcome::Ack).await.expect("ack");
            }
            other => panic!("expected a delivery after {} messages, got {other:?}", received.len()),
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_on_one_node_is_published_to_on_another_and_consumed_on_the_third() {
    let board = Switchboard::new();
    let cores = cluster(&board).await;
    let spec = QueueSpec { vhost: "/".into(), name: "orders".into(), durable: true, ..QueueSpec::default() };
    cores[0].declare_queue(spec).await.expect("declare on node 1");
    // Every node's catalogue has it once the declaration is committed and applied there.
    for core in &cores {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while core.queue_status("/", "orders").is_err() {
            assert!(tokio::time::Instant::now() < deadline, "the queue never reached node {}", core.config().node_id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Leaderships start spread over the nodes: each stood for election first in its own group.
    let leaders: Vec<Option<u64>> = cores[0].group_status().iter().map(|group| group.leader).collect();
    assert_eq!(leaders, vec![Some(1), Some(2), Some(3)], "meta, shard-0 and shard-1 led by nodes 1, 2 and 3");
    // Every node sees every group with the three voters, and they agree on its leader.
    let views: Vec<_> = cores.iter().map(Core::group_status).collect();
    for (index, group) in views[0].iter().enumerate() {
        assert_eq!(group.voters, vec![1, 2, 3], "{group:?}");
        let leaders: Vec<_> = views.iter().map(|view| view[index].leader).collect();
        assert!(
            leaders.iter().all(|leader| leader.is_some() && *leader == leaders[0]),
            "{} leaders: {leaders:?}",
            group.group
        );
        let leader = leaders[0].expect("a leader");
        let on_leader = &views[(leader - 1) as usize][index];
        assert_eq!(on_leader.state, "leader");
        assert!(on_leader.replicated.as_ref().is_some_and(|nodes| nodes.len() == 3), "{on_leader:?}");
    }

    let id = ConsumerId { connection: cores[2].new_connection(), seq: 1 };
    let mut consumer = cores[2].consume("/", "orders", id, ConsumeOptions::default()).await.expect("consume on node 3");
    for n in 0..100 {
        publish(&cores[1], &format!("m{n:04}")).await;
    }
    let received = consume(&cores[2], &mut consumer, id, 100).await;
    let expected: Vec<String> = (0..100).map(|n| format!("m{n:04}")).collect();
    assert_eq!(received, expected, "every message once, in order");
    assert_eq!(cores[0].queue_status("/", "orders").expect("status on node 1").0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_stops_the_others_elect_leaders_and_lose_no_confirmed_message() {
    let board = Switchboard::new();
    let cores = cluster(&board).await;
    let spec = QueueSpec { vhost: "/".into(), name: "orders".into(), durable: true, ..QueueSpec::default() };
    cores[0].declare_queue(spec).await.expect("declare");
    for n in 0..50 {
        publish(&cores[n % 3], &format!("m{n:04}")).await;
    }

    // Stop node 1, whatever it leads; nodes 2 and 3 are a majority.
    cores[0].shutdown().await.expect("shutdown node 1");
    board.detach(1);
    for n in 50..100 {
        publish(&cores[1 + n % 2], &format!("m{n:04}")).await;
    }
    let id = ConsumerId { connection: cores[2].new_connection(), seq: 1 };
    let mut consumer = loop {
        match cores[2].consume("/", "orders", id, ConsumeOptions::default()).await {
            Ok(consumer) => break consumer,
            Err(error) if error.is_retryable() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("consume: {error}"),
        }
    };
    let received = consume(&cores[2], &mut consumer, id, 100).await;
    let expected: Vec<String> = (0..100).map(|n| format!("m{n:04}")).collect();
    assert_eq!(received, expected, "every confirmed message once, in order");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await.is_err(),
        "nothing more than what was published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_not_among_the_voters_is_refused() {
    let board = Switchboard::new();
    let mut config = common::memory_config(1);
    config.node_id = 9;
    let service = Arc::new(RaftService::new());
    let link = ClusterLink {
        voters: BTreeMap::from([(1, "node-1".into())]),
        transport: board.transport(9),
        service,
        join: false,
    };
    let error = Core::open_in(config, Arc::new(MemStorage::new()), Some(link)).await.expect_err("refused");
    assert!(matches!(&error, CoreError::InvalidArgument(text) if text.contains("node 9")), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_written_by_a_single_node_is_refused_as_a_node_of_a_cluster() {
    let storage = MemStorage::new();
    let single = Core::open_on(common::memory_config(1), Arc::new(storage.clone())).await.expect("open alone");
    single.shutdown().await.expect("shutdown");
    drop(single);

    // Its groups have node 1 as their only voter: going on with them beside the peers' would be a
    // second cluster.
    let board = Switchboard::new();
    let voters: BTreeMap<u64, String> = (1..=NODES).map(|id| (id, format!("node-{id}"))).collect();
    let service = Arc::new(RaftService::new());
    let link = ClusterLink { voters, transport: board.transport(1), service, join: false };
    let error = Core::open_in(common::memory_config(1), Arc::new(storage), Some(link)).await.expect_err("refused");
    let text = error.to_string();
    assert!(matches!(error, CoreError::InvalidArgument(_)), "{text}");
    assert!(text.contains("cluster.peers") && text.contains("voters [1]") && text.contains("[1, 2, 3]"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_catalogue_is_behind_catches_up_before_routing_rather_than_dropping() {
    let board = Switchboard::new();
    let cores = cluster(&board).await;
    let meta_leader = cores[0].group_status()[0].leader.expect("a meta leader");
    // Declared through the third node (a follower of the meta group, like `behind`).
    let others: Vec<u64> = (1..=NODES).filter(|&id| id != meta_leader).collect();
    let (behind, declaring) = (others[0], others[1]);
    // Node `behind` hears nothing from the meta leader: it cannot learn of the declaration.
    board.cut(meta_leader, behind);
    let spec = QueueSpec { vhost: "/".into(), name: "late".into(), durable: true, ..QueueSpec::default() };
    cores[(declaring - 1) as usize].declare_queue(spec).await.expect("declare");
    assert!(cores[(behind - 1) as usize].queue_status("/", "late").is_err(), "node {behind} is behind");
    let heal = {
        let board = Arc::clone(&board);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            board.heal();
        })
    };
    // Routed on the stale catalogue the message would go nowhere, and be dropped as unroutable.
    let published = cores[(behind - 1) as usize]
        .publish_confirmed("/", Message::new("", "late", "x"))
        .await
        .expect("publish through the node behind");
    assert!(!published.unroutable() && published.confirmed(), "{published:?}");
    heal.await.unwrap();
    assert_eq!(cores[(declaring - 1) as usize].queue_status("/", "late").expect("status").0, 1);
}

/// A leader cut off from the others still takes writes; they cannot commit. The others elect a
/// new leader, write on, snapshot and purge their logs, so on healing the old leader gets a
/// snapshot in place of its log. openraft 0.9 then never answers the entry it had proposed, and the
/// group commit on that node waited for it for ever, with every later command of the group on that
/// node behind it (found by the real-process fault run: a restarted node could not rejoin because
/// the shard's leader answered nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_left_unanswered_by_a_deposed_leader_does_not_block_its_node() {
    let board = Switchboard::new();
    let cores = cluster_with(&board, |config| {
        config.shard_count = 1;
        config.snapshot_logs_since_last = 8;
    })
    .await;
    let spec = QueueSpec { vhost: "/".into(), name: "orders".into(), durable: true, ..QueueSpec::default() };
    cores[0].declare_queue(spec).await.expect("declare");
    publish(&cores[0], "first").await;
    let deposed = cores[0].group_status()[1].leader.expect("a leader of shard-0");
    let old_leader = cores[(deposed - 1) as usize].clone();
    let others: Vec<Core> =
        (1..=NODES).filter(|&id| id != deposed).map(|id| cores[(id - 1) as usize].clone()).collect();

    board.isolate(&[deposed]);
    // No idempotency key: the publish goes straight to the shard's group commit on this node.
    let stale =
        tokio::spawn(async move { old_leader.publish_confirmed("/", Message::new("", "orders", "stale")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The new leader purges the log below each snapshot only while no append to the cut-off node
    // is in flight, which its retries interleave with: pauses let it.
    for n in 0..200 {
        publish(&others[n % 2], &format!("m{n:04}")).await;
        if n % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    board.heal();

    let outcome = tokio::time::timeout(TIMEOUT, stale).await.expect("the stale write is answered").unwrap();
    if let Err(error) = &outcome {
        assert!(error.is_retryable(), "an unknown outcome is reported as retryable: {error}");
    }
    let old_leader = &cores[(deposed - 1) as usize];
    tokio::time::timeout(TIMEOUT, publish(old_leader, "after"))
        .await
        .expect("a write through the deposed leader completes");
    // Read where "after" was written: that replica has applied everything confirmed before it.
    let stored = old_leader.queue_status("/", "orders").expect("status").0;
    let stale_stored = u64::from(matches!(outcome, Ok(ref published) if published.confirmed()));
    assert_eq!(stored, 202 + stale_stored, "first, 200 more, after (and the stale one if it was confirmed)");
}

/// A cluster node that starts while no majority is up (a whole cluster restarting one node at a
/// time) waits for one for as long as it takes, rather than giving up: its own replicas are part of
/// what brings the majority back. (On virtual time: the wait is minutes.)
#[tokio::test(start_paused = true)]
async fn a_node_started_alone_waits_for_a_majority_however_long() {
    let board = Switchboard::new();
    let first = open_node(&board, 1, |_| {});
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(!first.is_finished(), "node 1 is still waiting: {:?}", first.await);
    let second = open_node(&board, 2, |_| {});
    let third = open_node(&board, 3, |_| {});
    let mut cores = Vec::new();
    for opening in [first, second, third] {
        cores.push(tokio::time::timeout(TIMEOUT, opening).await.expect("nodes open").unwrap().expect("open core"));
    }
    let spec = QueueSpec { vhost: "/".into(), name: "orders".into(), durable: true, ..QueueSpec::default() };
    cores[0].declare_queue(spec).await.expect("declare");
    publish(&cores[0], "after the wait").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_online_catches_up_and_serves_then_another_is_removed() {
    let board = Switchboard::new();
    // Snapshots every 16 entries: the new node catches up from a snapshot, not only from the log.
    let small_snapshots = |config: &mut CoreConfig| config.snapshot_logs_since_last = 16;
    let cores = cluster_with(&board, small_snapshots).await;
    let spec = QueueSpec { vhost: "/".into(), name: "orders".into(), durable: true, ..QueueSpec::default() };
    cores[0].declare_queue(spec).await.expect("declare");
    for n in 0..60 {
        publish(&cores[n % 3], &format!("m{n:04}")).await;
    }

    // Node 4 starts to join: it forms no group of its own and waits to be added.
    let joining = open_node_on(&board, 4, MemStorage::new(), true, small_snapshots);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!joining.is_finished(), "a joining node waits until it is added");
    let members = cores[1].add_node(4, "node-4", TIMEOUT).await.expect("add node 4");
    let groups: Vec<&str> = members.iter().map(|m| m.group.as_str()).collect();
    assert_eq!(groups, ["meta", "shard-0", "shard-1"]);
    assert!(members.iter().all(|m| m.voters == [1, 2, 3, 4]), "{members:?}");
    let node4 = tokio::time::timeout(TIMEOUT, joining).await.expect("node 4 opens").unwrap().expect("open node 4");
    assert!(node4.is_ready());
    for group in node4.group_status() {
        assert_eq!(group.voters, vec![1, 2, 3, 4], "{group:?}");
    }
    // Asking again changes nothing; the same id at another address is refused.
    let again = cores[2].add_node(4, "node-4", TIMEOUT).await.expect("add node 4 again");
    assert_eq!(again, members);
    let error = cores[2].add_node(4, "elsewhere", TIMEOUT).await.expect_err("another address");
    assert!(matches!(&error, CoreError::InvalidArgument(text) if text.contains("already a member")), "{error}");

    // Node 4 serves: what was published before it joined comes from its own replicas, and what it
    // publishes goes to the groups' leaders.
    for n in 60..80 {
        publish(&node4, &format!("m{n:04}")).await;
    }
    let id = ConsumerId { connection: node4.new_connection(), seq: 1 };
    let mut consumer = node4.consume("/", "orders", id, ConsumeOptions::default()).await.expect("consume on 4");
    let received = consume(&node4, &mut consumer, id, 80).await;
    let expected: Vec<String> = (0..80).map(|n| format!("m{n:04}")).collect();
    assert_eq!(received, expected, "every message once, in order");

    // Node 3 stops and is removed while down, through node 4; a node cannot remove itself.
    cores[2].shutdown().await.expect("stop node 3");
    board.detach(3);
    let error = node4.remove_node(4, TIMEOUT).await.expect_err("not itself");
    assert!(matches!(error, CoreError::InvalidArgument(_)), "{error}");
    let members = node4.remove_node(3, TIMEOUT).await.expect("remove node 3");
    assert!(members.iter().all(|m| m.voters == [1, 2, 4]), "{members:?}");
    // Node 1, the meta group's first leader, is removed while it runs, and then stopped.
    let members = cores[1].remove_node(1, TIMEOUT).await.expect("remove node 1");
    assert!(members.iter().all(|m| m.voters == [2, 4]), "{members:?}");
    cores[0].shutdown().await.expect("stop node 1");
    board.detach(1);
    // Nodes 2 and 4 carry on as the whole cluster.
    for n in 80..100 {
        publish(&cores[1], &format!("m{n:04}")).await;
    }
    let more = consume(&node4, &mut consumer, id, 20).await;
    assert_eq!(more, (80..100).map(|n| format!("m{n:04}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_refuses_to_start_on_its_data_and_the_stored_members_win_over_the_peers() {
    let board = Switchboard::new();
    let storages: Vec<MemStorage> = (1..=NODES).map(|_| MemStorage::new()).collect();
    let mut opening = Vec::new();
    for (id, storage) in (1..=NODES).zip(&storages) {
        opening.push(open_node_on(&board, id, storage.clone(), false, |_| {}));
    }
    let mut cores = Vec::new();
    for opened in opening {
        cores.push(tokio::time::timeout(TIMEOUT, opened).await.expect("open").unwrap().expect("open core"));
    }
    // Node 3 leads shard-1 (the third group) from the start: it commits its own removal there.
    assert_eq!(cores[2].group_status()[2].leader, Some(3));
    let members = cores[0].remove_node(3, TIMEOUT).await.expect("remove node 3");
    assert!(members.iter().all(|m| m.voters == [1, 2]), "{members:?}");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while cores[2].group_status()[2].voters != [1, 2] {
        assert!(tokio::time::Instant::now() < deadline, "node 3 never saw its removal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cores[2].shutdown().await.expect("stop node 3");
    board.detach(3);
    let error = open_node_on(&board, 3, storages[2].clone(), false, |_| {}).await.unwrap().expect_err("refused");
    assert!(matches!(&error, CoreError::InvalidArgument(text) if text.contains("no longer a member")), "{error}");

    // Node 1 restarts with its configured peers still 1..=3: the stored members (1 and 2) win.
    cores[0].shutdown().await.expect("stop node 1");
    board.detach(1);
    let node1 = open_node_on(&board, 1, storages[0].clone(), false, |_| {});
    let node1 = tokio::time::timeout(TIMEOUT, node1).await.expect("reopen").unwrap().expect("reopened");
    assert!(node1.group_status().iter().all(|group| group.voters == [1, 2]));
    assert!(node1.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaderships_are_handed_over_on_request_and_at_a_graceful_shutdown_while_publishing() {
    if let Ok(filter) = std::env::var("WHARF_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let board = Switchboard::new();
    let cores = cluster(&board).await;
    let spec = QueueSpec { vhost: "/".into(), name: "orders".into(), durable: true, ..QueueSpec::default() };
    cores[0].declare_queue(spec).await.expect("declare");
    // A publisher through node 2 keeps going while leaderships move.
    let publisher = {
        let core = cores[1].clone();
        tokio::spawn(async move {
            for n in 0..200 {
                publish(&core, &format!("m{n:04}")).await;
            }
        })
    };

    // Every group to node 3, asked through node 1 (which leads the meta group).
    let leaders = cores[0].transfer_leadership(None, 3, TIMEOUT).await.expect("hand over to 3");
    assert_eq!(leaders.len(), 3);
    assert!(leaders.iter().all(|group| group.leader == 3), "{leaders:?}");
    // The node asked has seen it; the others hear of it at the new leader's next append.
    for core in &cores {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !core.group_status().iter().all(|group| group.leader == Some(3)) {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", core.group_status());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // One group back to node 2, asked through node 3; already there is no change.
    let leaders = cores[2].transfer_leadership(Some("shard-0"), 2, TIMEOUT).await.expect("shard-0 to 2");
    assert_eq!(leaders.iter().map(|g| (g.group.as_str(), g.leader)).collect::<Vec<_>>(), [("shard-0", 2)]);
    let again = cores[0].transfer_leadership(Some("shard-0"), 2, TIMEOUT).await.expect("again");
    assert_eq!(again, leaders);
    let error = cores[0].transfer_leadership(None, 9, TIMEOUT).await.expect_err("not a voter");
    assert!(matches!(&error, CoreError::InvalidArgument(text) if text.contains("not a voter")), "{error}");
    let error = cores[0].transfer_leadership(Some("shard-9"), 2, TIMEOUT).await.expect_err("no such group");
    assert!(matches!(error, CoreError::NotFound(_)), "{error}");

    // Node 3 leads the meta group and shard-1: stepping down (as its graceful shutdown does
    // first) hands them over, so that a survivor leads each of them at once, without waiting
    // for an election timeout.
    tokio::time::timeout(TIMEOUT, publisher).await.expect("publisher finishes").expect("publisher");
    let led: Vec<String> =
        cores[2].group_status().into_iter().filter(|g| g.leader == Some(3)).map(|g| g.group).collect();
    let handed = cores[2].step_down().await;
    let groups: Vec<&str> = handed.iter().map(|g| g.group.as_str()).collect();
    assert_eq!(groups, led, "every group node 3 led is handed over: {handed:?}");
    assert!(!groups.is_empty() && handed.iter().all(|g| g.leader != 3), "{handed:?}");
    for group in &handed {
        let leader = &cores[(group.leader - 1) as usize];
        let status = leader.group_status().into_iter().find(|g| g.group == group.group).expect("the group");
        assert_eq!(status.state, "leader", "{group:?}: {status:?}");
    }
    cores[2].shutdown().await.expect("stop node 3");
    board.detach(3);
    let id = ConsumerId { connection: cores[0].new_connection(), seq: 1 };
    let mut consumer = cores[0].consume("/", "orders", id, ConsumeOptions::default()).await.expect("consume");
    let received = consume(&cores[0], &mut consumer, id, 200).await;
    assert_eq!(received, (0..200).map(|n| format!("m{n:04}")).collect::<Vec<_>>(), "every message once, in order");
}
