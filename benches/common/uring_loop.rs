//! The plain loop over io_uring: the `uring-loop` contender of `cargo bench
//! --bench perf`, to weigh io_uring as a lever for the primary.
//!
//! The same work as the plain loop (accept every connection, send it to the
//! next worker in turn as one CONNECTION message with its fd, close the
//! copy at once; no ledger, no policy, no supervision), but the accepts,
//! the sends and the closes go through one ring: a multishot accept on the
//! listener, and for each connection a `sendmsg` hard-linked to the
//! `close` of the copy, submitted together with the wait for the next
//! completions (`IORING_SETUP_DEFER_TASKRUN`: completions are reaped only
//! when the loop asks). What the workers send (HELLO, ACK) is read as the
//! plain loop reads it (`drain_channel`, `recv` until `WouldBlock`), on a
//! multishot poll per channel. Connection entries carry no peer address (a multishot
//! accept returns none); the demo worker does not use it.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use distributor::protocol::{Encoder, MAX_MESSAGE};
use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// `user_data` of the multishot accept.
const ACCEPT: u64 = u64::MAX;
/// `user_data` of a close (its completion needs nothing).
const CLOSE: u64 = u64::MAX - 1;
/// `user_data` of the poll of the stop fd.
const STOP: u64 = u64::MAX - 2;
/// `user_data` of worker `i`'s poll: `POLL | i`.
const POLL: u64 = 1 << 62;
/// The most sends in flight at once (each holds a slot).
const SLOTS: usize = 512;
/// Submission and completion queue sizes.
const ENTRIES: u32 = 1024;

/// One `sendmsg` in flight: the message, its one fd, and what points at
/// them. Boxed so that the pointers stay valid while the kernel reads them.
struct Slot {
    msg: libc::msghdr,
    iov: libc::iovec,
    /// `CMSG_SPACE(sizeof(int))` bytes, aligned for `cmsghdr`.
    cmsg: [u64; 4],
    payload: [u8; 64],
}

/// Runs until `stop` is readable (a signal handler writes to it).
/// `channels`: the primary's ends of the workers' channels, in worker
/// order.
pub fn run(
    listener: &TcpListener,
    channels: &[OwnedFd],
    stop: RawFd,
    port: u16,
) -> Result<(), String> {
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES)
        .map_err(|e| format!("io_uring: {e}"))?;
    let mut slots: Vec<Box<Slot>> = (0..SLOTS).map(|_| new_slot()).collect();
    let mut free: Vec<usize> = (0..SLOTS).rev().collect();
    let mut enc = Encoder::default();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    let (mut next, mut id, mut hellos) = (0usize, 0u64, 0usize);
    // Accepted connections waiting for a free slot (never, unless the
    // workers stop reading).
    let mut waiting: Vec<RawFd> = Vec::new();
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ACCEPT);
    push(&mut ring, &accept)?;
    for (i, c) in channels.iter().enumerate() {
        push(&mut ring, &poll_channel(c.as_raw_fd(), i))?;
    }
    let stop_poll = opcode::PollAdd::new(types::Fd(stop), libc::POLLIN as u32)
        .build()
        .user_data(STOP);
    push(&mut ring, &stop_poll)?;
    let mut completions = Vec::with_capacity(ENTRIES as usize);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
        completions.clear();
        completions.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(data, result, flags) in &completions {
            match data {
                ACCEPT => {
                    if result >= 0 {
                        waiting.push(result);
                    } else if result != -libc::EAGAIN && result != -libc::ECONNABORTED {
                        return Err(format!("accept: {}", io::Error::from_raw_os_error(-result)));
                    }
                    if !cqueue::more(flags) {
                        push(&mut ring, &accept)?;
                    }
                }
                CLOSE => {}
                STOP => return Ok(()),
                d if d & POLL != 0 => {
                    let i = (d & !POLL) as usize;
                    let channel = &channels[i];
                    super::drain_channel(
                        std::os::fd::AsFd::as_fd(channel),
                        &mut buf,
                        &mut fds,
                        &mut hellos,
                        channels.len(),
                        port,
                    )?;
                    if !cqueue::more(flags) {
                        push(&mut ring, &poll_channel(channel.as_raw_fd(), i))?;
                    }
                }
                slot => {
                    // A send finished (its close follows by the hard link).
                    if result < 0 {
                        return Err(format!("send: {}", io::Error::from_raw_os_error(-result)));
                    }
                    free.push(slot as usize);
                }
            }
        }
        while let Some(&fd) = waiting.last() {
            let Some(k) = free.pop() else {
                break;
            };
            waiting.pop();
            id += 1;
            enc.connection()
                .entry(id, SocketAddr::from(([127, 0, 0, 1], 0)));
            let channel = channels[next].as_raw_fd();
            next = (next + 1) % channels.len();
            let slot = &mut slots[k];
            let bytes = enc.as_bytes();
            slot.payload[..bytes.len()].copy_from_slice(bytes);
            slot.iov.iov_len = bytes.len();
            fill_slot(slot, fd);
            let send = opcode::SendMsg::new(types::Fd(channel), &slot.msg)
                .build()
                .flags(squeue::Flags::IO_HARDLINK)
                .user_data(k as u64);
            let close = opcode::Close::new(types::Fd(fd)).build().user_data(CLOSE);
            push(&mut ring, &send)?;
            push(&mut ring, &close)?;
        }
    }
}

fn poll_channel(fd: RawFd, i: usize) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(POLL | i as u64)
}

/// Queues `entry`, submitting what is queued first when the ring is full.
fn push(ring: &mut IoUring, entry: &squeue::Entry) -> Result<(), String> {
    loop {
        // SAFETY: every buffer an entry points at (a slot's message, iovec,
        // control data and payload) is boxed in `slots`, which outlives the
        // ring's use of it: a slot is reused only after its send completed.
        let pushed = unsafe { ring.submission().push(entry) };
        if pushed.is_ok() {
            return Ok(());
        }
        ring.submit().map_err(|e| format!("io_uring_enter: {e}"))?;
    }
}

fn new_slot() -> Box<Slot> {
    // SAFETY: `msghdr` and `iovec` are plain C structs for which all-zero
    // bytes are a valid value.
    let (msg, iov) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    Box::new(Slot {
        msg,
        iov,
        cmsg: [0; 4],
        payload: [0; 64],
    })
}

/// Points the slot's message at its payload and at `fd` as `SCM_RIGHTS`.
fn fill_slot(slot: &mut Slot, fd: RawFd) {
    slot.iov.iov_base = slot.payload.as_mut_ptr().cast();
    slot.msg.msg_iov = &mut slot.iov;
    slot.msg.msg_iovlen = 1;
    slot.msg.msg_control = slot.cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    slot.msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    // SAFETY: `msg_control` points at `cmsg`, 32 bytes aligned for
    // `cmsghdr`, at least CMSG_SPACE(4); CMSG_FIRSTHDR is therefore that
    // buffer and CMSG_DATA lies inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&slot.msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
}
