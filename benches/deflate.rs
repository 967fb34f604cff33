//! permessage-deflate on the hot path, beside the uncompressed path as baseline: sending a
//! message (`Conn::send_compressed` with a shard's `Compressor` vs `Conn::send`) and
//! receiving one (a server `Conn` inflating a compressed frame vs decoding the plain frame).
//! Payloads are JSON trade arrays, what market-data fan-out sends.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use wsedge::proto::frame::{OpCode, encode_compressed_frame, encode_frame};
use wsedge::proto::{Compressor, Conn, DeflateParams, Limits, MessageKind, Role};

fn ticks(n: usize) -> Vec<u8> {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"symbol\":\"{}\",\"price\":{:.2},\"size\":{:.4},\"ts\":{}}},",
            ["BTC-USD", "ETH-USD", "SOL-USD"][(i % 3) as usize],
            43_000.0 + ((i * 7919) % 1000) as f64 / 7.0,
            ((i * 31) % 997) as f64 / 1000.0,
            1_700_000_000_123u64 + i * 17
        ));
        i += 1;
    }
    s.truncate(n - 1);
    s.push(']');
    s.into_bytes()
}

fn params() -> DeflateParams {
    DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        ..DeflateParams::default()
    }
}

fn bench_send(c: &mut Criterion) {
    let mut group = c.benchmark_group("deflate_send");
    for size in [512usize, 2048, 16 * 1024] {
        let payload = ticks(size);
        group.throughput(Throughput::Bytes(size as u64));
        let mut z = Compressor::default();
        group.bench_with_input(BenchmarkId::new("compressed", size), &size, |b, _| {
            let mut conn = Conn::new(Role::Server, Limits::default());
            conn.set_deflate(&params(), 0);
            let mut out = Vec::new();
            b.iter(|| {
                assert!(
                    conn.send_compressed(MessageKind::Text, &payload, &mut z)
                        .unwrap()
                );
                out.clear();
                conn.poll_transmit(&mut out);
                black_box(&out);
            })
        });
        group.bench_with_input(BenchmarkId::new("plain", size), &size, |b, _| {
            let mut conn = Conn::new(Role::Server, Limits::default());
            let mut out = Vec::new();
            b.iter(|| {
                conn.send(MessageKind::Text, &payload).unwrap();
                out.clear();
                conn.poll_transmit(&mut out);
                black_box(&out);
            })
        });
    }
    group.finish();
}

fn bench_receive(c: &mut Criterion) {
    let mut group = c.benchmark_group("deflate_receive");
    for size in [512usize, 2048, 16 * 1024] {
        let payload = ticks(size);
        let mut z = Compressor::default();
        let compressed = z.compress(&payload, 15).unwrap().to_vec();
        let mut zwire = Vec::new();
        encode_compressed_frame(OpCode::Text, &compressed, Some([1, 2, 3, 4]), &mut zwire);
        let mut wire = Vec::new();
        encode_frame(true, OpCode::Text, &payload, Some([1, 2, 3, 4]), &mut wire);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("inflated", size), &size, |b, _| {
            let mut conn = Conn::new(Role::Server, Limits::default());
            conn.set_deflate(&params(), 0);
            b.iter(|| {
                let mut buf = BytesMut::from(&zwire[..]);
                conn.handle_input(&mut buf).unwrap();
                black_box(conn.poll_event().unwrap());
            })
        });
        group.bench_with_input(BenchmarkId::new("plain", size), &size, |b, _| {
            let mut conn = Conn::new(Role::Server, Limits::default());
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                conn.handle_input(&mut buf).unwrap();
                black_box(conn.poll_event().unwrap());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_send, bench_receive);
criterion_main!(benches);
