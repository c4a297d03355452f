//! `tern rollout …` (the operator's phased rollouts) and the inventory commands
//! `tern device tag|history` and the filters of `tern device list`.

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};

use super::server::{call, field, print, segment, Api};

/// `tern rollout`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Roll a release out to the selected devices in phases, e.g.
    /// `tern rollout create --release 1.2.0 --tag lab --device-type board-a --phase 1%@100
    /// --phase 10%@95 --phase 100% --error-threshold 5%@20 --window 'mon-fri 02:00-04:00
    /// Europe/Berlin' --timeout 2h`.
    Create(Box<CreateArgs>),
    /// Rollouts, newest first, with their progress.
    List(ListArgs),
    /// A rollout's phases with their counts (`--output json` for every figure).
    Status(IdArgs),
    /// Start a manual or scheduled rollout now.
    Start(IdArgs),
    /// Hold every new order; devices already ordered continue.
    Pause(IdArgs),
    /// Continue a paused rollout.
    Resume(IdArgs),
    /// Stop for good: no new orders; devices already installing finish and are reported.
    Cancel(IdArgs),
    /// Approve a rollout that needs it (an admin token other than its creator's).
    Approve(IdArgs),
}

/// `tern rollout create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The release.
    #[arg(long)]
    pub release: String,
    /// One device.
    #[arg(long)]
    pub device: Option<String>,
    /// Devices carrying this tag (repeat: every tag must match).
    #[arg(long)]
    pub tag: Vec<String>,
    /// Devices of this type.
    #[arg(long)]
    pub device_type: Option<String>,
    /// Devices of this hardware revision.
    #[arg(long)]
    pub hardware: Option<String>,
    /// A phase, cumulative, in order: `PERCENT%` or a device count, with `@SUCCESS` the
    /// percentage of the phase that must succeed before the next opens (default 100):
    /// `1%@100`, `10%@95`, `100%`, `20@90`. None: one phase of every selected device.
    #[arg(long = "phase")]
    pub phases: Vec<String>,
    /// Stop the rollout when this share of the finished devices failed, once at least MIN
    /// have finished: `PERCENT%@MIN`, e.g. `5%@20`.
    #[arg(long)]
    pub error_threshold: Option<String>,
    /// A maintenance window: `DAYS HH:MM-HH:MM TIME_ZONE`, DAYS being `daily`, `mon-fri`
    /// or a list such as `sat,sun`; e.g. `mon-fri 02:00-04:00 Europe/Berlin`.
    #[arg(long)]
    pub window: Option<String>,
    /// A device installing, rebooting or on trial longer than this fails (timed-out):
    /// seconds, or with a unit: `90m`, `2h`.
    #[arg(long)]
    pub timeout: Option<String>,
    /// `auto` (now, or once approved), `manual` (`tern rollout start`), or `at` with
    /// `--start-at`.
    #[arg(long, default_value = "auto")]
    pub start: String,
    /// When a `--start at` rollout starts: RFC 3339, e.g. `2026-12-03T01:00:00Z`.
    #[arg(long)]
    pub start_at: Option<String>,
    /// Another admin must approve the rollout before it starts.
    #[arg(long)]
    pub require_approval: bool,
    #[command(flatten)]
    pub api: Api,
}

/// `tern rollout list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only rollouts of this status (running, paused, finished…).
    #[arg(long)]
    pub status: Option<String>,
    #[command(flatten)]
    pub api: Api,
}

/// A rollout id.
#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The rollout.
    pub id: String,
    #[command(flatten)]
    pub api: Api,
}

fn percent(s: &str, what: &str) -> anyhow::Result<f64> {
    s.strip_suffix('%')
        .unwrap_or(s)
        .parse::<f64>()
        .with_context(|| format!("{what} `{s}` is not a percentage"))
}

/// `10%@95` → `{percent: 10, success_percent: 95}`; `20@90` → a count.
pub fn parse_phase(s: &str) -> anyhow::Result<Value> {
    let (share, success) = match s.split_once('@') {
        Some((a, b)) => (a, Some(percent(b, "success threshold")?)),
        None => (s, None),
    };
    let mut v = if share.ends_with('%') {
        json!({"percent": percent(share, "phase share")?})
    } else {
        json!({"count": share.parse::<u64>().with_context(|| format!("phase `{s}`: `{share}` is neither PERCENT% nor a count"))?})
    };
    if let Some(x) = success {
        v["success_percent"] = json!(x);
    }
    Ok(v)
}

/// `5%@20` → `{percent: 5, min_finished: 20}`.
pub fn parse_error_threshold(s: &str) -> anyhow::Result<Value> {
    let (p, min) = s
        .split_once('@')
        .with_context(|| format!("error threshold `{s}` is not PERCENT%@MIN, e.g. 5%@20"))?;
    Ok(json!({
        "percent": percent(p, "error threshold")?,
        "min_finished": min.parse::<u64>().with_context(|| format!("error threshold `{s}`: `{min}` is not a count"))?,
    }))
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// `mon-fri 02:00-04:00 Europe/Berlin` → a window.
pub fn parse_window(s: &str) -> anyhow::Result<Value> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [days, times, tz] = parts.as_slice() else {
        bail!("window `{s}` is not `DAYS HH:MM-HH:MM TIME_ZONE`, e.g. `mon-fri 02:00-04:00 Europe/Berlin`");
    };
    let (start, end) = times
        .split_once('-')
        .with_context(|| format!("window times `{times}` are not HH:MM-HH:MM"))?;
    let day = |d: &str| {
        DAYS.iter()
            .position(|x| *x == d)
            .with_context(|| format!("window day `{d}` is not one of {}", DAYS.join(", ")))
    };
    let list: Vec<&str> = match *days {
        "daily" => Vec::new(),
        range if range.contains('-') => {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (a, b) = (day(a)?, day(b)?);
            if a > b {
                bail!("window days `{range}` run backwards");
            }
            DAYS[a..=b].to_vec()
        }
        list => {
            let v: Vec<&str> = list.split(',').collect();
            for d in &v {
                day(d)?;
            }
            v
        }
    };
    Ok(json!({"days": list, "start": start, "end": end, "time_zone": tz}))
}

/// `3600`, `90s`, `90m`, `2h`, `1d` → seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("duration `{s}` is not a number with s, m, h or d"))?;
    let k = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("duration `{s}`: unit `{unit}` is not s, m, h or d"),
    };
    n.checked_mul(k).with_context(|| format!("duration `{s}` is too long"))
}

fn request(a: &CreateArgs) -> anyhow::Result<Value> {
    let phases = a
        .phases
        .iter()
        .map(|p| parse_phase(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start_at = match (&a.start_at, a.start.as_str()) {
        (Some(t), "at") => Some(
            tern_core::DateTime::parse(t)
                .map_err(|e| anyhow::anyhow!("--start-at `{t}`: {e}"))?
                .unix(),
        ),
        (Some(_), _) => bail!("--start-at goes with --start at"),
        (None, "at") => bail!("--start at needs --start-at TIME"),
        (None, "auto" | "manual") => None,
        (None, other) => bail!("--start `{other}` is not auto, manual or at"),
    };
    let mut selector = json!({});
    if let Some(d) = &a.device {
        selector["device"] = json!(d);
    }
    if !a.tag.is_empty() {
        selector["tags"] = json!(a.tag);
    }
    if let Some(t) = &a.device_type {
        selector["device_type"] = json!(t);
    }
    if let Some(h) = &a.hardware {
        selector["hardware"] = json!(h);
    }
    Ok(json!({
        "release": a.release,
        "selector": selector,
        "phases": phases,
        "error": a.error_threshold.as_deref().map(parse_error_threshold).transpose()?,
        "window": a.window.as_deref().map(parse_window).transpose()?,
        "timeout_secs": a.timeout.as_deref().map(parse_duration).transpose()?,
        "start": a.start,
        "start_at": start_at,
        "require_approval": a.require_approval,
    }))
}

fn bar(done: u64, of: u64) -> String {
    const W: u64 = 20;
    let filled = (done * W).checked_div(of).unwrap_or(0).min(W) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(W as usize - filled))
}

fn share(spec: &Value) -> String {
    match (spec["percent"].as_f64(), spec["count"].as_u64()) {
        (Some(p), _) => format!("{p} %"),
        (None, Some(c)) => format!("{c} devices"),
        _ => "?".into(),
    }
}

/// The text form of a rollout's status.
pub fn print_rollout(v: &Value) {
    println!(
        "rollout {} of {} to {}: {} ({} of {} phases open){}",
        field(v, "id"),
        field(v, "release"),
        field(v, "selects"),
        field(v, "status"),
        v["opened"],
        v["phases"].as_array().map_or(0, Vec::len),
        v["reason"]
            .as_str()
            .map(|r| format!(": {}", tern_core::text::shown(r)))
            .unwrap_or_default()
    );
    if v["approval"] != "none" {
        println!(
            "  approval {}{}",
            field(v, "approval"),
            v["approved_by"]
                .as_str()
                .map(|a| format!(" by {}", tern_core::text::shown(a)))
                .unwrap_or_default()
        );
    }
    if v["counted"] == false {
        println!("  selection not counted yet (the server counts it within a second or so)");
    }
    for p in v["phases"].as_array().into_iter().flatten() {
        let c = &p["counts"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        println!(
            "  phase {} up to {:<12} {:<6} need {:>5} % {} selected {} waiting {} in progress {} succeeded {} failed {} cancelled {}",
            p["number"],
            share(&p["spec"]),
            if p["open"] == true { "open" } else { "closed" },
            p["spec"]["success_percent"],
            bar(n("succeeded"), n("selected")),
            n("selected"),
            p["waiting"],
            n("in_progress"),
            n("succeeded"),
            n("failed"),
            n("cancelled"),
        );
    }
}

/// `tern rollout …`.
pub fn run(cmd: RolloutCommand) -> anyhow::Result<()> {
    let act = |a: IdArgs, action: &str| -> anyhow::Result<()> {
        let v = call(
            &a.api,
            reqwest::Method::POST,
            &format!("/api/v1/rollouts/{}/{action}", segment(&a.id)),
            None,
        )?;
        print(&a.api, &v, print_rollout)
    };
    match cmd {
        RolloutCommand::Create(a) => {
            let body = request(&a)?;
            let v = call(
                &a.api,
                reqwest::Method::POST,
                "/api/v1/rollouts",
                Some(body.to_string().into()),
            )?;
            print(&a.api, &v, print_rollout)
        }
        RolloutCommand::List(a) => {
            let path = match &a.status {
                Some(s) => format!("/api/v1/rollouts?status={}", segment(s)),
                None => "/api/v1/rollouts".into(),
            };
            let v = call(&a.api, reqwest::Method::GET, &path, None)?;
            print(&a.api, &v, |v| {
                for r in v.as_array().into_iter().flatten() {
                    print_rollout(r);
                }
            })
        }
        RolloutCommand::Status(a) => {
            let v = call(
                &a.api,
                reqwest::Method::GET,
                &format!("/api/v1/rollouts/{}", segment(&a.id)),
                None,
            )?;
            print(&a.api, &v, print_rollout)
        }
        RolloutCommand::Start(a) => act(a, "start"),
        RolloutCommand::Pause(a) => act(a, "pause"),
        RolloutCommand::Resume(a) => act(a, "resume"),
        RolloutCommand::Cancel(a) => act(a, "cancel"),
        RolloutCommand::Approve(a) => act(a, "approve"),
    }
}

/// `tern device tag`.
#[derive(Debug, clap::Args)]
pub struct TagArgs {
    /// The device.
    pub id: String,
    /// Its tags from now on (repeat; none removes every tag).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub api: Api,
}

/// `tern device tag`: replace a device's tags (admin).
pub fn device_tag(a: TagArgs) -> anyhow::Result<()> {
    let body = json!({"tags": a.tags});
    let v = call(
        &a.api,
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{}/tags", segment(&a.id)),
        Some(body.to_string().into()),
    )?;
    print(&a.api, &v, |v| {
        let tags: Vec<String> = v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(tern_core::text::shown))
            .collect();
        println!("device {}: tags {}", field(v, "id"), tags.join(", "))
    })
}

/// `tern device history`.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The device.
    pub id: String,
    /// Most entries.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    #[command(flatten)]
    pub api: Api,
}

/// `tern device history`: every rollout status change and refused order, newest first.
pub fn device_history(a: HistoryArgs) -> anyhow::Result<()> {
    let v = call(
        &a.api,
        reqwest::Method::GET,
        &format!("/api/v1/devices/{}/history?limit={}", segment(&a.id), a.limit),
        None,
    )?;
    print(&a.api, &v, |v| {
        for e in v.as_array().into_iter().flatten() {
            let at = e["at_us"].as_i64().unwrap_or(0) / 1_000_000;
            println!(
                "{}  {:<12} {:>12} -> {:<14} {}",
                tern_core::DateTime::from_unix(at),
                field(e, "rollout"),
                field(e, "from"),
                field(e, "to"),
                field(e, "reason")
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_into_the_request() {
        assert_eq!(
            parse_phase("10%@95").unwrap(),
            json!({"percent": 10.0, "success_percent": 95.0})
        );
        assert_eq!(parse_phase("20").unwrap(), json!({"count": 20}));
        assert!(parse_phase("ten").is_err());
        assert_eq!(
            parse_error_threshold("5%@20").unwrap(),
            json!({"percent": 5.0, "min_finished": 20})
        );
        assert_eq!(
            parse_window("mon-fri 02:00-04:00 Europe/Berlin").unwrap(),
            json!({"days": ["mon", "tue", "wed", "thu", "fri"], "start": "02:00", "end": "04:00", "time_zone": "Europe/Berlin"})
        );
        assert_eq!(parse_window("daily 22:00-02:00 UTC").unwrap()["days"], json!([]));
        assert!(parse_window("fri-mon 02:00-04:00 UTC").is_err());
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("2y").is_err());
    }
}
