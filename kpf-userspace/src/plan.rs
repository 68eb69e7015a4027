//! What changing the live config into a desired one does: computed without touching anything,
//! shown to the user by `kpf apply`, then carried out by the daemon.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{Config, FrontendConfig};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A new frontend: serves new connections at once.
    Add { frontend: String, backend: String },
    /// A frontend goes: no new connections; existing ones finish, or are reset (`map rm --reset`).
    Remove {
        frontend: String,
        backend: String,
        /// Absent from a plan an earlier kpf sent: false.
        #[serde(default)]
        reset: bool,
    },
    /// New connections go to the new backend; existing ones stay where they are until they close.
    Set { frontend: String, from: String, to: String },
    /// A run-time setting the kernel picks up at once (timeouts, SNAT range).
    Setting { name: String, from: String, to: String },
    /// A setting that takes effect at the next `kpf run` (interfaces, mode, flow table size, paths).
    NeedsRestart { name: String, from: String, to: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub changes: Vec<Change>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Marks the removals as ending their connections with a reset.
    pub fn with_resets(mut self) -> Self {
        for c in &mut self.changes {
            if let Change::Remove { reset, .. } = c {
                *reset = true;
            }
        }
        self
    }
}

fn backends(f: &FrontendConfig) -> String {
    let mut s = f.backends.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    if !f.allow.is_empty() {
        s += &format!(" allow {}", f.allow.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
    }
    if f.when_all_unhealthy != Default::default() {
        s += " reject-when-all-unhealthy";
    }
    s
}

pub fn plan(live: &Config, desired: &Config) -> Plan {
    let mut changes = Vec::new();
    for f in &live.frontends {
        match desired.frontend(f.address, f.port) {
            None => changes.push(Change::Remove { frontend: f.label(), backend: backends(f), reset: false }),
            Some(d) if d != f => {
                changes.push(Change::Set { frontend: f.label(), from: backends(f), to: backends(d) })
            }
            Some(_) => {}
        }
    }
    for d in &desired.frontends {
        if live.frontend(d.address, d.port).is_none() {
            changes.push(Change::Add { frontend: d.label(), backend: backends(d) });
        }
    }
    let mut setting = |name: &str, from: String, to: String, live_now: bool| {
        if from != to {
            let (name, from, to) = (name.to_owned(), from, to);
            changes.push(if live_now {
                Change::Setting { name, from, to }
            } else {
                Change::NeedsRestart { name, from, to }
            });
        }
    };
    let t = |c: &Config| toml::to_string(&c.timeouts).unwrap_or_default().replace('\n', " ").trim().to_owned();
    setting("timeouts", t(live), t(desired), true);
    setting("snat_ports", live.snat_ports.to_string(), desired.snat_ports.to_string(), true);
    let h = |c: &Config| toml::to_string(&c.health).unwrap_or_default().replace('\n', " ").trim().to_owned();
    setting("health", h(live), h(desired), true);
    let m = |c: &Config| c.metrics_addr.map_or("off".to_owned(), |a| a.to_string());
    setting("metrics_addr", m(live), m(desired), false);
    setting("interfaces", live.interfaces.join(","), desired.interfaces.join(","), false);
    setting("mode", format!("{:?}", live.mode).to_lowercase(), format!("{:?}", desired.mode).to_lowercase(), false);
    setting("max_flows", live.max_flows.to_string(), desired.max_flows.to_string(), false);
    setting("manage_sysctls", live.manage_sysctls.to_string(), desired.manage_sysctls.to_string(), false);
    setting("pin_dir", live.pin_dir.display().to_string(), desired.pin_dir.display().to_string(), false);
    setting("socket", live.socket.display().to_string(), desired.socket.display().to_string(), false);
    Plan { changes }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Add { frontend, backend } => write!(f, "+ {frontend} -> {backend}"),
            Change::Remove { frontend, backend, reset } => {
                let then = if *reset { "reset" } else { "finish" };
                write!(f, "- {frontend} -> {backend} (existing connections {then})")
            }
            Change::Set { frontend, from, to } => {
                write!(f, "~ {frontend} -> {to} (was {from}; existing connections stay on {from})")
            }
            Change::Setting { name, from, to } => write!(f, "~ {name}: {from} -> {to}"),
            Change::NeedsRestart { name, from, to } => {
                write!(f, "! {name}: {from} -> {to} (takes effect when kpf run restarts)")
            }
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no changes");
        }
        for c in &self.changes {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str, frontends: &[(u16, &str)]) -> Config {
        let mut t = format!("interface = \"eth0\"\n{extra}\n");
        for (p, b) in frontends {
            t.push_str(&format!("[[frontend]]\nport = {p}\nbackends = [\"{b}\"]\n"));
        }
        Config::parse(&t, "t").unwrap()
    }

    #[test]
    fn diff_names_every_kind_of_change() {
        let live = cfg("", &[(9093, "10.0.0.2:39092"), (9094, "10.0.0.3:39092"), (9095, "10.0.0.4:39092")]);
        let desired = cfg(
            "mode = \"generic\"\n[timeouts]\nsyn = \"10s\"",
            &[(9093, "10.0.0.2:39092"), (9094, "10.0.0.9:39092"), (9096, "10.0.0.5:39092")],
        );
        let p = plan(&live, &desired);
        let text = p.to_string();
        let removed = Change::Remove { frontend: "*:9095".into(), backend: "10.0.0.4:39092".into(), reset: false };
        assert!(p.changes.contains(&removed), "{text}");
        assert!(text.contains("- *:9095 -> 10.0.0.4:39092 (existing connections finish)"), "{text}");
        assert!(p.changes.contains(&Change::Add { frontend: "*:9096".into(), backend: "10.0.0.5:39092".into() }), "{text}");
        assert!(
            p.changes.contains(&Change::Set {
                frontend: "*:9094".into(),
                from: "10.0.0.3:39092".into(),
                to: "10.0.0.9:39092".into()
            }),
            "{text}"
        );
        assert!(p.changes.iter().any(|c| matches!(c, Change::Setting { name, .. } if name == "timeouts")), "{text}");
        assert!(p.changes.iter().any(|c| matches!(c, Change::NeedsRestart { name, .. } if name == "mode")), "{text}");
        assert_eq!(p.changes.len(), 5, "{text}");
        assert!(plan(&live, &live).is_empty());
    }

    #[test]
    fn a_removal_with_reset_says_so() {
        let live = cfg("", &[(9093, "10.0.0.2:39092"), (9095, "10.0.0.4:39092")]);
        let desired = cfg("", &[(9093, "10.0.0.2:39092")]);
        let text = plan(&live, &desired).with_resets().to_string();
        assert_eq!(text.trim(), "- *:9095 -> 10.0.0.4:39092 (existing connections reset)");
        // What a kpf without the field sent reads as a plain removal.
        let old: Change = serde_json::from_str(r#"{"change":"remove","frontend":"*:9095","backend":"b"}"#).unwrap();
        assert_eq!(old, Change::Remove { frontend: "*:9095".into(), backend: "b".into(), reset: false });
    }
}
