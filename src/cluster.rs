//! `wharf cluster`: asks a node's admin endpoint about the cluster and prints the answer. A client
//! of the admin HTTP API only (hyper); touches no data directory and no core.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::admin::{CLUSTER_PATH, ClusterStatus};
use crate::cli::ClusterCommand;

/// Longest wait for the admin endpoint's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Run a `wharf cluster` subcommand; exit 1 (with the reason) when the node cannot be asked.
pub fn run(command: ClusterCommand) -> ExitCode {
    let ClusterCommand::Status { admin, json } = command;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wharf: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fetch_status(admin)) {
        Ok((body, status)) => {
            if json {
                println!("{body}");
            } else {
                print!("{}", render(admin, &status));
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("wharf: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// GET `/cluster` from the admin endpoint at `admin`: the body as sent, and decoded.
async fn fetch_status(admin: SocketAddr) -> anyhow::Result<(String, ClusterStatus)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{admin}{CLUSTER_PATH}").parse().context("the admin address")?;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.get(uri))
        .await
        .with_context(|| format!("no answer from {admin} within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("asking the admin endpoint at {admin}"))?;
    let status = response.status();
    let bytes = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
        .await
        .with_context(|| format!("no full answer from {admin} within {REQUEST_TIMEOUT:?}"))?
        .context("reading the answer")?
        .to_bytes();
    let body = String::from_utf8_lossy(&bytes).into_owned();
    anyhow::ensure!(status.is_success(), "{admin} answered {status}: {}", body.trim());
    let decoded = serde_json::from_str(&body).with_context(|| format!("{admin} answered something else: {body}"))?;
    Ok((body, decoded))
}

/// A table, one line per group.
fn render(admin: SocketAddr, status: &ClusterStatus) -> String {
    let mut out = format!("node {} (admin {admin})\n", status.node_id);
    let index = |index: Option<u64>| index.map_or_else(|| "-".to_owned(), |index| index.to_string());
    let _ = writeln!(
        out,
        "{:<10} {:<10} {:>6} {:>6} {:>9} {:>9}  {:<10} replicated (on the leader)",
        "group", "state", "leader", "term", "last log", "applied", "voters"
    );
    for group in &status.groups {
        let voters: Vec<String> = group.voters.iter().map(u64::to_string).collect();
        let replicated: Vec<String> =
            group.replicated.iter().flatten().map(|(node, matched)| format!("{node}:{}", index(*matched))).collect();
        let line = format!(
            "{:<10} {:<10} {:>6} {:>6} {:>9} {:>9}  {:<10} {}",
            group.group,
            group.state,
            group.leader.map_or_else(|| "-".to_owned(), |leader| leader.to_string()),
            group.term,
            index(group.last_log_index),
            index(group.last_applied_index),
            voters.join(","),
            replicated.join(" ")
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use wharf_core::node::GroupStatus;

    use super::*;

    #[test]
    fn the_table_has_a_line_per_group_with_the_leaders_replication() {
        let group = |name: &str, state: &str, replicated| GroupStatus {
            group: name.into(),
            state: state.into(),
            leader: Some(2),
            term: 4,
            last_log_index: Some(120),
            last_applied_index: Some(119),
            voters: vec![1, 2, 3],
            replicated,
        };
        let status = ClusterStatus {
            node_id: 2,
            groups: vec![
                group("meta", "leader", Some(BTreeMap::from([(1, Some(120)), (2, Some(120)), (3, None)]))),
                group("shard-0", "follower", None),
            ],
        };
        let table = render("127.0.0.1:15682".parse().unwrap(), &status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(lines[0], "node 2 (admin 127.0.0.1:15682)");
        assert!(lines[2].starts_with("meta") && lines[2].ends_with("1:120 2:120 3:-"), "{table}");
        assert!(lines[3].contains("follower") && lines[3].ends_with("1,2,3"), "{table}");
    }
}
