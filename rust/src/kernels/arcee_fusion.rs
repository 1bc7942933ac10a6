//! Arcee Fusion of a base `b` and one model `x` over raw little-endian buffers; the definition
//! and the torch reference are in `python/mergekitty/methods/arcee_fusion.py`:
//!
//! ```text
//! KL  = sum p ln(p / q) per row,  p = softmax(x) + 1e-8,  q = softmax(b) + 1e-8  (float64)
//! I   = |x - b| * float32(KL)                                                   (float32)
//! tau = median(I) + 1.5 (Q3(I) - Q1(I))      sorted[(n-1)//2], sorted[int(0.25 (n-1))], ...
//! out = x where I >= tau, else b
//! ```
//!
//! Pass 1, over rows on every thread: each row's KL in float64 (softmax as torch computes it:
//! `exp(v - max) * (1 / sum)`; a row with a NaN, or a +inf, gets a NaN KL as in torch), then the
//! row's importance into a float32 scratch tensor (the one copy of the tensor this kernel
//! holds); a row of up to `CACHE_ROW` elements is loaded once and keeps its exponentials, a
//! longer one is read again and computes them again. The inputs' [`Health`] is taken on the
//! first read. Then the three order statistics (`sparsify::ranked_sampled`: NaN ranked
//! largest, -0 == +0, as `torch.kthvalue` does), and pass 2 writes `x` or `b` per element.
//!
//! Agreement with the reference (measured in `tests/test_native_elementwise.py`): the KL of two
//! close rows is a sum of terms that cancel, so its float64 value carries an absolute error of
//! a few ulp of sum(p) = 1 in any evaluation order: here within 1.1e-15 of the exact value
//! (the tests below), torch's as well, but with other exp/ln and summation orders. Their
//! float32 roundings can then differ by an ulp in rows whose KL is small (a row of KL 1e-7
//! holds ~1e-8 relative), which moves that row's importances by an ulp; everything after the
//! KL is the reference's float32 arithmetic. The output is therefore identical except for an
//! element whose importance lies within an ulp of tau (or moves a quantile): in the parity
//! tests and benchmarks, 0 of ~1.3e8 elements compared.

use crate::dtype::FloatDtype;
use crate::error::{Error, Result};
use crate::kernels::consensus::{load, store};
use crate::kernels::exp_ln::{exp, ln, two_atanh, ATANH_MAX};
use crate::kernels::gta::Tensor;
use crate::kernels::health::{per_range, scan, Health};
use crate::kernels::sparsify::{order_key, order_key_value, ranked_sampled, ORDER_HI_BUCKETS};
use crate::kernels::{common_length, with_avx2, with_simd_fma, ScratchF32};
use crate::threads;

/// Elements per segment of a row (and per block of the output pass).
const SEG: usize = 2048;
/// Rows up to this long keep their exponentials (2 x 128 KiB of float64 per thread).
const CACHE_ROW: usize = 16 * 1024;
/// The softmax's floor: p = softmax + EPS.
const EPS: f64 = 1e-8;

/// `out = arcee_fusion(base, other)` as `out_dtype`, the softmax and KL along rows of `row_len`
/// elements (the last axis; a 1-D tensor is one row). `threads`: 0 = all cores. Returns the
/// figures of `base`, `other` and the output as written.
pub fn arcee_fusion(
    base: Tensor,
    other: Tensor,
    row_len: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<Health> {
    let names = |i: usize| if i == 0 { "base" } else { "other" }.to_string();
    let n = common_length(&[base, other], names, out, out_dtype)?;
    if n == 0 {
        return Ok(Health::new(2));
    }
    if row_len == 0 || !n.is_multiple_of(row_len) {
        return Err(Error::InvalidArgument(format!(
            "arcee_fusion: row length {row_len} does not divide the {n} elements"
        )));
    }
    let threads = threads::resolve(threads);
    let mut imp = ScratchF32::new(n)?;
    let inputs = importance(base, other, row_len, &mut imp, threads);
    let tau = threshold(&imp, threads);
    let mut h = select(base, other, &imp, tau, out, out_dtype, threads);
    h.inputs = inputs;
    Ok(h)
}

/// `tau = median + 1.5 (Q3 - Q1)` of a non-empty `imp`, in float32: median = sorted[(n-1)//2],
/// Q1 = sorted[int(0.25 (n-1))], Q3 = sorted[int(0.75 (n-1))] (NaN sorted last).
fn threshold(imp: &[f32], threads: usize) -> f32 {
    let n = imp.len();
    let ranks = [
        (0.25 * (n - 1) as f64) as usize,
        (n - 1) / 2,
        (0.75 * (n - 1) as f64) as usize,
    ];
    let q: Vec<f32> = ranked_sampled(imp, &ranks, threads, ORDER_HI_BUCKETS, &order_key)
        .iter()
        .map(|r| order_key_value(r.key))
        .collect();
    let (q1, median, q3) = (q[0], q[1], q[2]);
    median + 1.5 * (q3 - q1)
}

/// Pass 1: `imp = |x - b| * KL(row)` for every row; returns the inputs' figures.
fn importance(
    base: Tensor,
    other: Tensor,
    row_len: usize,
    imp: &mut [f32],
    threads: usize,
) -> Vec<crate::kernels::Stats> {
    let ranges = threads::chunk_ranges(imp.len(), threads, row_len);
    let mut parts: Vec<Health> = ranges.iter().map(|_| Health::new(2)).collect();
    let mut tasks = Vec::with_capacity(ranges.len());
    let mut rest = imp;
    for (r, h) in ranges.iter().zip(parts.iter_mut()) {
        let (head, tail) = rest.split_at_mut(r.len());
        tasks.push((r.start, head, h));
        rest = tail;
    }
    threads::run_all(tasks, |(start, imp, h)| {
        with_simd_fma(
            #[inline(always)]
            || {
                let mut s = Rows::new(row_len);
                let mut local = Health::new(2);
                for (ri, row) in imp.chunks_mut(row_len).enumerate() {
                    let j0 = start + ri * row_len;
                    let x = Tensor {
                        data: other.elements(j0, row_len),
                        dtype: other.dtype,
                    };
                    let b = Tensor {
                        data: base.elements(j0, row_len),
                        dtype: base.dtype,
                    };
                    row_importance(x, b, &mut s, &mut local, row);
                }
                *h = local;
            },
        )
    });
    Health::sum(2, &parts).inputs
}

/// Per-thread scratch of the row pass: a whole row when it has at most `CACHE_ROW` elements
/// (loaded once, its exponentials computed once), else one segment.
struct Rows {
    xf: Vec<f32>,
    bf: Vec<f32>,
    xe: Vec<f64>,
    be: Vec<f64>,
    /// One segment's logs.
    t: Vec<f64>,
}

impl Rows {
    fn new(row_len: usize) -> Rows {
        let len = if row_len <= CACHE_ROW { row_len } else { SEG };
        Rows {
            xf: vec![0.0; len],
            bf: vec![0.0; len],
            xe: vec![0.0; len],
            be: vec![0.0; len],
            t: vec![0.0; len.min(SEG)],
        }
    }

    /// Load the f32 values of segment `o..o + len` (at `at` in the buffers).
    #[inline(always)]
    fn load(&mut self, x: Tensor, b: Tensor, o: usize, at: usize, len: usize) {
        load(x.dtype, x.elements(o, len), &mut self.xf[at..at + len]);
        load(b.dtype, b.elements(o, len), &mut self.bf[at..at + len]);
    }
}

/// The largest element (NaN when one is NaN, as torch's vectorized maximum): the running
/// maximum and whether a NaN was seen.
#[inline(always)]
fn max_of(v: &[f32], acc: (f32, bool)) -> (f32, bool) {
    // eight independent lanes: a select chain the compiler turns into vector max
    let (mut m, mut nan) = ([acc.0; 8], [acc.1; 8]);
    let mut c = v.chunks_exact(8);
    for g in &mut c {
        for l in 0..8 {
            m[l] = if g[l] > m[l] { g[l] } else { m[l] };
            nan[l] |= g[l].is_nan();
        }
    }
    for (l, &x) in c.remainder().iter().enumerate() {
        m[l] = if x > m[l] { x } else { m[l] };
        nan[l] |= x.is_nan();
    }
    let max = m
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (max, nan.iter().any(|&n| n))
}

/// `e = exp(f64(v) - max)` and the sum of `e` added to `lanes`.
#[inline(always)]
fn exps(v: &[f32], max: f64, e: &mut [f64], lanes: &mut [f64; 4]) {
    for (d, &x) in e.iter_mut().zip(v) {
        *d = exp(x as f64 - max);
    }
    let mut c = e.chunks_exact(4);
    for g in &mut c {
        for l in 0..4 {
            lanes[l] += g[l];
        }
    }
    for (l, &x) in c.remainder().iter().enumerate() {
        lanes[l] += x;
    }
}

/// `sum p ln(p / q)` of a segment added to `lanes` (`t`: scratch). Where every ratio of the
/// segment is within a factor sqrt 2 of 1 (close rows, the usual case) the log is
/// `two_atanh((p - q) / (p + q))`, one division fewer than `ln(p / q)`.
#[inline(always)]
fn kl_terms(xe: &[f64], be: &[f64], t: &mut [f64], ix: f64, ib: f64, lanes: &mut [f64; 4]) {
    // Map loops, one operation each, so that each vectorizes.
    let mut near = true;
    for ((t, &a), &b) in t.iter_mut().zip(xe).zip(be) {
        let (p, q) = (a * ix + EPS, b * ib + EPS);
        let f = (p - q) / (p + q);
        near &= f.abs() <= ATANH_MAX; // false for NaN
        *t = f;
    }
    if near {
        for f in t.iter_mut() {
            *f = two_atanh(*f);
        }
    } else {
        for ((t, &a), &b) in t.iter_mut().zip(xe).zip(be) {
            *t = ln((a * ix + EPS) / (b * ib + EPS));
        }
    }
    let mut cx = xe.chunks_exact(4);
    let mut cl = t.chunks_exact(4);
    for (gx, gl) in (&mut cx).zip(&mut cl) {
        for l in 0..4 {
            lanes[l] += (gx[l] * ix + EPS) * gl[l];
        }
    }
    for (l, (&a, &lr)) in cx.remainder().iter().zip(cl.remainder()).enumerate() {
        lanes[l] += (a * ix + EPS) * lr;
    }
}

/// One row's importance `|x - b| * float32(KL)` into `imp`, and the row's figures into `h`
/// (inputs: base, other).
#[inline(always)]
fn row_importance(x: Tensor, b: Tensor, s: &mut Rows, h: &mut Health, imp: &mut [f32]) {
    let m = imp.len();
    let kl = row_kl(x, b, s, h) as f32;
    let cached = m <= CACHE_ROW;
    for o in (0..m).step_by(SEG) {
        let len = SEG.min(m - o);
        let at = if cached { o } else { 0 };
        if !cached {
            s.load(x, b, o, 0, len);
        }
        let (xf, bf) = (&s.xf[at..at + len], &s.bf[at..at + len]);
        for ((d, &x), &b) in imp[o..o + len].iter_mut().zip(xf).zip(bf) {
            *d = (x - b).abs() * kl;
        }
    }
}

/// The KL of one row (float64), gathering the row's figures into `h` (inputs: base, other).
/// A cached row is left in `s.xf` and `s.bf`.
#[inline(always)]
fn row_kl(x: Tensor, b: Tensor, s: &mut Rows, h: &mut Health) -> f64 {
    let m = x.data.len() / x.dtype.size();
    let cached = m <= CACHE_ROW;
    let at = |o: usize| if cached { o } else { 0 };
    // 1. maxima
    let (mut mx, mut mb) = ((f32::NEG_INFINITY, false), (f32::NEG_INFINITY, false));
    for o in (0..m).step_by(SEG) {
        let len = SEG.min(m - o);
        s.load(x, b, o, at(o), len);
        h.inputs[0].add(scan(b.dtype, b.elements(o, len)));
        h.inputs[1].add(scan(x.dtype, x.elements(o, len)));
        mx = max_of(&s.xf[at(o)..at(o) + len], mx);
        mb = max_of(&s.bf[at(o)..at(o) + len], mb);
    }
    let mx = if mx.1 { f64::NAN } else { mx.0 as f64 };
    let mb = if mb.1 { f64::NAN } else { mb.0 as f64 };
    // 2. the exponentials' sums
    let (mut sx, mut sb) = ([0f64; 4], [0f64; 4]);
    for o in (0..m).step_by(SEG) {
        let (len, a) = (SEG.min(m - o), at(o));
        if !cached {
            s.load(x, b, o, 0, len);
        }
        exps(&s.xf[a..a + len], mx, &mut s.xe[a..a + len], &mut sx);
        exps(&s.bf[a..a + len], mb, &mut s.be[a..a + len], &mut sb);
    }
    let ix = 1.0 / ((sx[0] + sx[2]) + (sx[1] + sx[3]));
    let ib = 1.0 / ((sb[0] + sb[2]) + (sb[1] + sb[3]));
    // 3. the KL terms
    let mut kl = [0f64; 4];
    for o in (0..m).step_by(SEG) {
        let (len, a) = (SEG.min(m - o), at(o));
        if !cached {
            s.load(x, b, o, 0, len);
            let mut unused = [0f64; 4];
            exps(&s.xf[..len], mx, &mut s.xe[..len], &mut unused);
            exps(&s.bf[..len], mb, &mut s.be[..len], &mut unused);
        }
        kl_terms(
            &s.xe[a..a + len],
            &s.be[a..a + len],
            &mut s.t[..len],
            ix,
            ib,
            &mut kl,
        );
    }
    (kl[0] + kl[2]) + (kl[1] + kl[3])
}

/// Pass 2: `out = imp >= tau ? x : b`; returns the output's figures.
#[allow(clippy::too_many_arguments)]
fn select(
    base: Tensor,
    other: Tensor,
    imp: &[f32],
    tau: f32,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Health {
    let ranges = threads::chunk_ranges(imp.len(), threads, SEG);
    let osz = out_dtype.size();
    per_range(out, osz, &ranges, 2, |start, out, h| {
        with_avx2(
            #[inline(always)]
            || {
                let (mut xf, mut bf) = ([0f32; SEG], [0f32; SEG]);
                let n = out.len() / osz;
                let mut b = 0;
                while b < n {
                    let len = SEG.min(n - b);
                    let j0 = start + b;
                    load(other.dtype, other.elements(j0, len), &mut xf[..len]);
                    load(base.dtype, base.elements(j0, len), &mut bf[..len]);
                    let imp = &imp[j0..j0 + len];
                    for ((x, &bb), &i) in xf[..len].iter_mut().zip(&bf[..len]).zip(imp) {
                        // a bitwise blend: the compiler keeps it a vector select
                        let m = 0u32.wrapping_sub((i >= tau) as u32);
                        *x = f32::from_bits((x.to_bits() & m) | (bb.to_bits() & !m));
                    }
                    let dst = &mut out[b * osz..(b + len) * osz];
                    store(out_dtype, &xf[..len], dst);
                    h.output.add(scan(out_dtype, dst));
                    b += len;
                }
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::health::tests::{close, decode, encode, reference, same_bits};
    use crate::test_rng::Lcg;

    /// A compensated (Neumaier) sum: the reference's sums are exact to float64 rounding.
    fn exact_sum(v: impl Iterator<Item = f64>) -> f64 {
        let (mut s, mut c) = (0f64, 0f64);
        for x in v {
            let t = s + x;
            c += if s.abs() >= x.abs() {
                (s - t) + x
            } else {
                (x - t) + s
            };
            s = t;
        }
        s + c
    }

    /// The definition with the standard library's exp and ln, and exact sums.
    fn naive_kl(x: &[f32], b: &[f32]) -> f64 {
        let soft = |v: &[f32]| -> Vec<f64> {
            let m = if v.iter().any(|a| a.is_nan()) {
                f64::NAN
            } else {
                v.iter().fold(f64::NEG_INFINITY, |m, &a| m.max(a as f64))
            };
            let e: Vec<f64> = v.iter().map(|&a| (a as f64 - m).exp()).collect();
            let inv = 1.0 / exact_sum(e.iter().copied());
            e.iter().map(|&a| a * inv + EPS).collect()
        };
        let (p, q) = (soft(x), soft(b));
        exact_sum(p.iter().zip(&q).map(|(&p, &q)| p * (p / q).ln()))
    }

    fn naive(b: &[f32], x: &[f32], row_len: usize) -> Vec<f32> {
        let mut imp = Vec::with_capacity(b.len());
        for (xr, br) in x.chunks(row_len).zip(b.chunks(row_len)) {
            let kl = naive_kl(xr, br) as f32;
            imp.extend(xr.iter().zip(br).map(|(&x, &b)| (x - b).abs() * kl));
        }
        let mut sorted = imp.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(a.is_nan().cmp(&b.is_nan())));
        let n = sorted.len();
        let q1 = sorted[(0.25 * (n - 1) as f64) as usize];
        let med = sorted[(n - 1) / 2];
        let q3 = sorted[(0.75 * (n - 1) as f64) as usize];
        let tau = med + 1.5 * (q3 - q1);
        imp.iter()
            .zip(x.iter().zip(b))
            .map(|(&i, (&x, &b))| if i >= tau { x } else { b })
            .collect()
    }

    fn run(
        b: &[f32],
        x: &[f32],
        row_len: usize,
        d: FloatDtype,
        threads: usize,
    ) -> (Vec<f32>, Health) {
        let (bb, xb) = (encode(b, d), encode(x, d));
        let mut out = vec![0u8; b.len() * d.size()];
        let h = arcee_fusion(
            Tensor {
                data: &bb,
                dtype: d,
            },
            Tensor {
                data: &xb,
                dtype: d,
            },
            row_len,
            &mut out,
            d,
            threads,
        )
        .unwrap();
        (decode(&out, d), h)
    }

    /// Weight-like rows: the fine-tune a small perturbation of the base (roughly normal: the
    /// sum of three uniforms, so that some importances are outliers).
    fn models(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Lcg(seed);
        let mut normal = move || rng.unit() + rng.unit() + rng.unit();
        let b: Vec<f32> = (0..n).map(|_| normal() * 0.02).collect();
        let x = b.iter().map(|&v| v + normal() * 0.002).collect();
        (b, x)
    }

    #[test]
    fn row_kl_matches_the_definition() {
        let mut worst = 0f64;
        for (m, seed) in [
            (1usize, 1u64),
            (7, 2),
            (300, 3),
            (4096, 4),
            (CACHE_ROW + 3, 5),
            (70_000, 6),
        ] {
            for scale in [0.1f32, 1.0, 30.0] {
                let (b, x) = models(m, seed);
                let (b, x): (Vec<f32>, Vec<f32>) = (
                    b.iter().map(|v| v * scale).collect(),
                    x.iter().map(|v| v * scale).collect(),
                );
                let (bb, xb) = (encode(&b, FloatDtype::F32), encode(&x, FloatDtype::F32));
                let mut s = Rows::new(m);
                let mut h = Health::new(2);
                let kl = with_simd_fma(|| {
                    row_kl(
                        Tensor {
                            data: &xb,
                            dtype: FloatDtype::F32,
                        },
                        Tensor {
                            data: &bb,
                            dtype: FloatDtype::F32,
                        },
                        &mut s,
                        &mut h,
                    )
                });
                let want = naive_kl(&x, &b);
                // The KL of close rows is a sum of terms that cancel: both computations carry an
                // absolute error of a few float64 ulp of sum(p) = 1.
                let err = (kl - want).abs();
                assert!(err < 1e-13, "m={m} scale={scale}: {kl} vs {want}");
                worst = worst.max(err);
                assert!(close(h.inputs[1], reference(&xb, FloatDtype::F32)));
            }
        }
        eprintln!("largest KL difference: {worst:e}");
    }

    #[test]
    fn matches_the_definition_on_rows_of_every_length() {
        for &(rows, row_len) in &[
            (1usize, 1usize),
            (1, 7),
            (3, 5),
            (13, 257),
            (64, 1031),
            (2, CACHE_ROW + 5),
            (1, 70_001),
        ] {
            let (b, x) = models(rows * row_len, (rows * row_len) as u64);
            for d in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
                let (bd, xd) = (decode(&encode(&b, d), d), decode(&encode(&x, d), d));
                let want = decode(&encode(&naive(&bd, &xd, row_len), d), d);
                let (one, h1) = run(&b, &x, row_len, d, 1);
                let (three, h3) = run(&b, &x, row_len, d, 3);
                assert!(same_bits(&one, &want), "rows={rows} len={row_len} {d:?}");
                assert!(same_bits(&three, &one));
                assert_eq!(h1, h3);
                assert!(close(h1.inputs[0], reference(&encode(&b, d), d)));
                assert!(close(h1.output, reference(&encode(&one, d), d)));
                // some of x was taken, most of b kept
                if rows * row_len > 100 {
                    let from_x = one
                        .iter()
                        .zip(&xd)
                        .zip(&bd)
                        .filter(|((o, x), b)| o == x && x != b)
                        .count();
                    assert!(from_x > 0 && from_x < rows * row_len / 4, "{from_x}");
                }
            }
        }
    }

    #[test]
    fn quantiles_are_the_reference_order_statistics() {
        // n = 9: Q1 = sorted[2], median = sorted[4], Q3 = sorted[6]
        let v = [8.0, 3.0, 0.0, 5.0, 1.0, 7.0, 2.0, 6.0, 4.0];
        assert_eq!(threshold(&v, 1), 4.0 + 1.5 * (6.0 - 2.0));
        // n = 4: indices 0, 1, 2
        assert_eq!(
            threshold(&[3.0, -1.0, 10.0, 2.0], 1),
            2.0 + 1.5 * (3.0 + 1.0)
        );
        // NaN sorts last: n = 5, indices 1, 2, 3 of [-2, -0, 0, 9, NaN]
        let t = threshold(&[f32::NAN, 9.0, -0.0, 0.0, -2.0], 2);
        assert_eq!(t, 0.0 + 1.5 * (9.0 - 0.0));
        // a NaN quantile makes tau NaN (nothing is selected)
        assert!(threshold(&[f32::NAN, f32::NAN, 1.0], 1).is_nan());
        assert_eq!(threshold(&[5.0], 1), 5.0);
        // many ties, across threads
        let big: Vec<f32> = (0..300_001).map(|i| (i % 7) as f32).collect();
        let mut s = big.clone();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = s.len();
        let want = s[(n - 1) / 2]
            + 1.5 * (s[(0.75 * (n - 1) as f64) as usize] - s[(0.25 * (n - 1) as f64) as usize]);
        assert_eq!(threshold(&big, 3), want);
    }

    #[test]
    fn constant_tensors_take_the_model() {
        // equal models, and a constant shift: p == q, KL 0, importance 0 == tau everywhere
        for shift in [0.0f32, 0.25] {
            let b = vec![0.5f32; 4 * 300];
            let x: Vec<f32> = b.iter().map(|v| v + shift).collect();
            let (got, h) = run(&b, &x, 300, FloatDtype::F32, 2);
            assert_eq!(got, x);
            assert_eq!(h.output.nonfinite, 0);
        }
    }

    #[test]
    fn nan_and_inf_rows_keep_the_base_like_the_reference() {
        let (mut b, mut x) = models(8 * 64, 9);
        x[3] = f32::NAN; // row 0: KL NaN, importance NaN (never >= tau)
        b[64 + 5] = f32::INFINITY; // row 1: softmax of b NaN
        x[2 * 64 + 1] = f32::NEG_INFINITY; // row 2: exp(-inf) = 0, a finite KL
        let (got, h) = run(&b, &x, 64, FloatDtype::F32, 1);
        let want = naive(&b, &x, 64);
        assert!(same_bits(&got, &want));
        assert!(same_bits(&got[..64], &b[..64]));
        assert!(same_bits(&got[64..128], &b[64..128]));
        assert_eq!((h.inputs[0].nonfinite, h.inputs[1].nonfinite), (1, 2));
    }

    #[test]
    fn bad_sizes_are_errors() {
        let b = encode(&[1.0, 2.0, 3.0, 4.0], FloatDtype::F32);
        let x = encode(&[1.0, 2.0, 3.0], FloatDtype::BF16);
        let bt = Tensor {
            data: &b,
            dtype: FloatDtype::F32,
        };
        let mut out = vec![0u8; 16];
        let e = arcee_fusion(
            bt,
            Tensor {
                data: &x,
                dtype: FloatDtype::BF16,
            },
            4,
            &mut out,
            FloatDtype::F32,
            1,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("other (BF16) has 6 bytes, expected 8"),
            "{e}"
        );
        for row_len in [0, 3, 5] {
            let e = arcee_fusion(bt, bt, row_len, &mut out, FloatDtype::F32, 1).unwrap_err();
            assert!(e.to_string().contains("does not divide"), "{e}");
        }
        assert!(arcee_fusion(bt, bt, 4, &mut out[..15], FloatDtype::F32, 1).is_err());
        let empty = Tensor {
            data: &[],
            dtype: FloatDtype::F32,
        };
        assert_eq!(
            arcee_fusion(empty, empty, 0, &mut [], FloatDtype::BF16, 1).unwrap(),
            Health::new(2)
        );
    }
}
