//! The IoT telemetry example's logic, shared by `examples/iot-telemetry/main.rs` and
//! `tests/examples.rs`: MQTT devices (QoS 1 telemetry, a retained "online" status, a will saying
//! "offline") feeding an AMQP analytics consumer through `amq.topic`; one device dies without a
//! DISCONNECT and its will is published; a dashboard subscribing later gets every device's
//! retained status. Checks every reading arrived once, the will, and the retained statuses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `wharf` binary.
    pub wharf: PathBuf,
    /// Devices.
    pub devices: u32,
    /// Readings per device.
    pub readings: u32,
}

/// What the analytics side saw.
#[derive(Debug, Default)]
pub struct Report {
    pub devices: u32,
    pub readings_sent: u64,
    pub readings_received: u64,
    pub readings_duplicated: u64,
    pub readings_missing: u64,
    /// Mean reading per device, as the analytics consumer computed it.
    pub mean_by_device: BTreeMap<u32, f64>,
    pub wills_received: Vec<String>,
    pub retained_statuses: BTreeMap<String, String>,
    pub ok: bool,
}

impl Report {
    pub fn text(&self) -> String {
        let means: Vec<String> = self.mean_by_device.iter().map(|(d, m)| format!("{d}: {m:.1}")).collect();
        format!(
            "devices {} | readings sent {}, received {}, duplicated {}, missing {}\n\
             mean reading by device: {}\n\
             wills (status changes to offline): {:?}\n\
             retained statuses seen by a late dashboard: {:?}\n\
             {}\n",
            self.devices,
            self.readings_sent,
            self.readings_received,
            self.readings_duplicated,
            self.readings_missing,
            means.join(", "),
            self.wills_received,
            self.retained_statuses,
            if self.ok { "OK: every reading once, the will, every retained status" } else { "FAILED" },
        )
    }
}

const WAIT: Duration = Duration::from_secs(20);

fn reading(device: u32, seq: u32) -> f64 {
    20.0 + f64::from(device) + f64::from(seq % 10) / 10.0
}

/// A connected MQTT 3.1.1 client (CONNACK received) and its event loop.
async fn mqtt(port: u16, id: &str, will: Option<LastWill>) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some(will) = will {
        options.set_last_will(will);
    }
    let (client, mut events) = AsyncClient::new(options, 100);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
                return Ok::<_, rumqttc::ConnectionError>(());
            }
        }
    })
    .await
    .context("no CONNACK")??;
    Ok((client, events))
}

/// Drive an event loop until `acks` PUBACKs (QoS 1) came.
async fn until_acked(events: &mut EventLoop, mut acks: u32) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, async {
        while acks > 0 {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                acks -= 1;
            }
        }
        Ok::<_, rumqttc::ConnectionError>(())
    })
    .await
    .context("PUBACKs did not come")??;
    Ok(())
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    let broker = crate::broker::Broker::start(options.wharf.clone())?;
    let mut report = Report { devices: options.devices, ..Report::default() };

    // The analytics side (AMQP): one queue for readings, one for status changes.
    let connection = Connection::connect(&broker.amqp_uri(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    for (queue, key) in [("analytics.telemetry", "devices.*.telemetry"), ("analytics.status", "devices.*.status")] {
        channel.queue_declare(queue.into(), durable, FieldTable::default()).await?;
        let bind = QueueBindOptions::default();
        channel.queue_bind(queue.into(), "amq.topic".into(), key.into(), bind, FieldTable::default()).await?;
    }

    // The devices: a will, a retained "online", then QoS 1 readings.
    let mut devices = Vec::new();
    for device in 0..options.devices {
        let status = format!("devices/{device}/status");
        let will = LastWill::new(&status, "offline", QoS::AtLeastOnce, true);
        let (client, mut events) = mqtt(broker.mqtt, &format!("device-{device}"), Some(will)).await?;
        // Published from a task while this one drives the event loop: the client's request
        // queue is bounded, and only the event loop empties it.
        let publisher = client.clone();
        let readings = options.readings;
        let publishing = tokio::spawn(async move {
            publisher.publish(status, QoS::AtLeastOnce, true, "online").await?;
            for seq in 0..readings {
                let payload = format!("{seq};{:.1}", reading(device, seq));
                publisher.publish(format!("devices/{device}/telemetry"), QoS::AtLeastOnce, false, payload).await?;
            }
            Ok::<_, rumqttc::ClientError>(())
        });
        until_acked(&mut events, options.readings + 1).await?;
        publishing.await??;
        report.readings_sent += u64::from(options.readings);
        devices.push((client, events));
    }

    // Device 0 dies: its connection ends without a DISCONNECT, so the broker publishes its will.
    let (_, dead) = devices.remove(0);
    drop(dead);
    // The others leave properly (no will) but stay "online" in their retained status.
    for (client, mut events) in devices {
        client.disconnect().await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while events.poll().await.is_ok() {} }).await;
    }

    // Analytics: every reading once, and the will.
    let mut seen: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    let mut sums: BTreeMap<u32, f64> = BTreeMap::new();
    let mut telemetry = channel
        .basic_consume(
            "analytics.telemetry".into(),
            "analytics".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let expected = report.readings_sent;
    while report.readings_received < expected {
        let delivery = match tokio::time::timeout(WAIT, telemetry.next()).await {
            Ok(Some(delivery)) => delivery?,
            _ => break,
        };
        let device: u32 =
            delivery.routing_key.as_str().split('.').nth(1).and_then(|d| d.parse().ok()).context("device")?;
        let text = String::from_utf8_lossy(&delivery.data).into_owned();
        let (seq, value) = text.split_once(';').context("a reading")?;
        report.readings_received += 1;
        if seen.entry(device).or_default().insert(seq.parse()?) {
            *sums.entry(device).or_default() += value.parse::<f64>()?;
        } else {
            report.readings_duplicated += 1;
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
    report.readings_missing = expected - seen.values().map(|s| s.len() as u64).sum::<u64>();
    report.mean_by_device = sums.iter().map(|(device, sum)| (*device, sum / f64::from(options.readings))).collect();
    let mut status = channel
        .basic_consume(
            "analytics.status".into(),
            "status".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Each device's "online" and device 0's will.
    while report.wills_received.is_empty() {
        let delivery = match tokio::time::timeout(WAIT, status.next()).await {
            Ok(Some(delivery)) => delivery?,
            _ => break,
        };
        if delivery.data == b"offline" {
            report.wills_received.push(delivery.routing_key.to_string());
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }

    // A dashboard connecting now gets the retained status of every device.
    let (dashboard, mut events) = mqtt(broker.mqtt, "dashboard", None).await?;
    dashboard.subscribe("devices/+/status", QoS::AtLeastOnce).await?;
    let _ = tokio::time::timeout(WAIT, async {
        while report.retained_statuses.len() < options.devices as usize {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let payload = String::from_utf8_lossy(&publish.payload).into_owned();
                    report.retained_statuses.insert(publish.topic.clone(), payload);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;

    let statuses_right = (0..options.devices).all(|device| {
        let want = if device == 0 { "offline" } else { "online" };
        report.retained_statuses.get(&format!("devices/{device}/status")).map(String::as_str) == Some(want)
    });
    report.ok = report.readings_missing == 0
        && report.readings_duplicated == 0
        && report.readings_received == expected
        && report.wills_received == vec!["devices.0.status".to_owned()]
        && statuses_right;
    if !report.ok {
        eprintln!("broker log:\n{}", broker.log());
    }
    if report.devices == 0 {
        bail!("no devices");
    }
    Ok(report)
}
