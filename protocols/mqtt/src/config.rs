//! Settings and limits of the MQTT front-end, with their defaults and why. Plain data; the `wharf`
//! binary fills it from its configuration layers.

use serde::Deserialize;

/// How the MQTT front-end behaves and what it allows. Every limit has its unit last.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Virtual host MQTT clients live in.
    pub vhost: String,
    /// Topic exchange MQTT topics are routing keys of (shared with AMQP clients).
    pub exchange: String,
    /// Largest packet accepted from a client, bytes (announced as Maximum Packet Size). Checked
    /// from the fixed header, before the packet is buffered.
    pub packet_size_max_bytes: u32,
    /// Time a new connection has to send CONNECT, seconds.
    pub connect_timeout_secs: u32,
    /// Largest Keep Alive allowed; a larger (or, in MQTT 5, a zero) request is answered with
    /// Server Keep Alive set to this. 0: no maximum.
    pub keep_alive_max_secs: u16,
    /// Largest Session Expiry Interval allowed, seconds (MQTT 3.1.1 persistent sessions get it).
    pub session_expiry_max_secs: u32,
    /// QoS 1 and 2 PUBLISHes a client may have unacknowledged towards the server (announced as
    /// Receive Maximum; exceeding it is DISCONNECT 0x93).
    pub receive_maximum: u16,
    /// QoS 1 and 2 PUBLISHes the server has unacknowledged towards a client (also capped by the
    /// client's Receive Maximum).
    pub inflight_max: u16,
    /// Topic aliases a client may use towards the server (announced as Topic Alias Maximum).
    pub topic_alias_max: u16,
    /// Longest client identifier accepted, bytes (the session queue's name must stay under 255).
    pub client_id_len_max_bytes: u16,
    /// Most subscriptions one session holds.
    pub subscriptions_per_session_max: u32,
    /// Most messages queued for one session; further messages for it are dropped (as Mosquitto's
    /// `max_queued_messages` does) and counted.
    pub session_queue_messages_max: u64,
    /// Most retained messages; storing more is refused (PUBACK 0x97 in MQTT 5).
    pub retained_messages_max: u64,
    /// Interval of the `$SYS/broker/...` statistics publications, seconds (0: off).
    pub sys_interval_secs: u32,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            vhost: "/".to_owned(),
            exchange: "amq.topic".to_owned(),
            // 1 MiB more than the largest default core message, so a full-size payload fits with
            // its topic and properties.
            packet_size_max_bytes: 16 * 1024 * 1024 + 64 * 1024,
            connect_timeout_secs: 10,
            keep_alive_max_secs: 3600,
            // Mosquitto keeps persistent sessions forever by default; a week bounds the storage a
            // vanished device can hold, and matches the idempotency window.
            session_expiry_max_secs: 7 * 24 * 3600,
            receive_maximum: 1024,
            inflight_max: 1024,
            topic_alias_max: 64,
            client_id_len_max_bytes: 200,
            subscriptions_per_session_max: 1024,
            session_queue_messages_max: 100_000,
            retained_messages_max: 1_000_000,
            sys_interval_secs: 10,
        }
    }
}

impl MqttConfig {
    /// Refuse inconsistent values, naming the key.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.packet_size_max_bytes < 64 {
            return Err(("mqtt.packet_size_max_bytes", "must be at least 64"));
        }
        if self.receive_maximum == 0 {
            return Err(("mqtt.receive_maximum", "must be at least 1 (MQTT 5 forbids 0)"));
        }
        if self.inflight_max == 0 {
            return Err(("mqtt.inflight_max", "must be at least 1"));
        }
        if self.client_id_len_max_bytes < 23 || self.client_id_len_max_bytes > 200 {
            return Err((
                "mqtt.client_id_len_max_bytes",
                "must be 23 to 200 (MQTT requires 23; queue names stop at 255)",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(("mqtt.connect_timeout_secs", "must be at least 1"));
        }
        Ok(())
    }
}
