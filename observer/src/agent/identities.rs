//! Identity off the event loop.
//!
//! Everything identity reads from the node's filesystem (cgroupfs walks, `cgroup.procs` of a
//! pod's members, `/proc/<pid>/root/etc/resolv.conf`) runs on the identity worker, a thread
//! of its own. The event loop asks it over a bounded channel without ever waiting (a full
//! channel is a counted drop; the next event of the cgroup asks again) and keeps the answers
//! in a snapshot of its own, [`Identities`], read by plain lookup. A slow or stalled read
//! delays only the cgroups still waiting for their first answer (see `parking`), never the
//! correlation of the others.
use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::FastMap;
use crate::{
    identity::{Identity, WorkloadIdentity},
    scope::ScopeKey,
};

/// Requests waiting for the worker at most; past it a request is dropped and counted.
const REQUEST_CAPACITY: usize = 4096;
/// Answers waiting for the loop at most; past it the worker waits (the loop never does).
const UPDATE_CAPACITY: usize = 4096;
/// A known cgroup is asked about again on its next event at most this often, so that
/// Kubernetes metadata that arrived late, a resolv.conf due for a re-read or a new member
/// pid reach the snapshot.
const RECHECK: Duration = Duration::from_secs(1);
/// cgroups in the snapshot at most; beyond that it starts over (it is only a cache).
const KNOWN_MAX: usize = 65_536;

/// Test-only fault injection: `<cgroup id>:<path>` makes the worker read `path` to its end
/// before it first reads that cgroup's identity. A FIFO there is a read that stalls until
/// the test writes to it and closes it: how a hung `/proc` or cgroupfs read behaves.
pub const STALL_ENV: &str = "OBSERVER_FAULT_STALL_IDENTITY";

/// What the loop asks the worker.
#[derive(Debug)]
enum Request {
    /// The identity of a cgroup; `pid`, when the event named one, is a member to read the
    /// resolv.conf through.
    Resolve { cgroup_id: u64, pid: Option<u32> },
    /// Walk cgroupfs again, then say which of these cgroups are gone.
    Refresh { cgroups: Vec<u64> },
    /// The scope departed: drop what identity caches about it.
    Forget(ScopeKey),
}

/// What the worker tells the loop.
#[derive(Debug)]
pub enum Update {
    Resolved(Arc<WorkloadIdentity>),
    /// These cgroups no longer exist (answer to a refresh).
    Gone(Vec<u64>),
}

/// The loop's side: the snapshot of identities and the channel to the worker.
pub struct Identities {
    identity: Identity,
    requests: SyncSender<Request>,
    known: FastMap<u64, Known>,
    /// Requests the worker's full queue refused.
    pub requests_dropped: u64,
}

struct Known {
    /// `None` until the worker answers for the first time.
    identity: Option<Arc<WorkloadIdentity>>,
    /// Kubernetes metadata generation at the last request.
    kube_generation: u64,
    asked_at: Instant,
    in_flight: bool,
    last_pid: Option<u32>,
}

impl Identities {
    /// Starts the worker thread; its answers arrive on the returned receiver.
    pub fn start(identity: Identity) -> anyhow::Result<(Identities, mpsc::Receiver<Update>)> {
        let stall = match std::env::var(STALL_ENV) {
            Ok(value) => Some(
                Stall::parse(&value)
                    .with_context(|| format!("{STALL_ENV}={value}: expected <cgroup id>:<path>"))?,
            ),
            Err(_) => None,
        };
        let (requests, requests_rx) = std::sync::mpsc::sync_channel(REQUEST_CAPACITY);
        let (updates, updates_rx) = mpsc::channel(UPDATE_CAPACITY);
        let worker = Worker {
            identity: identity.clone(),
            updates,
            stall,
            deferred: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("identity".into())
            .spawn(move || worker.run(requests_rx))
            .context("starting the identity worker thread")?;
        Ok((
            Identities {
                identity,
                requests,
                known: FastMap::default(),
                requests_dropped: 0,
            },
            updates_rx,
        ))
    }

    /// Whatever reads no file: Kubernetes stores, cluster networks, status.
    pub fn shared(&self) -> &Identity {
        &self.identity
    }

    /// An event of `cgroup_id` arrived (`pid` when it names its process): asks the worker
    /// when the cgroup is new, when its snapshot may be stale, or when a new member pid may
    /// read what the earlier ones could not. Never waits.
    pub fn ask(&mut self, cgroup_id: u64, pid: Option<u32>) {
        let generation = self.identity.kube_generation();
        let now = Instant::now();
        // The length first: a second lookup only when the snapshot is full.
        if self.known.len() >= KNOWN_MAX && !self.known.contains_key(&cgroup_id) {
            self.known.retain(|_, k| k.identity.is_none());
        }
        let known = self.known.entry(cgroup_id).or_insert_with(|| Known {
            identity: None,
            kube_generation: generation,
            asked_at: now,
            in_flight: false,
            last_pid: None,
        });
        let due = match &known.identity {
            None => !known.in_flight,
            Some(who) => {
                !known.in_flight
                    && (known.kube_generation != generation
                        || now.duration_since(known.asked_at) >= RECHECK
                        || (pid.is_some() && pid != known.last_pid && who.resolver.is_none()))
            }
        };
        if !due {
            return;
        }
        match self.requests.try_send(Request::Resolve { cgroup_id, pid }) {
            Ok(()) => {
                known.in_flight = true;
                known.asked_at = now;
                known.kube_generation = generation;
                known.last_pid = pid.or(known.last_pid);
            }
            Err(TrySendError::Full(_)) => self.requests_dropped += 1,
            // The worker is gone: the snapshot stays as it is.
            Err(TrySendError::Disconnected(_)) => self.requests_dropped += 1,
        }
    }

    /// The snapshot's identity of `cgroup_id`, `None` while the first answer is awaited.
    pub fn get(&self, cgroup_id: u64) -> Option<&Arc<WorkloadIdentity>> {
        self.known.get(&cgroup_id)?.identity.as_ref()
    }

    /// The snapshot's identity, or what is known without one: a cgroup of the node.
    pub fn or_unknown(&self, cgroup_id: u64) -> Arc<WorkloadIdentity> {
        self.get(cgroup_id)
            .cloned()
            .unwrap_or_else(|| Arc::new(WorkloadIdentity::unknown(cgroup_id)))
    }

    /// The worker answered for a cgroup.
    pub fn landed(&mut self, who: Arc<WorkloadIdentity>) {
        let generation = self.identity.kube_generation();
        let known = self.known.entry(who.cgroup_id).or_insert_with(|| Known {
            identity: None,
            kube_generation: generation,
            asked_at: Instant::now(),
            in_flight: true,
            last_pid: None,
        });
        known.in_flight = false;
        known.identity = Some(who);
    }

    /// The cgroup's events stopped waiting: until the worker answers they are handled as a
    /// node cgroup's. The request stays in flight, so its answer still lands.
    pub fn give_up(&mut self, cgroup_id: u64) {
        if let Some(known) = self.known.get_mut(&cgroup_id)
            && known.identity.is_none()
        {
            known.identity = Some(Arc::new(WorkloadIdentity::unknown(cgroup_id)));
        }
    }

    /// Asks the worker to walk cgroupfs again and report the cgroups of the snapshot that
    /// are gone.
    pub fn refresh(&mut self) {
        let cgroups = self.known.keys().copied().collect();
        if self
            .requests
            .try_send(Request::Refresh { cgroups })
            .is_err()
        {
            self.requests_dropped += 1;
        }
    }

    /// Drops cgroups that no longer exist from the snapshot.
    pub fn remove(&mut self, gone: &HashSet<u64>) {
        self.known
            .retain(|id, k| !gone.contains(id) || k.identity.is_none());
    }

    /// The scope departed: the worker forgets its resolver and memoised identities.
    pub fn forget(&mut self, scope: &ScopeKey) {
        self.known
            .retain(|_, k| k.identity.as_ref().is_none_or(|who| &who.scope != scope));
        if self
            .requests
            .try_send(Request::Forget(scope.clone()))
            .is_err()
        {
            self.requests_dropped += 1;
        }
    }
}

/// See [`STALL_ENV`].
struct Stall {
    cgroup_id: u64,
    path: PathBuf,
}

impl Stall {
    fn parse(value: &str) -> anyhow::Result<Stall> {
        let (id, path) = value.split_once(':').context("no ':'")?;
        Ok(Stall {
            cgroup_id: id.parse().context("the cgroup id is not a number")?,
            path: PathBuf::from(path),
        })
    }
}

/// The worker thread: owns every filesystem read of identity.
struct Worker {
    identity: Identity,
    updates: mpsc::Sender<Update>,
    stall: Option<Stall>,
    /// Requests for cgroups not found because the cgroupfs walk's rate limit was spent:
    /// asked again when a walk is allowed, so a cgroup created just after a walk gets its
    /// path rather than "unknown".
    deferred: VecDeque<(Instant, u64, Option<u32>)>,
}

impl Worker {
    fn run(mut self, requests: Receiver<Request>) {
        loop {
            let request = match self.deferred.front() {
                Some((due, _, _)) => {
                    match requests.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(request) => Some(request),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                None => match requests.recv() {
                    Ok(request) => Some(request),
                    Err(_) => return,
                },
            };
            let sent = match request {
                Some(Request::Resolve { cgroup_id, pid }) => self.resolve(cgroup_id, pid, true),
                Some(Request::Refresh { cgroups }) => {
                    self.identity.refresh_cgroups();
                    let gone = cgroups
                        .into_iter()
                        .filter(|id| !self.identity.cgroup_known(*id))
                        .collect();
                    self.send(Update::Gone(gone))
                }
                Some(Request::Forget(scope)) => {
                    self.identity.forget_scope(&scope);
                    true
                }
                None => true,
            };
            if !sent {
                return;
            }
            let now = Instant::now();
            while let Some((due, cgroup_id, pid)) = self.deferred.front().copied() {
                if due > now {
                    break;
                }
                self.deferred.pop_front();
                if !self.resolve(cgroup_id, pid, false) {
                    return;
                }
            }
        }
    }

    /// Resolves and publishes one cgroup's identity; false when the loop is gone.
    fn resolve(&mut self, cgroup_id: u64, pid: Option<u32>, may_defer: bool) -> bool {
        if self
            .stall
            .as_ref()
            .is_some_and(|s| s.cgroup_id == cgroup_id)
            && let Some(stall) = self.stall.take()
        {
            tracing::warn!(cgroup_id, path = %stall.path.display(), "fault injection: stalling the identity worker");
            if let Err(e) = std::fs::read(&stall.path) {
                tracing::warn!(error = %e, "fault injection: reading the stall file");
            }
            tracing::warn!(cgroup_id, "fault injection: the identity worker goes on");
        }
        let misses_before = self.identity.cgroup_stats().rate_limited_misses;
        let started = Instant::now();
        let who = self.identity.resolve(cgroup_id, pid);
        tracing::trace!(
            cgroup_id,
            ?pid,
            scope = %who.scope,
            resolver = who.resolver.is_some(),
            took_us = started.elapsed().as_micros() as u64,
            "identity read"
        );
        if may_defer
            && who.cgroup_path.is_none()
            && self.identity.cgroup_stats().rate_limited_misses > misses_before
        {
            let due = Instant::now() + self.identity.cgroup_rescan_interval();
            self.deferred.push_back((due, cgroup_id, pid));
            return true;
        }
        self.send(Update::Resolved(who))
    }

    fn send(&self, update: Update) -> bool {
        self.updates.blocking_send(update).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::identity::{CgroupCache, CgroupCacheConfig, ResolvCache, ResolvCacheConfig};

    /// A directory tree stands in for cgroupfs: the cache maps inode numbers to paths.
    fn tree(tag: &str) -> PathBuf {
        let base = std::env::temp_dir().join(format!("observer-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(base.join("system.slice")).unwrap();
        base
    }

    async fn next_resolved(updates: &mut mpsc::Receiver<Update>) -> Arc<WorkloadIdentity> {
        // A hang guard only: the answer is awaited as an event.
        let update = tokio::time::timeout(Duration::from_secs(60), updates.recv())
            .await
            .expect("the worker answered")
            .expect("the worker runs");
        match update {
            Update::Resolved(who) => who,
            other => panic!("expected an identity, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_loop_asks_without_waiting_and_a_cgroup_newer_than_the_last_walk_gets_its_path() {
        let base = tree("identities");
        let identity = Identity::host_only(
            CgroupCache::new(&base, CgroupCacheConfig::default()),
            ResolvCache::new(ResolvCacheConfig::default()),
        );
        let (mut identities, mut updates) = Identities::start(identity).unwrap();

        let known = std::fs::metadata(base.join("system.slice")).unwrap().ino();
        identities.ask(known, None);
        assert!(
            identities.get(known).is_none(),
            "nothing known before the answer"
        );
        identities.ask(known, None);
        let who = next_resolved(&mut updates).await;
        assert_eq!(who.cgroup_path.as_deref(), Some("/system.slice"));
        identities.landed(who);
        assert_eq!(
            identities.get(known).unwrap().cgroup_path.as_deref(),
            Some("/system.slice")
        );

        // Created right after the walk: the walk's rate limit keeps it unknown for a moment,
        // and the worker asks again when a walk is allowed rather than answer "unknown".
        std::fs::create_dir(base.join("late.service")).unwrap();
        let late = std::fs::metadata(base.join("late.service")).unwrap().ino();
        identities.ask(late, None);
        let who = next_resolved(&mut updates).await;
        assert_eq!(who.cgroup_id, late);
        assert_eq!(who.cgroup_path.as_deref(), Some("/late.service"));
        assert_eq!(identities.requests_dropped, 0);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
