//! Integrator hooks: executables run with a documented environment and a timeout.
//!
//! Environment of every hook:
//!
//! | variable | value |
//! | --- | --- |
//! | `TERN_HOOK` | `pre-install`, `post-install`, `health-check`, `on-rollback` or `reboot` |
//! | `TERN_DEVICE_TYPE`, `TERN_HARDWARE_REVISION` | from the configuration |
//! | `TERN_STATE_DIR` | the agent's state directory |
//! | `TERN_TARGET`, `TERN_VERSION` | the release's payload and version (when there is one) |
//! | `TERN_SLOT`, `TERN_SLOT_DEVICE`, `TERN_BOOTNAME` | the slot being installed or tried |
//! | `TERN_REASON` | for `on-rollback`: why the rollback happened |
//! | `PATH` | the agent's `PATH`, or `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin` |
//!
//! Nothing else of the agent's environment reaches a hook (an enrollment token or a proxy
//! credential in it stays with the agent); a hook that needs more sets it up itself.
//!
//! Exit status 0 is success. Anything else, or running past `hooks.timeout_secs` (the hook
//! is then killed), is failure: a failed pre- or post-install hook aborts the install
//! before the slot is made bootable; a failed health check leaves the new slot uncommitted,
//! so the bootloader's attempts run out and it falls back.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The `PATH` a hook or an integrator's bootloader script gets when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A command with an empty environment but `PATH`: what hooks and the custom bootloader
/// backend run with.
pub(crate) fn clean_command(program: &Path) -> Command {
    let mut c = Command::new(program);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()));
    c
}

/// Kill a child spawned with `process_group(0)` together with everything it started, and reap
/// it. Without `unsafe` there is no killpg here; kill(1) does it.
pub(crate) fn kill_group(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Run `path` as hook `hook` with `env`; `Ok(())` when it exits 0 in time.
///
/// The hook runs in its own process group; on timeout the whole group is killed, so a
/// hook's children cannot outlive it. Its stderr (the last line is reported on failure) is
/// read on a helper thread and waited for only until the deadline: a background process
/// that keeps the pipe open cannot hold the agent.
pub fn run(hook: &'static str, path: &Path, env: &[(&str, String)], timeout: Duration) -> Result<()> {
    let fail = |reason: String| Error::Hook {
        hook,
        path: path.to_owned(),
        reason,
    };
    let mut child = clean_command(path)
        .env("TERN_HOOK", hook)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    let mut stderr = child.stderr.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(4096).read_to_end(&mut buf);
            let _ = tx.send(buf);
            let _ = std::io::copy(s, &mut std::io::sink());
        } else {
            let _ = tx.send(buf);
        }
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > timeout => {
                kill_group(&mut child);
                return Err(fail(format!("killed after {} s", timeout.as_secs())));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                kill_group(&mut child);
                return Err(fail(e.to_string()));
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    let output = rx.recv_timeout(left).unwrap_or_default();
    let last = tern_core::text::shown(String::from_utf8_lossy(&output).lines().last().unwrap_or(""));
    Err(fail(format!(
        "{status}{}",
        if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        }
    )))
}
