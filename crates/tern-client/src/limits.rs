//! Limits against endless-data and slow-retrieval attacks.

use std::time::Duration;

/// Bounds on what the client downloads and how slowly it lets a server send it.
///
/// Defaults follow python-tuf's where it has them, so that the two clients refuse the same
/// repositories: W (root) 512,000 bytes, X (timestamp) 16,384, Y (snapshot, when the timestamp
/// lists no length) 2,000,000, Z (targets roles, when the snapshot lists no length)
/// 5,000,000; 256 root rotations per update; 32 roles per target search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of one root version (§5.3.3's W).
    pub root_max: u64,
    /// Most bytes of timestamp metadata (§5.4.1's X).
    pub timestamp_max: u64,
    /// Most bytes of snapshot metadata when timestamp gives no length (§5.5.1's Y).
    pub snapshot_max: u64,
    /// Most bytes of a targets role when snapshot gives no length (§5.6.1's Z).
    pub targets_max: u64,
    /// Most root versions one update walks (§5.3.3's Y).
    pub max_root_rotations: u64,
    /// Most roles one target search visits (§5.6.7.1).
    pub max_delegations: usize,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Longest wait for any byte once connected.
    pub stall_timeout: Duration,
    /// Slowest average rate accepted, in bytes per second, once `grace` has passed.
    pub min_bytes_per_sec: u64,
    /// Time before the average rate is enforced.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            root_max: tern_core::metadata::limits::ROOT,
            timestamp_max: tern_core::metadata::limits::TIMESTAMP,
            snapshot_max: tern_core::metadata::limits::SNAPSHOT,
            targets_max: tern_core::metadata::limits::TARGETS,
            max_root_rotations: 256,
            max_delegations: 32,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            min_bytes_per_sec: 1024,
            grace: Duration::from_secs(10),
        }
    }
}
