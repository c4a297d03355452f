//! Peak resident memory of finished child processes.

/// The largest peak RSS, in bytes, of any child process this process has waited for.
#[allow(unsafe_code)]
pub fn children_peak_rss() -> u64 {
    // SAFETY: getrusage writes only into the zero-initialised struct we pass it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) != 0 {
            return 0;
        }
        usage
    };
    // Linux reports ru_maxrss in KiB.
    (usage.ru_maxrss.max(0) as u64) * 1024
}
