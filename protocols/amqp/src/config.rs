//! Settings and limits of the AMQP 0-9-1 front-end, with their defaults and why. Plain data; the
//! `wharf` binary fills it from its configuration layers.

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
    fn small_frame_max_is_refused() {
        let config = AmqpConfig { frame_max_bytes: 1000, ..AmqpConfig::default() };
        assert_eq!(config.validate().map_err(|e| e.0), Err("amqp.frame_max_bytes"));
    }
}
