//! The MQTT front-end's node-wide state: which client ids are connected here (for session
//! takeover), pending wills and session expiries, retained-message writes, `$SYS` statistics and
//! counters. Reaches the core only through `wharf_core::Core`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{OwnedMutexGuard, oneshot, watch};
use tokio::task::JoinHandle;
use wharf_core::model::{FieldValue, Headers, Message};
use wharf_core::node::StateWrite;
use wharf_core::{Core, CoreError};

use crate::config::MqttConfig;
use crate::mapping;
use crate::session::{self, SessionRecord, StoredWill};

/// Per-client locks serialising session set-up, teardown and expiry of one client id: a fixed
/// array indexed by a hash, so memory does not grow with the number of clients.
const CLIENT_LOCKS: usize = 256;

/// Longest wait for a taken-over connection to finish its teardown.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters behind `$SYS` and the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connected clients.
    pub clients_connected: AtomicU64,
    /// PUBLISH packets received.
    pub messages_received: AtomicU64,
    /// PUBLISH packets sent.
    pub messages_sent: AtomicU64,
    /// Bytes received.
    pub bytes_received: AtomicU64,
    /// Bytes sent.
    pub bytes_sent: AtomicU64,
    /// Retained messages stored.
    pub retained: AtomicU64,
    /// Sessions stored (connected or not).
    pub sessions: AtomicU64,
}

/// A connected client, as the takeover logic sees it.
#[derive(Debug)]
struct Client {
    /// The connection's number (unique per node run).
    seq: u64,
    /// Tells the connection it is taken over.
    takeover: Option<oneshot::Sender<()>>,
    /// Becomes `true` when the connection has finished its teardown.
    done: watch::Receiver<bool>,
}

/// What waits for a disconnected client: a delayed will and the session's expiry.
#[derive(Debug, Default)]
struct Pending {
    will: Option<(StoredWill, JoinHandle<()>)>,
    expiry: Option<JoinHandle<()>>,
}

/// The MQTT front-end of one node.
#[derive(Debug)]
pub struct Broker {
    pub(crate) core: Core,
    pub(crate) config: MqttConfig,
    pub(crate) stats: Stats,
    clients: Mutex<HashMap<String, Client>>,
    pending: Mutex<HashMap<String, Pending>>,
    locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    connection_seq: AtomicU64,
    started: Instant,
    /// When this node's front-end started, ms since the epoch: the disconnect time of sessions
    /// whose connection was lost with the previous run.
    pub(crate) started_ms: u64,
    pub(crate) shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Broker {
    /// Start the front-end on a core: check the configuration, schedule the expiry of sessions
    /// left disconnected by the previous run, and start the `$SYS` publisher.
    pub async fn start(core: Core, config: MqttConfig) -> Result<Arc<Self>, CoreError> {
        config.validate().map_err(|(key, reason)| CoreError::InvalidArgument(format!("{key}: {reason}")))?;
        if !core.with_catalogue(|c| c.exchange(&config.vhost, &config.exchange).is_some()) {
            return Err(CoreError::NotFound(format!(
                "exchange '{}' in vhost '{}' (mqtt.exchange, mqtt.vhost)",
                config.exchange, config.vhost
            )));
        }
        let broker = Arc::new(Self {
            core,
            config,
            stats: Stats::default(),
            clients: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            locks: (0..CLIENT_LOCKS).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
            connection_seq: AtomicU64::new(0),
            started: Instant::now(),
            started_ms: now_ms(),
            shutdown: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        });
        let retained = broker.core.state_scan(&broker.config.vhost, session::RETAINED_KEY_PREFIX).len();
        broker.stats.retained.store(retained as u64, Ordering::Relaxed);
        metrics::gauge!("wharf_mqtt_retained_messages").set(retained as f64);
        // Sessions whose connection died with the previous run expire from this start.
        let sessions = broker.core.state_scan(&broker.config.vhost, session::SESSION_KEY_PREFIX);
        // Sessions are counted by their queues, which is what ending a session deletes. A queue
        // without a record was left by a crash while its session was being set up, before its
        // CONNACK: no client has that session, so it ends now, as an expired one would (unless
        // its client connects first).
        let queued: Vec<String> = broker.core.with_catalogue(|c| {
            c.queues_in(&broker.config.vhost)
                .filter_map(|q| q.name.name.strip_prefix(session::SESSION_QUEUE_PREFIX))
                .map(str::to_owned)
                .collect()
        });
        broker.stats.sessions.store(queued.len() as u64, Ordering::Relaxed);
        metrics::gauge!("wharf_mqtt_sessions").set(queued.len() as f64);
        let recorded: std::collections::HashSet<&str> =
            sessions.iter().filter_map(|(key, _)| key.strip_prefix(session::SESSION_KEY_PREFIX)).collect();
        let orphans: Vec<&String> = queued.iter().filter(|client_id| !recorded.contains(client_id.as_str())).collect();
        for client_id in orphans {
            broker.schedule_expiry(client_id, 0, broker.started_ms);
        }
        for (key, value) in sessions {
            let Some(client_id) = key.strip_prefix(session::SESSION_KEY_PREFIX) else { continue };
            if let Some(record) = SessionRecord::decode(&value) {
                let disconnected_at_ms = if record.connected { broker.started_ms } else { record.disconnected_at_ms };
                // A will still in the record belongs to a connection that ended without
                // DISCONNECT (or with the broker): it is due after its delay.
                if let Some(will) = record.will {
                    broker.schedule_will(client_id, will, record.expiry_secs, disconnected_at_ms);
                }
                broker.schedule_expiry(client_id, record.expiry_secs, disconnected_at_ms);
            }
        }
        if broker.config.sys_interval_secs > 0 {
            let task = tokio::spawn(sys_publisher(Arc::downgrade(&broker)));
            broker.lock_tasks().push(task);
        }
        Ok(broker)
    }

    /// Ask every connection to close (MQTT 5 clients get DISCONNECT 0x8B) and stop background
    /// tasks. Sessions stay stored.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        for task in self.lock_tasks().drain(..) {
            task.abort();
        }
        for pending in lock(&self.pending).drain() {
            if let Some((_, task)) = pending.1.will {
                task.abort();
            }
            if let Some(task) = pending.1.expiry {
                task.abort();
            }
        }
    }

    /// The core this front-end runs on.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The front-end's settings.
    pub fn config(&self) -> &MqttConfig {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn lock_tasks(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        lock(&self.tasks)
    }

    pub(crate) fn next_connection_seq(&self) -> u64 {
        self.connection_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The lock serialising session changes of `client_id`.
    pub(crate) async fn client_lock(&self, client_id: &str) -> OwnedMutexGuard<()> {
        let index = client_id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into())) % CLIENT_LOCKS;
        Arc::clone(&self.locks[index]).lock_owned().await
    }

    /// Register a connection for `client_id`, taking the id over from a connection that holds it
    /// [MQTT-3.1.4-3]: that connection is told to close and its teardown is awaited. Returns the
    /// receiver of this connection's own takeover signal.
    pub(crate) async fn register(
        &self,
        client_id: &str,
        seq: u64,
        done: watch::Receiver<bool>,
    ) -> oneshot::Receiver<()> {
        loop {
            let (old_seq, takeover, mut old_done) = {
                let mut clients = lock(&self.clients);
                match clients.get_mut(client_id) {
                    Some(client) => (client.seq, client.takeover.take(), client.done.clone()),
                    None => {
                        let (tx, rx) = oneshot::channel();
                        clients.insert(client_id.to_owned(), Client { seq, takeover: Some(tx), done });
                        return rx;
                    }
                }
            };
            if let Some(takeover) = takeover {
                let _ = takeover.send(());
            }
            // `wait_for` fails when the connection is gone without saying so (it panicked): done too.
            if tokio::time::timeout(TAKEOVER_TIMEOUT, old_done.wait_for(|finished| *finished)).await.is_err() {
                tracing::warn!(client_id, "taken-over connection did not finish its teardown in time");
            }
            self.unregister(client_id, old_seq);
        }
    }

    /// Forget a connection (if it is still the one registered for `client_id`).
    pub(crate) fn unregister(&self, client_id: &str, seq: u64) {
        let mut clients = lock(&self.clients);
        if clients.get(client_id).is_some_and(|client| client.seq == seq) {
            clients.remove(client_id);
        }
    }

    /// Whether a connection holds `client_id` on this node.
    pub fn is_connected(&self, client_id: &str) -> bool {
        lock(&self.clients).contains_key(client_id)
    }

    /// A client connects: cancel its session's expiry, and its delayed will, which is published
    /// at once if the new connection does not resume the session (the session ended).
    pub(crate) async fn cancel_pending(&self, client_id: &str, resuming: bool) {
        let pending = lock(&self.pending).remove(client_id);
        let Some(pending) = pending else { return };
        if let Some(task) = pending.expiry {
            task.abort();
        }
        if let Some((will, task)) = pending.will {
            task.abort();
            if !resuming {
                self.publish_will(client_id, &will).await;
            }
        }
    }

    /// A client's connection ended without a normal DISCONNECT: publish its will after the Will
    /// Delay Interval counted from `disconnected_at_ms`, or when the session ends, whichever comes
    /// first [MQTT-3.1.3-9]; then remove it from the session record.
    pub(crate) fn schedule_will(
        self: &Arc<Self>,
        client_id: &str,
        will: StoredWill,
        session_expiry_secs: u32,
        disconnected_at_ms: u64,
    ) {
        let delay_secs = will.delay_secs.min(session_expiry_secs);
        let due_ms = disconnected_at_ms.saturating_add(u64::from(delay_secs) * 1000);
        let broker = Arc::clone(self);
        let id = client_id.to_owned();
        let delayed = will.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(due_ms.saturating_sub(now_ms()))).await;
            let _guard = broker.client_lock(&id).await;
            if broker.is_connected(&id) {
                return;
            }
            let will = {
                let mut pending = lock(&broker.pending);
                pending.get_mut(&id).and_then(|p| p.will.take()).map(|(will, _)| will)
            };
            if let Some(will) = will {
                broker.publish_will(&id, &will).await;
                broker.forget_stored_will(&id).await;
            }
        });
        lock(&self.pending).entry(client_id.to_owned()).or_default().will = Some((delayed, task));
    }

    /// Remove the will from a client's session record (it was published).
    async fn forget_stored_will(&self, client_id: &str) {
        let key = session::session_key(client_id);
        let Some(mut record) = self.core.state_get(&self.config.vhost, &key).and_then(|v| SessionRecord::decode(&v))
        else {
            return;
        };
        if record.will.take().is_none() {
            return;
        }
        let write = StateWrite { key, value: Some(record.encode()), owner: Some(session::session_queue(client_id)) };
        if let Err(error) = self.core.state_write(&self.config.vhost, vec![write]).await {
            tracing::debug!(client_id, %error, "removing a published will from its session failed");
        }
    }

    /// A session without a connection ends `expiry_secs` after `disconnected_at_ms` (never for
    /// `u32::MAX`): its queue is deleted, which deletes its records, and a pending will is
    /// published.
    pub(crate) fn schedule_expiry(self: &Arc<Self>, client_id: &str, expiry_secs: u32, disconnected_at_ms: u64) {
        if expiry_secs == u32::MAX {
            return;
        }
        let deadline_ms = disconnected_at_ms.saturating_add(u64::from(expiry_secs) * 1000);
        let broker = Arc::clone(self);
        let id = client_id.to_owned();
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(deadline_ms.saturating_sub(now_ms()))).await;
            let _guard = broker.client_lock(&id).await;
            if broker.is_connected(&id) {
                return;
            }
            let will = {
                let mut pending = lock(&broker.pending);
                let entry = pending.remove(&id).unwrap_or_default();
                if let Some((_, task)) = &entry.will {
                    task.abort();
                }
                entry.will.map(|(will, _)| will)
            };
            if let Some(will) = will {
                broker.publish_will(&id, &will).await;
            }
            broker.end_session(&id).await;
        });
        lock(&self.pending).entry(client_id.to_owned()).or_default().expiry = Some(task);
    }

    /// Delete a session: its queue and, with it, every record it owns.
    pub(crate) async fn end_session(&self, client_id: &str) {
        let queue = session::session_queue(client_id);
        let shared: Vec<String> = self
            .core
            .state_get(&self.config.vhost, &session::session_key(client_id))
            .and_then(|value| SessionRecord::decode(&value))
            .map(|record| {
                record.subscriptions.into_keys().filter(|f| crate::codec::topic::parse_shared(f).is_some()).collect()
            })
            .unwrap_or_default();
        match self.core.delete_queue(&self.config.vhost, &queue, false, false, None).await {
            Ok(_) => self.session_count(-1),
            Err(CoreError::NotFound(_)) => {}
            Err(error) => tracing::warn!(client_id, %error, "deleting an ended session failed"),
        }
        // A record without its queue (written by an interrupted set-up) goes too.
        let _ = self
            .core
            .state_write(
                &self.config.vhost,
                vec![StateWrite { key: session::session_key(client_id), value: None, owner: None }],
            )
            .await;
        for filter in shared {
            self.release_shared(&filter).await;
        }
    }

    /// A session dropped the shared subscription `filter`: when no stored session holds it any
    /// more and no member consumes from it, the group's queue is deleted, so messages stop piling
    /// up for a group that is gone.
    pub(crate) async fn release_shared(&self, filter: &str) {
        let Some((group, inner)) = crate::codec::topic::parse_shared(filter) else { return };
        let still_held = self
            .core
            .state_scan(&self.config.vhost, session::SESSION_KEY_PREFIX)
            .into_iter()
            .filter_map(|(_, value)| SessionRecord::decode(&value))
            .any(|record| record.subscriptions.contains_key(filter));
        if still_held {
            return;
        }
        let name_len_max = self.core.config().limits.name_len_max_bytes as usize;
        let queue = session::shared_queue(group, inner, name_len_max);
        // `if_unused`: a member subscribing at this moment keeps the queue.
        match self.core.delete_queue(&self.config.vhost, &queue, true, false, None).await {
            Ok(_) | Err(CoreError::NotFound(_) | CoreError::PreconditionFailed(_)) => {}
            Err(error) => tracing::warn!(filter, %error, "deleting an unused shared subscription queue failed"),
        }
    }

    /// Publish a will message (with its properties and RETAIN) as its client would have.
    pub(crate) async fn publish_will(&self, client_id: &str, will: &StoredWill) {
        if will.retain
            && let Err(error) = self.store_retained(&will.topic, &will.message).await
        {
            tracing::warn!(client_id, %error, "storing a retained will failed");
        }
        match self.core.publish_confirmed(&self.config.vhost, will.message.clone()).await {
            Ok(_) => tracing::debug!(client_id, topic = will.topic, "will published"),
            Err(error) => tracing::warn!(client_id, %error, "publishing a will failed"),
        }
    }

    /// Store (non-empty payload) or clear (empty payload) the retained message of a topic
    /// [MQTT-3.3.1-5], [MQTT-3.3.1-6].
    pub(crate) async fn store_retained(&self, topic: &str, message: &Message) -> Result<(), CoreError> {
        let key = session::retained_key(topic);
        let existed = self.core.state_get(&self.config.vhost, &key).is_some();
        let value = if message.payload.is_empty() {
            if !existed {
                return Ok(());
            }
            None
        } else {
            if !existed && self.stats.retained.load(Ordering::Relaxed) >= self.config.retained_messages_max {
                return Err(CoreError::LimitExceeded {
                    limit: "mqtt.retained_messages_max",
                    value: self.config.retained_messages_max + 1,
                    max: self.config.retained_messages_max,
                });
            }
            let mut stored = message.clone();
            // A retained copy is re-published to each new subscriber: it must not carry the
            // original's idempotency key, or it would be taken for a duplicate.
            stored.idempotency_key = None;
            Some(session::RetainedRecord { stored_ms: now_ms(), message: stored }.encode())
        };
        let deleting = value.is_none();
        self.core.state_write(&self.config.vhost, vec![StateWrite { key, value, owner: None }]).await?;
        let count = if deleting {
            self.stats.retained.fetch_sub(1, Ordering::Relaxed) - 1
        } else if !existed {
            self.stats.retained.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.stats.retained.load(Ordering::Relaxed)
        };
        metrics::gauge!("wharf_mqtt_retained_messages").set(count as f64);
        Ok(())
    }

    /// Retained messages whose topic matches `filter`, their expiry reduced by the time they were
    /// retained; expired ones are left out (and stay stored until replaced: counted as retained).
    pub(crate) fn retained_matching(&self, filter: &str) -> Vec<(String, Message)> {
        self.core
            .state_scan(&self.config.vhost, session::RETAINED_KEY_PREFIX)
            .into_iter()
            .filter_map(|(key, value)| {
                let topic = key.strip_prefix(session::RETAINED_KEY_PREFIX)?;
                if !crate::topic::filter_matches(filter, topic) {
                    return None;
                }
                let message = session::RetainedRecord::decode(&value)?.current(now_ms())?;
                Some((topic.to_owned(), message))
            })
            .collect()
    }

    /// Count a session created (+1) or ended (-1).
    pub(crate) fn session_count(&self, delta: i64) {
        // Saturating: a gauge that is off by one must never wrap (or panic a connection).
        let step = |count: u64| Some(count.saturating_add_signed(delta));
        let previous = self.stats.sessions.fetch_update(Ordering::Relaxed, Ordering::Relaxed, step);
        let count = previous.map_or(0, |previous| previous.saturating_add_signed(delta));
        metrics::gauge!("wharf_mqtt_sessions").set(count as f64);
    }

    fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations: a panic inside one leaves the map usable.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Publish `$SYS/broker/...` statistics, retained, every `sys_interval_secs` (Mosquitto's names).
async fn sys_publisher(broker: std::sync::Weak<Broker>) {
    let interval_secs = match broker.upgrade() {
        Some(broker) => broker.config.sys_interval_secs,
        None => return,
    };
    let mut interval = tokio::time::interval(Duration::from_secs(interval_secs.into()));
    loop {
        interval.tick().await;
        let Some(broker) = broker.upgrade() else { return };
        let stats = &broker.stats;
        let values = [
            ("$SYS/broker/version", format!("wharf {}", env!("CARGO_PKG_VERSION"))),
            ("$SYS/broker/uptime", format!("{} seconds", broker.uptime_secs())),
            ("$SYS/broker/clients/connected", stats.clients_connected.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/messages/received", stats.messages_received.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/messages/sent", stats.messages_sent.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/bytes/received", stats.bytes_received.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/bytes/sent", stats.bytes_sent.load(Ordering::Relaxed).to_string()),
            ("$SYS/broker/retained messages/count", stats.retained.load(Ordering::Relaxed).to_string()),
        ];
        for (topic, value) in values {
            let mut message = Message::new(
                broker.config.exchange.clone(),
                crate::topic::topic_to_routing_key(topic),
                Bytes::from(value.into_bytes()),
            );
            let mut headers = Headers::new();
            headers.push(mapping::HEADER_QOS, FieldValue::U8(0));
            headers.push(mapping::HEADER_RETAIN, FieldValue::Bool(true));
            message.headers = headers;
            message.properties.payload_utf8 = Some(true);
            if let Err(error) = broker.store_retained(topic, &message).await {
                tracing::debug!(%error, topic, "storing a $SYS value failed");
            }
            if let Ok(pending) = broker.core.publish(&broker.config.vhost, message).await {
                drop(tokio::spawn(async move {
                    let _ = pending.confirm().await;
                }));
            }
        }
    }
}
