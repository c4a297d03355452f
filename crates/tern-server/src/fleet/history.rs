//! The device inventory: search (paged, by id, tag, type, hardware, installed version and
//! state), tags edited after enrollment, and each device's history (every rollout it was
//! part of, each status transition with its time and reason, and every refused order).

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tern_core::text::shown;

use super::{audit, device_from_row, valid_id, Device, Refusal, DEVICE_COLUMNS, R};
use crate::{unix_now, AppState};

/// Most devices in one page.
pub const MAX_PAGE: i64 = 1_000;
/// Most tags on one device.
pub const MAX_DEVICE_TAGS: usize = 32;

/// One entry of a device's history.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// When (Unix microseconds).
    pub at_us: i64,
    /// The rollout (empty for a refused order outside one).
    pub rollout: String,
    /// The status before (empty for a new row).
    pub from: String,
    /// The status after (`refused-order` for an order the device refused).
    pub to: String,
    /// Why.
    pub reason: String,
}

/// Record an order the device refused (its signed check-in said so).
pub(crate) async fn refused_order(state: &AppState, device: &str, rollout: Option<&str>, reason: &str) -> R<()> {
    // The rollout id is the device's claim: stored shortened and escaped, as the reason is.
    let rollout = tern_core::text::shown_max(rollout.unwrap_or(""), 128);
    let mut tx = state.db.write.begin().await?;
    super::rows::history(&mut tx, device, &rollout, "", "refused-order", reason).await?;
    tx.commit().await?;
    Ok(())
}

/// A device's history, newest first.
pub async fn history(state: &AppState, device: &str, limit: i64) -> R<Vec<HistoryEntry>> {
    let rows = sqlx::query(
        "SELECT at_us, rollout_id, from_status, to_status, reason FROM device_history
         WHERE device_id = $1 ORDER BY at_us DESC, id LIMIT $2",
    )
    .bind(device)
    .bind(limit.clamp(1, 10_000))
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(HistoryEntry {
                at_us: r.try_get(0)?,
                rollout: r.try_get(1)?,
                from: r.try_get(2)?,
                to: r.try_get(3)?,
                reason: r.try_get(4)?,
            })
        })
        .collect()
}

/// What an inventory search asks for; every field given must match.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct DeviceSearch {
    /// Registry status: pending, approved, rejected or decommissioned.
    pub status: Option<String>,
    /// Carrying this tag.
    pub tag: Option<String>,
    /// Of this type.
    pub device_type: Option<String>,
    /// Of this hardware revision.
    pub hardware: Option<String>,
    /// Whose booted slot holds this version.
    pub version: Option<String>,
    /// The agent's state at its last check-in (idle, trial…).
    pub state: Option<String>,
    /// Whose id contains this text.
    pub q: Option<String>,
    /// Only ids after this one (the last id of the previous page).
    pub after: Option<String>,
    /// Devices per page (default and most: 1,000).
    pub limit: Option<i64>,
}

/// A page of the inventory, ordered by id.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DevicePage {
    /// The devices.
    pub devices: Vec<Device>,
    /// Pass as `after` for the next page; absent on the last.
    pub next: Option<String>,
}

/// Search the inventory: one indexed statement, keyset-paged by id.
pub async fn search(state: &AppState, q: &DeviceSearch) -> R<DevicePage> {
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let mut conds = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    let mut add = |cond: &str, v: &Option<String>, binds: &mut Vec<String>| {
        if let Some(v) = v {
            binds.push(v.clone());
            conds.push(cond.replace('?', &format!("${}", binds.len())));
        }
    };
    add("status = ?", &q.status, &mut binds);
    add(
        "EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = devices.id AND t.tag = ?)",
        &q.tag,
        &mut binds,
    );
    add("device_type = ?", &q.device_type, &mut binds);
    add("hardware = ?", &q.hardware, &mut binds);
    add("installed_version = ?", &q.version, &mut binds);
    add("phase = ?", &q.state, &mut binds);
    add("id > ?", &q.after, &mut binds);
    if let Some(text) = &q.q {
        if text.len() > 128 {
            return Err(Refusal::BadRequest(
                "the search text is longer than 128 characters".into(),
            ));
        }
        // Matched literally: LIKE's wildcards in the text are escaped.
        let escaped = text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        binds.push(format!("%{escaped}%"));
        conds.push(format!("id LIKE ${} ESCAPE '\\'", binds.len()));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    let sql = format!(
        "SELECT {DEVICE_COLUMNS} FROM devices {filter} ORDER BY id LIMIT {}",
        limit + 1
    );
    let mut query = sqlx::query(&sql);
    for b in &binds {
        query = query.bind(b);
    }
    let rows = query.fetch_all(&state.db.pool).await?;
    let mut devices = rows.iter().map(device_from_row).collect::<R<Vec<_>>>()?;
    let next = if devices.len() as i64 > limit {
        devices.truncate(limit as usize);
        devices.last().map(|d| d.id.clone())
    } else {
        None
    };
    Ok(DevicePage { devices, next })
}

/// Replace a device's tags (its rollouts' selections follow at its next check-in).
pub async fn set_tags(state: &AppState, id: &str, tags: &[String], actor: &str) -> R<Device> {
    let outcome = async {
        if tags.len() > MAX_DEVICE_TAGS {
            return Err(Refusal::BadRequest(format!(
                "{} tags; a device has at most {MAX_DEVICE_TAGS}",
                tags.len()
            )));
        }
        for t in tags {
            valid_id("tag", t)?;
        }
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        let mut tx = state.db.write.begin().await?;
        let done =
            sqlx::query("UPDATE devices SET tags = $1, updated_at = $2 WHERE id = $3 AND status <> 'decommissioned'")
                .bind(serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into()))
                .bind(unix_now())
                .bind(id)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() != 1 {
            return Err(Refusal::NotFound(format!(
                "no device `{}` that can be tagged (decommissioned devices cannot)",
                shown(id)
            )));
        }
        sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for t in &tags {
            sqlx::query("INSERT INTO device_tags (device_id, tag) VALUES ($1, $2)")
                .bind(id)
                .bind(t)
                .execute(&mut *tx)
                .await?;
        }
        crate::session::record_in(&mut tx, id).await?;
        tx.commit().await?;
        state.fleet.refresh(state, false).await?;
        super::device(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no device `{id}`")))
    }
    .await;
    audit(state, actor, "device.tags", &format!("device:{}", shown(id)), &outcome).await;
    outcome
}
