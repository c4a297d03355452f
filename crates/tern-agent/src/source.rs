//! Where `agent run` finds updates: the seam the server protocol plugs into.
//!
//! An [`UpdateSource`] is asked, once per poll, whether there is something to install; it
//! answers with a bundle on local storage (the server source will download one, resuming
//! with the TUF client, after the director's order verified). Today there is the
//! [`InboxSource`]: a directory (an automounted USB stick, a drop folder) whose `*.tern`
//! files are installed in name order.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Something to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The bundle file.
    pub bundle: PathBuf,
}

/// A place updates come from.
pub trait UpdateSource {
    /// A short name for logs.
    fn name(&self) -> String;
    /// The next update, if any.
    fn poll(&mut self) -> Result<Option<Offer>>;
    /// The offer was handled (installed or refused): do not offer it again.
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

impl UpdateSource for InboxSource {
    fn name(&self) -> String {
        format!("inbox {}", self.dir.display())
    }

    fn poll(&mut self) -> Result<Option<Offer>> {
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
        Ok(bundles.into_iter().next().map(|bundle| Offer { bundle }))
    }

    fn done(&mut self, offer: &Offer) -> Result<()> {
        // Renamed, not deleted: the operator can see what was handled.
        let handled = offer.bundle.with_extension("tern.done");
        std::fs::rename(&offer.bundle, &handled).map_err(Error::io(&offer.bundle))
    }
}
