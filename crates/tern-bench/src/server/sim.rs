//! The simulated devices: a few that check in with their own keys, spread over the id
//! range, and many registered with one shared key the server never reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tern_core::director::{self, CheckIn, SlotReport};
use tern_core::{DateTime, KeyAlgorithm, PublicKey, SigningKey};

/// One simulated device that checks in.
pub(super) struct SimDevice {
    pub(super) id: String,
    pub(super) key: SigningKey,
    /// The challenge its next check-in answers (from the server's last answer).
    pub(super) challenge: std::sync::Mutex<String>,
}

impl SimDevice {
    /// Note the challenge in the answer to a check-in.
    pub(super) fn answered(&self, body: &[u8]) {
        if let Some(c) = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("challenge").and_then(|c| c.as_str()).map(str::to_owned))
        {
            if let Ok(mut mine) = self.challenge.lock() {
                *mine = c;
            }
        }
    }
}

pub(super) struct SimDevices {
    pub(super) count: usize,
    /// The devices that check in, spread over the id range.
    pub(super) active: Arc<Vec<SimDevice>>,
    /// Their indices in the id range.
    pub(super) active_at: BTreeMap<usize, usize>,
    /// The key every other device is registered with.
    pub(super) shared: PublicKey,
}

pub(super) fn device_id(i: usize) -> String {
    format!("bench-{i:06}")
}

impl SimDevices {
    pub(super) fn generate(count: usize, active: usize) -> anyhow::Result<Self> {
        let mut devices = Vec::with_capacity(active);
        let mut active_at = BTreeMap::new();
        for n in 0..active {
            let i = n * count / active;
            active_at.insert(i, n);
            devices.push(SimDevice {
                id: device_id(i),
                key: SigningKey::generate(KeyAlgorithm::Ed25519)?.0,
                challenge: Default::default(),
            });
        }
        let shared = SigningKey::generate(KeyAlgorithm::Ed25519)?.0.public().clone();
        Ok(SimDevices {
            count,
            active: Arc::new(devices),
            active_at,
            shared,
        })
    }

    /// Every device, approved. The active devices come with their own keys, the others with
    /// the shared one; re-registering (a reused `--database-url`) replaces the keys, which
    /// clears the server's replay guard for them.
    pub(super) fn registrations(&self) -> Vec<tern_server::db::NewDevice> {
        let shared = (self.shared.to_value().clone(), self.shared.keyid().as_str().to_owned());
        (0..self.count)
            .map(|i| {
                let (public_key, keyid) = match self.active_at.get(&i) {
                    Some(&n) => {
                        let public = self.active[n].key.public();
                        (public.to_value().clone(), public.keyid().as_str().to_owned())
                    }
                    None => shared.clone(),
                };
                tern_server::db::NewDevice {
                    id: device_id(i),
                    public_key,
                    keyid,
                    device_type: "tern-sim".into(),
                    hardware: "bench".into(),
                    tags: Vec::new(),
                }
            })
            .collect()
    }
}

/// A signed check-in with nothing new: idle, one committed slot, no deployment.
pub(super) fn checkin_body(dev: &SimDevice) -> anyhow::Result<Vec<u8>> {
    let doc = CheckIn {
        kind: director::CHECKIN_TYPE.into(),
        device_id: dev.id.clone(),
        nonce: tern_server::random_hex(16),
        challenge: dev.challenge.lock().map(|c| c.clone()).unwrap_or_default(),
        time: DateTime::from_unix(tern_server::unix_now()).to_string(),
        phase: "idle".into(),
        slots: vec![SlotReport {
            name: "rootfs.a".into(),
            booted: true,
            status: "committed".into(),
            version: Some("1.0.0".into()),
            target: Some("rootfs.img".into()),
            sha256: Some("5a".repeat(32)),
        }],
        deployment: None,
        refused_order: None,
    };
    Ok(director::sign_document("check-in", &doc, &dev.key)?)
}

/// The directory of a `sqlite:` database URL's file.
pub(super) fn sqlite_dir(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = Path::new(path.split('?').next().unwrap_or(path));
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_give_active_devices_their_keys() {
        let sims = SimDevices::generate(1200, 3).unwrap();
        let regs = sims.registrations();
        assert_eq!(regs.len(), 1200);
        let shared = sims.shared.keyid();
        assert_eq!(regs.iter().filter(|r| r.keyid != shared.as_str()).count(), 3);
        for d in sims.active.iter() {
            let r = regs.iter().find(|r| r.id == d.id).unwrap();
            assert_eq!(r.keyid, d.key.public().keyid().as_str());
            assert_eq!(&r.public_key, d.key.public().to_value());
        }
    }

    /// A reused `--database-url`: the second run's keys replace the first's, and the bulk
    /// path leaves a decommissioned device alone.
    #[tokio::test(flavor = "multi_thread")]
    async fn registering_again_replaces_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tern_server::ServerConfig::for_data_dir(dir.path());
        tern_server::keys::init(&cfg.key_dir(), crate::output::now(), 1).unwrap();
        let state = tern_server::open(cfg).await.unwrap();
        let first = SimDevices::generate(1200, 3).unwrap();
        state.db.register_devices(&first.registrations()).await.unwrap();
        let second = SimDevices::generate(1200, 3).unwrap();
        state.db.register_devices(&second.registrations()).await.unwrap();
        let d = &second.active[1];
        let stored = tern_server::fleet::device(&state, &d.id).await.unwrap().unwrap();
        assert_eq!(stored.keyid, d.key.public().keyid().as_str());
        assert_eq!(stored.status, "approved");
        assert_eq!(tern_server::fleet::devices(&state, None).await.unwrap().len(), 1200);

        tern_server::fleet::set_device_status(&state, &d.id, "decommissioned", None, "test")
            .await
            .unwrap();
        let refused = state.db.register_devices(&second.registrations()).await.unwrap_err();
        assert!(refused.to_string().contains("decommissioned"), "{refused}");
        let stored = tern_server::fleet::device(&state, &d.id).await.unwrap().unwrap();
        assert_eq!(stored.status, "decommissioned");
    }

    #[test]
    fn sqlite_dirs() {
        assert_eq!(
            sqlite_dir("sqlite:///tmp/x/tern.db?mode=rwc"),
            Some(PathBuf::from("/tmp/x"))
        );
        assert_eq!(sqlite_dir("sqlite:tern.db"), None);
        assert_eq!(sqlite_dir("postgres://h/db"), None);
    }

    #[test]
    fn checkin_is_accepted_by_the_parser() {
        let sims = SimDevices::generate(10, 1).unwrap();
        let body = checkin_body(&sims.active[0]).unwrap();
        let (env, c) = director::parse_checkin(&body).unwrap();
        director::verify_checkin(&env, sims.active[0].key.public()).unwrap();
        assert_eq!(c.phase, "idle");
        assert!(c.deployment.is_none());
    }
}
