//! The native API's messages ↔ the core's message model, and the one table from `CoreError` to
//! gRPC statuses (with a google.rpc.ErrorInfo detail naming the core's error code). Pure
//! translation: no IO, no core calls.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use wharf_core::CoreError;
use wharf_core::model::{DeliveryMode, FieldValue, Headers, Message, Position, Properties, QueueId};
use wharf_core::node::Published;

use crate::proto;

/// The `domain` of every ErrorInfo detail.
pub const ERROR_DOMAIN: &str = "wharf";
/// How long a client should wait before retrying a retryable error (RetryInfo).
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// Deepest nesting of tables and arrays accepted in headers (AMQP clients stop far earlier).
const HEADER_DEPTH_MAX: usize = 32;

/// The gRPC code of a core error.
fn code_of(error: &CoreError) -> Code {
    match error {
        CoreError::NotFound(_) => Code::NotFound,
        CoreError::PreconditionFailed(_) | CoreError::ResourceLocked(_) => Code::FailedPrecondition,
        CoreError::AccessRefused(_) => Code::PermissionDenied,
        CoreError::InvalidArgument(_) => Code::InvalidArgument,
        CoreError::LimitExceeded { .. } | CoreError::Overloaded(_) => Code::ResourceExhausted,
        CoreError::NotLeader { .. } | CoreError::Unavailable(_) => Code::Unavailable,
        CoreError::Storage(_) | CoreError::Internal(_) => Code::Internal,
    }
}

/// A status with the broker's error code, retryability and extra metadata in its details.
pub fn status(code: Code, reason: &'static str, message: String, retryable: bool, extra: &[(&str, String)]) -> Status {
    let mut metadata: HashMap<String, String> = HashMap::new();
    metadata.insert("retryable".into(), retryable.to_string());
    for (key, value) in extra {
        metadata.insert((*key).to_owned(), value.clone());
    }
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    if retryable {
        details.set_retry_info(Some(RETRY_DELAY));
    }
    Status::with_error_details(code, message, details)
}

/// A core error as a gRPC status.
pub fn core_status(error: CoreError) -> Status {
    let extra = match &error {
        CoreError::LimitExceeded { limit, value, max } => {
            vec![("limit", (*limit).to_owned()), ("value", value.to_string()), ("max", max.to_string())]
        }
        CoreError::NotLeader { leader: Some(leader) } => vec![("leader", leader.to_string())],
        _ => Vec::new(),
    };
    status(code_of(&error), error.code(), error.to_string(), error.is_retryable(), &extra)
}

/// A malformed request.
pub fn invalid(message: impl Into<String>) -> Status {
    status(Code::InvalidArgument, "INVALID_ARGUMENT", message.into(), false, &[])
}

/// A request the broker's state refuses (FAILED_PRECONDITION / PRECONDITION_FAILED).
pub fn precondition(message: impl Into<String>) -> Status {
    status(Code::FailedPrecondition, "PRECONDITION_FAILED", message.into(), false, &[])
}

/// A status as an in-band error (PublishBatch results): its broker code (from its ErrorInfo
/// detail, else the gRPC code's name), text and retryability.
pub fn in_band(status: &Status) -> proto::Error {
    let info = status.get_details_error_info();
    proto::Error {
        code: info.as_ref().map_or_else(|| format!("{:?}", status.code()), |info| info.reason.clone()),
        message: status.message().to_owned(),
        retryable: info.is_some_and(|info| info.metadata.get("retryable").is_some_and(|r| r == "true")),
    }
}

/// A core error as an in-band error (PublishBatch results).
pub fn core_error(error: &CoreError) -> proto::Error {
    proto::Error { code: error.code().to_owned(), message: error.to_string(), retryable: error.is_retryable() }
}

/// "" names the default vhost.
pub fn vhost(name: &str) -> &str {
    if name.is_empty() { wharf_core::node::DEFAULT_VHOST } else { name }
}

/// A published message into the core's model; refuses values out of their type's range.
pub fn message_in(message: Option<proto::Message>) -> Result<Message, Status> {
    let message = message.ok_or_else(|| invalid("the message is missing"))?;
    let properties = message.properties.map(properties_in).transpose()?.unwrap_or_default();
    Ok(Message {
        exchange: message.exchange,
        routing_key: message.routing_key,
        properties,
        headers: headers_in(message.headers, 0)?,
        idempotency_key: message.idempotency_key,
        partition_key: message.partition_key,
        delay_ms: message.delay_ms,
        payload: message.payload,
    })
}

/// A core message as delivered.
pub fn message_out(message: &Message) -> proto::Message {
    proto::Message {
        exchange: message.exchange.clone(),
        routing_key: message.routing_key.clone(),
        payload: message.payload.clone(),
        headers: headers_out(&message.headers),
        properties: Some(properties_out(&message.properties)),
        idempotency_key: message.idempotency_key.clone(),
        partition_key: message.partition_key.clone(),
        delay_ms: message.delay_ms,
    }
}

fn properties_in(p: proto::Properties) -> Result<Properties, Status> {
    let priority = p
        .priority
        .map(|priority| u8::try_from(priority).map_err(|_| invalid(format!("priority {priority} is above 255"))))
        .transpose()?;
    let delivery_mode = match proto::DeliveryMode::try_from(p.delivery_mode) {
        Ok(proto::DeliveryMode::Unspecified) => None,
        Ok(proto::DeliveryMode::Transient) => Some(DeliveryMode::Transient),
        Ok(proto::DeliveryMode::Persistent) => Some(DeliveryMode::Persistent),
        Err(_) => return Err(invalid(format!("unknown delivery mode {}", p.delivery_mode))),
    };
    Ok(Properties {
        content_type: p.content_type,
        content_encoding: p.content_encoding,
        correlation_id: p.correlation_id,
        reply_to: p.reply_to,
        expiration_ms: p.expiration_ms,
        priority,
        timestamp_secs: p.timestamp_secs,
        delivery_mode,
        message_id: p.message_id,
        user_id: p.user_id,
        app_id: p.app_id,
        message_type: p.r#type,
        payload_utf8: p.payload_utf8,
    })
}

fn properties_out(p: &Properties) -> proto::Properties {
    let delivery_mode = match p.delivery_mode {
        None => proto::DeliveryMode::Unspecified,
        Some(DeliveryMode::Transient) => proto::DeliveryMode::Transient,
        Some(DeliveryMode::Persistent) => proto::DeliveryMode::Persistent,
    };
    proto::Properties {
        content_type: p.content_type.clone(),
        content_encoding: p.content_encoding.clone(),
        correlation_id: p.correlation_id.clone(),
        reply_to: p.reply_to.clone(),
        expiration_ms: p.expiration_ms,
        priority: p.priority.map(u32::from),
        timestamp_secs: p.timestamp_secs,
        delivery_mode: delivery_mode.into(),
        message_id: p.message_id.clone(),
        user_id: p.user_id.clone(),
        app_id: p.app_id.clone(),
        r#type: p.message_type.clone(),
        payload_utf8: p.payload_utf8,
    }
}

/// Headers (or arguments) into the core's typed headers.
pub fn headers_in(headers: Vec<proto::Header>, depth: usize) -> Result<Headers, Status> {
    if depth > HEADER_DEPTH_MAX {
        return Err(invalid(format!("headers nest deeper than {HEADER_DEPTH_MAX} levels")));
    }
    headers
        .into_iter()
        .map(|header| Ok((header.name, value_in(header.value, depth)?)))
        .collect::<Result<Vec<_>, Status>>()
        .map(Headers)
}

/// The core's typed headers as the API's.
pub fn headers_out(headers: &Headers) -> Vec<proto::Header> {
    headers.iter().map(|(name, value)| proto::Header { name: name.clone(), value: Some(value_out(value)) }).collect()
}

fn value_in(value: Option<proto::Value>, depth: usize) -> Result<FieldValue, Status> {
    use proto::value::Kind;
    fn ranged<T: TryFrom<i64>>(value: i64, name: &str) -> Result<T, Status> {
        T::try_from(value).map_err(|_| invalid(format!("{value} is out of range for a header of type {name}")))
    }
    if depth > HEADER_DEPTH_MAX {
        return Err(invalid(format!("headers nest deeper than {HEADER_DEPTH_MAX} levels")));
    }
    let Some(kind) = value.and_then(|v| v.kind) else { return Ok(FieldValue::Void) };
    Ok(match kind {
        Kind::Bool(v) => FieldValue::Bool(v),
        Kind::Int8(v) => FieldValue::I8(ranged(v.into(), "int8")?),
        Kind::Uint8(v) => FieldValue::U8(ranged(v.into(), "uint8")?),
        Kind::Int16(v) => FieldValue::I16(ranged(v.into(), "int16")?),
        Kind::Uint16(v) => FieldValue::U16(ranged(v.into(), "uint16")?),
        Kind::Int32(v) => FieldValue::I32(v),
        Kind::Uint32(v) => FieldValue::U32(v),
        Kind::Int64(v) => FieldValue::I64(v),
        Kind::Float(v) => FieldValue::F32(v),
        Kind::Double(v) => FieldValue::F64(v),
        Kind::Decimal(d) => FieldValue::Decimal { scale: ranged(d.scale.into(), "decimal scale")?, value: d.value },
        Kind::String(v) => FieldValue::LongString(v),
        Kind::Bytes(v) => FieldValue::Bytes(v),
        Kind::TimestampSecs(v) => FieldValue::Timestamp(v),
        Kind::Table(t) => FieldValue::Table(headers_in(t.entries, depth + 1)?),
        Kind::Array(a) => FieldValue::Array(
            a.values.into_iter().map(|v| value_in(Some(v), depth + 1)).collect::<Result<Vec<_>, Status>>()?,
        ),
        Kind::LongBytes(v) => FieldValue::LongBytes(v),
        Kind::Void(_) => FieldValue::Void,
    })
}

fn value_out(value: &FieldValue) -> proto::Value {
    use proto::value::Kind;
    let kind = match value {
        FieldValue::Bool(v) => Kind::Bool(*v),
        FieldValue::I8(v) => Kind::Int8((*v).into()),
        FieldValue::U8(v) => Kind::Uint8((*v).into()),
        FieldValue::I16(v) => Kind::Int16((*v).into()),
        FieldValue::U16(v) => Kind::Uint16((*v).into()),
        FieldValue::I32(v) => Kind::Int32(*v),
        FieldValue::U32(v) => Kind::Uint32(*v),
        FieldValue::I64(v) => Kind::Int64(*v),
        FieldValue::F32(v) => Kind::Float(*v),
        FieldValue::F64(v) => Kind::Double(*v),
        FieldValue::Decimal { scale, value } => Kind::Decimal(proto::Decimal { scale: (*scale).into(), value: *value }),
        FieldValue::LongString(v) => Kind::String(v.clone()),
        FieldValue::Bytes(v) => Kind::Bytes(v.clone()),
        FieldValue::Timestamp(v) => Kind::TimestampSecs(*v),
        FieldValue::Table(t) => Kind::Table(proto::Table { entries: headers_out(t) }),
        FieldValue::Array(a) => Kind::Array(proto::Array { values: a.iter().map(value_out).collect() }),
        FieldValue::Void => Kind::Void(proto::Void {}),
        FieldValue::LongBytes(v) => Kind::LongBytes(v.clone()),
    };
    proto::Value { kind: Some(kind) }
}

/// A position as the API's.
pub fn position_out(position: Position) -> proto::Position {
    proto::Position { queue_id: position.queue.0, partition: position.partition, offset: position.offset }
}

/// An API position into the core's.
pub fn position_in(position: &proto::Position) -> Position {
    Position { queue: QueueId(position.queue_id), partition: position.partition, offset: position.offset }
}

/// What a publish became.
pub fn published_out(published: &Published) -> proto::PublishReply {
    proto::PublishReply {
        positions: published.positions.iter().copied().map(position_out).collect(),
        duplicates: published.duplicates.iter().copied().map(position_out).collect(),
        duplicate: published.is_duplicate(),
        routed: u32::try_from(published.routed).unwrap_or(u32::MAX),
        rejected_queues: published.rejected.iter().map(|queue| queue.name.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn every_type() -> Headers {
        let mut nested = Headers::new();
        nested.push("inner", FieldValue::LongString("deep".into()));
        Headers(vec![
            ("bool".into(), FieldValue::Bool(true)),
            ("i8".into(), FieldValue::I8(-5)),
            ("u8".into(), FieldValue::U8(250)),
            ("i16".into(), FieldValue::I16(-300)),
            ("u16".into(), FieldValue::U16(65_000)),
            ("i32".into(), FieldValue::I32(-70_000)),
            ("u32".into(), FieldValue::U32(4_000_000_000)),
            ("i64".into(), FieldValue::I64(-1 << 40)),
            ("f32".into(), FieldValue::F32(1.5)),
            ("f64".into(), FieldValue::F64(-2.25)),
            ("decimal".into(), FieldValue::Decimal { scale: 2, value: 12_345 }),
            ("string".into(), FieldValue::LongString("text".into())),
            ("bytes".into(), FieldValue::Bytes(Bytes::from_static(b"\x00\x01"))),
            ("timestamp".into(), FieldValue::Timestamp(1_700_000_000)),
            ("table".into(), FieldValue::Table(nested)),
            ("array".into(), FieldValue::Array(vec![FieldValue::I32(1), FieldValue::Void])),
            ("void".into(), FieldValue::Void),
            ("long bytes".into(), FieldValue::LongBytes(Bytes::from_static(b"\xff\xfe"))),
            ("repeated".into(), FieldValue::LongString("one".into())),
            ("repeated".into(), FieldValue::LongString("two".into())),
        ])
    }

    #[test]
    fn a_message_round_trips_with_every_field_and_header_type() {
        let message = Message {
            exchange: "amq.topic".into(),
            routing_key: "orders.eu".into(),
            properties: Properties {
                content_type: Some("application/json".into()),
                content_encoding: Some("gzip".into()),
                correlation_id: Some(Bytes::from_static(b"\x01corr")),
                reply_to: Some("replies".into()),
                expiration_ms: Some(60_000),
                priority: Some(7),
                timestamp_secs: Some(1_700_000_000),
                delivery_mode: Some(DeliveryMode::Transient),
                message_id: Some("m-1".into()),
                user_id: Some("guest".into()),
                app_id: Some("shop".into()),
                message_type: Some("order".into()),
                payload_utf8: Some(true),
            },
            headers: every_type(),
            idempotency_key: Some("order-17".into()),
            partition_key: Some("customer-3".into()),
            delay_ms: Some(500),
            payload: Bytes::from_static(b"{}"),
        };
        assert_eq!(message_in(Some(message_out(&message))).expect("maps back"), message);
        let bare = Message::new("", "q", "x");
        assert_eq!(message_in(Some(message_out(&bare))).expect("maps back"), bare);
    }

    #[test]
    fn out_of_range_values_and_missing_messages_are_invalid_arguments() {
        let header = |kind| proto::Header { name: "h".into(), value: Some(proto::Value { kind: Some(kind) }) };
        use proto::value::Kind;
        for kind in [Kind::Int8(200), Kind::Uint8(256), Kind::Int16(40_000), Kind::Uint16(70_000)] {
            let message = proto::Message { headers: vec![header(kind)], ..proto::Message::default() };
            assert_eq!(message_in(Some(message)).expect_err("out of range").code(), Code::InvalidArgument);
        }
        let properties = proto::Properties { priority: Some(256), ..proto::Properties::default() };
        let message = proto::Message { properties: Some(properties), ..proto::Message::default() };
        assert_eq!(message_in(Some(message)).expect_err("priority").code(), Code::InvalidArgument);
        assert_eq!(message_in(None).expect_err("missing").code(), Code::InvalidArgument);
        let mut value = proto::Value { kind: Some(Kind::Bool(true)) };
        for _ in 0..=HEADER_DEPTH_MAX + 1 {
            value = proto::Value { kind: Some(Kind::Array(proto::Array { values: vec![value] })) };
        }
        let message = proto::Message {
            headers: vec![proto::Header { name: "deep".into(), value: Some(value) }],
            ..Default::default()
        };
        assert_eq!(message_in(Some(message)).expect_err("too deep").code(), Code::InvalidArgument);
    }

    #[test]
    fn core_errors_become_statuses_with_their_code_and_retryability() {
        let status = core_status(CoreError::NotFound("no queue 'q'".into()));
        assert_eq!(status.code(), Code::NotFound);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "NOT_FOUND");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata.get("retryable").map(String::as_str), Some("false"));
        assert!(status.get_details_retry_info().is_none());

        let status = core_status(CoreError::Overloaded("busy".into()));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.get_details_error_info().expect("info").metadata["retryable"], "true");
        assert!(status.get_details_retry_info().is_some());

        let status = core_status(CoreError::LimitExceeded { limit: "limits.message_size_max_bytes", value: 9, max: 8 });
        let info = status.get_details_error_info().expect("info");
        assert_eq!(info.reason, "LIMIT_EXCEEDED");
        assert_eq!(info.metadata["limit"], "limits.message_size_max_bytes");
    }
}
