//! Bootloaders whose state is a key/value environment edited by the distribution's tools:
//! U-Boot through libubootenv's `fw_printenv` / `fw_setenv`, GRUB through `grub-editenv`.
//!
//! Both keep the model of the parent module in the same variables (`BOOT_ORDER`,
//! `BOOT_<name>_LEFT`); the boot script that consumes them is the integrator's (see
//! ARCHITECTURE.md). The booted slot is not in the environment (the boot script decremented
//! the counter and moved on): it is read from the kernel command line, where the boot script
//! put `tern.slot=<name>` (the key is configurable).
//!
//! Every change is made in one tool invocation, so that `BOOT_ORDER` and the slot's counter
//! change together (libubootenv and grub-editenv both rewrite the whole environment block
//! at once), and is read back afterwards: libubootenv exits 0 even when it could not read
//! its script or skipped a line of it, so the exit status alone proves nothing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Bootloader;
use crate::{Error, Result};

/// The longest bootname accepted; bootnames end up in variable names and on the kernel
/// command line, so they stay short and plain.
const MAX_BOOTNAME: usize = 32;

/// The most of a kernel command line read (Linux limits it to a few KiB).
const MAX_CMDLINE: u64 = 64 * 1024;

/// The most of a tool's stderr quoted in an error.
const MAX_STDERR_QUOTE: usize = 512;

/// Reject a bootname that is not 1..=32 ASCII alphanumerics, `_` or `-`, before it reaches a
/// tool, a variable name or a script.
pub(super) fn validate_bootname(backend: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_BOOTNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Bootloader {
            backend,
            reason: format!(
                "invalid bootname {name:?}: expected 1 to {MAX_BOOTNAME} ASCII letters, digits, `_` or `-`"
            ),
        })
    }
}

/// A tool's stderr, made fit for one error message: trimmed, lines joined, bounded.
pub(super) fn quote_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    bounded(&joined, MAX_STDERR_QUOTE)
}

/// At most `max` bytes of `s`, cut on a character boundary, marked when cut.
pub(super) fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn left_var(bootname: &str) -> String {
    format!("BOOT_{bootname}_LEFT")
}

/// The bootname given by `key=<name>` on a kernel command line; the last occurrence wins, as
/// for the kernel's own parameters.
fn booted_from_cmdline(backend: &'static str, path: &Path, key: &str) -> Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CMDLINE).read_to_string(&mut text))
        .map_err(Error::io(path))?;
    let prefix = format!("{key}=");
    let name = text
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(&prefix))
        .next_back()
        .ok_or_else(|| Error::Bootloader {
            backend,
            reason: format!("{}: no `{prefix}<slot>` parameter", path.display()),
        })?;
    validate_bootname(backend, name)?;
    Ok(name.to_owned())
}

/// Parse a tool's `name=value` listing. Lines without `=` (continuations of multi-line
/// values, which the model never uses) are skipped.
fn parse_listing(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Run one tool invocation, optionally feeding `stdin`; its stdout on success, its stderr in
/// the error otherwise.
fn run_tool(backend: &'static str, mut cmd: Command, stdin: Option<&[u8]>) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Tool messages are quoted in errors; keep them untranslated.
        .env("LC_ALL", "C");
    let mut child = cmd.spawn().map_err(|e| Error::Bootloader {
        backend,
        reason: format!("cannot run {program}: {e}"),
    })?;
    // The input is small (a few lines), far below a pipe's buffer, so writing it before
    // reading the output cannot deadlock. Dropping the pipe closes it: end of input. A tool
    // that exits early (bad configuration) breaks the pipe; its exit status and stderr
    // explain why better than the broken pipe, so they are looked at first.
    let written = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => pipe.write_all(input),
        _ => Ok(()),
    };
    let out = child.wait_with_output().map_err(|e| Error::Bootloader {
        backend,
        reason: format!("{program}: {e}"),
    })?;
    if !out.status.success() {
        let stderr = quote_stderr(&out.stderr);
        return Err(Error::Bootloader {
            backend,
            reason: if stderr.is_empty() {
                format!("{program} failed ({})", out.status)
            } else {
                format!("{program} failed ({}): {stderr}", out.status)
            },
        });
    }
    written.map_err(|e| Error::Bootloader {
        backend,
        reason: format!("{program}: cannot write its input: {e}"),
    })?;
    String::from_utf8(out.stdout).map_err(|_| Error::Bootloader {
        backend,
        reason: format!("{program} printed output that is not UTF-8"),
    })
}

/// Both environment backends implement the trait the same way over their `EnvStore`.
macro_rules! env_bootloader {
    ($ty:ty) => {
        impl Bootloader for $ty {
            fn name(&self) -> &'static str {
                Self::BACKEND
            }

            fn booted(&self) -> Result<String> {
                booted_from_cmdline(Self::BACKEND, &self.cmdline, &self.cmdline_key)
            }

            fn primary(&self) -> Result<Option<String>> {
                env_primary(self)
            }

            fn set_primary(&mut self, bootname: &str, attempts: u32) -> Result<()> {
                env_set_primary(self, bootname, attempts)
            }

            fn mark_good(&mut self, bootname: &str, attempts: u32) -> Result<()> {
                env_set_attempts(self, bootname, attempts)
            }

            fn mark_bad(&mut self, bootname: &str) -> Result<()> {
                env_set_attempts(self, bootname, 0)
            }

            fn attempts(&self, bootname: &str) -> Result<u32> {
                env_attempts(self, bootname)
            }
        }
    };
}

/// The storage half of an environment backend: list all variables, set several at once.
trait EnvStore {
    const BACKEND: &'static str;
    fn list(&self) -> Result<BTreeMap<String, String>>;
    /// Set all `vars` in one tool invocation.
    fn set(&self, vars: &[(String, String)]) -> Result<()>;
}

/// Set `vars` in one invocation, then read them back (see the module documentation).
fn set_verified<S: EnvStore>(store: &S, vars: &[(String, String)]) -> Result<()> {
    store.set(vars)?;
    let now = store.list()?;
    for (name, value) in vars {
        if now.get(name) != Some(value) {
            return Err(Error::Bootloader {
                backend: S::BACKEND,
                reason: format!(
                    "setting {name}={value} did not take effect (reads back as {:?})",
                    now.get(name)
                ),
            });
        }
    }
    Ok(())
}

fn env_primary<S: EnvStore>(store: &S) -> Result<Option<String>> {
    let vars = store.list()?;
    Ok(vars
        .get("BOOT_ORDER")
        .and_then(|order| order.split_ascii_whitespace().next())
        .map(str::to_owned))
}

fn env_attempts<S: EnvStore>(store: &S, bootname: &str) -> Result<u32> {
    validate_bootname(S::BACKEND, bootname)?;
    let var = left_var(bootname);
    let vars = store.list()?;
    match vars.get(&var).map(|v| v.trim()) {
        None | Some("") => Ok(0),
        // A counter that is not a number is reported rather than read as 0: the boot
        // script would not read it as 0 either.
        Some(v) => v.parse().map_err(|_| Error::Bootloader {
            backend: S::BACKEND,
            reason: format!("{var}={v:?} is not a number"),
        }),
    }
}

fn env_set_primary<S: EnvStore>(store: &S, bootname: &str, attempts: u32) -> Result<()> {
    validate_bootname(S::BACKEND, bootname)?;
    let vars = store.list()?;
    let others = vars
        .get("BOOT_ORDER")
        .map(|o| {
            o.split_ascii_whitespace()
                .filter(|n| *n != bootname)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let order = std::iter::once(bootname).chain(others).collect::<Vec<_>>().join(" ");
    set_verified(
        store,
        &[
            ("BOOT_ORDER".to_owned(), order),
            (left_var(bootname), attempts.to_string()),
        ],
    )
}

fn env_set_attempts<S: EnvStore>(store: &S, bootname: &str, attempts: u32) -> Result<()> {
    validate_bootname(S::BACKEND, bootname)?;
    set_verified(store, &[(left_var(bootname), attempts.to_string())])
}

/// U-Boot's environment, through libubootenv's `fw_printenv` and `fw_setenv`.
///
/// Invocations (the configuration file is always passed explicitly):
///
/// - read: `fw_printenv -c CONFIG` (the whole listing, `name=value` per line; parsing the
///   listing avoids the differences between versions in how `-n` reports a missing name);
/// - write: `fw_setenv -c CONFIG -s -` with the script on stdin, one `name=value` line per
///   variable. libubootenv's script format is `name=value` (not U-Boot's historical
///   `name value`, which libubootenv silently skips), so all variables change in one store.
///
/// The environment must be valid already (U-Boot saved it, or the image shipped one): when
/// it is not, libubootenv falls back to its default environment file
/// (`/etc/u-boot-initial-env`, or `-f`) and fails if there is none; the tool's message is
/// then in the error.
#[derive(Debug, Clone)]
pub struct UbootEnv {
    config: PathBuf,
    cmdline: PathBuf,
    cmdline_key: String,
}

impl UbootEnv {
    /// A backend using the `fw_env.config` file `config`, reading the booted slot from the
    /// `cmdline_key=<name>` parameter of `cmdline` (normally `/proc/cmdline`).
    pub fn new(config: PathBuf, cmdline: PathBuf, cmdline_key: String) -> Self {
        UbootEnv {
            config,
            cmdline,
            cmdline_key,
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = crate::hooks::clean_command(std::path::Path::new(program));
        cmd.arg("-c").arg(&self.config);
        cmd
    }
}

impl EnvStore for UbootEnv {
    const BACKEND: &'static str = "uboot";

    fn list(&self) -> Result<BTreeMap<String, String>> {
        let out = run_tool(Self::BACKEND, self.command("fw_printenv"), None)?;
        Ok(parse_listing(&out))
    }

    fn set(&self, vars: &[(String, String)]) -> Result<()> {
        // Names and values here are built from validated bootnames and numbers: no `=` in a
        // name, no newline anywhere, so each pair is exactly one script line.
        let script: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let mut cmd = self.command("fw_setenv");
        cmd.args(["-s", "-"]);
        run_tool(Self::BACKEND, cmd, Some(script.as_bytes())).map(drop)
    }
}

env_bootloader!(UbootEnv);

/// GRUB's environment block (`grubenv`), through `grub-editenv`.
///
/// Invocations: read with `grub-editenv FILE list`; write with
/// `grub-editenv FILE set NAME=VALUE...` (all changed variables in one invocation).
///
/// The file must exist (create it once with `grub-editenv FILE create`): grub-editenv would
/// otherwise silently create an empty one, which would hide a wrong path.
#[derive(Debug, Clone)]
pub struct GrubEnv {
    grubenv: PathBuf,
    cmdline: PathBuf,
    cmdline_key: String,
}

impl GrubEnv {
    /// A backend editing the environment block `grubenv`, reading the booted slot from the
    /// `cmdline_key=<name>` parameter of `cmdline` (normally `/proc/cmdline`).
    pub fn new(grubenv: PathBuf, cmdline: PathBuf, cmdline_key: String) -> Self {
        GrubEnv {
            grubenv,
            cmdline,
            cmdline_key,
        }
    }

    fn command(&self, verb: &str) -> Result<Command> {
        // Checked before every invocation, because grub-editenv creates a missing file.
        if !self.grubenv.is_file() {
            return Err(Error::Bootloader {
                backend: Self::BACKEND,
                reason: format!(
                    "{}: no GRUB environment block (create it with `grub-editenv FILE create`)",
                    self.grubenv.display()
                ),
            });
        }
        let mut cmd = crate::hooks::clean_command(std::path::Path::new("grub-editenv"));
        cmd.arg(&self.grubenv).arg(verb);
        Ok(cmd)
    }
}

impl EnvStore for GrubEnv {
    const BACKEND: &'static str = "grub";

    fn list(&self) -> Result<BTreeMap<String, String>> {
        let out = run_tool(Self::BACKEND, self.command("list")?, None)?;
        Ok(parse_listing(&out))
    }

    fn set(&self, vars: &[(String, String)]) -> Result<()> {
        let mut cmd = self.command("set")?;
        cmd.args(vars.iter().map(|(k, v)| format!("{k}={v}")));
        run_tool(Self::BACKEND, cmd, None).map(drop)
    }
}

env_bootloader!(GrubEnv);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootnames() {
        for ok in ["A", "b", "slot_1", "rootfs-a", &"x".repeat(32)] {
            assert!(validate_bootname("t", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a=b", "a\nb", "é", "$(x)", &"x".repeat(33)] {
            assert!(validate_bootname("t", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listing() {
        let vars = parse_listing("BOOT_ORDER=A B\nBOOT_A_LEFT=3\ncontinued line\nE=\n");
        assert_eq!(vars["BOOT_ORDER"], "A B");
        assert_eq!(vars["BOOT_A_LEFT"], "3");
        assert_eq!(vars["E"], "");
        assert_eq!(vars.len(), 3);
    }

    #[test]
    fn stderr_is_bounded() {
        let long = "x".repeat(2000);
        assert!(quote_stderr(long.as_bytes()).len() <= MAX_STDERR_QUOTE + 3);
        assert_eq!(quote_stderr(b"  one\n\ntwo \n"), "one; two");
    }
}
