//! Rollouts, the operator's side: create, approve, start, pause, resume, cancel, and the
//! status summary. Each operation is one transaction writing the rollout's own row and one
//! fleet event (`#rollouts`), whatever the fleet's size: which devices a phase holds is a
//! pure function ([`super::policy`]), and a device's row appears when the device checks in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tern_core::text::shown;

use super::policy::{self, PhaseCounts, PhaseSpec, RolloutSpec, Selector};
use super::{audit, device, valid_id, Refusal, R};
use crate::{random_hex, unix_now, AppState};

/// How a rollout starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// As soon as it is created (or approved).
    #[default]
    Auto,
    /// When an operator starts it (`tern rollout start`).
    Manual,
    /// At `start_at`.
    At,
}

/// A rollout request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// The release.
    pub release: String,
    /// Which devices.
    pub selector: Selector,
    /// Ordered, cumulative phases; none is one phase of every selected device.
    #[serde(default)]
    pub phases: Vec<PhaseSpec>,
    /// When the rollout stops.
    #[serde(default)]
    pub error: Option<policy::ErrorThreshold>,
    /// When devices may get new orders.
    #[serde(default)]
    pub window: Option<policy::Window>,
    /// Seconds a device may spend installing, rebooting or on trial before it counts as
    /// failed (timed-out).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// How it starts.
    #[serde(default)]
    pub start: Start,
    /// With `start: at`: when (Unix seconds).
    #[serde(default)]
    pub start_at: Option<i64>,
    /// Whether another admin must approve it before it starts (the server's
    /// `require_rollout_approval` makes every rollout need it).
    #[serde(default)]
    pub require_approval: bool,
}

/// One phase as the status shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PhaseStatus {
    /// 1-based.
    pub number: usize,
    /// What the operator asked for.
    pub spec: PhaseSpec,
    /// Whether devices of this phase may be ordered.
    pub open: bool,
    /// The figures.
    pub counts: PhaseCounts,
    /// Selected devices not ordered yet.
    pub waiting: u64,
    /// Devices per row status.
    pub by_status: BTreeMap<String, i64>,
}

/// A rollout and its progress.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Rollout {
    /// Id.
    pub id: String,
    /// Release.
    pub release: String,
    /// What it does.
    pub spec: RolloutSpec,
    /// The selector in words.
    pub selects: String,
    /// waiting-approval, ready, scheduled, running, paused, stopped, cancelled or finished.
    pub status: String,
    /// Why it stopped or was cancelled.
    pub reason: Option<String>,
    /// Phases open.
    pub opened: usize,
    /// Each phase.
    pub phases: Vec<PhaseStatus>,
    /// Every phase together.
    pub totals: PhaseCounts,
    /// Whether `selected` has been counted: creation writes one row and reads no device, so
    /// the engine counts the selection on its next tick (and again every 30 s while running).
    pub counted: bool,
    /// none, required or approved.
    pub approval: String,
    /// Who approved it.
    pub approved_by: Option<String>,
    /// When it starts, for a scheduled rollout (Unix seconds).
    pub start_at: Option<i64>,
    /// Created (Unix seconds).
    pub created_at: i64,
    /// By whom.
    pub created_by: String,
    /// Last change of its status or phases (Unix seconds).
    pub updated_at: i64,
}

/// A rollout's row, parsed.
#[derive(Debug, Clone)]
pub(crate) struct RolloutRow {
    pub id: String,
    pub release: String,
    pub spec: RolloutSpec,
    pub status: String,
    pub reason: Option<String>,
    pub opened: usize,
    pub cutoffs: Vec<u64>,
    pub selected: Vec<u64>,
    pub approval: String,
    pub approved_by: Option<String>,
    pub creator_token: String,
    pub start_mode: String,
    pub start_at: Option<i64>,
    pub created_at: i64,
    pub created_by: String,
    pub updated_at: i64,
}

pub(crate) const ROLLOUT_COLUMNS: &str =
    "id, release_name, selector_kind, selector, spec, status, reason, opened, cutoffs, \
     selected, approval, approved_by, creator_token, start_mode, start_at, created_at, created_by, updated_at";

/// The specification of a deployment made before rollouts existed: one phase.
fn legacy_spec(kind: &str, selector: &str) -> RolloutSpec {
    let mut s = Selector::default();
    match kind {
        "device" => s.device = Some(selector.into()),
        "tag" => s.tags = vec![selector.into()],
        _ => s.device_type = Some(selector.into()),
    }
    RolloutSpec {
        selector: s,
        phases: vec![PhaseSpec {
            percent: Some(100.0),
            count: None,
            success_percent: 100.0,
        }],
        error: None,
        window: None,
        timeout_secs: None,
    }
}

pub(crate) fn rollout_from_row(r: &sqlx::any::AnyRow) -> R<RolloutRow> {
    let spec_text: String = r.try_get("spec")?;
    let spec = if spec_text.is_empty() {
        legacy_spec(
            &r.try_get::<String, _>("selector_kind")?,
            &r.try_get::<String, _>("selector")?,
        )
    } else {
        serde_json::from_str(&spec_text)
            .map_err(|e| Refusal::Internal(crate::Error::Refused(format!("stored rollout spec: {e}"))))?
    };
    let cutoffs: Vec<u64> = serde_json::from_str(&r.try_get::<String, _>("cutoffs")?).unwrap_or_default();
    let selected: Vec<u64> = serde_json::from_str(&r.try_get::<String, _>("selected")?).unwrap_or_default();
    Ok(RolloutRow {
        id: r.try_get("id")?,
        release: r.try_get("release_name")?,
        spec,
        status: r.try_get("status")?,
        reason: r.try_get("reason")?,
        opened: r.try_get::<i64, _>("opened")?.max(0) as usize,
        cutoffs,
        selected,
        approval: r.try_get("approval")?,
        approved_by: r.try_get("approved_by")?,
        creator_token: r.try_get("creator_token")?,
        start_mode: r.try_get("start_mode")?,
        start_at: r.try_get("start_at")?,
        created_at: r.try_get("created_at")?,
        created_by: r.try_get("created_by")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub(crate) async fn rollout_row(state: &AppState, id: &str) -> R<Option<RolloutRow>> {
    let row = sqlx::query(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(rollout_from_row).transpose()
}

/// `d.… = $n` conditions for the selector, numbered from `first`, and their values.
pub(crate) fn selector_sql(s: &Selector, first: usize) -> (String, Vec<String>) {
    let mut conds = vec!["d.status = 'approved'".to_owned()];
    let mut binds = Vec::new();
    let mut n = first;
    let mut push = |cond: String, v: &str, binds: &mut Vec<String>| {
        conds.push(cond);
        binds.push(v.to_owned());
    };
    if let Some(d) = &s.device {
        push(format!("d.id = ${n}"), d, &mut binds);
        n += 1;
    }
    if let Some(t) = &s.device_type {
        push(format!("d.device_type = ${n}"), t, &mut binds);
        n += 1;
    }
    if let Some(h) = &s.hardware {
        push(format!("d.hardware = ${n}"), h, &mut binds);
        n += 1;
    }
    for t in &s.tags {
        push(
            format!("EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = d.id AND t.tag = ${n})"),
            t,
            &mut binds,
        );
        n += 1;
    }
    (conds.join(" AND "), binds)
}

/// The position expression of `d.bucket` in a rollout whose offset is bound as `$1`.
const POSITION: &str = "((d.bucket - $1 + 4294967296) % 4294967296)";

/// How many approved devices each phase selects now: one pass over the selection.
pub(crate) async fn count_selected(state: &AppState, spec: &RolloutSpec, id: &str, cutoffs: &[u64]) -> R<Vec<u64>> {
    let (conds, binds) = selector_sql(&spec.selector, 2 + cutoffs.len());
    let mut case = String::from("CASE");
    for k in 0..cutoffs.len() {
        case.push_str(&format!(" WHEN {POSITION} < ${} THEN {k}", k + 2));
    }
    case.push_str(" ELSE -1 END");
    let sql = format!("SELECT {case} AS k, COUNT(*) FROM devices d WHERE {conds} GROUP BY 1");
    let mut q = sqlx::query(&sql).bind(i64::from(policy::offset(id)));
    for c in cutoffs {
        q = q.bind(*c as i64);
    }
    for b in &binds {
        q = q.bind(b);
    }
    let mut out = vec![0u64; cutoffs.len()];
    for r in q.fetch_all(&state.db.pool).await? {
        let k: i64 = r.try_get(0)?;
        let n: i64 = r.try_get(1)?;
        if let Some(slot) = usize::try_from(k).ok().and_then(|k| out.get_mut(k)) {
            *slot = n as u64;
        }
    }
    Ok(out)
}

/// Whether an approved device the rollout selects now, in a phase opened so far, has no row
/// in it yet: the rollout is not finished while one waits for its first check-in. (The
/// counters cannot say: rows of devices since untagged or decommissioned still count.)
/// Stops at the first such device.
pub(crate) async fn unordered_exists(state: &AppState, r: &RolloutRow) -> R<bool> {
    let within = r.cutoffs.iter().take(r.opened).copied().max().unwrap_or(0);
    let (conds, binds) = selector_sql(&r.spec.selector, 4);
    let sql = format!(
        "SELECT 1 FROM devices d WHERE {conds} AND {POSITION} < $2
         AND NOT EXISTS (SELECT 1 FROM rollout_devices rd WHERE rd.rollout_id = $3 AND rd.device_id = d.id) LIMIT 1"
    );
    let mut q = sqlx::query(&sql)
        .bind(i64::from(policy::offset(&r.id)))
        .bind(within as i64)
        .bind(&r.id);
    for b in &binds {
        q = q.bind(b);
    }
    Ok(q.fetch_optional(&state.db.pool).await?.is_some())
}

/// Every phase's cut-off as created: a percentage's is fixed; a count's is 0 (it holds
/// nobody) until the phase opens and the engine fixes it ([`count_cutoff`]).
fn cutoffs_for(spec: &RolloutSpec) -> Vec<u64> {
    spec.phases
        .iter()
        .map(|p| match (p.percent, p.count) {
            (Some(pc), _) => policy::percent_cutoff(pc),
            (None, Some(_)) => 0,
            (None, None) => policy::POSITIONS,
        })
        .collect()
}

/// The cut-off of a phase of the first `n` selected devices, fixed when it opens: the
/// position just past the `n`-th selected device, or past the last when fewer are selected
/// now (devices selected later, further on, wait for a later phase); `None` while nothing
/// is selected. Reads the selection (the engine's background work, not an operator's).
pub(crate) async fn count_cutoff(state: &AppState, spec: &RolloutSpec, id: &str, n: u64) -> R<Option<u64>> {
    let (conds, binds) = selector_sql(&spec.selector, 3);
    let nth = format!("SELECT {POSITION} AS p FROM devices d WHERE {conds} ORDER BY 1 LIMIT 1 OFFSET $2");
    let last = format!("SELECT MAX({POSITION}) AS p FROM devices d WHERE {conds} AND $2 >= 0");
    let offset = i64::from(policy::offset(id));
    // Past the n-th: the (n+1)-th device's position is the exclusive cut-off.
    let past = i64::try_from(n).unwrap_or(i64::MAX);
    for (sql, bind, past_last) in [(&nth, past, false), (&last, 0, true)] {
        let mut q = sqlx::query(sql).bind(offset).bind(bind);
        for b in &binds {
            q = q.bind(b);
        }
        if let Some(row) = q.fetch_optional(&state.db.pool).await? {
            if let Some(p) = row.try_get::<Option<i64>, _>(0)? {
                let p = u64::try_from(p).unwrap_or(0);
                return Ok(Some(if past_last { p + 1 } else { p }));
            }
        }
    }
    Ok(None)
}

/// Create a rollout.
pub async fn create_rollout(state: &AppState, req: RolloutRequest, actor: &str, token: &str) -> R<Rollout> {
    let outcome = create_inner(state, &req, actor, token).await;
    let subject = match &outcome {
        Ok(r) => format!("rollout:{}", r.id),
        Err(_) => format!("release:{}", shown(&req.release)),
    };
    audit(state, actor, "rollout.create", &subject, &outcome).await;
    outcome
}

async fn create_inner(state: &AppState, req: &RolloutRequest, actor: &str, token: &str) -> R<Rollout> {
    let mut phases = req.phases.clone();
    if phases.is_empty() {
        phases.push(PhaseSpec {
            percent: Some(100.0),
            count: None,
            success_percent: 100.0,
        });
    }
    let spec = RolloutSpec {
        selector: req.selector.clone(),
        phases,
        error: req.error.clone(),
        window: req.window.clone(),
        timeout_secs: req.timeout_secs,
    };
    spec.validate().map_err(Refusal::BadRequest)?;
    let s = &spec.selector;
    for v in s.device.iter() {
        valid_id("device id", v)?;
    }
    for v in s.tags.iter() {
        valid_id("tag", v)?;
    }
    for v in s.device_type.iter().chain(s.hardware.iter()) {
        valid_id("selector value", v)?;
    }
    let now = unix_now();
    let start_at = match (req.start, req.start_at) {
        (Start::At, Some(t)) => Some(t),
        (Start::At, None) => {
            return Err(Refusal::BadRequest(
                "`start: at` needs `start_at` (Unix seconds)".into(),
            ))
        }
        (_, Some(_)) => return Err(Refusal::BadRequest("`start_at` goes with `start: at`".into())),
        _ => None,
    };
    let release = crate::repo::release(state, &req.release)
        .await?
        .ok_or_else(|| Refusal::NotFound(format!("no release `{}`", shown(&req.release))))?;
    // Every check before anything is written: a refused rollout leaves nothing behind.
    if let Some(d) = &s.device {
        match device(state, d).await? {
            Some(dev) if dev.status == "approved" => {}
            Some(dev) => return Err(Refusal::Conflict(format!("device `{d}` is {}", dev.status))),
            None => return Err(Refusal::NotFound(format!("no device `{}`", shown(d)))),
        }
    }
    let approval = if req.require_approval || state.cfg.require_rollout_approval {
        "required"
    } else {
        "none"
    };
    let status = match (approval, req.start) {
        ("required", _) => "waiting-approval",
        (_, Start::Auto) => "running",
        (_, Start::Manual) => "ready",
        (_, Start::At) => "scheduled",
    };
    let id = format!("r-{}", random_hex(6));
    let cutoffs = cutoffs_for(&spec);
    // Not counted here: a count is one pass over the selection (about 2 s for 1,000,000
    // devices on PostgreSQL); the engine does it on its next tick, before any decision.
    let selected: Vec<u64> = Vec::new();
    let spec_json =
        serde_json::to_string(&spec).map_err(|e| Refusal::Internal(crate::Error::Refused(e.to_string())))?;
    let mut tx = state.db.write.begin().await?;
    sqlx::query(
        "INSERT INTO rollouts (id, release_name, selector_kind, selector, status, created_at, created_by, spec, opened,
                               cutoffs, selected, approval, creator_token, start_mode, start_at, updated_at)
         VALUES ($1, $2, 'spec', '', $3, $4, $5, $6, 1, $7, $8, $9, $10, $11, $12, $4)",
    )
    .bind(&id)
    .bind(&release.name)
    .bind(status)
    .bind(now)
    .bind(actor)
    .bind(&spec_json)
    .bind(serde_json::to_string(&cutoffs).unwrap_or_default())
    .bind(serde_json::to_string(&selected).unwrap_or_default())
    .bind(approval)
    .bind(token)
    .bind(match req.start {
        Start::Auto => "auto",
        Start::Manual => "manual",
        Start::At => "at",
    })
    .bind(start_at)
    .execute(&mut *tx)
    .await?;
    crate::session::record_in(&mut tx, crate::session::ROLLOUTS_CHANGED).await?;
    tx.commit().await?;
    state.fleet.refresh(state, false).await?;
    rollout(state, &id)
        .await?
        .ok_or_else(|| Refusal::NotFound("rollout vanished".into()))
}

/// An operator's action on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a manual (ready) or scheduled rollout now.
    Start,
    /// Hold every new order.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Stop for good: no new orders; devices already installing finish and are reported.
    Cancel,
    /// Approve a rollout waiting for approval (another admin than its creator).
    Approve,
}

impl Action {
    /// By name.
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "start" => Action::Start,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "cancel" => Action::Cancel,
            "approve" => Action::Approve,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel => "cancel",
            Action::Approve => "approve",
        }
    }

    fn from(self) -> &'static [&'static str] {
        match self {
            Action::Start => &["ready", "scheduled"],
            Action::Pause => &["running"],
            Action::Resume => &["paused"],
            Action::Cancel => &["waiting-approval", "ready", "scheduled", "running", "paused"],
            Action::Approve => &["waiting-approval"],
        }
    }
}

/// Apply `action` to rollout `id` for `actor` (token `token`). The status changes only
/// from one the action allows, checked in the statement that changes it.
pub async fn act(state: &AppState, id: &str, action: Action, actor: &str, token: &str) -> R<Rollout> {
    let outcome = act_inner(state, id, action, actor, token).await;
    audit(
        state,
        actor,
        &format!("rollout.{}", action.name()),
        &format!("rollout:{}", shown(id)),
        &outcome,
    )
    .await;
    outcome
}

async fn act_inner(state: &AppState, id: &str, action: Action, actor: &str, token: &str) -> R<Rollout> {
    let r = rollout_row(state, id)
        .await?
        .ok_or_else(|| Refusal::NotFound(format!("no rollout `{}`", shown(id))))?;
    let from = action.from();
    if !from.contains(&r.status.as_str()) {
        return Err(Refusal::Conflict(format!(
            "rollout `{id}` is {}; it cannot {}",
            r.status,
            action.name()
        )));
    }
    let start_status = match r.start_at {
        Some(t) if t > unix_now() => "scheduled",
        Some(_) => "running",
        None if r.start_mode == "manual" => "ready",
        None => "running",
    };
    let (to, approved_by) = match action {
        Action::Start | Action::Resume => ("running", None),
        Action::Pause => ("paused", None),
        Action::Cancel => ("cancelled", None),
        Action::Approve => {
            if r.creator_token == token {
                return Err(Refusal::Forbidden(format!(
                    "rollout `{id}` was created with this token; another admin must approve it"
                )));
            }
            (start_status, Some(actor))
        }
    };
    let mut tx = state.db.write.begin().await?;
    let done = sqlx::query(
        "UPDATE rollouts SET status = $1, updated_at = $2,
                approval = CASE WHEN $3 = 1 THEN 'approved' ELSE approval END,
                approved_by = COALESCE($4, approved_by),
                reason = CASE WHEN $1 = 'cancelled' THEN $5 ELSE reason END
         WHERE id = $6 AND status = $7",
    )
    .bind(to)
    .bind(unix_now())
    .bind(i64::from(action == Action::Approve))
    .bind(approved_by)
    .bind(format!("cancelled by {actor}"))
    .bind(id)
    .bind(&r.status)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(Refusal::Conflict(format!(
            "rollout `{id}` changed meanwhile; look again"
        )));
    }
    crate::session::record_in(&mut tx, crate::session::ROLLOUTS_CHANGED).await?;
    tx.commit().await?;
    state.fleet.refresh(state, false).await?;
    rollout(state, id)
        .await?
        .ok_or_else(|| Refusal::NotFound(format!("no rollout `{id}`")))
}

/// The counts of every phase, from the incremental counters.
pub(crate) async fn phase_counts(state: &AppState, r: &RolloutRow) -> R<Vec<(PhaseCounts, BTreeMap<String, i64>)>> {
    let mut out: Vec<(PhaseCounts, BTreeMap<String, i64>)> = (0..r.spec.phases.len())
        .map(|k| {
            (
                PhaseCounts {
                    selected: r.selected.get(k).copied().unwrap_or(0),
                    ..Default::default()
                },
                BTreeMap::new(),
            )
        })
        .collect();
    let rows = sqlx::query("SELECT phase, status, n FROM rollout_counts WHERE rollout_id = $1")
        .bind(&r.id)
        .fetch_all(&state.db.pool)
        .await?;
    for row in rows {
        let k: i64 = row.try_get(0)?;
        let status: String = row.try_get(1)?;
        let n: i64 = row.try_get(2)?;
        if n == 0 {
            continue;
        }
        if let Some((c, by)) = usize::try_from(k).ok().and_then(|k| out.get_mut(k)) {
            c.add(&status, n.max(0) as u64);
            by.insert(status, n);
        }
    }
    Ok(out)
}

/// A rollout's status summary: its row and its counters, nothing per device.
pub async fn rollout(state: &AppState, id: &str) -> R<Option<Rollout>> {
    let Some(r) = rollout_row(state, id).await? else {
        return Ok(None);
    };
    Ok(Some(summary(state, r).await?))
}

async fn summary(state: &AppState, r: RolloutRow) -> R<Rollout> {
    let counts = phase_counts(state, &r).await?;
    let mut totals = PhaseCounts::default();
    let phases = counts
        .into_iter()
        .enumerate()
        .map(|(k, (c, by_status))| {
            totals.selected += c.selected;
            totals.in_progress += c.in_progress;
            totals.succeeded += c.succeeded;
            totals.failed += c.failed;
            totals.cancelled += c.cancelled;
            PhaseStatus {
                number: k + 1,
                spec: r.spec.phases[k].clone(),
                open: k < r.opened,
                waiting: c.waiting(),
                counts: c,
                by_status,
            }
        })
        .collect();
    Ok(Rollout {
        counted: r.selected.len() == r.spec.phases.len(),
        selects: r.spec.selector.describe(),
        id: r.id,
        release: r.release,
        spec: r.spec,
        status: r.status,
        reason: r.reason,
        opened: r.opened,
        phases,
        totals,
        approval: r.approval,
        approved_by: r.approved_by,
        start_at: r.start_at,
        created_at: r.created_at,
        created_by: r.created_by,
        updated_at: r.updated_at,
    })
}

/// Rollouts, newest first (at most 1,000), optionally of one status.
pub async fn rollouts(state: &AppState, status: Option<&str>) -> R<Vec<Rollout>> {
    let rows = sqlx::query(&format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE ($1 = '' OR status = $1) ORDER BY created_at DESC, id LIMIT 1000"
    ))
    .bind(status.unwrap_or(""))
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(summary(state, rollout_from_row(row)?).await?);
    }
    Ok(out)
}
