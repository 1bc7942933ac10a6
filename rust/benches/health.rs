//! Cost of the health figures (`kernels::health`): the per-block scan the kernels run on data
//! already in L1, and a whole-tensor scan from memory.
//! `cargo bench --bench health [-- <elements> <reps>]`. Reports elements per nanosecond.

use std::time::Instant;

use _native::dtype::FloatDtype;
use _native::kernels::health::scan;
use _native::kernels::{convert, scan_tensor};

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64 << 20);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let vals: Vec<u8> = (0..n)
        .flat_map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2).to_le_bytes()
        })
        .collect();
    for dtype in [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32] {
        let mut data = vec![0u8; n * dtype.size()];
        convert(&vals, FloatDtype::F32, &mut data, dtype, 0).unwrap();
        // one 1024-element block, as the GTA kernel scans it (in L1)
        let block = &data[..1024 * dtype.size()];
        let calls = n / 1024;
        let mut best = f64::MAX;
        let mut sink = 0.0;
        for _ in 0..reps {
            let t = Instant::now();
            for _ in 0..calls {
                sink += scan(dtype, std::hint::black_box(block)).sumsq;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{:>4} block of 1024 in L1: {:6.2} elements/ns ({sink:.1})",
            dtype.code(),
            (calls * 1024) as f64 / best / 1e9
        );
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(scan_tensor(&data, dtype, 1).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{:>4} tensor of {n}, 1 thread: {:6.2} elements/ns",
            dtype.code(),
            n as f64 / best / 1e9
        );
    }
}
