//! The kernel settings kpf depends on, checked (or set, with `manage_sysctls`) before attaching.

use crate::{
    config::PortRange,
    error::{Error, Result},
};

/// A setting by its path components under /proc/sys: an interface name may hold dots
/// (`eth0.100`), so the dotted name cannot be split again.
#[derive(Clone, Copy)]
struct Key<'a>(&'a [&'a str]);

impl Key<'_> {
    fn path(&self) -> String {
        format!("/proc/sys/{}", self.0.join("/"))
    }
}

/// As sysctl(8) spells it: components joined by dots, a dot within one written as a slash.
impl std::fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|p| p.replace('.', "/")).collect();
        f.write_str(&parts.join("."))
    }
}

fn read(key: Key) -> Result<String> {
    std::fs::read_to_string(key.path()).map(|s| s.trim().to_owned()).map_err(Error::io(format!("reading {key}")))
}

fn write(key: Key, value: &str) -> Result<()> {
    std::fs::write(key.path(), value).map_err(Error::io(format!("setting {key} = {value}")))?;
    log::info!("set {key} = {value}");
    Ok(())
}

const LOCAL_PORT_RANGE: Key = Key(&["net", "ipv4", "ip_local_port_range"]);
const RESERVED_PORTS: Key = Key(&["net", "ipv4", "ip_local_reserved_ports"]);

/// Parses `ip_local_reserved_ports` syntax: `"8080,40000-59999"`.
fn parse_port_list(s: &str) -> Vec<PortRange> {
    s.split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some(PortRange { min: a.trim().parse().ok()?, max: b.trim().parse().ok()? }),
                None => part.parse().ok().map(|p| PortRange { min: p, max: p }),
            }
        })
        .collect()
}

/// Ports of `snat` that the kernel may also hand to local sockets: those in
/// `ip_local_port_range` and not in `ip_local_reserved_ports`.
fn clashing_ports(snat: PortRange, local: PortRange, reserved: &[PortRange]) -> Option<PortRange> {
    let lo = snat.min.max(local.min);
    let hi = snat.max.min(local.max);
    let mut first = None;
    let mut last = None;
    for p in lo..=hi {
        if !reserved.iter().any(|r| r.contains(p)) {
            first.get_or_insert(p);
            last = Some(p);
        }
    }
    Some(PortRange { min: first?, max: last? })
}

fn local_port_range() -> Result<PortRange> {
    let text = read(LOCAL_PORT_RANGE)?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(min)), Some(Ok(max))) => Ok(PortRange { min, max }),
        _ => Err(Error::Environment(format!("cannot parse net.ipv4.ip_local_port_range {text:?}"))),
    }
}

/// The SNAT range must not be handed out by the kernel too, or a local connection and a
/// forwarded one could share a source port toward the same backend.
pub fn ensure_snat_ports(snat: PortRange, manage: bool) -> Result<()> {
    let local = local_port_range()?;
    let reserved_text = read(RESERVED_PORTS)?;
    let Some(clash) = clashing_ports(snat, local, &parse_port_list(&reserved_text)) else {
        return Ok(());
    };
    if manage {
        let value = if reserved_text.is_empty() { snat.to_string() } else { format!("{reserved_text},{snat}") };
        return write(RESERVED_PORTS, &value);
    }
    Err(Error::Environment(format!(
        "snat_ports {snat} overlaps the kernel's ephemeral ports ({LOCAL_PORT_RANGE} = {}-{}) at {clash}; \
         reserve them with `sysctl -w {RESERVED_PORTS}={snat}`, pick snat_ports outside that range, \
         or set manage_sysctls = true",
        local.min, local.max
    )))
}

/// bpf_fib_lookup refuses to route for an interface that does not forward.
pub fn ensure_forwarding(iface: &str, manage: bool) -> Result<()> {
    let parts = ["net", "ipv4", "conf", iface, "forwarding"];
    let key = Key(&parts);
    if read(key)? == "1" {
        return Ok(());
    }
    if manage {
        return write(key, "1");
    }
    Err(Error::Environment(format!(
        "IPv4 forwarding is off on {iface}; kpf's in-kernel route lookups need it: \
         run `sysctl -w {key}=1` or set manage_sysctls = true"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> PortRange {
        PortRange { min, max }
    }

    #[test]
    fn an_interface_name_with_a_dot_is_one_component() {
        let parts = ["net", "ipv4", "conf", "eth0.100", "forwarding"];
        assert_eq!(Key(&parts).path(), "/proc/sys/net/ipv4/conf/eth0.100/forwarding");
        assert_eq!(Key(&parts).to_string(), "net.ipv4.conf.eth0/100.forwarding");
        assert_eq!(RESERVED_PORTS.path(), "/proc/sys/net/ipv4/ip_local_reserved_ports");
        assert_eq!(RESERVED_PORTS.to_string(), "net.ipv4.ip_local_reserved_ports");
    }

    #[test]
    fn clash_detection_honours_reserved_ports() {
        let linux_default = r(32768, 60999);
        assert_eq!(clashing_ports(r(40000, 59999), linux_default, &[]), Some(r(40000, 59999)));
        assert_eq!(clashing_ports(r(61000, 65535), linux_default, &[]), None);
        assert_eq!(clashing_ports(r(40000, 59999), linux_default, &parse_port_list("40000-59999")), None);
        assert_eq!(
            clashing_ports(r(40000, 59999), linux_default, &parse_port_list("8080, 40000-49999")),
            Some(r(50000, 59999))
        );
        assert_eq!(clashing_ports(r(20000, 30000), linux_default, &[]), None);
    }
}
