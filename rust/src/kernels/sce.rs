//! SCE (Select, Calculate, Erase) of a base and N models over raw little-endian buffers; the
//! definition and the torch reference are in `python/mergekitty/methods/sce.py`. With
//! `d_i = f32(x_i) - f32(b)`:
//!
//! 1. Select (`select_topk < 1`, N >= 2): the population variance of the `d_i` per element, in
//!    float64 by Welford's update as torch's `var` computes it (so bit-identical to it), into a
//!    float32 scratch tensor; `k = trunc(select_topk * count_nonzero(var))`; the order
//!    statistic at ascending rank `n - k` (`sparsify::ranked_sampled`; NaN ranked largest, as
//!    `torch.kthvalue` does); kept: `var > thr`, and of the `var == thr` the first by position
//!    until k are kept. Each `d_i` is multiplied by the 0/1 mask (so an infinite masked-out
//!    delta is NaN, as in the reference).
//! 2. Calculate: `w_i = mean(d_i^2) / sum_j mean(d_j^2)` (1/N each unless that sum is > 0).
//! 3. Erase and merge: `sigma = sum_i d_i >= 0 ? 1 : -1`, `c_i = sign(d_i) == sigma`,
//!    `out = b + sum_i w_i c_i d_i / sum_i w_i c_i` (the quotient 0 where the denominator is
//!    not > 0), each sum over models in model order from 0.0 as torch sums N <= 4 rows.
//!
//! Passes, each a block of elements at a time on every thread: [select: one over the inputs
//! writing the variance, one or two over the variance for its order statistic], one over the
//! inputs for the squares' sums (writing the selection as a bit mask, n/8 bytes, and taking the
//! inputs' [`Health`]), one over the inputs writing the output. Memory: the variance (one
//! float32 copy of the tensor, only when selecting) and the mask.
//!
//! Agreement with the reference (measured in `tests/test_native_elementwise.py`): the selection
//! is bit-identical. `mean(d_i^2)` is summed here in float64 per block of elements (thread-count
//! independent); torch sums it in float32 in an order that depends on its thread count and CPU,
//! so the weights differ in their last bits. The output is within 4 ulp (F32) and 1 ulp (BF16,
//! F16) of the output dtype, taken at max(|out|, |base|, |merged|) (the last add rounds there),
//! in 2.5% (F32) and under 0.002% (BF16, F16) of the elements; the test allows 8 and 1. With
//! N >= 5 torch also sums the models in another order for the last few elements of each of
//! its thread chunks (the same bound; a sign election there can flip only when the sum of the
//! deltas is within a rounding of 0).

use crate::dtype::FloatDtype;
use crate::error::{Error, Result};
use crate::kernels::consensus::{load, store};
use crate::kernels::gta::{load_squares, Tensor};
use crate::kernels::health::{block_stats, per_range, scan, Health};
use crate::kernels::sparsify::{order_key, order_key_value, ranked_sampled, ORDER_HI_BUCKETS};
use crate::kernels::{common_length, with_avx2, with_simd_fma, ScratchF32};
use crate::threads;
use std::ops::Range;

/// Elements per block; a multiple of 64, so threads own whole words of the bit mask.
const BLOCK: usize = 1024;
const WORDS: usize = BLOCK / 64;

/// `f::<K>(args)` with the model count `k` as a constant when it is 1 to 8 (the loops over the
/// models unroll and the loops over elements vectorize with the per-element state in
/// registers), else `f::<0>(args)` (the count read at run time).
macro_rules! by_models {
    ($k:expr, $f:ident($($arg:expr),*)) => {
        match $k {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            _ => $f::<0>($($arg),*),
        }
    };
}

/// Which task-vector elements the selection keeps.
enum Keep {
    All,
    /// None (each delta multiplied by 0).
    Zero,
    /// `var > thr`, or `var == thr` at an index below `cutoff`.
    Var {
        var: ScratchF32,
        thr: f32,
        cutoff: usize,
    },
    /// Bit j of word j / 64: element j is kept.
    Bits(Vec<u64>),
}

/// `out = sce(base, xs, select_topk)` as `out_dtype`. `threads`: 0 = all cores. Returns the
/// figures of `base`, then `xs` in order, and the output as written.
pub fn sce(
    base: Tensor,
    xs: &[Tensor],
    select_topk: f64,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<Health> {
    if select_topk.is_nan() {
        return Err(Error::InvalidArgument("sce: select_topk is NaN".into()));
    }
    let all: Vec<Tensor> = std::iter::once(base).chain(xs.iter().copied()).collect();
    let names = |i: usize| {
        if i == 0 {
            "base".to_string()
        } else {
            format!("inputs[{}]", i - 1)
        }
    };
    let n = common_length(&all, names, out, out_dtype)?;
    let threads = threads::resolve(threads);
    let ranges = threads::chunk_ranges(n, threads, BLOCK);
    if xs.is_empty() {
        // nothing to merge: the base, converted
        return Ok(output_pass(
            &ranges,
            base,
            xs,
            &[],
            &Keep::All,
            out,
            out_dtype,
            true,
        ));
    }
    let keep = if select_topk < 1.0 && xs.len() >= 2 {
        select(base, xs, n, select_topk, &ranges, threads)?
    } else {
        Keep::All
    };
    let (keep, sums, inputs) = squares_pass(base, xs, n, keep, &ranges);
    let weights = weights(&sums, n);
    let mut h = output_pass(&ranges, base, xs, &weights, &keep, out, out_dtype, false);
    h.inputs = inputs;
    Ok(h)
}

/// `(b, x_i) -> d_i` for a block: `d[i * BLOCK + j] = f32(x_i[j]) - f32(b[j])`; `bv` gets f32(b).
#[inline(always)]
fn deltas(base: Tensor, xs: &[Tensor], j0: usize, len: usize, bv: &mut [f32], d: &mut [f32]) {
    load(base.dtype, base.elements(j0, len), &mut bv[..len]);
    for (i, x) in xs.iter().enumerate() {
        let di = &mut d[i * BLOCK..i * BLOCK + len];
        load(x.dtype, x.elements(j0, len), di);
        di.iter_mut().zip(&bv[..len]).for_each(|(v, &b)| *v -= b);
    }
}

/// Step 1: the variance, its order statistic, and the rule that keeps exactly k elements.
fn select(
    base: Tensor,
    xs: &[Tensor],
    n: usize,
    topk: f64,
    ranges: &[Range<usize>],
    threads: usize,
) -> Result<Keep> {
    let mut var = ScratchF32::new(n)?;
    // (nonzero, NaN) counts per chunk
    let mut counts = vec![(0u64, 0u64); ranges.len()];
    let mut tasks = Vec::with_capacity(ranges.len());
    let mut rest = &mut var[..];
    for (r, c) in ranges.iter().zip(counts.iter_mut()) {
        let (head, tail) = rest.split_at_mut(r.len());
        tasks.push((r.start, head, c));
        rest = tail;
    }
    threads::run_all(tasks, |(start, var, count)| {
        with_simd_fma(
            #[inline(always)]
            || {
                let mut bv = vec![0f32; BLOCK];
                let mut d = vec![0f32; BLOCK * xs.len()];
                let (mut nonzero, mut nan) = (0u64, 0u64);
                for (bi, vb) in var.chunks_mut(BLOCK).enumerate() {
                    let len = vb.len();
                    deltas(base, xs, start + bi * BLOCK, len, &mut bv, &mut d);
                    by_models!(xs.len(), variance_block(&d, xs.len(), vb));
                    for v in vb.iter() {
                        nonzero += (*v != 0.0) as u64;
                        nan += v.is_nan() as u64;
                    }
                }
                *count = (nonzero, nan);
            },
        )
    });
    let nonzero: u64 = counts.iter().map(|c| c.0).sum();
    let nan: u64 = counts.iter().map(|c| c.1).sum();
    // Python's int(): toward zero
    let k = (topk * nonzero as f64) as i64;
    if k <= 0 {
        return Ok(Keep::Zero);
    }
    let k = k as u64;
    if k >= n as u64 {
        return Ok(Keep::All);
    }
    let r = ranked_sampled(
        &var,
        &[n - k as usize],
        threads,
        ORDER_HI_BUCKETS,
        &order_key,
    )[0];
    let thr = order_key_value(r.key);
    if thr.is_nan() {
        // torch: nothing is > NaN or == NaN
        return Ok(Keep::Zero);
    }
    // Above the threshold as floats compare: the larger keys, less the NaNs.
    let greater = n as u64 - r.below - r.equal - nan;
    let take = (k - greater).min(r.equal);
    let cutoff = if take == r.equal {
        n
    } else {
        nth_equal(&var, thr, take, threads) + 1
    };
    Ok(Keep::Var { var, thr, cutoff })
}

/// The population variance over the models of each element of a block of deltas (`d`: model i
/// at `i * BLOCK`), by torch's `WelfordOps` in float64: per model, `delta = x - mean;
/// mean += delta / count; m2 += delta * (x - mean)`; then `m2 / k` as float32.
#[inline(always)]
fn variance_block<const K: usize>(d: &[f32], k: usize, var: &mut [f32]) {
    #[inline(always)]
    fn welford(x: impl Fn(usize) -> f32, k: usize) -> f32 {
        let (mut mean, mut m2) = (0f64, 0f64);
        for i in 0..k {
            let x = x(i) as f64;
            let delta = x - mean;
            let new_mean = mean + delta / (i + 1) as f64;
            m2 += delta * (x - new_mean);
            mean = new_mean;
        }
        (m2 / k as f64) as f32
    }
    let len = var.len();
    if K > 0 {
        let rows: [&[f32]; K] = std::array::from_fn(|i| &d[i * BLOCK..i * BLOCK + len]);
        for (j, v) in var.iter_mut().enumerate() {
            *v = welford(|i| rows[i][j], K);
        }
    } else {
        for (j, v) in var.iter_mut().enumerate() {
            *v = welford(|i| d[i * BLOCK + j], k);
        }
    }
}

/// The index of the `m`-th (from 1) element equal to `thr`; `m` is at most their count.
fn nth_equal(var: &[f32], thr: f32, m: u64, threads: usize) -> usize {
    let ranges = threads::chunk_ranges(var.len(), threads, 1);
    let mut counts = vec![0u64; ranges.len()];
    let tasks: Vec<_> = ranges.iter().cloned().zip(counts.iter_mut()).collect();
    threads::run_all(tasks, |(r, c)| {
        with_avx2(
            #[inline(always)]
            || {
                // u32 lanes per block of 2^16 (a vector compare and add)
                for blk in var[r].chunks(1 << 16) {
                    *c += blk.iter().map(|&v| (v == thr) as u32).sum::<u32>() as u64;
                }
            },
        )
    });
    let mut before = 0;
    for (r, c) in ranges.into_iter().zip(counts) {
        if before + c >= m {
            let mut seen = before;
            for j in r {
                seen += (var[j] == thr) as u64;
                if seen == m {
                    return j;
                }
            }
        }
        before += c;
    }
    var.len().saturating_sub(1)
}

/// Step 2's pass: per block and model, the float64 sum of the float32 squares of the masked
/// deltas (combined in block order: independent of the thread count); the inputs' figures;
/// and a `Keep::Var` turned into `Keep::Bits`.
#[allow(clippy::type_complexity)]
fn squares_pass(
    base: Tensor,
    xs: &[Tensor],
    n: usize,
    keep: Keep,
    ranges: &[Range<usize>],
) -> (Keep, Vec<f64>, Vec<crate::kernels::Stats>) {
    let k = xs.len();
    let nblocks = n.div_ceil(BLOCK);
    let mut partials = vec![0f64; nblocks * k];
    let mut bits = match keep {
        Keep::Var { .. } => vec![0u64; n.div_ceil(64)],
        _ => Vec::new(),
    };
    let mut parts: Vec<Health> = ranges.iter().map(|_| Health::new(k + 1)).collect();
    let mut tasks = Vec::with_capacity(ranges.len());
    let (mut prest, mut brest) = (partials.as_mut_slice(), bits.as_mut_slice());
    for (r, h) in ranges.iter().zip(parts.iter_mut()) {
        let (p, pt) = prest.split_at_mut(r.len().div_ceil(BLOCK) * k);
        let words = if brest.is_empty() {
            0
        } else {
            r.len().div_ceil(64)
        };
        let (b, bt) = brest.split_at_mut(words);
        tasks.push((r.clone(), p, b, h));
        prest = pt;
        brest = bt;
    }
    let keep_ref = &keep;
    threads::run_all(tasks, |(r, partials, bits, h)| {
        with_avx2(
            #[inline(always)]
            || {
                let mut bv = vec![0f32; BLOCK];
                let mut d = vec![0f32; BLOCK * k];
                let mut mk = vec![0f32; BLOCK];
                let mut local = Health::new(k + 1);
                let mut j0 = r.start;
                let mut bi = 0;
                while j0 < r.end {
                    let len = BLOCK.min(r.end - j0);
                    // the deltas, the inputs' squares summed as they are loaded
                    let src = base.elements(j0, len);
                    let sq = load_squares(base.dtype, src, &mut bv[..len]);
                    local.inputs[0].add(block_stats(sq, base.dtype, src));
                    for (i, x) in xs.iter().enumerate() {
                        let (src, di) = (x.elements(j0, len), &mut d[i * BLOCK..i * BLOCK + len]);
                        let sq = load_squares(x.dtype, src, di);
                        local.inputs[i + 1].add(block_stats(sq, x.dtype, src));
                        di.iter_mut().zip(&bv[..len]).for_each(|(v, &b)| *v -= b);
                    }
                    let masked = match keep_ref {
                        Keep::All => false,
                        Keep::Zero => {
                            mk[..len].fill(0.0);
                            true
                        }
                        Keep::Var { var, thr, cutoff } => {
                            let words = &mut bits[bi * WORDS..(bi * WORDS + len.div_ceil(64))];
                            var_mask(&var[j0..j0 + len], *thr, *cutoff, j0, &mut mk[..len], words);
                            true
                        }
                        Keep::Bits(_) => false, // not built yet
                    };
                    for i in 0..k {
                        let di = &mut d[i * BLOCK..i * BLOCK + len];
                        if masked {
                            di.iter_mut().zip(&mk[..len]).for_each(|(v, &m)| *v *= m);
                        }
                        partials[bi * k + i] = square_sum(di);
                    }
                    j0 += len;
                    bi += 1;
                }
                *h = local;
            },
        )
    });
    let mut sums = vec![0f64; k];
    for blk in partials.chunks_exact(k) {
        for (s, &p) in sums.iter_mut().zip(blk) {
            *s += p;
        }
    }
    let inputs = Health::sum(k + 1, &parts).inputs;
    let keep = match keep {
        Keep::Var { .. } => Keep::Bits(bits),
        other => other,
    };
    (keep, sums, inputs)
}

/// The 0/1 multipliers of a block of the variance (from index `j0`), and its mask bits.
#[inline(always)]
fn var_mask(var: &[f32], thr: f32, cutoff: usize, j0: usize, mk: &mut [f32], words: &mut [u64]) {
    for (j, (m, &v)) in mk.iter_mut().zip(var).enumerate() {
        let keep = v > thr || (v == thr && j0 + j < cutoff);
        *m = if keep { 1.0 } else { 0.0 };
    }
    for (w, c) in words.iter_mut().zip(mk.chunks(64)) {
        *w = c
            .iter()
            .enumerate()
            .fold(0u64, |acc, (b, &m)| acc | (((m != 0.0) as u64) << b));
    }
}

/// The sum of the float32 squares, in float64 over eight fixed lanes.
#[inline(always)]
fn square_sum(d: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut c = d.chunks_exact(8);
    for g in &mut c {
        for l in 0..8 {
            lanes[l] += (g[l] * g[l]) as f64;
        }
    }
    let mut s: f64 = lanes.iter().sum();
    for &v in c.remainder() {
        s += (v * v) as f64;
    }
    s
}

/// Step 2: `w_i = ms_i / sum(ms)` in float32 (1/N each unless the sum is > 0), with
/// `ms_i = float32(sum_i) / n` as torch's mean divides its float32 sum.
fn weights(sums: &[f64], n: usize) -> Vec<f32> {
    let ms: Vec<f32> = sums.iter().map(|&s| s as f32 / n as f32).collect();
    let total = ms.iter().fold(0f32, |a, &m| a + m);
    if total > 0.0 {
        ms.iter().map(|&m| m / total).collect()
    } else {
        vec![(1.0 / sums.len() as f64) as f32; sums.len()]
    }
}

/// Step 3: the output (with `copy_base`, the base itself: no models).
#[allow(clippy::too_many_arguments)]
fn output_pass(
    ranges: &[Range<usize>],
    base: Tensor,
    xs: &[Tensor],
    w: &[f32],
    keep: &Keep,
    out: &mut [u8],
    out_dtype: FloatDtype,
    copy_base: bool,
) -> Health {
    let k = xs.len();
    let osz = out_dtype.size();
    per_range(out, osz, ranges, k + 1, |start, out, h| {
        with_avx2(
            #[inline(always)]
            || {
                let mut bv = vec![0f32; BLOCK];
                let mut d = vec![0f32; BLOCK * k.max(1)];
                let mut mk = vec![0f32; BLOCK];
                let mut num = vec![0f32; BLOCK];
                let n = out.len() / osz;
                let mut b = 0;
                while b < n {
                    let len = BLOCK.min(n - b);
                    let j0 = start + b;
                    let bv = &mut bv[..len];
                    if copy_base {
                        load(base.dtype, base.elements(j0, len), bv);
                        h.inputs[0].add(scan(base.dtype, base.elements(j0, len)));
                        num[..len].copy_from_slice(bv);
                    } else {
                        deltas(base, xs, j0, len, bv, &mut d);
                        let masked = match keep {
                            Keep::All => false,
                            Keep::Zero => {
                                mk[..len].fill(0.0);
                                true
                            }
                            Keep::Bits(bits) => {
                                let words = &bits[j0 / 64..(j0 + len).div_ceil(64)];
                                for (c, &w) in mk[..len].chunks_mut(64).zip(words) {
                                    for (b, m) in c.iter_mut().enumerate() {
                                        *m = ((w >> b) & 1) as f32;
                                    }
                                }
                                true
                            }
                            Keep::Var { .. } => false, // turned into bits by squares_pass
                        };
                        if masked {
                            for i in 0..k {
                                let di = &mut d[i * BLOCK..i * BLOCK + len];
                                di.iter_mut().zip(&mk[..len]).for_each(|(v, &m)| *v *= m);
                            }
                        }
                        by_models!(k, merge_block(&d, k, w, bv, &mut num[..len]));
                    }
                    let dst = &mut out[b * osz..(b + len) * osz];
                    store(out_dtype, &num[..len], dst);
                    h.output.add(scan(out_dtype, dst));
                    b += len;
                }
            },
        )
    })
}

/// `out = b + merged` for one block of (masked) deltas, `d`: model i at `i * BLOCK`. Per
/// element, in the reference's float32 operations and order: `s = 0 + d_0 + d_1 + ...`;
/// `c_i = sign(d_i) == (s >= 0 ? 1 : -1)` (a zero or NaN delta never counts); `num = 0 +
/// sum (w_i c_i) d_i`, `den = 0 + sum w_i c_i`; `merged = den > 0 ? num / den : 0`.
#[inline(always)]
fn merge_block<const K: usize>(d: &[f32], k: usize, w: &[f32], bv: &[f32], out: &mut [f32]) {
    #[inline(always)]
    fn element(x: impl Fn(usize) -> f32, w: &[f32], k: usize, b: f32) -> f32 {
        let mut s = 0f32;
        for i in 0..k {
            s += x(i);
        }
        let (mut num, mut den) = (0f32, 0f32);
        for (i, &wi) in w.iter().enumerate().take(k) {
            let v = x(i);
            let counts = if s >= 0.0 { v > 0.0 } else { v < 0.0 };
            let wc = wi * if counts { 1.0 } else { 0.0 };
            num += wc * v;
            den += wc;
        }
        let q = num / if den > 0.0 { den } else { 1.0 };
        b + if den > 0.0 { q } else { 0.0 }
    }
    let len = out.len();
    if K > 0 {
        let rows: [&[f32]; K] = std::array::from_fn(|i| &d[i * BLOCK..i * BLOCK + len]);
        let w: [f32; K] = std::array::from_fn(|i| w[i]);
        for (j, (o, &b)) in out.iter_mut().zip(bv).enumerate() {
            *o = element(|i| rows[i][j], &w, K, b);
        }
    } else {
        for (j, (o, &b)) in out.iter_mut().zip(bv).enumerate() {
            *o = element(|i| d[i * BLOCK + j], w, k, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::health::tests::{close, decode, encode, reference, same_bits};
    use crate::test_rng::Lcg;

    /// The definition element by element (the reference's torch operations, in order).
    fn naive(b: &[f32], xs: &[Vec<f32>], topk: f64) -> Vec<f32> {
        let (n, k) = (b.len(), xs.len());
        if k == 0 {
            return b.to_vec();
        }
        let mut d: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| x.iter().zip(b).map(|(&x, &b)| x - b).collect())
            .collect();
        if topk < 1.0 && k >= 2 {
            let var: Vec<f32> = (0..n)
                .map(|j| {
                    let (mut mean, mut m2) = (0f64, 0f64);
                    for (i, di) in d.iter().enumerate() {
                        let x = di[j] as f64;
                        let delta = x - mean;
                        mean += delta / (i + 1) as f64;
                        m2 += delta * (x - mean);
                    }
                    (m2 / k as f64) as f32
                })
                .collect();
            let nnz = var.iter().filter(|&&v| v != 0.0).count();
            let kk = (topk * nnz as f64) as i64;
            let mask: Vec<f32> = if kk <= 0 {
                vec![0.0; n]
            } else if kk as usize >= n {
                vec![1.0; n]
            } else {
                let mut sorted = var.clone();
                sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(a.is_nan().cmp(&b.is_nan())));
                let thr = sorted[n - kk as usize];
                let mut keep: Vec<bool> = var.iter().map(|&v| v > thr).collect();
                let mut need = kk - keep.iter().filter(|&&x| x).count() as i64;
                for (j, &v) in var.iter().enumerate() {
                    if v == thr && need > 0 {
                        keep[j] = true;
                        need -= 1;
                    }
                }
                keep.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect()
            };
            for di in d.iter_mut() {
                di.iter_mut().zip(&mask).for_each(|(v, &m)| *v *= m);
            }
        }
        let sums: Vec<f64> = d
            .iter()
            .map(|di| di.iter().map(|&v| (v * v) as f64).sum())
            .collect();
        let w = weights(&sums, n);
        (0..n)
            .map(|j| {
                let s = d.iter().fold(0f32, |a, di| a + di[j]);
                let sigma = if s >= 0.0 { 1.0 } else { -1.0 };
                let (mut num, mut den) = (0f32, 0f32);
                for (di, &wi) in d.iter().zip(&w) {
                    let v = di[j];
                    let sign = if v > 0.0 {
                        1.0
                    } else if v < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    let wc = wi * if sign == sigma { 1.0 } else { 0.0 };
                    num += wc * v;
                    den += wc;
                }
                b[j] + if den > 0.0 { num / den } else { 0.0 }
            })
            .collect()
    }

    fn run(
        b: &[f32],
        xs: &[Vec<f32>],
        topk: f64,
        d: FloatDtype,
        threads: usize,
    ) -> (Vec<f32>, Health) {
        let bb = encode(b, d);
        let xb: Vec<Vec<u8>> = xs.iter().map(|x| encode(x, d)).collect();
        let ts: Vec<Tensor> = xb.iter().map(|x| Tensor { data: x, dtype: d }).collect();
        let mut out = vec![0u8; b.len() * d.size()];
        let h = sce(
            Tensor {
                data: &bb,
                dtype: d,
            },
            &ts,
            topk,
            &mut out,
            d,
            threads,
        )
        .unwrap();
        (decode(&out, d), h)
    }

    fn models(n: usize, k: usize, seed: u64, ties: bool) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = Lcg(seed);
        let b: Vec<f32> = (0..n).map(|_| rng.unit() * 0.05).collect();
        let xs = (0..k)
            .map(|_| {
                b.iter()
                    .map(|&v| {
                        let e = rng.unit() * 0.01;
                        // a few distinct deltas: many tied variances
                        v + if ties { (e * 200.0).round() / 400.0 } else { e }
                    })
                    .collect()
            })
            .collect();
        (b, xs)
    }

    #[test]
    fn matches_the_definition() {
        for &n in &[1usize, 7, 1025, 100_003] {
            for k in [1usize, 2, 3, 5, 9] {
                for ties in [false, true] {
                    let (b, xs) = models(n, k, (n * 10 + k) as u64, ties);
                    for topk in [0.0, 1e-9, 0.3, 0.5, 1.0] {
                        for d in [FloatDtype::F32, FloatDtype::BF16] {
                            let bd = decode(&encode(&b, d), d);
                            let xd: Vec<Vec<f32>> =
                                xs.iter().map(|x| decode(&encode(x, d), d)).collect();
                            let want = decode(&encode(&naive(&bd, &xd, topk), d), d);
                            let (one, h1) = run(&b, &xs, topk, d, 1);
                            let (three, h3) = run(&b, &xs, topk, d, 3);
                            let what = format!("n={n} k={k} ties={ties} topk={topk} {d:?}");
                            assert!(same_bits(&one, &want), "{what}");
                            assert!(same_bits(&three, &one), "{what}");
                            assert_eq!(h1, h3);
                            assert_eq!(h1.inputs.len(), k + 1);
                            assert!(close(h1.inputs[0], reference(&encode(&b, d), d)));
                            assert!(close(h1.inputs[k], reference(&encode(&xs[k - 1], d), d)));
                            assert!(close(h1.output, reference(&encode(&one, d), d)));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ties_at_the_kth_variance_keep_the_first_positions() {
        // deltas (0, v): var = v^2 / 4 = [1, 4, 4, 4, 0.25, 4]; k = 3 of the four 4s: the first
        let b = vec![0.0f32; 6];
        let xs = vec![vec![0.0f32; 6], vec![2.0, 4.0, 4.0, 4.0, 1.0, 4.0]];
        let (got, _) = run(&b, &xs, 0.5, FloatDtype::F32, 1);
        assert_eq!(got, [0.0, 4.0, 4.0, 4.0, 0.0, 0.0]);
        // k = 4: all four; k = 5: and the 1
        let (got, _) = run(&b, &xs, 4.0 / 6.0 + 1e-9, FloatDtype::F32, 1);
        assert_eq!(got, [0.0, 4.0, 4.0, 4.0, 0.0, 4.0]);
        let (got, _) = run(&b, &xs, 5.0 / 6.0 + 1e-9, FloatDtype::F32, 1);
        assert_eq!(got, [2.0, 4.0, 4.0, 4.0, 0.0, 4.0]);
        // the same across thread chunks: ties spread over 300k elements
        let n = 300_000;
        let b = vec![0.0f32; n];
        let xs = vec![
            vec![0.0f32; n],
            (0..n).map(|j| if j % 3 == 0 { 2.0 } else { 1.0 }).collect(),
        ];
        let (got, _) = run(&b, &xs, 0.5, FloatDtype::F32, 3);
        // k = 150000: the 100000 twos, then the first 50000 ones
        let mut ones = 0;
        for (j, &v) in got.iter().enumerate() {
            let want = if j % 3 == 0 {
                2.0
            } else {
                ones += 1;
                if ones <= 50_000 {
                    1.0
                } else {
                    0.0
                }
            };
            assert_eq!(v, want, "{j}");
        }
    }

    #[test]
    fn select_topk_zero_and_one() {
        let (b, xs) = models(5000, 3, 1, false);
        let (zero, _) = run(&b, &xs, 0.0, FloatDtype::F32, 2);
        assert_eq!(zero, b);
        let (one, _) = run(&b, &xs, 1.0, FloatDtype::F32, 2);
        assert_eq!(one, naive(&b, &xs, 1.0));
        assert_ne!(one, b);
        // above 1 (never from a config): no selection either
        assert_eq!(run(&b, &xs, 1.5, FloatDtype::F32, 2).0, one);
    }

    #[test]
    fn a_single_model_is_its_task_vector() {
        let (b, xs) = models(10_000, 1, 3, false);
        for topk in [0.1, 1.0] {
            let (got, _) = run(&b, &xs, topk, FloatDtype::F32, 1);
            let want: Vec<f32> = b.iter().zip(&xs[0]).map(|(&b, &x)| b + (x - b)).collect();
            assert_eq!(got, want);
        }
        // no models: the base
        let (got, h) = run(&b, &[], 0.5, FloatDtype::F32, 1);
        assert_eq!(got, b);
        assert_eq!(h.inputs.len(), 1);
    }

    #[test]
    fn nan_and_inf_pass_through_like_the_reference() {
        let (b, mut xs) = models(3000, 3, 5, false);
        xs[0][10] = f32::NAN;
        xs[1][20] = f32::INFINITY;
        xs[2][20] = f32::NEG_INFINITY;
        xs[2][2500] = f32::INFINITY;
        for topk in [0.0, 0.001, 0.5, 1.0] {
            let (got, h) = run(&b, &xs, topk, FloatDtype::F32, 2);
            assert!(same_bits(&got, &naive(&b, &xs, topk)), "topk={topk}");
            assert_eq!(
                h.inputs.iter().map(|s| s.nonfinite).collect::<Vec<_>>(),
                [0, 1, 1, 2]
            );
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let b = encode(&[1.0, 2.0], FloatDtype::F32);
        let x = encode(&[1.0, 2.0, 3.0], FloatDtype::BF16);
        let bt = Tensor {
            data: &b,
            dtype: FloatDtype::F32,
        };
        let xt = Tensor {
            data: &x,
            dtype: FloatDtype::BF16,
        };
        let mut out = vec![0u8; 8];
        let e = sce(bt, &[bt, xt], 0.5, &mut out, FloatDtype::F32, 1).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("inputs[1] (BF16) has 6 bytes, expected 4"),
            "{e}"
        );
        let e = sce(bt, &[bt], f64::NAN, &mut out, FloatDtype::F32, 1).unwrap_err();
        assert!(e.to_string().contains("select_topk is NaN"), "{e}");
        assert!(sce(bt, &[bt], 0.5, &mut out[..6], FloatDtype::F32, 1).is_err());
        let empty = Tensor {
            data: &[],
            dtype: FloatDtype::F16,
        };
        let h = sce(empty, &[empty, empty], 0.5, &mut [], FloatDtype::F32, 1).unwrap();
        assert_eq!(h, Health::new(3));
    }
}
