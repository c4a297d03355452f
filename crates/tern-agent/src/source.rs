//! Where `agent run` finds updates on local media.
//!
//! An [`UpdateSource`] is asked, once per poll, whether there is something to install; it
//! answers with a bundle on local storage. Today there is the [`InboxSource`]: a directory
//! (an automounted USB stick, a drop folder) whose `*.tern` regular files are installed in
//! name order.
//!
//! An offer is recognised by its [`OfferId`] (name, size, modification time). The agent
//! records an offer as handled in its state, durably, before it reboots into what the
//! offer installed (with the `PendingReboot` state, so before the reboot hook runs) or as
//! soon as the offer was refused; a handled offer is never offered again. Renaming the
//! file to `NAME.tern.done` afterwards is only a courtesy to the operator: on a
//! write-protected stick it fails, and nothing else changes.

use std::path::{Path, PathBuf};

use crate::state::OfferId;
use crate::{Error, Result};

/// Something to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The bundle file.
    pub bundle: PathBuf,
    /// How it is recognised again.
    pub id: OfferId,
}

/// A place updates come from.
pub trait UpdateSource {
    /// A short name for logs.
    fn name(&self) -> String;
    /// The next update that is not among `handled`, if any.
    fn poll(&mut self, handled: &[OfferId]) -> Result<Option<Offer>>;
    /// The offer was handled and recorded: tidy up (best effort; a failure changes nothing).
    fn done(&mut self, offer: &Offer) -> Result<()>;
}

/// A directory of bundles.
#[derive(Debug)]
pub struct InboxSource {
    dir: PathBuf,
}

impl InboxSource {
    /// Watch `dir`.
    pub fn new(dir: &Path) -> Self {
        InboxSource { dir: dir.to_owned() }
    }
}

/// The id of the regular file at `path`; `None` for anything else (a FIFO, a device, a
/// directory, a dangling link). The file is opened without blocking and its type checked
/// on the open descriptor before a byte is read.
pub fn offer_id(path: &Path) -> Option<OfferId> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut head = Vec::with_capacity(1 << 20);
    f.take(1 << 20).read_to_end(&mut head).ok()?;
    Some(OfferId {
        name: path.file_name()?.to_string_lossy().into_owned(),
        size: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        head_sha256: tern_core::digest::sha256_hex(&head),
    })
}

impl UpdateSource for InboxSource {
    fn name(&self) -> String {
        format!("inbox {}", self.dir.display())
    }

    fn poll(&mut self, handled: &[OfferId]) -> Result<Option<Offer>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&self.dir)(e)),
        };
        let mut bundles: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tern"))
            .collect();
        bundles.sort();
        Ok(bundles.into_iter().find_map(|bundle| {
            let id = offer_id(&bundle)?;
            (!handled.contains(&id)).then_some(Offer { bundle, id })
        }))
    }

    fn done(&mut self, offer: &Offer) -> Result<()> {
        // Renamed, not deleted: the operator can see what was handled.
        let handled = offer.bundle.with_extension("tern.done");
        std::fs::rename(&offer.bundle, &handled).map_err(Error::io(&offer.bundle))
    }
}
