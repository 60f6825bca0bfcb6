//! Micro-benchmarks of the dispatch path: handing fds over a channel (the
//! primary's `sendmsg` with `SCM_RIGHTS` and the worker's `recvmsg`, then
//! the close of the received copies), one per message and 16 in one
//! message as a burst goes, and the policy's pick.

use std::hint::black_box;
use std::net::TcpListener;
use std::os::fd::AsFd;

use criterion::{Criterion, criterion_group, criterion_main};
use distributor::__private::{recv_with_fds, send_with_fds, seqpacket_pair};
use distributor::primary::policy::round_robin;
use distributor::protocol::{Encoder, MAX_MESSAGE};

fn channel(c: &mut Criterion) {
    let (primary, worker) = seqpacket_pair().expect("socketpair");
    // Any fd will do to measure the hand-over; a listening socket is one.
    let conn = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut enc = Encoder::default();
    enc.connection()
        .entry(1, "127.0.0.1:40000".parse().unwrap());
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::with_capacity(64);
    c.bench_function("channel: send one fd, receive it, close it", |b| {
        b.iter(|| {
            send_with_fds(primary.as_fd(), enc.as_bytes(), &[conn.as_fd()], true).unwrap();
            let got = recv_with_fds(worker.as_fd(), &mut buf, &mut fds, true).unwrap();
            black_box(got);
            fds.clear();
        })
    });
    // A burst: 16 connections in one message (divide by 16 for the cost
    // of one).
    let many: Vec<TcpListener> = (0..16)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let borrowed: Vec<_> = many.iter().map(|l| l.as_fd()).collect();
    enc.connection();
    for id in 0..16 {
        enc.entry(id, "127.0.0.1:40000".parse().unwrap());
    }
    c.bench_function("channel: send 16 fds in one message, receive, close", |b| {
        b.iter(|| {
            send_with_fds(primary.as_fd(), enc.as_bytes(), &borrowed, true).unwrap();
            let got = recv_with_fds(worker.as_fd(), &mut buf, &mut fds, true).unwrap();
            black_box(got);
            fds.clear();
        })
    });
}

fn policy(c: &mut Criterion) {
    for n in [8usize, 64] {
        let busy: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
        let mut cursor = 0;
        c.bench_function(&format!("policy: round-robin pick of {n} workers"), |b| {
            b.iter(|| {
                let (i, ()) = round_robin(cursor, n, |i| (!busy[i]).then_some(())).unwrap();
                cursor = (i + 1) % n;
                black_box(i)
            })
        });
    }
}

criterion_group!(benches, channel, policy);
criterion_main!(benches);
