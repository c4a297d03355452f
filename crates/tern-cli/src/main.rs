//! `tern`: secure over-the-air updates for fleets of Linux devices.
//!
//! This crate is argument parsing and wiring only: every subcommand module has an `Args`
//! type and a `run`. Errors are printed as one line, `tern: ` followed by the whole cause
//! chain. Exit codes: 0 success, 1 failure, 2 usage error.

#![deny(unsafe_code)]

mod cmd;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: a server's threads (request workers, check-in workers, SQLite's) allocate and
/// free concurrently, and glibc's arenas cost a poll under a rollout's load a third of its
/// rate (ARCHITECTURE.md, "Limits").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Secure over-the-air updates for fleets of Linux devices.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate and inspect signing keys.
    #[command(subcommand)]
    Key(cmd::key::Command),
    /// Edit a static TUF repository (the release engineer's tool).
    #[command(subcommand)]
    Repo(cmd::repo::Command),
    /// Create, inspect and verify release bundles.
    #[command(subcommand)]
    Bundle(cmd::bundle::Command),
    /// The TUF client: init, refresh, download (the reference clients' CLI shape).
    Tuf(cmd::tuf::Args),
    /// Provision devices.
    #[command(subcommand)]
    Device(cmd::agent::DeviceCommand),
    /// Simulated hardware.
    #[command(subcommand)]
    Sim(cmd::agent::SimCommand),
    /// Install a bundle (local media or a URL) into the inactive slot.
    Install(cmd::agent::InstallArgs),
    /// The device agent.
    #[command(subcommand)]
    Agent(cmd::agent::AgentCommand),
    /// The update server.
    #[command(subcommand)]
    Server(cmd::server::Command),
    /// Releases on the server.
    #[command(subcommand)]
    Release(cmd::server::ReleaseCommand),
    /// Phased rollouts on the server: create, list, status, start, pause, resume, cancel, approve.
    #[command(subcommand)]
    Rollout(cmd::rollout::RolloutCommand),
    /// Deployments on the server (one-phase rollouts, kept for scripts written before rollouts).
    #[command(subcommand)]
    Deployment(cmd::server::DeploymentCommand),
    /// Run the end-to-end demonstration on embedded defaults.
    Demo(cmd::demo::Args),
}

/// Freed memory goes back to the system at once, not after mimalloc's default delay (unless
/// `MIMALLOC_PURGE_DELAY` says otherwise): with the delay, refusing a hostile 1 GiB bundle
/// left the server at 48 MiB where the bounded-memory limit is 32 (it stays at 26). Arenas are committed as they are used, a default
/// compiled in by `.cargo/config.toml` (the first arena is reserved before `main` runs).
#[allow(unsafe_code)]
fn allocator_returns_memory() {
    use libmimalloc_sys::{mi_option_get, mi_option_set};
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // the operator's choice
    }
    // SAFETY: reading and setting an option are a load and a store in the allocator's
    // option table, done before any other thread exists; the delay is read whenever memory
    // is next freed. The option is set only where it holds mimalloc 3's default delay, so
    // that a renumbered table leaves the allocator as it was.
    unsafe {
        if mi_option_get(PURGE_DELAY) == 1000 {
            mi_option_set(PURGE_DELAY, 0);
        }
    }
}

/// `mi_option_purge_delay` in mimalloc 3.3's `mi_option_e` (mimalloc.h), which
/// libmimalloc-sys 0.1.49 builds (pinned in Cargo.toml) and does not name.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(test)]
#[allow(unsafe_code)]
mod allocator_tests {
    /// `mi_option_arena_eager_commit`, 0 where `.cargo/config.toml`'s define reached the build.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

    #[test]
    fn the_allocator_gives_memory_back() {
        super::allocator_returns_memory();
        // SAFETY: loads from the allocator's option table.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(super::PURGE_DELAY),
            )
        };
        assert_eq!(
            eager, 0,
            "arenas are committed whole: .cargo/config.toml's C flags did not reach mimalloc"
        );
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(delay, 0, "the purge delay was not set");
        }
    }
}

fn main() -> ExitCode {
    allocator_returns_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Key(c) => cmd::key::run(c),
        Command::Repo(c) => cmd::repo::run(c),
        Command::Bundle(c) => cmd::bundle::run(c),
        Command::Tuf(a) => cmd::tuf::run(a),
        Command::Device(cmd::agent::DeviceCommand::Simulate(a)) => cmd::agent::simulate(a),
        Command::Device(cmd::agent::DeviceCommand::Enroll(a)) => cmd::agent::enroll(a),
        Command::Device(cmd::agent::DeviceCommand::List(a)) => cmd::server::device_list(a),
        Command::Device(cmd::agent::DeviceCommand::Tag(a)) => cmd::rollout::device_tag(a),
        Command::Device(cmd::agent::DeviceCommand::History(a)) => cmd::rollout::device_history(a),
        Command::Device(cmd::agent::DeviceCommand::Approve(a)) => cmd::server::device_action("approve", a),
        Command::Device(cmd::agent::DeviceCommand::Reject(a)) => cmd::server::device_action("reject", a),
        Command::Device(cmd::agent::DeviceCommand::Decommission(a)) => cmd::server::device_action("decommission", a),
        Command::Device(cmd::agent::DeviceCommand::Reset(a)) => cmd::server::device_reset(a),
        Command::Device(cmd::agent::DeviceCommand::Key(cmd::agent::DeviceKeyCommand::Export(a))) => {
            cmd::encrypt::key_export(a)
        }
        Command::Server(c) => cmd::server::run(c),
        Command::Release(c) => cmd::server::release(c),
        Command::Deployment(c) => cmd::server::deployment(c),
        Command::Rollout(c) => cmd::rollout::run(c),
        Command::Sim(cmd::agent::SimCommand::Reboot(a)) => cmd::agent::reboot(a),
        Command::Install(a) => cmd::agent::install_cmd(a),
        Command::Agent(c) => cmd::agent::agent(c),
        Command::Demo(a) => cmd::demo::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Causes may echo untrusted input (a server's message, a bundle's entry name):
            // escaped and bounded, so that it cannot rewrite the terminal or flood it.
            eprintln!("tern: {}", output::anyhow_chain(&e));
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
