//! Compiles the native API's contract, `protocols/native/proto/wharf/v1/wharf.proto`, into its
//! client side (protox parses it, so no protoc is needed). Touches only `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../protocols/native/proto/wharf/v1/wharf.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["../protocols/native/proto"])?;
    // Payloads and other bytes fields as `bytes::Bytes`.
    tonic_prost_build::configure().bytes(".").build_client(true).build_server(false).compile_fds(descriptors)?;
    Ok(())
}
