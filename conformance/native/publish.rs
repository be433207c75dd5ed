//! Publish, PublishBatch and QueryKey: positions, the duplicate verdict, mandatory publishes,
//! per-message batch results, and errors as statuses carrying the broker's code and retryability.

use tonic::Code;
use wharf_client::{Client, MessageExt, RetryPolicy, message, proto};

use crate::harness::Broker;
use crate::{client, int_header, next, queue, reason, string_header};

#[tokio::test]
async fn publish_returns_positions_and_a_repeated_key_gets_the_duplicate_verdict() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "orders", Vec::new()).await;

    let first = client.publish("/", message("", "orders", "order 17").key("order-17")).await.expect("publish");
    assert_eq!(first.routed, 1);
    assert_eq!(first.positions.len(), 1, "{first:?}");
    assert!(!first.duplicate && first.duplicates.is_empty() && first.rejected_queues.is_empty());

    // The same key again (a retry after a lost reply): nothing stored, the original's position.
    let again = client.publish("/", message("", "orders", "order 17").key("order-17")).await.expect("publish");
    assert!(again.duplicate, "{again:?}");
    assert!(again.positions.is_empty());
    assert_eq!(again.duplicates, first.positions);

    let (position, committed_ms) =
        client.query_key("/", "orders", "order-17").await.expect("query").expect("the key is committed");
    assert_eq!(Some(position), first.positions.first().copied());
    assert!(committed_ms > 1_600_000_000_000, "milliseconds since the epoch: {committed_ms}");
    assert_eq!(client.query_key("/", "orders", "order-18").await.expect("query"), None);

    let listed = client.raw().list_queues(proto::ListQueuesRequest::default()).await.expect("list").into_inner();
    let orders = listed.queues.iter().find(|q| q.name == "orders").expect("listed");
    assert_eq!(orders.message_count, 1, "stored once");
}

#[tokio::test]
async fn publish_batch_publishes_in_order_with_one_result_per_message() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "batch", Vec::new()).await;
    let messages = vec![
        message("", "batch", "one").key("b-1"),
        message("no-such-exchange", "batch", "lost"),
        message("", "batch", "two").key("b-2"),
        message("", "batch", "one again").key("b-1"),
        message("", "batch", "three"),
    ];
    let results = client.publish_batch("/", messages).await.expect("batch");
    assert_eq!(results.len(), 5);
    let published = |index: usize| match &results[index].result {
        Some(proto::publish_result::Result::Published(reply)) => reply.clone(),
        other => panic!("message {index}: {other:?}"),
    };
    assert!(!published(0).duplicate);
    match &results[1].result {
        Some(proto::publish_result::Result::Error(error)) => {
            assert_eq!(error.code, "NOT_FOUND", "{error:?}");
            assert!(!error.retryable);
            assert!(error.message.contains("no-such-exchange"), "{error:?}");
        }
        other => panic!("message 1: {other:?}"),
    }
    assert!(!published(2).duplicate);
    assert!(published(3).duplicate, "the repeated key");
    assert!(!published(4).duplicate);

    let mut consumer = client.consume("/", "batch", wharf_client::ConsumeOptions::default()).await.expect("consume");
    for expected in ["one", "two", "three"] {
        assert_eq!(crate::body(&next(&mut consumer).await), expected);
    }
    crate::nothing(&mut consumer).await;
}

#[tokio::test]
async fn a_mandatory_publish_no_queue_takes_fails_with_no_route() {
    let broker = Broker::start();
    let client = client(&broker).await;
    let request = proto::PublishRequest {
        vhost: String::new(),
        message: Some(message("amq.topic", "nobody.listens", "x")),
        mandatory: true,
    };
    let error = wharf_client::Error::from(client.raw().publish(request.clone()).await.expect_err("no route"));
    assert_eq!(reason(&error), (Code::FailedPrecondition, "NO_ROUTE".into()));
    // Without mandatory it is reported, not refused.
    let request = proto::PublishRequest { mandatory: false, ..request };
    let reply = client.raw().publish(request).await.expect("publish").into_inner();
    assert_eq!(reply.routed, 0);
}

#[tokio::test]
async fn a_full_reject_publish_queue_is_named_in_the_reply() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "small", vec![int_header("x-max-length", 1), string_header("x-overflow", "reject-publish")]).await;
    let first = client.publish("/", message("", "small", "fits")).await.expect("publish");
    assert!(first.rejected_queues.is_empty());
    let second = client.publish("/", message("", "small", "does not fit")).await.expect("publish");
    assert_eq!(second.rejected_queues, vec!["small".to_owned()]);
    assert!(second.positions.is_empty());
}

#[tokio::test]
async fn errors_are_statuses_with_the_broker_code_retryability_and_limit() {
    let broker = Broker::builder()
        .env("WHARF__LIMITS__MESSAGE_SIZE_MAX_BYTES", 1024)
        .env("WHARF__NATIVE__GRPC_MESSAGE_SIZE_MAX_BYTES", 8192)
        .env("WHARF__NATIVE__BATCH_MESSAGES_MAX", 2)
        .start();
    // No retries: a non-retryable error must come back at once anyway, and the raw status is
    // looked at too.
    let client = client(&broker).await.with_retry(RetryPolicy { retries: 0, ..RetryPolicy::default() });

    let error = client.publish("/", message("missing", "k", "x")).await.expect_err("no exchange");
    assert_eq!(reason(&error), (Code::NotFound, "NOT_FOUND".into()));
    assert!(!error.is_retryable());

    let status = client
        .raw()
        .publish(proto::PublishRequest { message: Some(message("", "k", vec![0u8; 2048])), ..Default::default() })
        .await
        .expect_err("too large for the core");
    assert_eq!(status.code(), Code::ResourceExhausted);
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().expect("an ErrorInfo detail");
    assert_eq!(info.reason, "LIMIT_EXCEEDED");
    assert_eq!(info.domain, "wharf");
    assert_eq!(info.metadata["limit"], "limits.message_size_max_bytes");
    assert_eq!(info.metadata["retryable"], "false");

    // Larger than the gRPC message limit: refused before it is decoded (tonic's code for it).
    let status = client
        .raw()
        .publish(proto::PublishRequest { message: Some(message("", "k", vec![0u8; 16_384])), ..Default::default() })
        .await
        .expect_err("too large for gRPC");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");

    let batch = vec![message("", "k", "1"), message("", "k", "2"), message("", "k", "3")];
    let error = client.publish_batch("/", batch).await.expect_err("batch too long");
    assert_eq!(reason(&error), (Code::ResourceExhausted, "LIMIT_EXCEEDED".into()));

    let status = client.raw().publish(proto::PublishRequest::default()).await.expect_err("no message");
    assert_eq!(status.code(), Code::InvalidArgument);

    // The broker still serves this client.
    queue(&client, "after", Vec::new()).await;
    client.publish("/", message("", "after", "fine")).await.expect("publish after errors");
}

#[tokio::test]
async fn a_client_retry_after_a_broker_restart_stores_the_message_once() {
    let mut broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "ledger", Vec::new()).await;
    client.publish("/", message("", "ledger", "entry 1").key("entry-1")).await.expect("publish");
    // A graceful stop with the client still connected, then a start on the same data.
    broker.stop();
    broker.restart();
    // A new connection: the retry of a publish whose reply was lost, with the same key.
    let client = Client::connect(broker.native_url()).await.expect("reconnect");
    let again = client.publish("/", message("", "ledger", "entry 1").key("entry-1")).await.expect("publish");
    assert!(again.duplicate, "the key survived the restart: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_publish_retries_through_a_broker_restart_with_the_same_key() {
    let mut broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "retried", Vec::new()).await;
    // The broker dies; a publish started now fails, is retried with back-off (the same
    // generated key every time), and succeeds once the broker is back.
    tokio::task::block_in_place(|| broker.kill());
    let publishing = tokio::spawn({
        let client = client.clone();
        async move { client.publish("/", message("", "retried", "kept")).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    tokio::task::block_in_place(|| broker.restart());
    let reply = tokio::time::timeout(crate::WAIT, publishing).await.expect("in time").expect("task").expect("retried");
    assert_eq!(reply.positions.len(), 1, "{reply:?}");
    let listed = client.raw().list_queues(proto::ListQueuesRequest::default()).await.expect("list").into_inner();
    assert_eq!(listed.queues.iter().find(|q| q.name == "retried").map(|q| q.message_count), Some(1), "stored once");
}
