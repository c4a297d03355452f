//! Tern's pure core.
//!
//! What it does: canonical JSON, TUF keys and signatures (ed25519, ecdsa-sha2-nistp256,
//! rsassa-pss-sha256), the metadata types with their field rules, threshold verification
//! that counts each key once, the root rotation chain and the delegation search, target
//! names, and Tern's payload manifest.
//!
//! What it deliberately does not do: any I/O, reading a clock or the environment, async.
//! Bytes, the reference time and metadata sources are inputs. `clippy.toml` beside this
//! crate turns file, network and clock calls into lint errors. It is not `no_std`: its
//! crypto library, aws-lc-rs, needs `std` (see ARCHITECTURE.md).

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod cjson;
pub mod delegation;
pub mod digest;
pub mod director;
pub mod enrollment;
pub mod error;
pub mod floors;
pub mod keys;
pub mod keywrap;
pub mod manifest;
pub mod metadata;
pub mod range;
pub mod stream_aead;
pub mod target;
pub mod text;
pub mod timefmt;
pub mod trust;
pub mod trusted_set;
pub mod verify;

pub use error::{Error, Result};
pub use keys::{KeyAlgorithm, KeyId, PublicKey, SigningKey};
pub use metadata::{
    DelegatedRole, Delegations, Envelope, MetaFile, RoleKeys, RoleType, Root, Signed, Snapshot, SuccinctRoles,
    TargetFile, Targets, Timestamp, TOP_LEVEL_ROLES,
};
pub use target::TargetPath;
pub use timefmt::DateTime;
pub use trust::{Freshness, MetadataSource, TrustedRepository};
