//! The `decode` fuzz target's body, run on stable: over every file of the committed seed corpus
//! (`fuzz/corpus/decode/`), and over random mutations of the seeds (proptest), so CI exercises the
//! fuzz checks without nightly. Also generates the seed corpus: the valid seeds are the encoded
//! samples of `codec_samples.rs`, one file per packet kind, side and version, plus hand-made
//! malformed ones. Reads (and, in the ignored generator test, writes) only that directory.

#[path = "codec_samples.rs"]
mod samples;

#[path = "../fuzz/common/decode_body.rs"]
mod decode_body;

use std::collections::BTreeSet;
use std::path::PathBuf;

use bytes::BytesMut;
use proptest::prelude::*;
use wharf_mqtt::codec::{ProtocolVersion, encode};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode")
}

/// Hand-made malformed inputs, each breaking one rule (and a valid stream of several packets).
const MALFORMED: &[(&str, &[u8])] = &[
    ("malformed_packet_type_0", &[0x00, 0x00]),
    ("malformed_remaining_length_5_bytes", &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
    ("malformed_subscribe_flags", &[0x80, 6, 0, 1, 0, 1, b'a', 0]),
    ("malformed_publish_qos_3", &[0x36, 5, 0, 1, b'a', 0, 1]),
    ("malformed_publish_dup_qos_0", &[0x38, 3, 0, 1, b'a']),
    ("malformed_publish_wildcard_topic", &[0x30, 5, 0, 3, b'a', b'/', b'#']),
    ("malformed_pingreq_with_body", &[0xC0, 1, 0]),
    ("malformed_connect_reserved_flag", &[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x01, 0, 60, 0, 1, b'c']),
    ("malformed_connect_level_6", &[0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 1, b'c']),
    ("malformed_connect_truncated_name", &[0x10, 6, 0, 10, b'M', b'Q', b'T', b'T']),
    (
        "malformed_v5_connect_duplicate_property",
        &[0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 6, 0x21, 0, 1, 0x21, 0, 2, 0, 1, b'c'],
    ),
    (
        "stream_v311_connect_publish_pingreq",
        &[
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'c', // CONNECT
            0x32, 7, 0, 1, b't', 0, 9, b'h', b'i', // PUBLISH QoS 1
            0xC0, 0, // PINGREQ
        ],
    ),
];

/// Every seed: (file name, bytes).
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut seen = BTreeSet::new();
    // 3.1 last: it differs from 3.1.1 only in CONNECT, so the other files are named after 3.1.1.
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5, ProtocolVersion::V3_1] {
        let sides = [("client", samples::from_client(version)), ("server", samples::from_server(version))];
        for (side, packets) in sides {
            for (name, packet) in packets {
                let mut buf = BytesMut::new();
                encode(&packet, version, &mut buf);
                // 3.1 differs from 3.1.1 only in CONNECT: keep one file per distinct packet.
                if seen.insert(buf.to_vec()) {
                    seeds.push((format!("{}_{side}_{name}", samples::version_name(version)), buf.to_vec()));
                }
            }
        }
    }
    seeds.extend(MALFORMED.iter().map(|(name, bytes)| ((*name).to_owned(), bytes.to_vec())));
    seeds
}

#[test]
fn every_corpus_file_passes_the_fuzz_body() {
    let entries = std::fs::read_dir(corpus_dir()).expect("the seed corpus directory exists");
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("readable directory entry").path();
        let data = std::fs::read(&path).expect("readable corpus file");
        decode_body::run(&data);
        count += 1;
    }
    assert!(count >= seeds().len(), "only {count} corpus files");
}

#[test]
fn corpus_holds_every_seed() {
    for (name, bytes) in seeds() {
        let path = corpus_dir().join(&name);
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} is missing or stale: regenerate with \
             `cargo nextest run -p wharf-mqtt --test codec_fuzz_corpus --run-ignored only`",
            path.display()
        );
    }
}

/// Rewrites the seed corpus: removes every file in it, then writes the seeds. Ignored: it changes
/// files in the source tree.
#[test]
#[ignore = "rewrites fuzz/corpus/decode; run on purpose after changing the samples"]
fn write_seed_corpus() {
    std::fs::create_dir_all(corpus_dir()).expect("create the corpus directory");
    for entry in std::fs::read_dir(corpus_dir()).expect("read the corpus directory") {
        std::fs::remove_file(entry.expect("readable directory entry").path()).expect("remove an old seed");
    }
    for (name, bytes) in seeds() {
        std::fs::write(corpus_dir().join(name), bytes).expect("write a seed");
    }
}

/// One random edit of a seed: overwrite, insert or remove a byte, or cut the tail.
#[derive(Debug, Clone)]
enum Mutation {
    Overwrite(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Overwrite(at, byte)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(data: &mut Vec<u8>, mutation: &Mutation) {
    let len = data.len();
    match *mutation {
        Mutation::Overwrite(at, byte) if len > 0 => data[at % len] = byte,
        Mutation::Insert(at, byte) => data.insert(at % (len + 1), byte),
        Mutation::Remove(at) if len > 0 => {
            data.remove(at % len);
        }
        Mutation::Truncate(at) => data.truncate(at % (len + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    /// A poor man's fuzzer on stable: seeds with a few random edits.
    #[test]
    fn mutated_seeds_pass_the_fuzz_body(
        seed in prop::sample::select(seeds()),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut data = seed.1;
        for mutation in &mutations {
            apply(&mut data, mutation);
        }
        decode_body::run(&data);
    }

    #[test]
    fn arbitrary_bytes_pass_the_fuzz_body(data in prop::collection::vec(any::<u8>(), 0..64)) {
        decode_body::run(&data);
    }
}
