//! Black-box tests of the native gRPC API of the real `wharf` binary, through the `wharf-client`
//! crate (and its generated client for the raw calls), Python's grpcio with stubs generated from
//! the `.proto` by grpcio-tools, and lapin and rumqttc for messages crossing protocols. Shares the
//! broker harness of the MQTT suite.

#[path = "../mqtt/harness.rs"]
#[allow(dead_code, reason = "shared with the MQTT suite; each suite uses part of it")]
mod harness;

mod catalogue;
mod consume;
mod cross_protocol;
mod publish;
mod python;
mod tls;
mod txn;

use std::time::Duration;

use wharf_client::{Client, ConsumeOptions, proto};

use crate::harness::Broker;

/// Longest wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched, after a positive control showed delivery works.
pub const QUIET: Duration = Duration::from_millis(500);

/// A client of the broker's native listener.
pub async fn client(broker: &Broker) -> Client {
    Client::connect(broker.native_url()).await.expect("connect to the native listener")
}

/// Declare a durable queue with these arguments.
pub async fn queue(client: &Client, name: &str, arguments: Vec<proto::Header>) {
    let request = proto::DeclareQueueRequest { name: name.into(), durable: true, arguments, ..Default::default() };
    client.raw().declare_queue(request).await.expect("declare queue");
}

/// A header with a string value.
pub fn string_header(name: &str, value: &str) -> proto::Header {
    proto::Header {
        name: name.into(),
        value: Some(proto::Value { kind: Some(proto::value::Kind::String(value.into())) }),
    }
}

/// A header with a 32-bit integer value.
pub fn int_header(name: &str, value: i32) -> proto::Header {
    proto::Header { name: name.into(), value: Some(proto::Value { kind: Some(proto::value::Kind::Int32(value)) }) }
}

/// Consume with an explicit credit and no automatic re-grant.
pub fn credit(credit: u32) -> ConsumeOptions {
    ConsumeOptions { credit, auto_credit: false, ..ConsumeOptions::default() }
}

/// The next delivery within [`WAIT`].
pub async fn next(consumer: &mut wharf_client::Consumer) -> proto::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the stream works")
        .expect("the stream is open")
}

/// Nothing is delivered within [`QUIET`].
pub async fn nothing(consumer: &mut wharf_client::Consumer) {
    if let Ok(result) = tokio::time::timeout(QUIET, consumer.next()).await {
        panic!("nothing should arrive, got {result:?}");
    }
}

/// A delivery's payload as text.
pub fn body(delivery: &proto::Delivery) -> String {
    String::from_utf8_lossy(&delivery.message.as_ref().expect("a message").payload).into_owned()
}

/// The broker's error code and gRPC code of a failed call.
pub fn reason(error: &wharf_client::Error) -> (tonic::Code, String) {
    match error {
        wharf_client::Error::Broker { code, reason, .. } => (*code, reason.clone()),
        other => panic!("expected a broker error, got {other}"),
    }
}
