//! The `wharf` binary: parses the command line and dispatches to a subcommand. It wires the
//! process (configuration, logs, metrics, admin HTTP, signals) around the core; the core decides.
//!
//! Exit codes: 0 success; 1 runtime failure (including a shutdown slower than 30 s) or a
//! configuration refused by `wharf config check`; 2 bad flags or configuration refused at start-up.

mod admin;
mod bench;
mod cli;
mod cluster;
mod listeners;
mod serve;
mod settings;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, ConfigCommand};
use crate::settings::{Overrides, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Bench(command) => bench::run(command),
        Command::Cluster(command) => cluster::run(command),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", settings::default_file());
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Check { config }) => {
            match Settings::load(Some(&config), None, &Overrides::default()) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("{}: invalid configuration: {error}", config.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
