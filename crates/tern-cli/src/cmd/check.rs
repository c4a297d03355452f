//! `tern agent check-config` and `tern server check-config`: a configuration and the files
//! it names, checked without starting anything. Each problem names the file, the line and
//! the key at fault; when there is none, what would be used is printed.

use std::fmt::Display;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::bail;

/// Problems found in one configuration file, located by key.
pub struct Findings {
    file: Option<PathBuf>,
    doc: Option<toml_edit::ImDocument<String>>,
    problems: Vec<String>,
    used: Vec<(String, String)>,
}

impl Findings {
    /// For `file` (none: a configuration from flags and the environment only).
    pub fn new(file: Option<&Path>) -> Self {
        let doc = file
            .and_then(|f| read_max(f, tern_agent::config::MAX_CONFIG_BYTES).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| toml_edit::ImDocument::parse(text).ok());
        Findings {
            file: file.map(Path::to_owned),
            doc,
            problems: Vec::new(),
            used: Vec::new(),
        }
    }

    /// The line where `key` (`a.b`, `slot.1.device`: a number picks one of `[[slot]]`) is set.
    fn line(&self, key: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let parts: Vec<&str> = key.split('.').collect();
        let (last, tables) = parts.split_last()?;
        let mut table = doc.as_table();
        let mut i = 0;
        while i < tables.len() {
            let item = table.get(tables[i])?;
            table = match (item.as_table(), item.as_array_of_tables()) {
                (Some(t), _) => t,
                (None, Some(array)) => {
                    i += 1;
                    array.get(tables.get(i)?.parse().ok()?)?
                }
                _ => return None,
            };
            i += 1;
        }
        let at = table.key(last)?.span()?.start;
        Some(doc.raw()[..at].matches('\n').count() + 1)
    }

    /// `key` is wrong: `why`.
    pub fn bad(&mut self, key: &str, why: impl Display) {
        let place = match (&self.file, self.line(key)) {
            (Some(f), Some(line)) => format!("{}:{line}: ", f.display()),
            (Some(f), None) => format!("{}: ", f.display()),
            (None, _) => String::new(),
        };
        self.problems.push(format!("{place}`{key}`: {why}"));
    }

    /// What would be used, printed when nothing is wrong.
    pub fn uses(&mut self, what: &str, value: impl Display) {
        self.used.push((what.to_owned(), value.to_string()));
    }

    /// Check that `path` (set by `key`) is a file readable only by its owner: a private key.
    pub fn private_key(&mut self, key: &str, path: &Path) -> bool {
        match std::fs::metadata(path) {
            Err(e) => {
                self.bad(key, format!("{}: {e}", shown(path)));
                false
            }
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                self.bad(
                    key,
                    format!(
                        "{} is readable or writable by others (mode {:o}): make it 0600",
                        shown(path),
                        m.permissions().mode() & 0o777
                    ),
                );
                false
            }
            Ok(_) => true,
        }
    }

    /// Check that `path` (set by `key`) is a readable file; its bytes.
    pub fn readable(&mut self, key: &str, path: &Path) -> Option<Vec<u8>> {
        match read_max(path, MAX_NAMED_FILE) {
            Ok(b) => Some(b),
            Err(e) => {
                self.bad(key, format!("{}: {e}", shown(path)));
                None
            }
        }
    }

    /// Check that `path` (set by `key`) is an executable file.
    pub fn executable(&mut self, key: &str, path: &Path) {
        match std::fs::metadata(path) {
            Err(e) => self.bad(key, format!("{}: {e}", shown(path))),
            Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
                self.bad(key, format!("{} is not an executable file", shown(path)))
            }
            Ok(_) => {}
        }
    }

    /// Check that `program` is on `PATH` (needed by `key`'s choice); where it is.
    pub fn on_path(&mut self, key: &str, program: &str) -> Option<PathBuf> {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        });
        if found.is_none() {
            self.bad(key, format!("`{program}` is not on PATH"));
        }
        found
    }

    /// Check that the directory `path` (set by `key`) exists, or that its parent does.
    pub fn directory(&mut self, key: &str, path: &Path) {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => self.bad(key, format!("{} is not a directory", shown(path))),
            Err(_) if path.parent().is_some_and(Path::is_dir) => {} // made at first start
            Err(e) => self.bad(key, format!("{}: {e} (nor does its parent exist)", shown(path))),
        }
    }

    /// Print what would be used, or every problem and fail.
    pub fn finish(self) -> anyhow::Result<()> {
        let name = self.file.as_ref().map_or("the configuration".to_owned(), |f| shown(f));
        if !self.problems.is_empty() {
            for p in &self.problems {
                eprintln!("{p}");
            }
            bail!("{} problem(s) in {name}", self.problems.len());
        }
        println!("{name}: no problems found; it would use:");
        let width = self.used.iter().map(|(w, _)| w.len()).max().unwrap_or(0);
        for (what, value) in &self.used {
            println!("  {what:<width$}  {value}");
        }
        Ok(())
    }
}

/// Largest file a configuration names that is read whole (a root, a certificate).
const MAX_NAMED_FILE: u64 = 16 << 20;

/// The bytes of `path`, refused past `max` before they are read.
fn read_max(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(bytes)
}

/// A path as shown: escaped and bounded.
pub fn shown(p: &Path) -> String {
    tern_core::text::shown(&p.display().to_string())
}

/// What kind of thing a slot's device is, or why it cannot be one.
pub fn slot_kind(path: &Path) -> Result<String, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", shown(path)))?;
    let t = m.file_type();
    Ok(if t.is_block_device() {
        "block device".to_owned()
    } else if t.is_char_device() {
        "character device".to_owned()
    } else if t.is_file() {
        format!("file of {} bytes", m.len())
    } else {
        return Err(format!(
            "{} is not a block device, character device or file",
            shown(path)
        ));
    })
}

/// Check a log filter (`log` key).
pub fn log_filter(f: &mut Findings, value: Option<&str>) {
    match value {
        Some(v) => match crate::logging::parse(v) {
            Ok(()) => f.uses("log", v),
            Err(e) => f.bad("log", e),
        },
        None => f.uses("log", "info (the default)"),
    }
}

/// `tern agent check-config`.
pub fn agent(path: &Path) -> anyhow::Result<()> {
    use tern_agent::config::{AgentConfig, BootloaderConfig};
    // What cannot be parsed is reported by the loader, with its key and line.
    let cfg = AgentConfig::load(path)?;
    let mut f = Findings::new(Some(path));
    f.uses(
        "device",
        format!("type {}, hardware {}", cfg.device_type, cfg.hardware_revision),
    );
    if let Some(bytes) = f.readable("trusted_root", &cfg.trusted_root) {
        match tern_core::trust::load_trusted_root(&bytes) {
            Ok(root) => f.uses(
                "trusted root",
                format!("{} (version {})", shown(&cfg.trusted_root), root.signed.common.version),
            ),
            Err(e) => f.bad(
                "trusted_root",
                format!("{} is not a usable root: {e}", shown(&cfg.trusted_root)),
            ),
        }
    }
    f.directory("state_dir", &cfg.state_dir);
    f.uses("state", shown(&cfg.state_dir));
    match &cfg.bootloader {
        BootloaderConfig::Sim { state } => f.uses("bootloader", format!("simulated, {}", shown(state))),
        BootloaderConfig::Uboot { fw_env_config, cmdline } => {
            f.readable("bootloader.fw_env_config", fw_env_config);
            f.readable("bootloader.cmdline", cmdline);
            let get = f.on_path("bootloader.backend", "fw_printenv");
            let set = f.on_path("bootloader.backend", "fw_setenv");
            if let (Some(get), Some(set)) = (get, set) {
                f.uses(
                    "bootloader",
                    format!(
                        "U-Boot via {} and {}, {}",
                        shown(&get),
                        shown(&set),
                        shown(fw_env_config)
                    ),
                );
            }
        }
        BootloaderConfig::Grub { grubenv, cmdline } => {
            if !grubenv.is_file() {
                f.bad(
                    "bootloader.grubenv",
                    format!(
                        "{} is not a file (make it with grub-editenv FILE create)",
                        shown(grubenv)
                    ),
                );
            }
            f.readable("bootloader.cmdline", cmdline);
            if let Some(tool) = f.on_path("bootloader.backend", "grub-editenv") {
                f.uses("bootloader", format!("GRUB via {}, {}", shown(&tool), shown(grubenv)));
            }
        }
        BootloaderConfig::Custom { command, .. } => {
            f.executable("bootloader.command", command);
            f.uses("bootloader", format!("custom, {}", shown(command)));
        }
    }
    for (i, s) in cfg.slots.iter().enumerate() {
        match slot_kind(&s.device) {
            Ok(kind) => f.uses(
                &format!("slot {}", s.name),
                format!("{} (class {}): {}, {kind}", s.bootname, s.class, shown(&s.device)),
            ),
            Err(e) => f.bad(&format!("slot.{i}.device"), e),
        }
    }
    let h = &cfg.hooks;
    for (key, hook) in [
        ("hooks.pre_install", &h.pre_install),
        ("hooks.post_install", &h.post_install),
        ("hooks.health_check", &h.health_check),
        ("hooks.on_rollback", &h.on_rollback),
        ("hooks.reboot", &h.reboot),
    ] {
        if let Some(p) = hook {
            f.executable(key, p);
        }
    }
    for root in &cfg.install_roots {
        if !root.is_dir() {
            f.bad("install_roots", format!("{} is not a directory", shown(root)));
        }
    }
    if let Some(inbox) = &cfg.inbox {
        f.directory("inbox", inbox);
    }
    if let Some(s) = &cfg.server {
        if !(s.url.starts_with("https://") || s.url.starts_with("http://")) {
            f.bad(
                "server.url",
                format!("`{}` is not an http(s):// URL", tern_core::text::shown(&s.url)),
            );
        }
        if let Some(bytes) = f.readable("server.director_root", &s.director_root) {
            if let Err(e) = tern_core::trust::load_trusted_root(&bytes) {
                f.bad(
                    "server.director_root",
                    format!("{} is not a usable root: {e}", shown(&s.director_root)),
                );
            }
        }
        let key = s.device_key_path(&cfg.state_dir);
        let key_name = if s.device_key.is_some() {
            "server.device_key"
        } else {
            "state_dir"
        };
        let key_state = if !key.exists() {
            "not made yet (`tern device enroll` makes it)".to_owned()
        } else if f.private_key(key_name, &key) {
            shown(&key)
        } else {
            String::new()
        };
        for (k, p) in [("server.ca_cert", &s.ca_cert), ("server.client_cert", &s.client_cert)] {
            if let Some(p) = p {
                f.readable(k, p);
            }
        }
        f.uses(
            "server",
            format!(
                "{} as device {}",
                tern_core::text::shown(&s.url),
                tern_core::text::shown(&s.device_id)
            ),
        );
        f.uses("device key", key_state);
    }
    let own = cfg.encryption_key_path();
    if own.exists() {
        let key = if cfg.encryption.key.is_some() {
            "encryption.key"
        } else {
            "state_dir"
        };
        f.private_key(key, &own);
    }
    for g in &cfg.encryption.group_keys {
        f.private_key("encryption.group_keys", g);
    }
    log_filter(&mut f, cfg.log.as_deref());
    f.finish()
}

/// `tern server check-config`: `cfg` as `file` (if any), the environment and flags made it.
pub fn server(file: Option<&Path>, cfg: &tern_server::ServerConfig) -> anyhow::Result<()> {
    let mut f = Findings::new(file);
    match cfg.listen.parse::<std::net::SocketAddr>() {
        Ok(a) => f.uses(
            "listen",
            format!("{a} ({})", if cfg.tls.is_some() { "HTTPS" } else { "plain HTTP" }),
        ),
        Err(e) => f.bad("listen", format!("`{}`: {e}", tern_core::text::shown(&cfg.listen))),
    }
    f.directory("data_dir", &cfg.data_dir);
    let url = cfg.database_url();
    if url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://") {
        f.uses("database", without_password(&url));
    } else {
        f.bad("database_url", "neither sqlite: nor postgres://");
    }
    let keys = cfg.key_dir();
    let key_of = if cfg.key_dir.is_some() { "key_dir" } else { "data_dir" };
    for name in ["snapshot", "timestamp", "director"] {
        let path = keys.join(format!("{name}.pem"));
        if !path.exists() {
            f.bad(
                key_of,
                format!("no {} (`tern server init` makes the online keys)", shown(&path)),
            );
        } else {
            f.private_key(key_of, &path);
        }
    }
    f.uses("online keys", shown(&keys));
    if keys.join("director-root.pem").exists() {
        f.uses(
            "WARNING",
            "the director's offline root key (director-root.pem) is still here: move it off this machine",
        );
    }
    if let Some(dir) = &cfg.artifact_dir {
        f.directory("artifact_dir", dir);
    }
    f.uses("artifacts", shown(&cfg.artifact_dir()));
    if let Some(tls) = &cfg.tls {
        if let Some(pem) = f.readable("tls.cert", &tls.cert) {
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                f.bad("tls.cert", format!("{} holds no PEM certificate", shown(&tls.cert)));
            }
        }
        f.private_key("tls.key", &tls.key);
        if let Some(ca) = &tls.client_ca {
            f.readable("tls.client_ca", ca);
        }
    }
    log_filter(&mut f, cfg.log.as_deref());
    f.finish()
}

/// A database URL as shown: its password left out, from the user part and from a
/// `password=` or `sslpassword=` parameter alike.
fn without_password(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = base[scheme + 3..at].split(':').next().unwrap_or("");
            format!("{}{user}@{}", &base[..scheme + 3], &base[at + 1..])
        }
        _ => base.to_owned(),
    };
    if query.is_empty() {
        return base;
    }
    let query: Vec<&str> = query
        .split('&')
        .map(|p| {
            if p.to_ascii_lowercase().contains("password") {
                "(password left out)"
            } else {
                p
            }
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}
