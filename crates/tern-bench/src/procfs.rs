//! What the benchmarks read from `/proc`: CPU time and resident memory of processes, and
//! whether this process runs as root.

use std::fs;
use std::path::Path;

/// (name, parent pid, user + system CPU seconds) from a `/proc/…/stat` file.
pub fn proc_stat(path: &Path) -> Option<(String, u32, f64)> {
    let text = fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the name: state, ppid, …, utime (14th field of the file), stime (15th).
    let ppid = rest.get(1)?.parse().ok()?;
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture's user ABI.
    Some((name, ppid, ticks as f64 / 100.0))
}

/// CPU seconds of process `pid` (all its threads).
pub fn process_cpu(pid: u32) -> Option<f64> {
    proc_stat(Path::new(&format!("/proc/{pid}/stat"))).map(|(_, _, s)| s)
}

/// CPU seconds of `root` and its direct children.
pub fn process_tree_cpu(root: u32) -> f64 {
    let mut total = process_cpu(root).unwrap_or(0.0);
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            if !p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some((_, ppid, secs)) = proc_stat(&p.path().join("stat")) {
                if ppid == root {
                    total += secs;
                }
            }
        }
    }
    total
}

/// A number field of `/proc/PID/status` (`VmRSS`, `Threads`…); sizes are in KiB there.
fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn vm_rss(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS").map(|kib| kib * 1024)
}

/// Threads of process `pid`.
pub fn threads(pid: u32) -> Option<u64> {
    status_field(pid, "Threads")
}

/// Whether this process's effective user is root.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A loopback port free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(vm_rss(me).unwrap() > 0);
        assert!(threads(me).unwrap() >= 1);
        assert!(process_cpu(me).is_some());
        let (_, ppid, _) = proc_stat(Path::new("/proc/self/stat")).unwrap();
        assert!(ppid > 0);
    }
}
