//! `wharf bench mqtt`: MQTT 3.1.1 publishers and subscribers on rumqttc. A QoS 1/2 publish counts
//! as sent when the broker acknowledged it (PUBACK, PUBCOMP); a QoS 0 publish when it was written.
//! Topics are `<prefix>/<destination>`; each subscriber subscribes to its destination's topic.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;

use super::{Counters, Layout, MqttArgs, Receiver, Report, Running, Schedule, progress, stamp};

/// Time to connect and subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: MqttArgs) -> anyhow::Result<Report> {
    let common = args.common.clone();
    common.validate()?;
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let prefix = common.run_prefix();
    let topic = |destination: u32| format!("{prefix}/{destination}");
    let counters = Arc::new(Counters::default());
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);

    // Subscribers first, each subscribed before anything is published.
    let mut subscribers = Vec::new();
    for index in 0..common.subscribers {
        let destination = match common.layout {
            Layout::OneToOne => index,
            Layout::FanOut | Layout::FanIn => 0,
        };
        let (client, mut events) = connect(&args, &format!("{prefix}-sub-{index}")).await?;
        client.subscribe(topic(destination), qos).await.context("subscribe")?;
        tokio::time::timeout(SETUP_TIMEOUT, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(error) => return Err(anyhow::anyhow!("subscriber {index}: {error}")),
                }
            }
        })
        .await
        .context("no SUBACK in time")??;
        let mut receiver = Receiver::new(epoch, Arc::clone(&counters))?;
        let mut stop = stop_rx.clone();
        subscribers.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::Publish(publish))) => receiver.record(&publish.payload),
                        Ok(_) => {}
                        Err(error) => {
                            eprintln!("wharf bench: subscriber {index}: {error}");
                            break;
                        }
                    },
                    _ = stop.changed() => break,
                }
            }
            drop(client);
            receiver
        }));
    }

    // Idle connections: connected before the load and held through it.
    let mut idle = Vec::with_capacity(args.idle_connections as usize);
    for index in 0..args.idle_connections {
        let (client, mut events) = connect(&args, &format!("{prefix}-idle-{index}")).await?;
        let task = tokio::spawn(async move {
            // Keep-alive pings go out and their answers come in; nothing else.
            while events.poll().await.is_ok() {}
        });
        idle.push((client, task));
    }

    let start = Instant::now();
    let reporter = tokio::spawn(progress(Arc::clone(&counters), start, stop_rx.clone()));
    let mut publishers = Vec::new();
    for index in 0..common.publishers {
        let (client, events) = connect(&args, &format!("{prefix}-pub-{index}")).await?;
        let topic = topic(common.destination_of(index));
        let schedule = Schedule::new(&common, index, start);
        let counters = Arc::clone(&counters);
        let size = common.size_bytes;
        publishers.push(tokio::spawn(publish(client, events, topic, qos, schedule, epoch, index, size, counters)));
    }
    let copies = match common.layout {
        Layout::OneToOne => 1,
        Layout::FanOut | Layout::FanIn => u64::from(common.subscribers),
    };
    let running = Running { counters, start, publishers, subscribers, stop: stop_tx, reporter };
    let outcome = running.finish(copies, common.drain_secs).await?;
    let still_open = idle.iter().filter(|(_, task)| !task.is_finished()).count();
    if args.hold_secs > 0 {
        eprintln!("holding {still_open} idle connections for {} s", args.hold_secs);
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    }
    let open_at_end = idle.iter().filter(|(_, task)| !task.is_finished()).count();
    for (client, task) in idle {
        task.abort();
        drop(client);
    }
    let mut report = outcome.report("mqtt", format!("qos {}", args.qos), &common)?;
    report.idle_connections = u32::try_from(open_at_end).unwrap_or(u32::MAX);
    Ok(report)
}

/// A connected client and its event loop, CONNACK received.
async fn connect(args: &MqttArgs, client_id: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(client_id, args.common.host.clone(), args.port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_inflight(args.inflight.max(1));
    let packet_max = args.common.size_bytes + client_id.len() + 1024;
    options.set_max_packet_size(packet_max.max(10 * 1024), packet_max.max(10 * 1024));
    if let Some(username) = &args.username {
        options.set_credentials(username.clone(), args.password.clone().unwrap_or_default());
    }
    let (client, mut events) = AsyncClient::new(options, usize::from(args.inflight.max(1)));
    tokio::time::timeout(SETUP_TIMEOUT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => bail!("{client_id} could not connect to {}:{}: {error}", args.common.host, args.port),
            }
        }
    })
    .await
    .with_context(|| format!("{client_id}: no CONNACK in time"))??;
    Ok((client, events))
}

/// One publisher: publish on schedule while its event loop counts acknowledgements, then wait
/// for the last ones.
#[expect(clippy::too_many_arguments, reason = "one publisher's whole setting, passed once to its task")]
async fn publish(
    client: AsyncClient,
    mut events: EventLoop,
    topic: String,
    qos: QoS,
    mut schedule: Schedule,
    epoch: Instant,
    index: u32,
    size: usize,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (done_tx, mut done_rx) = watch::channel(false);
    let loop_acked = Arc::clone(&acked);
    let loop_counters = Arc::clone(&counters);
    let event_loop = tokio::spawn(async move {
        loop {
            tokio::select! {
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => {
                        loop_acked.fetch_add(1, Ordering::Relaxed);
                        loop_counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::PubComp(_))) if qos == QoS::ExactlyOnce => {
                        loop_acked.fetch_add(1, Ordering::Relaxed);
                        loop_counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                        loop_acked.fetch_add(1, Ordering::Relaxed);
                        loop_counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(error) => return Err(anyhow::anyhow!("publisher {index}: {error}")),
                },
                _ = done_rx.changed() => return Ok(()),
            }
        }
    });
    let mut seq = 0;
    while let Some(due) = schedule.next().await {
        let payload = stamp(epoch, due, index, seq, size);
        client.publish(topic.clone(), qos, false, payload).await.context("publish")?;
        seq += 1;
        if event_loop.is_finished() {
            break;
        }
    }
    // Every publish acknowledged (or written, at QoS 0), or the connection failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.load(Ordering::Relaxed) < seq && !event_loop.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The connection just closes: every publish is acknowledged already (a lost connection shows
    // as publishes never counted as sent).
    done_tx.send_replace(true);
    event_loop.await.context("publisher event loop")??;
    drop(client);
    Ok(())
}
