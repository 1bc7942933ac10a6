//! Cost of the task-vector figures of `mergekitty inspect` (`kernels::task_vector_stats`): one
//! call on a bf16 base and `k` bf16 fine-tunes, with the TIES threshold (density 0.5) and without
//! it (density 1: the first pass alone).
//! `cargo bench --bench task_vector_stats [-- <elements> <models> <threads> <reps>]`. Reports GB/s
//! of input read (base + models, once each) and ns per element.

use std::time::Instant;

use _native::dtype::FloatDtype;
use _native::kernels::convert;
use _native::kernels::gta::Tensor;
use _native::kernels::task_vector_stats::task_vector_stats;

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (n, k, threads, reps) = (arg(1, 5632 * 2048), arg(2, 3), arg(3, 1), arg(4, 5));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let base: Vec<f32> = (0..n).map(|_| next() * 0.04).collect();
    let bf16 = |v: &[f32]| {
        let f: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut out = vec![0u8; v.len() * 2];
        convert(&f, FloatDtype::F32, &mut out, FloatDtype::BF16, 0).unwrap();
        out
    };
    let models: Vec<Vec<u8>> = (0..k)
        .map(|_| bf16(&base.iter().map(|b| b + next() * 0.004).collect::<Vec<_>>()))
        .collect();
    let base = bf16(&base);
    let tensors: Vec<Tensor> = models
        .iter()
        .map(|m| Tensor {
            data: m,
            dtype: FloatDtype::BF16,
        })
        .collect();
    let b = Tensor {
        data: &base,
        dtype: FloatDtype::BF16,
    };
    let mut scratch = vec![0f32; n];
    let bytes = ((k + 1) * n * 2) as f64;
    for density in [1.0, 0.5] {
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(
                task_vector_stats(b, &tensors, density, &mut scratch, threads).unwrap(),
            );
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{n} elements, bf16 base + {k} models, density {density}, {threads} thread(s): {:7.1} ms, {:5.2} GB/s, {:5.2} ns/element",
            best * 1e3,
            bytes / best / 1e9,
            best * 1e9 / n as f64
        );
    }
}
