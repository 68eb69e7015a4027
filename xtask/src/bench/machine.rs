//! Facts about the machine and tools, for the report.

use std::{collections::BTreeMap, process::Command};

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    /// What the kernel config says about IPVS (the other in-kernel L4 balancer).
    pub ipvs: String,
}

fn output(cmd: &mut Command) -> Option<String> {
    crate::util::probe(cmd).map(|s| s.trim().to_owned())
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches("kB").trim().to_owned()))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    Machine { cpu_model, cores, kernel, memory_gib, ipvs: ipvs() }
}

fn ipvs() -> String {
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        return "available (/proc/net/ip_vs exists)".into();
    }
    match output(Command::new("zcat").arg("/proc/config.gz")) {
        Some(cfg) => match cfg.lines().find(|l| l.contains("CONFIG_IP_VS=") || l.contains("CONFIG_IP_VS is not set")) {
            Some(l) if l.contains("is not set") => {
                "not in this kernel (`# CONFIG_IP_VS is not set` in /proc/config.gz)".into()
            }
            Some(l) => format!("{l} in /proc/config.gz, but /proc/net/ip_vs is absent (module not loaded)"),
            None => "not in this kernel (no CONFIG_IP_VS in /proc/config.gz)".into(),
        },
        None => "unknown (no /proc/net/ip_vs, no /proc/config.gz)".into(),
    }
}

/// UTC now, `YYYY-MM-DD HH:MM:SS UTC`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The first line of each tool's version output.
pub fn tools() -> BTreeMap<&'static str, String> {
    let first = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).into_owned())
            .and_then(|s| s.lines().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_owned()))
            .unwrap_or_else(|| "missing".into())
    };
    BTreeMap::from([
        ("iperf3", first("iperf3", "--version")),
        ("sockperf", first("sockperf", "--version")),
        ("haproxy", first("haproxy", "-v")),
        ("nft", first("nft", "--version")),
        ("ethtool", first("ethtool", "--version")),
        ("librdkafka", librdkafka()),
    ])
}

/// The Kafka client library the Kafka scenario's Python client runs on.
fn librdkafka() -> String {
    use kpf_tests::kafka::{client_version, python};
    client_version(&python())
        .map_or_else(|_| "missing".into(), |v| format!("{} (confluent-kafka {})", v.librdkafka, v.package))
}

#[cfg(test)]
mod tests {
    #[test]
    fn date_format() {
        let d = super::now_utc();
        assert_eq!(d.len(), 23, "{d}");
        assert!(d.starts_with("20"));
    }
}
