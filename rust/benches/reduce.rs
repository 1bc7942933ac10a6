//! Throughput of the fused weighted sum:
//! `cargo bench --bench reduce [-- <elements> <reps> <threads,...>]` (threads 0 = all cores).
//! Reports GB/s of input bytes read (output bytes are not counted).

use std::time::Instant;

use _native::dtype::FloatDtype;
use _native::kernels::{convert, weighted_sum, WeightedInput};

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64 << 20);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let thread_counts: Vec<usize> = args
        .get(3)
        .map(|s| s.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 0]);
    let cases = [
        ("3 x bf16 -> bf16", FloatDtype::BF16, FloatDtype::BF16),
        ("3 x f16 -> f16", FloatDtype::F16, FloatDtype::F16),
        ("3 x f32 -> f32", FloatDtype::F32, FloatDtype::F32),
        ("3 x f16 -> f32", FloatDtype::F16, FloatDtype::F32),
        ("3 x bf16 -> f16", FloatDtype::BF16, FloatDtype::F16),
    ];
    for (label, din, dout) in cases {
        // Weight-like values (|x| <= 0.1, no subnormals: Intel cores take a slow microcode
        // path on subnormal operands, which real checkpoints almost never contain).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let bufs: Vec<Vec<u8>> = (0..3)
            .map(|_| {
                let mut b = vec![0u8; n * din.size()];
                let tmp: Vec<u8> = (0..n)
                    .flat_map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
                        x.to_le_bytes()
                    })
                    .collect();
                convert(&tmp, FloatDtype::F32, &mut b, din, 0).unwrap();
                b
            })
            .collect();
        let inputs: Vec<WeightedInput> = bufs
            .iter()
            .map(|b| WeightedInput {
                data: b,
                dtype: din,
                weight: 0.25,
            })
            .collect();
        let mut out = vec![1u8; n * dout.size()];
        for &threads in &thread_counts {
            weighted_sum(&inputs, &mut out, dout, threads).unwrap();
            let t = Instant::now();
            for _ in 0..reps {
                weighted_sum(&inputs, &mut out, dout, threads).unwrap();
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            let gb = (3 * n * din.size()) as f64 / 1e9;
            println!(
                "{label:18} threads={threads} {n} elems: {:7.2} ms  {:6.2} GB/s input",
                secs * 1e3,
                gb / secs
            );
        }
    }
}
