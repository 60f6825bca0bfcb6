//! Custody of accepted connections, with no I/O: where each one is, and
//! the only ways it moves. The primary keeps its copy of a connection
//! until a worker acknowledges it, so that none is lost when a worker dies
//! and none is served twice.
//!
//! A connection is in exactly one place:
//!
//! - **held**: accepted, in its server's queue, waiting for a worker;
//! - **staged**: given to a worker during this turn's burst, to go out in
//!   one message ([`Ledger::stage`], then [`Ledger::commit`] once sent or
//!   [`Ledger::abort`] if the send failed);
//! - **sent**: in the worker's channel, not acknowledged yet
//!   ([`Ledger::sent`] for one sent at once);
//! - **gone**: acknowledged ([`Ledger::ack`]: the worker's copy serves it,
//!   the primary's is dropped), or given up by the caller.
//!
//! A worker that refuses or returns a connection ([`Ledger::take_back`])
//! or dies ([`Ledger::release`]) gives its connections back to the held
//! queues, in the order they were accepted. The ledger also keeps each
//! worker's figures: connections it acknowledged (or reported, in the
//! kernel modes) and finished, from which its load is derived.
//!
//! It is generic over the connection (anything with an id and a server),
//! so that its rules are tested with plain values: see the tests at the
//! end, random sequences of operations and worker deaths.

use std::collections::{HashMap, VecDeque};

use super::ids::{ServerIdx, WorkerIdx};

/// What the ledger needs of a connection.
pub(crate) trait Custody {
    /// Unique among the connections in custody, increasing in accept order.
    fn id(&self) -> u64;
    /// The server (listening address) it came in on.
    fn server(&self) -> ServerIdx;
}

/// One worker's connections and figures.
#[derive(Debug)]
struct Book<C> {
    /// Given to it in this turn's burst, not sent yet, in order.
    staged: Vec<C>,
    /// Sent, not acknowledged, by id.
    sent: HashMap<u64, C>,
    /// Acknowledged (rr) or reported accepted (STATS, kernel modes).
    taken: u64,
    /// Reported finished (DONE, a running total); `None` before the first
    /// report.
    finished: Option<u64>,
}

impl<C> Default for Book<C> {
    fn default() -> Self {
        Book {
            staged: Vec::new(),
            sent: HashMap::new(),
            taken: 0,
            finished: None,
        }
    }
}

/// A report the ledger refuses: the worker does not hold that connection,
/// or its figures would go backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotHeld(pub u64);

/// Every connection in the primary's custody, and each worker's figures.
/// Workers and servers are indexes, as the event loop numbers them.
#[derive(Debug)]
pub(crate) struct Ledger<C> {
    /// Held connections, per server, in the order they go out.
    held: Vec<VecDeque<C>>,
    /// Per worker index; `None` for an index not in use.
    books: Vec<Option<Book<C>>>,
    /// Workers with staged connections, in the order they got their first.
    staged_by: Vec<WorkerIdx>,
    /// Per worker index, its figures kept current by every move: the
    /// policy scan reads these for every worker on every connection, and a
    /// compact table keeps that scan to a few cache lines at hundreds of
    /// workers.
    loads: Vec<Load>,
}

/// A worker's figures as the policy scan reads them.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    /// Staged and sent, not acknowledged.
    outstanding: u32,
    /// `outstanding` plus acknowledged and not reported finished.
    in_flight: u64,
}

impl<C> Default for Ledger<C> {
    fn default() -> Self {
        Ledger {
            held: Vec::new(),
            books: Vec::new(),
            staged_by: Vec::new(),
            loads: Vec::new(),
        }
    }
}

impl<C: Custody> Ledger<C> {
    /// Makes room for server `k`'s queue.
    pub fn add_server(&mut self, k: ServerIdx) {
        if self.held.len() <= k.0 {
            self.held.resize_with(k.0 + 1, VecDeque::new);
        }
    }

    /// Opens worker `i`'s book, empty (a new worker at a reused index).
    pub fn open(&mut self, i: WorkerIdx) {
        if self.books.len() <= i.0 {
            self.books.resize_with(i.0 + 1, || None);
        }
        self.books[i.0] = Some(Book::default());
        self.recount(i);
    }

    /// Closes worker `i`'s book; what it still held goes back first
    /// ([`Ledger::release`]). Returns its figures, (taken, finished).
    pub fn close(&mut self, i: WorkerIdx) -> (u64, Option<u64>) {
        self.release(i);
        let figures = match self.books.get_mut(i.0).and_then(Option::take) {
            Some(b) => (b.taken, b.finished),
            None => (0, None),
        };
        self.recount(i);
        figures
    }

    /// Brings worker `i`'s entry of the load table up to date with its
    /// book; every method that changes a book calls it.
    fn recount(&mut self, i: WorkerIdx) {
        if self.loads.len() <= i.0 {
            self.loads.resize(i.0 + 1, Load::default());
        }
        self.loads[i.0] = self.book(i).map_or(Load::default(), |b| {
            let outstanding = b.sent.len() + b.staged.len();
            let open = b.finished.map_or(0, |done| b.taken.saturating_sub(done));
            Load {
                outstanding: u32::try_from(outstanding).unwrap_or(u32::MAX),
                in_flight: outstanding as u64 + open,
            }
        });
    }

    fn book(&self, i: WorkerIdx) -> Option<&Book<C>> {
        self.books.get(i.0).and_then(Option::as_ref)
    }

    fn book_mut(&mut self, i: WorkerIdx) -> &mut Book<C> {
        self.books
            .get_mut(i.0)
            .and_then(Option::as_mut)
            .expect("a worker's book is open while it lives")
    }

    /// A connection just accepted, at the back of its server's queue.
    pub fn hold(&mut self, c: C) {
        let k = c.server();
        self.add_server(k);
        self.held[k.0].push_back(c);
    }

    /// A connection that comes back (refused, returned, not sendable):
    /// it goes out first.
    pub fn hand_back(&mut self, c: C) {
        let k = c.server();
        self.add_server(k);
        self.held[k.0].push_front(c);
    }

    /// The next held connection of server `k`, out of custody: give it to
    /// a worker ([`Ledger::stage`], [`Ledger::sent`]) or back
    /// ([`Ledger::hand_back`]).
    pub fn next_held(&mut self, k: ServerIdx) -> Option<C> {
        self.held.get_mut(k.0).and_then(VecDeque::pop_front)
    }

    /// Connections held for server `k`.
    pub fn held(&self, k: ServerIdx) -> usize {
        self.held.get(k.0).map_or(0, VecDeque::len)
    }

    /// Connections held for all servers.
    pub fn held_total(&self) -> usize {
        self.held.iter().map(VecDeque::len).sum()
    }

    /// Stages `c` for worker `i`; returns how many it has staged now.
    pub fn stage(&mut self, i: WorkerIdx, c: C) -> usize {
        let book = self.book_mut(i);
        book.staged.push(c);
        let n = book.staged.len();
        if n == 1 {
            self.staged_by.push(i);
        }
        self.recount(i);
        n
    }

    /// Worker `i`'s staged connections, in order (to encode one message).
    pub fn staged(&self, i: WorkerIdx) -> &[C] {
        self.book(i).map_or(&[], |b| &b.staged)
    }

    /// The workers with staged connections, taken (send each batch, then
    /// commit or abort it).
    pub fn take_staged_workers(&mut self, into: &mut Vec<WorkerIdx>) {
        into.clear();
        into.append(&mut self.staged_by);
    }

    /// Worker `i`'s staged connections were sent: they wait for its
    /// acknowledgement.
    pub fn commit(&mut self, i: WorkerIdx) {
        let book = self.book_mut(i);
        for c in book.staged.drain(..) {
            book.sent.insert(c.id(), c);
        }
        self.staged_by.retain(|&w| w != i);
    }

    /// Worker `i`'s staged connections could not be sent: they go back to
    /// the front of their queues, in order.
    pub fn abort(&mut self, i: WorkerIdx) {
        let Some(book) = self.books.get_mut(i.0).and_then(Option::as_mut) else {
            return;
        };
        let staged = std::mem::take(&mut book.staged);
        for c in staged.into_iter().rev() {
            self.hand_back(c);
        }
        self.staged_by.retain(|&w| w != i);
        self.recount(i);
    }

    /// `c` was sent to worker `i` on its own (a Node `newconn`).
    pub fn sent(&mut self, i: WorkerIdx, c: C) {
        self.book_mut(i).sent.insert(c.id(), c);
        self.recount(i);
    }

    /// Worker `i` acknowledged connection `id`: the primary's copy is
    /// dropped and the worker counts it taken.
    pub fn ack(&mut self, i: WorkerIdx, id: u64) -> Result<(), NotHeld> {
        let book = self.book_mut(i);
        let acked = match book.sent.remove(&id) {
            Some(c) => {
                book.taken += 1;
                drop(c);
                Ok(())
            }
            None => Err(NotHeld(id)),
        };
        self.recount(i);
        acked
    }

    /// Worker `i` gives connection `id` back unserved (refused, returned,
    /// its fd never arrived): out of custody, for the caller to hand back
    /// or close.
    pub fn take_back(&mut self, i: WorkerIdx, id: u64) -> Result<C, NotHeld> {
        let c = self.book_mut(i).sent.remove(&id).ok_or(NotHeld(id));
        self.recount(i);
        c
    }

    /// Worker `i` can serve nothing more (its channel closed or was
    /// closed): what it had staged goes back to the front of its queues,
    /// what it had not acknowledged to the back, in accept order. Returns
    /// how many it had not acknowledged.
    pub fn release(&mut self, i: WorkerIdx) -> usize {
        self.abort(i);
        let Some(book) = self.books.get_mut(i.0).and_then(Option::as_mut) else {
            return 0;
        };
        let mut sent: Vec<C> = book.sent.drain().map(|(_, c)| c).collect();
        sent.sort_unstable_by_key(Custody::id);
        let n = sent.len();
        for c in sent {
            self.hold(c);
        }
        self.recount(i);
        n
    }

    /// A kernel-mode worker's report of connections it accepted itself (a
    /// running total; the highest counts).
    pub fn report_taken(&mut self, i: WorkerIdx, total: u64) {
        let book = self.book_mut(i);
        book.taken = book.taken.max(total);
        self.recount(i);
    }

    /// Worker `i`'s report of connections finished (a running total).
    /// `bounded`: it cannot exceed those taken (rr, where the primary
    /// counts). Returns whether the total grew.
    pub fn report_finished(
        &mut self,
        i: WorkerIdx,
        total: u64,
        bounded: bool,
    ) -> Result<bool, String> {
        let book = self.book_mut(i);
        let before = book.finished.unwrap_or(0);
        if total < before || (bounded && total > book.taken) {
            return Err(format!(
                "reported {total} connections finished, after {before} and with {} taken",
                book.taken
            ));
        }
        let grew = book.finished.is_some_and(|b| total > b);
        book.finished = Some(total);
        self.recount(i);
        Ok(grew)
    }

    /// Connections worker `i` acknowledged (or reported accepted).
    pub fn taken(&self, i: WorkerIdx) -> u64 {
        self.book(i).map_or(0, |b| b.taken)
    }

    /// Worker `i`'s running total of finished connections, once reported.
    pub fn finished(&self, i: WorkerIdx) -> Option<u64> {
        self.book(i).and_then(|b| b.finished)
    }

    /// Connections worker `i` has been given and not acknowledged, staged
    /// included: what `--max-unacked` bounds.
    pub fn outstanding(&self, i: WorkerIdx) -> usize {
        self.loads.get(i.0).map_or(0, |l| l.outstanding as usize)
    }

    /// Connections sent to worker `i` and not acknowledged.
    pub fn unacknowledged(&self, i: WorkerIdx) -> usize {
        self.book(i).map_or(0, |b| b.sent.len())
    }

    /// The connections sent to worker `i` and not acknowledged.
    pub fn sent_to(&self, i: WorkerIdx) -> impl Iterator<Item = &C> {
        self.book(i).into_iter().flat_map(|b| b.sent.values())
    }

    /// Worker `i`'s load: what it holds unacknowledged, plus, once it
    /// reports completions, those acknowledged and not yet finished.
    pub fn in_flight(&self, i: WorkerIdx) -> u64 {
        self.loads.get(i.0).map_or(0, |l| l.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::ids::{ServerIdx, WorkerIdx};
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, PartialEq, Eq)]
    struct Fake {
        id: u64,
        server: usize,
    }

    impl Custody for Fake {
        fn id(&self) -> u64 {
            self.id
        }
        fn server(&self) -> ServerIdx {
            ServerIdx(self.server)
        }
    }

    fn conn(id: u64) -> Fake {
        Fake { id, server: 0 }
    }

    #[test]
    fn a_connection_moves_held_staged_sent_acknowledged() {
        let mut l = Ledger::default();
        l.open(WorkerIdx(0));
        l.hold(conn(1));
        l.hold(conn(2));
        assert_eq!(l.held(ServerIdx(0)), 2);
        let c = l.next_held(ServerIdx(0)).unwrap();
        assert_eq!(l.stage(WorkerIdx(0), c), 1);
        assert_eq!(l.outstanding(WorkerIdx(0)), 1);
        let mut w = Vec::new();
        l.take_staged_workers(&mut w);
        assert_eq!(w, [WorkerIdx(0)]);
        l.commit(WorkerIdx(0));
        assert_eq!(l.unacknowledged(WorkerIdx(0)), 1);
        assert_eq!(l.ack(WorkerIdx(0), 1), Ok(()));
        assert_eq!(
            l.ack(WorkerIdx(0), 1),
            Err(NotHeld(1)),
            "acknowledged once only"
        );
        assert_eq!(
            (
                l.taken(WorkerIdx(0)),
                l.outstanding(WorkerIdx(0)),
                l.held(ServerIdx(0))
            ),
            (1, 0, 1)
        );
    }

    #[test]
    fn an_aborted_batch_goes_first_in_order() {
        let mut l = Ledger::default();
        l.open(WorkerIdx(3));
        for id in 1..=4 {
            l.hold(conn(id));
        }
        for _ in 0..3 {
            let c = l.next_held(ServerIdx(0)).unwrap();
            l.stage(WorkerIdx(3), c);
        }
        l.abort(WorkerIdx(3));
        let order: Vec<u64> = std::iter::from_fn(|| l.next_held(ServerIdx(0)))
            .map(|c| c.id)
            .collect();
        assert_eq!(order, [1, 2, 3, 4]);
    }

    #[test]
    fn a_dead_worker_gives_back_staged_first_and_sent_in_accept_order() {
        let mut l = Ledger::default();
        l.open(WorkerIdx(1));
        for id in [5, 3, 9] {
            l.sent(WorkerIdx(1), conn(id));
        }
        l.hold(conn(10));
        l.stage(WorkerIdx(1), conn(11));
        assert_eq!(l.release(WorkerIdx(1)), 3);
        let order: Vec<u64> = std::iter::from_fn(|| l.next_held(ServerIdx(0)))
            .map(|c| c.id)
            .collect();
        assert_eq!(order, [11, 10, 3, 5, 9]);
        assert_eq!(l.close(WorkerIdx(1)), (0, None));
    }

    #[test]
    fn figures_and_load() {
        let mut l: Ledger<Fake> = Ledger::default();
        l.open(WorkerIdx(0));
        for id in 1..=3 {
            l.sent(WorkerIdx(0), conn(id));
        }
        for id in 1..=3 {
            l.ack(WorkerIdx(0), id).unwrap();
        }
        assert_eq!(
            l.in_flight(WorkerIdx(0)),
            0,
            "no reports yet: unacknowledged only"
        );
        assert_eq!(l.report_finished(WorkerIdx(0), 1, true), Ok(false));
        assert_eq!(l.in_flight(WorkerIdx(0)), 2);
        assert_eq!(l.report_finished(WorkerIdx(0), 2, true), Ok(true));
        assert!(
            l.report_finished(WorkerIdx(0), 1, true).is_err(),
            "backwards"
        );
        assert!(
            l.report_finished(WorkerIdx(0), 4, true).is_err(),
            "more than taken"
        );
        assert_eq!(
            l.report_finished(WorkerIdx(0), 9, false),
            Ok(true),
            "kernel modes"
        );
        l.report_taken(WorkerIdx(0), 7);
        l.report_taken(WorkerIdx(0), 5);
        assert_eq!(l.taken(WorkerIdx(0)), 7);
    }

    /// One step of a random history.
    #[derive(Debug, Clone)]
    enum Op {
        Accept(usize),
        Give {
            server: usize,
            worker: usize,
        },
        Flush(bool),
        SendNow {
            server: usize,
            worker: usize,
        },
        Ack(usize, usize),
        TakeBack(usize, usize),
        Die(usize),
        Start(usize),
        /// Worker reports `n` more connections finished.
        Finished(usize, u64),
    }

    fn op(rng: &mut fastrand::Rng) -> Op {
        match rng.u8(..17) {
            0..=3 => Op::Accept(rng.usize(..2)),
            4..=6 => Op::Give {
                server: rng.usize(..2),
                worker: rng.usize(..4),
            },
            7 => Op::Flush(rng.bool()),
            8 => Op::SendNow {
                server: rng.usize(..2),
                worker: rng.usize(..4),
            },
            9..=11 => Op::Ack(rng.usize(..4), rng.usize(..8)),
            12 => Op::TakeBack(rng.usize(..4), rng.usize(..8)),
            13 => Op::Die(rng.usize(..4)),
            14 => Op::Finished(rng.usize(..4), rng.u64(..3)),
            _ => Op::Start(rng.usize(..4)),
        }
    }

    /// Random histories of accepts, hand-outs, sends that fail, acks,
    /// refusals, worker deaths and restarts, against a model of where
    /// every connection is: none is lost, none is in two places, none is
    /// acknowledged twice, and what comes back keeps its accept order.
    #[test]
    fn random_histories_keep_every_connection_in_one_place() {
        for seed in 0..400u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut l: Ledger<Fake> = Ledger::default();
            let mut alive = [false; 4];
            let mut next_id = 1u64;
            let mut acked: BTreeSet<u64> = BTreeSet::new();
            let mut accepted = 0u64;
            let mut history = Vec::new();
            for _ in 0..300 {
                let o = op(&mut rng);
                history.push(o.clone());
                match o {
                    Op::Accept(server) => {
                        l.hold(Fake {
                            id: next_id,
                            server,
                        });
                        next_id += 1;
                        accepted += 1;
                    }
                    Op::Give { server, worker } if alive[worker] => {
                        if let Some(c) = l.next_held(ServerIdx(server)) {
                            l.stage(WorkerIdx(worker), c);
                        }
                    }
                    Op::Flush(ok) => {
                        let mut ws = Vec::new();
                        l.take_staged_workers(&mut ws);
                        for w in ws {
                            if ok { l.commit(w) } else { l.abort(w) }
                        }
                    }
                    Op::SendNow { server, worker } if alive[worker] => {
                        if let Some(c) = l.next_held(ServerIdx(server)) {
                            l.sent(WorkerIdx(worker), c);
                        }
                    }
                    Op::Ack(worker, nth) if alive[worker] => {
                        let mut ids: Vec<u64> =
                            l.sent_to(WorkerIdx(worker)).map(|c| c.id).collect();
                        ids.sort_unstable();
                        if let Some(&id) = ids.get(nth) {
                            l.ack(WorkerIdx(worker), id).unwrap();
                            assert!(acked.insert(id), "{id} acknowledged twice: {history:?}");
                            assert_eq!(l.ack(WorkerIdx(worker), id), Err(NotHeld(id)));
                        }
                    }
                    Op::TakeBack(worker, nth) if alive[worker] => {
                        let mut ids: Vec<u64> =
                            l.sent_to(WorkerIdx(worker)).map(|c| c.id).collect();
                        ids.sort_unstable();
                        if let Some(&id) = ids.get(nth) {
                            let c = l.take_back(WorkerIdx(worker), id).unwrap();
                            l.hand_back(c);
                        }
                    }
                    Op::Die(worker) if alive[worker] => {
                        l.close(WorkerIdx(worker));
                        alive[worker] = false;
                    }
                    Op::Finished(worker, n) if alive[worker] => {
                        let w = WorkerIdx(worker);
                        let total = (l.finished(w).unwrap_or(0) + n).min(l.taken(w));
                        l.report_finished(w, total, true).unwrap();
                    }
                    Op::Start(worker) if !alive[worker] => {
                        l.open(WorkerIdx(worker));
                        alive[worker] = true;
                    }
                    _ => {}
                }
                check(&l, &alive, accepted, &acked, &history);
            }
        }
    }

    /// Every id accepted is acknowledged or in exactly one place; each
    /// held queue, apart from what came back to its front, is in accept
    /// order.
    fn check(l: &Ledger<Fake>, alive: &[bool], accepted: u64, acked: &BTreeSet<u64>, h: &[Op]) {
        let mut place: BTreeMap<u64, String> = BTreeMap::new();
        let mut put = |id: u64, at: String| {
            if let Some(before) = place.insert(id, at.clone()) {
                panic!("{id} both {before} and {at}: {h:?}");
            }
        };
        for (k, q) in l.held.iter().enumerate() {
            for c in q {
                assert_eq!(c.server, k, "{h:?}");
                put(c.id, format!("held by server {k}"));
            }
        }
        for (i, b) in l.books.iter().enumerate() {
            let Some(b) = b else { continue };
            assert!(alive[i], "a book for a dead worker: {h:?}");
            for c in &b.staged {
                put(c.id, format!("staged for {i}"));
            }
            for (&id, c) in &b.sent {
                assert_eq!(id, c.id);
                put(id, format!("sent to {i}"));
            }
            // The load table says what the book says.
            let open = b.finished.map_or(0, |f| b.taken.saturating_sub(f));
            let outstanding = b.staged.len() + b.sent.len();
            assert_eq!(l.outstanding(WorkerIdx(i)), outstanding, "{h:?}");
            assert_eq!(
                l.in_flight(WorkerIdx(i)),
                outstanding as u64 + open,
                "{h:?}"
            );
        }
        for (i, b) in l.books.iter().enumerate() {
            if b.is_none() {
                assert_eq!(l.outstanding(WorkerIdx(i)), 0, "{h:?}");
                assert_eq!(l.in_flight(WorkerIdx(i)), 0, "{h:?}");
            }
        }
        for &id in acked {
            put(id, "acknowledged".into());
        }
        let all: Vec<u64> = place.keys().copied().collect();
        assert_eq!(all, (1..=accepted).collect::<Vec<_>>(), "lost: {h:?}");
        assert!(l.staged_by.iter().all(|&i| !l.staged(i).is_empty()));
    }

    /// A dead worker's unacknowledged connections go behind what was held,
    /// in accept order, worker after worker as they die.
    #[test]
    fn each_dead_workers_connections_come_back_in_accept_order_behind_what_was_held() {
        let mut l = Ledger::default();
        l.open(WorkerIdx(0));
        l.open(WorkerIdx(1));
        for id in 1..=6 {
            l.hold(conn(id));
        }
        for (w, n) in [(0, 2), (1, 2)] {
            for _ in 0..n {
                let c = l.next_held(ServerIdx(0)).unwrap();
                l.sent(WorkerIdx(w), c);
            }
        }
        l.close(WorkerIdx(1));
        l.close(WorkerIdx(0));
        let order: Vec<u64> = std::iter::from_fn(|| l.next_held(ServerIdx(0)))
            .map(|c| c.id)
            .collect();
        assert_eq!(order, [5, 6, 3, 4, 1, 2]);
    }
}
