//! Target names, validated once into a type.
//!
//! A target name is a relative path of `/`-separated components. Tern refuses names that
//! could escape the directory they are written under or be read two ways: absolute paths,
//! `.` and `..` components, empty components, backslashes, NUL and other control characters.

use std::fmt;

use crate::error::{Error, Result};

/// Longest target name Tern accepts.
pub const MAX_TARGET_NAME: usize = 4096;

/// A target path that is safe to join under a directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetPath(String);

impl TargetPath {
    /// Validate `name`.
    pub fn new(name: &str) -> Result<Self> {
        let bad = |reason: &str| Error::BadTargetName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        if name.is_empty() {
            return Err(bad("empty"));
        }
        if name.len() > MAX_TARGET_NAME {
            return Err(bad("too long"));
        }
        if name.starts_with('/') {
            return Err(bad("absolute path"));
        }
        if name.chars().any(|c| c == '\\' || c.is_control()) {
            return Err(bad("backslash or control character"));
        }
        for part in name.split('/') {
            match part {
                "" => return Err(bad("empty path component")),
                "." | ".." => return Err(bad("`.` or `..` component escapes its directory")),
                _ => {}
            }
        }
        Ok(TargetPath(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory part (empty for a top-level file) and the file name.
    pub fn split(&self) -> (&str, &str) {
        match self.0.rfind('/') {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => ("", &self.0),
        }
    }

    /// The consistent-snapshot name `DIR/HASH.BASENAME`.
    pub fn with_hash_prefix(&self, hexdigest: &str) -> String {
        match self.split() {
            ("", base) => format!("{hexdigest}.{base}"),
            (dir, base) => format!("{dir}/{hexdigest}.{base}"),
        }
    }
}

impl fmt::Display for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "a\\b",
            "a/",
            "a\0b",
            "..",
            ".",
        ] {
            assert_eq!(TargetPath::new(bad).unwrap_err().kind(), "BadTargetName", "{bad:?}");
        }
        for good in ["a", "a/b.img", "products/a/..x", "x..y/z"] {
            TargetPath::new(good).unwrap();
        }
    }

    #[test]
    fn hash_prefix_goes_on_the_basename() {
        assert_eq!(
            TargetPath::new("a/b/c.img").unwrap().with_hash_prefix("ff"),
            "a/b/ff.c.img"
        );
        assert_eq!(TargetPath::new("c.img").unwrap().with_hash_prefix("ff"), "ff.c.img");
    }
}
