//! criterion: one packet (headers + payload slices) to N loopback
//! connections per iteration, by writev-per-connection and by ringmover on
//! each backend. `ringmover bench gather` is the fuller, table-printing
//! version with CPU-seconds per GB.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringmover::outbox::{Framing, Outbox};
use ringmover::{Backend, BackendChoice, Mover};

/// SRS-like small packet: 512 B payload in 128 B pieces, 12 B headers.
fn packet() -> Vec<Bytes> {
    let payload = Bytes::from(vec![0x5Au8; 512]);
    (0..4)
        .flat_map(|i| {
            [
                Bytes::from(vec![i as u8; 12]),
                payload.slice(i * 128..(i + 1) * 128),
            ]
        })
        .collect()
}

/// `n` connected pairs; a drain thread per peer discards what arrives.
fn connections(n: usize) -> Vec<TcpStream> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    (0..n)
        .map(|_| {
            let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut peer, _) = l.accept().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while matches!(peer.read(&mut buf), Ok(n) if n > 0) {}
            });
            s
        })
        .collect()
}

fn gather(c: &mut Criterion) {
    let pkt = packet();
    let bytes: usize = pkt.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("gather-small");
    for conns in [1usize, 64] {
        group.throughput(Throughput::Bytes((bytes * conns) as u64));
        let socks = connections(conns);
        group.bench_with_input(BenchmarkId::new("writev", conns), &conns, |b, _| {
            let mut outbox = Outbox::new(Framing::Stream);
            b.iter(|| {
                for s in &socks {
                    outbox.push(pkt.iter().cloned(), None);
                    ringmover::write_to(s.as_fd(), &mut outbox).unwrap();
                }
            })
        });
        drop(socks);
        for backend in Backend::compiled() {
            let mut mover = Mover::builder()
                .backend(BackendChoice::Force(backend))
                .build()
                .unwrap();
            let handles: Vec<_> = connections(conns)
                .into_iter()
                .map(|s| mover.attach(s).unwrap())
                .collect();
            let mut done = Vec::new();
            group.bench_with_input(
                BenchmarkId::new(format!("ringmover-{backend}"), conns),
                &conns,
                |b, _| {
                    b.iter(|| {
                        for &h in &handles {
                            mover.send(h, pkt.iter().cloned()).unwrap();
                        }
                        mover.flush_and_wait(&mut done).unwrap();
                        done.clear();
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, gather);
criterion_main!(benches);
