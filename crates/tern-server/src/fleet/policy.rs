//! Rollout policy, pure: what a rollout's specification may say, which phase a device
//! belongs to, whether a phase may open or the rollout must stop, and whether a
//! maintenance window is open. No I/O and no clock: the time is an argument, so tests
//! inject it.
//!
//! **Membership.** Every device has a *bucket*, the first four bytes of a hash of its id,
//! and every rollout an *offset*, the same of its id. A device's *position* in a rollout is
//! its bucket minus the offset (modulo 2³²), and phase `k` holds the positions in
//! `[cutoff[k-1], cutoff[k])`: a percentage phase's cut-off is that share of 2³², a count
//! phase's is fixed when the phase opens (the position just past its N-th device). So
//! membership needs no row per device, and different rollouts start their first phase in
//! different places of the fleet (the offset), so the same devices do not always go first.

use serde::{Deserialize, Serialize};

/// Positions a rollout has: a cut-off of `POSITIONS` is "every device".
pub const POSITIONS: u64 = 1 << 32;
/// Most phases in a rollout.
pub const MAX_PHASES: usize = 16;
/// The largest count a phase may name.
pub const MAX_COUNT: u64 = 1_000_000_000;
/// The longest a device may be stuck before it times out: 30 days.
pub const MAX_TIMEOUT_SECS: u64 = 30 * 86_400;
/// Most tags a selector may require.
pub const MAX_TAGS: usize = 8;

/// Which devices a rollout is for: every field given must match (AND).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// One device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Devices carrying every one of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Devices of this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// Devices of this hardware revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
}

impl Selector {
    /// Whether a device with these attributes is selected.
    pub fn matches(&self, id: &str, device_type: &str, hardware: &str, tags: &[String]) -> bool {
        self.device.as_deref().is_none_or(|d| d == id)
            && self.device_type.as_deref().is_none_or(|t| t == device_type)
            && self.hardware.as_deref().is_none_or(|h| h == hardware)
            && self.tags.iter().all(|t| tags.contains(t))
    }

    /// The selector in words, for listings.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(d) = &self.device {
            parts.push(format!("device {d}"));
        }
        for t in &self.tags {
            parts.push(format!("tag {t}"));
        }
        if let Some(t) = &self.device_type {
            parts.push(format!("type {t}"));
        }
        if let Some(h) = &self.hardware {
            parts.push(format!("hardware {h}"));
        }
        parts.join(" and ")
    }
}

/// One phase: a cumulative share of the selected devices (a percentage or a count), and
/// the share of the phase that must succeed before the next phase opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    /// Up to this percentage of the selected devices (cumulative: 1, 10, 50, 100) …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// … or up to this many devices (cumulative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Percentage of the phase's devices that must have succeeded to open the next phase.
    #[serde(default = "hundred")]
    pub success_percent: f64,
}

fn hundred() -> f64 {
    100.0
}

/// Stop the rollout when at least `percent` of the devices that finished failed, once at
/// least `min_finished` have finished (AWS IoT Jobs' abort criteria, hawkBit's error action).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorThreshold {
    /// Failure percentage that stops the rollout.
    pub percent: f64,
    /// Devices that must have finished before the percentage counts.
    pub min_finished: u64,
}

/// A recurring maintenance window: on `days`, from `start` to `end` (local time in
/// `time_zone`; an `end` before `start` ends the next day). Outside it no device gets a new
/// order; an order already given finishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days the window opens: `mon` … `sun`; empty is every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// Opening time, `HH:MM`.
    pub start: String,
    /// Closing time, `HH:MM`.
    pub end: String,
    /// An IANA time zone (`Europe/Berlin`, `UTC`).
    pub time_zone: String,
}

/// What a rollout does, as the operator asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Which devices.
    pub selector: Selector,
    /// Ordered phases, cumulative.
    pub phases: Vec<PhaseSpec>,
    /// When the rollout stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorThreshold>,
    /// When devices may get new orders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// A device installing, rebooting or on trial longer than this counts as failed
    /// (timed-out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn minutes(what: &str, hhmm: &str) -> Result<u32, String> {
    let bad = || format!("window {what} `{}` is not HH:MM", tern_core::text::shown_max(hhmm, 16));
    let (h, m) = hhmm.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Window {
    /// Check the window's fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.days.len() > DAYS.len() {
            return Err(format!(
                "the window names {} days; at most the 7 of a week",
                self.days.len()
            ));
        }
        for (i, d) in self.days.iter().enumerate() {
            if self.days[..i].contains(d) {
                return Err(format!(
                    "window day `{}` is named twice",
                    tern_core::text::shown_max(d, 16)
                ));
            }
            if !DAYS.contains(&d.as_str()) {
                return Err(format!(
                    "window day `{}` is not one of mon, tue, wed, thu, fri, sat, sun",
                    tern_core::text::shown_max(d, 16)
                ));
            }
        }
        if minutes("start", &self.start)? == minutes("end", &self.end)? {
            return Err("window start and end are the same time".into());
        }
        jiff::tz::TimeZone::get(&self.time_zone).map_err(|_| {
            format!(
                "window time zone `{}` is not a known IANA time zone",
                tern_core::text::shown_max(&self.time_zone, 64)
            )
        })?;
        Ok(())
    }

    /// Whether the window is open at `now` (Unix seconds). A window that does not
    /// validate is closed.
    pub fn is_open(&self, now: i64) -> bool {
        let (Ok(start), Ok(end), Ok(tz)) = (
            minutes("start", &self.start),
            minutes("end", &self.end),
            jiff::tz::TimeZone::get(&self.time_zone),
        ) else {
            return false;
        };
        let Ok(at) = jiff::Timestamp::from_second(now) else {
            return false;
        };
        let local = at.to_zoned(tz);
        let t = local.hour() as u32 * 60 + local.minute() as u32;
        // Monday is 0.
        let today = local.weekday().to_monday_zero_offset() as usize;
        let yesterday = (today + 6) % 7;
        let on = |d: usize| self.days.is_empty() || self.days.iter().any(|x| x == DAYS[d]);
        if start < end {
            on(today) && start <= t && t < end
        } else {
            (on(today) && t >= start) || (on(yesterday) && t < end)
        }
    }
}

impl RolloutSpec {
    /// Check everything an operator may have got wrong; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.selector;
        if s.device.is_none() && s.tags.is_empty() && s.device_type.is_none() && s.hardware.is_none() {
            return Err("the selector names nothing: give a device, tags, a device type or a hardware revision".into());
        }
        if s.tags.len() > MAX_TAGS {
            return Err(format!("the selector names {} tags; at most {MAX_TAGS}", s.tags.len()));
        }
        if self.phases.is_empty() || self.phases.len() > MAX_PHASES {
            return Err(format!(
                "a rollout has 1 to {MAX_PHASES} phases, not {}",
                self.phases.len()
            ));
        }
        let mut last_percent = 0.0f64;
        let mut last_count = 0u64;
        for (i, p) in self.phases.iter().enumerate() {
            let n = i + 1;
            match (p.percent, p.count) {
                (Some(pc), None) => {
                    if !(pc > last_percent && pc <= 100.0) {
                        return Err(format!(
                            "phase {n}: {pc} % must be above the previous phase's {last_percent} % and at most 100 (phases are cumulative)"
                        ));
                    }
                    last_percent = pc;
                }
                (None, Some(c)) => {
                    if c > MAX_COUNT {
                        return Err(format!("phase {n}: {c} devices is more than {MAX_COUNT}"));
                    }
                    if c <= last_count || last_percent > 0.0 {
                        return Err(format!(
                            "phase {n}: {c} devices must be more than the previous phase's {last_count}, and count phases come before percentage phases (phases are cumulative)"
                        ));
                    }
                    last_count = c;
                }
                _ => return Err(format!("phase {n}: give exactly one of a percentage or a count")),
            }
            if !(0.0..=100.0).contains(&p.success_percent) {
                return Err(format!(
                    "phase {n}: the success threshold {} % is not between 0 and 100",
                    p.success_percent
                ));
            }
        }
        if let Some(e) = &self.error {
            if !(e.percent > 0.0 && e.percent <= 100.0) {
                return Err(format!(
                    "the error threshold {} % is not above 0 and at most 100",
                    e.percent
                ));
            }
            if e.min_finished == 0 {
                return Err("the error threshold's minimum of finished devices must be at least 1".into());
            }
        }
        if let Some(w) = &self.window {
            w.validate()?;
        }
        match self.timeout_secs {
            Some(0) => return Err("a timeout of 0 s would fail every device at once".into()),
            Some(t) if t > MAX_TIMEOUT_SECS => {
                return Err(format!(
                    "a timeout of {t} s is more than {MAX_TIMEOUT_SECS} s (30 days)"
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

fn hash4(context: &[u8], id: &str) -> u32 {
    let mut m = Vec::with_capacity(context.len() + 1 + id.len());
    m.extend_from_slice(context);
    m.push(0);
    m.extend_from_slice(id.as_bytes());
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &m);
    let b = d.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A device's bucket: a pure function of its id (stored in `devices.bucket` for queries).
pub fn bucket(device_id: &str) -> u32 {
    hash4(b"tern-bucket-v1", device_id)
}

/// A rollout's offset.
pub fn offset(rollout_id: &str) -> u32 {
    hash4(b"tern-rollout-v1", rollout_id)
}

/// A device's position in a rollout.
pub fn position(bucket: u32, offset: u32) -> u64 {
    u64::from(bucket.wrapping_sub(offset))
}

/// The cut-off of a percentage phase.
pub fn percent_cutoff(percent: f64) -> u64 {
    if percent >= 100.0 {
        return POSITIONS;
    }
    ((percent / 100.0) * POSITIONS as f64)
        .round()
        .clamp(0.0, POSITIONS as f64) as u64
}

/// The phase (0-based) a position falls in, among the opened phases' cut-offs.
pub fn phase_of(position: u64, cutoffs: &[u64]) -> Option<usize> {
    cutoffs.iter().position(|&c| position < c)
}

/// The buckets of positions `[lo, hi)` in a rollout with `offset`: one or two half-open
/// ranges of bucket values (two when they wrap past 2³²).
pub fn bucket_ranges(offset: u32, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    if lo >= hi {
        return Vec::new();
    }
    let (a, b) = (lo + u64::from(offset), hi + u64::from(offset));
    if b <= POSITIONS {
        vec![(a, b)]
    } else if a >= POSITIONS {
        vec![(a - POSITIONS, b - POSITIONS)]
    } else {
        vec![(a, POSITIONS), (0, b - POSITIONS)]
    }
}

/// What one phase's devices are doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PhaseCounts {
    /// Devices the phase selects (as of the last count).
    pub selected: u64,
    /// Devices ordered and not finished.
    pub in_progress: u64,
    /// Succeeded.
    pub succeeded: u64,
    /// Failed, rolled back or timed out.
    pub failed: u64,
    /// Cancelled (the rollout was cancelled or superseded, or an operator abandoned them).
    pub cancelled: u64,
}

impl PhaseCounts {
    /// Devices with a row (ordered at some point).
    pub fn ordered(&self) -> u64 {
        self.in_progress + self.succeeded + self.failed + self.cancelled
    }

    /// Selected devices not ordered yet.
    pub fn waiting(&self) -> u64 {
        self.selected.saturating_sub(self.ordered())
    }

    /// Count one device in `status`.
    pub fn add(&mut self, status: &str, n: u64) {
        match status {
            "succeeded" => self.succeeded += n,
            "failed" | "rolled-back" | "timed-out" => self.failed += n,
            "cancelled" => self.cancelled += n,
            _ => self.in_progress += n,
        }
    }
}

/// What the rollout engine does next with a running rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing yet.
    Hold,
    /// Open the next phase.
    OpenNext,
    /// Stop: the error threshold was crossed.
    Stop(String),
    /// Every phase is open and every selected device (at least one) has finished.
    Finish,
}

/// Decide on a running rollout with `opened` phases open (at least 1), from the counts of
/// every phase (`counts.len() == spec.phases.len()`). The error threshold is looked at first.
pub fn decide(spec: &RolloutSpec, opened: usize, counts: &[PhaseCounts]) -> Decision {
    let open = &counts[..opened.min(counts.len())];
    if let Some(e) = &spec.error {
        let failed: u64 = open.iter().map(|c| c.failed).sum();
        let finished: u64 = failed + open.iter().map(|c| c.succeeded).sum::<u64>();
        if finished >= e.min_finished && failed as f64 * 100.0 >= e.percent * finished as f64 {
            return Decision::Stop(format!(
                "error threshold crossed: {failed} of {finished} finished devices failed (the threshold is {} % once {} have finished)",
                e.percent, e.min_finished
            ));
        }
    }
    if opened < spec.phases.len() {
        let k = opened - 1;
        let c = &open[k];
        let need = spec.phases[k].success_percent;
        if c.selected == 0 || c.succeeded as f64 * 100.0 >= need * c.selected as f64 {
            return Decision::OpenNext;
        }
        return Decision::Hold;
    }
    // A rollout that selects nobody yet stays running: devices that match later join it.
    let started: u64 = open.iter().map(|c| c.selected).sum();
    if started > 0 && open.iter().all(|c| c.in_progress == 0 && c.waiting() == 0) {
        return Decision::Finish;
    }
    Decision::Hold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(phases: &[(f64, f64)]) -> RolloutSpec {
        RolloutSpec {
            selector: Selector {
                tags: vec!["lab".into()],
                ..Default::default()
            },
            phases: phases
                .iter()
                .map(|&(p, s)| PhaseSpec {
                    percent: Some(p),
                    count: None,
                    success_percent: s,
                })
                .collect(),
            error: Some(ErrorThreshold {
                percent: 5.0,
                min_finished: 20,
            }),
            window: None,
            timeout_secs: None,
        }
    }

    #[test]
    fn positions_spread_evenly_and_ranges_wrap() {
        let off = offset("r-1");
        let cut = percent_cutoff(10.0);
        let n = 20_000;
        let inside = (0..n)
            .filter(|i| position(bucket(&format!("dev-{i}")), off) < cut)
            .count();
        assert!((1_700..2_300).contains(&inside), "{inside} of {n} in a 10 % phase");
        // Bucket ranges cover exactly the positions asked for.
        for i in 0..2_000 {
            let b = bucket(&format!("dev-{i}"));
            let p = position(b, off);
            let in_ranges = bucket_ranges(off, 0, cut)
                .iter()
                .any(|&(lo, hi)| (lo..hi).contains(&u64::from(b)));
            assert_eq!(in_ranges, p < cut);
        }
        assert_eq!(
            bucket_ranges(u32::MAX, 0, 2),
            vec![(u64::from(u32::MAX), POSITIONS), (0, 1)]
        );
        assert_eq!(phase_of(5, &[3, 10]), Some(1));
        assert_eq!(phase_of(10, &[3, 10]), None);
        assert_eq!(percent_cutoff(100.0), POSITIONS);
    }

    #[test]
    fn phases_open_on_success_and_stop_on_errors() {
        let s = spec(&[(1.0, 100.0), (10.0, 95.0), (100.0, 95.0)]);
        let c = |selected, succeeded, failed, in_progress| PhaseCounts {
            selected,
            succeeded,
            failed,
            in_progress,
            cancelled: 0,
        };
        let zero = PhaseCounts::default();
        assert_eq!(decide(&s, 1, &[c(3, 2, 0, 1), zero, zero]), Decision::Hold);
        assert_eq!(decide(&s, 1, &[c(3, 3, 0, 0), zero, zero]), Decision::OpenNext);
        // An empty phase is met.
        assert_eq!(decide(&s, 1, &[c(0, 0, 0, 0), zero, zero]), Decision::OpenNext);
        assert_eq!(decide(&s, 2, &[c(3, 3, 0, 0), c(30, 28, 0, 2), zero]), Decision::Hold);
        assert_eq!(
            decide(&s, 2, &[c(3, 3, 0, 0), c(30, 29, 0, 1), zero]),
            Decision::OpenNext
        );
        // 1 of 19 finished failed: below the minimum count; 2 of 21: above 5 %.
        assert_eq!(decide(&s, 2, &[c(3, 3, 0, 0), c(30, 15, 1, 14), zero]), Decision::Hold);
        assert!(matches!(
            decide(&s, 2, &[c(3, 3, 0, 0), c(30, 17, 2, 11), zero]),
            Decision::Stop(_)
        ));
        assert_eq!(
            decide(&s, 3, &[c(3, 3, 0, 0), c(30, 30, 0, 0), c(300, 299, 0, 1)]),
            Decision::Hold
        );
        assert_eq!(
            decide(&s, 3, &[c(3, 3, 0, 0), c(30, 30, 0, 0), c(300, 300, 0, 0)]),
            Decision::Finish
        );
        // Nobody selected yet: it waits for devices to match.
        assert_eq!(decide(&s, 3, &[zero, zero, zero]), Decision::Hold);
    }

    #[test]
    fn specs_are_validated() {
        assert_eq!(spec(&[(10.0, 95.0), (100.0, 95.0)]).validate(), Ok(()));
        assert!(spec(&[(10.0, 95.0), (5.0, 95.0)])
            .validate()
            .unwrap_err()
            .contains("cumulative"));
        assert!(spec(&[(10.0, 120.0)])
            .validate()
            .unwrap_err()
            .contains("success threshold"));
        assert!(spec(&[]).validate().is_err());
        let mut s = spec(&[(100.0, 100.0)]);
        s.selector = Selector::default();
        assert!(s.validate().unwrap_err().contains("selector"));
        let mut s = spec(&[(100.0, 100.0)]);
        s.window = Some(Window {
            days: vec!["mon".into()],
            start: "02:00".into(),
            end: "04:00".into(),
            time_zone: "Mars/Olympus".into(),
        });
        assert!(s.validate().unwrap_err().contains("time zone"));
    }

    #[test]
    fn windows_follow_the_time_zone_and_cross_midnight() {
        let w = Window {
            days: vec!["mon".into(), "tue".into(), "wed".into(), "thu".into(), "fri".into()],
            start: "02:00".into(),
            end: "04:00".into(),
            time_zone: "Europe/Berlin".into(),
        };
        assert_eq!(w.validate(), Ok(()));
        let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
        // Wednesday 2026-12-02: Berlin is UTC+1 in winter.
        assert!(w.is_open(at("2026-12-02T01:30:00Z")));
        assert!(!w.is_open(at("2026-12-02T03:00:00Z")));
        assert!(!w.is_open(at("2026-12-02T00:59:59Z")));
        // Summer time: UTC+2.
        assert!(w.is_open(at("2026-07-01T00:30:00Z")));
        assert!(!w.is_open(at("2026-07-01T02:30:00Z")));
        // Saturday.
        assert!(!w.is_open(at("2026-12-05T01:30:00Z")));
        let night = Window {
            days: vec!["fri".into()],
            start: "22:00".into(),
            end: "02:00".into(),
            time_zone: "UTC".into(),
        };
        assert!(night.is_open(at("2026-12-04T23:00:00Z")));
        // Saturday 01:00 belongs to Friday's window.
        assert!(night.is_open(at("2026-12-05T01:00:00Z")));
        assert!(!night.is_open(at("2026-12-05T23:00:00Z")));
        assert!(!night.is_open(at("2026-12-04T01:00:00Z")));
    }
}
