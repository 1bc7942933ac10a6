//! Throughput of the NearSwap, SCE and Arcee Fusion kernels on weight-like bf16 tensors:
//! `cargo bench --bench method_kernels [-- <rows> <cols> <reps> <threads,...>]` (threads 0 = all
//! cores; default 8192 x 4096, the size of a large projection). Reports GB/s of input bytes
//! read (every input once; output bytes are not counted).

use std::time::Instant;

use _native::dtype::FloatDtype;
use _native::kernels::gta::Tensor;
use _native::kernels::{arcee_fusion, convert, nearswap, sce, Health};

/// `n` values `scale * (u1 + u2 + u3)` (roughly normal) as bf16 bytes, plus `add` when given.
fn tensor(n: usize, scale: f32, add: Option<&[f32]>, state: &mut u64) -> (Vec<f32>, Vec<u8>) {
    let mut unit = || {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        (*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let vals: Vec<f32> = (0..n)
        .map(|j| scale * (unit() + unit() + unit()) + add.map_or(0.0, |a| a[j]))
        .collect();
    let f32s: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = vec![0u8; n * 2];
    convert(&f32s, FloatDtype::F32, &mut out, FloatDtype::BF16, 0).unwrap();
    (vals, out)
}

fn bf16(data: &[u8]) -> Tensor<'_> {
    Tensor {
        data,
        dtype: FloatDtype::BF16,
    }
}

fn time(label: &str, n_inputs: usize, n: usize, reps: usize, mut f: impl FnMut() -> Health) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    let gb = (n_inputs * n * 2) as f64 / 1e9;
    println!(
        "{label:34} {:8.2} ms  {:6.2} GB/s input",
        secs * 1e3,
        gb / secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let rows: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8192);
    let cols: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let thread_counts: Vec<usize> = args
        .get(4)
        .map(|s| s.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 0]);
    let n = rows * cols;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let (bvals, base) = tensor(n, 0.02, None, &mut state);
    let xs: Vec<Vec<u8>> = (0..3)
        .map(|_| tensor(n, 0.002, Some(&bvals), &mut state).1)
        .collect();
    drop(bvals);
    let (b, x) = (bf16(&base), bf16(&xs[0]));
    let models: Vec<Tensor> = xs.iter().map(|x| bf16(x)).collect();
    let mut out = vec![0u8; n * 2];
    let o = FloatDtype::BF16;
    println!("{rows} x {cols} bf16");
    for &t in &thread_counts {
        println!("threads={t}");
        time("nearswap (t=0.001)", 2, n, reps, || {
            nearswap::nearswap(b, x, 0.001, &mut out, o, t).unwrap()
        });
        time("sce, 3 models, select_topk=1", 4, n, reps, || {
            sce::sce(b, &models, 1.0, &mut out, o, t).unwrap()
        });
        time("sce, 3 models, select_topk=0.5", 4, n, reps, || {
            sce::sce(b, &models, 0.5, &mut out, o, t).unwrap()
        });
        time("arcee_fusion", 2, n, reps, || {
            arcee_fusion::arcee_fusion(b, x, cols, &mut out, o, t).unwrap()
        });
    }
}
