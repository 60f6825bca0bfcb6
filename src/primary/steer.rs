//! Kernel-steered reuseport (`--sched reuseport --steer rr`): a BPF program
//! attached to a server's `SO_REUSEPORT` group picks the socket of each new
//! connection in the primary's order, so the kernel balances exactly (or by
//! weight) and the primary does no work per connection.
//!
//! Owns, per server, three BPF maps and the program: `socks` (a
//! `REUSEPORT_SOCKARRAY`, key = slot index, value = that slot's listening
//! socket), `schedule` (an array of `u32`: entry 0 is the schedule's
//! length, entries 1..=length the slot indexes in turn) and `counter` (one
//! `u64`, incremented atomically by each connection). The program reads
//! entry `1 + counter % length` of the schedule and selects that slot's
//! socket; when anything is missing it returns `SK_PASS` without a choice
//! and the kernel falls back to its hash. Loaded as
//! `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, it also places the queued
//! connections of a socket that closes (a removed slot) on the others.
//!
//! The primary writes the schedule whenever the set of ready slots changes
//! ([`schedule`]: smooth weighted round-robin over one cycle, the same
//! sequence as the rr policy's). The instructions are assembled here, by
//! hand: no compiler toolchain at build time. Every system call is in
//! [`crate::sys`].

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// `BPF_MAP_TYPE_ARRAY`.
const MAP_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`.
const MAP_REUSEPORT_SOCKARRAY: u32 = 20;
/// `BPF_PROG_TYPE_SK_REUSEPORT`.
const PROG_SK_REUSEPORT: u32 = 21;
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (Linux 5.14).
const ATTACH_SELECT_OR_MIGRATE: u32 = 40;

/// The most slots a steered server has (keys of its socket array).
pub const MAX_SLOTS: u32 = 4096;
/// The longest schedule: the sum of the ready slots' weights.
pub const MAX_SCHEDULE: u32 = 65_536;

/// How a kernel-mode server's connections are steered (`--steer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Steer {
    /// The kernel's hash (plain `SO_REUSEPORT`).
    #[default]
    Off,
    /// The primary's round-robin, weighted by `--weights`, done by a BPF
    /// program in the kernel.
    RoundRobin,
}

impl Steer {
    /// The name `--steer` takes.
    pub fn name(self) -> &'static str {
        match self {
            Steer::Off => "off",
            Steer::RoundRobin => "rr",
        }
    }
}

impl std::fmt::Display for Steer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Steer {
    type Err = String;
    fn from_str(s: &str) -> Result<Steer, String> {
        match s {
            "off" | "none" => Ok(Steer::Off),
            "rr" | "round-robin" => Ok(Steer::RoundRobin),
            _ => Err(format!("unknown steering '{s}' (expected rr or off)")),
        }
    }
}

/// One server's steering: its maps and program (see the module).
#[derive(Debug)]
pub(crate) struct Steering {
    socks: OwnedFd,
    schedule: OwnedFd,
    /// Held so the program's counter lives as long as the steering.
    _counter: OwnedFd,
    /// Held so the program stays attached while the group lives.
    _prog: OwnedFd,
    /// The schedule last written (slot indexes in turn).
    written: Vec<u32>,
}

/// Why steering could not be set up, for one line to the user.
fn problem(what: &str, e: &io::Error) -> io::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            " (loading a BPF program needs root, or CAP_BPF with CAP_NET_ADMIN)"
        }
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
            " (this kernel lacks what --steer needs: Linux 5.14 or later with BPF)"
        }
        _ => "",
    };
    io::Error::new(e.kind(), format!("--steer: {what}: {e}{hint}"))
}

impl Steering {
    /// Creates the maps, loads the program and attaches it to the group of
    /// `listener` (listening, `SO_REUSEPORT`), whose slot is 0.
    pub fn attach(listener: BorrowedFd<'_>) -> io::Result<Steering> {
        let socks = sys::bpf_map_create(MAP_REUSEPORT_SOCKARRAY, 4, 8, MAX_SLOTS)
            .map_err(|e| problem("cannot create the socket array", &e))?;
        let schedule = sys::bpf_map_create(MAP_ARRAY, 4, 4, MAX_SCHEDULE + 1)
            .map_err(|e| problem("cannot create the schedule", &e))?;
        let counter = sys::bpf_map_create(MAP_ARRAY, 4, 8, 1)
            .map_err(|e| problem("cannot create the counter", &e))?;
        let insns = program(
            raw(socks.as_fd()),
            raw(schedule.as_fd()),
            raw(counter.as_fd()),
        );
        let prog = sys::bpf_prog_load(PROG_SK_REUSEPORT, ATTACH_SELECT_OR_MIGRATE, &insns)
            .map_err(|(e, log)| {
                let e = problem("the kernel refused the program", &e);
                if log.trim().is_empty() {
                    e
                } else {
                    io::Error::new(e.kind(), format!("{e}; verifier: {}", log.trim()))
                }
            })?;
        sys::attach_reuseport_prog(listener, prog.as_fd())
            .map_err(|e| problem("cannot attach the program", &e))?;
        let steering = Steering {
            socks,
            schedule,
            _counter: counter,
            _prog: prog,
            written: Vec::new(),
        };
        steering.add_socket(0, listener)?;
        Ok(steering)
    }

    /// Takes over the steering of the primary before an upgrade: its maps
    /// and program, attached to the group already, sockets in the array
    /// (`fds`: socks, schedule, counter, program, as [`Steering::fds`]).
    pub fn adopt(fds: [OwnedFd; 4]) -> Steering {
        let [socks, schedule, counter, prog] = fds;
        Steering {
            socks,
            schedule,
            _counter: counter,
            _prog: prog,
            written: Vec::new(),
        }
    }

    /// Its maps and program, to hand over in an upgrade.
    pub fn fds(&self) -> [BorrowedFd<'_>; 4] {
        [
            self.socks.as_fd(),
            self.schedule.as_fd(),
            self._counter.as_fd(),
            self._prog.as_fd(),
        ]
    }

    /// Forgets what was written, so that the next schedule is written
    /// whole (another primary wrote meanwhile).
    pub fn forget_written(&mut self) {
        self.written.clear();
        self.written.push(u32::MAX);
    }

    /// Puts `slot`'s listening socket in the array.
    pub fn add_socket(&self, slot: usize, sock: BorrowedFd<'_>) -> io::Result<()> {
        let key = slot_key(slot)?;
        let value = raw(sock) as u64;
        sys::bpf_map_update(self.socks.as_fd(), &key.to_ne_bytes(), &value.to_ne_bytes())
            .map_err(|e| problem("cannot add a socket to the array", &e))
    }

    /// Takes `slot`'s socket out of the array (it is being closed).
    pub fn remove_socket(&self, slot: usize) {
        if let Ok(key) = slot_key(slot) {
            // Absent already (a closed socket leaves by itself): fine.
            let _ = sys::bpf_map_delete(self.socks.as_fd(), &key.to_ne_bytes());
        }
    }

    /// Writes `order` (slot indexes in turn) as the schedule if it differs
    /// from the one written: the entries first, then the length, so that a
    /// connection placed meanwhile reads a slot of one schedule or the
    /// other. Returns whether it wrote.
    pub fn set_schedule(&mut self, order: &[u32]) -> io::Result<bool> {
        if order == self.written.as_slice() {
            return Ok(false);
        }
        let order = &order[..order.len().min(MAX_SCHEDULE as usize)];
        let map = self.schedule.as_fd();
        for (at, &slot) in order.iter().enumerate() {
            let key = at as u32 + 1;
            if self.written.get(at) != Some(&slot) {
                sys::bpf_map_update(map, &key.to_ne_bytes(), &slot.to_ne_bytes())
                    .map_err(|e| problem("cannot write the schedule", &e))?;
            }
        }
        let len = order.len() as u32;
        sys::bpf_map_update(map, &0u32.to_ne_bytes(), &len.to_ne_bytes())
            .map_err(|e| problem("cannot write the schedule", &e))?;
        self.written.clear();
        self.written.extend_from_slice(order);
        Ok(true)
    }

    /// The schedule last written.
    pub fn written(&self) -> &[u32] {
        &self.written
    }
}

fn slot_key(slot: usize) -> io::Result<u32> {
    u32::try_from(slot)
        .ok()
        .filter(|&k| k < MAX_SLOTS)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--steer: at most {MAX_SLOTS} slots"),
            )
        })
}

/// An fd's number, as a map value or an instruction's immediate wants it.
fn raw(fd: BorrowedFd<'_>) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// One cycle of smooth weighted round-robin (nginx's) over `slots`
/// (slot index, weight ≥ 1), in ascending slot order: with equal weights
/// the slots in turn; with weights, each slot `weight` times, its turns
/// spread through the cycle. The same sequence the rr policy gives.
pub fn schedule(slots: &[(u32, u32)]) -> Vec<u32> {
    let total: u64 = slots.iter().map(|&(_, w)| u64::from(w.max(1))).sum();
    if slots.iter().all(|&(_, w)| w.max(1) == slots[0].1.max(1)) {
        return slots.iter().map(|&(s, _)| s).collect();
    }
    let total = total.min(u64::from(MAX_SCHEDULE)) as usize;
    let mut current = vec![0i64; slots.len()];
    let sum: i64 = slots.iter().map(|&(_, w)| i64::from(w.max(1))).sum();
    (0..total)
        .map(|_| {
            let mut best = 0;
            for (at, &(_, w)) in slots.iter().enumerate() {
                current[at] += i64::from(w.max(1));
                if current[at] > current[best] {
                    best = at;
                }
            }
            current[best] -= sum;
            slots[best].0
        })
        .collect()
}

/// An assembler for the few instructions the program needs: each is a
/// `struct bpf_insn` (opcode, registers, offset, immediate) as a `u64`.
mod asm {
    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R6: u8 = 6;
    pub const R7: u8 = 7;
    pub const R10: u8 = 10;

    /// Helper numbers (`enum bpf_func_id`).
    pub const MAP_LOOKUP_ELEM: i32 = 1;
    pub const SK_SELECT_REUSEPORT: i32 = 82;

    pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | u64::from(dst & 0xf) << 8
            | u64::from(src & 0xf) << 12
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    }
    /// `dst = src` (64-bit).
    pub fn mov(dst: u8, src: u8) -> u64 {
        insn(0xbf, dst, src, 0, 0)
    }
    /// `dst = imm` (64-bit).
    pub fn mov_imm(dst: u8, imm: i32) -> u64 {
        insn(0xb7, dst, 0, 0, imm)
    }
    /// `dst += imm` (64-bit).
    pub fn add_imm(dst: u8, imm: i32) -> u64 {
        insn(0x07, dst, 0, 0, imm)
    }
    /// `dst %= src` (64-bit, unsigned).
    pub fn modulo(dst: u8, src: u8) -> u64 {
        insn(0x9f, dst, src, 0, 0)
    }
    /// `*(u32 *)(dst + off) = imm`.
    pub fn store_w_imm(dst: u8, off: i16, imm: i32) -> u64 {
        insn(0x62, dst, 0, off, imm)
    }
    /// `*(u32 *)(dst + off) = src`.
    pub fn store_w(dst: u8, off: i16, src: u8) -> u64 {
        insn(0x63, dst, src, off, 0)
    }
    /// `dst = *(u32 *)(src + off)`.
    pub fn load_w(dst: u8, src: u8, off: i16) -> u64 {
        insn(0x61, dst, src, off, 0)
    }
    /// `src = atomic_fetch_add((u64 *)(dst + off), src)`.
    pub fn fetch_add_dw(dst: u8, off: i16, src: u8) -> u64 {
        // BPF_STX | BPF_ATOMIC | BPF_DW, imm = BPF_ADD | BPF_FETCH.
        insn(0xdb, dst, src, off, 0x01)
    }
    /// `dst = map` (a map fd the kernel turns into its address): two
    /// instructions.
    pub fn load_map(dst: u8, fd: i32) -> [u64; 2] {
        // BPF_LD | BPF_DW | BPF_IMM, src = BPF_PSEUDO_MAP_FD.
        [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
    }
    /// `if dst == imm goto +off`.
    pub fn jeq_imm(dst: u8, imm: i32, off: i16) -> u64 {
        insn(0x15, dst, 0, off, imm)
    }
    pub fn call(helper: i32) -> u64 {
        insn(0x85, 0, 0, 0, helper)
    }
    pub fn exit() -> u64 {
        insn(0x95, 0, 0, 0, 0)
    }
}

/// The program (see the module): on any miss it jumps to the end, which
/// returns `SK_PASS` (the kernel's hash decides).
fn program(socks: i32, schedule: i32, counter: i32) -> Vec<u64> {
    use asm::*;
    /// A jump to the end, patched once the end is known.
    const TO_END: u64 = u64::MAX;
    let mut p: Vec<u64> = Vec::new();
    // Look up `key` (a u32 stored at r10-4) in `map`; r0 = value or null.
    let lookup = |p: &mut Vec<u64>, map: i32| {
        p.extend([mov(R2, R10), add_imm(R2, -4)]);
        p.extend(load_map(R1, map));
        p.extend([call(MAP_LOOKUP_ELEM), TO_END]); // if r0 == 0: end
    };
    p.push(mov(R6, R1)); // r6 = ctx
    // r7 = schedule[0], the length; none: end.
    p.push(store_w_imm(R10, -4, 0));
    lookup(&mut p, schedule);
    p.extend([load_w(R7, R0, 0), jeq_imm(R7, 0, 0)]);
    let len_zero = p.len() - 1;
    // r1 = counter++ (atomically) % length + 1.
    p.push(store_w_imm(R10, -4, 0));
    lookup(&mut p, counter);
    p.extend([
        mov_imm(R1, 1),
        fetch_add_dw(R0, 0, R1),
        modulo(R1, R7),
        add_imm(R1, 1),
        store_w(R10, -4, R1),
    ]);
    // slot = schedule[r1]; stored at r10-8 as the socket array's key.
    lookup(&mut p, schedule);
    p.extend([load_w(R1, R0, 0), store_w(R10, -8, R1)]);
    // bpf_sk_select_reuseport(ctx, socks, &slot, 0); its result does not
    // matter: a slot with no socket leaves the choice to the kernel.
    p.push(mov(R1, R6));
    p.extend(load_map(R2, socks));
    p.extend([
        mov(R3, R10),
        add_imm(R3, -8),
        mov_imm(R4, 0),
        call(SK_SELECT_REUSEPORT),
    ]);
    let end = p.len();
    p.extend([mov_imm(R0, 1), exit()]); // SK_PASS
    for (at, insn) in p.iter_mut().enumerate().take(end) {
        let off = (end - at - 1) as i16;
        if at == len_zero {
            *insn = jeq_imm(R7, 0, off);
        } else if *insn == TO_END {
            *insn = jeq_imm(R0, 0, off);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_weights_schedule_is_the_slots_in_turn() {
        assert_eq!(schedule(&[(0, 1), (2, 1), (3, 1)]), [0, 2, 3]);
        assert_eq!(schedule(&[]), Vec::<u32>::new());
    }

    #[test]
    fn weights_give_their_shares_spread_as_the_policy_does() {
        use crate::primary::policy::{Candidate, Policy, RoundRobin};
        let slots = [(0u32, 5u32), (1, 1), (2, 1)];
        let sched = schedule(&slots);
        assert_eq!(sched, [0, 0, 1, 0, 2, 0, 0]);
        let cands: Vec<Candidate> = slots
            .iter()
            .map(|&(s, w)| Candidate {
                index: s as usize,
                in_flight: 0,
                weight: w,
            })
            .collect();
        let mut rr = RoundRobin::default();
        let policy: Vec<u32> = (0..7).map(|_| rr.pick(&cands) as u32).collect();
        assert_eq!(sched, policy);
        assert_eq!(schedule(&[(0, 3), (1, 1)]).len(), 4);
    }

    #[test]
    fn every_jump_lands_on_the_end_and_maps_are_two_words() {
        let p = program(7, 8, 9);
        let end = p.len() - 2;
        for (at, &i) in p.iter().enumerate() {
            if i & 0xff == 0x15 {
                let off = (i >> 16) as u16 as i16;
                assert_eq!(at as i64 + 1 + i64::from(off), end as i64, "at {at}");
            }
        }
        let maps = p.iter().filter(|&&i| i & 0xff == 0x18).count();
        assert_eq!(maps, 4);
        assert_eq!(p[end + 1], asm::exit());
    }
}
