//! Which delegated roles are trusted for a target path.

use aws_lc_rs::digest;

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

/// Shell-style match where `*` and `?` never match `/`: the pattern and the target are split
/// on `/`, must have as many components, and each pair must match as Python's
/// `fnmatch.fnmatch` matches on POSIX (python-tuf's rule): `*` any run of characters, `?`
/// one character, `[seq]` and `[!seq]` sets with `a-z` ranges, and a `[` with no closing `]`
/// a literal. Every pattern has a meaning, so no delegation is silently void.
pub fn path_matches(pattern: &str, target: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let t: Vec<&str> = target.split('/').collect();
    p.len() == t.len() && p.iter().zip(&t).all(|(p, t)| fnmatch(p, t))
}

/// One element of a compiled component pattern.
enum Tok {
    Star,
    Any,
    Lit(char),
    Set { negated: bool, items: Vec<(char, char)> },
}

fn compile(pattern: &[char]) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        let c = pattern[i];
        i += 1;
        match c {
            '*' => {
                // Consecutive stars mean the same as one.
                if !matches!(out.last(), Some(Tok::Star)) {
                    out.push(Tok::Star);
                }
            }
            '?' => out.push(Tok::Any),
            '[' => {
                // As fnmatch.translate: `!` negates, a `]` right after `[` or `[!` is literal.
                let mut j = i;
                if j < pattern.len() && pattern[j] == '!' {
                    j += 1;
                }
                if j < pattern.len() && pattern[j] == ']' {
                    j += 1;
                }
                while j < pattern.len() && pattern[j] != ']' {
                    j += 1;
                }
                if j >= pattern.len() {
                    out.push(Tok::Lit('['));
                    continue;
                }
                let mut body = &pattern[i..j];
                i = j + 1;
                let negated = body.first() == Some(&'!');
                if negated {
                    body = &body[1..];
                }
                let mut items = Vec::new();
                let mut k = 0;
                while k < body.len() {
                    if k + 2 < body.len() && body[k + 1] == '-' {
                        items.push((body[k], body[k + 2]));
                        k += 3;
                    } else {
                        items.push((body[k], body[k]));
                        k += 1;
                    }
                }
                out.push(Tok::Set { negated, items });
            }
            c => out.push(Tok::Lit(c)),
        }
    }
    out
}

fn fnmatch(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let toks = compile(&p);
    let n: Vec<char> = name.chars().collect();
    // Iterative matching with one backtrack point per star: linear in practice, and never
    // exponential (a later star supersedes the earlier backtrack point).
    let (mut ti, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let ok = match toks.get(ti) {
            Some(Tok::Star) => {
                star = Some((ti, ni));
                ti += 1;
                continue;
            }
            Some(Tok::Any) => true,
            Some(Tok::Lit(c)) => *c == n[ni],
            Some(Tok::Set { negated, items }) => items.iter().any(|(lo, hi)| *lo <= n[ni] && n[ni] <= *hi) != *negated,
            None => false,
        };
        if ok {
            ti += 1;
            ni += 1;
        } else if let Some((st, sn)) = star {
            ti = st + 1;
            ni = sn + 1;
            star = Some((st, sn + 1));
        } else {
            return false;
        }
    }
    toks[ti..].iter().all(|t| matches!(t, Tok::Star))
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
    fn fnmatch_edge_cases_follow_python() {
        // Each line was checked against Python's fnmatch.fnmatch.
        let cases = [
            ("firmware-**", "firmware-1.bin", true),
            ("***", "x", true),
            ("[", "[", true),
            ("a[", "a[", true),
            ("[!a]", "b", true),
            ("[!a]", "a", false),
            ("[]]", "]", true),
            ("[!]]", "a", true),
            ("[a-c]x", "bx", true),
            ("[a-c]x", "dx", false),
            ("*.bin", ".bin", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("?", "", false),
            ("", "", true),
            ("\\*", "\\x", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(fnmatch(p, n), want, "{p:?} vs {n:?}");
        }
        assert!(!path_matches("**/", "a/b"));
        assert!(path_matches("*/*", "a/b"));
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
