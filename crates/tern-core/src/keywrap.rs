//! Data keys wrapped per recipient with HPKE (RFC 9180).
//!
//! Every encrypted payload has its own random 256-bit data key. Nothing uses it directly:
//! its [`stream_aead`](crate::stream_aead) records are sealed under HMAC-SHA-256(key,
//! "tern record key v1"), the manifest's commitment and sealed image digest use their own
//! labels, so each use has its own key. The key is sealed separately for each
//! recipient public key, a device's or a group's, with HPKE in base mode:
//!
//! ```text
//! suite   DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM  (kem 0x20, kdf 1, aead 2)
//! info    "tern data key v1"
//! aad     the payload's key commitment (hex), so a wrapped key belongs to one payload
//! entry   kid = first 8 bytes of SHA-256(recipient public key), enc (32 bytes), ct (48 bytes)
//! ```
//!
//! The wrapped keys are *not* signed: they live beside the signed metadata (the bundle's
//! `recipients/` entries, the server's recipients table), so that a recipient can be added
//! later without re-signing anything. What binds a wrapped key to a payload is the signed
//! manifest's key commitment, HMAC-SHA-256(data key, "tern key commitment v1"): a device
//! accepts an unwrapped key only if its commitment matches, so a substituted or corrupt
//! entry is refused before a byte is decrypted (and AES-GCM, which does not commit to its
//! key, is never asked to tell two keys apart).
//!
//! Key files: the private half is PKCS#8 (RFC 8410, OID 1.3.101.110), as
//! `openssl genpkey -algorithm X25519` writes it; the public half is TUF-style JSON
//! (`{"keytype": "x25519", "scheme": "hpke-x25519-sha256-aes256gcm", "keyval": {"public"}}`)
//! or SubjectPublicKeyInfo PEM, as `openssl pkey -pubout` writes it.

use aws_lc_rs::agreement::{PrivateKey, X25519};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::digest::{ct_eq, sha256_hex};

/// The HPKE suite, as RFC 9180 names it.
pub const SUITE: &str = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM";
/// The `scheme` of recipient public key files.
pub const KEY_SCHEME: &str = "hpke-x25519-sha256-aes256gcm";
/// HPKE `info`: what the sealed secret is for.
pub const INFO: &[u8] = b"tern data key v1";
/// Data key length.
pub const DATA_KEY_LEN: usize = 32;
/// Length of a wrapped data key: the key and the AES-GCM tag.
pub const WRAPPED_LEN: usize = DATA_KEY_LEN + 16;
/// Format name of a recipients document.
pub const RECIPIENTS_FORMAT: &str = "tern-recipients";
/// Most recipients one document may list (about 200 bytes each: 16 MiB in all).
pub const MAX_RECIPIENTS: usize = 80_000;

const COMMITMENT_LABEL: &[u8] = b"tern key commitment v1";
const DIGEST_LABEL: &[u8] = b"tern image digest v1";
const RECORD_LABEL: &[u8] = b"tern record key v1";
/// RFC 8410 PKCS#8 v1 prefix of an X25519 private key (the 32 key bytes follow).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20,
];
/// RFC 8410 SubjectPublicKeyInfo prefix of an X25519 public key.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00];

/// What went wrong with keys or wrapped keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WrapError {
    /// A key file or key value is not an X25519 key in a form Tern reads.
    #[error("X25519 key: {0}")]
    Key(String),
    /// A wrapped key entry is malformed.
    #[error("wrapped key entry: {0}")]
    Entry(String),
    /// A recipients document is malformed.
    #[error("recipients document: {0}")]
    Document(String),
    /// HPKE refused: the entry was not sealed to this key, or was altered.
    #[error("the wrapped key does not open with this key")]
    Open,
    /// The key opened, but is not the key the signed manifest commits to.
    #[error("the unwrapped key does not match the signed key commitment")]
    Commitment,
    /// The system's random source failed.
    #[error("random source: {0}")]
    Random(String),
}

/// A payload's data key. Zeroized when dropped; never printed.
pub struct DataKey(Zeroizing<[u8; DATA_KEY_LEN]>);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, WrapError> {
        let mut k = Zeroizing::new([0u8; DATA_KEY_LEN]);
        random(&mut k[..])?;
        Ok(DataKey(k))
    }

    /// The key's bytes (what is wrapped for recipients).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0[..]
    }

    /// The key the payload's records are sealed under: HMAC-SHA-256(key, "tern record key v1").
    pub fn record_key(&self) -> Zeroizing<[u8; 32]> {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0[..]);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(hmac::sign(&k, RECORD_LABEL).as_ref());
        out
    }

    /// The key commitment the signed manifest carries: hex HMAC-SHA-256(key, label).
    pub fn commitment(&self) -> String {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0[..]);
        hex::encode(hmac::sign(&k, COMMITMENT_LABEL).as_ref())
    }

    /// Seal the SHA-256 of the image a payload decrypts to, so that the signed manifest can
    /// carry it readable to key holders only: AES-256-GCM under the subkey
    /// HMAC-SHA-256(key, "tern image digest v1"), with a zero nonce: call it once per data
    /// key (the repository tool does, when it encrypts the payload). Hex of the 32-byte
    /// ciphertext and its tag.
    pub fn seal_digest(&self, sha256: &[u8; 32]) -> Result<String, WrapError> {
        let mut buf = sha256.to_vec();
        self.digest_key()?
            .seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key([0u8; 12]),
                aws_lc_rs::aead::Aad::empty(),
                &mut buf,
            )
            .map_err(|_| WrapError::Key("AES-256-GCM refused to seal the image digest".into()))?;
        Ok(hex::encode(buf))
    }

    /// Open what [`seal_digest`](Self::seal_digest) sealed: the image's SHA-256, hex.
    pub fn open_digest(&self, sealed: &str) -> Result<String, WrapError> {
        let mut buf = hex::decode(sealed).map_err(|e| WrapError::Entry(format!("sealed image digest: {e}")))?;
        let plain = self
            .digest_key()?
            .open_in_place(
                aws_lc_rs::aead::Nonce::assume_unique_for_key([0u8; 12]),
                aws_lc_rs::aead::Aad::empty(),
                &mut buf,
            )
            .map_err(|_| WrapError::Entry("the sealed image digest does not open with the data key".into()))?;
        if plain.len() != 32 {
            return Err(WrapError::Entry("the sealed image digest is not 32 bytes".into()));
        }
        Ok(hex::encode(plain))
    }

    fn digest_key(&self) -> Result<aws_lc_rs::aead::LessSafeKey, WrapError> {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &self.0[..]);
        let sub = Zeroizing::new(hmac::sign(&k, DIGEST_LABEL).as_ref().to_vec());
        let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &sub)
            .map_err(|_| WrapError::Key("AES-256-GCM refused the digest subkey".into()))?;
        Ok(aws_lc_rs::aead::LessSafeKey::new(unbound))
    }

    /// Whether this key is the one `commitment` names (constant time).
    pub fn matches(&self, commitment: &str) -> bool {
        ct_eq(self.commitment().as_bytes(), commitment.as_bytes())
    }
}

fn random(out: &mut [u8]) -> Result<(), WrapError> {
    SystemRandom::new()
        .fill(out)
        .map_err(|_| WrapError::Random("the system random source failed".into()))
}

/// A recipient's public key (a device's or a group's).
#[derive(Clone, PartialEq, Eq)]
pub struct RecipientKey([u8; 32]);

impl std::fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecipientKey({})", self.kid())
    }
}

impl RecipientKey {
    /// From the 32 raw bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        RecipientKey(b)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key id wrapped entries carry: hex of the first 8 bytes of SHA-256 of the key.
    pub fn kid(&self) -> String {
        sha256_hex(&self.0)[..16].to_owned()
    }

    /// The key as JSON, in the shape of a TUF key.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({
            "keytype": "x25519",
            "scheme": KEY_SCHEME,
            "keyval": { "public": hex::encode(self.0) },
        })
    }

    /// Read the JSON form (as [`to_value`](Self::to_value) writes it).
    pub fn from_value(v: &serde_json::Value) -> Result<Self, WrapError> {
        if v.get("keytype").and_then(|t| t.as_str()) != Some("x25519") {
            return Err(WrapError::Key("keytype is not `x25519`".into()));
        }
        if v.get("scheme").and_then(|t| t.as_str()) != Some(KEY_SCHEME) {
            return Err(WrapError::Key(format!("scheme is not `{KEY_SCHEME}`")));
        }
        let hex_key = v
            .get("keyval")
            .and_then(|k| k.get("public"))
            .and_then(|p| p.as_str())
            .ok_or_else(|| WrapError::Key("keyval.public is missing".into()))?;
        Ok(RecipientKey(hex32(hex_key).map_err(WrapError::Key)?))
    }

    /// Read a SubjectPublicKeyInfo PEM (`openssl pkey -pubout`).
    pub fn from_spki_pem(pem: &[u8]) -> Result<Self, WrapError> {
        let (label, der) =
            pem_rfc7468::decode_vec(pem).map_err(|e| WrapError::Key(format!("not a PEM document: {e}")))?;
        if label != "PUBLIC KEY" || der.len() != SPKI_PREFIX.len() + 32 || der[..SPKI_PREFIX.len()] != SPKI_PREFIX {
            return Err(WrapError::Key("not an X25519 SubjectPublicKeyInfo".into()));
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&der[SPKI_PREFIX.len()..]);
        Ok(RecipientKey(k))
    }
}

/// A recipient's private key. Zeroized when dropped; never printed.
pub struct RecipientSecret {
    secret: Zeroizing<[u8; 32]>,
    public: RecipientKey,
}

impl std::fmt::Debug for RecipientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecipientSecret({})", self.public.kid())
    }
}

impl RecipientSecret {
    /// From the 32 raw bytes (RFC 7748; clamping happens when it is used).
    pub fn from_bytes(b: &[u8; 32]) -> Result<Self, WrapError> {
        let sk = PrivateKey::from_private_key(&X25519, b)
            .map_err(|_| WrapError::Key("the X25519 library refused the private key".into()))?;
        let pk = sk
            .compute_public_key()
            .map_err(|_| WrapError::Key("cannot compute the public key".into()))?;
        let public: [u8; 32] = pk
            .as_ref()
            .try_into()
            .map_err(|_| WrapError::Key("public key is not 32 bytes".into()))?;
        Ok(RecipientSecret {
            secret: Zeroizing::new(*b),
            public: RecipientKey(public),
        })
    }

    /// A fresh key and its PKCS#8 PEM.
    pub fn generate() -> Result<(Self, Zeroizing<String>), WrapError> {
        let mut b = Zeroizing::new([0u8; 32]);
        random(&mut b[..])?;
        let key = Self::from_bytes(&b)?;
        let pem = key.to_pkcs8_pem()?;
        Ok((key, pem))
    }

    /// The public half.
    pub fn public(&self) -> &RecipientKey {
        &self.public
    }

    /// PKCS#8 PEM (RFC 8410).
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, WrapError> {
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&PKCS8_PREFIX);
        der.extend_from_slice(&self.secret[..]);
        pem_rfc7468::encode_string("PRIVATE KEY", pem_rfc7468::LineEnding::LF, &der)
            .map(Zeroizing::new)
            .map_err(|e| WrapError::Key(e.to_string()))
    }

    /// Read PKCS#8 PEM (RFC 8410, as `openssl genpkey -algorithm X25519` writes it).
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, WrapError> {
        let (label, der) =
            pem_rfc7468::decode_vec(pem).map_err(|e| WrapError::Key(format!("not a PEM document: {e}")))?;
        let der = Zeroizing::new(der);
        if label != "PRIVATE KEY" || der.len() != PKCS8_PREFIX.len() + 32 || der[..PKCS8_PREFIX.len()] != PKCS8_PREFIX {
            return Err(WrapError::Key("not an X25519 PKCS#8 private key".into()));
        }
        let mut b = Zeroizing::new([0u8; 32]);
        b.copy_from_slice(&der[PKCS8_PREFIX.len()..]);
        Self::from_bytes(&b)
    }
}

fn hex32(s: &str) -> Result<[u8; 32], String> {
    let v = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
    v.try_into().map_err(|_| "not 32 bytes".to_owned())
}

/// One recipient's wrapped copy of a data key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    /// Which key it is sealed to ([`RecipientKey::kid`]).
    pub kid: String,
    /// HPKE's encapsulated key, hex (32 bytes).
    pub enc: String,
    /// The sealed data key, hex (48 bytes).
    pub ct: String,
}

impl WrappedKey {
    /// Field rules: a 16-hex kid, a 32-byte enc, a 48-byte ct.
    pub fn validate(&self) -> Result<(), WrapError> {
        let hex_of = |what: &str, s: &str, len: usize| {
            if s.len() != 2 * len || !s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                Err(WrapError::Entry(format!("{what} must be {len} bytes of lowercase hex")))
            } else {
                Ok(())
            }
        };
        hex_of("kid", &self.kid, 8)?;
        hex_of("enc", &self.enc, 32)?;
        hex_of("ct", &self.ct, WRAPPED_LEN)
    }
}

/// Seal `key` to `to`.
pub fn wrap(key: &DataKey, to: &RecipientKey) -> Result<WrappedKey, WrapError> {
    let mut ikm = Zeroizing::new([0u8; 32]);
    random(&mut ikm[..])?;
    wrap_with_ephemeral(key, to, &ikm)
}

/// Seal `key` to `to` with the ephemeral key derived from `ikm_e` (RFC 9180 DeriveKeyPair):
/// deterministic, for test vectors; [`wrap`] draws `ikm_e` from the system.
pub fn wrap_with_ephemeral(key: &DataKey, to: &RecipientKey, ikm_e: &[u8; 32]) -> Result<WrappedKey, WrapError> {
    let (enc, ct) = seal_base(to, INFO, key.commitment().as_bytes(), key.as_bytes(), ikm_e)?;
    Ok(WrappedKey {
        kid: to.kid(),
        enc: hex::encode(enc),
        ct: hex::encode(ct),
    })
}

/// Open `entry` with `with` and check the key against the signed `commitment`.
pub fn unwrap(entry: &WrappedKey, with: &RecipientSecret, commitment: &str) -> Result<DataKey, WrapError> {
    entry.validate()?;
    let enc = hex32(&entry.enc).map_err(WrapError::Entry)?;
    let ct = hex::decode(&entry.ct).map_err(|e| WrapError::Entry(e.to_string()))?;
    let pt = Zeroizing::new(open_base(with, &enc, INFO, commitment.as_bytes(), &ct)?);
    let bytes: [u8; DATA_KEY_LEN] = pt[..]
        .try_into()
        .map_err(|_| WrapError::Entry("the sealed key is not 32 bytes".into()))?;
    let key = DataKey(Zeroizing::new(bytes));
    if !key.matches(commitment) {
        return Err(WrapError::Commitment);
    }
    Ok(key)
}

/// Find the entry for any of `keys` in `entries` and unwrap it. `Ok(None)`: no entry is for
/// any of these keys (not a recipient). An entry that is for one of them but does not open
/// or does not match the commitment is an error: the entries were altered.
pub fn unwrap_any(
    entries: &[WrappedKey],
    keys: &[RecipientSecret],
    commitment: &str,
) -> Result<Option<DataKey>, WrapError> {
    let mut last = None;
    for k in keys {
        let kid = k.public().kid();
        for e in entries.iter().filter(|e| e.kid == kid) {
            match unwrap(e, k, commitment) {
                Ok(key) => return Ok(Some(key)),
                Err(err) => last = Some(err),
            }
        }
    }
    last.map_or(Ok(None), Err)
}

/// A fixed sequence of bytes as HPKE's random source: DeriveKeyPair(ikm_e) is then exactly
/// the ephemeral key, as RFC 9180's test vectors fix it.
struct Fixed<'a> {
    bytes: &'a [u8],
    overrun: bool,
}

impl hpke::rand_core::TryRng for Fixed<'_> {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        if dst.len() > self.bytes.len() {
            // Never silently weaker: the caller refuses the result.
            self.overrun = true;
            dst.fill(0);
            return Ok(());
        }
        let (now, rest) = self.bytes.split_at(dst.len());
        dst.copy_from_slice(now);
        self.bytes = rest;
        Ok(())
    }
}

impl hpke::rand_core::TryCryptoRng for Fixed<'_> {}

/// RFC 9180 SealBase (single shot, sequence 0) with the ephemeral key DeriveKeyPair(`ikm_e`).
pub fn seal_base(
    pk_r: &RecipientKey,
    info: &[u8],
    aad: &[u8],
    pt: &[u8],
    ikm_e: &[u8; 32],
) -> Result<([u8; 32], Vec<u8>), WrapError> {
    let pk = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(&pk_r.0)
        .map_err(|e| WrapError::Key(format!("public key: {e}")))?;
    let mut rng = Fixed {
        bytes: &ikm_e[..],
        overrun: false,
    };
    let (enc, ct) = hpke::single_shot_seal_with_rng::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &pk,
        info,
        pt,
        aad,
        &mut rng,
    )
    .map_err(|e| WrapError::Key(format!("HPKE seal: {e}")))?;
    if rng.overrun {
        return Err(WrapError::Random("HPKE asked for more than one ephemeral seed".into()));
    }
    let enc: [u8; 32] = enc
        .to_bytes()
        .as_slice()
        .try_into()
        .map_err(|_| WrapError::Key("encapsulated key is not 32 bytes".into()))?;
    Ok((enc, ct))
}

/// RFC 9180 OpenBase (single shot, sequence 0).
pub fn open_base(
    sk_r: &RecipientSecret,
    enc: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> Result<Vec<u8>, WrapError> {
    let sk = <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(&sk_r.secret[..])
        .map_err(|e| WrapError::Key(format!("private key: {e}")))?;
    let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| WrapError::Open)?;
    hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(&OpModeR::Base, &sk, &enc, info, ct, aad)
        .map_err(|_| WrapError::Open)
}

/// The recipients of one encrypted payload: not signed (see the module's notes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipients {
    /// Always [`RECIPIENTS_FORMAT`].
    pub format: String,
    /// Always 1.
    pub version: u32,
    /// The SHA-256 of the encrypted payload (as the targets metadata lists it).
    pub sha256: String,
    /// The key commitment of the payload's manifest.
    pub key_commitment: String,
    /// One entry per recipient key.
    pub recipients: Vec<WrappedKey>,
}

impl Recipients {
    /// An empty document for the payload with `sha256` and `commitment`.
    pub fn new(sha256: &str, commitment: &str) -> Self {
        Recipients {
            format: RECIPIENTS_FORMAT.into(),
            version: 1,
            sha256: sha256.into(),
            key_commitment: commitment.into(),
            recipients: Vec::new(),
        }
    }

    /// Parse and check a document (bounded by its caller).
    pub fn parse(bytes: &[u8]) -> Result<Self, WrapError> {
        let r: Recipients = serde_json::from_slice(bytes).map_err(|e| WrapError::Document(e.to_string()))?;
        if r.format != RECIPIENTS_FORMAT || r.version != 1 {
            return Err(WrapError::Document(format!(
                "format `{}` version {} is not `{RECIPIENTS_FORMAT}` version 1",
                r.format, r.version
            )));
        }
        for (what, v) in [("sha256", &r.sha256), ("key_commitment", &r.key_commitment)] {
            if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                return Err(WrapError::Document(format!("{what} must be 64 lowercase hex digits")));
            }
        }
        if r.recipients.len() > MAX_RECIPIENTS {
            return Err(WrapError::Document(format!(
                "{} recipients exceed the limit of {MAX_RECIPIENTS}",
                r.recipients.len()
            )));
        }
        let mut kids = std::collections::BTreeSet::new();
        for e in &r.recipients {
            e.validate()?;
            if !kids.insert(e.kid.as_str()) {
                return Err(WrapError::Document(format!("key {} is listed twice", e.kid)));
            }
        }
        Ok(r)
    }

    /// Add an entry unless one for the same key is there already; returns whether it was added.
    pub fn add(&mut self, entry: WrappedKey) -> bool {
        if self.recipients.iter().any(|e| e.kid == entry.kid) {
            return false;
        }
        self.recipients.push(entry);
        true
    }

    /// The document as compact JSON (about 200 bytes per recipient).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_for_each_recipient_and_only_them() {
        let key = DataKey::generate().unwrap();
        let (alice, pem) = RecipientSecret::generate().unwrap();
        let (bob, _) = RecipientSecret::generate().unwrap();
        let (eve, _) = RecipientSecret::generate().unwrap();
        let reread = RecipientSecret::from_pkcs8_pem(pem.as_bytes()).unwrap();
        assert_eq!(reread.public(), alice.public());
        let alice = reread;
        let entries = vec![wrap(&key, alice.public()).unwrap(), wrap(&key, bob.public()).unwrap()];
        let c = key.commitment();
        for k in [&alice, &bob] {
            let got = unwrap_any(&entries, std::slice::from_ref(k), &c).unwrap().unwrap();
            assert_eq!(got.as_bytes(), key.as_bytes());
        }
        assert!(unwrap_any(&entries, &[eve], &c).unwrap().is_none());
        // Under another payload's commitment the entry does not open (it is HPKE's aad), nor
        // with one flipped bit.
        let other = DataKey::generate().unwrap().commitment();
        assert_eq!(unwrap(&entries[0], &alice, &other).unwrap_err(), WrapError::Open);
        let mut bad = entries[0].clone();
        bad.ct
            .replace_range(0..2, if &bad.ct[0..2] == "00" { "01" } else { "00" });
        assert_eq!(unwrap(&bad, &alice, &c).unwrap_err(), WrapError::Open);
        // The sealed image digest opens with the key only.
        let sealed = key.seal_digest(&[7u8; 32]).unwrap();
        assert_eq!(
            got_key(&entries, &alice, &c).open_digest(&sealed).unwrap(),
            hex::encode([7u8; 32])
        );
        assert!(DataKey::generate().unwrap().open_digest(&sealed).is_err());
        // Someone who can encrypt to alice (anyone) cannot substitute a key of their own.
        // A key wrapped for another payload does not open (the commitment is HPKE's aad)...
        let other_payload = wrap(&DataKey::generate().unwrap(), alice.public()).unwrap();
        assert_eq!(unwrap(&other_payload, &alice, &c).unwrap_err(), WrapError::Open);
        // ...and one sealed with this payload's (public) commitment as aad but another key
        // opens, and is refused by the commitment.
        let (enc, ct) = seal_base(alice.public(), INFO, c.as_bytes(), &[9u8; 32], &[3u8; 32]).unwrap();
        let forged = WrappedKey {
            kid: alice.public().kid(),
            enc: hex::encode(enc),
            ct: hex::encode(ct),
        };
        assert_eq!(unwrap(&forged, &alice, &c).unwrap_err(), WrapError::Commitment);
    }

    fn got_key(entries: &[WrappedKey], k: &RecipientSecret, c: &str) -> DataKey {
        unwrap_any(entries, std::slice::from_ref(k), c).unwrap().unwrap()
    }

    #[test]
    fn key_forms_round_trip_and_bad_ones_are_refused() {
        let (k, _) = RecipientSecret::generate().unwrap();
        let v = k.public().to_value();
        assert_eq!(&RecipientKey::from_value(&v).unwrap(), k.public());
        let mut wrong = v.clone();
        wrong["keytype"] = "ed25519".into();
        assert!(RecipientKey::from_value(&wrong).is_err());
        assert!(
            RecipientSecret::from_pkcs8_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err()
        );
        let doc = Recipients::new(&"a".repeat(64), &"b".repeat(64));
        assert_eq!(Recipients::parse(&doc.to_bytes()).unwrap(), doc);
        let mut long = doc.clone();
        long.sha256.push('0');
        assert!(Recipients::parse(&long.to_bytes()).is_err());
    }
}
