//! How fine-tunes of one base differ, per tensor: the figures `mergekitty inspect` aggregates.
//!
//! For a base `B` and models `X_1..X_N` of one tensor, the task vectors are `d_i = f32(X_i) -
//! f32(B)` (float32, as every merge kernel computes them). One call gathers:
//! - `base_sumsq = sum B^2` over the finite elements of the base;
//! - per model: `sumsq = sum d_i^2`, `sum4 = sum d_i^4` (the spread of DARE's kept norm),
//!   `nonzero` (elements with `d_i != 0`), `nonfinite` (elements where `d_i` is NaN or +-Inf:
//!   they count as 0 in every figure), and the TIES figures `ties_sumsq`, `ties_kept`: the
//!   squared norm and the count of the elements TIES keeps at `density`, those whose `|d_i|` is
//!   at least the `k`-th largest, `k = max(1, floor(density * n))`, ties at the threshold kept
//!   (the selection of [`sparsify::magnitude`], through the same radix select);
//! - per pair `i < j` (in the order (0,1), (0,2), .., (1,2), ..): `dot = sum d_i d_j`,
//!   `both_nonzero` (elements where both are nonzero) and `sign_agree` (of those, the elements
//!   where the signs are the same).
//!
//! Products are float32, accumulated in float64 (eight lanes per block, blocks summed in order).
//! Raw sums, not ratios, so that the caller can add them over the tensors of a layer before
//! dividing. The torch reference is `python/mergekitty/ops/task_vector_stats.py`.
//!
//! Memory: the magnitude threshold needs one task vector whole, in float32; it goes into the
//! caller's `scratch` (at least `n` float32 elements), one model after the other. The first
//! pass reads the base and every model once and fills `scratch` with `d_1` on the way; each
//! further model is read again (with the base) to refill it.

use crate::error::{Error, Result};
use crate::kernels::consensus::load;
use crate::kernels::gta::Tensor;
use crate::kernels::sparsify::{self, capped_key, keep_count, keys_at_ranks, NAN_KEY};
use crate::kernels::with_avx2;
use crate::threads;

/// Elements per block: the base and every model's block (f32) stay in L1/L2.
const BLOCK: usize = 2048;

/// The figures of one tensor (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskVectorStats {
    pub numel: u64,
    pub base_sumsq: f64,
    pub base_nonfinite: u64,
    pub sumsq: Vec<f64>,
    pub sum4: Vec<f64>,
    pub nonzero: Vec<u64>,
    pub nonfinite: Vec<u64>,
    pub ties_sumsq: Vec<f64>,
    pub ties_kept: Vec<u64>,
    pub dot: Vec<f64>,
    pub both_nonzero: Vec<u64>,
    pub sign_agree: Vec<u64>,
}

impl TaskVectorStats {
    fn new(models: usize) -> TaskVectorStats {
        let pairs = models * models.saturating_sub(1) / 2;
        TaskVectorStats {
            sumsq: vec![0.0; models],
            sum4: vec![0.0; models],
            nonzero: vec![0; models],
            nonfinite: vec![0; models],
            ties_sumsq: vec![0.0; models],
            ties_kept: vec![0; models],
            dot: vec![0.0; pairs],
            both_nonzero: vec![0; pairs],
            sign_agree: vec![0; pairs],
            ..TaskVectorStats::default()
        }
    }

    /// Add the first-pass sums of another range (the TIES figures are per tensor, not summed).
    fn add(&mut self, o: &TaskVectorStats) {
        self.numel += o.numel;
        self.base_sumsq += o.base_sumsq;
        self.base_nonfinite += o.base_nonfinite;
        let add_f = |a: &mut [f64], b: &[f64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        let add_u = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add_f(&mut self.sumsq, &o.sumsq);
        add_f(&mut self.sum4, &o.sum4);
        add_u(&mut self.nonzero, &o.nonzero);
        add_u(&mut self.nonfinite, &o.nonfinite);
        add_f(&mut self.dot, &o.dot);
        add_u(&mut self.both_nonzero, &o.both_nonzero);
        add_u(&mut self.sign_agree, &o.sign_agree);
    }
}

/// The pairs `(i, j)`, `i < j`, of `models` models, in the order the pair figures use.
pub fn pairs(models: usize) -> Vec<(usize, usize)> {
    (0..models)
        .flat_map(|i| (i + 1..models).map(move |j| (i, j)))
        .collect()
}

/// The figures of one tensor: `base` and `models` of one shape (any of F32, F16, BF16 each),
/// TIES at `density`, `scratch` at least as many float32 elements as the tensor (its contents
/// are overwritten), on `threads` threads (0: every core).
pub fn task_vector_stats(
    base: Tensor,
    models: &[Tensor],
    density: f64,
    scratch: &mut [f32],
    threads: usize,
) -> Result<TaskVectorStats> {
    sparsify::check_density(density, "density")?;
    if models.is_empty() {
        return Err(Error::InvalidArgument(
            "task vector figures need at least one model besides the base".into(),
        ));
    }
    let bsz = base.dtype.size();
    if !base.data.len().is_multiple_of(bsz) {
        return Err(Error::BufferLength {
            what: format!("base ({})", base.dtype.code()),
            expected: base.data.len() / bsz * bsz,
            actual: base.data.len(),
        });
    }
    let n = base.data.len() / bsz;
    for (i, m) in models.iter().enumerate() {
        if m.data.len() != n * m.dtype.size() {
            return Err(Error::BufferLength {
                what: format!("model {i} ({})", m.dtype.code()),
                expected: n * m.dtype.size(),
                actual: m.data.len(),
            });
        }
    }
    if scratch.len() < n {
        return Err(Error::InvalidArgument(format!(
            "scratch holds {} float32 elements, the tensor has {n}",
            scratch.len()
        )));
    }
    let scratch = &mut scratch[..n];
    let mut stats = first_pass(base, models, scratch, threads);
    for (i, &model) in models.iter().enumerate() {
        if i > 0 {
            refill(base, model, scratch, threads);
        }
        let (sumsq, kept) = ties_energy(scratch, density, stats.sumsq[i], threads);
        stats.ties_sumsq[i] = sumsq;
        stats.ties_kept[i] = kept;
    }
    Ok(stats)
}

/// Split `scratch` into the ranges of `0..scratch.len()` for `threads` threads.
fn split(scratch: &mut [f32], threads: usize) -> Vec<(usize, &mut [f32])> {
    let ranges = threads::chunk_ranges(scratch.len(), threads::resolve(threads), BLOCK);
    let mut out = Vec::with_capacity(ranges.len());
    let mut rest = scratch;
    for r in ranges {
        let (head, tail) = rest.split_at_mut(r.len());
        out.push((r.start, head));
        rest = tail;
    }
    out
}

/// The sums that need no threshold, with `d_1` written to `scratch`.
fn first_pass(
    base: Tensor,
    models: &[Tensor],
    scratch: &mut [f32],
    threads: usize,
) -> TaskVectorStats {
    let k = models.len();
    let tasks = split(scratch, threads);
    let mut parts: Vec<TaskVectorStats> = tasks.iter().map(|_| TaskVectorStats::new(k)).collect();
    let tasks: Vec<_> = tasks.into_iter().zip(parts.iter_mut()).collect();
    threads::run_all(tasks, |((start, out), part)| {
        with_avx2(
            #[inline(always)]
            || *part = first_pass_range(base, models, start, out),
        )
    });
    let mut total = TaskVectorStats::new(k);
    for p in &parts {
        total.add(p);
    }
    total
}

#[inline(always)]
fn first_pass_range(
    base: Tensor,
    models: &[Tensor],
    start: usize,
    out: &mut [f32],
) -> TaskVectorStats {
    let k = models.len();
    let pairs = pairs(k);
    let mut s = TaskVectorStats::new(k);
    let mut bv = [0f32; BLOCK];
    let mut dv = vec![0f32; k * BLOCK];
    let mut b = 0;
    while b < out.len() {
        let len = BLOCK.min(out.len() - b);
        let (lo, hi) = (start + b, start + b + len);
        let bv = &mut bv[..len];
        load(
            base.dtype,
            &base.data[lo * base.dtype.size()..hi * base.dtype.size()],
            bv,
        );
        let (sq, nonfinite) = finite_squares(bv);
        s.base_sumsq += sq;
        s.base_nonfinite += nonfinite;
        for (i, m) in models.iter().enumerate() {
            let d = &mut dv[i * BLOCK..i * BLOCK + len];
            s.nonfinite[i] += task_vector(*m, lo, bv, d);
            let (sumsq, sum4, nonzero) = powers(d);
            s.sumsq[i] += sumsq;
            s.sum4[i] += sum4;
            s.nonzero[i] += nonzero;
        }
        out[b..b + len].copy_from_slice(&dv[..len]);
        for (p, &(i, j)) in pairs.iter().enumerate() {
            let (dot, both, agree) = pair(
                &dv[i * BLOCK..i * BLOCK + len],
                &dv[j * BLOCK..j * BLOCK + len],
            );
            s.dot[p] += dot;
            s.both_nonzero[p] += both;
            s.sign_agree[p] += agree;
        }
        b += len;
    }
    s.numel = out.len() as u64;
    s
}

/// `d = f32(x) - bv` for the elements `lo..lo + bv.len()` of `x`, non-finite results set to 0;
/// returns how many were non-finite.
#[inline(always)]
fn task_vector(x: Tensor, lo: usize, bv: &[f32], d: &mut [f32]) -> u64 {
    let sz = x.dtype.size();
    load(x.dtype, &x.data[lo * sz..(lo + bv.len()) * sz], d);
    let mut nonfinite = 0u64;
    for (v, &b) in d.iter_mut().zip(bv) {
        let diff = *v - b;
        let finite = diff.is_finite();
        nonfinite += !finite as u64;
        *v = if finite { diff } else { 0.0 };
    }
    nonfinite
}

/// Write `d_i` (the model `x`'s task vector) to `scratch`.
fn refill(base: Tensor, x: Tensor, scratch: &mut [f32], threads: usize) {
    threads::run_all(split(scratch, threads), |(start, out)| {
        with_avx2(
            #[inline(always)]
            || {
                let mut bv = [0f32; BLOCK];
                for (c, chunk) in out.chunks_mut(BLOCK).enumerate() {
                    let lo = start + c * BLOCK;
                    let bv = &mut bv[..chunk.len()];
                    let sz = base.dtype.size();
                    load(base.dtype, &base.data[lo * sz..(lo + chunk.len()) * sz], bv);
                    task_vector(x, lo, bv, chunk);
                }
            },
        )
    });
}

/// `sum v^2` over the finite values, and the count of the others.
#[inline(always)]
fn finite_squares(v: &[f32]) -> (f64, u64) {
    let mut sq = [0f64; 8];
    let mut nonfinite = 0u64;
    let (chunks, rest) = v.as_chunks::<8>();
    for c in chunks {
        for l in 0..8 {
            let finite = c[l].is_finite();
            nonfinite += !finite as u64;
            sq[l] += if finite { (c[l] * c[l]) as f64 } else { 0.0 };
        }
    }
    for &x in rest {
        let finite = x.is_finite();
        nonfinite += !finite as u64;
        sq[0] += if finite { (x * x) as f64 } else { 0.0 };
    }
    (sq.iter().sum(), nonfinite)
}

/// `(sum d^2, sum d^4, count of d != 0)`.
#[inline(always)]
fn powers(d: &[f32]) -> (f64, f64, u64) {
    let mut s2 = [0f64; 8];
    let mut s4 = [0f64; 8];
    let mut nz = [0u64; 8];
    let (chunks, rest) = d.as_chunks::<8>();
    for c in chunks {
        for l in 0..8 {
            let q = (c[l] * c[l]) as f64;
            s2[l] += q;
            s4[l] += q * q;
            nz[l] += (c[l] != 0.0) as u64;
        }
    }
    for &x in rest {
        let q = (x * x) as f64;
        s2[0] += q;
        s4[0] += q * q;
        nz[0] += (x != 0.0) as u64;
    }
    (s2.iter().sum(), s4.iter().sum(), nz.iter().sum())
}

/// `(sum a b, elements where both are nonzero, of those the ones with the same sign)`.
#[inline(always)]
fn pair(a: &[f32], b: &[f32]) -> (f64, u64, u64) {
    let mut dot = [0f64; 8];
    let mut both = [0u64; 8];
    let mut agree = [0u64; 8];
    let one = |x: f32, y: f32| {
        let nz = (x != 0.0) & (y != 0.0);
        let same = ((x.to_bits() ^ y.to_bits()) >> 31) == 0;
        ((x * y) as f64, nz as u64, (nz & same) as u64)
    };
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..8 {
            let (p, n, s) = one(x[l], y[l]);
            dot[l] += p;
            both[l] += n;
            agree[l] += s;
        }
    }
    for (&x, &y) in ra.iter().zip(rb) {
        let (p, n, s) = one(x, y);
        dot[0] += p;
        both[0] += n;
        agree[0] += s;
    }
    (dot.iter().sum(), both.iter().sum(), agree.iter().sum())
}

/// The squared norm and the count of the elements of `d` that TIES keeps at `density`
/// (`sumsq`: the whole vector's, returned when everything is kept).
fn ties_energy(d: &[f32], density: f64, sumsq: f64, threads: usize) -> (f64, u64) {
    let n = d.len();
    if n == 0 || density <= 0.0 {
        return (0.0, 0);
    }
    if density >= 1.0 {
        return (sumsq, n as u64);
    }
    let k = keep_count(density, n);
    let t = keys_at_ranks(d, &[n - k], threads, NAN_KEY)[0];
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), BLOCK);
    let mut parts = vec![(0f64, 0u64); ranges.len()];
    let tasks: Vec<_> = ranges.into_iter().zip(parts.iter_mut()).collect();
    threads::run_all(tasks, |(r, part)| {
        with_avx2(
            #[inline(always)]
            || *part = kept_squares(&d[r], t),
        )
    });
    parts
        .iter()
        .fold((0.0, 0), |(s, c), &(ps, pc)| (s + ps, c + pc))
}

/// `sum v^2` and the count over the values whose magnitude key is at least `t`.
#[inline(always)]
fn kept_squares(v: &[f32], t: u32) -> (f64, u64) {
    let mut sq = [0f64; 8];
    let mut kept = [0u64; 8];
    let (chunks, rest) = v.as_chunks::<8>();
    for c in chunks {
        for l in 0..8 {
            let keep = capped_key(c[l], NAN_KEY) >= t;
            sq[l] += if keep { (c[l] * c[l]) as f64 } else { 0.0 };
            kept[l] += keep as u64;
        }
    }
    for &x in rest {
        let keep = capped_key(x, NAN_KEY) >= t;
        sq[0] += if keep { (x * x) as f64 } else { 0.0 };
        kept[0] += keep as u64;
    }
    (sq.iter().sum(), kept.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::FloatDtype;
    use crate::kernels::health::tests::encode;
    use crate::test_rng::Lcg;

    /// The definition, element by element in float64 over the float32 task vectors, with the
    /// TIES threshold from a sort.
    fn reference(base: &[f32], models: &[Vec<f32>], density: f64) -> TaskVectorStats {
        let k = models.len();
        let n = base.len();
        let mut s = TaskVectorStats::new(k);
        s.numel = n as u64;
        for &b in base {
            if b.is_finite() {
                s.base_sumsq += (b as f64) * (b as f64);
            } else {
                s.base_nonfinite += 1;
            }
        }
        let ds: Vec<Vec<f32>> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.iter()
                    .zip(base)
                    .map(|(&x, &b)| {
                        let d = x - b;
                        if d.is_finite() {
                            d
                        } else {
                            s.nonfinite[i] += 1;
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        for (i, d) in ds.iter().enumerate() {
            for &v in d {
                let q = (v as f64) * (v as f64);
                s.sumsq[i] += q;
                s.sum4[i] += q * q;
                s.nonzero[i] += (v != 0.0) as u64;
            }
            if n > 0 && density > 0.0 {
                let kk = if density >= 1.0 {
                    n
                } else {
                    ((density * n as f64).floor() as usize).clamp(1, n)
                };
                let mut mags: Vec<f32> = d.iter().map(|v| v.abs()).collect();
                mags.sort_by(|a, b| b.total_cmp(a));
                let t = mags[kk - 1];
                for &v in d {
                    if v.abs() >= t {
                        s.ties_sumsq[i] += (v as f64) * (v as f64);
                        s.ties_kept[i] += 1;
                    }
                }
            }
        }
        for (p, (i, j)) in pairs(k).into_iter().enumerate() {
            for (&a, &b) in ds[i].iter().zip(&ds[j]) {
                s.dot[p] += (a as f64) * (b as f64);
                if a != 0.0 && b != 0.0 {
                    s.both_nonzero[p] += 1;
                    s.sign_agree[p] += (a.is_sign_negative() == b.is_sign_negative()) as u64;
                }
            }
        }
        s
    }

    fn assert_close(got: &TaskVectorStats, want: &TaskVectorStats, what: &str) {
        assert_eq!(got.numel, want.numel, "{what}");
        assert_eq!(got.base_nonfinite, want.base_nonfinite, "{what}");
        assert_eq!(got.nonzero, want.nonzero, "{what}");
        assert_eq!(got.nonfinite, want.nonfinite, "{what}");
        assert_eq!(got.ties_kept, want.ties_kept, "{what}");
        assert_eq!(got.both_nonzero, want.both_nonzero, "{what}");
        assert_eq!(got.sign_agree, want.sign_agree, "{what}");
        let pairs = [
            (&got.sumsq, &want.sumsq),
            (&got.sum4, &want.sum4),
            (&got.ties_sumsq, &want.ties_sumsq),
            (&got.dot, &want.dot),
        ];
        for (g, w) in pairs {
            for (a, b) in g.iter().zip(w.iter()) {
                // products are float32 here, float64 in the reference: 2^-24 relative each
                let tol = 1e-6 * b.abs() + 1e-30;
                assert!((a - b).abs() <= tol, "{what}: {g:?} vs {w:?}");
            }
        }
        let (a, b) = (got.base_sumsq, want.base_sumsq);
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{what}: base {a} vs {b}");
    }

    /// A base and `k` fine-tunes: base values around 0.02, changes around 0.002 (some exactly
    /// zero: a fine-tune leaves most bf16 values as they were).
    fn family(n: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = Lcg(seed);
        let base: Vec<f32> = (0..n).map(|_| rng.unit() * 0.04 - 0.02).collect();
        let models = (0..k)
            .map(|_| {
                base.iter()
                    .map(|&b| {
                        let r = rng.unit();
                        if r < -0.6 {
                            b
                        } else {
                            b + r * 0.005
                        }
                    })
                    .collect()
            })
            .collect();
        (base, models)
    }

    fn run(
        base: &[u8],
        bd: FloatDtype,
        models: &[(Vec<u8>, FloatDtype)],
        density: f64,
        threads: usize,
    ) -> TaskVectorStats {
        let n = base.len() / bd.size();
        let mut scratch = vec![0f32; n + 3];
        let ms: Vec<Tensor> = models
            .iter()
            .map(|(d, t)| Tensor { data: d, dtype: *t })
            .collect();
        task_vector_stats(
            Tensor {
                data: base,
                dtype: bd,
            },
            &ms,
            density,
            &mut scratch,
            threads,
        )
        .unwrap()
    }

    #[test]
    fn matches_the_definition() {
        for &n in &[0usize, 1, 7, 2049, 70_001, 300_007] {
            for &k in &[1usize, 2, 3] {
                let (base, models) = family(n, k, (n * 7 + k) as u64);
                for d in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
                    // the values as the dtype holds them
                    let eb = encode(&base, d);
                    let em: Vec<(Vec<u8>, FloatDtype)> =
                        models.iter().map(|m| (encode(m, d), d)).collect();
                    let decode = |b: &[u8]| {
                        let mut v = vec![0f32; b.len() / d.size()];
                        load(d, b, &mut v);
                        v
                    };
                    let rb = decode(&eb);
                    let rm: Vec<Vec<f32>> = em.iter().map(|(b, _)| decode(b)).collect();
                    for density in [0.0, 0.1, 0.5, 1.0] {
                        let want = reference(&rb, &rm, density);
                        for threads in [1, 3] {
                            let got = run(&eb, d, &em, density, threads);
                            assert_close(
                                &got,
                                &want,
                                &format!("n={n} k={k} {d:?} density={density} threads={threads}"),
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn mixed_dtypes_and_nonfinite() {
        let (mut base, mut models) = family(5000, 2, 9);
        base[10] = f32::NAN;
        models[0][20] = f32::INFINITY;
        models[1][30] = f32::NAN;
        let want = reference(&base, &models, 0.3);
        assert_eq!(want.base_nonfinite, 1);
        assert_eq!(want.nonfinite, [2, 2]); // the base's NaN and the model's own
        let em = vec![
            (encode(&models[0], FloatDtype::F32), FloatDtype::F32),
            (encode(&models[1], FloatDtype::F32), FloatDtype::F32),
        ];
        let got = run(
            &encode(&base, FloatDtype::F32),
            FloatDtype::F32,
            &em,
            0.3,
            2,
        );
        assert_close(&got, &want, "nonfinite");
        // a bf16 base with f32 models: the base as bf16 holds it
        let bb = encode(&base, FloatDtype::BF16);
        let mut rb = vec![0f32; base.len()];
        load(FloatDtype::BF16, &bb, &mut rb);
        let got = run(&bb, FloatDtype::BF16, &em, 0.3, 1);
        assert_close(&got, &reference(&rb, &models, 0.3), "mixed");
    }

    #[test]
    fn explicit_values() {
        // d_1 = [1, -2, 0, 4], d_2 = [1, 3, 3, -4] over a zero base
        let base = encode(&[0.0, 0.0, 0.0, 0.0], FloatDtype::F32);
        let m1 = encode(&[1.0, -2.0, 0.0, 4.0], FloatDtype::F32);
        let m2 = encode(&[1.0, 3.0, 3.0, -4.0], FloatDtype::F32);
        let s = run(
            &base,
            FloatDtype::F32,
            &[(m1, FloatDtype::F32), (m2, FloatDtype::F32)],
            0.5,
            1,
        );
        assert_eq!(s.sumsq, [21.0, 35.0]);
        assert_eq!(s.sum4, [1.0 + 16.0 + 256.0, 1.0 + 81.0 + 81.0 + 256.0]);
        assert_eq!(s.nonzero, [3, 4]);
        assert_eq!(s.dot, [1.0 - 6.0 - 16.0]);
        assert_eq!((s.both_nonzero[0], s.sign_agree[0]), (3, 1));
        // the top 2 magnitudes: 4 and -2 (16 + 4 of 21); 4 and both 3s (the tie is kept)
        assert_eq!(s.ties_sumsq, [20.0, 34.0]);
        assert_eq!(s.ties_kept, [2, 3]);
        assert_eq!(pairs(3), [(0, 1), (0, 2), (1, 2)]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let base = encode(&[0.0; 4], FloatDtype::F32);
        let m = encode(&[0.0; 3], FloatDtype::F32);
        let mut scratch = vec![0f32; 4];
        let t = |d| Tensor {
            data: d,
            dtype: FloatDtype::F32,
        };
        let e = task_vector_stats(t(&base), &[t(&m)], 0.5, &mut scratch, 1).unwrap_err();
        assert!(e.to_string().contains("model 0"), "{e}");
        let e = task_vector_stats(t(&base), &[], 0.5, &mut scratch, 1).unwrap_err();
        assert!(e.to_string().contains("at least one model"), "{e}");
        let e = task_vector_stats(t(&base), &[t(&base)], f64::NAN, &mut scratch, 1).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        let e = task_vector_stats(t(&base), &[t(&base)], 0.5, &mut scratch[..2], 1).unwrap_err();
        assert!(e.to_string().contains("scratch"), "{e}");
        let e = task_vector_stats(t(&base[..5]), &[t(&base)], 0.5, &mut scratch, 1).unwrap_err();
        assert!(e.to_string().contains("base"), "{e}");
    }
}
