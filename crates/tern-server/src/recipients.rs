//! Wrapped data keys of encrypted payloads (`tern_core::keywrap`). They arrive with a
//! bundle or later (`POST /api/v1/recipients`, from `tern bundle add-recipients
//! --publish`), and a device fetches the ones for its keys
//! (`GET /repo/recipients/SHA256/KID`). A wrapped key opens nothing without the
//! recipient's private key: the server stores ciphertext and wrapped keys, never a data
//! key, and a device accepts an unwrapped key only if the signed manifest commits to it.

use serde::Serialize;
use sqlx::Row;
use tern_core::keywrap::{Recipients, WrappedKey};

use crate::{repo, AppState, Error, Result};

/// Largest recipients document accepted (the bundle's limit for a metadata entry).
pub const MAX_DOCUMENT: usize = 16 << 20;

/// What adding recipients did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Added {
    /// The encrypted payload.
    pub sha256: String,
    /// Entries that were new.
    pub added: u64,
    /// Entries in the request.
    pub submitted: u64,
}

/// Insert a document's entries (an entry for a key that has one already is ignored).
pub async fn insert(tx: &mut sqlx::Transaction<'_, sqlx::Any>, doc: &Recipients, now: i64) -> Result<u64> {
    let mut added = 0;
    for e in &doc.recipients {
        added += sqlx::query(
            "INSERT INTO recipients (sha256, kid, enc, ct, key_commitment, added_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (sha256, kid) DO NOTHING",
        )
        .bind(&doc.sha256)
        .bind(&e.kid)
        .bind(&e.enc)
        .bind(&e.ct)
        .bind(&doc.key_commitment)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    Ok(added)
}

/// Add recipients to a published encrypted payload: the document must name a payload the
/// repository lists, with the key commitment its signed manifest carries.
pub async fn add(state: &AppState, body: &[u8], actor: &str) -> Result<Added> {
    let outcome = add_inner(state, body).await;
    let subject = match &outcome {
        Ok(a) => format!("payload:{}", a.sha256),
        Err(_) => "payload:?".into(),
    };
    state
        .db
        .audit_result(actor, "recipients.add", &subject, &outcome, |a| {
            format!("{} of {} entries new", a.added, a.submitted)
        })
        .await;
    outcome
}

async fn add_inner(state: &AppState, body: &[u8]) -> Result<Added> {
    if body.len() > MAX_DOCUMENT {
        return Err(Error::Invalid(format!(
            "the recipients document exceeds {MAX_DOCUMENT} bytes"
        )));
    }
    let doc = Recipients::parse(body).map_err(|e| Error::Invalid(e.to_string()))?;
    let target = repo::releases(state)
        .await?
        .into_iter()
        .flat_map(|r| r.targets)
        .find(|t| t.hashes.get("sha256") == Some(&doc.sha256))
        .ok_or_else(|| Error::Refused(format!("no published payload has sha256 {}", doc.sha256)))?;
    match &target.key_commitment {
        None => {
            return Err(Error::Refused(format!(
                "payload `{}` is not encrypted: it has no recipients",
                target.name
            )))
        }
        Some(c) if *c != doc.key_commitment => {
            return Err(Error::Refused(format!(
                "the document's key commitment is not the one payload `{}`'s signed manifest carries",
                target.name
            )))
        }
        Some(_) => {}
    }
    // In transactions of a few hundred rows, so that a large document does not hold the
    // (SQLite) writer away from check-ins for long.
    let mut added = 0;
    for chunk in doc.recipients.chunks(256) {
        let part = Recipients {
            recipients: chunk.to_vec(),
            ..doc.clone()
        };
        let mut tx = state.db.write.begin().await?;
        added += insert(&mut tx, &part, crate::unix_now()).await?;
        tx.commit().await?;
    }
    Ok(Added {
        sha256: doc.sha256,
        added,
        submitted: doc.recipients.len() as u64,
    })
}

/// The document with the entries for key `kid` of the payload `sha256`, if there are any.
pub async fn for_key(state: &AppState, sha256: &str, kid: &str) -> Result<Option<Vec<u8>>> {
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if !hex(sha256, 64) || !hex(kid, 16) {
        return Ok(None);
    }
    let rows =
        sqlx::query("SELECT enc, ct, key_commitment FROM recipients WHERE sha256 = $1 AND kid = $2 ORDER BY enc")
            .bind(sha256)
            .bind(kid)
            .fetch_all(&state.db.pool)
            .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut doc = Recipients::new(sha256, &first.try_get::<String, _>("key_commitment")?);
    for r in &rows {
        doc.recipients.push(WrappedKey {
            kid: kid.to_owned(),
            enc: r.try_get("enc")?,
            ct: r.try_get("ct")?,
        });
    }
    Ok(Some(doc.to_bytes()))
}
