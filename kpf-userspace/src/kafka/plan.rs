//! `kpf kafka plan`: from the advertised-listener pattern the cloud console gives and the list of
//! brokers, everything to configure: each broker's listener lines, the gateway's kpf config, and
//! the values the console asks for. Pure: no I/O, so every rule is unit-tested.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

/// One broker: `node.id`, address, and (AWS) the AZ ID it runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broker {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub az: Option<String>,
}

impl std::str::FromStr for Broker {
    type Err = String;
    /// `1=10.64.0.2` or, on AWS, `1=10.64.0.2@usw2-az1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a broker like 1=10.64.0.2 or 1=10.64.0.2@usw2-az1");
        let (id, rest) = s.split_once('=').ok_or_else(bad)?;
        let (addr, az) = match rest.split_once('@') {
            Some((a, z)) if !z.is_empty() => (a, Some(z.to_owned())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        Ok(Broker { id: id.trim().parse().map_err(|_| bad())?, addr: addr.trim().parse().map_err(|_| bad())?, az })
    }
}

/// The pattern the console gives, e.g. `<broker_id>.abc.us-west1.gcp.3199745.tidbcloud.com:<port>`;
/// on AWS one per AZ ID (`usw2-az1=<broker_id>.usw2-az1.abc....:<port>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub az: Option<String>,
    pub text: String,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (az, text) = match s.split_once('=') {
            Some((az, text)) if !az.contains('<') => (Some(az.trim().to_owned()), text.trim()),
            _ => (None, s.trim()),
        };
        for p in ["<broker_id>", "<port>"] {
            if !text.contains(p) {
                return Err(format!("pattern {text:?} has no {p} placeholder; copy it from the console as is"));
            }
        }
        if !text.ends_with(":<port>") {
            return Err(format!("pattern {text:?} must end with :<port>"));
        }
        Ok(Pattern { az, text: text.to_owned() })
    }
}

/// A port range `9093-9095` used by another listener set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub min: u16,
    pub max: u16,
}

impl std::str::FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range like 9093-9095");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let (min, max): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(Range { min, max })
    }
}

#[derive(Clone, Debug)]
pub struct Input {
    pub patterns: Vec<Pattern>,
    pub brokers: Vec<Broker>,
    /// The port each broker's new listener binds (the seeds use 39092).
    pub external_port: u16,
    /// The advertised port of the first broker (by node id); the rest follow.
    pub first_port: u16,
    /// `EXTERNAL`, or `EXTERNAL2` for a second consumer project.
    pub listener: String,
    pub bootstrap_ports: Vec<u16>,
    /// Port ranges other listener sets already advertise (e.g. EXTERNAL's when planning EXTERNAL2).
    pub taken: Vec<Range>,
    /// The broker ports those listener sets bind (each broker listener needs its own port).
    pub taken_external_ports: Vec<u16>,
}

/// What one broker gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerPlan {
    pub broker: Broker,
    pub advertised_host: String,
    pub advertised_port: u16,
}

#[derive(Clone, Debug)]
pub struct Output {
    pub input: Input,
    pub brokers: Vec<BrokerPlan>,
}

pub fn plan(input: Input) -> Result<Output, String> {
    if input.brokers.is_empty() {
        return Err("no brokers: give one --broker ID=IP per broker".into());
    }
    if input.patterns.is_empty() {
        return Err("no pattern: give the Kafka advertised listener pattern from the console".into());
    }
    let valid_listener = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !valid_listener(&input.listener) {
        return Err(format!("listener name {:?} must be upper-case letters, digits or _", input.listener));
    }
    let mut by_id = BTreeMap::new();
    for b in &input.brokers {
        if by_id.insert(b.id, b.clone()).is_some() {
            return Err(format!("node id {} is given twice", b.id));
        }
    }
    let keyed = input.patterns.iter().any(|p| p.az.is_some());
    if keyed && input.patterns.iter().any(|p| p.az.is_none()) {
        return Err("either one pattern, or one AZ_ID=PATTERN per AZ, not both".into());
    }
    let mut azs = BTreeMap::new();
    for p in &input.patterns {
        if azs.insert(p.az.clone(), p.text.clone()).is_some() {
            return Err(format!("two patterns for AZ {}", p.az.as_deref().unwrap_or("(none)")));
        }
    }
    let count = by_id.len() as u32;
    let last = input.first_port as u32 + count - 1;
    if last > 65535 {
        return Err(format!("{count} brokers from port {} run past 65535", input.first_port));
    }
    let range = Range { min: input.first_port, max: last as u16 };
    for t in &input.taken {
        if range.min <= t.max && t.min <= range.max {
            return Err(format!(
                "advertised ports {}-{} overlap {}-{}, which another listener set uses; pick a first port after {}",
                range.min, range.max, t.min, t.max, t.max
            ));
        }
    }
    if input.taken_external_ports.contains(&input.external_port) {
        return Err(format!(
            "broker port {} is bound by another listener set's listener (a broker refuses two listeners on one \
             port); give {} its own with --external-port",
            input.external_port, input.listener
        ));
    }
    for bp in &input.bootstrap_ports {
        if (range.min..=range.max).contains(bp) {
            return Err(format!("bootstrap port {bp} is inside the per-broker ports {}-{}", range.min, range.max));
        }
        if input.taken.iter().any(|t| (t.min..=t.max).contains(bp)) {
            return Err(format!("bootstrap port {bp} is used by another listener set"));
        }
    }
    let mut brokers = Vec::new();
    for (i, b) in by_id.values().enumerate() {
        let pattern = if keyed {
            let az = b.az.as_ref().ok_or_else(|| format!("broker {} has no AZ ID; give it as {}={}@AZ_ID", b.id, b.id, b.addr))?;
            azs.get(&Some(az.clone())).ok_or_else(|| {
                let known: Vec<&str> = azs.keys().flatten().map(String::as_str).collect();
                format!("broker {} is in AZ {az}, which has no pattern (patterns are for {})", b.id, known.join(", "))
            })?
        } else {
            &azs[&None]
        };
        let port = input.first_port + i as u16;
        let host = pattern.replace("<broker_id>", &format!("b{}", b.id)).replace(":<port>", "");
        brokers.push(BrokerPlan { broker: b.clone(), advertised_host: host, advertised_port: port });
    }
    Ok(Output { input, brokers })
}

impl Output {
    /// The lines to add to each broker's server.properties.
    pub fn broker_lines(&self) -> String {
        let l = &self.input.listener;
        let mut o = String::new();
        for b in &self.brokers {
            let _ = writeln!(o, "# broker node.id={} ({}){}", b.broker.id, b.broker.addr, b.broker.az.as_deref().map(|a| format!(", AZ {a}")).unwrap_or_default());
            let _ = writeln!(o, "#   (ZooKeeper mode: the same lines; the id is broker.id)");
            let _ = writeln!(o, "#   append to the existing values, keeping what is there (\"...\"):");
            let _ = writeln!(o, "listeners=...,{l}://0.0.0.0:{}", self.input.external_port);
            let _ = writeln!(o, "advertised.listeners=...,{l}://{}:{}", b.advertised_host, b.advertised_port);
            let _ = writeln!(o, "listener.security.protocol.map=...,{l}:PLAINTEXT");
            if !(32768..=60999).contains(&self.input.external_port) {
                let _ = writeln!(o);
                continue;
            }
            let _ = writeln!(
                o,
                "#   {} is inside Linux's default ephemeral range: reserve it on the broker host so an outgoing\n\
                 #   connection cannot take it first: sysctl -w net.ipv4.ip_local_reserved_ports={}\n",
                self.input.external_port, self.input.external_port
            );
        }
        o
    }

    /// The kpf frontends: the bootstrap port(s) to every broker, then one port per broker.
    pub fn frontends_toml(&self) -> String {
        let ext = self.input.external_port;
        let mut o = String::new();
        for bp in &self.input.bootstrap_ports {
            let all: Vec<String> = self.brokers.iter().map(|b| format!("\"{}:{ext}\"", b.broker.addr)).collect();
            let _ = writeln!(o, "[[frontend]]  # bootstrap\nport = {bp}\nbackends = [{}]\n", all.join(", "));
        }
        for b in &self.brokers {
            let _ = writeln!(
                o,
                "[[frontend]]  # b{} -> {}:{}\nport = {}\nbackends = [\"{}:{ext}\"]\n",
                b.broker.id, b.advertised_host, b.advertised_port, b.advertised_port, b.broker.addr
            );
        }
        o
    }

    /// What the cloud console asks for.
    pub fn console_values(&self) -> String {
        let mut o = String::new();
        let ports: Vec<String> = self.input.bootstrap_ports.iter().map(u16::to_string).collect();
        let _ = writeln!(o, "Bootstrap port(s): {}", ports.join(", "));
        for p in &self.input.patterns {
            match &p.az {
                Some(az) => {
                    let _ = writeln!(o, "Advertised listener pattern ({az}): {}", p.text);
                }
                None => {
                    let _ = writeln!(o, "Advertised listener pattern: {}", p.text);
                }
            }
        }
        let (min, max) = (self.brokers[0].advertised_port, self.brokers[self.brokers.len() - 1].advertised_port);
        let all = self.input.bootstrap_ports.iter().copied().chain([min, max]);
        let (lo, hi) = (all.clone().min().unwrap_or(min), all.max().unwrap_or(max));
        let _ = writeln!(o, "Load balancer: forward TCP {lo}-{hi} to the kpf gateway(s) on the same ports");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(patterns: &[&str], brokers: &[&str]) -> Input {
        Input {
            patterns: patterns.iter().map(|p| p.parse().unwrap()).collect(),
            brokers: brokers.iter().map(|b| b.parse().unwrap()).collect(),
            external_port: 39092,
            first_port: 9093,
            listener: "EXTERNAL".into(),
            bootstrap_ports: vec![9092],
            taken: vec![],
            taken_external_ports: vec![],
        }
    }

    const GCP: &str = "<broker_id>.abc.us-west1.gcp.3199745.tidbcloud.com:<port>";

    #[test]
    fn gcp_seed_layout() {
        let o = plan(input(&[GCP], &["2=10.64.0.3", "1=10.64.0.2", "3=10.64.0.4"])).unwrap();
        let lines = o.broker_lines();
        // Exactly the seed's lines for broker 1 and 3.
        assert!(lines.contains("advertised.listeners=...,EXTERNAL://b1.abc.us-west1.gcp.3199745.tidbcloud.com:9093"), "{lines}");
        assert!(lines.contains("advertised.listeners=...,EXTERNAL://b3.abc.us-west1.gcp.3199745.tidbcloud.com:9095"), "{lines}");
        assert!(lines.contains("listeners=...,EXTERNAL://0.0.0.0:39092"));
        assert!(lines.contains("listener.security.protocol.map=...,EXTERNAL:PLAINTEXT"));
        let toml = o.frontends_toml();
        assert!(toml.contains("port = 9092\nbackends = [\"10.64.0.2:39092\", \"10.64.0.3:39092\", \"10.64.0.4:39092\"]"), "{toml}");
        assert!(toml.contains("port = 9094\nbackends = [\"10.64.0.3:39092\"]"), "{toml}");
        assert!(o.console_values().contains("forward TCP 9092-9095"));
    }

    #[test]
    fn aws_patterns_per_az() {
        let pats = [
            "usw2-az1=<broker_id>.usw2-az1.abc.us-west-2.aws.3199015.tidbcloud.com:<port>",
            "usw2-az2=<broker_id>.usw2-az2.abc.us-west-2.aws.3199015.tidbcloud.com:<port>",
            "usw2-az3=<broker_id>.usw2-az3.abc.us-west-2.aws.3199015.tidbcloud.com:<port>",
        ];
        let o = plan(input(&pats, &["1=10.64.0.2@usw2-az1", "2=10.64.0.3@usw2-az2", "3=10.64.0.4@usw2-az3"])).unwrap();
        assert!(o.broker_lines().contains("EXTERNAL://b2.usw2-az2.abc.us-west-2.aws.3199015.tidbcloud.com:9094"));
        let e = plan(input(&pats, &["1=10.64.0.2@usw2-az4"])).unwrap_err();
        assert!(e.contains("AZ usw2-az4") && e.contains("usw2-az1"), "{e}");
        let e = plan(input(&pats, &["1=10.64.0.2"])).unwrap_err();
        assert!(e.contains("no AZ ID"), "{e}");
    }

    #[test]
    fn rejects_what_the_seeds_warn_against() {
        assert!("abc.example.com:<port>".parse::<Pattern>().unwrap_err().contains("<broker_id>"));
        assert!("<broker_id>.example.com:9093".parse::<Pattern>().unwrap_err().contains("<port>"));
        let e = plan(input(&[GCP], &["1=10.64.0.2", "1=10.64.0.3"])).unwrap_err();
        assert!(e.contains("node id 1 is given twice"), "{e}");
        let mut i = input(&[GCP], &["1=10.64.0.2", "2=10.64.0.3"]);
        i.listener = "EXTERNAL2".into();
        i.taken = vec!["9093-9095".parse().unwrap()];
        i.taken_external_ports = vec![39092];
        let e = plan(i.clone()).unwrap_err();
        assert!(e.contains("overlap 9093-9095"), "{e}");
        i.first_port = 9096;
        i.bootstrap_ports = vec![9100];
        // EXTERNAL binds 39092 on every broker: a broker refuses a second listener there.
        let e = plan(i.clone()).unwrap_err();
        assert!(e.contains("broker port 39092 is bound by another listener set") && e.contains("--external-port"), "{e}");
        i.external_port = 39093;
        let o = plan(i).unwrap();
        assert!(o.broker_lines().contains("EXTERNAL2://b1.abc.us-west1.gcp.3199745.tidbcloud.com:9096"));
        assert!(o.broker_lines().contains("listeners=...,EXTERNAL2://0.0.0.0:39093"));
        assert!(o.frontends_toml().contains("backends = [\"10.64.0.2:39093\"]"), "{}", o.frontends_toml());
        let mut i = input(&[GCP], &["1=10.64.0.2", "2=10.64.0.3"]);
        i.bootstrap_ports = vec![9094];
        assert!(plan(i).unwrap_err().contains("bootstrap port 9094"));
        let mut i = input(&[GCP], &["1=10.64.0.2"]);
        i.listener = "external".into();
        assert!(plan(i).unwrap_err().contains("upper-case"));
    }
}
