//! UNSUBSCRIBE (MQTT 3.1.1 section 3.10, MQTT 5.0 section 3.10): `read` and `write`. Client to
//! server only. Touches nothing outside the codec.

use super::decode::Context;
use super::properties::{self, PropertyId, SubscriptionIdentifiers};
use super::publish::read_packet_id;
use super::topic;
use super::wire::{Reader, Sink, protocol, write_with_length};
use super::{DecodeError, ProtocolVersion, Unsubscribe};

const UNSUBSCRIBE_PROPERTIES: &[PropertyId] = &[PropertyId::UserProperty];

pub(crate) fn read(reader: &mut Reader, context: &Context) -> Result<Unsubscribe, DecodeError> {
    let packet_id = read_packet_id(reader, "UNSUBSCRIBE")?;
    let mut unsubscribe = Unsubscribe { packet_id, ..Unsubscribe::default() };
    if context.is_v5() {
        let set = properties::read(reader, "UNSUBSCRIBE", UNSUBSCRIBE_PROPERTIES, SubscriptionIdentifiers::AtMostOne)?;
        unsubscribe.user_properties = set.user_properties;
    }
    while !reader.is_empty() {
        let filter = reader.string("UNSUBSCRIBE topic filter")?;
        // A filter that could never have been subscribed is as malformed here as in SUBSCRIBE.
        if let Err(why) = topic::check_topic_filter(&filter) {
            return Err(DecodeError::TopicFilterInvalid(format!("UNSUBSCRIBE filter {filter:?}: {why}")));
        }
        unsubscribe.filters.push(filter);
    }
    if unsubscribe.filters.is_empty() {
        return Err(protocol("[MQTT-3.10.3-2] UNSUBSCRIBE without a topic filter"));
    }
    Ok(unsubscribe)
}

pub(crate) fn write(unsubscribe: &Unsubscribe, version: ProtocolVersion, sink: &mut dyn Sink) {
    sink.write_u16(unsubscribe.packet_id);
    if version.is_v5() {
        write_with_length(sink, &|sink| properties::write_user_properties(sink, &unsubscribe.user_properties));
    }
    for filter in &unsubscribe.filters {
        sink.write_string(filter);
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::codec::{Packet, decode, encode};

    #[test]
    fn round_trips_in_both_versions() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let unsubscribe = Unsubscribe {
                packet_id: 3,
                user_properties: if version.is_v5() { vec![("a".into(), "b".into())] } else { vec![] },
                filters: vec!["a/#".into(), "$share/g/b".into()],
            };
            let packet = Packet::Unsubscribe(unsubscribe);
            let mut buf = BytesMut::new();
            encode(&packet, version, &mut buf);
            assert_eq!(decode(&mut buf, Some(version), 1024), Ok(Some(packet)));
        }
    }
}
