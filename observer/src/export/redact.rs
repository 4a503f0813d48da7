//! DNS names can be sensitive (customer names, internal hosts): `--redact-names` rewrites
//! them before anything leaves the agent, in spans, metrics, and text and JSON lines.
//!
//! What stays visible: the cluster domain and the search domain that completed the name.
//! They are configuration, not what the application asked for, and they are what says how a
//! name escaped (`<hidden>.another-lab.com` still reads as "escaped through another-lab.com").
//! Everything before them is rewritten:
//! - `hash`: each label becomes `h` and 12 hex digits of HMAC-SHA-256 under a key drawn at
//!   start and never written anywhere. Equal labels stay equal for the agent's lifetime, so
//!   `db` asked for and `db.another-lab.com` that answered share `h…`, and metrics still
//!   group; a restart draws a new key, so hashes cannot be joined across runs.
//! - `redact`: the hidden part becomes the single label `redacted` (label count hidden too).
//!
//! Addresses are not names and are kept.
use std::{net::IpAddr, sync::Arc};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use ring::{hmac, rand::SystemRandom};

use crate::record::{Answer, ConnectionRecord};

/// How DNS names are rewritten in spans, metrics and output (`--redact-names`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedactMode {
    #[default]
    Off,
    Hash,
    Redact,
}

/// Hex digits of the keyed hash kept per label: 48 bits, no collision among the names one
/// node sees in practice, short enough to read.
const HASH_HEX_DIGITS: usize = 12;
pub const REDACTED_LABEL: &str = "redacted";

#[derive(Debug, thiserror::Error)]
#[error("drawing the name-hashing key from the system's random source")]
pub struct RedactKeyError;

pub struct Redactor {
    mode: RedactMode,
    key: Option<hmac::Key>,
    cluster_domain: String,
}

impl Redactor {
    pub fn new(mode: RedactMode, cluster_domain: &str) -> Result<Self, RedactKeyError> {
        let key = match mode {
            RedactMode::Hash => Some(
                hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
                    .map_err(|_| RedactKeyError)?,
            ),
            RedactMode::Off | RedactMode::Redact => None,
        };
        Ok(Self {
            mode,
            key,
            cluster_domain: cluster_domain.trim_end_matches('.').to_ascii_lowercase(),
        })
    }

    pub fn mode(&self) -> RedactMode {
        self.mode
    }

    /// One name, keeping `search_domain` and the cluster domain visible when it ends in one.
    /// An absolute name keeps its trailing dot.
    pub fn name(&self, name: &str, search_domain: Option<&str>) -> String {
        if self.mode == RedactMode::Off {
            return name.to_owned();
        }
        let (bare, dot) = match name.strip_suffix('.') {
            Some(bare) => (bare, "."),
            None => (name, ""),
        };
        if bare.is_empty() {
            return name.to_owned();
        }
        let visible = [search_domain, Some(self.cluster_domain.as_str())]
            .into_iter()
            .flatten()
            .map(|s| s.trim_end_matches('.'))
            .filter(|s| !s.is_empty())
            .filter(|s| {
                bare.eq_ignore_ascii_case(s)
                    || (bare.len() > s.len()
                        && bare.as_bytes()[bare.len() - s.len() - 1] == b'.'
                        && bare[bare.len() - s.len()..].eq_ignore_ascii_case(s))
            })
            .max_by_key(|s| s.len());
        let (hidden, suffix) = match visible {
            Some(s) if s.len() == bare.len() => return name.to_owned(),
            Some(s) => (
                &bare[..bare.len() - s.len() - 1],
                &bare[bare.len() - s.len()..],
            ),
            None => (bare, ""),
        };
        let mut out = match (self.mode, &self.key) {
            (RedactMode::Hash, Some(key)) => hidden
                .split('.')
                .map(|label| hash_label(key, label))
                .collect::<Vec<_>>()
                .join("."),
            _ => REDACTED_LABEL.to_owned(),
        };
        if !suffix.is_empty() {
            out.push('.');
            out.push_str(suffix);
        }
        out.push_str(dot);
        out
    }

    /// Every name a connection record carries: the chain's names, queries, CNAME targets.
    pub fn record(&self, record: &mut ConnectionRecord) {
        if self.mode == RedactMode::Off {
            return;
        }
        let Some(shared) = &record.chain else { return };
        let mut chain = (**shared).clone();
        let search = chain.search_domain.clone();
        let search = search.as_deref();
        let name = |name: &str| -> Arc<str> { self.name(name, search).into() };
        chain.query_name = name(&chain.query_name);
        chain.server_address = name(&chain.server_address);
        for target in &mut chain.cname_chain {
            *target = name(target);
        }
        for query in Arc::make_mut(&mut chain.queries) {
            query.name = name(&query.name);
            for answer in &mut query.answers {
                // Only names are hidden; a CNAME target that reads as an address stays
                // as it was written before answers were typed.
                if let Answer::Cname(target) = answer
                    && target.parse::<IpAddr>().is_err()
                {
                    *target = name(target);
                }
            }
        }
        record.chain = Some(Arc::new(chain));
    }
}

fn hash_label(key: &hmac::Key, label: &str) -> String {
    let tag = hmac::sign(key, label.to_ascii_lowercase().as_bytes());
    let mut out = String::with_capacity(1 + HASH_HEX_DIGITS);
    out.push('h');
    for byte in &tag.as_ref()[..HASH_HEX_DIGITS / 2] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        record::{DnsQueryRecord, Outcome, QType, Rcode, Resolution, ResolutionChain},
        scope::ScopeKey,
    };

    fn story() -> ConnectionRecord {
        let query = |name: &str, rcode: Rcode, answers: &[&str]| DnsQueryRecord {
            name: name.into(),
            qtype: QType::A,
            server: "198.18.0.10".parse().unwrap(),
            rcode: Some(rcode),
            answers: answers
                .iter()
                .map(|a| match a.parse() {
                    Ok(ip) => Answer::Address(ip),
                    Err(_) => Answer::Cname((*a).into()),
                })
                .collect(),
            sent_at: 1,
            answered_at: Some(2),
            truncated: false,
        };
        ConnectionRecord {
            scope: ScopeKey::Host(7),
            cgroup_id: 7,
            pid: 1,
            comm: "python3".into(),
            destination: "203.0.113.10:5432".parse().unwrap(),
            source: None,
            opened_at: 3,
            outcome: Outcome::Established,
            outcome_at: 4,
            resolution: Resolution::SearchEscape,
            chain: Some(Arc::new(ResolutionChain {
                query_name: "db".into(),
                server_address: "db.another-lab.com".into(),
                search_domain: Some("another-lab.com".into()),
                cname_chain: vec!["pg.secret-vendor.net".into()],
                wasted_queries: 3,
                ndots_walk: false,
                queries: Arc::new(vec![
                    query("db.simple-web-app.svc.cluster.local", Rcode::NXDOMAIN, &[]),
                    query(
                        "db.another-lab.com",
                        Rcode::NOERROR,
                        &["pg.secret-vendor.net", "203.0.113.10"],
                    ),
                ]),
            })),
            egress: true,
            flagged: true,
            drift: false,
            dns_from_outside: false,
        }
    }

    #[test]
    fn off_changes_nothing() {
        let r = Redactor::new(RedactMode::Off, "cluster.local").unwrap();
        let mut record = story();
        r.record(&mut record);
        assert_eq!(record, story());
    }

    #[test]
    fn hash_keeps_search_and_cluster_domains_and_equal_labels_equal() {
        let r = Redactor::new(RedactMode::Hash, "cluster.local").unwrap();
        let mut record = story();
        r.record(&mut record);
        let chain = record.chain.as_deref().unwrap();
        let db = &chain.query_name;
        assert!(
            db.starts_with('h') && db.len() == 1 + HASH_HEX_DIGITS,
            "{db}"
        );
        assert_eq!(*chain.server_address, format!("{db}.another-lab.com"));
        assert_eq!(chain.search_domain.as_deref(), Some("another-lab.com"));
        let in_cluster = &chain.queries[0].name;
        assert!(in_cluster.starts_with(&format!("{db}.")), "{in_cluster}");
        assert!(in_cluster.ends_with(".cluster.local"), "{in_cluster}");
        assert!(!in_cluster.contains("simple-web-app"), "{in_cluster}");
        assert_eq!(in_cluster.split('.').count(), 5, "{in_cluster}");
        // A CNAME target outside both domains is hidden whole; addresses stay.
        assert!(
            !chain.cname_chain[0].contains("secret"),
            "{:?}",
            chain.cname_chain
        );
        assert_eq!(
            chain.queries[1].answers[0],
            Answer::Cname(chain.cname_chain[0].clone())
        );
        assert_eq!(chain.queries[1].answers[1].to_string(), "203.0.113.10");
        // Stable within a run, case-insensitive, absolute names keep their dot.
        assert_eq!(r.name("DB", None), **db);
        assert_eq!(
            r.name("db.another-lab.com.", Some("another-lab.com")),
            format!("{db}.another-lab.com.")
        );
        assert_eq!(r.name("cluster.local", None), "cluster.local");
        // A new run (a new key) gives other hashes.
        let other = Redactor::new(RedactMode::Hash, "cluster.local").unwrap();
        assert_ne!(other.name("db", None), **db);
    }

    #[test]
    fn redact_hides_every_label_but_the_visible_domains() {
        let r = Redactor::new(RedactMode::Redact, "cluster.local").unwrap();
        let mut record = story();
        r.record(&mut record);
        let chain = record.chain.as_deref().unwrap();
        assert_eq!(&*chain.query_name, "redacted");
        assert_eq!(&*chain.server_address, "redacted.another-lab.com");
        assert_eq!(&*chain.queries[0].name, "redacted.cluster.local");
        assert_eq!(chain.cname_chain, [Arc::<str>::from("redacted")]);
        // The flag sentence is built from the record, so it carries only redacted names.
        let message = crate::export::flag_message(&record, None).unwrap_or_default();
        assert!(!message.contains("db"), "{message}");
        assert!(message.contains("another-lab.com"), "{message}");
    }

    #[test]
    fn suffix_matches_whole_labels_only() {
        let r = Redactor::new(RedactMode::Redact, "cluster.local").unwrap();
        assert_eq!(r.name("evilcluster.local", None), "redacted");
        assert_eq!(r.name("x.another-lab.com", Some("lab.com")), "redacted");
        assert_eq!(r.name("x.lab.com", Some("lab.com")), "redacted.lab.com");
        assert_eq!(r.name("", None), "");
        assert_eq!(r.name(".", None), ".");
    }
}
