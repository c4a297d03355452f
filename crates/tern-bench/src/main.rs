//! `tern-bench`: Tern's benchmarks and load generators, each figure printed beside the
//! machine's reference tool measured in the same run.
//!
//! This binary is not part of the product: the `tern` binary carries product commands only.
//! Where a benchmark measures the product as a user runs it, it runs the `tern` executable as
//! a child process: the one beside this executable (`cargo build --release` builds both
//! into `target/release`), or `TERN_BIN` (see [`product`]). Where it measures a library's
//! path (the server's request handling, the record layer), it calls the library crates.
//!
//! Errors are printed as one line, `tern-bench: ` followed by the cause chain. Exit codes:
//! 0 success, 1 failure (a soak check that failed included), 2 usage error.

#![deny(unsafe_code)]

mod encrypted;
mod fixture;
mod install;
mod output;
mod pg;
mod procfs;
mod product;
mod rollout;
mod rusage;
mod server;
mod size;
mod soak;
mod tools;
mod tuf;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The allocator the `tern` binary ships with, so that in-process servers measure the same.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure Tern's throughput against the machine's reference tools.
#[derive(Debug, Parser)]
#[command(name = "tern-bench", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// `tern bundle verify` of one large payload against `openssl dgst -sha256` of the same bytes.
    Verify(verify::Args),
    /// Refresh plus one lookup in a 10,000-target hashed-bin repository: Tern against python-tuf.
    Tuf(tuf::Args),
    /// Install of an image from a local bundle into a file slot, beside `openssl dgst -sha256`,
    /// and the agent's peak RSS for a 64 MiB and the full-size image.
    Install(verify::Args),
    /// Device check-ins per second and p50/p99 against an in-process `tern server`, beside
    /// `wrk` against nginx serving a 4 KiB file.
    Server(server::Args),
    /// Install of an encrypted image against the same image unencrypted, decryption
    /// throughput beside `openssl speed -evp aes-256-gcm` at 16 KiB, and the bundle's size
    /// per recipient.
    Encrypted(verify::Args),
    /// A soak test of `tern server run` on PostgreSQL: thousands of simulated devices poll and
    /// check in for minutes while the database is restarted; checks that no acknowledged
    /// report is lost, that nothing fails after recovery and that memory stays flat.
    Soak(soak::Args),
    /// Creating a three-phase rollout over every registered device, and its status summary,
    /// at fleet scale (1,000,000 devices by default; `--postgres` for the figure).
    Rollout(rollout::Args),
    /// Simulated devices (own keys, signed check-ins, real HTTP) through a three-phase
    /// rollout on `tern server run`: the server's CPU seconds per updated device, and the
    /// poll rate while it runs beside nginx.
    RolloutRun(server::campaign::Args),
    /// The agent's footprint on a device: the `device` profile's `tern` binary and the shared
    /// libraries it loads, beside Debian's RAUC and SWUpdate.
    Size(size::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify(a) => verify::run(a),
        Command::Tuf(a) => tuf::run(a),
        Command::Install(a) => install::run(a),
        Command::Server(a) => server::run(a),
        Command::Encrypted(a) => encrypted::run(a),
        Command::Soak(a) => soak::run(a),
        Command::Rollout(a) => rollout::run(a),
        Command::RolloutRun(a) => server::campaign::run(a),
        Command::Size(a) => size::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Causes may echo what a server or a tool said: escaped and bounded.
            eprintln!("tern-bench: {}", output::anyhow_chain(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
