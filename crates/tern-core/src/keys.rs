//! Keys and signatures in TUF's formats.
//!
//! Supported schemes: `ed25519` (hex public key), `ecdsa-sha2-nistp256` (PEM
//! SubjectPublicKeyInfo, DER signatures) and `rsassa-pss-sha256` (PEM SubjectPublicKeyInfo,
//! salt length = digest length). All primitives come from `aws-lc-rs`.
//!
//! A key of any other type is kept (metadata listing it stays readable) but can never
//! contribute a valid signature.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::cjson::to_canonical;
use crate::digest::sha256_hex;
use crate::error::{Error, Result};

/// A key id: the lowercase hex SHA-256 of the key's canonical JSON form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// Wrap a key id as written in metadata; it is checked against its key when the key is parsed.
    pub fn new(s: impl Into<String>) -> Self {
        KeyId(s.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The signature algorithms Tern can produce and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyAlgorithm {
    /// Ed25519, the default.
    Ed25519,
    /// ECDSA over NIST P-256 with SHA-256.
    EcdsaP256,
    /// RSASSA-PSS with SHA-256 (3072-bit keys when Tern generates them).
    RsaPssSha256,
}

impl KeyAlgorithm {
    /// TUF's `keytype` for keys Tern writes.
    pub fn keytype(self) -> &'static str {
        match self {
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::EcdsaP256 => "ecdsa",
            KeyAlgorithm::RsaPssSha256 => "rsa",
        }
    }

    /// TUF's `scheme`.
    pub fn scheme(self) -> &'static str {
        match self {
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::EcdsaP256 => "ecdsa-sha2-nistp256",
            KeyAlgorithm::RsaPssSha256 => "rsassa-pss-sha256",
        }
    }

    fn from_tuf(keytype: &str, scheme: &str) -> Option<Self> {
        match (keytype, scheme) {
            ("ed25519", "ed25519") => Some(KeyAlgorithm::Ed25519),
            // Older securesystemslib releases wrote the scheme as the keytype too.
            ("ecdsa" | "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256") => Some(KeyAlgorithm::EcdsaP256),
            ("rsa", "rsassa-pss-sha256") => Some(KeyAlgorithm::RsaPssSha256),
            _ => None,
        }
    }

    fn verification(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            KeyAlgorithm::Ed25519 => &signature::ED25519,
            KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::RsaPssSha256 => &signature::RSA_PSS_2048_8192_SHA256,
        }
    }
}

/// A public key as listed in root or delegation metadata.
#[derive(Debug, Clone)]
pub struct PublicKey {
    keytype: String,
    scheme: String,
    /// The key object exactly as received: the key id is computed over it.
    value: Value,
    /// The key id, computed once over `value`.
    keyid: KeyId,
    /// `None` for key types Tern does not support.
    usable: Option<(KeyAlgorithm, Vec<u8>)>,
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl PublicKey {
    /// Parse a key object from metadata. `role` names the metadata for error messages.
    pub fn from_value(role: &str, value: &Value) -> Result<Self> {
        let field = |name: &str| -> Result<String> {
            value
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| Error::field(role, format!("keys.{name}"), "missing or not a string"))
        };
        let keytype = field("keytype")?;
        let scheme = field("scheme")?;
        let public = value
            .get("keyval")
            .and_then(|kv| kv.get("public"))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::field(role, "keys.keyval.public", "missing or not a string"))?;
        let keyid = compute_keyid(value)?;
        let usable = match KeyAlgorithm::from_tuf(&keytype, &scheme) {
            None => None,
            Some(alg) => Some((alg, decode_public(alg, public, &keyid)?)),
        };
        Ok(PublicKey {
            keytype,
            scheme,
            value: value.clone(),
            keyid,
            usable,
        })
    }

    /// Build the TUF form of a key Tern holds.
    pub fn from_raw(alg: KeyAlgorithm, raw: &[u8]) -> Result<Self> {
        let public = match alg {
            KeyAlgorithm::Ed25519 => hex::encode(raw),
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::RsaPssSha256 => {
                pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, raw).map_err(|e| {
                    Error::PrivateKey {
                        reason: format!("cannot encode public key: {e}"),
                    }
                })?
            }
        };
        let value = json!({
            "keytype": alg.keytype(),
            "scheme": alg.scheme(),
            "keyval": {"public": public},
        });
        let keyid = compute_keyid(&value)?;
        Ok(PublicKey {
            keytype: alg.keytype().to_owned(),
            scheme: alg.scheme().to_owned(),
            value,
            keyid,
            usable: Some((alg, raw.to_vec())),
        })
    }

    /// The key id computed from the key object.
    pub fn keyid(&self) -> KeyId {
        self.keyid.clone()
    }

    /// The key object in TUF form.
    pub fn to_value(&self) -> &Value {
        &self.value
    }

    /// `keytype` as declared.
    pub fn keytype(&self) -> &str {
        &self.keytype
    }

    /// `scheme` as declared.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The algorithm, when Tern supports the key.
    pub fn algorithm(&self) -> Option<KeyAlgorithm> {
        self.usable.as_ref().map(|(alg, _)| *alg)
    }

    /// What makes two key objects the same key, whatever their ids: algorithm and key bytes.
    pub(crate) fn identity(&self) -> Option<(KeyAlgorithm, &[u8])> {
        self.usable.as_ref().map(|(alg, raw)| (*alg, raw.as_slice()))
    }

    /// Check `sig` over `msg`. Unsupported keys never verify.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match &self.usable {
            Some((alg, raw)) => UnparsedPublicKey::new(alg.verification(), raw).verify(msg, sig).is_ok(),
            None => false,
        }
    }
}

/// The key id of a key object: SHA-256 over its canonical form, as the specification defines it.
pub fn compute_keyid(value: &Value) -> Result<KeyId> {
    let bytes = to_canonical(value).map_err(|e| Error::BadKey {
        keyid: KeyId(String::new()),
        reason: format!("key object has no canonical form: {e}"),
    })?;
    Ok(KeyId(sha256_hex(&bytes)))
}

fn decode_public(alg: KeyAlgorithm, public: &str, keyid: &KeyId) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::BadKey {
        keyid: keyid.clone(),
        reason,
    };
    match alg {
        KeyAlgorithm::Ed25519 => {
            let raw = hex::decode(public).map_err(|e| bad(format!("ed25519 public key is not hex: {e}")))?;
            if raw.len() != 32 {
                return Err(bad(format!("ed25519 public key has {} bytes, not 32", raw.len())));
            }
            Ok(raw)
        }
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::RsaPssSha256 => {
            let (label, der) = pem_rfc7468::decode_vec(public.trim().as_bytes())
                .map_err(|e| bad(format!("public key is not PEM: {e}")))?;
            if label != "PUBLIC KEY" {
                return Err(bad(format!("PEM label `{label}`, expected `PUBLIC KEY`")));
            }
            canonical_spki(alg, &der)
                .ok_or_else(|| bad(format!("not a {} SubjectPublicKeyInfo in canonical form", alg.scheme())))
        }
    }
}

/// DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point (91 bytes in all).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// AlgorithmIdentifier of rsaEncryption with NULL parameters.
const RSA_ALG_ID: [u8; 15] = [
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

/// The one encoding Tern accepts for an ECDSA or RSA public key: SubjectPublicKeyInfo, as
/// python-tuf writes it. Other encodings of the same key (a raw or compressed point, PKCS#1)
/// are refused, so that one key can never appear as several "different" keys and be counted
/// more than once towards a threshold.
fn canonical_spki(alg: KeyAlgorithm, der: &[u8]) -> Option<Vec<u8>> {
    match alg {
        KeyAlgorithm::EcdsaP256 => {
            // A point off the curve parses here but never verifies a signature.
            let ok = der.len() == 91 && der[..26] == P256_SPKI_PREFIX && der[26] == 0x04;
            ok.then(|| der.to_vec())
        }
        KeyAlgorithm::RsaPssSha256 => {
            if der.len() < 19 || der[0] != 0x30 || der[1] != 0x82 || der[4..19] != RSA_ALG_ID {
                return None;
            }
            // Parse and re-encode: the identity is aws-lc's own DER of the key.
            let key = aws_lc_rs::rsa::PublicEncryptingKey::from_der(der).ok()?;
            let canonical = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(&key).ok()?;
            (canonical.as_ref() == der).then(|| der.to_vec())
        }
        KeyAlgorithm::Ed25519 => None,
    }
}

/// A private key that signs metadata. The key material lives inside aws-lc, which clears
/// it when the key is dropped; the encoded forms Tern handles are zeroized.
pub struct SigningKey {
    inner: Inner,
    public: PublicKey,
}

enum Inner {
    Ed25519(Ed25519KeyPair),
    Ecdsa(EcdsaKeyPair),
    Rsa(signature::RsaKeyPair),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("SigningKey")
            .field("keyid", &self.public.keyid())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generate a new key; returns it with its PKCS#8 PEM encoding (zeroized on drop).
    pub fn generate(alg: KeyAlgorithm) -> Result<(Self, Zeroizing<String>)> {
        let fail = |what: &str| Error::PrivateKey {
            reason: format!("cannot generate {what} key"),
        };
        let der: Zeroizing<Vec<u8>> = match alg {
            KeyAlgorithm::Ed25519 => {
                let kp = Ed25519KeyPair::generate().map_err(|_| fail("ed25519"))?;
                Zeroizing::new(kp.to_pkcs8v1().map_err(|_| fail("ed25519"))?.as_ref().to_vec())
            }
            KeyAlgorithm::EcdsaP256 => {
                let kp =
                    EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_ASN1_SIGNING).map_err(|_| fail("ecdsa"))?;
                Zeroizing::new(kp.to_pkcs8v1().map_err(|_| fail("ecdsa"))?.as_ref().to_vec())
            }
            KeyAlgorithm::RsaPssSha256 => {
                let kp = signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072).map_err(|_| fail("rsa"))?;
                let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).map_err(|_| fail("rsa"))?;
                Zeroizing::new(der.as_ref().to_vec())
            }
        };
        let key = Self::from_pkcs8_der(&der)?;
        let pem = pem_rfc7468::encode_string("PRIVATE KEY", pem_rfc7468::LineEnding::LF, &der).map_err(|e| {
            Error::PrivateKey {
                reason: format!("cannot encode PEM: {e}"),
            }
        })?;
        Ok((key, Zeroizing::new(pem)))
    }

    /// Load a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self> {
        let (label, der) = pem_rfc7468::decode_vec(pem).map_err(|e| Error::PrivateKey {
            reason: format!("not a PEM document: {e}"),
        })?;
        let der = Zeroizing::new(der);
        if label != "PRIVATE KEY" {
            return Err(Error::PrivateKey {
                reason: format!("PEM label `{label}`, expected `PRIVATE KEY` (PKCS#8, unencrypted)"),
            });
        }
        Self::from_pkcs8_der(&der)
    }

    /// Load a PKCS#8 DER private key of any supported algorithm.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self> {
        if let Ok(kp) = Ed25519KeyPair::from_pkcs8(der) {
            let public = PublicKey::from_raw(KeyAlgorithm::Ed25519, kp.public_key().as_ref())?;
            return Ok(SigningKey {
                inner: Inner::Ed25519(kp),
                public,
            });
        }
        if let Ok(kp) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der) {
            let spki = kp.public_key().as_der().map_err(|_| Error::PrivateKey {
                reason: "cannot encode ecdsa public key".into(),
            })?;
            let public = PublicKey::from_raw(KeyAlgorithm::EcdsaP256, spki.as_ref())?;
            return Ok(SigningKey {
                inner: Inner::Ecdsa(kp),
                public,
            });
        }
        if let Ok(kp) = signature::RsaKeyPair::from_pkcs8(der) {
            if kp.public_modulus_len() < 256 {
                return Err(Error::PrivateKey {
                    reason: "rsa keys shorter than 2048 bits are refused".into(),
                });
            }
            let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(kp.public_key()).map_err(|_| {
                Error::PrivateKey {
                    reason: "cannot encode rsa public key".into(),
                }
            })?;
            let public = PublicKey::from_raw(KeyAlgorithm::RsaPssSha256, spki.as_ref())?;
            return Ok(SigningKey {
                inner: Inner::Rsa(kp),
                public,
            });
        }
        Err(Error::PrivateKey {
            reason: "not an ed25519, ecdsa P-256 or rsa PKCS#8 key".into(),
        })
    }

    /// The public half in TUF form.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Sign `msg` (the canonical bytes of a `signed` object).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let fail = || Error::PrivateKey {
            reason: "signing failed".into(),
        };
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Ed25519(kp) => Ok(kp.sign(msg).as_ref().to_vec()),
            Inner::Ecdsa(kp) => Ok(kp.sign(&rng, msg).map_err(|_| fail())?.as_ref().to_vec()),
            Inner::Rsa(kp) => {
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign(&signature::RSA_PSS_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| fail())?;
                Ok(sig)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_and_verifies_through_its_tuf_form() {
        for alg in [
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::RsaPssSha256,
        ] {
            let (key, pem) = SigningKey::generate(alg).unwrap();
            let reloaded = SigningKey::from_pkcs8_pem(pem.as_bytes()).unwrap();
            assert_eq!(reloaded.public().keyid(), key.public().keyid());
            let parsed = PublicKey::from_value("root", key.public().to_value()).unwrap();
            let sig = key.sign(b"message").unwrap();
            assert!(parsed.verify(b"message", &sig), "{alg:?}");
            assert!(!parsed.verify(b"messagf", &sig), "{alg:?}");
        }
    }

    #[test]
    fn other_encodings_of_an_ecdsa_key_are_refused() {
        let (key, _) = SigningKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let pem = key.public().to_value()["keyval"]["public"].as_str().unwrap().to_owned();
        let (_, der) = pem_rfc7468::decode_vec(pem.as_bytes()).unwrap();
        // The bare uncompressed point, as PEM: aws-lc would accept it, Tern must not.
        let point = &der[26..];
        let raw_pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, point).unwrap();
        let v = json!({"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": raw_pem}});
        assert_eq!(PublicKey::from_value("root", &v).unwrap_err().kind(), "BadKey");
    }

    #[test]
    fn unknown_key_types_parse_but_never_verify() {
        let v = json!({"keytype": "x-future", "scheme": "x-future", "keyval": {"public": "00"}});
        let k = PublicKey::from_value("root", &v).unwrap();
        assert!(k.algorithm().is_none());
        assert!(!k.verify(b"m", b"s"));
    }

    #[test]
    fn keyid_is_sha256_of_canonical_form() {
        let v = json!({"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": "00".repeat(32)}});
        let expect = sha256_hex(&to_canonical(&v).unwrap());
        assert_eq!(compute_keyid(&v).unwrap().as_str(), expect);
    }
}
