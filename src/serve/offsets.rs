//! Which offsets may be committed, per partition, when events finish out of order.
//!
//! Kafka commits one offset per partition: "everything before this one is done". Micro-batches
//! finish out of order (inside a batch, across batches, and cache hits overtake misses), so a
//! partition's committable offset is its lowest offset still in flight, or one past the highest
//! offset received when nothing is in flight: the contiguous high-water mark of finished events.
//! An event counts as finished only once its verdict and audit records (or its dead letter) were
//! acknowledged by the broker.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A topic and partition.
pub type Tp = (String, i32);

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The last offset committed (or handed to the committer).
    committed: Option<i64>,
    /// Revoked: nothing new is taken, and nothing more is committed, for it.
    revoked: bool,
}

impl Partition {
    fn committable(&self) -> Option<i64> {
        let hwm = self.in_flight.first().copied().or(self.next)?;
        match self.committed {
            Some(c) if c >= hwm => None,
            _ => Some(hwm),
        }
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: Mutex<HashMap<Tp, Partition>>,
    /// Signalled whenever an event finishes (for drains).
    finished: Condvar,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a received event. False when its partition was revoked: the event must be dropped
    /// (the partition's new owner reads it again from the committed offset).
    pub fn begin(&self, tp: &Tp, offset: i64) -> bool {
        let mut g = self.parts.lock().expect("offsets lock");
        let p = g.entry(tp.clone()).or_default();
        if p.revoked {
            return false;
        }
        p.in_flight.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        true
    }

    /// Records that an event's outputs were acknowledged.
    pub fn finish(&self, tp: &Tp, offset: i64) {
        let mut g = self.parts.lock().expect("offsets lock");
        if let Some(p) = g.get_mut(tp) {
            p.in_flight.remove(&offset);
        }
        drop(g);
        self.finished.notify_all();
    }

    /// Events received and not yet finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        let g = self.parts.lock().expect("offsets lock");
        g.values().map(|p| p.in_flight.len()).sum()
    }

    /// The offsets to commit now (for live partitions, or only `only` when given), marked as
    /// committed. If the commit fails, `uncommit` puts them back.
    pub fn take_committable(&self, only: Option<&[Tp]>) -> Vec<(Tp, i64)> {
        let mut g = self.parts.lock().expect("offsets lock");
        let mut out = Vec::new();
        for (tp, p) in g.iter_mut() {
            let wanted = match only {
                Some(list) => list.contains(tp),
                None => !p.revoked,
            };
            if !wanted {
                continue;
            }
            if let Some(o) = p.committable() {
                p.committed = Some(o);
                out.push((tp.clone(), o));
            }
        }
        out.sort();
        out
    }

    /// Forgets a failed commit so the offsets are committed again next time.
    pub fn uncommit(&self, offsets: &[(Tp, i64)]) {
        let mut g = self.parts.lock().expect("offsets lock");
        for (tp, o) in offsets {
            if let Some(p) = g.get_mut(tp) {
                if p.committed == Some(*o) {
                    p.committed = None;
                }
            }
        }
    }

    /// Newly assigned partitions start fresh: the broker's committed offset is where reading
    /// resumes.
    pub fn assign(&self, tps: &[Tp]) {
        let mut g = self.parts.lock().expect("offsets lock");
        for tp in tps {
            g.insert(tp.clone(), Partition::default());
        }
    }

    /// Stops taking events for these partitions.
    pub fn revoke(&self, tps: &[Tp]) {
        let mut g = self.parts.lock().expect("offsets lock");
        for tp in tps {
            g.entry(tp.clone()).or_default().revoked = true;
        }
    }

    /// Forgets these partitions (after they were let go).
    pub fn remove(&self, tps: &[Tp]) {
        let mut g = self.parts.lock().expect("offsets lock");
        for tp in tps {
            g.remove(tp);
        }
    }

    /// Waits until nothing is in flight for `tps` (all partitions when `None`), or `timeout`.
    /// Returns the number of events still in flight for them.
    pub fn wait_idle(&self, tps: Option<&[Tp]>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut g = self.parts.lock().expect("offsets lock");
        loop {
            let busy: usize = g
                .iter()
                .filter(|(tp, _)| tps.is_none_or(|l| l.contains(tp)))
                .map(|(_, p)| p.in_flight.len())
                .sum();
            let now = Instant::now();
            if busy == 0 || now >= deadline {
                return busy;
            }
            g = self
                .finished
                .wait_timeout(g, deadline - now)
                .expect("offsets lock")
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("q".to_string(), p)
    }

    #[test]
    fn commits_only_the_contiguous_finished_prefix() {
        let t = OffsetTracker::new();
        for o in 10..15 {
            assert!(t.begin(&tp(0), o));
        }
        // 12 and 14 finish first: nothing before 10 is pending, but 10 is.
        t.finish(&tp(0), 12);
        t.finish(&tp(0), 14);
        assert_eq!(t.take_committable(None), vec![(tp(0), 10)]);
        t.finish(&tp(0), 10);
        t.finish(&tp(0), 11);
        // 13 still in flight: commit up to (not including) 13.
        assert_eq!(t.take_committable(None), vec![(tp(0), 13)]);
        assert!(t.take_committable(None).is_empty(), "nothing new");
        t.finish(&tp(0), 13);
        assert_eq!(t.take_committable(None), vec![(tp(0), 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_failed_commits_retry() {
        let t = OffsetTracker::new();
        t.begin(&tp(0), 0);
        t.begin(&tp(1), 7);
        t.finish(&tp(1), 7);
        let c = t.take_committable(None);
        assert_eq!(c, vec![(tp(0), 0), (tp(1), 8)]);
        t.uncommit(&c);
        assert_eq!(t.take_committable(None), c);
    }

    #[test]
    fn revoked_partitions_take_nothing_and_drain() {
        let t = std::sync::Arc::new(OffsetTracker::new());
        t.begin(&tp(0), 0);
        t.begin(&tp(1), 0);
        t.revoke(&[tp(0)]);
        assert!(!t.begin(&tp(0), 1), "revoked partitions refuse new events");
        assert!(t.take_committable(None).iter().all(|(p, _)| p != &tp(0)));
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            t2.finish(&tp(0), 0);
        });
        assert_eq!(t.wait_idle(Some(&[tp(0)]), Duration::from_secs(5)), 0);
        h.join().unwrap();
        assert_eq!(t.take_committable(Some(&[tp(0)])), vec![(tp(0), 1)]);
        assert_eq!(
            t.wait_idle(None, Duration::from_millis(10)),
            1,
            "tp1 still busy"
        );
        t.remove(&[tp(0)]);
        t.assign(&[tp(0)]);
        assert!(
            t.begin(&tp(0), 5),
            "a reassigned partition takes events again"
        );
    }
}
