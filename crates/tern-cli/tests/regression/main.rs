//! Regressions of the hardening issue: each test reproduces what an attacker or a hostile
//! environment did to the landed binary, through the public interfaces (the CLI and HTTP),
//! and asserts the refusal and that nothing changed. Named after what they reproduce.

#[path = "../device/mod.rs"]
mod device;
#[path = "../fleet/mod.rs"]
mod fleet;
#[path = "../support/mod.rs"]
mod support;

mod archives;
mod enrollment;
mod local_media;
mod metadata_rollback;
mod replay;
mod server_limits;
mod small;
