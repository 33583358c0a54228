//! Process and machine facts from /proc: a process's resident memory (VmRSS) and CPU time
//! (utime + stime), and the machine description (CPU count, memory) printed in
//! every report. Parsing is separated from reading so it can be unit-tested.

use serde::Serialize;

/// VmRSS in KiB from the text of /proc/PID/status.
pub fn parse_vmrss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// utime + stime in clock ticks from the text of /proc/PID/stat. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after the last ')'.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_vmrss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Clock ticks per second for /proc/PID/stat (USER_HZ, 100 on Linux).
pub const TICKS_PER_S: f64 = 100.0;

pub fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds used by a process since start.
pub fn cpu_s(pid: u32) -> f64 {
    cpu_ticks(pid).unwrap_or(0) as f64 / TICKS_PER_S
}

/// A CPU-usage window: `start` then `percent` (100 = one full core).
pub struct CpuMeter {
    pid: u32,
    cpu0: f64,
    t0: std::time::Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Self {
        Self {
            pid,
            cpu0: cpu_s(pid),
            t0: std::time::Instant::now(),
        }
    }

    pub fn percent(&self) -> f64 {
        cpu_percent(self.cpu0, cpu_s(self.pid), self.t0.elapsed().as_secs_f64())
    }
}

pub fn cpu_percent(cpu0: f64, cpu1: f64, wall_s: f64) -> f64 {
    if wall_s <= 0.0 {
        0.0
    } else {
        100.0 * (cpu1 - cpu0).max(0.0) / wall_s
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub mem_total_gib: f64,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn probe() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_gib: mem_kib / 1024.0 / 1024.0,
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} vCPU ({}), {:.1} GiB RAM, Linux {}",
            self.cpus, self.cpu_model, self.mem_total_gib, self.kernel
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss_from_status() {
        let status = "Name:\tstudyhall\nVmPeak:\t  100 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(12345));
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
    }

    #[test]
    fn cpu_ticks_from_stat_with_odd_comm() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1000 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn cpu_percent_math() {
        assert!((cpu_percent(1.0, 2.5, 1.0) - 150.0).abs() < 1e-9);
        assert_eq!(cpu_percent(1.0, 2.0, 0.0), 0.0);
        assert_eq!(cpu_percent(2.0, 1.0, 1.0), 0.0);
    }

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_ticks(me).is_some());
        assert!(Machine::probe().cpus >= 1);
    }
}
