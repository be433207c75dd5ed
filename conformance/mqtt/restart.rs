//! Crash recovery: a persistent-session subscriber and a publisher stream numbered QoS 1 or QoS 2
//! messages with the raw client (exact control of every acknowledgement), the broker is SIGKILLed
//! mid-stream and restarted on the same data directory, and the subscriber reconnects with the
//! same client id and CleanSession 0. Every message the publisher saw acknowledged (PUBACK,
//! PUBCOMP) must reach the subscriber; at QoS 2 none twice (the subscriber keeps the packet ids
//! awaiting PUBREL across reconnections, as the protocol asks of a QoS 2 receiver); at QoS 1
//! duplicates are allowed and reported. And a persistent session with a queued message survives
//! a clean shutdown (SIGTERM) and restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, sleep};
use std::time::{Duration, Instant};

use crate::harness::Broker;
use crate::raw::{Connect, Next, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, Publish, Raw, SUBACK, ack, hex, subscribe};

/// Unacknowledged PUBLISHes the publisher keeps in flight.
const WINDOW: usize = 16;
/// Acknowledged messages before the broker is killed.
const ACKED_BEFORE_KILL: usize = 300;
/// Longest wait for a step (subscription, enough acknowledgements, redelivery after restart).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time after the last expected message, for late duplicates.
const SETTLE: Duration = Duration::from_secs(1);

/// What the subscriber saw, shared with the test.
#[derive(Debug, Default)]
struct Subscriber {
    subscribed: bool,
    /// Message numbers handed to the application, in order (QoS 2 retransmissions excluded).
    numbers: Vec<u32>,
    connections: usize,
    problems: Vec<String>,
}

/// Subscribe to `topic` with CleanSession 0, then receive and acknowledge, reconnecting (same
/// client id, CleanSession 0) whenever the connection drops, until `stop`.
fn spawn_subscriber(
    address: SocketAddr,
    client_id: String,
    topic: String,
    qos: u8,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<Subscriber>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        // Packet ids of QoS 2 messages received and not yet released: a PUBLISH with one of them
        // is a retransmission, not a new message.
        let mut awaiting_release: HashSet<u16> = HashSet::new();
        while !stop.load(Ordering::SeqCst) {
            let connect = Connect::v4(&client_id).clean(false);
            let Some((mut raw, connack)) = Raw::try_session(address, &connect) else {
                sleep(Duration::from_millis(100));
                continue;
            };
            {
                let mut state = state.lock().expect("state");
                state.connections += 1;
                if state.subscribed && !connack.session_present {
                    let n = state.connections;
                    state.problems.push(format!("connection {n}: Session Present 0, the persistent session was lost"));
                }
                if !state.subscribed {
                    raw.send_lenient(&subscribe(false, 1, &[(&topic, qos)]));
                }
            }
            loop {
                match raw.next(Duration::from_millis(100)) {
                    Next::Packet(packet) => {
                        let mut state = state.lock().expect("state");
                        match packet.kind() {
                            SUBACK => state.subscribed = true,
                            PUBLISH => {
                                let message = packet.publish(false);
                                let number: u32 = match String::from_utf8_lossy(&message.payload).parse() {
                                    Ok(number) => number,
                                    Err(_) => {
                                        state.problems.push(format!("unexpected payload {}", hex(&message.payload)));
                                        continue;
                                    }
                                };
                                match (message.qos, message.packet_id) {
                                    (1, Some(id)) => {
                                        state.numbers.push(number);
                                        raw.send_lenient(&ack(PUBACK, id));
                                    }
                                    (2, Some(id)) => {
                                        if awaiting_release.insert(id) {
                                            state.numbers.push(number);
                                        } else if !message.dup {
                                            state.problems.push(format!(
                                                "message {number}: PUBLISH with packet id {id}, still awaiting PUBREL, without DUP"
                                            ));
                                        }
                                        raw.send_lenient(&ack(PUBREC, id));
                                    }
                                    _ => state
                                        .problems
                                        .push(format!("message {number} delivered at QoS {}", message.qos)),
                                }
                            }
                            PUBREL => {
                                let id = packet.packet_id();
                                awaiting_release.remove(&id);
                                raw.send_lenient(&ack(PUBCOMP, id));
                            }
                            _ => state.problems.push(format!("unexpected packet {}", hex(&packet.bytes()))),
                        }
                    }
                    Next::Closed => break,
                    Next::Timeout => {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                }
            }
        }
    })
}

/// Publish numbered messages with up to `WINDOW` in flight until the connection drops; each
/// number acknowledged (PUBACK, or PUBCOMP after PUBREC/PUBREL) is pushed to `acked`. Returns how
/// many were sent.
fn spawn_publisher(address: SocketAddr, topic: String, qos: u8, acked: Arc<Mutex<Vec<u32>>>) -> JoinHandle<u32> {
    thread::spawn(move || {
        let connect = Connect::v4("restart-publisher");
        let (mut raw, _) = Raw::try_session(address, &connect).expect("the publisher connects");
        let mut next: u32 = 0;
        let mut in_flight: HashMap<u16, u32> = HashMap::new();
        loop {
            while in_flight.len() < WINDOW {
                let id = u16::try_from(next % 60_000 + 1).expect("packet id");
                let payload = next.to_string();
                raw.send_lenient(&Publish::new(&topic, qos, payload.as_bytes()).id(id).encode());
                in_flight.insert(id, next);
                next += 1;
            }
            match raw.next(Duration::from_secs(10)) {
                Next::Packet(packet) => {
                    let id = packet.packet_id();
                    match (packet.kind(), qos) {
                        (PUBACK, 1) | (PUBCOMP, 2) => {
                            if let Some(number) = in_flight.remove(&id) {
                                acked.lock().expect("acked").push(number);
                            }
                        }
                        (PUBREC, 2) => raw.send_lenient(&ack(PUBREL, id)),
                        _ => panic!("publisher: unexpected packet {}", hex(&packet.bytes())),
                    }
                }
                Next::Closed => return next,
                Next::Timeout => panic!("publisher: no acknowledgement within 10 s ({} in flight)", in_flight.len()),
            }
        }
    })
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {STEP_TIMEOUT:?}");
        sleep(Duration::from_millis(10));
    }
}

fn join<T>(handle: JoinHandle<T>) -> T {
    handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn acknowledged_messages_survive_sigkill(qos: u8) {
    let mut broker = Broker::start();
    let address = broker.mqtt_addr();
    let topic = format!("restart/qos{qos}");
    let stop = Arc::new(AtomicBool::new(false));
    let state = Arc::new(Mutex::new(Subscriber::default()));
    let subscriber = spawn_subscriber(
        address,
        format!("restart-sub-{qos}"),
        topic.clone(),
        qos,
        Arc::clone(&stop),
        Arc::clone(&state),
    );
    wait_until("the subscriber's SUBACK", || state.lock().expect("state").subscribed);

    let acked = Arc::new(Mutex::new(Vec::new()));
    let publisher = spawn_publisher(address, topic, qos, Arc::clone(&acked));
    wait_until("acknowledged messages before the kill", || acked.lock().expect("acked").len() >= ACKED_BEFORE_KILL);
    broker.kill();
    let sent = join(publisher);
    let acked: Vec<u32> = acked.lock().expect("acked").clone();
    let before_restart = state.lock().expect("state").numbers.len();
    broker.restart();

    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let missing: Vec<u32> = {
            let got: HashSet<u32> = state.lock().expect("state").numbers.iter().copied().collect();
            acked.iter().copied().filter(|n| !got.contains(n)).collect()
        };
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            let state = state.lock().expect("state");
            panic!(
                "QoS {qos}: {} acknowledged messages never reached the subscriber after the restart: {missing:?}\n\
                 sent {sent}, acknowledged {}, received {} ({before_restart} before the restart), problems {:?}",
                missing.len(),
                acked.len(),
                state.numbers.len(),
                state.problems
            );
        }
        sleep(Duration::from_millis(20));
    }
    sleep(SETTLE);
    stop.store(true, Ordering::SeqCst);
    join(subscriber);

    let state = state.lock().expect("state");
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for number in &state.numbers {
        *counts.entry(*number).or_default() += 1;
    }
    let duplicates: Vec<(u32, usize)> = counts.iter().filter(|(_, c)| **c > 1).map(|(n, c)| (*n, *c)).collect();
    eprintln!(
        "QoS {qos}: sent {sent}, acknowledged {} before SIGKILL, subscriber received {} ({before_restart} before the \
         restart, {} distinct) over {} connections; duplicates: {duplicates:?}",
        acked.len(),
        state.numbers.len(),
        counts.len(),
        state.connections
    );
    assert!(state.problems.is_empty(), "QoS {qos}: protocol problems seen by the subscriber: {:?}", state.problems);
    assert!(state.connections >= 2, "the subscriber should have reconnected after the restart");
    if qos == 2 {
        assert!(duplicates.is_empty(), "QoS 2 messages delivered more than once: {duplicates:?}");
    }
}

#[test]
fn mqtt_restart_qos1_acknowledged_messages_survive_sigkill() {
    acknowledged_messages_survive_sigkill(1);
}

#[test]
fn mqtt_restart_qos2_acknowledged_messages_delivered_exactly_once_after_sigkill() {
    acknowledged_messages_survive_sigkill(2);
}

/// [MQTT-3.1.2-4], [MQTT-3.1.2-5] across a clean shutdown: the session, its subscription and the
/// QoS 1 message queued while the client was away are still there after SIGTERM and a restart.
#[test]
fn mqtt_3_1_2_5_persistent_session_survives_sigterm_restart() {
    let mut broker = Broker::start();
    let connect = Connect::v4("sigterm-sub").clean(false);
    let (mut sub, _) = Raw::session(broker.mqtt_addr(), &connect);
    sub.subscribe(1, "sigterm/t", 1);
    sub.send(&crate::raw::disconnect(false, 0));
    sub.expect_eventually_closed("DISCONNECT");
    let mut publisher = Raw::open(broker.mqtt_addr(), false, "sigterm-pub");
    publisher.send(&Publish::new("sigterm/t", 1, b"queued").encode());
    publisher.expect_kind(PUBACK, "PUBACK before the shutdown");
    broker.stop();
    broker.restart();
    let (mut sub, connack) = Raw::session(broker.mqtt_addr(), &connect);
    assert!(connack.session_present, "the persistent session must survive a restart");
    let got = sub.receive_acking(1, Duration::from_millis(500), "the queued message after the restart");
    let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"queued"[..]]);
    let mut publisher = Raw::open(broker.mqtt_addr(), false, "sigterm-pub");
    publisher.send(&Publish::new("sigterm/t", 1, b"after").encode());
    publisher.expect_kind(PUBACK, "PUBACK after the restart");
    let got = sub.receive_acking(1, Duration::from_millis(500), "a live message on the restored subscription");
    assert_eq!(got[0].payload, b"after");
}

/// [MQTT-3.1.2-8], [MQTT-3.1.3-9] across a crash: the will is part of the session state, so a
/// client whose connection died with the broker (SIGKILL) has its will published after the restart,
/// once its Will Delay Interval has passed; a will removed by a normal DISCONNECT is not.
#[test]
fn mqtt5_3_1_3_9_will_published_after_a_crash_and_restart() {
    let mut broker = Broker::start();
    let expiry = [crate::raw::Prop::Four(0x11, 300)];
    let subscriber = Connect::v5("crash-will-sub").clean(false).properties(&expiry);
    let (mut sub, _) = Raw::session(broker.mqtt_addr(), &subscriber);
    sub.subscribe(1, "crash/will/#", 1);
    sub.send(&crate::raw::disconnect(true, 0));
    sub.expect_eventually_closed("DISCONNECT");
    let delayed = crate::raw::Will {
        topic: "crash/will/delayed",
        payload: b"gone",
        qos: 1,
        retain: false,
        properties: crate::raw::props(&[crate::raw::Prop::Four(0x18, 2)]),
    };
    let (_dying, _) =
        Raw::session(broker.mqtt_addr(), &Connect::v5("crash-will-client").properties(&expiry).will(delayed));
    let polite = crate::raw::Will {
        topic: "crash/will/polite",
        payload: b"never",
        qos: 1,
        retain: false,
        properties: crate::raw::props(&[]),
    };
    let (mut leaving, _) =
        Raw::session(broker.mqtt_addr(), &Connect::v5("crash-will-polite").properties(&expiry).will(polite));
    leaving.send(&crate::raw::disconnect(true, 0));
    leaving.expect_eventually_closed("DISCONNECT");
    broker.kill();
    broker.restart();
    let restarted = Instant::now();
    let (mut sub, connack) = Raw::session(broker.mqtt_addr(), &subscriber);
    assert!(connack.session_present, "the subscriber's session must survive the crash");
    let got = sub.receive_acking(1, Duration::from_secs(3), "the will of the client lost with the crash");
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, vec!["crash/will/delayed"], "only the delayed will of the lost connection");
    assert_eq!(got[0].payload, b"gone");
    assert!(restarted.elapsed() >= Duration::from_millis(1500), "the will must wait for its delay after the restart");
}
