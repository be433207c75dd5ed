//! Compiles `proto/wharf/cluster/v1/raft.proto`, the cluster transport's service, into its client
//! and server (protox parses it, so no protoc is needed on the build machine). Touches only
//! `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wharf/cluster/v1/raft.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    // Bodies as `bytes::Bytes`: a snapshot chunk or a batch of entries is not copied again.
    tonic_prost_build::configure().bytes(".").build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
