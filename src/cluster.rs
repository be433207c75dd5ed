//! `wharf cluster`: asks a node's admin endpoint about the cluster, to change its members, or to
//! hand leaderships over, and prints the answer. A client of the admin HTTP API only (hyper); touches no data directory and
//! no core.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::admin::{
    CLUSTER_PATH, ClusterStatus, JOIN_PATH, JoinRequest, LEAVE_PATH, LeadersChanged, LeaveRequest, MembersChanged,
    TRANSFER_PATH, TransferRequest,
};
use crate::cli::ClusterCommand;

/// Longest wait for the admin endpoint's answer to a status request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra wait, over the change's own timeout, for the answer to a membership change.
const CHANGE_ANSWER_GRACE: Duration = Duration::from_secs(10);

/// Run a `wharf cluster` subcommand; exit 1 (with the reason) when the node cannot be asked or
/// refuses.
pub fn run(command: ClusterCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wharf: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(command)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("wharf: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ask the node and render its answer.
async fn execute(command: ClusterCommand) -> anyhow::Result<String> {
    match command {
        ClusterCommand::Status { admin, json } => {
            let body = ask(admin, hyper::Method::GET, CLUSTER_PATH, None, REQUEST_TIMEOUT).await?;
            if json {
                return Ok(format!("{body}\n"));
            }
            let status: ClusterStatus = decode(admin, &body)?;
            Ok(render(admin, &status))
        }
        ClusterCommand::Join { admin, node, timeout_secs } => {
            let (id, addr) = parse_node(&node)?;
            let request = serde_json::to_string(&JoinRequest { id, addr, timeout_secs })?;
            let wait = Duration::from_secs(timeout_secs) + CHANGE_ANSWER_GRACE;
            let body = ask(admin, hyper::Method::POST, JOIN_PATH, Some(request), wait).await?;
            let changed: MembersChanged = decode(admin, &body)?;
            Ok(render_members(&format!("node {id} added"), &changed))
        }
        ClusterCommand::TransferLeader { admin, to, group, timeout_secs } => {
            let request = serde_json::to_string(&TransferRequest { to, group, timeout_secs })?;
            let wait = Duration::from_secs(timeout_secs) + CHANGE_ANSWER_GRACE;
            let body = ask(admin, hyper::Method::POST, TRANSFER_PATH, Some(request), wait).await?;
            let changed: LeadersChanged = decode(admin, &body)?;
            let mut out = format!("leadership handed over to node {to} (through node {})\n", changed.node_id);
            for group in &changed.groups {
                let _ = writeln!(out, "{:<10} leader {}", group.group, group.leader);
            }
            Ok(out)
        }
        ClusterCommand::Leave { admin, node, timeout_secs } => {
            let request = serde_json::to_string(&LeaveRequest { id: node, timeout_secs })?;
            let wait = Duration::from_secs(timeout_secs) + CHANGE_ANSWER_GRACE;
            let body = ask(admin, hyper::Method::POST, LEAVE_PATH, Some(request), wait).await?;
            let changed: MembersChanged = decode(admin, &body)?;
            Ok(render_members(&format!("node {node} removed"), &changed))
        }
    }
}

/// `ID@HOST:PORT` as the id and the address.
fn parse_node(node: &str) -> anyhow::Result<(u64, String)> {
    let malformed = || anyhow::anyhow!("--node {node:?} is not ID@HOST:PORT, such as 4@10.0.0.4:7655");
    let (id, addr) = node.split_once('@').ok_or_else(malformed)?;
    let id = id.trim().parse().map_err(|_| malformed())?;
    let (host, port) = addr.rsplit_once(':').ok_or_else(malformed)?;
    anyhow::ensure!(!host.is_empty() && port.parse::<u16>().is_ok(), malformed());
    Ok((id, addr.to_owned()))
}

/// Send `method path` (with a JSON `body`) to the admin endpoint at `admin`; the answer's body,
/// or an error saying what the node answered.
async fn ask(
    admin: SocketAddr,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .context("the admin address")?;
    let response = tokio::time::timeout(timeout, client.request(request))
        .await
        .with_context(|| format!("no answer from {admin} within {timeout:?}"))?
        .with_context(|| format!("asking the admin endpoint at {admin}"))?;
    let status = response.status();
    let bytes = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
        .await
        .with_context(|| format!("no full answer from {admin} within {REQUEST_TIMEOUT:?}"))?
        .context("reading the answer")?
        .to_bytes();
    let body = String::from_utf8_lossy(&bytes).into_owned();
    anyhow::ensure!(status.is_success(), "{admin} answered {status}: {}", body.trim());
    Ok(body)
}

fn decode<T: serde::de::DeserializeOwned>(admin: SocketAddr, body: &str) -> anyhow::Result<T> {
    serde_json::from_str(body).with_context(|| format!("{admin} answered something else: {body}"))
}

/// What a membership change left: one line per group with its voters.
fn render_members(what: &str, changed: &MembersChanged) -> String {
    let mut out = format!("{what} (through node {})\n", changed.node_id);
    for group in &changed.groups {
        let voters: Vec<String> = group.voters.iter().map(u64::to_string).collect();
        let _ = writeln!(out, "{:<10} voters {}", group.group, voters.join(","));
    }
    out
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

    use wharf_core::node::{GroupMembers, GroupStatus};

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

    #[test]
    fn a_new_node_is_id_at_host_and_port() {
        assert_eq!(parse_node("4@10.0.0.4:7655").unwrap(), (4, "10.0.0.4:7655".to_owned()));
        assert_eq!(parse_node("5@[::1]:7655").unwrap(), (5, "[::1]:7655".to_owned()));
        for bad in ["4", "x@h:1", "4@h", "4@:1", "4@h:99999"] {
            assert!(parse_node(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_membership_change_prints_every_groups_voters() {
        let changed = MembersChanged {
            node_id: 2,
            groups: vec![
                GroupMembers { group: "meta".into(), voters: vec![1, 2, 4] },
                GroupMembers { group: "shard-0".into(), voters: vec![1, 2, 4] },
            ],
        };
        assert_eq!(
            render_members("node 3 removed", &changed),
            "node 3 removed (through node 2)\nmeta       voters 1,2,4\nshard-0    voters 1,2,4\n"
        );
    }
}
