//! Catalogue management over the native API: declare, list, bind, unbind, purge and delete
//! exchanges and queues, and the errors RabbitMQ users expect (unknown type, redeclaring with
//! other properties, passive declares and listings of what does not exist).

use tonic::Code;
use wharf_client::{message, proto};

use crate::harness::Broker;
use crate::{client, string_header};

#[tokio::test]
async fn exchanges_queues_and_bindings_are_declared_listed_used_and_deleted() {
    let broker = Broker::start();
    let client = client(&broker).await;
    let mut raw = client.raw();
    let exchange = proto::DeclareExchangeRequest {
        name: "events".into(),
        r#type: "topic".into(),
        durable: true,
        ..Default::default()
    };
    raw.declare_exchange(exchange.clone()).await.expect("declare exchange");
    raw.declare_exchange(exchange.clone()).await.expect("the same again is fine");
    let declared = raw
        .declare_queue(proto::DeclareQueueRequest {
            name: "audit".into(),
            durable: true,
            arguments: vec![string_header("x-queue-mode", "lazy")],
            ..Default::default()
        })
        .await
        .expect("declare queue")
        .into_inner();
    assert_eq!((declared.name.as_str(), declared.message_count, declared.consumer_count), ("audit", 0, 0));
    let named = raw.declare_queue(proto::DeclareQueueRequest::default()).await.expect("server-named").into_inner();
    assert!(!named.name.is_empty());

    let binding = proto::BindRequest {
        source: "events".into(),
        destination: Some(proto::bind_request::Destination::Queue("audit".into())),
        routing_key: "order.*".into(),
        ..Default::default()
    };
    raw.bind(binding.clone()).await.expect("bind");
    let published = client.publish("/", message("events", "order.paid", "x")).await.expect("publish");
    assert_eq!(published.routed, 1);

    let exchanges = raw.list_exchanges(proto::ListExchangesRequest::default()).await.expect("list").into_inner();
    let events = exchanges.exchanges.iter().find(|e| e.name == "events").expect("listed");
    assert_eq!((events.r#type.as_str(), events.durable), ("topic", true));
    assert!(exchanges.exchanges.iter().any(|e| e.name == "amq.topic"), "predeclared exchanges are listed");
    let queues = raw.list_queues(proto::ListQueuesRequest::default()).await.expect("list").into_inner();
    let audit = queues.queues.iter().find(|q| q.name == "audit").expect("listed");
    assert_eq!((audit.message_count, audit.partitions, audit.durable), (1, 1, true));
    assert!(audit.arguments.iter().any(|h| h.name == "x-queue-mode"));
    let bindings = raw.list_bindings(proto::ListBindingsRequest::default()).await.expect("list").into_inner();
    assert!(bindings.bindings.iter().any(|b| b.source == "events" && b.routing_key == "order.*"), "{bindings:?}");

    raw.unbind(binding).await.expect("unbind");
    let published = client.publish("/", message("events", "order.paid", "y")).await.expect("publish");
    assert_eq!(published.routed, 0, "unbound");

    let purged = raw
        .purge_queue(proto::PurgeQueueRequest { name: "audit".into(), ..Default::default() })
        .await
        .expect("purge")
        .into_inner();
    assert_eq!(purged.message_count, 1);
    client.publish("/", message("", "audit", "z")).await.expect("publish");
    let deleted = raw
        .delete_queue(proto::DeleteQueueRequest { name: "audit".into(), ..Default::default() })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.message_count, 1);
    raw.delete_exchange(proto::DeleteExchangeRequest { name: "events".into(), ..Default::default() })
        .await
        .expect("delete exchange");
    let exchanges = raw.list_exchanges(proto::ListExchangesRequest::default()).await.expect("list").into_inner();
    assert!(!exchanges.exchanges.iter().any(|e| e.name == "events"));
}

#[tokio::test]
async fn catalogue_errors_are_the_statuses_rabbitmq_users_expect() {
    let broker = Broker::start();
    let client = client(&broker).await;
    let mut raw = client.raw();
    let unknown = proto::DeclareExchangeRequest { name: "odd".into(), r#type: "sideways".into(), ..Default::default() };
    assert_eq!(raw.declare_exchange(unknown).await.expect_err("unknown type").code(), Code::InvalidArgument);
    let direct = proto::DeclareExchangeRequest { name: "x".into(), r#type: "direct".into(), ..Default::default() };
    raw.declare_exchange(direct.clone()).await.expect("declare");
    let fanout = proto::DeclareExchangeRequest { r#type: "fanout".into(), ..direct };
    assert_eq!(raw.declare_exchange(fanout).await.expect_err("other type").code(), Code::FailedPrecondition);
    let passive = proto::DeclareQueueRequest { name: "missing".into(), passive: true, ..Default::default() };
    assert_eq!(raw.declare_queue(passive).await.expect_err("passive").code(), Code::NotFound);
    let listing = proto::ListQueuesRequest { vhost: "no-such-vhost".into() };
    assert_eq!(raw.list_queues(listing).await.expect_err("no vhost").code(), Code::NotFound);
    let no_destination = proto::BindRequest { source: "x".into(), ..Default::default() };
    assert_eq!(raw.bind(no_destination).await.expect_err("no destination").code(), Code::InvalidArgument);
    let reserved =
        proto::DeclareExchangeRequest { name: "amq.mine".into(), r#type: "direct".into(), ..Default::default() };
    assert_eq!(raw.declare_exchange(reserved).await.expect_err("reserved").code(), Code::PermissionDenied);
}
