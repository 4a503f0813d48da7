//! Resolution chains: the queries one application lookup put on the wire, grouped.
//!
//! A chain has a base name (what the application asked for, without the search domain)
//! and steps: the base completed by a search domain, or the base as-is. A step holds the
//! queries for its name (A and AAAA are one step). See the book, "How connections are classified", for the rules.
use std::{borrow::Cow, net::IpAddr, sync::Arc};

use super::scope::{Resolver, Scope};
use crate::{
    dns::{AnswerData, DnsMessage, QType, Rcode},
    record::{Answer, BootNs, DnsQueryRecord, Resolution, ResolutionChain},
};

/// Search domains learned per scope when resolv.conf is unknown.
const MAX_INFERRED_SEARCH: usize = 8;

#[derive(Clone, Debug)]
pub(super) enum StepKind {
    AsIs,
    Search(Arc<str>),
}

/// Queries one chain keeps: a walk through a long search list, A and AAAA per name, and
/// retries fit many times over. A chain that reaches it takes no more (the next query
/// starts a chain of its own), so that a pod repeating one unanswered name cannot grow a
/// chain without bound.
pub(super) const MAX_QUERIES_PER_CHAIN: usize = 64;

fn answered(q: &DnsQueryRecord) -> bool {
    q.rcode.is_some()
}

fn has_address(q: &DnsQueryRecord) -> bool {
    q.answers.iter().any(|a| matches!(a, Answer::Address(_)))
}

#[derive(Clone, Debug)]
pub(super) struct Step {
    pub kind: StepKind,
    /// The name queried: the first query's question name. Every query of the step holds
    /// this same `Arc`, which is how a query is told to belong to it.
    pub name: Arc<str>,
}

#[derive(Clone, Debug)]
pub(super) struct ChainAnswer {
    /// The first step whose response held addresses.
    pub step: u16,
    pub class: Resolution,
    pub cnames: Box<[Arc<str>]>,
    pub answered_at: BootNs,
}

#[derive(Debug)]
pub(super) struct Chain {
    pub base: Arc<str>,
    /// Tried as-is first with fewer dots than ndots: only an absolute name does that.
    pub asked_absolute: bool,
    /// A name with dots walked the search list because it had fewer than ndots dots (the
    /// record's `ndots_walk`): settled when the chain starts, as its base and first step
    /// never change.
    pub ndots_walk: bool,
    pub steps: Vec<Step>,
    /// Every query in arrival order, already in the form a record carries: a connect's
    /// record shares the list, and the chain copies it only if it changes while shared.
    pub queries: Arc<Vec<DnsQueryRecord>>,
    /// Arrival order is send order (events came in order): a record can share the list.
    /// Kept as queries arrive, so that a connect need not read the whole list to know.
    pub queries_in_order: bool,
    pub last_query_at: BootNs,
    pub answer: Option<ChainAnswer>,
    /// Not before this may the chain be freed (window after its last query, answers'
    /// TTL plus grace).
    pub free_at: BootNs,
    /// The record form, built on the first connect that needs it.
    pub materialized: Option<Arc<ResolutionChain>>,
}

impl Chain {
    fn step_is(step: &Step, name: &str) -> bool {
        *step.name == *name
    }

    pub fn step_name(&self, step: usize) -> &Arc<str> {
        &self.steps[step].name
    }

    /// What the application asked for, as it asked.
    pub fn query_name(&self) -> Cow<'_, str> {
        if self.asked_absolute {
            Cow::Owned(format!("{}.", self.base))
        } else {
            Cow::Borrowed(&self.base)
        }
    }

    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.queries
            .iter()
            .flat_map(|q| q.answers.iter())
            .filter_map(|a| match a {
                Answer::Address(ip) => Some(*ip),
                Answer::Cname(_) => None,
            })
    }

    /// The queries of step `step`.
    pub fn step_queries(&self, step: usize) -> impl DoubleEndedIterator<Item = &DnsQueryRecord> {
        let name = &self.steps[step].name;
        self.queries.iter().filter(|q| Arc::ptr_eq(&q.name, name))
    }

    /// Every query of the last step was answered and none held an address.
    fn last_step_failed(&self) -> bool {
        !self.steps.is_empty() && {
            let mut queries = self.step_queries(self.steps.len() - 1);
            queries.all(|q| answered(q) && !has_address(q))
        }
    }

    /// Records a query sent for step `step`; returns its index in [`Self::queries`].
    pub fn push_query(&mut self, step: usize, qtype: u16, server: IpAddr, at: BootNs) -> u16 {
        let queries = Arc::make_mut(&mut self.queries);
        if queries.last().is_some_and(|last| last.sent_at > at) {
            self.queries_in_order = false;
        }
        queries.push(DnsQueryRecord {
            name: self.steps[step].name.clone(),
            qtype: QType(qtype),
            server,
            rcode: None,
            answers: Box::default(),
            sent_at: at,
            answered_at: None,
            truncated: false,
        });
        self.materialized = None;
        (queries.len() - 1) as u16
    }

    /// Records the response to query `query`.
    pub fn answer_query(
        &mut self,
        query: usize,
        rcode: Rcode,
        at: BootNs,
        answers: Vec<Answer>,
        truncated: bool,
    ) {
        let q = &mut Arc::make_mut(&mut self.queries)[query];
        q.rcode = Some(rcode);
        q.answered_at = Some(at);
        q.answers = answers.into_boxed_slice();
        q.truncated = truncated;
        self.materialized = None;
    }

    pub fn materialize(&mut self) -> Arc<ResolutionChain> {
        if let Some(m) = &self.materialized {
            return m.clone();
        }
        let answer_step = self.answer.as_ref().map(|a| a.step as usize);
        // Queries are kept in arrival order, which is the order sent unless the events came
        // out of order: only then does the record get a sorted copy.
        let queries = if self.queries_in_order {
            self.queries.clone()
        } else {
            let mut sorted = (*self.queries).clone();
            sorted.sort_by_key(|q| q.sent_at);
            Arc::new(sorted)
        };
        let (server_address, search_domain, cname_chain) = match (&self.answer, answer_step) {
            (Some(a), Some(step)) => {
                let step = &self.steps[step];
                (
                    step.name.clone(),
                    match &step.kind {
                        StepKind::Search(d) => Some(d.clone()),
                        StepKind::AsIs => None,
                    },
                    a.cnames.to_vec(),
                )
            }
            _ => (Arc::from(""), None, Vec::new()),
        };
        let query_name = if self.asked_absolute {
            Arc::from(self.query_name().as_ref())
        } else {
            self.base.clone()
        };
        let chain = Arc::new(ResolutionChain {
            query_name,
            server_address,
            search_domain,
            cname_chain,
            wasted_queries: answer_step.unwrap_or(self.steps.len()) as u32,
            ndots_walk: self.ndots_walk,
            queries,
        });
        self.materialized = Some(chain.clone());
        chain
    }
}

/// `name` relative to `base`: `None` if unrelated, `Some("")` if equal, else the suffix.
fn suffix_of<'a>(base: &str, name: &'a str) -> Option<&'a str> {
    if name == base {
        return Some("");
    }
    let rest = name.strip_prefix(base)?;
    rest.strip_prefix('.').filter(|s| !s.is_empty())
}

fn dots(name: &str) -> usize {
    name.bytes().filter(|b| *b == b'.').count()
}

/// Finds the open chain this query continues: (slot, generation, step index), adding the step
/// if it is new. Open chains idle past the window are closed on the way.
pub(super) fn find_continuation(
    scope: &mut Scope,
    name: &Arc<str>,
    qtype: u16,
    at: BootNs,
    window: BootNs,
) -> Option<(u32, u32, u16)> {
    let slots = &scope.slots;
    scope.open.retain(|(slot, generation)| {
        let s = &slots[*slot as usize];
        s.generation == *generation
            && s.chain
                .as_ref()
                .is_some_and(|c| c.last_query_at + window >= at)
    });
    for &(slot, generation) in scope.open.iter().rev() {
        let chain = scope.slots[slot as usize]
            .chain
            .as_mut()
            .expect("open chains are live");
        // The query list sits in its own allocation: it is read only for a chain that the
        // name continues, not for every open chain looked at.
        let full = |chain: &Chain| chain.queries.len() >= MAX_QUERIES_PER_CHAIN;
        if let Some(answer) = &chain.answer {
            // A resolved chain takes only the other address family of its answering step, or
            // the retry of a question whose answer was truncated (the same name over TCP).
            let step = &chain.steps[answer.step as usize];
            if !Chain::step_is(step, name) || full(chain) {
                continue;
            }
            let retry_or_new_family = chain
                .step_queries(answer.step as usize)
                .rev()
                .find(|q| q.qtype.0 == qtype)
                .is_none_or(|q| q.truncated);
            if retry_or_new_family {
                return Some((slot, generation, answer.step));
            }
            continue;
        }
        if let Some(k) = chain.steps.iter().position(|s| Chain::step_is(s, name)) {
            if full(chain) {
                continue;
            }
            return Some((slot, generation, k as u16));
        }
        let Some(suffix) = suffix_of(&chain.base, name) else {
            continue;
        };
        let kind = if suffix.is_empty() {
            StepKind::AsIs
        } else if scope.resolver.inferred {
            if !chain.last_step_failed() {
                continue;
            }
            StepKind::Search(learn_search_domain(&mut scope.resolver, suffix))
        } else {
            let Some(idx) = scope.resolver.search.iter().position(|d| &**d == suffix) else {
                continue;
            };
            let tried = chain
                .steps
                .iter()
                .filter_map(|s| match &s.kind {
                    StepKind::Search(d) => scope.resolver.search.iter().position(|x| x == d),
                    StepKind::AsIs => None,
                })
                .max();
            if tried.is_some_and(|t| idx <= t) {
                continue;
            }
            StepKind::Search(scope.resolver.search[idx].clone())
        };
        if full(chain) {
            continue;
        }
        chain.steps.push(Step {
            kind,
            name: name.clone(),
        });
        return Some((slot, generation, (chain.steps.len() - 1) as u16));
    }
    None
}

fn learn_search_domain(resolver: &mut Resolver, suffix: &str) -> Arc<str> {
    if let Some(d) = resolver.search.iter().find(|d| &***d == suffix) {
        return d.clone();
    }
    let d: Arc<str> = Arc::from(suffix);
    if resolver.search.len() < MAX_INFERRED_SEARCH {
        resolver.search.push(d.clone());
    }
    d
}

/// A query that continues no open chain starts one. Its base: the name minus the FIRST
/// search domain when the rest has fewer dots than ndots (a relative name's walk always
/// starts there), else the name itself, tried as-is.
pub(super) fn start_chain(
    resolver: &mut Resolver,
    name: &Arc<str>,
    cluster_domain: &str,
    at: BootNs,
    window: BootNs,
) -> Chain {
    if resolver.inferred && resolver.search.is_empty() {
        infer_kubernetes_search(resolver, name, cluster_domain);
    }
    let ndots = usize::from(resolver.ndots);
    let first = resolver.search.first().and_then(|s0| {
        let base = name.strip_suffix(&**s0)?.strip_suffix('.')?;
        let base_dots = dots(base);
        (!base.is_empty() && base_dots < ndots)
            .then(|| (Arc::from(base), s0.clone(), base_dots > 0))
    });
    let (base, kind, asked_absolute, ndots_walk) = match first {
        Some((base, s0, dotted)) => (base, StepKind::Search(s0), false, dotted),
        // With no search list, as-is first says nothing about how the name was written.
        None => (
            name.clone(),
            StepKind::AsIs,
            !resolver.search.is_empty() && dots(name) < ndots,
            false,
        ),
    };
    Chain {
        base,
        asked_absolute,
        ndots_walk,
        steps: vec![Step {
            kind,
            name: name.clone(),
        }],
        queries: Arc::new(Vec::with_capacity(2)),
        queries_in_order: true,
        last_query_at: at,
        answer: None,
        free_at: at + window,
        materialized: None,
    }
}

/// `x.<namespace>.svc.<cluster domain>` is the first step of a ClusterFirst pod's walk:
/// its search list starts `<namespace>.svc.<cd> svc.<cd> <cd>`.
fn infer_kubernetes_search(resolver: &mut Resolver, name: &str, cluster_domain: &str) {
    let Some(rest) = name
        .strip_suffix(cluster_domain)
        .and_then(|r| r.strip_suffix(".svc."))
    else {
        return;
    };
    let Some((prefix, namespace)) = rest.rsplit_once('.') else {
        return;
    };
    if prefix.is_empty() || namespace.is_empty() {
        return;
    }
    resolver.search = vec![
        Arc::from(format!("{namespace}.svc.{cluster_domain}")),
        Arc::from(format!("svc.{cluster_domain}")),
        Arc::from(cluster_domain),
    ];
}

/// What a response says about its question.
pub(super) struct Lookup {
    /// Every address and CNAME target, in answer order.
    pub items: Vec<Answer>,
    /// CNAME targets followed from the question name.
    pub cnames: Vec<Arc<str>>,
    /// The smallest TTL along the CNAME chain.
    ttl_cap: u32,
    /// NOERROR: only then do the answers name the question's addresses.
    usable: bool,
}

impl Lookup {
    /// Addresses owned by the question name or its CNAME targets, with the smallest TTL
    /// along the way; v4-mapped v6 addresses as v4. Read from the message again rather
    /// than kept: cheaper than a list per response.
    pub fn addresses<'a>(
        &'a self,
        qname: &'a str,
        msg: &'a DnsMessage,
    ) -> impl Iterator<Item = (IpAddr, u32)> + 'a {
        msg.answers
            .iter()
            .filter(|_| self.usable)
            .filter_map(move |a| {
                let ip = a.data.address()?;
                let owned = &*a.owner == qname || self.cnames.iter().any(|c| **c == *a.owner);
                owned.then(|| (ip.to_canonical(), a.ttl.min(self.ttl_cap)))
            })
    }
}

pub(super) fn follow_answer(qname: &str, msg: &DnsMessage, max_hops: usize) -> Lookup {
    let items = msg
        .answers
        .iter()
        .map(|a| match &a.data {
            AnswerData::A(v4) => Answer::Address(IpAddr::V4(*v4)),
            AnswerData::Aaaa(v6) => Answer::Address(IpAddr::V6(*v6).to_canonical()),
            AnswerData::Cname(t) => Answer::Cname(t.clone()),
        })
        .collect();
    let mut cnames: Vec<Arc<str>> = Vec::new();
    let mut ttl_cap = u32::MAX;
    let usable = msg.rcode == Rcode::NOERROR;
    if usable {
        let mut current: &str = qname;
        for _ in 0..max_hops {
            let next = msg.answers.iter().find_map(|a| match &a.data {
                AnswerData::Cname(t) if &*a.owner == current => Some((t, a.ttl)),
                _ => None,
            });
            let Some((target, ttl)) = next else { break };
            if cnames.iter().any(|c| **c == **target) || &**target == qname {
                break;
            }
            ttl_cap = ttl_cap.min(ttl);
            cnames.push(target.clone());
            current = target;
        }
    }
    Lookup {
        items,
        cnames,
        ttl_cap,
        usable,
    }
}
