//! Settings and limits of the AMQP 0-9-1 front-end, with their defaults and why. Plain data; the
//! `wharf` binary fills it from its configuration layers.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Smallest frame_max AMQP 0-9-1 allows (`frame-min-size`).
pub const FRAME_MIN_SIZE_BYTES: u32 = 4096;

/// How the AMQP front-end behaves and what it allows. Every limit has its unit last.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Largest frame accepted or sent, bytes, header and frame-end included (offered in
    /// connection.tune; a larger frame is connection.close 501). Checked from the 7-byte frame
    /// header, before the frame body is buffered.
    pub frame_max_bytes: u32,
    /// Highest channel number a connection may open (offered in connection.tune).
    pub channel_max: u16,
    /// Heartbeat interval offered in connection.tune, seconds (0: none).
    pub heartbeat_secs: u16,
    /// Time a new connection has to send its protocol header and complete the handshake
    /// (start-ok, tune-ok, open), seconds.
    pub connect_timeout_secs: u32,
    /// The one user accepted (RabbitMQ's default user).
    pub default_user: String,
    /// Its password.
    pub default_pass: String,
    /// Where a publish's idempotency key comes from, in vhosts not named in
    /// `idempotency_key_by_vhost`.
    pub idempotency_key: IdempotencyKeySource,
    /// The same choice for named vhosts.
    pub idempotency_key_by_vhost: BTreeMap<String, IdempotencyKeySource>,
}

/// Which part of a published message is the core's idempotency key (a repeat of a key within the
/// destination queue's window is confirmed, not stored again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdempotencyKeySource {
    /// The header `x-idempotency-key` (a string). The default: a publisher asks for deduplication
    /// explicitly, so applications that reuse `message-id` values for distinct messages (an order
    /// id on every event of an order, say) never lose a message to deduplication.
    #[default]
    Header,
    /// The `message-id` property, for applications that set a unique id per logical message (as
    /// many RabbitMQ clients and frameworks do): their retries become idempotent unchanged.
    MessageId,
    /// The header when present, else `message-id`.
    HeaderOrMessageId,
    /// No deduplication.
    None,
}

impl IdempotencyKeySource {
    /// The setting's name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::MessageId => "message-id",
            Self::HeaderOrMessageId => "header-or-message-id",
            Self::None => "none",
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            // RabbitMQ's defaults, so clients tuned for it behave the same.
            frame_max_bytes: 131_072,
            channel_max: 2047,
            heartbeat_secs: 60,
            connect_timeout_secs: 10,
            default_user: "guest".to_owned(),
            default_pass: "guest".to_owned(),
            idempotency_key: IdempotencyKeySource::Header,
            idempotency_key_by_vhost: BTreeMap::new(),
        }
    }
}

impl AmqpConfig {
    /// Refuse inconsistent values, naming the key.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.frame_max_bytes < FRAME_MIN_SIZE_BYTES {
            return Err(("amqp.frame_max_bytes", "must be at least 4096 (AMQP frame-min-size)"));
        }
        if self.channel_max == 0 {
            return Err(("amqp.channel_max", "must be at least 1"));
        }
        if self.connect_timeout_secs == 0 {
            return Err(("amqp.connect_timeout_secs", "must be at least 1"));
        }
        if self.default_user.is_empty() {
            return Err(("amqp.default_user", "must not be empty"));
        }
        Ok(())
    }

    /// Where the idempotency key of a publish in `vhost` comes from.
    pub fn idempotency_key_in(&self, vhost: &str) -> IdempotencyKeySource {
        self.idempotency_key_by_vhost.get(vhost).copied().unwrap_or(self.idempotency_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_rabbitmq_like() {
        let config = AmqpConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.frame_max_bytes, 131_072);
        assert_eq!(config.channel_max, 2047);
    }

    #[test]
    fn idempotency_key_source_is_per_vhost_with_a_default() {
        let mut config = AmqpConfig::default();
        assert_eq!(config.idempotency_key_in("/"), IdempotencyKeySource::Header);
        config.idempotency_key_by_vhost.insert("payments".into(), IdempotencyKeySource::MessageId);
        assert_eq!(config.idempotency_key_in("payments"), IdempotencyKeySource::MessageId);
        assert_eq!(config.idempotency_key_in("/"), IdempotencyKeySource::Header);
    }

    #[test]
    fn small_frame_max_is_refused() {
        let config = AmqpConfig { frame_max_bytes: 1000, ..AmqpConfig::default() };
        assert_eq!(config.validate().map_err(|e| e.0), Err("amqp.frame_max_bytes"));
    }
}
