//! Masking throughput: the word-wise `apply_mask` against the byte-by-byte reference.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use wsedge::proto::mask::{apply_mask, apply_mask_scalar};

fn bench_mask(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for size in [20usize, 1024, 16 * 1024] {
        let mut buf = vec![0x5Au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("apply_mask", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), black_box([1, 2, 3, 4]), black_box(1)))
        });
        group.bench_with_input(
            BenchmarkId::new("apply_mask_scalar", size),
            &size,
            |b, _| {
                b.iter(|| {
                    apply_mask_scalar(black_box(&mut buf), black_box([1, 2, 3, 4]), black_box(1))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_mask);
criterion_main!(benches);
