//! The `.proto` from another language: `examples/native-python/example.py` generates Python stubs
//! with grpcio-tools (installed in the conformance venv by `conformance/setup.sh`) and calls every
//! RPC against the real binary, exiting 0 only when every answer is as documented.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Broker, python, run_with_timeout, workspace_dir};

#[test]
fn python_grpcio_stubs_generated_from_the_proto_drive_every_rpc() {
    // Check-back asks quickly, so that the example's half message is asked about at once.
    let broker = Broker::builder().env("WHARF__LIMITS__HALF_MESSAGE_CHECK_INTERVAL_MS", 100).start();
    let mut command = Command::new(python());
    command
        .arg(workspace_dir().join("examples/native-python/example.py"))
        .args(["--port", &broker.native_port().to_string()]);
    let (status, stdout, stderr) = run_with_timeout(&mut command, Duration::from_secs(90));
    assert!(status.success(), "the Python example failed: {status}\n{stdout}{stderr}\n{}", broker.log());
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
