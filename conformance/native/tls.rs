//! The native listener over TLS: with a certificate configured it speaks gRPC over TLS (ALPN h2)
//! on the same port, and a plaintext client gets nowhere. The TLS client is Python's grpcio (the
//! harness's certificate is self-signed with CA:TRUE, which rustls refuses as a server
//! certificate; OpenSSL-based clients accept it as its own trust anchor).

use std::process::Command;
use std::time::Duration;

use wharf_client::{Client, RetryPolicy, message};

use crate::harness::{Broker, python, run_with_timeout};

/// Connect over TLS to `localhost:port` trusting `ca`, call ListQueues (an empty request), and
/// print the reply's size.
const TLS_CLIENT: &str = r#"
import sys, grpc
port, ca = sys.argv[1], sys.argv[2]
credentials = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
channel = grpc.secure_channel(f"localhost:{port}", credentials)
grpc.channel_ready_future(channel).result(timeout=10)
reply = channel.unary_unary("/wharf.v1.Wharf/ListQueues")(b"", timeout=10)
print(f"ListQueues over TLS: {len(reply)} bytes")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_listener_serves_tls_when_a_certificate_is_configured() {
    let broker = Broker::builder().tls().start();
    let (_, files) = broker.tls().expect("a TLS broker");
    let client = tokio::task::block_in_place(|| {
        let mut command = Command::new(python());
        command.args(["-c", TLS_CLIENT, &broker.native_port().to_string()]).arg(&files.cert);
        run_with_timeout(&mut command, Duration::from_secs(30))
    });
    let (status, stdout, stderr) = client;
    assert!(status.success(), "the TLS client failed: {status}\n{stdout}{stderr}\n{}", broker.log());
    assert!(stdout.contains("ListQueues over TLS"), "{stdout}");

    // Plaintext HTTP/2 on the TLS port: the handshake fails, nothing is served.
    let plaintext = async {
        let client = Client::connect(broker.native_url()).await?;
        client
            .with_retry(RetryPolicy { retries: 0, ..RetryPolicy::default() })
            .publish("/", message("", "q", "x"))
            .await
    };
    let outcome = tokio::time::timeout(crate::WAIT, plaintext).await;
    assert!(matches!(outcome, Ok(Err(_))), "a plaintext client must fail: {outcome:?}");
}
