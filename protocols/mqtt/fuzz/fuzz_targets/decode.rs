//! cargo-fuzz target: arbitrary bytes into the MQTT decoder, with the round-trip and contract
//! checks of `common/decode_body.rs` (shared with the stable corpus test). Touches only the codec.

#![no_main]

#[path = "../common/decode_body.rs"]
mod decode_body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| decode_body::run(data));
