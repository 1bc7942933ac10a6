//! Throughput of the fused weighted sum: `cargo bench --bench reduce [-- <elements> <reps>]`.
//! Reports GB/s of input bytes read (output bytes are not counted).

use std::time::Instant;

use _native::dtype::FloatDtype;
use _native::kernels::{weighted_sum, WeightedInput};

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64 << 20);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let cases = [
        ("3 x bf16 -> bf16", FloatDtype::BF16, FloatDtype::BF16),
        ("3 x f16 -> f16", FloatDtype::F16, FloatDtype::F16),
        ("3 x f32 -> f32", FloatDtype::F32, FloatDtype::F32),
        ("3 x f16 -> f32", FloatDtype::F16, FloatDtype::F32),
        ("3 x bf16 -> f16", FloatDtype::BF16, FloatDtype::F16),
    ];
    for (label, din, dout) in cases {
        // Non-trivial bit patterns so the page allocator cannot share zero pages.
        let bufs: Vec<Vec<u8>> = (0..3)
            .map(|k| {
                (0..n * din.size())
                    .map(|i| ((i * 7 + k) % 127) as u8)
                    .collect()
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
        for threads in [1usize, 2, 0] {
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
