//! Connects still waiting for their answer.
//!
//! A connect crosses the connect ring once, when it ends, as one record that carries its
//! open: a ring record costs the kernel programs more than anything else they do per
//! connect. Until then the open sits complete in its `CONNECT_TRACK` slot, which the agent
//! maps read-only and reads on its poll, so that a connect that hangs is seen while it
//! hangs and in time order with the DNS that named its destination. [`WaitingOpens`]
//! delivers each open exactly once, whether from its slot or from its ended record.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::{NonNull, read_volatile},
    sync::atomic::{Ordering, fence},
};

use aya::maps::MapData;
use observer_common::{CONNECT_TRACK_SLOTS, ConnectEvent, ConnectKind, ConnectSlot, SLOT_OPEN};

use super::decode::{Connect, ConnectRecord, Event};
use crate::fast_hash::FastMap;

/// `CONNECT_TRACK`, mapped read-only.
pub struct TrackSlots {
    base: NonNull<ConnectSlot>,
    len: usize,
}

// SAFETY: the mapping is read-only to this process and only ever read through volatile
// loads; nothing here is tied to the thread that made it.
unsafe impl Send for TrackSlots {}

impl TrackSlots {
    /// Maps the array. Its layout is checked against [`ConnectSlot`] first: a kernel object
    /// built from other sources fails here, not with a misread slot.
    pub fn map(map: &MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        if info.value_size() as usize != size_of::<ConnectSlot>()
            || info.max_entries() != CONNECT_TRACK_SLOTS
        {
            return Err(io::Error::other(format!(
                "connect tracking map holds {} slots of {} bytes, expected {} of {}",
                info.max_entries(),
                info.value_size(),
                CONNECT_TRACK_SLOTS,
                size_of::<ConnectSlot>()
            )));
        }
        let len = CONNECT_TRACK_SLOTS as usize * size_of::<ConnectSlot>();
        // SAFETY: a fresh shared read-only mapping of a map fd, at no fixed address; the
        // kernel checks that the map is mappable and `len` within it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self {
            base,
            len: CONNECT_TRACK_SLOTS as usize,
        })
    }

    /// Calls `found` with a copy of every open slot's record. The kernel writes a slot while
    /// this reads it: a copy is kept only if the slot said open, for the same socket, before
    /// and after it was taken.
    pub fn for_each_open(&self, mut found: impl FnMut(&ConnectEvent)) {
        for i in 0..self.len {
            // SAFETY: `i` is within the mapping, which lives as long as `self`.
            let slot = unsafe { self.base.as_ptr().add(i) };
            // SAFETY: as above; volatile because the kernel changes the slot underneath.
            let (phase, sock_id) = unsafe {
                (
                    read_volatile(&raw const (*slot).phase),
                    read_volatile(&raw const (*slot).event.sock_id),
                )
            };
            if phase != SLOT_OPEN {
                continue;
            }
            fence(Ordering::Acquire);
            // SAFETY: as above; any bit pattern is a valid `ConnectEvent`.
            let copy = unsafe { read_volatile(&raw const (*slot).event) };
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let (after, sock_after) = unsafe {
                (
                    read_volatile(&raw const (*slot).phase),
                    read_volatile(&raw const (*slot).event.sock_id),
                )
            };
            if after == SLOT_OPEN
                && sock_after == sock_id
                && copy.sock_id == sock_id
                && copy.kind == ConnectKind::Open as u8
            {
                found(&copy);
            }
        }
    }
}

impl Drop for TrackSlots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.len * size_of::<ConnectSlot>(),
            );
        }
    }
}

/// Which opens the agent has been given, so that each is given once: an open read from its
/// slot is not given again by its ended record.
#[derive(Debug, Default)]
pub struct WaitingOpens {
    /// Opens given from their slot whose outcome has not come, with the number of the last
    /// scan that found them. Asked once per connect that ends: hashed the fast way.
    given: FastMap<u64, u64>,
    scans: u64,
}

impl WaitingOpens {
    /// The open slots of one scan: gives the opens not given yet.
    pub fn scanned(&mut self, opens: impl IntoIterator<Item = Connect>, out: &mut Vec<Event>) {
        self.scans += 1;
        for open in opens {
            if self.given.insert(open.sock_id, self.scans).is_none() {
                out.push(Event::ConnectOpen(open));
            }
        }
        // An open two scans have not found and whose end has not come was given up on by
        // its slot, or its end was lost to a full ring (both counted by the kernel): the
        // socket id is never reused, so forgetting it bounds the map by the slots. Two
        // scans, not one: a slot is freed just before its ended record is committed.
        let scans = self.scans;
        self.given.retain(|_, last| *last + 1 >= scans);
    }

    /// One connect ring record: an ended connect gives its open (unless its slot already
    /// did) and its outcome; an open given up on by its slot gives the open, once.
    pub fn record(&mut self, record: ConnectRecord, out: &mut Vec<Event>) {
        match record {
            ConnectRecord::Open(open) => {
                if !self.given.contains_key(&open.sock_id) {
                    out.push(Event::ConnectOpen(open));
                }
            }
            ConnectRecord::Ended { open, outcome } => {
                if self.given.remove(&open.sock_id).is_none() {
                    out.push(Event::ConnectOpen(open));
                }
                out.push(Event::ConnectOutcome(outcome));
            }
        }
    }

    /// Opens given from slots whose end has not come yet.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.given.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::decode::{ConnectOutcome, ConnectResult};

    fn open(sock_id: u64) -> Connect {
        Connect {
            timestamp: 10,
            sock_id,
            cgroup_id: 7,
            pid: 1,
            tid: 1,
            comm: "app".into(),
            source: "198.18.0.5:40000".parse().unwrap(),
            destination: "203.0.113.10:5432".parse().unwrap(),
            requested: None,
        }
    }

    fn ended(sock_id: u64) -> ConnectRecord {
        let open = open(sock_id);
        let connect = Connect {
            timestamp: 20,
            ..open.clone()
        };
        ConnectRecord::Ended {
            open,
            outcome: ConnectOutcome {
                connect,
                result: ConnectResult::Established,
            },
        }
    }

    /// The socket ids of `events`' opens, in order.
    fn open_ids(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::ConnectOpen(c) => Some(c.sock_id),
                _ => None,
            })
            .collect()
    }

    fn outcomes(events: &[Event]) -> usize {
        events
            .iter()
            .filter(|e| matches!(e, Event::ConnectOutcome(_)))
            .count()
    }

    #[test]
    fn a_quick_connect_gives_its_open_then_its_outcome_from_one_record() {
        let mut waiting = WaitingOpens::default();
        let mut out = Vec::new();
        waiting.record(ended(1), &mut out);
        assert_eq!(open_ids(&out), [1]);
        assert!(matches!(out[1], Event::ConnectOutcome(ref o) if o.connect.timestamp == 20));
        assert_eq!(out[0].timestamp(), 10, "the open keeps the SYN's time");
    }

    #[test]
    fn an_open_read_from_its_slot_is_given_once() {
        let mut waiting = WaitingOpens::default();
        let mut out = Vec::new();
        // Seen waiting by two scans, then it ends.
        waiting.scanned([open(1)], &mut out);
        waiting.scanned([open(1)], &mut out);
        assert_eq!(open_ids(&out), [1]);
        waiting.record(ended(1), &mut out);
        assert_eq!(open_ids(&out), [1], "no second open: {out:?}");
        assert_eq!(outcomes(&out), 1);
        assert_eq!(waiting.waiting(), 0);
    }

    #[test]
    fn a_slot_freed_just_before_its_record_lands_gives_no_second_open() {
        let mut waiting = WaitingOpens::default();
        let mut out = Vec::new();
        waiting.scanned([open(1)], &mut out);
        // The next scan finds the slot free; the ended record is drained after it.
        waiting.scanned([], &mut out);
        waiting.record(ended(1), &mut out);
        assert_eq!(open_ids(&out), [1]);
        assert_eq!(outcomes(&out), 1);
    }

    #[test]
    fn opens_whose_end_never_comes_are_forgotten() {
        let mut waiting = WaitingOpens::default();
        let mut out = Vec::new();
        waiting.scanned((0..100).map(open), &mut out);
        assert_eq!(waiting.waiting(), 100);
        // The slot given up on reports its open on the ring: already given, not again.
        waiting.record(ConnectRecord::Open(open(5)), &mut out);
        assert_eq!(open_ids(&out).len(), 100);
        waiting.scanned([], &mut out);
        waiting.scanned([], &mut out);
        assert_eq!(waiting.waiting(), 0, "bounded by what the slots hold");
    }

    #[test]
    fn an_open_given_up_on_before_any_scan_is_given_from_the_ring() {
        let mut waiting = WaitingOpens::default();
        let mut out = Vec::new();
        waiting.record(ConnectRecord::Open(open(3)), &mut out);
        assert_eq!(open_ids(&out), [3]);
        assert_eq!(outcomes(&out), 0);
        assert_eq!(waiting.waiting(), 0);
    }
}
