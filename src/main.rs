//! The `gatehouse` binary: parse the command line, load the settings, run.

use std::process::ExitCode;

/// mimalloc: the proxy allocates and frees many small buffers per request;
/// glibc's malloc spent about 10 % of a request's CPU time on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use gatehouse::cli::{Cli, Command};
use gatehouse::settings::{Settings, Sources};
use gatehouse::{auth, gateway, startup, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = Sources::from_process(cli.config.clone());
    let settings = match Settings::load(&sources) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("gatehouse: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Token { sub, roles, ttl } => match auth::mint_token(&settings.auth, &sub, &roles, ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("gatehouse: {err}");
                ExitCode::FAILURE
            }
        },
        // The same compile step as `serve`, so what passes here starts.
        Command::CheckConfig => match gateway::compile(&settings) {
            Ok(_) => {
                print!("{}", settings.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                eprintln!("gatehouse: invalid configuration:\n  {}", problems.join("\n  "));
                ExitCode::FAILURE
            }
        },
        Command::Serve => {
            let _flush_logs_on_exit = telemetry::init();
            match actix_web::rt::System::new().block_on(startup::run(settings, sources)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(%err, "gatehouse cannot start");
                    eprintln!("gatehouse: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
