//! `tern key`: generate and show signing keys.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use tern_core::KeyAlgorithm;
use tern_fs::KeyFiles;

use crate::output::{json, Format};

/// Key commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a key pair: PREFIX.pem (private, PKCS#8, mode 0600) and PREFIX.pub.json (TUF form).
    Generate(GenerateArgs),
    /// Show a key's id, type and public half.
    Show(ShowArgs),
}

/// Key types `generate` offers.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeyType {
    /// Ed25519 (the default).
    Ed25519,
    /// ECDSA over NIST P-256 (ecdsa-sha2-nistp256).
    EcdsaP256,
    /// RSA 3072 with RSASSA-PSS SHA-256.
    Rsa3072,
    /// X25519 encryption key (an HPKE recipient, not a signing key): a group key, or the
    /// release engineer's own key for `tern bundle add-recipients --identity`.
    X25519,
}

/// `tern key generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Path prefix of the two files written; neither may exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Key type.
    #[arg(long = "type", value_enum, default_value = "ed25519")]
    pub key_type: KeyType,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// `tern key show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// A public key (TUF JSON) or private key (PEM) file.
    pub file: PathBuf,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

#[derive(Serialize)]
struct KeyReport {
    keyid: String,
    keytype: String,
    scheme: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    private: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public: Option<PathBuf>,
    key: serde_json::Value,
}

impl KeyReport {
    fn new(key: &tern_core::PublicKey, files: Option<&KeyFiles>) -> Self {
        KeyReport {
            keyid: key.keyid().to_string(),
            keytype: key.keytype().into(),
            scheme: key.scheme().into(),
            private: files.map(|f| f.private.clone()),
            public: files.map(|f| f.public.clone()),
            key: key.to_value().clone(),
        }
    }
}

/// Run a key command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Generate(a) => {
            let alg = match a.key_type {
                KeyType::Ed25519 => KeyAlgorithm::Ed25519,
                KeyType::EcdsaP256 => KeyAlgorithm::EcdsaP256,
                KeyType::Rsa3072 => KeyAlgorithm::RsaPssSha256,
                KeyType::X25519 => {
                    let files = KeyFiles::for_prefix(&a.out);
                    let public = tern_fs::generate_recipient_files(&files)?;
                    let report = KeyReport {
                        keyid: public.kid(),
                        keytype: "x25519".into(),
                        scheme: tern_core::keywrap::KEY_SCHEME.into(),
                        private: Some(files.private.clone()),
                        public: Some(files.public.clone()),
                        key: public.to_value(),
                    };
                    return match a.output {
                        Format::Json => json(&report),
                        Format::Text => {
                            println!("key id   {} (encryption key)", report.keyid);
                            println!("private  {} (mode 0600)", files.private.display());
                            println!("public   {} (for --encrypt-for)", files.public.display());
                            Ok(())
                        }
                    };
                }
            };
            let files = KeyFiles::for_prefix(&a.out);
            let public = tern_fs::generate_key_files(alg, &files)?;
            let report = KeyReport::new(&public, Some(&files));
            match a.output {
                Format::Json => json(&report),
                Format::Text => {
                    println!("key id   {}", report.keyid);
                    println!("scheme   {}", report.scheme);
                    println!("private  {} (mode 0600: keep it offline)", files.private.display());
                    println!("public   {}", files.public.display());
                    Ok(())
                }
            }
        }
        Command::Show(a) => {
            let public = tern_fs::load_public_key(&a.file)?;
            let report = KeyReport::new(&public, None);
            match a.output {
                Format::Json => json(&report),
                Format::Text => {
                    println!("key id   {}", report.keyid);
                    println!("scheme   {}", report.scheme);
                    println!("{}", serde_json::to_string_pretty(&report.key)?);
                    Ok(())
                }
            }
        }
    }
}
