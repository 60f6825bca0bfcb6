//! Every raw system call of the crate, and so every `unsafe` block.
//!
//! Each function turns a `-1` into an [`io::Error`] and wraps each new fd in
//! an [`OwnedFd`] in the same statement that receives it, before anything
//! else can fail. Fds are created close-on-exec; the only fd deliberately
//! inherited (a worker's end of its channel) has the flag cleared in the
//! child alone, after `fork` and before `exec`.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Turns the `-1` of a libc call into the thread's `errno`.
fn cvt<T: PartialEq + From<i8>>(res: T) -> io::Result<T> {
    if res == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(res)
    }
}

/// Room for the control message of [`crate::protocol::MAX_FDS`] fds:
/// `CMSG_SPACE(64 * 4)` is 272 bytes on 64-bit Linux; aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 512]);

/// Creates a connected `AF_UNIX`/`SOCK_SEQPACKET` pair, both ends
/// close-on-exec and blocking. Corresponds to `socketpair(2)`.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    unix_pair(libc::SOCK_SEQPACKET)
}

/// A connected pair of `AF_UNIX` `SOCK_STREAM` sockets, close-on-exec and
/// blocking: the channel Node's `child_process` speaks (`NODE_CHANNEL_FD`).
/// Corresponds to `socketpair(2)`.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    unix_pair(libc::SOCK_STREAM)
}

fn unix_pair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets or clears `O_NONBLOCK` on `fd`'s open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a borrowed, open fd reads flags only.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: F_SETFL with file status flags on a borrowed, open fd.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD with a valid flag on a borrowed, open fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flag) })?;
    Ok(())
}

/// Sets `TCP_DEFER_ACCEPT` on a listening socket: a connection is
/// accepted only once its first data arrives (or, with none, about
/// `seconds` later). 0 turns it off.
pub fn set_tcp_defer_accept(fd: BorrowedFd<'_>, seconds: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&value`,
    // a live c_int, on a borrowed, open fd.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Reports whether `FD_CLOEXEC` is set on `fd`.
pub fn is_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFD on a borrowed, open fd reads flags only.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// Sends one datagram with `fds` attached as `SCM_RIGHTS`. With `dontwait`
/// a full socket buffer is `WouldBlock` instead of a wait. `MSG_NOSIGNAL`
/// always: a peer that is gone is `EPIPE`, never `SIGPIPE`.
/// Corresponds to `sendmsg(2)`.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    dontwait: bool,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cmsg = CmsgBuf([0; 512]);
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = mem::size_of_val(fds) as libc::c_uint;
        // SAFETY: CMSG_SPACE is pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        if space > cmsg.0.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
        }
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` zeroed, aligned bytes, so the
        // first header exists and its data has room for `fds`; BorrowedFd is
        // repr(transparent) over a RawFd.
        unsafe {
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(hdr),
                payload as usize,
            );
        }
    }
    let flags = libc::MSG_NOSIGNAL | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg and everything it points to live across the call.
    let n = cvt(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags) })?;
    Ok(n as usize)
}

/// What [`recv_with_fds`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes of the datagram; 0 with no fds means the peer closed.
    pub len: usize,
    /// The datagram or its fds did not fit (`MSG_TRUNC`/`MSG_CTRUNC`).
    pub truncated: bool,
    /// Of that, only fds were cut (`MSG_CTRUNC` without `MSG_TRUNC`): the
    /// datagram is whole, but the fds that came are fewer than were sent,
    /// because this process had no room for the rest (its fd limit) or
    /// more were sent than the receive buffer allows.
    pub fds_cut: bool,
}

/// Receives one datagram into `buf`, pushing any fds that came with it onto
/// `fds` as owned, close-on-exec fds (`MSG_CMSG_CLOEXEC`). With `dontwait`
/// an empty socket is `WouldBlock`. Corresponds to `recvmsg(2)`.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    dontwait: bool,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 512]);
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    let flags = libc::MSG_CMSG_CLOEXEC | if dontwait { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg points at live buffers of the lengths it states.
    let n = cvt(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) })? as usize;
    // SAFETY: after a successful recvmsg the kernel has written well-formed
    // control headers within msg_controllen; CMSG_* walk only those. Each fd
    // in an SCM_RIGHTS payload is new in this process and owned by nobody,
    // so it is wrapped at once.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(hdr);
                let bytes = (*hdr).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / mem::size_of::<RawFd>() {
                    let raw = data
                        .add(i * mem::size_of::<RawFd>())
                        .cast::<RawFd>()
                        .read_unaligned();
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    Ok(Received {
        len: n,
        truncated: msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
        fds_cut: msg.msg_flags & libc::MSG_CTRUNC != 0 && msg.msg_flags & libc::MSG_TRUNC == 0,
    })
}

/// The lowest fd number free in this process now: the number the next new
/// fd would get. Found by duplicating `fd` to the lowest free number and
/// closing the copy (`fcntl(2)` `F_DUPFD_CLOEXEC`); `EMFILE` when none is.
pub fn lowest_free_fd(fd: BorrowedFd<'_>) -> io::Result<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed, open fd makes a new fd.
    let copy = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `copy` was just made and is owned by nobody else.
    drop(unsafe { OwnedFd::from_raw_fd(copy) });
    Ok(copy)
}

/// The soft limit on this process's open fds (`RLIMIT_NOFILE`).
pub fn fd_limit() -> io::Result<u64> {
    // SAFETY: an all-zero rlimit is a valid value for getrlimit to fill.
    let mut limit: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit into `limit`.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    Ok(limit.rlim_cur)
}

/// The fd at which a worker in a kernel-balancing mode finds its
/// listening socket (`SD_LISTEN_FDS_START` of systemd's socket activation).
pub const LISTEN_FD: RawFd = 3;

/// Prepares `cmd` so that its child, between `fork` and `exec`:
/// - is killed with `SIGKILL` when the primary's spawning thread dies
///   (`PR_SET_PDEATHSIG`), and exits at once if the primary died before the
///   request took effect;
/// - inherits stdio, `channel` and `listen` (if any) and nothing else: every
///   other fd, also one the primary itself inherited without close-on-exec,
///   is marked close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`, or one
///   `fcntl` per fd on kernels before 5.11);
/// - with `listen`, finds it at fd 3 ([`LISTEN_FD`], as socket activation
///   wants) and the channel at fd 4.
///
/// Returns the fd number the child will see its channel at.
pub fn configure_worker_command(cmd: &mut Command, channel: RawFd, listen: Option<RawFd>) -> RawFd {
    // SAFETY: getpid is always safe.
    let parent = unsafe { libc::getpid() };
    let child_channel = if listen.is_some() {
        LISTEN_FD + 1
    } else {
        channel
    };
    let setup = move || -> io::Result<()> {
        // SAFETY: prctl, getppid, close_range, getrlimit, fcntl, dup2 and
        // close are async-signal-safe, allocate nothing and touch only this
        // child's own state; `limit` is a valid rlimit to fill.
        unsafe {
            cvt(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            let flags = libc::CLOSE_RANGE_CLOEXEC as libc::c_int;
            if libc::close_range(3, libc::c_uint::MAX, flags) != 0 {
                let mut limit: libc::rlimit = mem::zeroed();
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                let top = limit.rlim_cur.min(1 << 20) as RawFd;
                for fd in 3..top {
                    // EBADF for fds that are not open is expected.
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            match listen {
                None => {
                    cvt(libc::fcntl(channel, libc::F_SETFD, 0))?;
                }
                Some(listen) => {
                    // Move both out of the way first: either may sit at 3 or 4.
                    let l = cvt(libc::fcntl(listen, libc::F_DUPFD_CLOEXEC, 10))?;
                    let c = cvt(libc::fcntl(channel, libc::F_DUPFD_CLOEXEC, 10))?;
                    // dup2 leaves the new fds without close-on-exec.
                    cvt(libc::dup2(l, LISTEN_FD))?;
                    cvt(libc::dup2(c, LISTEN_FD + 1))?;
                }
            }
        }
        Ok(())
    };
    // SAFETY: the closure above is async-signal-safe (see its own SAFETY).
    unsafe {
        cmd.pre_exec(setup);
    }
    child_channel
}

/// Reads an integer socket option.
fn sockopt_int(raw: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`; a bad fd
    // is an error (EBADF/ENOTSOCK), not undefined behaviour.
    cvt(unsafe {
        libc::getsockopt(
            raw,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Takes ownership of an inherited listening TCP socket (socket
/// activation's fd 3), after checking that it is one. The caller makes sure
/// this happens at most once per fd.
pub fn take_inherited_listener(raw: RawFd) -> io::Result<OwnedFd> {
    let kind = sockopt_int(raw, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let listening = sockopt_int(raw, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)?;
    if kind != libc::SOCK_STREAM || listening == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw} is not a listening stream socket"),
        ));
    }
    // SAFETY: the fd is open (getsockopt succeeded), it was inherited for
    // this process to own, and the caller takes it only once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Whether `fd` has data (or a connection, or a hang-up) to read, waiting
/// at most `timeout` (`None`: forever). Corresponds to `poll(2)`.
pub fn wait_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<std::time::Duration>,
) -> io::Result<()> {
    let mut polls = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let n = fds.len().min(polls.len());
    for (p, fd) in polls.iter_mut().zip(fds) {
        p.fd = fd.as_raw_fd();
        p.events = libc::POLLIN;
    }
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: `polls` holds `n` initialised pollfd entries for the call.
    match cvt(unsafe { libc::poll(polls.as_mut_ptr(), n as libc::nfds_t, ms) }) {
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        other => other.map(drop),
    }
}

/// Takes ownership of an inherited fd named by the environment, after
/// checking that it is open and a `SOCK_SEQPACKET` socket. The caller makes
/// sure this happens at most once per fd.
pub fn take_inherited_seqpacket(raw: RawFd) -> io::Result<OwnedFd> {
    if sockopt_int(raw, libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_SEQPACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw} is not a SOCK_SEQPACKET socket"),
        ));
    }
    // SAFETY: the fd is open (getsockopt succeeded), it was inherited for
    // this process to own, and the caller takes it only once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Registers `fd` for `interest` with the current tokio runtime's reactor,
/// which then owns it. Corresponds to `epoll_ctl(2)` with `EPOLL_CTL_ADD`.
///
/// # Panics
/// Outside a tokio runtime with I/O enabled.
#[cfg(feature = "tokio")]
pub fn async_fd(
    fd: OwnedFd,
    interest: ::tokio::io::Interest,
) -> io::Result<::tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `AsyncFd` owns the `OwnedFd`, so the fd stays open, and
    // `as_raw_fd` gives that same fd, for as long as the `AsyncFd` lives.
    unsafe { ::tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(io::Error::from)
}

/// The most process groups a guardian ([`spawn_guardian`]) tracks at once.
pub const GUARDIAN_GROUPS: usize = 8192;

/// Forks the guardian: a process that reads 4-byte records from a pipe
/// (native-endian `i32`: `+pgid` to watch a process group, `-pgid` to
/// forget it) and, when the pipe reaches end of file, that is when every
/// copy of its write end is closed (the primary exited, or was killed,
/// even with `SIGKILL`), sends `SIGKILL` to every group it still watches
/// and exits. It runs in a process group of its own, with every signal
/// blocked and every fd but the pipe closed, so that nothing but the end
/// of the pipe (or `SIGKILL`) ends it, and it holds no socket of the
/// primary's open.
///
/// When it ends it also removes the file `remove` and then the directory
/// `remove_dir`, if given: what the primary would have removed.
///
/// Returns the write end (close-on-exec, non-blocking) and the guardian's
/// pid; the caller reaps it.
pub fn spawn_guardian(
    remove: Option<&std::ffi::CStr>,
    remove_dir: Option<&std::ffi::CStr>,
) -> io::Result<(OwnedFd, libc::pid_t)> {
    let remove = remove.map_or(std::ptr::null(), |p| p.as_ptr());
    let remove_dir = remove_dir.map_or(std::ptr::null(), |p| p.as_ptr());
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child runs `guardian_main` only, which makes
    // async-signal-safe calls only (no allocation, no lock) and never
    // returns, as a child of a multi-threaded process must.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        // SAFETY: this is the freshly forked child; the paths are C strings
        // of the parent's, copied with its memory, or null.
        unsafe { guardian_main(read.as_raw_fd(), remove, remove_dir) }
    }
    drop(read);
    set_nonblocking(write.as_fd(), true)?;
    Ok((write, pid))
}

/// The guardian's whole life (see [`spawn_guardian`]).
///
/// # Safety
/// Only in a child just forked by [`spawn_guardian`]: it closes every other
/// fd of the process and exits it. `remove` and `remove_dir` are null or
/// NUL-terminated paths.
unsafe fn guardian_main(
    pipe: RawFd,
    remove: *const libc::c_char,
    remove_dir: *const libc::c_char,
) -> ! {
    const PIPE: RawFd = 3;
    // SAFETY: setpgid, sigfillset, sigprocmask, prctl, dup2, close_range,
    // close, getrlimit, read, kill, unlink, rmdir and _exit are
    // async-signal-safe; every pointer passed points at a live local of
    // the right type and size, or at the caller's paths.
    unsafe {
        libc::setpgid(0, 0);
        let mut all: libc::sigset_t = mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        libc::prctl(
            libc::PR_SET_NAME,
            c"distributor-gd".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        if pipe != PIPE && libc::dup2(pipe, PIPE) != PIPE {
            libc::_exit(1);
        }
        libc::close_range(0, (PIPE - 1) as libc::c_uint, 0);
        if libc::close_range((PIPE + 1) as libc::c_uint, libc::c_uint::MAX, 0) != 0 {
            let mut limit: libc::rlimit = mem::zeroed();
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            let top = limit.rlim_cur.min(1 << 20) as RawFd;
            for fd in (0..PIPE).chain(PIPE + 1..top) {
                libc::close(fd);
            }
        }
        let mut groups = [0 as libc::pid_t; GUARDIAN_GROUPS];
        let mut buf = [0u8; 4096];
        let mut have = 0usize;
        loop {
            let n = libc::read(PIPE, buf[have..].as_mut_ptr().cast(), buf.len() - have);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            have += n as usize;
            let whole = have - have % 4;
            for record in buf[..whole].chunks_exact(4) {
                let v = libc::pid_t::from_ne_bytes([record[0], record[1], record[2], record[3]]);
                if v > 0 {
                    // Beyond GUARDIAN_GROUPS at once, a group goes unwatched.
                    if let Some(free) = groups.iter_mut().find(|g| **g == 0) {
                        *free = v;
                    }
                } else if v < 0 {
                    if let Some(g) = groups.iter_mut().find(|g| **g == -v) {
                        *g = 0;
                    }
                }
            }
            buf.copy_within(whole..have, 0);
            have -= whole;
        }
        for &g in groups.iter().filter(|g| **g > 0) {
            libc::kill(-g, libc::SIGKILL);
        }
        // Gone already after a graceful stop (ENOENT): fine.
        if !remove.is_null() {
            libc::unlink(remove);
        }
        if !remove_dir.is_null() {
            libc::rmdir(remove_dir);
        }
        libc::_exit(0)
    }
}

/// Names the calling thread, which for a single-threaded process is the
/// process's name in `top` and `ps -e` (`prctl(PR_SET_NAME)`; 15 bytes at
/// most, longer names are cut).
pub fn set_process_name(name: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from a live pointer.
    cvt(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) })
        .map(drop)
}

/// Makes this process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`): no core
/// dump, and no process without `CAP_SYS_PTRACE` may attach to it, read
/// its memory or take its fds (`pidfd_getfd(2)`), even one of its own
/// user. Its workers are not affected (`execve` resets it).
pub fn set_non_dumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE with 0 changes only this process's flag.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(drop)
}

/// Writes all of `bytes` to a pipe or socket in one `write(2)`, which for
/// at most `PIPE_BUF` bytes on a pipe is atomic: all or nothing.
pub fn write_all_once(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `bytes` is a live buffer of the length given.
    let n = cvt(unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) })?;
    if n as usize == bytes.len() {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::WriteZero, "short write"))
    }
}

/// `bpf(2)`'s commands used here (`linux/bpf.h`).
mod bpf_cmd {
    pub const MAP_CREATE: libc::c_int = 0;
    pub const MAP_UPDATE_ELEM: libc::c_int = 2;
    pub const MAP_DELETE_ELEM: libc::c_int = 3;
    pub const PROG_LOAD: libc::c_int = 5;
}

/// `SO_ATTACH_REUSEPORT_EBPF` (`asm-generic/socket.h`).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for the `BPF_MAP_*_ELEM` commands.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Calls `bpf(2)` with `attr` (a `repr(C)` prefix of `union bpf_attr`).
///
/// # Safety
///
/// Every pointer `attr` holds must be valid for what `cmd` does with it
/// (reads of the stated lengths, or writes to a log buffer of its size).
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for the pointers inside `attr`; `attr`
    // itself lives across the call and its size is stated.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            mem::size_of::<T>() as libc::c_uint,
        )
    })
}

/// Creates a BPF map (`BPF_MAP_CREATE`); its fd is close-on-exec.
pub fn bpf_map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: the attribute holds no pointers; a new fd is wrapped at once.
    unsafe {
        let fd = bpf(bpf_cmd::MAP_CREATE, &mut attr)?;
        Ok(OwnedFd::from_raw_fd(fd as RawFd))
    }
}

/// Sets `key` to `value` in `map` (`BPF_MAP_UPDATE_ELEM`, `BPF_ANY`). The
/// slices must be the map's key and value sizes: the kernel reads that many.
pub fn bpf_map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: key and value point at live slices; the kernel reads the
    // map's key and value sizes from them, which the caller passes whole
    // (a shorter slice is refused by the map's checks: EFAULT at worst,
    // never a write).
    unsafe { bpf(bpf_cmd::MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// Removes `key` from `map` (`BPF_MAP_DELETE_ELEM`).
pub fn bpf_map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: key points at a live slice the kernel only reads.
    unsafe { bpf(bpf_cmd::MAP_DELETE_ELEM, &mut attr) }.map(drop)
}

/// Loads a BPF program (`BPF_PROG_LOAD`) of `prog_type` from `insns`
/// (encoded `struct bpf_insn`s); its fd is close-on-exec. On refusal the
/// error carries the verifier's log.
pub fn bpf_prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
) -> Result<OwnedFd, (io::Error, String)> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    attr.prog_name[..8].copy_from_slice(b"dist_rr\0");
    // SAFETY: insns, license and log live across the call with the lengths
    // stated; the kernel writes at most log_size bytes into log. A new fd
    // is wrapped at once.
    match unsafe { bpf(bpf_cmd::PROG_LOAD, &mut attr) } {
        // SAFETY: the fd was just created and is owned by nobody else.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err((e, String::from_utf8_lossy(&log[..end]).into_owned()))
        }
    }
}

/// Attaches BPF program `prog` to the `SO_REUSEPORT` group of `sock` (a
/// listening socket), as `setsockopt(SO_ATTACH_REUSEPORT_EBPF)`.
pub fn attach_reuseport_prog(sock: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from `fd`, a live
    // local.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            (&fd as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The most fds [`configure_inherit`] hands on.
pub const MAX_INHERITED: usize = 64;

/// Sets up `cmd` so that its child inherits `fds` at 3, 4, ... in order
/// (without close-on-exec) and no other fd above 2, and starts in a
/// process group of its own. Fails with `InvalidInput` for more than
/// [`MAX_INHERITED`] fds.
pub fn configure_inherit(cmd: &mut Command, fds: Vec<RawFd>) -> io::Result<()> {
    if fds.len() > MAX_INHERITED {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds to inherit",
        ));
    }
    cmd.process_group(0);
    let setup = move || -> io::Result<()> {
        let mut moved = [0 as RawFd; MAX_INHERITED];
        let first = LISTEN_FD;
        let above = first + MAX_INHERITED as RawFd + 1;
        // SAFETY: close_range, fcntl and dup2 are async-signal-safe and
        // touch only this child's own fds; `fds` was built before the fork
        // and is only read.
        unsafe {
            // Out of the way first: one may sit where another must go.
            for (at, &fd) in fds.iter().enumerate() {
                moved[at] = cvt(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above))?;
            }
            let flags = libc::CLOSE_RANGE_CLOEXEC as libc::c_int;
            if libc::close_range(3, libc::c_uint::MAX, flags) != 0 {
                for fd in 3..above + MAX_INHERITED as RawFd {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            for (at, &fd) in moved[..fds.len()].iter().enumerate() {
                // dup2 leaves the new fd without close-on-exec.
                cvt(libc::dup2(fd, first + at as RawFd))?;
            }
        }
        Ok(())
    };
    // SAFETY: the closure above is async-signal-safe (see its own SAFETY).
    unsafe {
        cmd.pre_exec(setup);
    }
    Ok(())
}

/// Takes ownership of inherited fd `raw`, after checking that it is open,
/// and sets close-on-exec on it. The caller makes sure this happens at
/// most once per fd.
pub fn take_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD on any number only reads; EBADF if it is not open.
    cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    // SAFETY: it is open, and the caller vouches that nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(fd.as_fd(), true)?;
    Ok(fd)
}

/// Copies what waits on socket `fd` into `buf` without consuming it
/// (`recv(2)` with `MSG_PEEK | MSG_DONTWAIT`): `WouldBlock` when nothing
/// has come yet, `Ok(0)` at end of file.
pub fn recv_peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is live and writable for its length; the kernel writes
    // at most that many bytes.
    let n = cvt(unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    })?;
    Ok(n as usize)
}
