//! Which delegated roles are trusted for a target path.

use aws_lc_rs::digest;
use glob::{MatchOptions, Pattern};

use crate::keys::KeyId;
use crate::metadata::{DelegatedRole, Delegations, SuccinctRoles};

/// A role the search may descend into, with what its delegator says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The delegated role's name.
    pub name: String,
    /// Whether the search stops after this role.
    pub terminating: bool,
    /// Authorised key ids.
    pub keyids: Vec<KeyId>,
    /// Distinct keys that must sign.
    pub threshold: u32,
}

/// Shell-style match where `*` and `?` never match `/` (the specification's rule, as
/// python-tuf applies it component by component).
pub fn path_matches(pattern: &str, target: &str) -> bool {
    // Component counts must agree, exactly as fnmatch applied per component.
    if pattern.split('/').count() != target.split('/').count() {
        return false;
    }
    let opts = MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    match Pattern::new(pattern) {
        Ok(p) => p.matches_with(target, opts),
        // An invalid pattern delegates nothing.
        Err(_) => false,
    }
}

fn hash_prefix_matches(prefixes: &[String], target: &str) -> bool {
    let h = hex::encode(digest::digest(&digest::SHA256, target.as_bytes()));
    prefixes.iter().any(|p| h.starts_with(p.as_str()))
}

impl DelegatedRole {
    /// Whether this role is trusted for `target`.
    pub fn is_delegated_path(&self, target: &str) -> bool {
        if let Some(paths) = &self.paths {
            return paths.iter().any(|p| path_matches(p, target));
        }
        if let Some(prefixes) = &self.path_hash_prefixes {
            return hash_prefix_matches(prefixes, target);
        }
        false
    }
}

impl SuccinctRoles {
    /// The number of hex digits in bin names.
    fn suffix_len(&self) -> usize {
        self.bit_length.div_ceil(4) as usize
    }

    /// The bin responsible for `target`: the first `bit_length` bits of SHA-256(target).
    pub fn role_for_target(&self, target: &str) -> String {
        let h = digest::digest(&digest::SHA256, target.as_bytes());
        let first = u32::from_be_bytes([h.as_ref()[0], h.as_ref()[1], h.as_ref()[2], h.as_ref()[3]]);
        let bin = first >> (32 - self.bit_length);
        self.bin_name(bin)
    }

    /// The name of bin number `bin`.
    pub fn bin_name(&self, bin: u32) -> String {
        format!("{}-{:0width$x}", self.name_prefix, bin, width = self.suffix_len())
    }

    /// How many bins there are.
    pub fn bins(&self) -> u64 {
        1u64 << self.bit_length
    }
}

impl Delegations {
    /// The roles trusted for `target`, in the order the search must try them.
    pub fn roles_for_target(&self, target: &str) -> Vec<Candidate> {
        if let Some(s) = &self.succinct_roles {
            // Succinct bins are terminating: exactly one bin is responsible for a path.
            return vec![Candidate {
                name: s.role_for_target(target),
                terminating: true,
                keyids: s.keyids.clone(),
                threshold: s.threshold,
            }];
        }
        self.roles
            .iter()
            .flatten()
            .filter(|r| r.is_delegated_path(target))
            .map(|r| Candidate {
                name: r.name.clone(),
                terminating: r.terminating,
                keyids: r.keyids.clone(),
                threshold: r.threshold,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_does_not_cross_slashes() {
        assert!(path_matches("products/a/*", "products/a/app.bin"));
        assert!(!path_matches("products/a/*", "products/a/beta/app.bin"));
        assert!(path_matches("*.bin", "x.bin"));
        assert!(!path_matches("*.bin", "d/x.bin"));
        assert!(path_matches("d/?.bin", "d/x.bin"));
        assert!(path_matches("d/[xy].bin", "d/y.bin"));
        assert!(!path_matches("products/*", "products"));
    }

    #[test]
    fn succinct_bins_follow_tap15() {
        let s = SuccinctRoles {
            keyids: vec![],
            threshold: 1,
            bit_length: 8,
            name_prefix: "bin".into(),
            unrecognized: Default::default(),
        };
        // sha256("foo") starts with 2c.
        assert_eq!(s.role_for_target("foo"), "bin-2c");
        assert_eq!(s.bins(), 256);
        let s4 = SuccinctRoles { bit_length: 4, ..s };
        assert_eq!(s4.role_for_target("foo"), "bin-2");
    }
}
