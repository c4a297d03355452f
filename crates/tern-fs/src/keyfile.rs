//! Private and public key files.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tern_core::keywrap::{RecipientKey, RecipientSecret, WrapError};
use tern_core::{KeyAlgorithm, PublicKey, SigningKey};
use zeroize::Zeroizing;

use crate::{create_new, io_err, Error, Result};

/// Key files are small; anything larger is not one.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// Where a signing key comes from. Files today; hardware tokens (PKCS#11) implement the same trait.
pub trait KeySource {
    /// Make the key available for signing.
    fn signing_key(&self) -> Result<SigningKey>;
    /// A human-readable name for messages (never key material).
    fn describe(&self) -> String;
}

/// A PKCS#8 PEM private key file.
#[derive(Debug, Clone)]
pub struct FileKeySource {
    /// The file.
    pub path: PathBuf,
}

impl KeySource for FileKeySource {
    fn signing_key(&self) -> Result<SigningKey> {
        load_signing_key(&self.path)
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

fn read_bounded(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    read_open(path, File::open(path).map_err(io_err(path))?)
}

fn read_open(path: &Path, f: File) -> Result<Zeroizing<Vec<u8>>> {
    let size = f.metadata().map_err(io_err(path))?.len();
    if size > MAX_KEY_FILE {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(size as usize));
    f.take(MAX_KEY_FILE).read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

/// Read a private key file, refusing one that group or others may read or write.
fn read_private(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    // One open, and the checks on what was opened: no window to swap the file in between.
    let f = File::open(path).map_err(io_err(path))?;
    let mode = f.metadata().map_err(io_err(path))?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    read_open(path, f)
}

/// Load a private key, refusing a file that group or others may read or write.
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    let pem = read_private(path)?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|source| Error::Key {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// Load a public key in TUF JSON form (`{"keytype", "scheme", "keyval": {"public"}}`).
///
/// A private key file is accepted too, and its public half returned, so that a release
/// engineer can name the same file for both.
pub fn load_public_key(path: &Path) -> Result<PublicKey> {
    let bytes = read_bounded(path)?;
    if bytes.starts_with(b"-----BEGIN") {
        return Ok(load_signing_key(path)?.public().clone());
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Key {
        path: path.to_owned(),
        source: Box::new(tern_core::Error::Malformed {
            role: "public key".into(),
            reason: e.to_string(),
        }),
    })?;
    PublicKey::from_value("public key", &value).map_err(|source| Error::Key {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn wrap_err(path: &Path) -> impl FnOnce(WrapError) -> Error + '_ {
    move |source| Error::EncryptionKey {
        path: path.to_owned(),
        source,
    }
}

/// Load an X25519 private key (a device's or a group's encryption key), refusing a file
/// that group or others may read or write.
pub fn load_recipient_secret(path: &Path) -> Result<RecipientSecret> {
    let pem = read_private(path)?;
    RecipientSecret::from_pkcs8_pem(&pem).map_err(wrap_err(path))
}

/// Load a recipient's public key: Tern's JSON form (also inside `tern device key export`'s
/// output, under `encryption_key`), a SubjectPublicKeyInfo PEM, or the private key file.
pub fn load_recipient_key(path: &Path) -> Result<RecipientKey> {
    let bytes = read_bounded(path)?;
    if bytes.starts_with(b"-----BEGIN PUBLIC KEY") {
        return RecipientKey::from_spki_pem(&bytes).map_err(wrap_err(path));
    }
    if bytes.starts_with(b"-----BEGIN") {
        return Ok(load_recipient_secret(path)?.public().clone());
    }
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| wrap_err(path)(WrapError::Key(format!("not JSON: {e}"))))?;
    let value = value.get("encryption_key").unwrap_or(&value);
    RecipientKey::from_value(value).map_err(wrap_err(path))
}

/// Generate an X25519 key pair: the private key (PKCS#8 PEM, 0600) and the public key
/// (JSON); neither may exist. On failure neither is left behind.
pub fn generate_recipient_files(files: &KeyFiles) -> Result<RecipientKey> {
    refuse_existing(files)?;
    let (key, pem) = RecipientSecret::generate().map_err(wrap_err(&files.private))?;
    write_pair(files, &pem, &key.public().to_value())?;
    Ok(key.public().clone())
}

fn refuse_existing(files: &KeyFiles) -> Result<()> {
    for p in [&files.private, &files.public] {
        if p.symlink_metadata().is_ok() {
            return Err(Error::Exists { path: p.clone() });
        }
    }
    Ok(())
}

/// Write the private key (0600) and the public key JSON (0644), each created exclusively
/// and atomically; if the second fails, the first is removed.
fn write_pair(files: &KeyFiles, pem: &str, public: &serde_json::Value) -> Result<()> {
    let mut public = serde_json::to_vec_pretty(public).unwrap_or_default();
    public.push(b'\n');
    create_new(&files.private, pem.as_bytes(), 0o600)?;
    if let Err(e) = create_new(&files.public, &public, 0o644) {
        let _ = fs::remove_file(&files.private);
        return Err(e);
    }
    Ok(())
}

/// The two files `tern key generate` writes.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    /// The private key, PKCS#8 PEM, mode 0600.
    pub private: PathBuf,
    /// The public key, TUF JSON.
    pub public: PathBuf,
}

impl KeyFiles {
    /// `PREFIX.pem` and `PREFIX.pub.json`.
    pub fn for_prefix(prefix: &Path) -> Self {
        let p = prefix.as_os_str().to_string_lossy();
        KeyFiles {
            private: PathBuf::from(format!("{p}.pem")),
            public: PathBuf::from(format!("{p}.pub.json")),
        }
    }
}

/// Generate a key and write both files; neither may exist. On failure neither is left behind.
pub fn generate_key_files(alg: KeyAlgorithm, files: &KeyFiles) -> Result<PublicKey> {
    refuse_existing(files)?;
    let (key, pem) = SigningKey::generate(alg).map_err(|source| Error::Key {
        path: files.private.clone(),
        source: Box::new(source),
    })?;
    write_pair(files, &pem, key.public().to_value())?;
    Ok(key.public().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_and_wide_modes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let files = KeyFiles::for_prefix(&d.path().join("root"));
        let public = generate_key_files(KeyAlgorithm::Ed25519, &files).unwrap();
        assert_eq!(
            fs::metadata(&files.private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            load_signing_key(&files.private).unwrap().public().keyid(),
            public.keyid()
        );
        assert_eq!(load_public_key(&files.public).unwrap().keyid(), public.keyid());
        assert!(matches!(
            generate_key_files(KeyAlgorithm::Ed25519, &files),
            Err(Error::Exists { .. })
        ));
        fs::set_permissions(&files.private, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_signing_key(&files.private),
            Err(Error::TooOpen { mode: 0o640, .. })
        ));
    }

    #[test]
    fn encryption_keys_load_in_every_form_and_wide_modes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let files = KeyFiles::for_prefix(&d.path().join("group"));
        let public = generate_recipient_files(&files).unwrap();
        assert_eq!(load_recipient_secret(&files.private).unwrap().public(), &public);
        assert_eq!(load_recipient_key(&files.public).unwrap(), public);
        assert_eq!(load_recipient_key(&files.private).unwrap(), public);
        let export = d.path().join("export.json");
        fs::write(
            &export,
            serde_json::json!({"device_id": "d", "encryption_key": public.to_value()}).to_string(),
        )
        .unwrap();
        assert_eq!(load_recipient_key(&export).unwrap(), public);
        assert!(matches!(
            load_recipient_key(&d.path().join("group.pem").with_extension("nope")),
            Err(Error::Io { .. })
        ));
        fs::set_permissions(&files.private, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_recipient_secret(&files.private),
            Err(Error::TooOpen { mode: 0o644, .. })
        ));
    }
}
