//! Frame throughput: a server `Conn` decoding a buffer of many masked frames, and encoding the
//! same frames with `send`.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use wsedge::proto::frame::{OpCode, encode_frame};
use wsedge::proto::{Conn, Limits, MessageKind, Role};

/// Enough frames per iteration to amortise setup, capped at about 4 MiB of payload.
fn frame_count(size: usize) -> usize {
    ((4 << 20) / size).clamp(16, 10_000)
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for size in [20usize, 1024, 16 * 1024] {
        let count = frame_count(size);
        let payload = vec![b'a'; size];
        let mut wire = Vec::new();
        for i in 0..count {
            let kind = if i % 2 == 0 {
                OpCode::Binary
            } else {
                OpCode::Text
            };
            encode_frame(true, kind, &payload, Some([1, 2, 3, 4]), &mut wire);
        }
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new("server", size), &size, |b, _| {
            b.iter(|| {
                let mut conn = Conn::new(Role::Server, Limits::default());
                let mut buf = BytesMut::from(&wire[..]);
                conn.handle_input(&mut buf).expect("valid frames");
                let mut n = 0;
                while let Some(ev) = conn.poll_event() {
                    black_box(ev);
                    n += 1;
                }
                assert_eq!(n, count);
            })
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [20usize, 1024, 16 * 1024] {
        let count = frame_count(size);
        let payload = vec![b'a'; size];
        group.throughput(Throughput::Bytes((count * size) as u64));
        for role in [Role::Server, Role::Client] {
            let name = if role == Role::Server {
                "server"
            } else {
                "client"
            };
            let mut conn = Conn::new(role, Limits::default());
            let mut out = Vec::new();
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| {
                b.iter(|| {
                    for _ in 0..count {
                        conn.send(MessageKind::Binary, black_box(&payload))
                            .expect("open");
                    }
                    out.clear();
                    conn.poll_transmit(&mut out);
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_decode, bench_encode);
criterion_main!(benches);
