//! The command line (SPEC §1): `serve` (the default), `check-config`, `token`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "An API gateway for HTTP microservices"
)]
pub struct Cli {
    /// A settings file applied after the settings directory's layers.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the layered configuration and print it, secrets redacted.
    CheckConfig,
}
