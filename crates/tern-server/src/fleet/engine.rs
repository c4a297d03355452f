//! The rollout engine: once a second, in the one server process holding the `rollouts`
//! lease, count the selection of rollouts created since the last tick (creation reads no
//! device), start scheduled rollouts whose time has come, time out stuck devices, and open
//! the next phase, stop or finish each running rollout by [`policy::decide`] over its
//! counters. Every decision is one transaction on the rollout's row (compare-and-swap on
//! its status and phases) with its fleet event, so a kill leaves it made or not made.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;

use super::policy::{self, Decision};
use super::rollouts::{
    count_cutoff, count_selected, phase_counts, rollout_from_row, unordered_exists, RolloutRow, ROLLOUT_COLUMNS,
};
use super::rows::{self, Move};
use super::R;
use crate::{unix_now, AppState};

/// How long the engine's lease lasts; renewed every tick.
const LEASE_MS: i64 = 5_000;
/// How often the selection of a running rollout is counted again (devices enrolled,
/// approved, re-tagged or decommissioned change it).
const RECOUNT_SECS: i64 = 30;
/// Stuck devices timed out per rollout and tick.
const TIMEOUT_BATCH: i64 = 1_000;

/// Run the engine until the process ends.
pub async fn run(state: Arc<AppState>) {
    let mut last_count = std::collections::HashMap::<String, i64>::new();
    loop {
        tokio::time::sleep(Duration::from_millis(state.cfg.rollout_tick_ms.clamp(50, 60_000))).await;
        match state.db.try_lease("rollouts", &state.instance, LEASE_MS).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!("rollout lease failed: {e}");
                continue;
            }
        }
        if let Err(e) = tick(&state, &mut last_count).await {
            tracing::error!("rollout engine: {e}");
        }
    }
}

/// One pass over the rollouts that can change.
pub async fn tick(state: &AppState, last_count: &mut std::collections::HashMap<String, i64>) -> R<()> {
    let now = unix_now();
    let started = sqlx::query("SELECT id FROM rollouts WHERE status = 'scheduled' AND start_at <= $1")
        .bind(now)
        .fetch_all(&state.db.pool)
        .await?;
    for r in started {
        let id: String = r.try_get(0)?;
        change(state, &id, "scheduled", None, "running", None, None, "rollout.start").await?;
    }
    let rows = sqlx::query(&format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts
         WHERE status IN ('running', 'paused', 'ready', 'scheduled', 'waiting-approval') ORDER BY created_at"
    ))
    .fetch_all(&state.db.pool)
    .await?;
    for row in &rows {
        let mut r = rollout_from_row(row)?;
        if r.selected.len() != r.spec.phases.len() {
            // Created since the last tick: count its selection once, whatever its status,
            // so that an operator sees what it selects before starting or approving it.
            recount(state, &mut r).await?;
            last_count.insert(r.id.clone(), now);
        }
        if !matches!(r.status.as_str(), "running" | "paused") {
            continue;
        }
        if let Some(limit) = r.spec.timeout_secs {
            time_out_stuck(state, &r, limit as i64, now).await?;
        }
        if r.status != "running" {
            continue;
        }
        if fix_counts(state, &mut r).await? {
            // The phase's cut-off moved: count its selection before deciding on it.
            recount(state, &mut r).await?;
            last_count.insert(r.id.clone(), now);
        }
        if (0..r.opened.min(r.cutoffs.len())).any(|k| !p_is_fixed(&r.spec, k, r.cutoffs[k])) {
            // A count phase waiting for its first selected device: nothing to decide on.
            continue;
        }
        let due = last_count.get(&r.id).is_none_or(|t| now - t >= RECOUNT_SECS);
        if due {
            recount(state, &mut r).await?;
            last_count.insert(r.id.clone(), now);
        }
        let counts: Vec<_> = phase_counts(state, &r).await?.into_iter().map(|(c, _)| c).collect();
        let mut decision = policy::decide(&r.spec, r.opened, &counts);
        if matches!(decision, Decision::OpenNext | Decision::Finish) && !due {
            // Decide on a fresh count of the selection, not one up to RECOUNT_SECS old.
            recount(state, &mut r).await?;
            last_count.insert(r.id.clone(), now);
            let counts: Vec<_> = phase_counts(state, &r).await?.into_iter().map(|(c, _)| c).collect();
            decision = policy::decide(&r.spec, r.opened, &counts);
        }
        if decision == Decision::Finish && unordered_exists(state, &r).await? {
            decision = Decision::Hold;
        }
        match decision {
            Decision::Hold => {}
            Decision::OpenNext => {
                change(
                    state,
                    &r.id,
                    "running",
                    Some(r.opened),
                    "running",
                    Some(r.opened + 1),
                    None,
                    "rollout.open-phase",
                )
                .await?;
            }
            Decision::Stop(reason) => {
                change(
                    state,
                    &r.id,
                    "running",
                    Some(r.opened),
                    "stopped",
                    None,
                    Some(&reason),
                    "rollout.stop",
                )
                .await?;
            }
            Decision::Finish => {
                change(
                    state,
                    &r.id,
                    "running",
                    Some(r.opened),
                    "finished",
                    None,
                    None,
                    "rollout.finish",
                )
                .await?;
            }
        }
    }
    last_count.retain(|id, _| {
        rows.iter()
            .any(|r| r.try_get::<String, _>("id").is_ok_and(|x| &x == id))
    });
    Ok(())
}

/// Fix the cut-off of each open count phase not fixed yet (0: it holds nobody), the first
/// time its selection is not empty; whether one was fixed. One row, compare-and-swap on
/// the cut-offs read, with the event that makes every process reload its rollouts.
async fn fix_counts(state: &AppState, r: &mut RolloutRow) -> R<bool> {
    let mut cutoffs = r.cutoffs.clone();
    for k in 0..r.opened.min(cutoffs.len()) {
        let Some(n) = r.spec.phases.get(k).and_then(|p| p.count) else {
            continue;
        };
        if p_is_fixed(&r.spec, k, cutoffs[k]) {
            continue;
        }
        let Some(c) = count_cutoff(state, &r.spec, &r.id, n).await? else {
            break;
        };
        // Phases are cumulative: a count phase holds at least what the one before holds.
        let floor = if k > 0 { cutoffs[k - 1] } else { 0 };
        cutoffs[k] = c.max(floor).max(1);
    }
    if cutoffs == r.cutoffs {
        return Ok(false);
    }
    let mut tx = state.db.write.begin().await?;
    let done = sqlx::query("UPDATE rollouts SET cutoffs = $1, updated_at = $2 WHERE id = $3 AND cutoffs = $4")
        .bind(serde_json::to_string(&cutoffs).unwrap_or_default())
        .bind(unix_now())
        .bind(&r.id)
        .bind(serde_json::to_string(&r.cutoffs).unwrap_or_default())
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    crate::session::record_in(&mut tx, crate::session::ROLLOUTS_CHANGED).await?;
    tx.commit().await?;
    state.fleet.refresh(state, false).await?;
    r.cutoffs = cutoffs;
    Ok(true)
}

/// Whether phase `k`'s cut-off is fixed: a count phase's is 0 until it opens.
fn p_is_fixed(spec: &policy::RolloutSpec, k: usize, cutoff: u64) -> bool {
    cutoff != 0 || spec.phases.get(k).is_none_or(|p| p.count.is_none())
}

/// Count the selection again and store it if it changed (one row).
async fn recount(state: &AppState, r: &mut RolloutRow) -> R<()> {
    let selected = count_selected(state, &r.spec, &r.id, &r.cutoffs).await?;
    if selected != r.selected {
        sqlx::query("UPDATE rollouts SET selected = $1 WHERE id = $2")
            .bind(serde_json::to_string(&selected).unwrap_or_default())
            .bind(&r.id)
            .execute(&state.db.write)
            .await?;
        r.selected = selected;
    }
    Ok(())
}

/// Move a rollout from (`from`, `opened`) to (`to`, `new_opened`), audited as the server.
#[allow(clippy::too_many_arguments)]
async fn change(
    state: &AppState,
    id: &str,
    from: &str,
    opened: Option<usize>,
    to: &str,
    new_opened: Option<usize>,
    reason: Option<&str>,
    action: &str,
) -> R<()> {
    let mut tx = state.db.write.begin().await?;
    let done = sqlx::query(
        "UPDATE rollouts SET status = $1, opened = COALESCE($2, opened), reason = COALESCE($3, reason), updated_at = $4
         WHERE id = $5 AND status = $6 AND ($7 < 0 OR opened = $7)",
    )
    .bind(to)
    .bind(new_opened.map(|n| n as i64))
    .bind(reason)
    .bind(unix_now())
    .bind(id)
    .bind(from)
    .bind(opened.map_or(-1, |n| n as i64))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        // An operator acted first (a pause, a cancel): their change stands.
        return Ok(());
    }
    crate::session::record_in(&mut tx, crate::session::ROLLOUTS_CHANGED).await?;
    tx.commit().await?;
    state.fleet.refresh(state, false).await?;
    let detail = match (new_opened, reason) {
        (Some(n), _) => format!("phase {n} opened"),
        (None, Some(r)) => r.to_owned(),
        (None, None) => format!("{from} -> {to}"),
    };
    tracing::info!(rollout = id, action, "rollout {from} -> {to}: {detail}");
    let _ = state
        .db
        .audit(
            &format!("server:{}", state.instance),
            action,
            &format!("rollout:{id}"),
            "ok",
            &detail,
        )
        .await;
    Ok(())
}

/// Devices installing, rebooting or on trial for longer than `limit` seconds count as
/// failed: their rows become `timed-out`, with the stage and the time in the reason.
async fn time_out_stuck(state: &AppState, r: &RolloutRow, limit: i64, now: i64) -> R<()> {
    let stuck = sqlx::query(
        "SELECT device_id, status, phase, status_since FROM rollout_devices
         WHERE rollout_id = $1 AND status IN ('installing', 'rebooting', 'trial') AND status_since < $2
         ORDER BY status_since LIMIT $3",
    )
    .bind(&r.id)
    .bind(now - limit)
    .bind(TIMEOUT_BATCH)
    .fetch_all(&state.db.pool)
    .await?;
    if stuck.is_empty() {
        return Ok(());
    }
    let mut found = Vec::with_capacity(stuck.len());
    for row in &stuck {
        let device: String = row.try_get(0)?;
        let status: String = row.try_get(1)?;
        let phase: i64 = row.try_get(2)?;
        let since: i64 = row.try_get(3)?;
        let reason = format!(
            "timed out: {status} for {} s, more than the rollout's limit of {limit} s",
            now - since
        );
        found.push((device, status, phase, reason));
    }
    let moves: Vec<Move> = found
        .iter()
        .map(|(device, status, phase, reason)| Move {
            rollout: &r.id,
            device,
            phase: *phase,
            from: status,
            to: "timed-out",
            reason: Some(reason),
            progress: None,
        })
        .collect();
    let mut tx = state.db.write.begin().await?;
    let done = rows::transition_all(&mut tx, &moves).await?;
    let moved: Vec<&str> = moves
        .iter()
        .zip(&done)
        .filter(|(m, &ok)| ok && rows::polls_care(m.from, m.to))
        .map(|(m, _)| m.device)
        .collect();
    crate::session::record_all_in(&mut tx, &moved).await?;
    tx.commit().await?;
    if done.contains(&true) {
        let timed_out = done.iter().filter(|&&ok| ok).count();
        tracing::info!(rollout = %r.id, devices = timed_out, "devices timed out after {limit} s");
        state.fleet.refresh(state, false).await?;
    }
    Ok(())
}
