//! The mapping of AMQP 0-9-1 onto the core's message model: field tables to typed `Headers` and
//! back (generated tables use LongString, never ShortString, which amq-protocol cannot parse back
//! inside a table), basic properties to `Properties`, and the one table from `CoreError` to reply
//! codes. Pure functions; no IO.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use bytes::Bytes;
use wharf_core::CoreError;
use wharf_core::model::{DeliveryMode, FieldValue, Headers, Message, Properties};

use crate::config::IdempotencyKeySource;

/// Header whose string value is the core's idempotency key (when the vhost's
/// `amqp.idempotency_key` says so). Kept in the headers too, so consumers see it.
pub const HEADER_IDEMPOTENCY_KEY: &str = "x-idempotency-key";
/// Header whose string value is the core's partition key (a partitioned queue's partition is its
/// hash, else the routing key's). Kept in the headers too.
pub const HEADER_PARTITION_KEY: &str = "x-partition-key";

/// A reply code and its RabbitMQ name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyCode {
    /// The numeric code.
    pub code: u16,
    /// The AMQP name (`NOT_FOUND`).
    pub name: &'static str,
    /// Whether the error closes the connection (else only the channel).
    pub hard: bool,
}

/// 312, sent with basic.return.
pub const NO_ROUTE: ReplyCode = ReplyCode { code: 312, name: "NO_ROUTE", hard: false };
/// 320.
pub const CONNECTION_FORCED: ReplyCode = ReplyCode { code: 320, name: "CONNECTION_FORCED", hard: true };
/// 403.
pub const ACCESS_REFUSED: ReplyCode = ReplyCode { code: 403, name: "ACCESS_REFUSED", hard: false };
/// 404.
pub const NOT_FOUND: ReplyCode = ReplyCode { code: 404, name: "NOT_FOUND", hard: false };
/// 405.
pub const RESOURCE_LOCKED: ReplyCode = ReplyCode { code: 405, name: "RESOURCE_LOCKED", hard: false };
/// 406.
pub const PRECONDITION_FAILED: ReplyCode = ReplyCode { code: 406, name: "PRECONDITION_FAILED", hard: false };
/// 501.
pub const FRAME_ERROR: ReplyCode = ReplyCode { code: 501, name: "FRAME_ERROR", hard: true };
/// 502.
pub const SYNTAX_ERROR: ReplyCode = ReplyCode { code: 502, name: "SYNTAX_ERROR", hard: true };
/// 503.
pub const COMMAND_INVALID: ReplyCode = ReplyCode { code: 503, name: "COMMAND_INVALID", hard: true };
/// 504.
pub const CHANNEL_ERROR: ReplyCode = ReplyCode { code: 504, name: "CHANNEL_ERROR", hard: true };
/// 505.
pub const UNEXPECTED_FRAME: ReplyCode = ReplyCode { code: 505, name: "UNEXPECTED_FRAME", hard: true };
/// 530.
pub const NOT_ALLOWED: ReplyCode = ReplyCode { code: 530, name: "NOT_ALLOWED", hard: true };
/// 540.
pub const NOT_IMPLEMENTED: ReplyCode = ReplyCode { code: 540, name: "NOT_IMPLEMENTED", hard: true };
/// 541.
pub const INTERNAL_ERROR: ReplyCode = ReplyCode { code: 541, name: "INTERNAL_ERROR", hard: true };

/// An AMQP error: a code and RabbitMQ-style text (`NOT_FOUND - no queue 'q' in vhost '/'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    /// The reply code.
    pub code: ReplyCode,
    /// The reply text, starting with the code's name.
    pub text: String,
}

impl AmqpError {
    /// An error with `detail` after the code's name.
    pub fn new(code: ReplyCode, detail: impl std::fmt::Display) -> Self {
        Self { code, text: format!("{} - {detail}", code.name) }
    }
}

/// The one table from core errors to AMQP reply codes. Retryable errors (not leader, overloaded,
/// unavailable) close the connection with 320 so that clients reconnect; storage failures and
/// bugs are 541.
pub fn core_error(error: &CoreError) -> AmqpError {
    let code = match error {
        CoreError::NotFound(_) => NOT_FOUND,
        CoreError::PreconditionFailed(_) | CoreError::InvalidArgument(_) | CoreError::LimitExceeded { .. } => {
            PRECONDITION_FAILED
        }
        CoreError::AccessRefused(_) => ACCESS_REFUSED,
        CoreError::ResourceLocked(_) => RESOURCE_LOCKED,
        CoreError::NotLeader { .. } | CoreError::Overloaded(_) | CoreError::Unavailable(_) => CONNECTION_FORCED,
        CoreError::Storage(_) | CoreError::Internal(_) => INTERNAL_ERROR,
    };
    let text = error.to_string();
    // The core already writes RabbitMQ's texts for the 40x codes.
    if text.starts_with(code.name) { AmqpError { code, text } } else { AmqpError::new(code, text) }
}

/// A short string from any text, cut at 255 bytes on a character boundary (amq-protocol's
/// `From<&str>` panics above 255).
pub fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&text[..end])
}

/// A client's field table as typed headers (keys in the table's order, which is sorted).
pub fn headers_from_table(table: &FieldTable) -> Headers {
    Headers(table.inner().iter().map(|(key, value)| (key.as_str().to_owned(), field_from_amqp(value))).collect())
}

fn field_from_amqp(value: &AMQPValue) -> FieldValue {
    match value {
        AMQPValue::Boolean(v) => FieldValue::Bool(*v),
        AMQPValue::ShortShortInt(v) => FieldValue::I8(*v),
        AMQPValue::ShortShortUInt(v) => FieldValue::U8(*v),
        AMQPValue::ShortInt(v) => FieldValue::I16(*v),
        AMQPValue::ShortUInt(v) => FieldValue::U16(*v),
        AMQPValue::LongInt(v) => FieldValue::I32(*v),
        AMQPValue::LongUInt(v) => FieldValue::U32(*v),
        AMQPValue::LongLongInt(v) => FieldValue::I64(*v),
        AMQPValue::Float(v) => FieldValue::F32(*v),
        AMQPValue::Double(v) => FieldValue::F64(*v),
        AMQPValue::DecimalValue(v) => FieldValue::Decimal { scale: v.scale, value: v.value },
        AMQPValue::ShortString(v) => FieldValue::LongString(v.as_str().to_owned()),
        AMQPValue::LongString(v) => match std::str::from_utf8(v.as_bytes()) {
            Ok(text) => FieldValue::LongString(text.to_owned()),
            // Not text: kept byte for byte.
            Err(_) => FieldValue::LongBytes(Bytes::copy_from_slice(v.as_bytes())),
        },
        AMQPValue::FieldArray(v) => FieldValue::Array(v.as_slice().iter().map(field_from_amqp).collect()),
        AMQPValue::Timestamp(v) => FieldValue::Timestamp(*v),
        AMQPValue::FieldTable(v) => FieldValue::Table(headers_from_table(v)),
        AMQPValue::ByteArray(v) => FieldValue::Bytes(Bytes::copy_from_slice(v.as_slice())),
        AMQPValue::Void => FieldValue::Void,
    }
}

/// Typed headers as a field table. A repeated name keeps its first value (tables are maps).
pub fn table_from_headers(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in headers.iter() {
        if !table.contains_key(key) {
            table.insert(short(key), field_to_amqp(value));
        }
    }
    table
}

fn field_to_amqp(value: &FieldValue) -> AMQPValue {
    match value {
        FieldValue::Bool(v) => AMQPValue::Boolean(*v),
        FieldValue::I8(v) => AMQPValue::ShortShortInt(*v),
        FieldValue::U8(v) => AMQPValue::ShortShortUInt(*v),
        FieldValue::I16(v) => AMQPValue::ShortInt(*v),
        FieldValue::U16(v) => AMQPValue::ShortUInt(*v),
        FieldValue::I32(v) => AMQPValue::LongInt(*v),
        FieldValue::U32(v) => AMQPValue::LongUInt(*v),
        FieldValue::I64(v) => AMQPValue::LongLongInt(*v),
        FieldValue::F32(v) => AMQPValue::Float(*v),
        FieldValue::F64(v) => AMQPValue::Double(*v),
        FieldValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue { scale: *scale, value: *value }),
        FieldValue::LongString(v) => AMQPValue::LongString(LongString::from(v.as_str())),
        FieldValue::Bytes(v) => AMQPValue::ByteArray(v.to_vec().into()),
        FieldValue::LongBytes(v) => AMQPValue::LongString(LongString::from(v.to_vec())),
        FieldValue::Timestamp(v) => AMQPValue::Timestamp(*v),
        FieldValue::Table(v) => AMQPValue::FieldTable(table_from_headers(v)),
        FieldValue::Array(v) => {
            AMQPValue::FieldArray(FieldArray::from(v.iter().map(field_to_amqp).collect::<Vec<_>>()))
        }
        FieldValue::Void => AMQPValue::Void,
    }
}

/// A published message from basic.publish and its content. `user` is the authenticated user: a
/// `user-id` property naming someone else is refused, as RabbitMQ does. `key_source` says where
/// the idempotency key comes from; the partition key is the `x-partition-key` header.
pub fn message_from_publish(
    exchange: &str,
    routing_key: &str,
    properties: &AMQPProperties,
    body: Vec<u8>,
    user: &str,
    key_source: IdempotencyKeySource,
) -> Result<Message, AmqpError> {
    let text = |value: &Option<ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    let expiration_ms =
        match properties.expiration() {
            None => None,
            Some(value) => Some(value.as_str().parse::<u64>().map_err(|_| {
                AmqpError::new(PRECONDITION_FAILED, format!("invalid expiration '{}'", value.as_str()))
            })?),
        };
    if let Some(user_id) = properties.user_id()
        && user_id.as_str() != user
    {
        return Err(AmqpError::new(
            PRECONDITION_FAILED,
            format!("user_id property set to '{}' but authenticated user was '{user}'", user_id.as_str()),
        ));
    }
    let delivery_mode = properties.delivery_mode().map(|mode| match mode {
        2 => DeliveryMode::Persistent,
        _ => DeliveryMode::Transient,
    });
    let props = Properties {
        content_type: text(properties.content_type()),
        content_encoding: text(properties.content_encoding()),
        correlation_id: properties.correlation_id().as_ref().map(|v| Bytes::copy_from_slice(v.as_str().as_bytes())),
        reply_to: text(properties.reply_to()),
        expiration_ms,
        priority: *properties.priority(),
        timestamp_secs: *properties.timestamp(),
        delivery_mode,
        message_id: text(properties.message_id()),
        user_id: text(properties.user_id()),
        app_id: text(properties.app_id()),
        message_type: text(properties.kind()),
        payload_utf8: None,
    };
    let headers = properties.headers().as_ref().map(headers_from_table).unwrap_or_default();
    let header_key = header_string(&headers, HEADER_IDEMPOTENCY_KEY)?;
    let idempotency_key = match key_source {
        IdempotencyKeySource::Header => header_key,
        IdempotencyKeySource::MessageId => props.message_id.clone(),
        IdempotencyKeySource::HeaderOrMessageId => header_key.or_else(|| props.message_id.clone()),
        IdempotencyKeySource::None => None,
    };
    let partition_key = header_string(&headers, HEADER_PARTITION_KEY)?;
    let mut message = Message::new(exchange, routing_key, body);
    message.properties = props;
    message.headers = headers;
    message.idempotency_key = idempotency_key.filter(|key| !key.is_empty());
    message.partition_key = partition_key;
    Ok(message)
}

/// A header that must be a string when present (406 otherwise: a key of another type is a
/// mistake the publisher must hear about, not a silently ignored header).
fn header_string(headers: &Headers, name: &str) -> Result<Option<String>, AmqpError> {
    match headers.get(name) {
        None => Ok(None),
        Some(FieldValue::LongString(value)) => Ok(Some(value.clone())),
        Some(_) => Err(AmqpError::new(PRECONDITION_FAILED, format!("header '{name}' must be a string"))),
    }
}

/// The basic properties of a message being delivered.
pub fn properties_of(message: &Message) -> AMQPProperties {
    let p = &message.properties;
    let mut out = AMQPProperties::default();
    if let Some(v) = &p.content_type {
        out = out.with_content_type(short(v));
    }
    if let Some(v) = &p.content_encoding {
        out = out.with_content_encoding(short(v));
    }
    if !message.headers.is_empty() {
        out = out.with_headers(table_from_headers(&message.headers));
    }
    if let Some(v) = p.delivery_mode {
        out = out.with_delivery_mode(match v {
            DeliveryMode::Persistent => 2,
            DeliveryMode::Transient => 1,
        });
    }
    if let Some(v) = p.priority {
        out = out.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        out = out.with_correlation_id(short(&String::from_utf8_lossy(v)));
    }
    if let Some(v) = &p.reply_to {
        out = out.with_reply_to(short(v));
    }
    if let Some(v) = p.expiration_ms {
        out = out.with_expiration(short(&v.to_string()));
    }
    if let Some(v) = &p.message_id {
        out = out.with_message_id(short(v));
    }
    if let Some(v) = p.timestamp_secs {
        out = out.with_timestamp(v);
    }
    if let Some(v) = &p.message_type {
        out = out.with_type(short(v));
    }
    if let Some(v) = &p.user_id {
        out = out.with_user_id(short(v));
    }
    if let Some(v) = &p.app_id {
        out = out.with_app_id(short(v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_type_round_trips_and_short_strings_become_long() {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongLongInt(-5));
        let mut table = FieldTable::default();
        table.insert("a".into(), AMQPValue::Boolean(true));
        table.insert("b".into(), AMQPValue::ShortShortInt(-1));
        table.insert("c".into(), AMQPValue::ShortShortUInt(1));
        table.insert("d".into(), AMQPValue::ShortInt(-2));
        table.insert("e".into(), AMQPValue::ShortUInt(2));
        table.insert("f".into(), AMQPValue::LongInt(-3));
        table.insert("g".into(), AMQPValue::LongUInt(3));
        table.insert("h".into(), AMQPValue::Float(1.5));
        table.insert("i".into(), AMQPValue::Double(2.5));
        table.insert("j".into(), AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 314 }));
        table.insert("k".into(), AMQPValue::LongString("text".into()));
        table.insert("l".into(), AMQPValue::FieldArray(vec![AMQPValue::Void].into()));
        table.insert("m".into(), AMQPValue::Timestamp(7));
        table.insert("n".into(), AMQPValue::FieldTable(inner));
        table.insert("o".into(), AMQPValue::ByteArray(vec![0, 255].into()));
        table.insert("p".into(), AMQPValue::Void);
        table.insert("q".into(), AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])));
        let headers = headers_from_table(&table);
        assert_eq!(table_from_headers(&headers), table);
        let mut with_short = FieldTable::default();
        with_short.insert("s".into(), AMQPValue::ShortString("x".into()));
        let back = table_from_headers(&headers_from_table(&with_short));
        assert_eq!(back.inner().get("s"), Some(&AMQPValue::LongString("x".into())));
    }

    #[test]
    fn properties_round_trip() {
        let properties = AMQPProperties::default()
            .with_content_type("text/plain".into())
            .with_delivery_mode(2)
            .with_priority(3)
            .with_expiration("1000".into())
            .with_message_id("id".into())
            .with_timestamp(99)
            .with_type("t".into());
        let message =
            message_from_publish("x", "k", &properties, b"hi".to_vec(), "guest", IdempotencyKeySource::Header)
                .expect("map");
        assert_eq!(message.properties.expiration_ms, Some(1000));
        assert_eq!(properties_of(&message), properties);
    }

    #[test]
    fn bad_expiration_and_foreign_user_id_are_refused() {
        let bad = AMQPProperties::default().with_expiration("soon".into());
        assert_eq!(
            message_from_publish("", "q", &bad, vec![], "guest", IdempotencyKeySource::Header).map_err(|e| e.code.code),
            Err(406)
        );
        let other = AMQPProperties::default().with_user_id("bob".into());
        assert_eq!(
            message_from_publish("", "q", &other, vec![], "guest", IdempotencyKeySource::Header)
                .map_err(|e| e.code.code),
            Err(406)
        );
    }

    #[test]
    fn idempotency_and_partition_keys_follow_the_configured_source() {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_IDEMPOTENCY_KEY.into(), AMQPValue::LongString("k-header".into()));
        headers.insert(HEADER_PARTITION_KEY.into(), AMQPValue::LongString("customer-7".into()));
        let both = AMQPProperties::default().with_message_id("k-id".into()).with_headers(headers);
        let only_id = AMQPProperties::default().with_message_id("k-id".into());
        let key = |properties: &AMQPProperties, source| {
            message_from_publish("", "q", properties, vec![], "guest", source).expect("map").idempotency_key
        };
        assert_eq!(key(&both, IdempotencyKeySource::Header).as_deref(), Some("k-header"));
        assert_eq!(key(&only_id, IdempotencyKeySource::Header), None);
        assert_eq!(key(&both, IdempotencyKeySource::MessageId).as_deref(), Some("k-id"));
        assert_eq!(key(&both, IdempotencyKeySource::HeaderOrMessageId).as_deref(), Some("k-header"));
        assert_eq!(key(&only_id, IdempotencyKeySource::HeaderOrMessageId).as_deref(), Some("k-id"));
        assert_eq!(key(&both, IdempotencyKeySource::None), None);
        let message = message_from_publish("", "q", &both, vec![], "guest", IdempotencyKeySource::None).expect("map");
        assert_eq!(message.partition_key.as_deref(), Some("customer-7"));
        // Both headers stay in the message, so a consumer sees what was published.
        assert!(message.headers.get(HEADER_IDEMPOTENCY_KEY).is_some());
        let mut bad = FieldTable::default();
        bad.insert(HEADER_PARTITION_KEY.into(), AMQPValue::LongInt(7));
        let bad = AMQPProperties::default().with_headers(bad);
        let refused = message_from_publish("", "q", &bad, vec![], "guest", IdempotencyKeySource::Header);
        assert_eq!(refused.map_err(|e| e.code.code), Err(406));
    }

    #[test]
    fn core_errors_map_to_codes_with_rabbitmq_texts() {
        let error = core_error(&CoreError::NotFound("no queue 'q' in vhost '/'".into()));
        assert_eq!((error.code.code, error.text.as_str()), (404, "NOT_FOUND - no queue 'q' in vhost '/'"));
        let error = core_error(&CoreError::InvalidArgument("bad".into()));
        assert_eq!(error.code.code, 406);
        assert!(error.text.starts_with("PRECONDITION_FAILED - "));
        assert!(core_error(&CoreError::Internal("x".into())).code.hard);
    }

    #[test]
    fn short_cuts_on_char_boundary() {
        let long = "é".repeat(200);
        assert!(short(&long).as_str().len() <= 255);
    }
}
