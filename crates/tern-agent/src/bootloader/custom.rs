//! An integrator's own bootloader glue: one executable, called once per operation with a
//! verb and its arguments.
//!
//! | call | must | prints on stdout |
//! | --- | --- | --- |
//! | `get-booted` | name the slot the running system was booted from | the bootname |
//! | `get-primary` | name the slot the next boot tries first | the bootname, or nothing |
//! | `set-primary NAME ATTEMPTS` | put `NAME` first in the boot order with `ATTEMPTS` attempts | nothing |
//! | `mark-good NAME ATTEMPTS` | restore `NAME`'s attempts to `ATTEMPTS` | nothing |
//! | `mark-bad NAME` | set `NAME`'s attempts to 0 | nothing |
//! | `get-attempts NAME` | tell `NAME`'s attempts left | a decimal number |
//!
//! Conventions:
//!
//! - `NAME` is always 1 to 32 ASCII letters, digits, `_` or `-` (the agent refuses anything
//!   else before calling), `ATTEMPTS` a decimal number;
//! - surrounding whitespace of the output is ignored; at most 4 KiB of it is accepted;
//! - exit status 0 is success; anything else is a failure whose first line of stderr is
//!   reported;
//! - stdin is empty; the agent's environment is inherited;
//! - a call running past the configured timeout is killed and fails. A changing verb must
//!   therefore leave the old or the new state, never a mix (write a temporary file and rename
//!   it; see `interop/custom-bootloader-example.sh`, which keeps the model of the parent
//!   module in a plain file).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::envfile::{bounded, validate_bootname};
use super::Bootloader;
use crate::{Error, Result};

const BACKEND: &str = "custom";

/// The most of stdout accepted.
const MAX_STDOUT: u64 = 4096;

/// The most of stderr kept (only its first line is reported, bounded further).
const MAX_STDERR: u64 = 4096;

/// The most of stderr's first line quoted in an error.
const MAX_STDERR_LINE: usize = 256;

/// The integrator's bootloader command; see the module documentation for its verbs.
#[derive(Debug, Clone)]
pub struct CustomBootloader {
    command: PathBuf,
    timeout: Duration,
}

/// What a pipe reader saw: up to its limit of bytes, and whether there was more.
struct Captured {
    bytes: Vec<u8>,
    overflow: bool,
}

fn fail(reason: String) -> Error {
    Error::Bootloader {
        backend: BACKEND,
        reason,
    }
}

/// Read `pipe` on a thread: keep `limit` bytes, then drain the rest so that the command
/// never blocks on a full pipe. The result arrives on the returned channel at end of file.
fn capture(pipe: Option<impl Read + Send + 'static>, limit: u64) -> mpsc::Receiver<Captured> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut overflow = false;
        if let Some(mut pipe) = pipe {
            let _ = (&mut pipe).take(limit).read_to_end(&mut bytes);
            overflow = std::io::copy(&mut pipe, &mut std::io::sink()).is_ok_and(|n| n > 0);
        }
        // The receiver is gone when the call already failed; nothing to do then.
        let _ = tx.send(Captured { bytes, overflow });
    });
    rx
}

impl CustomBootloader {
    /// The executable `command`, each call killed after `timeout`.
    pub fn new(command: PathBuf, timeout: Duration) -> Self {
        CustomBootloader { command, timeout }
    }

    /// Run one verb; its trimmed stdout on success.
    fn call(&self, args: &[&str]) -> Result<String> {
        let what = format!("`{} {}`", self.command.display(), args.join(" "));
        let mut child = crate::hooks::clean_command(&self.command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.command.display())))?;
        let stdout = capture(child.stdout.take(), MAX_STDOUT);
        let stderr = capture(child.stderr.take(), MAX_STDERR);

        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    crate::hooks::kill_group(&mut child);
                    // The reader threads are left behind: a background process the command
                    // started may hold the pipes open, and they end when it does.
                    return Err(fail(format!("{what} killed after {:?}", self.timeout)));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    crate::hooks::kill_group(&mut child);
                    return Err(fail(format!("{what}: {e}")));
                }
            }
        };

        // The pipes reach end of file when the command and everything it started have
        // closed them; a background process keeping them open must not hang the agent.
        let collect = |rx: &mpsc::Receiver<Captured>| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .map_err(|_| {
                    fail(format!(
                        "{what} exited but its output stayed open past the timeout (a background process?)"
                    ))
                })
        };
        if !status.success() {
            // The exit status is the failure; stderr only explains it, so a stderr still
            // held open does not turn it into a different error.
            let line = collect(&stderr)
                .map(|c| {
                    let text = String::from_utf8_lossy(&c.bytes).into_owned();
                    bounded(
                        text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(""),
                        MAX_STDERR_LINE,
                    )
                })
                .unwrap_or_default();
            return Err(fail(if line.is_empty() {
                format!("{what} failed ({status})")
            } else {
                format!("{what} failed ({status}): {line}")
            }));
        }
        let out = collect(&stdout)?;
        if out.overflow {
            return Err(fail(format!("{what} printed more than {MAX_STDOUT} bytes")));
        }
        let text =
            String::from_utf8(out.bytes).map_err(|_| fail(format!("{what} printed output that is not UTF-8")))?;
        Ok(text.trim().to_owned())
    }

    /// A printed bootname, checked like the agent's own.
    fn bootname_output(&self, verb: &str, out: String) -> Result<String> {
        validate_bootname(BACKEND, &out).map_err(|_| {
            fail(format!(
                "`{} {verb}` printed {:?}, not a bootname",
                self.command.display(),
                bounded(&out, 64)
            ))
        })?;
        Ok(out)
    }
}

impl Bootloader for CustomBootloader {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn booted(&self) -> Result<String> {
        let out = self.call(&["get-booted"])?;
        self.bootname_output("get-booted", out)
    }

    fn primary(&self) -> Result<Option<String>> {
        let out = self.call(&["get-primary"])?;
        if out.is_empty() {
            return Ok(None);
        }
        self.bootname_output("get-primary", out).map(Some)
    }

    fn set_primary(&mut self, bootname: &str, attempts: u32) -> Result<()> {
        validate_bootname(BACKEND, bootname)?;
        self.call(&["set-primary", bootname, &attempts.to_string()]).map(drop)
    }

    fn mark_good(&mut self, bootname: &str, attempts: u32) -> Result<()> {
        validate_bootname(BACKEND, bootname)?;
        self.call(&["mark-good", bootname, &attempts.to_string()]).map(drop)
    }

    fn mark_bad(&mut self, bootname: &str) -> Result<()> {
        validate_bootname(BACKEND, bootname)?;
        self.call(&["mark-bad", bootname]).map(drop)
    }

    fn attempts(&self, bootname: &str) -> Result<u32> {
        validate_bootname(BACKEND, bootname)?;
        let out = self.call(&["get-attempts", bootname])?;
        out.parse().map_err(|_| {
            fail(format!(
                "`{} get-attempts {bootname}` printed {:?}, not a number",
                self.command.display(),
                bounded(&out, 64)
            ))
        })
    }
}
