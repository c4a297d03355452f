//! The bootloader backends against the real tools: libubootenv's `fw_printenv`/`fw_setenv`
//! (Debian package libubootenv-tool), `grub-editenv` (grub-common), and the example custom
//! bootloader script in `interop/`.
//!
//! These tests fail, on purpose, when a tool is missing: a skipped test would pass CI without
//! ever having exercised the backend.
//!
//! The U-Boot environment is file-backed: `fw_env.config` names a 16 KiB file at offset 0
//! (one copy, no redundancy). libubootenv 0.3.2 cannot use a zero-filled file as it is (bad
//! CRC, and no `/etc/u-boot-initial-env` to fall back to), and `mkenvimage` (u-boot-tools)
//! is not needed: `fw_setenv -c CONFIG -f DEFAULT_ENV` with no variables loads the
//! `name=value` default environment file and stores it, CRC included, into the zero-filled
//! file — the same thing U-Boot's `saveenv` of its built-in default would do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tern_agent::bootloader::{Bootloader, CustomBootloader, GrubEnv, UbootEnv};
use tern_agent::Error;

const ENV_SIZE: usize = 0x4000;
const CMDLINE: &str = "console=ttyS0 tern.slot=B quiet\n";
const INITIAL: &[(&str, &str)] = &[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")];

/// Fail (never skip) when `tool` is not installed.
fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: install the Debian package {package} (apt-get install {package}); \
         these tests exercise the real tool and do not skip"
    );
}

/// Run a tool directly (not through the backend) and return its stdout; panic with its stderr.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn listing(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The reason of a `Bootloader` error, or a panic naming what came instead.
fn bootloader_reason(result: Result<impl std::fmt::Debug, Error>, backend: &str) -> String {
    match result {
        Err(Error::Bootloader { backend: b, reason }) => {
            assert_eq!(b, backend, "{reason}");
            reason
        }
        other => panic!("expected a Bootloader error from {backend}, got {other:?}"),
    }
}

fn write_cmdline(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("cmdline");
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// U-Boot

struct Uboot {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Uboot {
    /// A file-backed U-Boot environment holding `initial`.
    fn new(initial: &[(&str, &str)]) -> Self {
        require_tool("fw_printenv", "libubootenv-tool");
        require_tool("fw_setenv", "libubootenv-tool");
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("uboot.env");
        std::fs::write(&env, vec![0u8; ENV_SIZE]).unwrap();
        let config = dir.path().join("fw_env.config");
        // DEVICE OFFSET ENVSIZE: one copy, so no redundant environment.
        std::fs::write(&config, format!("{} 0x0 {ENV_SIZE:#x}\n", env.display())).unwrap();
        let default_env = dir.path().join("initial-env");
        let text: String = initial.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(&default_env, text).unwrap();
        run(Command::new("fw_setenv")
            .arg("-c")
            .arg(&config)
            .arg("-f")
            .arg(&default_env));
        let uboot = Uboot { dir, config };
        assert_eq!(uboot.printenv(), vars(initial), "initialised environment");
        uboot
    }

    fn backend(&self, cmdline: &str) -> UbootEnv {
        UbootEnv::new(
            self.config.clone(),
            write_cmdline(self.dir.path(), cmdline),
            "tern.slot".into(),
        )
    }

    /// The environment as a separate `fw_printenv` invocation sees it.
    fn printenv(&self) -> BTreeMap<String, String> {
        listing(&run(Command::new("fw_printenv").arg("-c").arg(&self.config)))
    }
}

/// The model's operations on an environment that starts as `INITIAL`; `env` reads it back
/// with the tool, independently of the backend.
fn exercise_model(bl: &mut dyn Bootloader, env: &dyn Fn() -> BTreeMap<String, String>) {
    assert_eq!(bl.booted().unwrap(), "B");
    assert_eq!(bl.primary().unwrap().as_deref(), Some("A"));
    assert_eq!(bl.attempts("A").unwrap(), 3);
    assert_eq!(bl.attempts("C").unwrap(), 0, "a missing counter is 0");

    bl.set_primary("B", 3).unwrap();
    assert_eq!(
        env(),
        vars(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "3")])
    );
    assert_eq!(bl.primary().unwrap().as_deref(), Some("B"));

    bl.mark_bad("B").unwrap();
    assert_eq!(
        env(),
        vars(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "3"), ("BOOT_B_LEFT", "0")])
    );
    assert_eq!(bl.attempts("B").unwrap(), 0);

    bl.mark_good("A", 5).unwrap();
    assert_eq!(
        env(),
        vars(&[("BOOT_ORDER", "B A"), ("BOOT_A_LEFT", "5"), ("BOOT_B_LEFT", "0")])
    );
    assert_eq!(bl.attempts("A").unwrap(), 5);

    // A slot missing from BOOT_ORDER is added in front; the others keep their order.
    bl.set_primary("C", 2).unwrap();
    assert_eq!(env()["BOOT_ORDER"], "C B A");
    assert_eq!(env()["BOOT_C_LEFT"], "2");
    bl.set_primary("A", 1).unwrap();
    assert_eq!(env()["BOOT_ORDER"], "A C B");
    assert_eq!(bl.attempts("A").unwrap(), 1);

    // Invalid bootnames never reach the tool.
    let before = env();
    for bad in ["", "a b", "A=1", "A\nBOOT_ORDER=X", "$(reboot)", &"x".repeat(33)] {
        let backend = bl.name();
        bootloader_reason(bl.set_primary(bad, 3), backend);
        bootloader_reason(bl.mark_good(bad, 3), backend);
        bootloader_reason(bl.mark_bad(bad), backend);
        bootloader_reason(bl.attempts(bad), backend);
    }
    assert_eq!(env(), before);
}

#[test]
fn uboot_model_through_fw_printenv_and_fw_setenv() {
    let uboot = Uboot::new(INITIAL);
    let mut bl = uboot.backend(CMDLINE);
    assert_eq!(bl.name(), "uboot");
    exercise_model(&mut bl, &|| uboot.printenv());
}

#[test]
fn uboot_empty_environment() {
    let uboot = Uboot::new(&[("bootdelay", "2")]);
    let mut bl = uboot.backend(CMDLINE);
    assert_eq!(bl.primary().unwrap(), None);
    assert_eq!(bl.attempts("A").unwrap(), 0);
    bl.set_primary("A", 3).unwrap();
    assert_eq!(
        uboot.printenv(),
        vars(&[("BOOT_A_LEFT", "3"), ("BOOT_ORDER", "A"), ("bootdelay", "2")]),
        "set_primary adds both variables and leaves the others alone"
    );
}

#[test]
fn uboot_booted_needs_the_cmdline_key() {
    let uboot = Uboot::new(INITIAL);
    let bl = uboot.backend("console=ttyS0 root=/dev/mmcblk0p2 quiet\n");
    let reason = bootloader_reason(bl.booted(), "uboot");
    assert!(reason.contains("tern.slot="), "{reason}");

    // The last occurrence wins, as for kernel parameters; an invalid name is refused.
    assert_eq!(uboot.backend("tern.slot=A x tern.slot=B").booted().unwrap(), "B");
    bootloader_reason(uboot.backend("tern.slot=$(x)").booted(), "uboot");
    // Another key that merely ends like ours does not count.
    bootloader_reason(uboot.backend("xtern.slot=A").booted(), "uboot");

    let missing = UbootEnv::new(uboot.config.clone(), uboot.dir.path().join("nope"), "tern.slot".into());
    assert_eq!(missing.booted().unwrap_err().kind(), "Io");
}

#[test]
fn uboot_tool_errors_carry_stderr() {
    require_tool("fw_printenv", "libubootenv-tool");
    let dir = tempfile::tempdir().unwrap();
    let cmdline = write_cmdline(dir.path(), CMDLINE);

    // A configuration file that does not exist.
    let bl = UbootEnv::new(dir.path().join("missing.config"), cmdline.clone(), "tern.slot".into());
    let reason = bootloader_reason(bl.primary(), "uboot");
    assert!(reason.contains("fw_printenv failed"), "{reason}");
    assert!(
        reason.contains("Configuration file wrong or corrupted"),
        "stderr quoted: {reason}"
    );

    // An environment that was never written (zero-filled: bad CRC), with no default
    // environment file to fall back to.
    if Path::new("/etc/u-boot-initial-env").exists() {
        eprintln!("/etc/u-boot-initial-env exists: libubootenv falls back to it; uninitialised-env case not checked");
        return;
    }
    let env = dir.path().join("uboot.env");
    std::fs::write(&env, vec![0u8; ENV_SIZE]).unwrap();
    let config = dir.path().join("fw_env.config");
    std::fs::write(&config, format!("{} 0x0 {ENV_SIZE:#x}\n", env.display())).unwrap();
    let mut bl = UbootEnv::new(config, cmdline, "tern.slot".into());
    let reason = bootloader_reason(bl.set_primary("A", 3), "uboot");
    assert!(reason.contains("Cannot read"), "stderr quoted: {reason}");
    assert_eq!(std::fs::read(&env).unwrap(), vec![0u8; ENV_SIZE], "nothing written");
}

// ---------------------------------------------------------------------------------------
// GRUB

struct Grub {
    dir: tempfile::TempDir,
    grubenv: PathBuf,
}

impl Grub {
    fn new(initial: &[(&str, &str)]) -> Self {
        require_tool("grub-editenv", "grub-common");
        let dir = tempfile::tempdir().unwrap();
        let grubenv = dir.path().join("grubenv");
        run(Command::new("grub-editenv").arg(&grubenv).arg("create"));
        if !initial.is_empty() {
            run(Command::new("grub-editenv")
                .arg(&grubenv)
                .arg("set")
                .args(initial.iter().map(|(k, v)| format!("{k}={v}"))));
        }
        let grub = Grub { dir, grubenv };
        assert_eq!(grub.list(), vars(initial));
        grub
    }

    fn backend(&self, cmdline: &str) -> GrubEnv {
        GrubEnv::new(
            self.grubenv.clone(),
            write_cmdline(self.dir.path(), cmdline),
            "tern.slot".into(),
        )
    }

    /// The environment as a separate `grub-editenv list` sees it.
    fn list(&self) -> BTreeMap<String, String> {
        listing(&run(Command::new("grub-editenv").arg(&self.grubenv).arg("list")))
    }
}

#[test]
fn grub_model_through_grub_editenv() {
    let grub = Grub::new(INITIAL);
    let mut bl = grub.backend(CMDLINE);
    assert_eq!(bl.name(), "grub");
    exercise_model(&mut bl, &|| grub.list());
    // The block keeps its fixed size: GRUB reads it without a filesystem driver's help.
    assert_eq!(std::fs::metadata(&grub.grubenv).unwrap().len(), 1024);
}

#[test]
fn grub_empty_environment() {
    let grub = Grub::new(&[]);
    let mut bl = grub.backend(CMDLINE);
    assert_eq!(bl.primary().unwrap(), None);
    assert_eq!(bl.attempts("B").unwrap(), 0);
    bl.set_primary("B", 3).unwrap();
    assert_eq!(grub.list(), vars(&[("BOOT_ORDER", "B"), ("BOOT_B_LEFT", "3")]));
}

#[test]
fn grub_missing_block_is_an_error_not_created() {
    require_tool("grub-editenv", "grub-common");
    let dir = tempfile::tempdir().unwrap();
    let grubenv = dir.path().join("grubenv");
    let mut bl = GrubEnv::new(grubenv.clone(), write_cmdline(dir.path(), CMDLINE), "tern.slot".into());
    let reason = bootloader_reason(bl.primary(), "grub");
    assert!(reason.contains("grub-editenv FILE create"), "{reason}");
    bootloader_reason(bl.set_primary("A", 3), "grub");
    assert!(!grubenv.exists(), "grub-editenv must not have been run");
    // The booted slot does not depend on the environment.
    assert_eq!(bl.booted().unwrap(), "B");
}

#[test]
fn grub_tool_errors_carry_stderr() {
    require_tool("grub-editenv", "grub-common");
    let dir = tempfile::tempdir().unwrap();
    // A file that is not a GRUB environment block.
    let grubenv = dir.path().join("grubenv");
    std::fs::write(&grubenv, "not an environment block\n").unwrap();
    let mut bl = GrubEnv::new(grubenv.clone(), write_cmdline(dir.path(), CMDLINE), "tern.slot".into());
    let reason = bootloader_reason(bl.set_primary("A", 3), "grub");
    assert!(reason.contains("grub-editenv failed"), "{reason}");
    assert!(reason.contains("grub-editenv: error"), "stderr quoted: {reason}");
    assert_eq!(std::fs::read_to_string(&grubenv).unwrap(), "not an environment block\n");
}

// ---------------------------------------------------------------------------------------
// Custom

fn example_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/custom-bootloader-example.sh")
}

/// Write an executable shell script. Running a file just written can fail with ETXTBSY
/// while another test thread's fork still holds the write descriptor; the script answers
/// `--ready` without doing anything, so it is probed until it runs.
fn write_script(path: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let text = format!("#!/bin/sh\nif [ \"${{1:-}}\" = --ready ]; then exit 0; fi\n{body}");
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    for _ in 0..100 {
        match Command::new(path).arg("--ready").status() {
            Ok(status) => {
                assert!(status.success());
                return path.to_owned();
            }
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    panic!("{}: still busy", path.display());
}

struct Custom {
    /// Holds the script, state and log until the test ends.
    _dir: tempfile::TempDir,
    command: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl Custom {
    /// The example script with its state file holding `state` and `extra` environment lines.
    fn new(state: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state_path = dir.path().join("boot-state");
        let log = dir.path().join("boot-calls.log");
        std::fs::write(&state_path, state).unwrap();
        let body = format!(
            "TERN_CUSTOM_BOOT_STATE='{}'\nTERN_CUSTOM_BOOT_LOG='{}'\n{extra}\nexport TERN_CUSTOM_BOOT_STATE TERN_CUSTOM_BOOT_LOG\nexec /bin/sh '{}' \"$@\"\n",
            state_path.display(),
            log.display(),
            example_script().display()
        );
        let command = write_script(&dir.path().join("bootctl"), &body);
        Custom {
            _dir: dir,
            command,
            state: state_path,
            log,
        }
    }

    fn backend(&self) -> CustomBootloader {
        CustomBootloader::new(self.command.clone(), Duration::from_secs(10))
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[test]
fn custom_example_script_records_the_exact_calls() {
    let custom = Custom::new("BOOTED=A\nBOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n", "");
    let mut bl = custom.backend();
    assert_eq!(bl.name(), "custom");

    assert_eq!(bl.booted().unwrap(), "A");
    assert_eq!(bl.primary().unwrap().as_deref(), Some("A"));
    bl.set_primary("B", 3).unwrap();
    assert_eq!(bl.primary().unwrap().as_deref(), Some("B"));
    assert_eq!(bl.attempts("B").unwrap(), 3);
    bl.mark_bad("B").unwrap();
    assert_eq!(bl.attempts("B").unwrap(), 0);
    bl.mark_good("A", 5).unwrap();
    assert_eq!(bl.attempts("A").unwrap(), 5);
    assert_eq!(bl.attempts("C").unwrap(), 0);
    // Refused before the command is called: not in the log.
    bootloader_reason(bl.set_primary("B; reboot", 3), "custom");
    bootloader_reason(bl.mark_bad(""), "custom");

    assert_eq!(
        custom.calls(),
        [
            "get-booted",
            "get-primary",
            "set-primary B 3",
            "get-primary",
            "get-attempts B",
            "mark-bad B",
            "get-attempts B",
            "mark-good A 5",
            "get-attempts A",
            "get-attempts C",
        ]
    );
    let state = std::fs::read_to_string(&custom.state).unwrap();
    let state = listing(&state);
    assert_eq!(state["BOOT_ORDER"], "B A");
    assert_eq!(state["BOOT_A_LEFT"], "5");
    assert_eq!(state["BOOT_B_LEFT"], "0");
}

#[test]
fn custom_example_script_empty_state_and_cmdline() {
    let dir = tempfile::tempdir().unwrap();
    let cmdline = write_cmdline(dir.path(), CMDLINE);
    let custom = Custom::new(
        "",
        &format!(
            "TERN_CUSTOM_BOOT_CMDLINE='{}'\nexport TERN_CUSTOM_BOOT_CMDLINE",
            cmdline.display()
        ),
    );
    let mut bl = custom.backend();
    assert_eq!(bl.booted().unwrap(), "B", "from tern.slot= on the command line");
    assert_eq!(bl.primary().unwrap(), None);
    bl.set_primary("A", 2).unwrap();
    bl.set_primary("B", 1).unwrap();
    assert_eq!(bl.primary().unwrap().as_deref(), Some("B"));
    assert_eq!(
        listing(&std::fs::read_to_string(&custom.state).unwrap())["BOOT_ORDER"],
        "B A"
    );
    assert_eq!(
        custom.calls(),
        [
            "get-booted",
            "get-primary",
            "set-primary A 2",
            "set-primary B 1",
            "get-primary"
        ]
    );
}

#[test]
fn custom_failure_reports_first_stderr_line() {
    // No BOOTED in the state and a command line without tern.slot=: get-booted fails.
    let dir = tempfile::tempdir().unwrap();
    let cmdline = write_cmdline(dir.path(), "console=ttyS0 quiet\n");
    let custom = Custom::new(
        "",
        &format!(
            "TERN_CUSTOM_BOOT_CMDLINE='{}'\nexport TERN_CUSTOM_BOOT_CMDLINE",
            cmdline.display()
        ),
    );
    let reason = bootloader_reason(custom.backend().booted(), "custom");
    assert!(reason.contains("get-booted"), "{reason}");
    assert!(reason.contains("custom-bootloader: booted slot unknown"), "{reason}");
}

#[test]
fn custom_misbehaving_commands() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(
        &dir.path().join("bad"),
        r#"case $1 in
    get-booted) echo 'not a name!' ;;
    get-primary) head -c 10000 /dev/zero | tr '\0' A ;;
    get-attempts) echo many ;;
    mark-bad) printf 'first line\nsecond line\n' >&2; exit 3 ;;
    mark-good) exit 1 ;;
    set-primary) sleep 5 ;;
esac
"#,
    );
    let mut bl = CustomBootloader::new(script.clone(), Duration::from_millis(500));

    let reason = bootloader_reason(bl.booted(), "custom");
    assert!(reason.contains("not a bootname"), "{reason}");
    let reason = bootloader_reason(bl.primary(), "custom");
    assert!(reason.contains("more than 4096 bytes"), "{reason}");
    let reason = bootloader_reason(bl.attempts("A"), "custom");
    assert!(reason.contains("not a number"), "{reason}");
    let reason = bootloader_reason(bl.mark_bad("A"), "custom");
    assert!(
        reason.contains("first line") && !reason.contains("second line"),
        "{reason}"
    );
    let reason = bootloader_reason(bl.mark_good("A", 3), "custom");
    assert!(reason.contains("failed"), "{reason}");

    // Killed at the timeout, even though the shell's `sleep` child keeps the pipes open.
    let started = Instant::now();
    let reason = bootloader_reason(bl.set_primary("A", 3), "custom");
    assert!(reason.contains("killed after"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    let missing = CustomBootloader::new(dir.path().join("nope"), Duration::from_secs(1));
    let reason = bootloader_reason(missing.booted(), "custom");
    assert!(reason.contains("cannot run"), "{reason}");
}
