//! What the soak found: the checks, computed from the journal of every request, the
//! restarts' times, the acknowledged progress of every device, the server's view at the
//! end and the server process's memory samples; and the report.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::device::{Op, Shard};

/// After the first check-in the server accepts once the database is back, failures are
/// still forgiven for this long.
pub const GRACE_MS: u32 = 10_000;
/// Growth of the server's RSS from warm-up to the end that is flagged.
pub const RSS_GROWTH_FLAG: u64 = 20 << 20;

/// One database restart, in milliseconds from the start of the load.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    /// Just before SIGQUIT.
    pub down_ms: u32,
    /// When `pg_ctl start` returned: it accepts connections.
    pub back_ms: u32,
}

/// One sample of the server process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Milliseconds from the start of the load.
    pub t_ms: u32,
    /// VmRSS in bytes.
    pub rss: u64,
    /// User + system CPU seconds so far.
    pub cpu: f64,
    /// Its threads.
    pub threads: u64,
}

/// A restart and when the server recovered from it.
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    /// The restart.
    pub restart: Restart,
    /// The end of the first accepted check-in sent after the database was back.
    pub first_accepted_ms: Option<u32>,
    /// From here on, every failure counts: `first_accepted_ms` + [`GRACE_MS`] (the end of
    /// the load if nothing was accepted).
    pub recovery_ms: u32,
}

/// Where a request falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Outside every outage: 0 before the first restart, N after the recovery from restart N.
    Steady(usize),
    /// Overlapping restart N's outage (from SIGQUIT to its recovery point).
    Outage(usize),
}

/// Latency and rate of one kind of accepted request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    /// Accepted requests.
    pub count: u64,
    /// Per second of load.
    pub per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// See `p50_ms`.
    pub max_ms: f64,
}

/// The soak's findings.
pub struct Verdict {
    /// Devices whose highest acknowledged progress exceeds what the server shows.
    pub lost: Vec<(String, u64, Option<u64>)>,
    /// Devices checked.
    pub devices: usize,
    /// Devices with at least one acknowledged report.
    pub acked_devices: usize,
    /// The outages.
    pub outages: Vec<Outage>,
    /// Failures outside the outages, by phase label, then by `op kind`.
    pub errors_outside: BTreeMap<String, BTreeMap<String, u64>>,
    /// Failures overlapping each outage, by `op kind`.
    pub errors_outage: Vec<BTreeMap<String, u64>>,
    /// Stale-challenge answers after a failed check-in, by phase label (the protocol's
    /// recovery: fetch the challenge again).
    pub stale_after_failure: BTreeMap<String, u64>,
    /// Polls, check-ins and challenge fetches accepted.
    pub polls: Rate,
    /// See `polls`.
    pub checkins: Rate,
    /// See `polls`.
    pub challenges: Rate,
    /// Polls and check-ins sent after warm-up and outside the outages (rate over that time).
    pub steady_polls: Rate,
    /// See `steady_polls`.
    pub steady_checkins: Rate,
    /// The warm-up's end, in milliseconds from the start of the load.
    pub warm_ms: u32,
    /// Polls answered `checkin: true`.
    pub polls_told_to_check_in: u64,
    /// The server's samples.
    pub samples: Vec<Sample>,
    /// The sample taken as the warm-up reference.
    pub warm: Option<Sample>,
    /// Whether a restart failed (its error).
    pub restart_error: Option<String>,
    /// Whether the server process was still running at the end.
    pub server_alive: bool,
}

fn label(p: Phase, outages: &[Outage]) -> String {
    match p {
        Phase::Steady(0) if outages.is_empty() => "the whole run".to_owned(),
        Phase::Steady(0) => "before the first restart".to_owned(),
        Phase::Steady(n) => format!("after recovery {n}"),
        Phase::Outage(n) => format!("outage {n}"),
    }
}

fn phase(start_ms: u32, end_ms: u32, outages: &[Outage]) -> Phase {
    for (i, o) in outages.iter().enumerate() {
        if start_ms < o.recovery_ms && end_ms >= o.restart.down_ms {
            return Phase::Outage(i + 1);
        }
    }
    Phase::Steady(outages.iter().filter(|o| o.recovery_ms <= start_ms).count())
}

fn rate(mut us: Vec<u32>, load: Duration) -> Rate {
    us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if us.is_empty() {
            return 0.0;
        }
        let rank = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
        f64::from(us[rank - 1]) / 1e3
    };
    Rate {
        count: us.len() as u64,
        per_sec: us.len() as f64 / load.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: us.last().map_or(0.0, |&v| f64::from(v) / 1e3),
    }
}

/// What the analysis needs.
pub struct Inputs<'a> {
    /// The load's length.
    pub load: Duration,
    /// The restarts done.
    pub restarts: Vec<Restart>,
    /// Why a restart failed, if one did.
    pub restart_error: Option<String>,
    /// Every request.
    pub journal: Shard,
    /// Device ids, and each one's highest acknowledged progress (0: none).
    pub acked: Vec<(&'a str, u64)>,
    /// The server's `progress_done` per device at the end.
    pub server: HashMap<String, Option<u64>>,
    /// The server's samples.
    pub samples: Vec<Sample>,
    /// Whether the server process was still running at the end.
    pub server_alive: bool,
}

impl Verdict {
    /// Analyse a finished soak.
    pub fn of(i: Inputs<'_>) -> Verdict {
        let end_ms = i.load.as_millis() as u32;
        let outages: Vec<Outage> = i
            .restarts
            .iter()
            .map(|r| {
                let first = i
                    .journal
                    .answered
                    .iter()
                    .filter(|a| a.op == Op::Checkin && a.start_ms >= r.back_ms)
                    .map(|a| a.end_ms)
                    .min();
                Outage {
                    restart: *r,
                    first_accepted_ms: first,
                    recovery_ms: first.map_or(end_ms.max(r.back_ms), |f| f.saturating_add(GRACE_MS)),
                }
            })
            .collect();
        let mut errors_outside: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut errors_outage = vec![BTreeMap::new(); outages.len()];
        let mut count = |p: Phase, what: String| match p {
            Phase::Outage(n) => *errors_outage[n - 1].entry(what).or_insert(0) += 1,
            Phase::Steady(_) => {
                *errors_outside
                    .entry(label(p, &outages))
                    .or_default()
                    .entry(what)
                    .or_insert(0) += 1
            }
        };
        for f in &i.journal.failed {
            count(
                phase(f.start_ms, f.end_ms, &outages),
                format!("{} {}", f.op.name(), f.kind),
            );
        }
        let mut stale_after_failure = BTreeMap::new();
        for s in &i.journal.stale {
            let p = phase(s.start_ms, s.end_ms, &outages);
            if s.after_accepted {
                count(
                    p,
                    "check-in HTTP 409 StaleChallenge refusing the challenge the server had just given".to_owned(),
                );
            } else {
                *stale_after_failure.entry(label(p, &outages)).or_insert(0) += 1;
            }
        }
        // Warm-up: the first minute, or the first half of a shorter load.
        let warm_ms = (end_ms / 2).min(60_000);
        let mut by_op: BTreeMap<Op, Vec<u32>> = BTreeMap::new();
        let mut steady: BTreeMap<Op, Vec<u32>> = BTreeMap::new();
        for a in &i.journal.answered {
            by_op.entry(a.op).or_default().push(a.us);
            if a.start_ms >= warm_ms && matches!(phase(a.start_ms, a.end_ms, &outages), Phase::Steady(_)) {
                steady.entry(a.op).or_default().push(a.us);
            }
        }
        let steady_ms: u32 = end_ms.saturating_sub(warm_ms).saturating_sub(
            outages
                .iter()
                .map(|o| o.recovery_ms.min(end_ms).saturating_sub(o.restart.down_ms.max(warm_ms)))
                .sum::<u32>(),
        );
        let steady_time = Duration::from_millis(u64::from(steady_ms.max(1)));
        let mut take = |op| rate(by_op.remove(&op).unwrap_or_default(), i.load);
        let (polls, checkins, challenges) = (take(Op::Poll), take(Op::Checkin), take(Op::Challenge));
        let mut take = |op| rate(steady.remove(&op).unwrap_or_default(), steady_time);
        let (steady_polls, steady_checkins) = (take(Op::Poll), take(Op::Checkin));
        let lost = i
            .acked
            .iter()
            .filter_map(|&(id, acked)| {
                let shown = i.server.get(id).copied().flatten();
                (acked > shown.unwrap_or(0)).then(|| (id.to_owned(), acked, shown))
            })
            .collect();
        let warm = i.samples.iter().find(|s| s.t_ms >= warm_ms).copied();
        Verdict {
            lost,
            devices: i.acked.len(),
            acked_devices: i.acked.iter().filter(|(_, a)| *a > 0).count(),
            outages,
            errors_outside,
            errors_outage,
            stale_after_failure,
            polls,
            checkins,
            challenges,
            steady_polls,
            steady_checkins,
            warm_ms,
            polls_told_to_check_in: i.journal.polls_told_to_check_in,
            samples: i.samples,
            warm,
            restart_error: i.restart_error,
            server_alive: i.server_alive,
        }
    }

    /// Failures outside the outages.
    pub fn errors_after_recovery(&self) -> u64 {
        self.errors_outside.values().flat_map(|m| m.values()).sum()
    }

    /// Whether every outage recovered (an accepted check-in after the database was back).
    pub fn recovered(&self) -> bool {
        self.outages.iter().all(|o| o.first_accepted_ms.is_some())
    }

    /// The server's RSS: (after warm-up, maximum, final, final − warm-up).
    pub fn rss(&self) -> Option<(u64, u64, u64, i64)> {
        let warm = self.warm?.rss;
        let max = self.samples.iter().map(|s| s.rss).max()?;
        let last = self.samples.last()?.rss;
        Some((warm, max, last, last as i64 - warm as i64))
    }

    /// The server's CPU seconds over the load.
    pub fn cpu(&self) -> f64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) => b.cpu - a.cpu,
            _ => 0.0,
        }
    }

    /// What failed, if anything: lost reports, errors after recovery, an outage that never
    /// recovered, a restart that failed, a server that died.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if !self.lost.is_empty() {
            f.push(format!("{} devices lost an acknowledged report", self.lost.len()));
        }
        let errors = self.errors_after_recovery();
        if errors > 0 {
            f.push(format!("{errors} requests failed outside the outages"));
        }
        if !self.recovered() {
            f.push("an outage never recovered (no check-in accepted after the database was back)".into());
        }
        if let Some(e) = &self.restart_error {
            f.push(format!("a database restart failed: {e}"));
        }
        if !self.server_alive {
            f.push("the server process exited during the soak".into());
        }
        f
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn secs(ms: u32) -> f64 {
    f64::from(ms) / 1e3
}

impl Verdict {
    /// The checks and figures, for people.
    pub fn print(&self) {
        let pass = |ok: bool| if ok { "PASS" } else { "FAIL" };
        println!("restarts (seconds from the start of the load):");
        if self.outages.is_empty() {
            println!("  none");
        }
        for (n, o) in self.outages.iter().enumerate() {
            let first = o
                .first_accepted_ms
                .map_or("never".to_owned(), |f| format!("{:.1} s", secs(f)));
            println!(
                "  {}: SIGQUIT at {:.1} s, accepting connections again at {:.1} s, first check-in accepted after that at \
                 {first}, recovery point {:.1} s",
                n + 1,
                secs(o.restart.down_ms),
                secs(o.restart.back_ms),
                secs(o.recovery_ms)
            );
        }
        let r = |name: &str, r: &Rate| {
            println!(
                "  {name:<10} {:>9} accepted  {:>8.1}/s  p50 {:>7.2} ms  p99 {:>8.2} ms  max {:>9.2} ms",
                r.count, r.per_sec, r.p50_ms, r.p99_ms, r.max_ms
            )
        };
        println!("rates over the whole load (accepted requests; latency to the answer's last byte):");
        r("polls", &self.polls);
        r("check-ins", &self.checkins);
        r("challenges", &self.challenges);
        println!(
            "after warm-up ({:.0} s) and outside the outages (the first check-ins of a deployment come all at once):",
            secs(self.warm_ms)
        );
        r("polls", &self.steady_polls);
        r("check-ins", &self.steady_checkins);
        println!(
            "  polls answered `checkin: true` (the deployment's order is waiting): {}",
            self.polls_told_to_check_in
        );
        println!();
        println!(
            "(1) no lost acknowledged report: {} of {} devices have an acknowledged progress above the server's \
             progress_done ({} devices had reports acknowledged)  {}",
            self.lost.len(),
            self.devices,
            self.acked_devices,
            pass(self.lost.is_empty())
        );
        for (id, acked, shown) in self.lost.iter().take(10) {
            println!(
                "      {id}: acknowledged {acked}, server shows {}",
                shown.map_or("nothing".to_owned(), |s| s.to_string())
            );
        }
        let errors = self.errors_after_recovery();
        println!(
            "(2) no error after recovery: {errors} failed requests outside the outages  {}",
            pass(errors == 0 && self.recovered())
        );
        for (phase, kinds) in &self.errors_outside {
            for (kind, n) in kinds {
                println!("      {phase}: {n} x {kind}");
            }
        }
        for (n, kinds) in self.errors_outage.iter().enumerate() {
            let o = &self.outages[n];
            let total: u64 = kinds.values().sum();
            println!(
                "    during outage {} ({:.1} s to {:.1} s, expected): {total} failed requests",
                n + 1,
                secs(o.restart.down_ms),
                secs(o.recovery_ms)
            );
            for (kind, k) in kinds {
                println!("      {k} x {kind}");
            }
        }
        let stale: u64 = self.stale_after_failure.values().sum();
        println!(
            "    stale-challenge answers to the first check-in after a failed one (the device fetches its challenge \
             again and is accepted): {stale}"
        );
        for (phase, n) in &self.stale_after_failure {
            println!("      {phase}: {n}");
        }
        match self.rss() {
            Some((warm, max, last, growth)) => {
                let flag = if growth > RSS_GROWTH_FLAG as i64 {
                    format!("GREW more than {} MiB", RSS_GROWTH_FLAG >> 20)
                } else {
                    format!("flat (within {} MiB)", RSS_GROWTH_FLAG >> 20)
                };
                println!(
                    "(3) server memory (VmRSS every 10 s, {} samples): after warm-up ({:.0} s) {:.1} MiB, max {:.1} MiB, \
                     final {:.1} MiB, growth {:+.1} MiB: {flag}",
                    self.samples.len(),
                    self.warm.map_or(0.0, |w| secs(w.t_ms)),
                    mib(warm),
                    mib(max),
                    mib(last),
                    growth as f64 / (1 << 20) as f64
                );
            }
            None => println!("(3) server memory: no samples"),
        }
        let series = |f: &dyn Fn(&Sample) -> String| self.samples.iter().map(f).collect::<Vec<_>>().join(" ");
        println!(
            "    RSS, MiB, every 10 s: {}",
            series(&|s| format!("{:.0}", mib(s.rss)))
        );
        println!("    threads, every 10 s:  {}", series(&|s| s.threads.to_string()));
        let load_s = self.samples.last().map_or(0.0, |s| secs(s.t_ms));
        println!(
            "    server CPU: {:.1} s over the load ({:.0} % of one core)",
            self.cpu(),
            if load_s > 0.0 { self.cpu() / load_s * 100.0 } else { 0.0 }
        );
        if let Some(e) = &self.restart_error {
            println!("restart failed: {e}");
        }
        if !self.server_alive {
            println!("the server process exited during the soak");
        }
    }

    /// The checks and figures as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let rate = |r: &Rate| {
            serde_json::json!({
                "accepted": r.count, "per_second": r.per_sec,
                "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms,
            })
        };
        let rss = self.rss();
        serde_json::json!({
            "restarts": self.outages.iter().map(|o| serde_json::json!({
                "sigquit_s": secs(o.restart.down_ms),
                "accepting_s": secs(o.restart.back_ms),
                "first_accepted_checkin_s": o.first_accepted_ms.map(secs),
                "recovery_point_s": secs(o.recovery_ms),
            })).collect::<Vec<_>>(),
            "polls": rate(&self.polls),
            "checkins": rate(&self.checkins),
            "challenges": rate(&self.challenges),
            "after_warmup_outside_outages": {
                "warmup_s": secs(self.warm_ms),
                "polls": rate(&self.steady_polls),
                "checkins": rate(&self.steady_checkins),
            },
            "polls_told_to_check_in": self.polls_told_to_check_in,
            "lost_acknowledged_reports": {
                "devices_violating": self.lost.len(),
                "devices": self.devices,
                "devices_with_acknowledged_reports": self.acked_devices,
                "examples": self.lost.iter().take(10).map(|(id, a, s)| serde_json::json!({
                    "device": id, "acknowledged": a, "server": s,
                })).collect::<Vec<_>>(),
            },
            "errors_after_recovery": self.errors_outside,
            "errors_during_outages": self.errors_outage,
            "stale_challenge_after_failed_checkin": self.stale_after_failure,
            "server_rss": rss.map(|(warm, max, last, growth)| serde_json::json!({
                "after_warmup_bytes": warm, "max_bytes": max, "final_bytes": last, "growth_bytes": growth,
                "warmup_s": self.warm.map(|w| secs(w.t_ms)),
                "flagged": growth > RSS_GROWTH_FLAG as i64,
            })),
            "server_cpu_seconds": self.cpu(),
            "server_samples": self.samples.iter().map(|s| serde_json::json!({
                "t_s": secs(s.t_ms), "rss_bytes": s.rss, "cpu_seconds": s.cpu, "threads": s.threads,
            })).collect::<Vec<_>>(),
            "failures": self.failures(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::device::{Answered, Failed, Stale};

    fn ok(op: Op, start_ms: u32) -> Answered {
        Answered {
            op,
            start_ms,
            end_ms: start_ms + 5,
            us: 5000,
        }
    }

    fn failed(start_ms: u32, end_ms: u32) -> Failed {
        Failed {
            op: Op::Checkin,
            start_ms,
            end_ms,
            kind: "HTTP 500 Internal".into(),
        }
    }

    /// Failures overlapping an outage are expected; one after the recovery point is not; a
    /// restart's recovery point is the first accepted check-in after it plus the grace.
    #[test]
    fn failures_are_placed_in_outages_or_after_recovery() {
        let journal = Shard {
            answered: vec![ok(Op::Checkin, 1_000), ok(Op::Poll, 21_000), ok(Op::Checkin, 30_000)],
            // In flight at SIGQUIT; during the outage; inside the grace; after recovery.
            failed: vec![
                failed(19_900, 20_100),
                failed(22_000, 32_000),
                failed(39_000, 39_010),
                failed(40_100, 40_200),
            ],
            stale: vec![
                Stale {
                    start_ms: 50_000,
                    end_ms: 50_010,
                    after_accepted: false,
                },
                Stale {
                    start_ms: 51_000,
                    end_ms: 51_010,
                    after_accepted: true,
                },
            ],
            polls_told_to_check_in: 0,
        };
        let v = Verdict::of(Inputs {
            load: Duration::from_secs(60),
            restarts: vec![Restart {
                down_ms: 20_000,
                back_ms: 26_000,
            }],
            restart_error: None,
            journal,
            acked: vec![("a", 3), ("b", 2), ("c", 0)],
            server: HashMap::from([("a".to_owned(), Some(3)), ("b".to_owned(), Some(1))]),
            samples: vec![],
            server_alive: true,
        });
        assert_eq!(v.outages[0].first_accepted_ms, Some(30_005));
        assert_eq!(v.outages[0].recovery_ms, 40_005);
        assert_eq!(v.errors_outage[0].values().sum::<u64>(), 3);
        assert_eq!(v.errors_after_recovery(), 2);
        assert_eq!(v.errors_outside["after recovery 1"]["check-in HTTP 500 Internal"], 1);
        assert_eq!(v.stale_after_failure["after recovery 1"], 1);
        assert_eq!(v.lost, vec![("b".to_owned(), 2, Some(1))]);
        assert_eq!(v.failures().len(), 2);
    }

    #[test]
    fn memory_growth_is_measured_from_warm_up() {
        let samples: Vec<Sample> = (0..=60)
            .map(|k| Sample {
                t_ms: k * 10_000,
                rss: (40 << 20) + u64::from(k) * (1 << 20),
                cpu: f64::from(k),
                threads: 3,
            })
            .collect();
        let v = Verdict::of(Inputs {
            load: Duration::from_secs(600),
            restarts: vec![],
            restart_error: None,
            journal: Shard::default(),
            acked: vec![],
            server: HashMap::new(),
            samples,
            server_alive: true,
        });
        let (warm, max, last, growth) = v.rss().unwrap();
        assert_eq!(warm, 46 << 20);
        assert_eq!((max, last), (100 << 20, 100 << 20));
        assert_eq!(growth, 54 << 20);
        assert_eq!(v.cpu(), 60.0);
    }
}
