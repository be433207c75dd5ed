//! Consume streams: credit as flow control (a consumer with credit 0 receives nothing and holds
//! nothing), settling (ack, requeue, reject to a dead-letter exchange, answered once committed),
//! unsettled deliveries returning when a stream ends, cancellation when the queue is deleted, and
//! the stream's protocol errors.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use wharf_client::{ConsumeOptions, message, proto};

use crate::harness::Broker;
use crate::{WAIT, body, client, credit, next, nothing, queue, string_header};

#[tokio::test]
async fn a_consumer_with_credit_0_receives_nothing_and_holds_nothing_until_it_grants_some() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "work", Vec::new()).await;
    for n in 1..=3 {
        client.publish("/", message("", "work", format!("job {n}"))).await.expect("publish");
    }
    let mut idle = client.consume("/", "work", credit(0)).await.expect("consume");
    nothing(&mut idle).await;
    // The messages were left for others: a second consumer takes the first one.
    let mut other = client.consume("/", "work", credit(1)).await.expect("consume");
    assert_eq!(body(&next(&mut other).await), "job 1");
    nothing(&mut other).await;
    idle.grant(2).await.expect("grant");
    assert_eq!(body(&next(&mut idle).await), "job 2");
    assert_eq!(body(&next(&mut idle).await), "job 3");
}

#[tokio::test]
async fn credit_bounds_deliveries_and_more_credit_resumes_them() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "bounded", Vec::new()).await;
    for n in 1..=5 {
        client.publish("/", message("", "bounded", format!("m{n}"))).await.expect("publish");
    }
    let mut consumer = client.consume("/", "bounded", credit(2)).await.expect("consume");
    assert_eq!(body(&next(&mut consumer).await), "m1");
    assert_eq!(body(&next(&mut consumer).await), "m2");
    nothing(&mut consumer).await;
    consumer.grant(3).await.expect("grant");
    for expected in ["m3", "m4", "m5"] {
        assert_eq!(body(&next(&mut consumer).await), expected);
    }
    // With automatic credit the window refills as deliveries are read.
    let mut auto = client
        .consume("/", "bounded", ConsumeOptions { credit: 2, auto_credit: true, ..ConsumeOptions::default() })
        .await
        .expect("consume");
    for n in 6..=11 {
        client.publish("/", message("", "bounded", format!("m{n}"))).await.expect("publish");
    }
    for n in 6..=11 {
        assert_eq!(body(&next(&mut auto).await), format!("m{n}"));
    }
}

#[tokio::test]
async fn ack_requeue_and_reject_settle_as_asked_and_are_answered_once_committed() {
    let broker = Broker::start();
    let client = client(&broker).await;
    let dlx = vec![string_header("x-dead-letter-exchange", ""), string_header("x-dead-letter-routing-key", "dead")];
    queue(&client, "dead", Vec::new()).await;
    queue(&client, "settle", dlx).await;
    for n in 1..=3 {
        client.publish("/", message("", "settle", format!("s{n}"))).await.expect("publish");
    }
    let mut consumer = client.consume("/", "settle", credit(10)).await.expect("consume");
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    let third = next(&mut consumer).await;
    assert!(!first.redelivered && first.delivery_count == 0);
    assert!(first.enqueued_ms > 1_600_000_000_000);

    let (unknown, arrived) = consumer.ack_confirmed(vec![first.position.expect("position")]).await.expect("ack");
    assert!(unknown.is_empty() && arrived.is_empty());
    // Acked twice: the broker no longer holds it for this consumer.
    let (unknown, _) = consumer.ack_confirmed(vec![first.position.expect("position")]).await.expect("ack");
    assert_eq!(unknown, vec![first.position.expect("position")]);

    consumer.settle(vec![second.position.expect("position")], proto::Outcome::Requeue).await.expect("requeue");
    let again = next(&mut consumer).await;
    assert_eq!(body(&again), "s2");
    assert!(again.redelivered);
    assert_eq!(again.delivery_count, 1);

    consumer.settle(vec![third.position.expect("position")], proto::Outcome::Reject).await.expect("reject");
    let mut dead = client.consume("/", "dead", credit(1)).await.expect("consume");
    let dead_letter = next(&mut dead).await;
    assert_eq!(body(&dead_letter), "s3");
    let headers = &dead_letter.message.as_ref().expect("message").headers;
    assert!(headers.iter().any(|h| h.name == "x-death"), "dead-lettered with x-death: {headers:?}");
}

#[tokio::test]
async fn an_ended_stream_returns_its_unsettled_deliveries_to_the_queue() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "returns", Vec::new()).await;
    client.publish("/", message("", "returns", "held")).await.expect("publish");
    let mut first = client.consume("/", "returns", credit(5)).await.expect("consume");
    assert_eq!(body(&next(&mut first).await), "held");
    drop(first);
    let mut second = client.consume("/", "returns", credit(5)).await.expect("consume");
    let again = next(&mut second).await;
    assert_eq!(body(&again), "held");
    assert!(again.redelivered);
}

#[tokio::test]
async fn deleting_the_queue_cancels_its_consumers() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "doomed", Vec::new()).await;
    let mut consumer = client.consume("/", "doomed", credit(5)).await.expect("consume");
    client.publish("/", message("", "doomed", "last")).await.expect("publish");
    assert_eq!(body(&next(&mut consumer).await), "last");
    let request = proto::DeleteQueueRequest { name: "doomed".into(), ..Default::default() };
    client.raw().delete_queue(request).await.expect("delete");
    let end = tokio::time::timeout(WAIT, consumer.next()).await.expect("cancelled in time").expect("no error");
    assert!(end.is_none(), "cancelled: {end:?}");
}

/// Open a raw Consume stream with these requests; the first event or status.
async fn first_answer(
    client: &wharf_client::Client,
    requests: Vec<proto::ConsumeRequest>,
) -> Result<proto::ConsumeEvent, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    for request in requests {
        tx.send(request).await.expect("queue a request");
    }
    let mut events = client.raw().consume(ReceiverStream::new(rx)).await?.into_inner();
    // The answer to the last request: what earlier ones produced comes first.
    let mut last = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), events.message()).await {
            Ok(Ok(Some(event))) => last = Some(event),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) | Err(_) => return last.ok_or_else(|| tonic::Status::unknown("no answer")),
        }
    }
}

fn subscribe(queue: &str, credit: u32) -> proto::ConsumeRequest {
    let subscribe = proto::Subscribe { queue: queue.into(), credit, ..Default::default() };
    proto::ConsumeRequest { request: Some(proto::consume_request::Request::Subscribe(subscribe)) }
}

#[tokio::test]
async fn consume_stream_errors_are_statuses() {
    let broker = Broker::builder().env("WHARF__NATIVE__CONSUMER_CREDIT_MAX", 100).start();
    let client = client(&broker).await;
    queue(&client, "errors", Vec::new()).await;

    let credit_first = proto::ConsumeRequest { request: Some(proto::consume_request::Request::Credit(5)) };
    let status = first_answer(&client, vec![credit_first]).await.expect_err("subscribe first");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let status = first_answer(&client, vec![subscribe("missing", 1)]).await.expect_err("no queue");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let status = first_answer(&client, vec![subscribe("errors", 101)]).await.expect_err("too much credit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let status = first_answer(&client, vec![subscribe("errors", 1), subscribe("errors", 1)]).await.expect_err("twice");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let no_outcome = proto::Settle { positions: Vec::new(), outcome: 0, request_id: 1 };
    let settle = proto::ConsumeRequest { request: Some(proto::consume_request::Request::Settle(no_outcome)) };
    let status = first_answer(&client, vec![subscribe("errors", 1), settle]).await.expect_err("no outcome");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A good stream still works.
    let answer = first_answer(&client, vec![subscribe("errors", 1)]).await.expect("subscribed");
    assert!(matches!(answer.event, Some(proto::consume_event::Event::Subscribed(_))), "{answer:?}");
}
