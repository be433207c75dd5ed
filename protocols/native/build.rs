//! Compiles `proto/wharf/v1/wharf.proto` into the server side of the native API (protox parses
//! it, so no protoc is needed on the build machine). Touches only `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wharf/v1/wharf.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    // Payloads and other bytes fields as `bytes::Bytes`: shared with the core's message, not copied.
    tonic_prost_build::configure().bytes(".").build_client(false).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
