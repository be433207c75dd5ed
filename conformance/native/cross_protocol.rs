//! Messages crossing between the native API and the other protocols on one broker: native →
//! AMQP (lapin) and AMQP → native with properties and typed headers, MQTT (rumqttc) → native
//! through `amq.topic`, native → MQTT. Each checks one part of `protocols/native/MAPPING.md`.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use wharf_client::{MessageExt, message, proto};

use crate::harness::Broker;
use crate::{WAIT, body, client, credit, int_header, next, queue};

async fn amqp_channel(broker: &Broker) -> lapin::Channel {
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", broker.amqp_port());
    let connection = Connection::connect(&uri, ConnectionProperties::default()).await.expect("AMQP connect");
    connection.create_channel().await.expect("channel")
}

#[tokio::test]
async fn a_native_publish_reaches_an_amqp_consumer_with_its_properties_and_headers() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "to-amqp", Vec::new()).await;
    let properties = proto::Properties {
        content_type: Some("application/json".into()),
        correlation_id: Some("corr-1".into()),
        message_id: Some("m-1".into()),
        priority: Some(3),
        delivery_mode: proto::DeliveryMode::Persistent.into(),
        ..Default::default()
    };
    let mut published = message("", "to-amqp", "{\"n\":1}").header("origin", "native");
    published.properties = Some(properties);
    published.headers.push(int_header("attempt", 2));
    client.publish("/", published).await.expect("publish");

    let channel = amqp_channel(&broker).await;
    let got =
        channel.basic_get("to-amqp".into(), BasicGetOptions { no_ack: true }).await.expect("get").expect("a message");
    assert_eq!(got.delivery.data, b"{\"n\":1}");
    let props = &got.delivery.properties;
    assert_eq!(props.content_type().as_ref().map(ShortString::as_str), Some("application/json"));
    assert_eq!(props.correlation_id().as_ref().map(ShortString::as_str), Some("corr-1"));
    assert_eq!(props.message_id().as_ref().map(ShortString::as_str), Some("m-1"));
    assert_eq!(*props.priority(), Some(3));
    assert_eq!(*props.delivery_mode(), Some(2));
    let headers = props.headers().clone().expect("headers");
    let headers = headers.inner();
    assert!(
        matches!(headers.get("origin"), Some(AMQPValue::LongString(s)) if s.to_string() == "native"),
        "{headers:?}"
    );
    assert_eq!(headers.get("attempt"), Some(&AMQPValue::LongInt(2)));
}

#[tokio::test]
async fn an_amqp_publish_reaches_a_native_consumer_with_its_properties_and_headers() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "from-amqp", Vec::new()).await;
    let channel = amqp_channel(&broker).await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let mut headers = FieldTable::default();
    headers.insert("attempt".into(), AMQPValue::LongLongInt(-7));
    headers.insert("flag".into(), AMQPValue::Boolean(true));
    let properties = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_reply_to("replies".into())
        .with_app_id("shop".into())
        .with_headers(headers);
    channel
        .basic_publish("".into(), "from-amqp".into(), BasicPublishOptions::default(), b"hello", properties)
        .await
        .expect("publish")
        .await
        .expect("confirm");

    let mut consumer = client.consume("/", "from-amqp", credit(1)).await.expect("consume");
    let delivery = next(&mut consumer).await;
    assert_eq!(body(&delivery), "hello");
    let message = delivery.message.expect("message");
    let properties = message.properties.expect("properties");
    assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(properties.reply_to.as_deref(), Some("replies"));
    assert_eq!(properties.app_id.as_deref(), Some("shop"));
    let value = |name: &str| message.headers.iter().find(|h| h.name == name).and_then(|h| h.value.clone()?.kind);
    assert_eq!(value("attempt"), Some(proto::value::Kind::Int64(-7)));
    assert_eq!(value("flag"), Some(proto::value::Kind::Bool(true)));
}

/// A connected rumqttc 3.1.1 client whose event loop runs in a task; its publishes and
/// subscriptions go through `client`, received PUBLISHes arrive on the channel.
async fn mqtt(broker: &Broker, id: &str) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>) {
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.mqtt_port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut event_loop) = AsyncClient::new(options, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        while let Ok(event) = event_loop.poll().await {
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    let _ = tx.send(publish);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, connected).await.expect("CONNACK in time").expect("connected");
    (client, rx)
}

#[tokio::test]
async fn mqtt_publishes_reach_native_consumers_and_native_publishes_reach_mqtt_subscribers() {
    let broker = Broker::start();
    let client = client(&broker).await;
    queue(&client, "sensors", Vec::new()).await;
    client.bind_queue("sensors", "amq.topic", "sensors.*").await.expect("bind");
    let (mqtt, mut received) = mqtt(&broker, "device-1").await;

    mqtt.publish("sensors/t1", QoS::AtLeastOnce, false, "21.5").await.expect("publish");
    let mut consumer = client.consume("/", "sensors", credit(1)).await.expect("consume");
    let delivery = next(&mut consumer).await;
    assert_eq!(body(&delivery), "21.5");
    let delivered = delivery.message.expect("message");
    assert_eq!((delivered.exchange.as_str(), delivered.routing_key.as_str()), ("amq.topic", "sensors.t1"));

    mqtt.subscribe("commands/#", QoS::AtLeastOnce).await.expect("subscribe");
    // The subscription is in place once its queue is bound: publish until it arrives.
    let deadline = tokio::time::Instant::now() + WAIT;
    let publish = loop {
        client.publish("/", message("amq.topic", "commands.device-1", "reboot")).await.expect("publish");
        match tokio::time::timeout(Duration::from_millis(300), received.recv()).await {
            Ok(Some(publish)) => break publish,
            _ => assert!(tokio::time::Instant::now() < deadline, "the MQTT subscriber got nothing"),
        }
    };
    assert_eq!(publish.topic, "commands/device-1");
    assert_eq!(&publish.payload[..], b"reboot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_session_queue_left_without_its_session_by_a_crash_is_removed_at_start() {
    let mut broker = Broker::start();
    let client = client(&broker).await;
    // What a crash between declaring a session's queue and writing its record leaves behind.
    queue(&client, "mqtt.session.ghost", Vec::new()).await;
    // A real session, kept (a positive control): persistent, disconnected.
    let mut options = MqttOptions::new("kept", "127.0.0.1", broker.mqtt_port());
    options.set_clean_session(false);
    let (kept, mut events) = AsyncClient::new(options, 10);
    tokio::time::timeout(WAIT, async {
        while !matches!(events.poll().await, Ok(Event::Incoming(Packet::ConnAck(_)))) {}
    })
    .await
    .expect("CONNACK");
    kept.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} }).await;
    tokio::task::block_in_place(|| {
        broker.kill();
        broker.restart();
    });
    let client = crate::client(&broker).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = client.raw().list_queues(proto::ListQueuesRequest::default()).await.expect("list").into_inner();
        let names: Vec<&str> = listed.queues.iter().map(|q| q.name.as_str()).collect();
        assert!(names.contains(&"mqtt.session.kept"), "the real session stays: {names:?}");
        if !names.contains(&"mqtt.session.ghost") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the orphan session queue is still there: {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
