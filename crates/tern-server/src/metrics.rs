//! `/metrics` in the Prometheus text format (`prometheus-client`). Counters and latencies
//! are kept in memory per process (check-ins, polls, order signing, uploads); the fleet's
//! figures (devices by status, agent state and installed version, rollouts by status, each
//! unfinished rollout's per-phase counts) are read from the database when scraped, from
//! the same incremental counters the rollout status shows, with a bounded number of series.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::Row;

use crate::fleet::{Refusal, R};
use crate::AppState;

type Labels = Vec<(String, String)>;

/// Most installed versions exported (the most common ones).
const MAX_VERSIONS: i64 = 100;
/// Most rollouts whose phases are exported.
const MAX_ROLLOUTS: i64 = 50;

/// What this process counts.
pub struct Metrics {
    checkins: Family<Labels, Counter>,
    polls: Counter,
    order_signing: Histogram,
    uploads: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            checkins: Family::default(),
            polls: Counter::default(),
            order_signing: Histogram::new(exponential_buckets(0.000_05, 2.0, 14)),
            uploads: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
        }
    }
}

impl Metrics {
    /// A signed check-in was answered (`accepted`) or refused.
    pub fn checkin(&self, accepted: bool) {
        let outcome = if accepted { "accepted" } else { "refused" };
        self.checkins
            .get_or_create(&vec![("outcome".to_owned(), outcome.to_owned())])
            .inc();
    }

    /// A poll was answered.
    pub fn poll(&self) {
        self.polls.inc();
    }

    /// An order was signed in `d`.
    pub fn order_signed(&self, d: Duration) {
        self.order_signing.observe(d.as_secs_f64());
    }

    /// A release upload was handled in `d`.
    pub fn upload(&self, d: Duration) {
        self.uploads.observe(d.as_secs_f64());
    }
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    registry.register(name, help, f.clone());
    f
}

/// Label values escaped as the exposition format requires (`\\`, `\"`, `\n`), since
/// prometheus-client writes them as given and some come from devices (their agent state
/// and installed version): a device must not be able to add a series or break the scrape.
fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), escape(v))).collect()
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

async fn counted(state: &AppState, sql: &str, family: &Family<Labels, Gauge>, label: &str) -> R<()> {
    for r in sqlx::query(sql).fetch_all(&state.db.pool).await? {
        let value: Option<String> = r.try_get(0)?;
        let n: i64 = r.try_get(1)?;
        family
            .get_or_create(&labels(&[(label, value.as_deref().unwrap_or(""))]))
            .set(n);
    }
    Ok(())
}

/// The exposition text.
pub async fn render(state: &AppState) -> R<String> {
    let m = &state.metrics;
    let mut registry = Registry::with_prefix("tern");
    registry.register(
        "checkins",
        "Signed check-ins answered by this process",
        m.checkins.clone(),
    );
    registry.register("polls", "Session polls answered by this process", m.polls.clone());
    registry.register(
        "order_signing_seconds",
        "Time to sign one director order",
        m.order_signing.clone(),
    );
    registry.register(
        "upload_seconds",
        "Time to receive, verify and store one release",
        m.uploads.clone(),
    );

    let devices = gauge_family(&mut registry, "devices", "Registered devices by registry status");
    counted(
        state,
        "SELECT status, COUNT(*) FROM devices GROUP BY status",
        &devices,
        "status",
    )
    .await?;
    let agent = gauge_family(
        &mut registry,
        "devices_by_agent_state",
        "Approved devices by the agent state of their last check-in",
    );
    counted(
        state,
        &format!(
            "SELECT phase, COUNT(*) FROM devices WHERE status = 'approved'
             GROUP BY phase ORDER BY 2 DESC LIMIT {MAX_VERSIONS}"
        ),
        &agent,
        "state",
    )
    .await?;
    let versions = gauge_family(
        &mut registry,
        "devices_by_version",
        "Approved devices by the version their booted slot holds (the 100 most common)",
    );
    counted(
        state,
        &format!(
            "SELECT installed_version, COUNT(*) FROM devices WHERE status = 'approved'
             GROUP BY installed_version ORDER BY 2 DESC LIMIT {MAX_VERSIONS}"
        ),
        &versions,
        "version",
    )
    .await?;
    let rollouts = gauge_family(&mut registry, "rollouts", "Rollouts by status");
    counted(
        state,
        "SELECT status, COUNT(*) FROM rollouts GROUP BY status",
        &rollouts,
        "status",
    )
    .await?;

    let phase_devices = gauge_family(
        &mut registry,
        "rollout_phase_devices",
        "Devices of an unfinished rollout's phase by row status (waiting: selected, not ordered yet)",
    );
    let opened = gauge_family(
        &mut registry,
        "rollout_opened_phases",
        "Phases open in an unfinished rollout",
    );
    let rows = sqlx::query(&format!(
        "SELECT {} FROM rollouts WHERE status IN ('waiting-approval', 'ready', 'scheduled', 'running', 'paused')
         ORDER BY created_at DESC LIMIT {MAX_ROLLOUTS}",
        crate::fleet::ROLLOUT_COLUMNS
    ))
    .fetch_all(&state.db.pool)
    .await?;
    for row in &rows {
        let r = crate::fleet::rollout_from_row(row)?;
        opened
            .get_or_create(&labels(&[("rollout", &r.id), ("status", &r.status)]))
            .set(r.opened as i64);
        let summary = crate::fleet::rollout(state, &r.id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("rollout {} vanished", r.id)))?;
        for p in &summary.phases {
            let phase = p.number.to_string();
            for (status, n) in &p.by_status {
                phase_devices
                    .get_or_create(&labels(&[("rollout", &r.id), ("phase", &phase), ("status", status)]))
                    .set(*n);
            }
            phase_devices
                .get_or_create(&labels(&[("rollout", &r.id), ("phase", &phase), ("status", "waiting")]))
                .set(p.waiting as i64);
        }
    }

    let pool = gauge_family(
        &mut registry,
        "db_connections",
        "Database pool connections by pool and state",
    );
    for (name, p) in [("read", &state.db.pool), ("write", &state.db.write)] {
        let idle = p.num_idle() as i64;
        pool.get_or_create(&labels(&[("pool", name), ("state", "idle")]))
            .set(idle);
        pool.get_or_create(&labels(&[("pool", name), ("state", "in_use")]))
            .set(i64::from(p.size()) - idle);
    }

    let mut out = String::new();
    encode(&mut out, &registry).map_err(|e| Refusal::Internal(crate::Error::Refused(e.to_string())))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_supplied_label_value_cannot_add_a_series() {
        let mut registry = Registry::with_prefix("tern");
        let family = gauge_family(&mut registry, "devices_by_agent_state", "help");
        let evil = "idle\",rollout=\"r-x\"} 999\n# EOF\\";
        family.get_or_create(&labels(&[("state", evil)])).set(1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(series.len(), 1, "{text}");
        assert_eq!(
            series[0],
            r#"tern_devices_by_agent_state{state="idle\",rollout=\"r-x\"} 999\n# EOF\\"} 1"#
        );
        assert_eq!(
            text.matches("# EOF").count(),
            2,
            "only the escaped one and the real end: {text}"
        );
    }
}
