//! Encrypted releases on the release engineer's side: naming recipients
//! (`--encrypt-for`), `tern bundle add-recipients`, `tern device key export`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use tern_core::keywrap::{self, RecipientKey, Recipients};

use super::server::{call, Api};
use crate::output::{json, Format};

/// Where `device:ID` and `tag:TAG` recipients are looked up.
#[derive(Debug, Clone, clap::Args)]
pub struct Registry {
    /// The server whose device registry resolves `device:ID` and `tag:TAG` recipients.
    #[arg(long, env = "TERN_SERVER")]
    pub server: Option<String>,
    /// An API token (viewer is enough to resolve recipients; releaser to publish them).
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Registry {
    fn api(&self) -> anyhow::Result<Api> {
        let Some(server) = &self.server else {
            bail!("`device:` and `tag:` recipients and --publish need --server (or TERN_SERVER)");
        };
        Ok(Api {
            server: server.clone(),
            token: self.token.clone(),
            output: Format::Json,
        })
    }
}

/// A recipient, resolved: a label for reports and its key.
pub type Recipient = (String, RecipientKey);

fn device_key(d: &serde_json::Value) -> anyhow::Result<Recipient> {
    let id = d["id"].as_str().unwrap_or("?");
    if d["status"] != "approved" {
        bail!(
            "device `{id}` is {} in the registry; only approved devices can be recipients",
            d["status"].as_str().unwrap_or("?")
        );
    }
    let Some(k) = d.get("encryption_key").filter(|k| !k.is_null()) else {
        bail!("device `{id}` has no encryption key in the registry (it enrolled with an agent that sent none)");
    };
    let key = RecipientKey::from_value(k).with_context(|| format!("device `{id}`'s encryption key"))?;
    Ok((format!("device:{id}"), key))
}

/// Resolve `--encrypt-for` values: `device:ID` and `tag:TAG` (every approved device with
/// the tag) through the server's registry, anything else as a key file (Tern's public key
/// JSON, `tern device key export` output, an X25519 SubjectPublicKeyInfo PEM, or a private
/// key file whose public half is taken).
///
/// The registry is trusted to return the devices' real keys; for a release whose secrecy
/// must not rest on the server, name key files exported from the devices themselves.
pub fn resolve(specs: &[String], registry: &Registry) -> anyhow::Result<Vec<Recipient>> {
    let mut out: Vec<Recipient> = Vec::new();
    let mut push = |r: Recipient| {
        if !out.iter().any(|(_, k)| *k == r.1) {
            out.push(r);
        }
    };
    for spec in specs {
        if let Some(id) = spec.strip_prefix("device:") {
            let d = call(
                &registry.api()?,
                reqwest::Method::GET,
                &format!("/api/v1/devices/{id}"),
                None,
            )
            .with_context(|| format!("resolving recipient {spec}"))?;
            push(device_key(&d)?);
        } else if let Some(tag) = spec.strip_prefix("tag:") {
            let mut n = 0;
            let mut after = String::new();
            loop {
                let page = call(
                    &registry.api()?,
                    reqwest::Method::GET,
                    &format!(
                        "/api/v1/devices?status=approved&tag={}&after={}",
                        super::server::segment(tag),
                        super::server::segment(&after)
                    ),
                    None,
                )
                .with_context(|| format!("resolving recipients {spec}"))?;
                for d in page["devices"].as_array().into_iter().flatten() {
                    if d.get("encryption_key").is_some_and(|k| !k.is_null()) {
                        push(device_key(d)?);
                        n += 1;
                    }
                }
                match page["next"].as_str() {
                    Some(next) => after = next.to_owned(),
                    None => break,
                }
            }
            if n == 0 {
                bail!("no approved device with an encryption key has tag `{tag}`");
            }
        } else {
            let path = PathBuf::from(spec);
            let key = tern_fs::load_recipient_key(&path).with_context(|| format!("recipient key file {spec}"))?;
            push((spec.clone(), key));
        }
    }
    for (label, key) in &out {
        // What the key ids are, to compare with `tern device key export` on the devices.
        eprintln!("recipient {label}: key {}", key.kid());
    }
    Ok(out)
}

/// `tern bundle add-recipients`.
#[derive(Debug, clap::Args)]
pub struct AddRecipientsArgs {
    /// The bundle (rewritten in place unless --out is given).
    pub bundle: PathBuf,
    /// A private key (X25519, 0600) that is already a recipient of every encrypted payload
    /// in the bundle (the release engineer's own key, or a group key): it unwraps the data
    /// keys so they can be wrapped for the new recipients.
    #[arg(long)]
    pub identity: PathBuf,
    /// New recipients: `device:ID`, `tag:TAG` or a key file (repeatable).
    #[arg(long = "encrypt-for", required = true)]
    pub encrypt_for: Vec<String>,
    /// Write the new bundle here instead.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also send the new wrapped keys to the server (the release must be published there).
    #[arg(long)]
    pub publish: bool,
    #[command(flatten)]
    pub registry: Registry,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// `tern bundle add-recipients`: unwrap each encrypted payload's data key with the
/// identity, wrap it for the new recipients, and rewrite only the bundle's recipients
/// entries: no payload is re-encrypted, no metadata re-signed.
pub fn add_recipients(a: AddRecipientsArgs) -> anyhow::Result<()> {
    let identity =
        tern_fs::load_recipient_secret(&a.identity).with_context(|| format!("identity {}", a.identity.display()))?;
    let new = resolve(&a.encrypt_for, &a.registry)?;
    let f = std::fs::File::open(&a.bundle).with_context(|| format!("bundle {}", a.bundle.display()))?;
    let inspection = tern_bundle::inspect(std::io::BufReader::new(f))?;
    let mut docs: BTreeMap<String, Recipients> = BTreeMap::new();
    let mut added = Vec::new();
    for p in &inspection.payloads {
        let (Some(m), Some(l)) = (&p.manifest, &p.listed) else {
            continue;
        };
        let (Some(enc), Some(sha256)) = (&m.encryption, l.hashes.get("sha256")) else {
            continue;
        };
        let mut doc = match inspection.recipient_docs.get(sha256) {
            Some(bytes) => tern_bundle::parse_recipients(sha256, bytes, m)?,
            None => Recipients::new(sha256, &enc.key_commitment),
        };
        let key = keywrap::unwrap_any(&doc.recipients, std::slice::from_ref(&identity), &enc.key_commitment)
            .with_context(|| format!("payload {}", p.target))?
            .with_context(|| {
                format!(
                    "payload {}: the identity (key {}) is not one of its recipients",
                    p.target,
                    identity.public().kid()
                )
            })?;
        let mut n = 0;
        for (label, r) in &new {
            if doc.add(keywrap::wrap(&key, r)?) {
                n += 1;
                added.push(serde_json::json!({"payload": p.target, "recipient": label, "kid": r.kid()}));
            }
        }
        if n > 0 {
            docs.insert(sha256.clone(), doc);
        }
    }
    if inspection
        .payloads
        .iter()
        .all(|p| p.manifest.as_ref().and_then(|m| m.encryption.as_ref()).is_none())
    {
        bail!("bundle {} has no encrypted payload", a.bundle.display());
    }
    let out = a.out.clone().unwrap_or_else(|| a.bundle.clone());
    let raw: BTreeMap<String, Vec<u8>> = docs.iter().map(|(h, d)| (h.clone(), d.to_bytes())).collect();
    let size = if raw.is_empty() && out == a.bundle {
        std::fs::metadata(&out)?.len()
    } else {
        tern_bundle::replace_recipients(&a.bundle, &out, &raw)?
    };
    let mut published = Vec::new();
    if a.publish {
        let api = a.registry.api()?;
        for bytes in raw.values() {
            published.push(call(
                &api,
                reqwest::Method::POST,
                "/api/v1/recipients",
                Some(bytes.clone().into()),
            )?);
        }
    }
    let report = serde_json::json!({"bundle": out, "bytes": size, "added": added, "published": published});
    match a.output {
        Format::Json => json(&report),
        Format::Text => {
            for x in &added {
                println!(
                    "added    {} for {} (key {})",
                    x["payload"].as_str().unwrap_or("?"),
                    x["recipient"].as_str().unwrap_or("?"),
                    x["kid"].as_str().unwrap_or("?")
                );
            }
            if added.is_empty() {
                println!("every named recipient was one already; nothing changed");
            }
            println!("wrote    {} ({size} bytes)", out.display());
            for p in &published {
                println!(
                    "server   {} new wrapped key(s) for payload {}",
                    p["added"],
                    p["sha256"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
    }
}

/// `tern device key export`.
#[derive(Debug, clap::Args)]
pub struct KeyExportArgs {
    #[command(flatten)]
    pub common: super::agent::ConfigArgs,
}

/// `tern device key export`: the device's public keys (its encryption key is made first if
/// it has none), for `--encrypt-for FILE`.
pub fn key_export(a: KeyExportArgs) -> anyhow::Result<()> {
    let cfg = super::agent::load(&a.common.config)?;
    let enc = tern_agent::keystore::ensure_device_key(&cfg)?;
    let signing = cfg
        .server
        .as_ref()
        .map(|s| s.device_key_path(&cfg.state_dir))
        .filter(|p| p.exists())
        .map(|p| tern_fs::load_signing_key(&p).map(|k| k.public().to_value().clone()))
        .transpose()?;
    let v = serde_json::json!({
        "device_id": cfg.server.as_ref().map(|s| s.device_id.clone()),
        "kid": enc.kid(),
        "encryption_key": enc.to_value(),
        "signing_key": signing,
    });
    match a.common.output {
        Format::Json => json(&v),
        // The text form is the same JSON: it is what `--encrypt-for FILE` reads.
        Format::Text => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
    }
}
