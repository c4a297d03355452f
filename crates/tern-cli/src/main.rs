//! `tern`: secure over-the-air updates for fleets of Linux devices.
//!
//! This crate is argument parsing and wiring only: every subcommand module has an `Args`
//! type and a `run`; the help texts are written for the command's user (release engineer,
//! operator, integrator), and the shell completions and manual pages come from the same
//! definitions (`cmd::docs`). Errors are printed as one line, `tern: ` followed by the
//! whole cause chain. Exit codes: 0 success, 1 failure, 2 usage error.

#![deny(unsafe_code)]

mod cmd;
mod logging;
mod output;
mod systemd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: a server's threads (request workers, check-in workers, SQLite's) allocate and
/// free concurrently, and glibc's arenas cost a poll under a rollout's load a third of its
/// rate (ARCHITECTURE.md, "Limits").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Secure over-the-air updates for fleets of Linux devices.
///
/// A release engineer signs releases offline (`tern key`, `tern repo`, `tern bundle`). An
/// operator runs the update server and rolls releases out to the fleet (`tern server`,
/// `tern release`, `tern rollout`, `tern device`). An integrator puts the agent on each
/// device, which verifies, writes the inactive A/B slot, boots it and commits or rolls back
/// (`tern agent`, `tern install`, `tern device enroll`). `tern demo` shows the whole path on
/// one machine.
#[derive(Debug, Parser)]
#[command(name = "tern", version, propagate_version = true, after_long_help = EXAMPLES)]
pub struct Cli {
    /// How log lines (on standard error) are written: `text` for people, `json` for a log
    /// collector. What is logged: `RUST_LOG`, or the configuration's `log` key.
    #[arg(long, global = true, value_enum, default_value_t, env = "TERN_LOG_FORMAT")]
    log_format: logging::Format,
    #[command(subcommand)]
    command: Command,
}

/// What `tern --help` ends with.
const EXAMPLES: &str = "\
Examples:
  # See the whole path on one machine (SQLite, file storage, simulated devices):
  tern demo

  # Release engineer, offline: publish an image with its manifest, then bundle it
  tern repo add-target --repo repo rootfs.img --name board-a/rootfs-1.2.0.img --role board-a ...
  tern repo refresh --repo repo --key keys/snapshot.pem --key keys/timestamp.pem
  tern bundle create --repo repo --target board-a/rootfs-1.2.0.img --out release.tern

  # Operator: publish the release and roll it out in phases
  tern release upload release.tern
  tern rollout create --release 1.2.0 --tag lab --phase 10%@100 --phase 100%

  # Integrator, on a device: enroll once, then run the agent as a service
  tern device enroll --config /etc/tern/agent.toml --token ternenroll_...
  tern agent run --config /etc/tern/agent.toml

Logging: RUST_LOG (e.g. `info`, `warn,tern_server::request=debug`) or the `log` key of the
server's or agent's configuration; --log-format json for one JSON object per line.
Shell completions: `tern completions bash`; manual pages: `tern manpages DIR`.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Release engineer: make signing keys (offline root and targets, online snapshot and
    /// timestamp, X25519 keys for encryption) and show a key's id.
    #[command(subcommand)]
    Key(cmd::key::Command),
    /// Release engineer: sign a TUF repository offline: targets with their install
    /// manifests, delegations, key rotation, expiry.
    #[command(subcommand)]
    Repo(cmd::repo::Command),
    /// Release engineer: make a release bundle (one signed file, uploaded to the server or
    /// carried on a USB stick), inspect it, verify it as a device would.
    #[command(subcommand)]
    Bundle(cmd::bundle::Command),
    /// Integrator: the TUF client alone (init, refresh, download), with the command line of
    /// python-tuf's and go-tuf's reference clients.
    Tuf(cmd::tuf::Args),
    /// Operator and integrator: enroll devices with the server, list, tag, approve, reject
    /// and decommission them; make simulated devices to try Tern without hardware.
    #[command(subcommand)]
    Device(cmd::agent::DeviceCommand),
    /// Try Tern without hardware: power-cycle a simulated device.
    #[command(subcommand)]
    Sim(cmd::agent::SimCommand),
    /// On a device: install a bundle from local media (a USB stick, a file) or a URL into the
    /// inactive slot, e.g. `tern install /media/usb/release.tern --config /etc/tern/agent.toml`.
    Install(cmd::agent::InstallArgs),
    /// On a device: the update agent (`run` is the service: boot-time commit or rollback,
    /// then check-ins and installs) and its `status`.
    #[command(subcommand)]
    Agent(cmd::agent::AgentCommand),
    /// Operator: set up the update server (`init`), run it (`run`), make API and enrollment
    /// tokens (`token`).
    #[command(subcommand)]
    Server(cmd::server::Command),
    /// Operator: upload signed releases to the server (verified before they are published)
    /// and list them.
    #[command(subcommand)]
    Release(cmd::server::ReleaseCommand),
    /// Operator: roll a release out to the fleet in phases, with error thresholds and
    /// maintenance windows: create, list, status, start, pause, resume, cancel, approve.
    #[command(subcommand)]
    Rollout(cmd::rollout::RolloutCommand),
    /// Operator: deployments, the one-phase rollouts kept for scripts written before
    /// rollouts.
    #[command(subcommand)]
    Deployment(cmd::server::DeploymentCommand),
    /// Newcomers: the whole path on one machine (repository, server, simulated devices, a
    /// deployment with one device rolling back), on the embedded defaults.
    Demo(cmd::demo::Args),
    /// Print a shell completion script: `tern completions bash > /etc/bash_completion.d/tern`
    /// (also zsh, fish, elvish and PowerShell).
    Completions(cmd::docs::CompletionsArgs),
    /// Write manual pages (tern.1, tern-server-run.1…) into a directory: `tern manpages
    /// /usr/share/man/man1`.
    Manpages(cmd::docs::ManpagesArgs),
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
    logging::init(cli.log_format);
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
        Command::Completions(a) => cmd::docs::completions(a, <Cli as clap::CommandFactory>::command()),
        Command::Manpages(a) => cmd::docs::manpages(a, <Cli as clap::CommandFactory>::command()),
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
