//! The request-reply example's logic, shared by `examples/request-reply/main.rs` and
//! `tests/examples.rs`: MQTT 5 request/response (Response Topic, Correlation Data) and AMQP
//! reply-to (and correlation-id) across protocols, both ways. An MQTT 5 requester asks an AMQP
//! responder; an AMQP requester asks an MQTT 5 responder. Every answer must come back to its
//! requester with its correlation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `wharf` binary.
    pub wharf: PathBuf,
    /// Requests each way.
    pub requests: u32,
}

/// What came back.
#[derive(Debug, Default)]
pub struct Report {
    pub mqtt_to_amqp_asked: u32,
    pub mqtt_to_amqp_answered: u32,
    pub amqp_to_mqtt_asked: u32,
    pub amqp_to_mqtt_answered: u32,
    pub ok: bool,
}

impl Report {
    pub fn text(&self) -> String {
        format!(
            "MQTT 5 requester -> AMQP responder: {} asked, {} answered with the right correlation\n\
             AMQP requester -> MQTT 5 responder: {} asked, {} answered with the right correlation\n\
             {}\n",
            self.mqtt_to_amqp_asked,
            self.mqtt_to_amqp_answered,
            self.amqp_to_mqtt_asked,
            self.amqp_to_mqtt_answered,
            if self.ok { "OK: every request answered across protocols" } else { "FAILED" },
        )
    }
}

const WAIT: Duration = Duration::from_secs(20);

/// A connected MQTT 5 client whose event loop runs in a task; received PUBLISHes arrive on the
/// channel.
async fn mqtt(
    port: u16,
    id: &str,
) -> anyhow::Result<(AsyncClient, tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>)> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, events) = AsyncClient::new(options, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    tokio::spawn(drive(events, tx, connected_tx));
    tokio::time::timeout(WAIT, connected).await.context("no CONNACK")??;
    Ok((client, rx))
}

async fn drive(
    mut events: EventLoop,
    publishes: tokio::sync::mpsc::UnboundedSender<rumqttc::v5::mqttbytes::v5::Publish>,
    connected: tokio::sync::oneshot::Sender<()>,
) {
    let mut connected = Some(connected);
    while let Ok(event) = events.poll().await {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let _ = publishes.send(publish);
            }
            _ => {}
        }
    }
}

fn square(text: &[u8]) -> String {
    let n: i64 = String::from_utf8_lossy(text).parse().unwrap_or(0);
    (n * n).to_string()
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    let broker = crate::broker::Broker::start(options.wharf.clone())?;
    let mut report = Report::default();
    let amqp = Connection::connect(&broker.amqp_uri(), ConnectionProperties::default()).await?;
    let channel = amqp.create_channel().await?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };

    // --- MQTT 5 requester -> AMQP responder ---------------------------------------------------
    // The responder's queue takes the requests published on MQTT topic rpc/square.
    channel.queue_declare("rpc.square".into(), durable, FieldTable::default()).await?;
    let bind = QueueBindOptions::default();
    channel
        .queue_bind("rpc.square".into(), "amq.topic".into(), "rpc.square".into(), bind, FieldTable::default())
        .await?;
    let mut requests = channel
        .basic_consume("rpc.square".into(), "responder".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let responder_channel = channel.clone();
    let amqp_responder = tokio::spawn(async move {
        while let Some(Ok(delivery)) = requests.next().await {
            let reply_to = delivery.properties.reply_to().clone();
            let correlation = delivery.properties.correlation_id().clone();
            if let Some(reply_to) = reply_to {
                // The MQTT Response Topic arrives as reply-to, mapped like a topic: it is a
                // routing key on amq.topic.
                let mut properties = BasicProperties::default();
                if let Some(correlation) = correlation {
                    properties = properties.with_correlation_id(correlation);
                }
                let answer = square(&delivery.data);
                let _ = responder_channel
                    .basic_publish(
                        "amq.topic".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        answer.as_bytes(),
                        properties,
                    )
                    .await;
            }
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
    });
    let (requester, mut answers) = mqtt(broker.mqtt, "mqtt-requester").await?;
    requester.subscribe("replies/mqtt-requester", QoS::AtLeastOnce).await?;
    // The subscription is in place once its SUBACK came; a first request retried covers it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..=options.requests {
        let properties = PublishProperties {
            response_topic: Some("replies/mqtt-requester".into()),
            correlation_data: Some(Bytes::from(format!("call-{n}"))),
            ..PublishProperties::default()
        };
        requester.publish_with_properties("rpc/square", QoS::AtLeastOnce, false, n.to_string(), properties).await?;
        report.mqtt_to_amqp_asked += 1;
    }
    let mut answered: BTreeMap<String, String> = BTreeMap::new();
    while answered.len() < options.requests as usize {
        let Ok(Some(answer)) = tokio::time::timeout(WAIT, answers.recv()).await else { break };
        let correlation = answer.properties.as_ref().and_then(|p| p.correlation_data.clone()).unwrap_or_default();
        answered.insert(
            String::from_utf8_lossy(&correlation).into_owned(),
            String::from_utf8_lossy(&answer.payload).into_owned(),
        );
    }
    report.mqtt_to_amqp_answered = (1..=options.requests)
        .filter(|n| answered.get(&format!("call-{n}")) == Some(&(n * n).to_string()))
        .count() as u32;
    amqp_responder.abort();

    // --- AMQP requester -> MQTT 5 responder ---------------------------------------------------
    let (responder, mut asked) = mqtt(broker.mqtt, "mqtt-responder").await?;
    responder.subscribe("rpc/double", QoS::AtLeastOnce).await?;
    let mqtt_responder = tokio::spawn(async move {
        while let Some(request) = asked.recv().await {
            let Some(properties) = request.properties else { continue };
            let Some(response_topic) = properties.response_topic else { continue };
            let n: i64 = String::from_utf8_lossy(&request.payload).parse().unwrap_or(0);
            let reply =
                PublishProperties { correlation_data: properties.correlation_data, ..PublishProperties::default() };
            let _ = responder
                .publish_with_properties(response_topic, QoS::AtLeastOnce, false, (2 * n).to_string(), reply)
                .await;
        }
    });
    // The requester's reply queue, bound on amq.topic under the routing key its reply-to names.
    channel.queue_declare("replies.amqp-requester".into(), durable, FieldTable::default()).await?;
    let bind = QueueBindOptions::default();
    let key = "replies.amqp-requester";
    channel
        .queue_bind("replies.amqp-requester".into(), "amq.topic".into(), key.into(), bind, FieldTable::default())
        .await?;
    let mut replies = channel
        .basic_consume(
            "replies.amqp-requester".into(),
            "requester".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..=options.requests {
        let properties = BasicProperties::default()
            .with_reply_to(ShortString::from(key))
            .with_correlation_id(ShortString::from(format!("ask-{n}")));
        channel
            .basic_publish(
                "amq.topic".into(),
                "rpc.double".into(),
                BasicPublishOptions::default(),
                n.to_string().as_bytes(),
                properties,
            )
            .await?;
        report.amqp_to_mqtt_asked += 1;
    }
    let mut doubled: BTreeMap<String, String> = BTreeMap::new();
    while doubled.len() < options.requests as usize {
        let Ok(Some(Ok(reply))) = tokio::time::timeout(WAIT, replies.next()).await else { break };
        let correlation = reply.properties.correlation_id().as_ref().map(ShortString::to_string).unwrap_or_default();
        doubled.insert(correlation, String::from_utf8_lossy(&reply.data).into_owned());
        reply.ack(BasicAckOptions::default()).await?;
    }
    report.amqp_to_mqtt_answered = (1..=options.requests)
        .filter(|n| doubled.get(&format!("ask-{n}")) == Some(&(2 * n).to_string()))
        .count() as u32;
    mqtt_responder.abort();

    report.ok = report.mqtt_to_amqp_answered == options.requests && report.amqp_to_mqtt_answered == options.requests;
    if !report.ok {
        eprintln!("broker log:\n{}", broker.log());
    }
    Ok(report)
}
