//! Transactions over the native API: consume-transform-produce committed atomically, abort,
//! explicit prepare then commit, refusals (an acknowledgement of a delivery no longer held, an
//! idempotency key committed already) rolling everything back, and half messages decided by
//! check-back: a producer that answers commit, one that answers roll back, and one that never
//! answers (rolled back at the maximum age).

use std::time::Duration;

use tonic::Code;
use wharf_client::{MessageExt, message, proto};

use crate::harness::Broker;
use crate::{WAIT, body, client, credit, next, nothing, queue, reason};

/// Ready messages of a queue.
async fn ready(client: &wharf_client::Client, name: &str) -> u64 {
    let listed = client.raw().list_queues(proto::ListQueuesRequest::default()).await.expect("list").into_inner();
    listed.queues.iter().find(|q| q.name == name).map_or_else(|| panic!("no queue {name}"), |q| q.message_count)
}

fn staged(queue: &str, payload: &str) -> proto::StagedPublish {
    proto::StagedPublish { vhost: "/".into(), message: Some(message("", queue, payload.to_owned())) }
}

#[tokio::test]
async fn consume_transform_produce_acks_and_publishes_atomically_and_abort_does_neither() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "orders", Vec::new()).await;
    queue(&client, "ledger", Vec::new()).await;
    client.publish("/", message("", "orders", "order 1")).await.expect("publish");
    client.publish("/", message("", "orders", "order 2")).await.expect("publish");
    let mut orders = client.consume("/", "orders", credit(10)).await.expect("consume");

    let first = next(&mut orders).await;
    let second = next(&mut orders).await;
    let entry = message("", "ledger", "debit 1").key("ledger-1");
    let committed = client.consume_transform_produce(&orders, &first, vec![("/".into(), entry)]).await.expect("commit");
    assert_eq!(committed.published.len(), 1);
    assert_eq!(committed.published[0].positions.len(), 1, "{committed:?}");
    assert_eq!(ready(&client, "ledger").await, 1);
    // The input is acknowledged: no longer held by the consumer.
    let (unknown, _) = orders.ack_confirmed(vec![first.position.expect("position")]).await.expect("ack");
    assert_eq!(unknown.len(), 1, "acked by the transaction");

    // Abort: the output never appears, the input stays held.
    let txn = client.begin(None).await.expect("begin");
    let ack =
        proto::StagedAck { consumer_id: orders.id().to_owned(), positions: vec![second.position.expect("position")] };
    assert_eq!(txn.stage(vec![staged("ledger", "debit 2")], vec![ack]).await.expect("stage"), 2);
    txn.abort().await.expect("abort");
    assert_eq!(ready(&client, "ledger").await, 1);
    let (unknown, _) = orders.ack_confirmed(vec![second.position.expect("position")]).await.expect("ack");
    assert!(unknown.is_empty(), "still held after the abort");
}

#[tokio::test]
async fn a_prepared_transaction_is_invisible_until_committed() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "a", Vec::new()).await;
    queue(&client, "b", Vec::new()).await;
    let txn = client.begin(None).await.expect("begin");
    txn.stage(vec![staged("a", "to a"), staged("b", "to b")], Vec::new()).await.expect("stage");
    let timeout_ms = txn.prepare().await.expect("prepare");
    assert_eq!(timeout_ms, 30_000, "limits.txn_timeout_ms");
    assert_eq!((ready(&client, "a").await, ready(&client, "b").await), (0, 0), "invisible while prepared");
    // Prepared: nothing more can be staged, and it cannot be prepared again.
    let raw =
        proto::StageRequest { txn_id: txn.id().to_owned(), publishes: vec![staged("a", "late")], acks: Vec::new() };
    let status = client.raw().stage(raw).await.expect_err("prepared");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = client.raw().prepare(proto::PrepareRequest { txn_id: txn.id().to_owned() }).await.expect_err("again");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let id = txn.id().to_owned();
    let reply = txn.commit().await.expect("commit");
    assert_eq!(reply.published.len(), 2);
    assert_eq!((ready(&client, "a").await, ready(&client, "b").await), (1, 1));
    // Finished: it is gone.
    let error = wharf_client::Error::from(
        client.raw().commit(proto::CommitRequest { txn_id: id }).await.expect_err("finished"),
    );
    assert_eq!(reason(&error), (Code::NotFound, "NOT_FOUND".into()));
    let status = client.raw().commit(proto::CommitRequest { txn_id: "not an id".into() }).await.expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_refused_operation_rolls_the_whole_transaction_back() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "in", Vec::new()).await;
    queue(&client, "out", Vec::new()).await;
    client.publish("/", message("", "in", "input")).await.expect("publish");
    client.publish("/", message("", "out", "existing").key("k-1")).await.expect("publish");

    // An acknowledgement of a delivery its consumer no longer holds (its stream ended).
    let mut gone = client.consume("/", "in", credit(1)).await.expect("consume");
    let input = next(&mut gone).await;
    let gone_id = gone.id().to_owned();
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let txn = client.begin(None).await.expect("begin");
    let ack = proto::StagedAck { consumer_id: gone_id, positions: vec![input.position.expect("position")] };
    txn.stage(vec![staged("out", "derived")], vec![ack]).await.expect("stage");
    let error = txn.commit().await.expect_err("not held");
    assert_eq!(reason(&error), (Code::Aborted, "ABORTED".into()));
    assert_eq!(ready(&client, "out").await, 1, "nothing published");

    // An idempotency key committed already.
    let txn = client.begin(None).await.expect("begin");
    let repeat = proto::StagedPublish { vhost: "/".into(), message: Some(message("", "out", "again").key("k-1")) };
    txn.stage(vec![staged("in", "side effect"), repeat], Vec::new()).await.expect("stage");
    let error = txn.commit().await.expect_err("key committed");
    assert_eq!(reason(&error).0, Code::Aborted, "{error}");
    assert_eq!(ready(&client, "in").await, 1, "the other publish was rolled back too");
}

/// A broker that checks back quickly and rolls half messages back after `age_max_ms`.
fn checking_broker(age_max_ms: u64) -> Broker {
    Broker::builder()
        .env("WHARF__LIMITS__HALF_MESSAGE_CHECK_INTERVAL_MS", 200)
        .env("WHARF__LIMITS__HALF_MESSAGE_AGE_MAX_MS", age_max_ms)
        .start()
}

/// Begin a half message to `queue` for `group`, stage it and prepare it.
async fn half(client: &wharf_client::Client, group: &str, queue: &str, payload: &str) -> String {
    let txn = client.begin(Some(group)).await.expect("begin");
    txn.stage(vec![staged(queue, payload)], Vec::new()).await.expect("stage");
    txn.prepare().await.expect("prepare");
    txn.id().to_owned()
}

#[tokio::test]
async fn check_back_a_producer_answering_commit_commits_its_half_message() {
    let broker = checking_broker(60_000);
    let client = client(&broker).await;
    queue(&client, "payments", Vec::new()).await;
    let mut questions = client.check_back("shop").await.expect("register");
    let id = half(&client, "shop", "payments", "paid").await;
    let mut payments = client.consume("/", "payments", credit(1)).await.expect("consume");
    nothing(&mut payments).await;

    // The producer goes silent; the broker asks. First "unknown": asked again later.
    let first = tokio::time::timeout(WAIT, questions.next()).await.expect("asked").expect("stream").expect("open");
    assert_eq!(first.txn_id, id);
    assert_eq!(first.message.as_ref().map(|m| m.payload.clone()), Some("paid".into()));
    questions.answer(&first, proto::Decision::Unknown).await.expect("answer");
    let second =
        tokio::time::timeout(WAIT, questions.next()).await.expect("asked again").expect("stream").expect("open");
    assert_eq!(second.txn_id, id);
    questions.answer(&second, proto::Decision::Commit).await.expect("answer");
    assert_eq!(body(&next(&mut payments).await), "paid");
}

#[tokio::test]
async fn check_back_a_producer_answering_roll_back_discards_its_half_message() {
    let broker = checking_broker(60_000);
    let client = client(&broker).await;
    queue(&client, "payments", Vec::new()).await;
    let mut questions = client.check_back("shop").await.expect("register");
    let id = half(&client, "shop", "payments", "never paid").await;
    let question = tokio::time::timeout(WAIT, questions.next()).await.expect("asked").expect("stream").expect("open");
    assert_eq!(question.txn_id, id);
    questions.answer(&question, proto::Decision::Rollback).await.expect("answer");
    let mut payments = client.consume("/", "payments", credit(1)).await.expect("consume");
    nothing(&mut payments).await;
    // Decided by the answer: the producer's late commit finds it gone or rolled back.
    let error = wharf_client::Error::from(
        client.raw().commit(proto::CommitRequest { txn_id: id }).await.expect_err("rolled back"),
    );
    assert!(matches!(reason(&error).0, Code::NotFound | Code::Aborted), "{error}");
    // A positive control: a half message committed by its producer arrives.
    let txn = client.begin(Some("shop")).await.expect("begin");
    txn.stage(vec![staged("payments", "paid")], Vec::new()).await.expect("stage");
    txn.prepare().await.expect("prepare");
    txn.commit().await.expect("commit");
    assert_eq!(body(&next(&mut payments).await), "paid");
}

#[tokio::test]
async fn check_back_a_producer_that_never_answers_is_rolled_back_at_the_maximum_age() {
    let broker = checking_broker(1_500);
    let client = client(&broker).await;
    queue(&client, "payments", Vec::new()).await;
    let mut questions = client.check_back("mute").await.expect("register");
    let id = half(&client, "mute", "payments", "abandoned").await;
    // Asked, never answered.
    let question = tokio::time::timeout(WAIT, questions.next()).await.expect("asked").expect("stream").expect("open");
    assert_eq!(question.txn_id, id);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut payments = client.consume("/", "payments", credit(1)).await.expect("consume");
    nothing(&mut payments).await;
    let error =
        wharf_client::Error::from(client.raw().commit(proto::CommitRequest { txn_id: id }).await.expect_err("too old"));
    assert!(matches!(reason(&error).0, Code::NotFound | Code::Aborted), "{error}");
    assert_eq!(ready(&client, "payments").await, 0);
}
