//! Parsing and validation of declare arguments: queue `x-` arguments into [`QueueArgs`] and exchange
//! arguments into [`ExchangeArgs`], with RabbitMQ's argument names, checks and error texts, plus the
//! equivalence check a redeclare makes. Pure functions over `crate::model`, `crate::config` and
//! `crate::error`; touches nothing else.
//!
//! Unknown `x-` arguments are kept in the raw table by the caller and ignored here, as RabbitMQ does.
//! Integer arguments accept any integer width, again as RabbitMQ does.

use crate::config::Limits;
use crate::error::{CoreError, CoreResult};
use crate::model::{FieldValue, Headers, Overflow, QueueArgs};

/// Parsed exchange arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeArgs {
    /// `alternate-exchange`: where messages this exchange cannot route go.
    pub alternate_exchange: Option<String>,
}

/// Parse and validate an exchange's arguments. Only `alternate-exchange` means anything; it must be a
/// string.
pub fn parse_exchange_args(vhost: &str, exchange: &str, arguments: &Headers) -> CoreResult<ExchangeArgs> {
    let alternate_exchange = match arguments.get("alternate-exchange") {
        None => None,
        Some(FieldValue::LongString(name)) => Some(name.clone()),
        Some(other) => {
            return Err(CoreError::PreconditionFailed(format!(
                "invalid arg 'alternate-exchange' for exchange '{exchange}' in vhost '{vhost}': {{unacceptable_type,{}}}",
                type_name(other)
            )));
        }
    };
    Ok(ExchangeArgs { alternate_exchange })
}

/// Parse and validate a queue's `x-` arguments. Errors are `PreconditionFailed` in RabbitMQ's form
/// ("invalid arg 'x-max-length' for queue 'q' in vhost '/': {value_negative,-1}"), except a partition
/// count above `limits.partitions_per_queue_max`, which is `LimitExceeded`.
pub fn parse_queue_args(vhost: &str, queue: &str, arguments: &Headers, limits: &Limits) -> CoreResult<QueueArgs> {
    let invalid = |name: &str, reason: String| {
        CoreError::PreconditionFailed(format!("invalid arg '{name}' for queue '{queue}' in vhost '{vhost}': {reason}"))
    };
    // An integer argument, checked against a lower bound: 0 for non-negative, 1 for positive.
    let integer = |name: &'static str, min: i64| -> CoreResult<Option<u64>> {
        let Some(value) = arguments.get(name) else { return Ok(None) };
        let Some(number) = value.as_i64() else {
            return Err(invalid(name, format!("{{unacceptable_type,{}}}", type_name(value))));
        };
        if number < 0 {
            return Err(invalid(name, format!("{{value_negative,{number}}}")));
        }
        if number < min {
            return Err(invalid(name, format!("{{value_zero,{number}}}")));
        }
        Ok(Some(number.unsigned_abs()))
    };
    let string = |name: &'static str| -> CoreResult<Option<&str>> {
        match arguments.get(name) {
            None => Ok(None),
            Some(FieldValue::LongString(value)) => Ok(Some(value)),
            Some(other) => Err(invalid(name, format!("{{unacceptable_type,{}}}", type_name(other)))),
        }
    };

    let overflow = match string("x-overflow")? {
        None | Some("drop-head") => Overflow::DropHead,
        Some("reject-publish") => Overflow::RejectPublish,
        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
        Some(_) => return Err(invalid("x-overflow", "invalid_overflow".to_owned())),
    };
    let dead_letter_exchange = string("x-dead-letter-exchange")?.map(str::to_owned);
    let dead_letter_routing_key = string("x-dead-letter-routing-key")?.map(str::to_owned);
    if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
        return Err(invalid("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined".to_owned()));
    }
    // 0 is allowed, as in RabbitMQ: a queue without priorities.
    let priority_max = match integer("x-max-priority", 0)? {
        None | Some(0) => None,
        Some(value) => match u8::try_from(value) {
            Ok(value) => Some(value),
            Err(_) => return Err(invalid("x-max-priority", format!("{{max_value_exceeded,{value}}}"))),
        },
    };
    let single_active_consumer = match arguments.get("x-single-active-consumer") {
        None => false,
        Some(FieldValue::Bool(value)) => *value,
        Some(other) => {
            return Err(invalid("x-single-active-consumer", format!("{{unacceptable_type,{}}}", type_name(other))));
        }
    };
    let delivery_limit = match integer("x-delivery-limit", 0)? {
        None => None,
        Some(value) => match u32::try_from(value) {
            Ok(value) => Some(value),
            Err(_) => return Err(invalid("x-delivery-limit", format!("{{value_too_large,{value}}}"))),
        },
    };
    // Wharf treats every queue alike (replicated, partitioned logs): the RabbitMQ types a client may
    // ask for are accepted so that it works unchanged; others (streams) are refused, not faked.
    match string("x-queue-type")? {
        None | Some("classic" | "quorum") => {}
        Some(other) => return Err(invalid("x-queue-type", format!("unsupported queue type '{other}'"))),
    }
    let partitions = match integer("x-partitions", 1)? {
        None => 1,
        Some(value) if value > u64::from(limits.partitions_per_queue_max) => {
            return Err(CoreError::LimitExceeded {
                limit: "limits.partitions_per_queue_max",
                value,
                max: limits.partitions_per_queue_max.into(),
            });
        }
        // Fits: at most partitions_per_queue_max, a u32.
        Some(value) => u32::try_from(value).unwrap_or(limits.partitions_per_queue_max),
    };

    Ok(QueueArgs {
        message_ttl_ms: integer("x-message-ttl", 0)?,
        expires_ms: integer("x-expires", 1)?,
        length_max: integer("x-max-length", 0)?,
        bytes_max: integer("x-max-length-bytes", 0)?,
        overflow,
        dead_letter_exchange,
        dead_letter_routing_key,
        priority_max,
        single_active_consumer,
        delivery_limit,
        partitions,
        idempotency_window_ms: integer("x-idempotency-window-ms", 1)?,
    })
}

/// The first argument in which a redeclare's parsed arguments differ from the queue's, as
/// `(argument name, received, current)`, rendered for the error text. Parsed values are compared, so
/// `x-max-length` sent as a 32-bit integer once and a 64-bit one later is the same argument, and an
/// absent `x-overflow` equals an explicit `drop-head`.
pub fn queue_args_difference(received: &QueueArgs, current: &QueueArgs) -> Option<&'static str> {
    render_queue_args(received)
        .into_iter()
        .zip(render_queue_args(current))
        .find(|((_, received), (_, current))| received != current)
        .map(|((name, _), _)| name)
}

/// Each argument's rendering, `none` when absent, in a fixed order (the order errors report them in).
fn render_queue_args(args: &QueueArgs) -> [(&'static str, String); 12] {
    fn number(value: Option<impl std::fmt::Display>) -> String {
        value.map_or_else(|| "none".to_owned(), |value| format!("'{value}'"))
    }
    fn text(value: Option<&String>) -> String {
        value.map_or_else(|| "none".to_owned(), |value| format!("'{value}'"))
    }
    [
        ("x-message-ttl", number(args.message_ttl_ms)),
        ("x-expires", number(args.expires_ms)),
        ("x-max-length", number(args.length_max)),
        ("x-max-length-bytes", number(args.bytes_max)),
        ("x-overflow", format!("'{}'", overflow_name(args.overflow))),
        ("x-dead-letter-exchange", text(args.dead_letter_exchange.as_ref())),
        ("x-dead-letter-routing-key", text(args.dead_letter_routing_key.as_ref())),
        ("x-max-priority", number(args.priority_max)),
        ("x-single-active-consumer", format!("'{}'", args.single_active_consumer)),
        ("x-delivery-limit", number(args.delivery_limit)),
        ("x-partitions", format!("'{}'", args.partitions)),
        ("x-idempotency-window-ms", number(args.idempotency_window_ms)),
    ]
}

/// An argument's value as RabbitMQ's equivalence errors write it (`rabbit_misc:val/1`): `none`
/// when absent, else `the value '10' of type 'signedint'`.
pub fn described(arguments: &Headers, name: &str) -> String {
    let Some(value) = arguments.get(name) else { return "none".to_owned() };
    let shown = match value {
        FieldValue::LongString(text) => text.clone(),
        FieldValue::Bool(flag) => flag.to_string(),
        FieldValue::F32(number) => number.to_string(),
        FieldValue::F64(number) => number.to_string(),
        other => match other.as_i64() {
            Some(number) => number.to_string(),
            None => format!("{other:?}"),
        },
    };
    format!("the value '{shown}' of type '{}'", type_name(value))
}

/// RabbitMQ's name for an overflow mode.
pub fn overflow_name(overflow: Overflow) -> &'static str {
    match overflow {
        Overflow::DropHead => "drop-head",
        Overflow::RejectPublish => "reject-publish",
        Overflow::RejectPublishDlx => "reject-publish-dlx",
    }
}

/// The AMQP field type name RabbitMQ reports for a value in argument errors.
pub fn type_name(value: &FieldValue) -> &'static str {
    match value {
        FieldValue::Bool(_) => "bool",
        FieldValue::I8(_) => "byte",
        FieldValue::U8(_) => "unsignedbyte",
        FieldValue::I16(_) => "short",
        FieldValue::U16(_) => "unsignedshort",
        FieldValue::I32(_) => "signedint",
        FieldValue::U32(_) => "unsignedint",
        FieldValue::I64(_) => "long",
        FieldValue::F32(_) => "float",
        FieldValue::F64(_) => "double",
        FieldValue::Decimal { .. } => "decimal",
        FieldValue::LongString(_) | FieldValue::LongBytes(_) => "longstr",
        FieldValue::Bytes(_) => "binary",
        FieldValue::Timestamp(_) => "timestamp",
        FieldValue::Table(_) => "table",
        FieldValue::Array(_) => "array",
        FieldValue::Void => "void",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: Vec<(&str, FieldValue)>) -> CoreResult<QueueArgs> {
        let arguments = Headers(entries.into_iter().map(|(name, value)| (name.to_owned(), value)).collect());
        parse_queue_args("/", "q", &arguments, &Limits::default())
    }

    fn text(value: &str) -> FieldValue {
        FieldValue::LongString(value.to_owned())
    }

    fn refused(entries: Vec<(&str, FieldValue)>) -> String {
        match parse(entries) {
            Err(CoreError::PreconditionFailed(text)) => text,
            other => panic!("expected PreconditionFailed, got {other:?}"),
        }
    }

    #[test]
    fn defaults_without_arguments() {
        assert_eq!(parse(vec![]), Ok(QueueArgs::default()));
    }

    #[test]
    fn every_argument_parses() {
        let args = parse(vec![
            ("x-message-ttl", FieldValue::I32(0)),
            ("x-expires", FieldValue::U16(1000)),
            ("x-max-length", FieldValue::I64(10)),
            ("x-max-length-bytes", FieldValue::U32(4096)),
            ("x-overflow", text("reject-publish-dlx")),
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("dead")),
            ("x-max-priority", FieldValue::U8(10)),
            ("x-single-active-consumer", FieldValue::Bool(true)),
            ("x-delivery-limit", FieldValue::I16(3)),
            ("x-queue-type", text("quorum")),
            ("x-partitions", FieldValue::I8(4)),
            ("x-idempotency-window-ms", FieldValue::I64(60_000)),
            ("x-unknown-thing", text("kept, ignored")),
        ])
        .expect("valid");
        assert_eq!(
            args,
            QueueArgs {
                message_ttl_ms: Some(0),
                expires_ms: Some(1000),
                length_max: Some(10),
                bytes_max: Some(4096),
                overflow: Overflow::RejectPublishDlx,
                dead_letter_exchange: Some("dlx".into()),
                dead_letter_routing_key: Some("dead".into()),
                priority_max: Some(10),
                single_active_consumer: true,
                delivery_limit: Some(3),
                partitions: 4,
                idempotency_window_ms: Some(60_000),
            }
        );
    }

    #[test]
    fn invalid_values_are_refused_like_rabbitmq() {
        assert_eq!(
            refused(vec![("x-max-length", FieldValue::I32(-1))]),
            "invalid arg 'x-max-length' for queue 'q' in vhost '/': {value_negative,-1}"
        );
        assert_eq!(
            refused(vec![("x-message-ttl", text("1000"))]),
            "invalid arg 'x-message-ttl' for queue 'q' in vhost '/': {unacceptable_type,longstr}"
        );
        assert!(refused(vec![("x-expires", FieldValue::I32(0))]).contains("{value_zero,0}"));
        assert!(refused(vec![("x-overflow", text("drop-tail"))]).contains("'x-overflow'"));
        assert!(refused(vec![("x-dead-letter-routing-key", text("k"))]).contains("routing_key_but_no_dlx_defined"));
        assert!(refused(vec![("x-max-priority", FieldValue::I32(256))]).contains("max_value_exceeded"));
        assert!(refused(vec![("x-max-priority", FieldValue::I32(-1))]).contains("value_negative"));
        assert!(refused(vec![("x-overflow", "drop-tail".into())]).ends_with(": invalid_overflow"));
        assert!(refused(vec![("x-queue-type", "stream".into())]).ends_with(": unsupported queue type 'stream'"));
        assert!(
            refused(vec![("x-single-active-consumer", FieldValue::I32(1))]).contains("unacceptable_type,signedint")
        );
        assert!(refused(vec![("x-delivery-limit", FieldValue::I64(1 << 40))]).contains("value_too_large"));
        assert!(refused(vec![("x-queue-type", text("stream"))]).contains("'x-queue-type'"));
        assert!(refused(vec![("x-partitions", FieldValue::I32(0))]).contains("'x-partitions'"));
        assert!(refused(vec![("x-max-length", FieldValue::F64(1.0))]).contains("unacceptable_type,double"));
    }

    #[test]
    fn partitions_above_the_limit_is_a_limit_error() {
        assert_eq!(
            parse(vec![("x-partitions", FieldValue::I32(257))]),
            Err(CoreError::LimitExceeded { limit: "limits.partitions_per_queue_max", value: 257, max: 256 })
        );
        assert_eq!(parse(vec![("x-partitions", FieldValue::I32(256))]).map(|args| args.partitions), Ok(256));
    }

    #[test]
    fn differences_are_found_by_parsed_value() {
        let narrow = parse(vec![("x-max-length", FieldValue::I16(10))]).expect("valid");
        let wide = parse(vec![("x-max-length", FieldValue::I64(10))]).expect("valid");
        assert_eq!(queue_args_difference(&narrow, &wide), None);
        let explicit = parse(vec![("x-overflow", text("drop-head"))]).expect("valid");
        assert_eq!(queue_args_difference(&explicit, &QueueArgs::default()), None);
        assert_eq!(queue_args_difference(&narrow, &QueueArgs::default()), Some("x-max-length"));
    }

    #[test]
    fn exchange_arguments() {
        let mut arguments = Headers::new();
        assert_eq!(parse_exchange_args("/", "x", &arguments), Ok(ExchangeArgs::default()));
        arguments.push("alternate-exchange", "ae");
        assert_eq!(parse_exchange_args("/", "x", &arguments).map(|a| a.alternate_exchange), Ok(Some("ae".to_owned())));
        let arguments = Headers(vec![("alternate-exchange".to_owned(), FieldValue::I32(1))]);
        assert!(matches!(parse_exchange_args("/", "x", &arguments), Err(CoreError::PreconditionFailed(_))));
    }
}
