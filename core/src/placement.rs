//! Placement: which partition of a queue a message goes to, and which shard holds a partition.
//! Pure functions of stable inputs, so every node computes the same answer. Touches nothing.

use crate::model::QueueId;

/// FNV-1a, 64 bits: stable across Rust versions and platforms (unlike `DefaultHasher`).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A 64-bit mixer (splitmix64's finaliser) spreading consecutive ids over shards.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The partition of a queue with `partitions` partitions for a message with this partition key
/// (or, without one, this routing key).
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "a queue has at least one partition");
    (stable_hash(key.as_bytes()) % u64::from(partitions)) as u32
}

/// The shard holding partition `partition` of `queue`, among `shard_count` shards.
pub fn shard_for(queue: QueueId, partition: u32, shard_count: u32) -> u32 {
    assert!(shard_count > 0, "at least one shard");
    (mix(queue.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(partition)) % u64::from(shard_count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        // Fixed vectors: a change here would move every partition of every existing queue.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn partitions_of_a_queue_spread_over_shards() {
        let shards: std::collections::BTreeSet<u32> = (0..16).map(|p| shard_for(QueueId(42), p, 4)).collect();
        assert_eq!(shards.len(), 4, "16 partitions should reach all 4 shards");
    }

    #[test]
    fn partition_in_range() {
        for key in ["", "a", "orders.eu", "x".repeat(300).as_str()] {
            assert!(partition_for(key, 3) < 3);
        }
    }
}
