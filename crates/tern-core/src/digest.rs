//! Hashing as TUF lists it: `{"sha256": HEX, "sha512": HEX}`.
//!
//! [`MultiHasher`] computes every listed algorithm Tern supports in one pass over a stream;
//! the caller feeds it bytes (the core does no I/O) and then checks the result.

use std::collections::BTreeMap;

use aws_lc_rs::digest;

use crate::error::{Error, Result};

/// The hash algorithms Tern computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgorithm {
    /// SHA-256, the default.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl HashAlgorithm {
    /// The name used in metadata.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha512 => "sha512",
        }
    }

    /// Parse a metadata name; `None` for algorithms Tern does not compute.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(HashAlgorithm::Sha256),
            "sha512" => Some(HashAlgorithm::Sha512),
            _ => None,
        }
    }

    fn aws(self) -> &'static digest::Algorithm {
        match self {
            HashAlgorithm::Sha256 => &digest::SHA256,
            HashAlgorithm::Sha512 => &digest::SHA512,
        }
    }
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

/// Digests of `data` under each algorithm.
pub fn hashes_of(data: &[u8], algs: &[HashAlgorithm]) -> BTreeMap<String, String> {
    algs.iter()
        .map(|a| (a.name().to_owned(), hex::encode(digest::digest(a.aws(), data))))
        .collect()
}

/// Incremental computation of digests under a chosen set of algorithms.
pub struct Digester {
    contexts: Vec<(HashAlgorithm, digest::Context)>,
    length: u64,
}

impl Digester {
    /// Start digesting under `algs`.
    pub fn new(algs: &[HashAlgorithm]) -> Self {
        Digester {
            contexts: algs.iter().map(|a| (*a, digest::Context::new(a.aws()))).collect(),
            length: 0,
        }
    }

    /// Feed the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.length += data.len() as u64;
        for (_, c) in &mut self.contexts {
            c.update(data);
        }
    }

    /// The length and the digests, by algorithm name.
    pub fn finish(self) -> (u64, BTreeMap<String, String>) {
        let hashes = self
            .contexts
            .into_iter()
            .map(|(a, c)| (a.name().to_owned(), hex::encode(c.finish())))
            .collect();
        (self.length, hashes)
    }
}

/// Incremental hashing under every supported algorithm a `hashes` map lists, with a length count.
pub struct MultiHasher {
    what: String,
    expected: Vec<(HashAlgorithm, Vec<u8>)>,
    contexts: Vec<digest::Context>,
    length: u64,
}

impl MultiHasher {
    /// Prepare to check content named `what` against `hashes` (algorithm → hex digest).
    ///
    /// Algorithms Tern does not know are ignored, as the specification allows; at least one
    /// known algorithm must be listed. A listed digest that is not hex can never match.
    pub fn new(what: &str, hashes: &BTreeMap<String, String>) -> Result<Self> {
        let mut expected = Vec::new();
        for (name, hexdigest) in hashes {
            if let Some(alg) = HashAlgorithm::from_name(name) {
                let raw = hex::decode(hexdigest).unwrap_or_default();
                expected.push((alg, raw));
            }
        }
        if expected.is_empty() {
            return Err(Error::NoSupportedHash { what: what.to_owned() });
        }
        let contexts = expected.iter().map(|(a, _)| digest::Context::new(a.aws())).collect();
        Ok(MultiHasher {
            what: what.to_owned(),
            expected,
            contexts,
            length: 0,
        })
    }

    /// Feed the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.length += data.len() as u64;
        for c in &mut self.contexts {
            c.update(data);
        }
    }

    /// Bytes fed so far.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Compare every digest; the first mismatch is the error.
    pub fn finish(self) -> Result<()> {
        for ((alg, want), ctx) in self.expected.into_iter().zip(self.contexts) {
            let got = ctx.finish();
            // Digests are public values; a plain comparison leaks nothing secret.
            if got.as_ref() != want.as_slice() {
                return Err(Error::HashMismatch {
                    what: self.what,
                    algorithm: alg.name().to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Constant-time equality of two byte strings (their lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// Check `data` against a length (when given) and hashes.
pub fn check(what: &str, data: &[u8], length: Option<u64>, hashes: Option<&BTreeMap<String, String>>) -> Result<()> {
    if let Some(expected) = length {
        if data.len() as u64 != expected {
            return Err(Error::LengthMismatch {
                what: what.to_owned(),
                expected,
                found: data.len() as u64,
            });
        }
    }
    if let Some(hashes) = hashes {
        let mut h = MultiHasher::new(what, hashes)?;
        h.update(data);
        h.finish()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_every_listed_hash() {
        let hashes = hashes_of(b"abc", &[HashAlgorithm::Sha256, HashAlgorithm::Sha512]);
        assert!(check("f", b"abc", Some(3), Some(&hashes)).is_ok());
        let mut bad = hashes.clone();
        bad.insert("sha512".into(), "00".into());
        assert_eq!(
            check("f", b"abc", Some(3), Some(&bad)).unwrap_err().kind(),
            "HashMismatch"
        );
        assert_eq!(
            check("f", b"abcd", Some(3), Some(&hashes)).unwrap_err().kind(),
            "LengthMismatch"
        );
        let unknown: BTreeMap<_, _> = [("md5".to_string(), "00".to_string())].into();
        assert_eq!(
            check("f", b"abc", None, Some(&unknown)).unwrap_err().kind(),
            "NoSupportedHash"
        );
    }
}
