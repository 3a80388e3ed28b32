//! The command line (SPEC §1): `serve` (the default), `check-config`, `token`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gatehouse", version, about = "An API gateway for HTTP microservices")]
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
    /// Print a token signed with the configured HS secret.
    Token {
        /// The token's `sub` claim.
        #[arg(long)]
        sub: String,
        /// A role for the roles claim; repeat for several.
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// Lifetime in seconds (`exp` = now + ttl).
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}
