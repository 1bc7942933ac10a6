//! Fused generalized task arithmetic (GTA): sparsify + combine straight from the model tensors.
//!
//! The unfused path materializes every task vector `d_i = f32(x_i) - f32(b)` as a float32
//! tensor, copies it for the in-place sparsifier, and combines. Here the inputs (F32/F16/BF16,
//! typically the memory-mapped safetensors data) are read directly:
//!
//! - [`thresholds`]: the exact order statistics of `|d_i|` that magnitude (TIES) and
//!   Breadcrumbs need, for all models at once: a strided ~1/64 sample of the keys picks a key
//!   band around each rank, one full pass (reading `x_1..x_k` and `b` once) counts the keys
//!   below each band and collects those inside it, and the exact key is selected from the band.
//!   A model whose band misses (rare), and small tensors, take the exact two-pass radix select
//!   (pass 1: a histogram of the high 16 key bits; pass 2: of the low 16 bits inside the
//!   boundary buckets only).
//! - [`combine`]: one pass computing `d_i`, each model's sparsification (none, a magnitude band,
//!   DARE's Bernoulli mask, or DELLA's rank-dependent mask per row), the (sign-consensus)
//!   combination and `out = b + lambda * M` in the output dtype.
//!
//! Every per-element operation is the same float32 operation, in the same order, as the
//! unfused path (`weighted_sum([x, b], [1, -1])`, the sparsifiers of `sparsify.rs`, and
//! `consensus::combine_into`), so the results are bit-identical to it and do not depend on the
//! thread count. The L1 rescale modes need global sums and are not offered here.
//!
//! The combine pass also returns the call's [`Health`]: the loops that load every input block
//! and compute every output block sum their squares as they go (with AVX2, `gta_simd`; the
//! portable loops scan each block after it, while it is in L1). The order statistics' passes
//! take no figures: the combine pass reads every element of every input once.

use crate::dtype::{bf16_to_f32, f16_to_f32, FloatDtype};
use crate::error::{Error, Result};
use crate::kernels::consensus::{load, store};
use crate::kernels::gta_simd::{self, Keep};
use crate::kernels::health::{
    block_stats, out_squares_stand_in, scan, squares, squares_f32, Health,
};
use crate::kernels::random::Stream;
use crate::kernels::sparsify::{
    capped_key, check_density, della_probabilities, della_row, locate, RowScratch, HI_BUCKETS,
    INF_KEY, LO_BUCKETS, NAN_KEY,
};
use crate::kernels::with_avx2;
use crate::threads;

/// Elements per inner block of the element-wise passes.
const BLOCK: usize = 1024;
/// Per-thread u32 histograms are flushed into u64 totals at least this often (elements).
const FLUSH: usize = 1 << 30;

/// One input tensor: little-endian bytes and their dtype.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    pub data: &'a [u8],
    pub dtype: FloatDtype,
}

impl<'a> Tensor<'a> {
    /// The bytes of elements `start..start + len`.
    #[inline(always)]
    pub(crate) fn elements(&self, start: usize, len: usize) -> &'a [u8] {
        let sz = self.dtype.size();
        &self.data[start * sz..(start + len) * sz]
    }
}

/// How magnitudes are ranked (docs/kernels.md): magnitude (TIES) counts NaN as larger than
/// everything; Breadcrumbs ranks `nan_to_num(|d|, nan=inf)` (NaN as +inf, +inf as f32::MAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyMode {
    Magnitude,
    Outliers,
}

impl KeyMode {
    pub fn parse(s: &str) -> Result<KeyMode> {
        match s {
            "magnitude" => Ok(KeyMode::Magnitude),
            "outliers" => Ok(KeyMode::Outliers),
            other => Err(Error::InvalidArgument(format!(
                "key mode must be \"magnitude\" or \"outliers\", got {other:?}"
            ))),
        }
    }

    fn cap(self) -> u32 {
        match self {
            KeyMode::Magnitude => NAN_KEY,
            KeyMode::Outliers => INF_KEY,
        }
    }
}

/// One model's sparsification inside [`combine`].
#[derive(Clone, Debug, PartialEq)]
pub enum Sparsify {
    /// The task vector as is.
    None,
    /// Keep `lo <= key(|d|) < hi` (keys as [`thresholds`] returns them, ranked per `mode`);
    /// magnitude is `Band { lo: t, hi: u32::MAX }`, all-zero is `Band { lo: u32::MAX, .. }`.
    Band { lo: u32, hi: u32, mode: KeyMode },
    /// DARE: keep element j when `uniform(j) < p`; `inverse` divides the kept values by `p`.
    Random {
        p: f32,
        stream: Stream,
        inverse: bool,
    },
    /// DELLA: per row, keep probability from the stable rank of `|d|`; `inverse` divides by it.
    Della {
        density: f64,
        epsilon: f64,
        stream: Stream,
        inverse: bool,
    },
}

fn element_count(xs: &[Tensor], base: Tensor) -> Result<usize> {
    let n = base.data.len() / base.dtype.size();
    if n * base.dtype.size() != base.data.len() {
        return Err(Error::RaggedOutput {
            len: base.data.len(),
            dtype: base.dtype.code(),
        });
    }
    for (i, x) in xs.iter().enumerate() {
        if x.data.len() != n * x.dtype.size() {
            return Err(Error::BufferLength {
                what: format!("xs[{i}] ({})", x.dtype.code()),
                expected: n * x.dtype.size(),
                actual: x.data.len(),
            });
        }
    }
    Ok(n)
}

/// `d = f32(x) - f32(b)` for `len` elements from `start` (`bv` holds f32(b) already).
#[inline(always)]
fn task_vector(x: Tensor, start: usize, bv: &[f32], d: &mut [f32]) {
    let sz = x.dtype.size();
    let len = bv.len();
    load(x.dtype, &x.data[start * sz..(start + len) * sz], d);
    d.iter_mut().zip(bv).for_each(|(v, &b)| *v -= b);
}

/// `dst = f32(src)`, returning the sum of the squares of the values (the health figures).
#[inline(always)]
pub(crate) fn load_squares(dtype: FloatDtype, src: &[u8], dst: &mut [f32]) -> f64 {
    let (h, sq) = gta_simd::load_squares(dtype, src, dst);
    let rest = &src[h * dtype.size()..];
    load(dtype, rest, &mut dst[h..]);
    sq + squares(dtype, rest)
}

// ---------------------------------------------------------------------------------------
// Order statistics
// ---------------------------------------------------------------------------------------

/// Histograms (one per active model, `nb` buckets each) of `bucket(model, key)` over all
/// elements, computed in parallel and summed.
#[allow(clippy::too_many_arguments)]
fn histograms(
    xs: &[Tensor],
    base: Tensor,
    active: &[(usize, u32)],
    n: usize,
    nb: usize,
    sparse: bool,
    threads: usize,
    bucket: impl Fn(usize, u32) -> u32 + Sync,
) -> Vec<Vec<u64>> {
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), BLOCK);
    let mut per_thread: Vec<Vec<Vec<u64>>> = vec![Vec::new(); ranges.len()];
    let tasks: Vec<_> = ranges.into_iter().zip(per_thread.iter_mut()).collect();
    let k = active.len();
    threads::run_all(tasks, |(r, totals)| {
        with_avx2(
            #[inline(always)]
            || {
                *totals = vec![vec![0u64; nb]; k];
                // Two histograms per model (even and odd elements) so that runs of equal keys do
                // not serialize on one counter; one extra bucket (index nb) for skipped elements.
                let mut hist = vec![vec![0u32; 2 * (nb + 1)]; k];
                let mut bv = [0f32; BLOCK];
                let mut keys = vec![[0u32; BLOCK]; k];
                let mut d = [0f32; BLOCK];
                let mut since_flush = 0usize;
                let mut b = r.start;
                while b < r.end {
                    let len = BLOCK.min(r.end - b);
                    let bv = &mut bv[..len];
                    load(
                        base.dtype,
                        &base.data[b * base.dtype.size()..(b + len) * base.dtype.size()],
                        bv,
                    );
                    for (a, &(mi, cap)) in active.iter().enumerate() {
                        let d = &mut d[..len];
                        task_vector(xs[mi], b, bv, d);
                        for (kk, &v) in keys[a][..len].iter_mut().zip(d.iter()) {
                            *kk = bucket(a, capped_key(v, cap)).min(nb as u32);
                        }
                    }
                    if sparse {
                        // Most elements are skipped: branch (predictable) instead of counting them.
                        for (h, kk) in hist.iter_mut().zip(keys.iter()) {
                            for &key in &kk[..len] {
                                if (key as usize) < nb {
                                    if let Some(c) = h.get_mut(key as usize) {
                                        *c += 1;
                                    }
                                }
                            }
                        }
                    } else {
                        // Interleave models and even/odd elements: independent counters.
                        for (h, kk) in hist.iter_mut().zip(keys.iter()) {
                            let (h0, h1) = h.split_at_mut(nb + 1);
                            let mut pairs = kk[..len].chunks_exact(2);
                            for p in &mut pairs {
                                if let (Some(a), Some(c)) =
                                    (h0.get_mut(p[0] as usize), h1.get_mut(p[1] as usize))
                                {
                                    *a += 1;
                                    *c += 1;
                                }
                            }
                            for &key in pairs.remainder() {
                                if let Some(c) = h0.get_mut(key as usize) {
                                    *c += 1;
                                }
                            }
                        }
                    }
                    since_flush += len;
                    b += len;
                    if since_flush >= FLUSH || b >= r.end {
                        for (t, h) in totals.iter_mut().zip(hist.iter_mut()) {
                            let (h0, h1) = h.split_at_mut(nb + 1);
                            for ((tt, a), c) in t.iter_mut().zip(h0.iter_mut()).zip(h1.iter_mut()) {
                                *tt += *a as u64 + *c as u64;
                                *a = 0;
                                *c = 0;
                            }
                        }
                        since_flush = 0;
                    }
                }
            },
        )
    });
    let mut total = vec![vec![0u64; nb]; k];
    for t in per_thread {
        for (acc, h) in total.iter_mut().zip(t) {
            for (a, c) in acc.iter_mut().zip(h) {
                *a += c;
            }
        }
    }
    total
}

/// For each model i, the magnitude keys of `|f32(x_i) - f32(b)|` at the ascending ranks
/// `ranks[i]` (each below n, at most two per model; an empty list skips the model), ranked as
/// `modes[i]` says. The key of a finite magnitude is its float32 bit pattern.
pub fn thresholds(
    xs: &[Tensor],
    base: Tensor,
    ranks: &[Vec<usize>],
    modes: &[KeyMode],
    threads: usize,
) -> Result<Vec<Vec<u32>>> {
    if ranks.len() != xs.len() || modes.len() != xs.len() {
        return Err(Error::InvalidArgument(format!(
            "gta_thresholds: {} inputs, {} rank lists, {} modes",
            xs.len(),
            ranks.len(),
            modes.len()
        )));
    }
    let n = element_count(xs, base)?;
    for (i, r) in ranks.iter().enumerate() {
        if r.len() > 2 {
            return Err(Error::InvalidArgument(format!(
                "gta_thresholds: at most two ranks per model (model {i} asks for {})",
                r.len()
            )));
        }
        if let Some(&bad) = r.iter().find(|&&x| x >= n) {
            return Err(Error::InvalidArgument(format!(
                "gta_thresholds: rank {bad} of model {i} is not below {n} elements"
            )));
        }
    }
    let active: Vec<(usize, u32)> = (0..xs.len())
        .filter(|&i| !ranks[i].is_empty())
        .map(|i| (i, modes[i].cap()))
        .collect();
    let mut result = vec![Vec::new(); xs.len()];
    if active.is_empty() {
        return Ok(result);
    }
    if n < SAMPLED_MIN_N {
        for (a, keys) in radix_select(xs, base, &active, ranks, n, threads)
            .into_iter()
            .enumerate()
        {
            result[active[a].0] = keys;
        }
        return Ok(result);
    }
    let (res, _) = sampled_select(xs, base, &active, ranks, n, threads, SAMPLE_SIGMAS);
    for (a, keys) in res.into_iter().enumerate() {
        result[active[a].0] = keys;
    }
    Ok(result)
}

/// Below this many elements the exact two-pass radix select runs directly.
const SAMPLED_MIN_N: usize = 1 << 20;
/// The sample: runs of `SAMPLE_RUN` elements every `SAMPLE_STRIDE` elements (a prime, so the
/// sample does not alias with row lengths), about 1/64 of the elements.
const SAMPLE_RUN: usize = 64;
const SAMPLE_STRIDE: usize = 4093;
/// Half-width of the key band, in standard deviations of the sample quantile.
const SAMPLE_SIGMAS: f64 = 7.0;

/// The key band around one rank and what the full pass found: `below` keys < lo, `eq_lo`
/// keys == lo, `eq_hi` keys == hi (when hi != lo), and the keys strictly inside (lo, hi).
struct Band {
    lo: u32,
    hi: u32,
    below: u64,
    eq_lo: u64,
    eq_hi: u64,
    inside: Vec<u32>,
    overflow: bool,
}

impl Band {
    fn empty(lo: u32, hi: u32) -> Band {
        Band {
            lo,
            hi,
            below: 0,
            eq_lo: 0,
            eq_hi: 0,
            inside: Vec::new(),
            overflow: false,
        }
    }
}

/// Exact order statistics by sampling: a strided sample of the keys picks, per rank, a key
/// band that contains the order statistic with very high probability; one full pass counts the
/// keys below each band and collects the keys inside it; the exact key is then selected from the
/// band. A model whose band misses a rank (or grows too large) goes through [`radix_select`].
/// Returns the keys per active model and how many models fell back.
#[allow(clippy::too_many_arguments)]
fn sampled_select(
    xs: &[Tensor],
    base: Tensor,
    active: &[(usize, u32)],
    ranks: &[Vec<usize>],
    n: usize,
    threads: usize,
    sigmas: f64,
) -> (Vec<Vec<u32>>, usize) {
    let k = active.len();
    let nthreads = threads::resolve(threads);
    // 1. The sample.
    let runs = n.div_ceil(SAMPLE_STRIDE);
    let st = nthreads.min(runs / 256).max(1);
    let per = runs.div_ceil(st);
    let mut parts: Vec<Vec<Vec<u32>>> = vec![Vec::new(); st];
    let tasks: Vec<_> = parts
        .iter_mut()
        .enumerate()
        .map(|(t, p)| (t * per..((t + 1) * per).min(runs), p))
        .collect();
    threads::run_all(tasks, |(r, out)| {
        with_avx2(
            #[inline(always)]
            || {
                *out = vec![Vec::with_capacity(r.len() * SAMPLE_RUN); k];
                let mut bv = [0f32; SAMPLE_RUN];
                let mut d = [0f32; SAMPLE_RUN];
                for j in r {
                    let s = j * SAMPLE_STRIDE;
                    let len = SAMPLE_RUN.min(n - s);
                    let bv = &mut bv[..len];
                    let sz = base.dtype.size();
                    load(base.dtype, &base.data[s * sz..(s + len) * sz], bv);
                    for (o, &(mi, cap)) in out.iter_mut().zip(active) {
                        let d = &mut d[..len];
                        task_vector(xs[mi], s, bv, d);
                        o.extend(d.iter().map(|&v| capped_key(v, cap)));
                    }
                }
            },
        )
    });
    let mut samples: Vec<Vec<u32>> = (0..k)
        .map(|a| {
            let mut v = Vec::with_capacity(parts.iter().map(|p| p[a].len()).sum());
            for p in &parts {
                v.extend_from_slice(&p[a]);
            }
            v
        })
        .collect();
    drop(parts);
    // Bands per active model, one per rank.
    let mut bands: Vec<Vec<(u32, u32)>> = vec![Vec::new(); k];
    let tasks: Vec<_> = samples
        .iter_mut()
        .zip(bands.iter_mut())
        .zip(active)
        .collect();
    threads::run_all(tasks, |((smp, out), &(mi, _))| {
        let m = smp.len();
        for &r in &ranks[mi] {
            let q = (r as f64 + 0.5) / n as f64;
            let sd = (q * (1.0 - q) / m as f64).sqrt();
            let delta = sigmas * sd + 8.0 / m as f64;
            let lo_q = (q - delta) * m as f64;
            let hi_q = (q + delta) * m as f64;
            let lo = if lo_q < 0.0 || m == 0 {
                0
            } else {
                let i = (lo_q.floor() as usize).min(m - 1);
                *smp.select_nth_unstable(i).1
            };
            let hi = if hi_q >= (m as f64 - 1.0) || m == 0 {
                u32::MAX
            } else {
                let i = (hi_q.ceil() as usize).min(m - 1);
                *smp.select_nth_unstable(i).1
            };
            out.push((lo, hi.max(lo)));
        }
    });
    drop(samples);
    // 2. The full pass.
    let ranges = threads::chunk_ranges(n, nthreads, BLOCK);
    let mut per_thread: Vec<Vec<Vec<Band>>> = ranges.iter().map(|_| Vec::new()).collect();
    let tasks: Vec<_> = ranges.into_iter().zip(per_thread.iter_mut()).collect();
    let bands = &bands;
    threads::run_all(tasks, |(r, out)| {
        with_avx2(
            #[inline(always)]
            || {
                let cap_len = r.len() / 4 + 4096;
                *out = bands
                    .iter()
                    .map(|bs| bs.iter().map(|&(lo, hi)| Band::empty(lo, hi)).collect())
                    .collect();
                let mut bv = [0f32; BLOCK];
                let mut keys = [0u32; BLOCK];
                let mut inside = [0u32; BLOCK];
                let mut d = [0f32; BLOCK];
                let mut b = r.start;
                while b < r.end {
                    let len = BLOCK.min(r.end - b);
                    let bv = &mut bv[..len];
                    let sz = base.dtype.size();
                    load(base.dtype, &base.data[b * sz..(b + len) * sz], bv);
                    for (bs, &(mi, cap)) in out.iter_mut().zip(active) {
                        let d = &mut d[..len];
                        task_vector(xs[mi], b, bv, d);
                        let keys = &mut keys[..len];
                        for (kk, &v) in keys.iter_mut().zip(d.iter()) {
                            *kk = capped_key(v, cap);
                        }
                        for band in bs.iter_mut() {
                            let (lo, hi) = (band.lo, band.hi);
                            let (mut below, mut eq_lo, mut eq_hi) = (0u32, 0u32, 0u32);
                            for &kk in keys.iter() {
                                below += (kk < lo) as u32;
                                eq_lo += (kk == lo) as u32;
                                eq_hi += (kk == hi) as u32;
                            }
                            band.below += below as u64;
                            band.eq_lo += eq_lo as u64;
                            band.eq_hi += eq_hi as u64;
                            if hi > lo.saturating_add(1) && !band.overflow {
                                // lo < key < hi  <=>  key - lo - 1 < hi - lo - 1 (wrapping).
                                let lo1 = lo + 1;
                                let w = hi - lo1;
                                // Few keys fall inside: test 16 at a time (vectorized), collect
                                // branch-free from the groups that have any.
                                let mut cnt = 0usize;
                                for c in keys.chunks(16) {
                                    let any = c
                                        .iter()
                                        .fold(false, |a, &kk| a | (kk.wrapping_sub(lo1) < w));
                                    if any {
                                        for &kk in c {
                                            if let Some(slot) = inside.get_mut(cnt) {
                                                *slot = kk;
                                            }
                                            cnt += (kk.wrapping_sub(lo1) < w) as usize;
                                        }
                                    }
                                }
                                band.inside.extend_from_slice(&inside[..cnt]);
                                if band.inside.len() > cap_len {
                                    band.overflow = true;
                                    band.inside = Vec::new();
                                }
                            }
                        }
                    }
                    b += len;
                }
            },
        )
    });
    // 3. Merge the per-thread bands and select.
    let mut merged: Vec<Vec<Band>> = Vec::with_capacity(k);
    for a in 0..k {
        let mut bs: Vec<Band> = Vec::new();
        for (j, &(lo, hi)) in bands[a].iter().enumerate() {
            let mut m = Band::empty(lo, hi);
            let total: usize = per_thread.iter().map(|t| t[a][j].inside.len()).sum();
            m.inside.reserve_exact(total);
            for t in per_thread.iter_mut() {
                let tb = &mut t[a][j];
                m.below += tb.below;
                m.eq_lo += tb.eq_lo;
                m.eq_hi += tb.eq_hi;
                m.overflow |= tb.overflow;
                m.inside.extend_from_slice(&tb.inside);
                tb.inside = Vec::new();
            }
            bs.push(m);
        }
        merged.push(bs);
    }
    drop(per_thread);
    let mut out: Vec<Option<Vec<u32>>> = vec![None; k];
    let tasks: Vec<_> = merged.iter_mut().zip(out.iter_mut()).zip(active).collect();
    threads::run_all(tasks, |((bs, o), &(mi, _))| {
        let keys: Option<Vec<u32>> = bs
            .iter_mut()
            .zip(&ranks[mi])
            .map(|(band, &r)| band_key(band, r as u64))
            .collect();
        *o = keys;
    });
    let missed: Vec<usize> = (0..k).filter(|&a| out[a].is_none()).collect();
    let fallbacks = missed.len();
    if !missed.is_empty() {
        let sub: Vec<(usize, u32)> = missed.iter().map(|&a| active[a]).collect();
        for (&a, keys) in missed
            .iter()
            .zip(radix_select(xs, base, &sub, ranks, n, threads))
        {
            out[a] = Some(keys);
        }
    }
    (
        out.into_iter().map(|o| o.unwrap_or_default()).collect(),
        fallbacks,
    )
}

/// The key at rank `r` from a merged band, or `None` when the band does not hold it.
fn band_key(band: &mut Band, r: u64) -> Option<u32> {
    if band.overflow || r < band.below {
        return None;
    }
    let mut t = r - band.below;
    if t < band.eq_lo {
        return Some(band.lo);
    }
    if band.hi == band.lo {
        return None;
    }
    t -= band.eq_lo;
    let len = band.inside.len() as u64;
    if t < len {
        return Some(*band.inside.select_nth_unstable(t as usize).1);
    }
    t -= len;
    if t < band.eq_hi {
        return Some(band.hi);
    }
    None
}

/// The exact two-pass radix select (pass 1: histograms of the high 16 key bits; pass 2: of the
/// low 16 bits inside the boundary buckets) for the given active models.
fn radix_select(
    xs: &[Tensor],
    base: Tensor,
    active: &[(usize, u32)],
    ranks: &[Vec<usize>],
    n: usize,
    threads: usize,
) -> Vec<Vec<u32>> {
    let active = active.to_vec();
    let hi = histograms(
        xs,
        base,
        &active,
        n,
        HI_BUCKETS,
        false,
        threads,
        |_, key| key >> 16,
    );
    // Per active model: the located (bucket, rank within) of each rank, and up to two buckets.
    let located: Vec<Vec<(usize, u64)>> = active
        .iter()
        .zip(&hi)
        .map(|(&(mi, _), h)| ranks[mi].iter().map(|&r| locate(h, r as u64)).collect())
        .collect();
    let buckets: Vec<[u32; 2]> = located
        .iter()
        .map(|l| {
            let b0 = l[0].0 as u32;
            let b1 = l.get(1).map_or(b0, |x| x.0 as u32);
            [b0, b1]
        })
        .collect();
    let nb = 2 * LO_BUCKETS;
    let lo = histograms(xs, base, &active, n, nb, true, threads, |a, key| {
        let h = key >> 16;
        let low = key & 0xffff;
        let [b0, b1] = buckets[a];
        if h == b0 {
            low
        } else if h == b1 {
            LO_BUCKETS as u32 + low
        } else {
            u32::MAX
        }
    });
    let mut result = vec![Vec::new(); active.len()];
    for (a, _) in active.iter().enumerate() {
        result[a] = located[a]
            .iter()
            .map(|&(b, within)| {
                let slot = if b as u32 == buckets[a][0] { 0 } else { 1 };
                let h = &lo[a][slot * LO_BUCKETS..(slot + 1) * LO_BUCKETS];
                let (low, _) = locate(h, within);
                ((b as u32) << 16) | low as u32
            })
            .collect();
    }
    result
}

// ---------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------

/// The fused merge of one tensor.
#[derive(Clone, Copy, Debug)]
pub struct Gta<'a> {
    pub xs: &'a [Tensor<'a>],
    pub base: Tensor<'a>,
    pub sparsify: &'a [Sparsify],
    pub weights: &'a [f64],
    /// Per model, a factor of its kept values (the L1 rescale), or empty for none: the values
    /// are multiplied by `weight * scale`, the normalization still divides by the weights.
    pub scales: &'a [f64],
    pub consensus: bool,
    pub normalize: bool,
    pub lambda: f32,
}

/// Per-thread scratch.
struct Scratch {
    bv: Vec<f32>,
    vals: Vec<f32>,
    s: Vec<f32>,
    m: Vec<f32>,
    dsum: Vec<f32>,
    u: Vec<f32>,
    rows: RowScratch,
}

impl Scratch {
    fn new(k: usize, len: usize) -> Scratch {
        Scratch {
            bv: vec![0.0; len],
            vals: vec![0.0; k * len],
            s: vec![0.0; len],
            m: vec![0.0; len],
            dsum: vec![0.0; len],
            u: vec![0.0; len],
            rows: RowScratch::default(),
        }
    }
}

/// `out = b + lambda * combine(sparsify_i(f32(x_i) - f32(b)), w_i)` written as `out_dtype`.
/// With any DELLA model the work goes row by row (`row_len` elements, the last dimension);
/// otherwise `row_len` is ignored. Returns the figures of `x_1..x_k`, then `b`, and the output.
pub fn combine(
    spec: &Gta,
    row_len: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<Health> {
    let k = spec.xs.len();
    if k == 0 || spec.sparsify.len() != k || spec.weights.len() != k {
        return Err(Error::InvalidArgument(format!(
            "gta_combine: {} inputs, {} sparsify specs, {} weights (at least one input)",
            k,
            spec.sparsify.len(),
            spec.weights.len()
        )));
    }
    let n = element_count(spec.xs, spec.base)?;
    let expected = n * out_dtype.size();
    if out.len() != expected {
        return Err(Error::BufferLength {
            what: format!("out ({})", out_dtype.code()),
            expected,
            actual: out.len(),
        });
    }
    let mut ptabs: Vec<Option<Vec<f32>>> = vec![None; k];
    for (i, s) in spec.sparsify.iter().enumerate() {
        match s {
            Sparsify::Random { p, .. } if p.is_nan() => {
                return Err(Error::InvalidArgument(format!(
                    "gta_combine: model {i}: random keep probability is NaN"
                )));
            }
            Sparsify::Della {
                density, epsilon, ..
            } => {
                check_density(*density, "density")?;
                check_density(*epsilon, "epsilon")?;
                if !(*density > 0.0 && *density < 1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "gta_combine: model {i}: DELLA density must be in (0, 1), got {density}"
                    )));
                }
                if !(density - epsilon > 0.0 && density + epsilon <= 1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "della needs 0 < density - epsilon and density + epsilon <= 1 \
                         (density={density}, epsilon={epsilon})"
                    )));
                }
                if row_len == 0 || !n.is_multiple_of(row_len) {
                    return Err(Error::InvalidArgument(format!(
                        "gta_combine: rows of {row_len} elements do not divide {n} elements"
                    )));
                }
                if row_len > u32::MAX as usize {
                    return Err(Error::InvalidArgument(format!(
                        "della: rows of {row_len} elements are too long (at most 2^32 - 1)"
                    )));
                }
                ptabs[i] = Some(della_probabilities(row_len, *density, *epsilon));
            }
            _ => {}
        }
    }
    let by_rows = ptabs.iter().any(|p| p.is_some());
    let unit = if by_rows { row_len } else { BLOCK };
    if !spec.scales.is_empty() && spec.scales.len() != k {
        return Err(Error::InvalidArgument(format!(
            "gta_combine: {k} inputs but {} scales",
            spec.scales.len()
        )));
    }
    let w32: Vec<f32> = spec.weights.iter().map(|&w| w as f32).collect();
    // what each model's values are multiplied by: its weight, times its scale when given
    let wv: Vec<f32> = if spec.scales.is_empty() {
        w32.clone()
    } else {
        spec.weights
            .iter()
            .zip(spec.scales)
            .map(|(&w, &s)| (w * s) as f32)
            .collect()
    };
    let sw = w32.iter().fold(0f32, |acc, &w| acc + w);
    let div = (spec.normalize && (sw as f64).abs() >= 1e-8).then_some(sw);
    let osz = out_dtype.size();
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), unit.max(1));
    let mut parts: Vec<Health> = ranges.iter().map(|_| Health::new(k + 1)).collect();
    let mut tasks = Vec::with_capacity(ranges.len());
    let mut rest = out;
    for (r, h) in ranges.into_iter().zip(parts.iter_mut()) {
        let (head, tail) = rest.split_at_mut(r.len() * osz);
        tasks.push((r, head, h));
        rest = tail;
    }
    let ptabs = &ptabs;
    let w32 = &w32;
    let wv = &wv;
    threads::run_all(tasks, |(r, out, h)| {
        with_avx2(
            #[inline(always)]
            || {
                let mut sc = Scratch::new(k, unit.max(1));
                // summed on this thread's stack: the parts share cache lines
                let mut local = Health::new(k + 1);
                let mut b = r.start;
                while b < r.end {
                    let len = unit.min(r.end - b);
                    let o = &mut out[(b - r.start) * osz..(b - r.start + len) * osz];
                    block(
                        spec, ptabs, w32, wv, div, b, len, &mut sc, o, out_dtype, &mut local,
                    );
                    b += len;
                }
                *h = local;
            },
        )
    });
    Ok(Health::sum(k + 1, &parts))
}

/// Sparsify one model's task vector block `d` (elements `start..start+len`) in place.
#[inline(always)]
fn sparsify_block(
    s: &Sparsify,
    ptab: Option<&[f32]>,
    start: usize,
    d: &mut [f32],
    u: &mut [f32],
    rows: &mut RowScratch,
) {
    match s {
        Sparsify::None => {}
        Sparsify::Band { lo, hi, mode } => {
            let (lo, hi, cap) = (*lo, *hi, mode.cap());
            for v in d.iter_mut() {
                let key = capped_key(*v, cap);
                *v = if key >= lo && key < hi { *v } else { 0.0 };
            }
        }
        Sparsify::Random { p, stream, inverse } => {
            let p = *p;
            let u = &mut u[..d.len()];
            stream.fill_uniform(start as u64, u);
            if *inverse {
                for (v, &r) in d.iter_mut().zip(u.iter()) {
                    *v = if r < p { *v / p } else { 0.0 };
                }
            } else {
                for (v, &r) in d.iter_mut().zip(u.iter()) {
                    *v = if r < p { *v } else { 0.0 };
                }
            }
        }
        Sparsify::Della {
            stream, inverse, ..
        } => {
            let Some(ptab) = ptab else { return };
            della_row(d, start as u64, stream, ptab, *inverse, rows);
        }
    }
}

/// For one model and one block: `d = f32(x) - b`, sparsified (none, a magnitude band or DARE's
/// mask), `v = w * d` (kept in `v` for the sign consensus) and `s = v` for the first model,
/// `s += v` for the others, in one pass. The same float32 operations, in the same order, as
/// `task_vector`, `sparsify_block` and the weighting in [`block`]. Returns the sum of the
/// squares of `f32(x)` (the health figures).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn model_pass(
    x: Tensor,
    start: usize,
    bv: &[f32],
    sp: &Sparsify,
    u: &mut [f32],
    w: f32,
    v: &mut [f32],
    s: &mut [f32],
    first: bool,
) -> f64 {
    let len = bv.len();
    let sz = x.dtype.size();
    let bytes = &x.data[start * sz..(start + len) * sz];
    let keep = match *sp {
        Sparsify::None => Keep::All,
        Sparsify::Band { lo, hi, mode } => Keep::Band {
            lo,
            hi,
            outliers: mode == KeyMode::Outliers,
        },
        Sparsify::Random { p, stream, inverse } => {
            stream.fill_uniform(start as u64, &mut u[..len]);
            Keep::Random { p, inverse }
        }
        // DELLA goes row by row through `sparsify_block`.
        Sparsify::Della { .. } => unreachable!("DELLA has no fused model pass"),
    };
    let u = &u[..len];
    let (h, sq) = gta_simd::model_pass(x.dtype, bytes, bv, u, keep, w, v, s, first);
    // the rest of the block (all of it without SIMD): the portable loop, then its squares
    let rest = &bytes[h * sz..];
    let (bv, u, v, s) = (&bv[h..], &u[h..], &mut v[h..len], &mut s[h..len]);
    // one call per input dtype, so each gets its own inlined load
    macro_rules! pass {
        ($ld:expr, $sz:expr) => {
            model_pass_with(rest, $ld, $sz, bv, keep, u, w, v, s, first)
        };
    }
    match x.dtype {
        FloatDtype::BF16 => pass!(|c: &[u8]| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])), 2),
        FloatDtype::F16 => pass!(|c: &[u8]| f16_to_f32(u16::from_le_bytes([c[0], c[1]])), 2),
        FloatDtype::F32 => pass!(|c: &[u8]| f32::from_le_bytes([c[0], c[1], c[2], c[3]]), 4),
    }
    sq + squares(x.dtype, rest)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn model_pass_with(
    bytes: &[u8],
    ld: impl Fn(&[u8]) -> f32 + Copy,
    sz: usize,
    bv: &[f32],
    keep: Keep,
    u: &[f32],
    w: f32,
    v: &mut [f32],
    s: &mut [f32],
    first: bool,
) {
    match keep {
        Keep::All => fused(bytes, ld, sz, bv, u, w, v, s, first, |d, _| d),
        Keep::Band { lo, hi, outliers } => {
            let cap = if outliers { INF_KEY } else { NAN_KEY };
            fused(bytes, ld, sz, bv, u, w, v, s, first, move |d, _| {
                let key = capped_key(d, cap);
                if key >= lo && key < hi {
                    d
                } else {
                    0.0
                }
            })
        }
        Keep::Random { p, inverse } => {
            if inverse {
                fused(bytes, ld, sz, bv, u, w, v, s, first, move |d, r| {
                    if r < p {
                        d / p
                    } else {
                        0.0
                    }
                })
            } else {
                fused(bytes, ld, sz, bv, u, w, v, s, first, move |d, r| {
                    if r < p {
                        d
                    } else {
                        0.0
                    }
                })
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fused(
    bytes: &[u8],
    ld: impl Fn(&[u8]) -> f32 + Copy,
    sz: usize,
    bv: &[f32],
    u: &[f32],
    w: f32,
    v: &mut [f32],
    s: &mut [f32],
    first: bool,
    keep: impl Fn(f32, f32) -> f32 + Copy,
) {
    let it = bytes
        .chunks_exact(sz)
        .zip(bv)
        .zip(u)
        .zip(v.iter_mut())
        .zip(s.iter_mut());
    if first {
        for ((((c, &b), &r), v), s) in it {
            let x = keep(ld(c) - b, r) * w;
            *v = x;
            *s = x;
        }
    } else {
        for ((((c, &b), &r), v), s) in it {
            let x = keep(ld(c) - b, r) * w;
            *v = x;
            *s += x;
        }
    }
}

/// One block (or row): task vectors, sparsification, combination, `b + lambda*M`, store; the
/// loops that load each input and compute the output also sum their squares into `health`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block(
    spec: &Gta,
    ptabs: &[Option<Vec<f32>>],
    w32: &[f32],
    wv: &[f32],
    div: Option<f32>,
    start: usize,
    len: usize,
    sc: &mut Scratch,
    out: &mut [u8],
    out_dtype: FloatDtype,
    health: &mut Health,
) {
    let stride = sc.bv.len();
    let base = spec.base;
    let bv = &mut sc.bv[..len];
    let bsz = base.dtype.size();
    let b_block = &base.data[start * bsz..(start + len) * bsz];
    let sq = load_squares(base.dtype, b_block, bv);
    health.inputs[spec.xs.len()].add(block_stats(sq, base.dtype, b_block));
    let s = &mut sc.s[..len];
    for (i, (&x, &w)) in spec.xs.iter().zip(wv).enumerate() {
        let sz = x.dtype.size();
        let x_block = &x.data[start * sz..(start + len) * sz];
        let v = if spec.consensus {
            &mut sc.vals[i * stride..i * stride + len]
        } else {
            &mut sc.vals[..len]
        };
        if ptabs[i].is_none() {
            // Everything but DELLA: one fused pass per model.
            let sq = model_pass(x, start, bv, &spec.sparsify[i], &mut sc.u, w, v, s, i == 0);
            health.inputs[i].add(block_stats(sq, x.dtype, x_block));
            continue;
        }
        let sq = load_squares(x.dtype, x_block, v);
        v.iter_mut().zip(bv.iter()).for_each(|(v, &b)| *v -= b);
        health.inputs[i].add(block_stats(sq, x.dtype, x_block));
        sparsify_block(
            &spec.sparsify[i],
            ptabs[i].as_deref(),
            start,
            v,
            &mut sc.u,
            &mut sc.rows,
        );
        // From here on exactly consensus::combine_range.
        v.iter_mut().for_each(|x| *x *= w);
        if i == 0 {
            s.copy_from_slice(v);
        } else {
            s.iter_mut().zip(v.iter()).for_each(|(a, &x)| *a += x);
        }
    }
    let m = &mut sc.m[..len];
    crate::kernels::consensus::merge_block(
        &sc.vals,
        stride,
        w32,
        s,
        m,
        &mut sc.dsum[..len],
        spec.consensus,
        spec.normalize,
        div,
    );
    let lambda = spec.lambda;
    let (h, sq) = gta_simd::rebase_squares(m, bv, lambda);
    m[h..]
        .iter_mut()
        .zip(bv[h..].iter())
        .for_each(|(x, &bb)| *x = bb + lambda * *x);
    store(out_dtype, m, out);
    health.output.add(if out_squares_stand_in(out_dtype) {
        block_stats(sq + squares_f32(&m[h..]), out_dtype, out)
    } else {
        scan(out_dtype, out)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::consensus::{self, Combine};
    use crate::kernels::sparsify;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    use crate::test_rng::Lcg as Rng;

    struct Lcg(Rng);
    impl Lcg {
        fn f32(&mut self) -> f32 {
            let v = self.0.unit();
            // Some ties and repeated values, as in real task vectors.
            if (self.0 .0 >> 20).is_multiple_of(7) {
                0.25
            } else {
                v
            }
        }
    }

    /// The unfused path: materialize d_i, sparsify with sparsify.rs, combine.
    #[allow(clippy::too_many_arguments)]
    fn unfused(
        xs: &[Vec<f32>],
        b: &[f32],
        kinds: &[&str],
        density: f64,
        row_len: usize,
        weights: &[f64],
        consensus_: bool,
        normalize: bool,
        lambda: f32,
    ) -> Vec<u8> {
        let n = b.len();
        let ds: Vec<Vec<u8>> = xs
            .iter()
            .zip(kinds)
            .enumerate()
            .map(|(i, (x, kind))| {
                let mut d: Vec<f32> = x.iter().zip(b).map(|(&x, &b)| x - b).collect();
                let st = Stream::new(7, &format!("t#{i}"));
                match *kind {
                    "magnitude" => sparsify::magnitude(&mut d, density, false, 1).unwrap(),
                    "outliers" => {
                        sparsify::magnitude_outliers(&mut d, density, 0.1, false, 1).unwrap()
                    }
                    "random" => {
                        sparsify::random_mask(&mut d, density, &st, sparsify::Rescale::Inverse, 1)
                            .unwrap()
                    }
                    "della" => sparsify::della(
                        &mut d,
                        n / row_len,
                        row_len,
                        density,
                        0.1,
                        &st,
                        sparsify::Rescale::Inverse,
                        1,
                    )
                    .unwrap(),
                    _ => {}
                }
                bytes(&d)
            })
            .collect();
        let refs: Vec<&[u8]> = ds.iter().map(|d| d.as_slice()).collect();
        let spec = Combine {
            deltas: &refs,
            weights,
            consensus: consensus_,
            normalize,
        };
        let bb = bytes(b);
        let mut out = vec![0u8; n * 4];
        consensus::combine_into(
            &spec,
            lambda,
            Some((&bb, FloatDtype::F32)),
            &mut out,
            FloatDtype::F32,
            1,
        )
        .unwrap();
        out
    }

    /// The SIMD loops (`gta_simd`, whole groups of 16 at the front) store exactly what the
    /// portable loops store, for every input dtype, kind of keep, first or later model, with
    /// NaN, infinities, signed zeros and a ragged tail; their squares are the inputs'.
    #[test]
    fn simd_loops_match_the_portable_ones() {
        use crate::kernels::health::block_stats;
        use crate::kernels::health::tests::{close, encode, reference};
        let n = 1000 + 13;
        let mut g = Lcg(Rng(17));
        let special = |i: usize, v: f32| match i % 101 {
            3 => f32::NAN,
            5 => f32::INFINITY,
            7 => f32::NEG_INFINITY,
            11 => -0.0,
            13 => 0.0,
            _ => v,
        };
        let xv: Vec<f32> = (0..n).map(|i| special(i, g.f32())).collect();
        let bv: Vec<f32> = (0..n).map(|i| special(i + 50, 0.5 * g.f32())).collect();
        let u: Vec<f32> = (0..n).map(|_| (g.f32() + 1.0) / 2.0).collect();
        let mid = capped_key(0.3, NAN_KEY);
        let keeps = [
            Keep::All,
            Keep::Band {
                lo: mid,
                hi: u32::MAX,
                outliers: false,
            },
            Keep::Band {
                lo: capped_key(0.1, INF_KEY),
                hi: capped_key(0.9, INF_KEY),
                outliers: true,
            },
            Keep::Band {
                lo: 0,
                hi: INF_KEY,
                outliers: true,
            },
            Keep::Band {
                lo: u32::MAX,
                hi: u32::MAX,
                outliers: false,
            },
            Keep::Random {
                p: 0.4,
                inverse: true,
            },
            Keep::Random {
                p: 0.4,
                inverse: false,
            },
        ];
        for dtype in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
            let xb = encode(&xv, dtype);
            let x = Tensor { data: &xb, dtype };
            // the base: loaded with its squares
            let bb = encode(&bv, dtype);
            let (mut plain, mut simd) = (vec![0f32; n], vec![0f32; n]);
            load(dtype, &bb, &mut plain);
            let sq = load_squares(dtype, &bb, &mut simd);
            assert_eq!(bits(&plain), bits(&simd), "{dtype:?} load");
            assert!(
                close(block_stats(sq, dtype, &bb), reference(&bb, dtype)),
                "{dtype:?} base"
            );
            for keep in keeps {
                for first in [true, false] {
                    let s0: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
                    let (mut v1, mut s1) = (vec![0f32; n], s0.clone());
                    let (mut v2, mut s2) = (vec![0f32; n], s0.clone());
                    let ld = |c: &[u8]| match dtype {
                        FloatDtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                        FloatDtype::BF16 => bf16_to_f32(u16::from_le_bytes([c[0], c[1]])),
                        FloatDtype::F16 => f16_to_f32(u16::from_le_bytes([c[0], c[1]])),
                    };
                    let sp = match keep {
                        Keep::All => Sparsify::None,
                        Keep::Band { lo, hi, outliers } => Sparsify::Band {
                            lo,
                            hi,
                            mode: if outliers {
                                KeyMode::Outliers
                            } else {
                                KeyMode::Magnitude
                            },
                        },
                        Keep::Random { p, inverse } => Sparsify::Random {
                            p,
                            stream: Stream::new(3, "t"),
                            inverse,
                        },
                    };
                    // the uniforms the pass draws for DARE (the others ignore them)
                    let mut uu = u.clone();
                    if let Sparsify::Random { stream, .. } = &sp {
                        stream.fill_uniform(0, &mut uu);
                    }
                    let sz = dtype.size();
                    model_pass_with(&xb, ld, sz, &plain, keep, &uu, 0.7, &mut v1, &mut s1, first);
                    let mut uu = u.clone();
                    let sq = model_pass(x, 0, &plain, &sp, &mut uu, 0.7, &mut v2, &mut s2, first);
                    let what = format!("{dtype:?} {keep:?} first={first}");
                    assert_eq!(bits(&v1), bits(&v2), "{what}: v");
                    assert_eq!(bits(&s1), bits(&s2), "{what}: s");
                    assert!(
                        close(block_stats(sq, dtype, &xb), reference(&xb, dtype)),
                        "{what}"
                    );
                }
            }
        }
        // the output: b + lambda * m
        let (mut m1, mut m2) = (xv.clone(), xv.clone());
        m1.iter_mut().zip(&bv).for_each(|(m, &b)| *m = b + 0.7 * *m);
        let (h, sq) = gta_simd::rebase_squares(&mut m2, &bv, 0.7);
        m2[h..]
            .iter_mut()
            .zip(&bv[h..])
            .for_each(|(m, &b)| *m = b + 0.7 * *m);
        assert_eq!(bits(&m1), bits(&m2), "rebase");
        let sq = sq + squares_f32(&m2[h..]);
        let ob = bytes(&m1);
        assert!(close(
            block_stats(sq, FloatDtype::F32, &ob),
            reference(&ob, FloatDtype::F32)
        ));
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matches_unfused() {
        let mut g = Lcg(Rng(3));
        let (rows, row_len) = (37, 3001);
        let n = rows * row_len;
        let b: Vec<f32> = (0..n).map(|_| g.f32()).collect();
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|_| b.iter().map(|&v| v + 0.1 * g.f32()).collect())
            .collect();
        let bb = bytes(&b);
        let xb: Vec<Vec<u8>> = xs.iter().map(|x| bytes(x)).collect();
        let xt: Vec<Tensor> = xb
            .iter()
            .map(|d| Tensor {
                data: d,
                dtype: FloatDtype::F32,
            })
            .collect();
        let base = Tensor {
            data: &bb,
            dtype: FloatDtype::F32,
        };
        let weights = [0.5, -0.3, 0.2];
        let density = 0.3;
        for kind in ["none", "magnitude", "outliers", "random", "della"] {
            for &consensus_ in &[false, true] {
                let expected = unfused(
                    &xs, &b, &[kind; 3], density, row_len, &weights, consensus_, true, 0.7,
                );
                let mode = if kind == "outliers" {
                    KeyMode::Outliers
                } else {
                    KeyMode::Magnitude
                };
                let target = (density * n as f64).floor() as usize;
                let ranks: Vec<Vec<usize>> = match kind {
                    "magnitude" => vec![vec![n - target]; 3],
                    "outliers" => {
                        let n_top = (0.1 * n as f64).floor() as usize;
                        let n_bot = n - target - n_top;
                        vec![vec![n_bot, n_bot + target]; 3]
                    }
                    _ => vec![vec![]; 3],
                };
                let keys = thresholds(&xt, base, &ranks, &[mode; 3], 2).unwrap();
                let keys1 = thresholds(&xt, base, &ranks, &[mode; 3], 1).unwrap();
                assert_eq!(keys, keys1);
                let sp: Vec<Sparsify> = (0..3)
                    .map(|i| {
                        let stream = Stream::new(7, &format!("t#{i}"));
                        match kind {
                            "magnitude" => Sparsify::Band {
                                lo: keys[i][0],
                                hi: u32::MAX,
                                mode,
                            },
                            "outliers" => Sparsify::Band {
                                lo: keys[i][0],
                                hi: keys[i][1],
                                mode,
                            },
                            "random" => Sparsify::Random {
                                p: density as f32,
                                stream,
                                inverse: true,
                            },
                            "della" => Sparsify::Della {
                                density,
                                epsilon: 0.1,
                                stream,
                                inverse: true,
                            },
                            _ => Sparsify::None,
                        }
                    })
                    .collect();
                let spec = Gta {
                    xs: &xt,
                    scales: &[],
                    base,
                    sparsify: &sp,
                    weights: &weights,
                    consensus: consensus_,
                    normalize: true,
                    lambda: 0.7,
                };
                for threads in [1, 2, 3] {
                    let mut out = vec![0u8; n * 4];
                    combine(&spec, row_len, &mut out, FloatDtype::F32, threads).unwrap();
                    assert!(
                        out == expected,
                        "{kind} consensus={consensus_} threads={threads}"
                    );
                }
            }
        }
    }

    /// Input bytes in `dtype` (BF16: the high half of the f32 bits, truncated).
    fn encode(v: &[f32], dtype: FloatDtype) -> Vec<u8> {
        match dtype {
            FloatDtype::BF16 => v
                .iter()
                .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
            _ => bytes(v),
        }
    }

    /// The oracle: every key, sorted.
    fn sorted_keys(x: &[u8], b: &[u8], dtype: FloatDtype, cap: u32) -> Vec<u32> {
        let n = b.len() / dtype.size();
        let (mut xv, mut bv) = (vec![0f32; n], vec![0f32; n]);
        load(dtype, x, &mut xv);
        load(dtype, b, &mut bv);
        let mut k: Vec<u32> = xv
            .iter()
            .zip(&bv)
            .map(|(&x, &b)| capped_key(x - b, cap))
            .collect();
        k.sort_unstable();
        k
    }

    /// Checks `thresholds` (and the sampled path with and without fallback) against the
    /// two-pass radix select and a full sort; returns how many models the sampled path sent
    /// to the fallback.
    fn check_thresholds(b: &[f32], xs: &[Vec<f32>], dtype: FloatDtype, what: &str) -> usize {
        let n = b.len();
        let bb = encode(b, dtype);
        let xb: Vec<Vec<u8>> = xs.iter().map(|x| encode(x, dtype)).collect();
        let xt: Vec<Tensor> = xb.iter().map(|d| Tensor { data: d, dtype }).collect();
        let base = Tensor { data: &bb, dtype };
        let k = xs.len();
        let modes: Vec<KeyMode> = (0..k)
            .map(|i| {
                if i % 2 == 0 {
                    KeyMode::Magnitude
                } else {
                    KeyMode::Outliers
                }
            })
            .collect();
        let mut fallbacks = 0;
        let rank_sets: Vec<Vec<Vec<usize>>> = vec![
            (0..k).map(|i| vec![n / 2 + i]).collect(),
            (0..k).map(|_| vec![0, n - 1]).collect(),
            (0..k).map(|i| vec![n / 10, n - n / 7 - i]).collect(),
            (0..k)
                .map(|i| if i == 1 { vec![] } else { vec![n - n / 100] })
                .collect(),
        ];
        for ranks in &rank_sets {
            let active: Vec<(usize, u32)> = (0..k)
                .filter(|&i| !ranks[i].is_empty())
                .map(|i| (i, modes[i].cap()))
                .collect();
            let radix = radix_select(&xt, base, &active, ranks, n, 2);
            for (a, &(mi, cap)) in active.iter().enumerate() {
                let sorted = sorted_keys(&xb[mi], &bb, dtype, cap);
                let want: Vec<u32> = ranks[mi].iter().map(|&r| sorted[r]).collect();
                assert_eq!(
                    radix[a], want,
                    "{what}: radix, model {mi}, ranks {:?}",
                    ranks[mi]
                );
            }
            for threads in [1, 3] {
                let got = thresholds(&xt, base, ranks, &modes, threads).unwrap();
                let (sampled, fb) =
                    sampled_select(&xt, base, &active, ranks, n, threads, SAMPLE_SIGMAS);
                fallbacks += fb;
                // Zero width: the band is a single sampled key, the fallback path is exercised.
                let (narrow, _) = sampled_select(&xt, base, &active, ranks, n, threads, 0.0);
                for (a, &(mi, _)) in active.iter().enumerate() {
                    assert_eq!(got[mi], radix[a], "{what}: thresholds, model {mi}");
                    assert_eq!(sampled[a], radix[a], "{what}: sampled, model {mi}");
                    assert_eq!(narrow[a], radix[a], "{what}: narrow, model {mi}");
                }
                for i in 0..k {
                    if ranks[i].is_empty() {
                        assert!(got[i].is_empty());
                    }
                }
            }
        }
        fallbacks
    }

    fn random_models(n: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut g = Lcg(Rng(seed));
        let b: Vec<f32> = (0..n).map(|_| g.f32()).collect();
        let xs = (0..k)
            .map(|_| b.iter().map(|&v| v + 0.01 * g.f32()).collect())
            .collect();
        (b, xs)
    }

    #[test]
    fn sampled_thresholds_random() {
        let n = SAMPLED_MIN_N + 12345;
        let (b, xs) = random_models(n, 3, 11);
        for dtype in [FloatDtype::F32, FloatDtype::BF16] {
            let fb = check_thresholds(&b, &xs, dtype, &format!("random {dtype:?}"));
            assert_eq!(fb, 0, "random data should not need the fallback");
        }
    }

    #[test]
    fn sampled_thresholds_ties_and_specials() {
        let n = SAMPLED_MIN_N + 777;
        let (b, _) = random_models(n, 1, 5);
        // All task-vector entries equal.
        let same: Vec<Vec<f32>> = vec![b.iter().map(|&v| v + 0.5).collect(); 2];
        check_thresholds(&b, &same, FloatDtype::F32, "all equal");
        // All zero.
        check_thresholds(&b, &[b.clone(), b.clone()], FloatDtype::BF16, "all zero");
        // A few distinct values.
        let few: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                (0..n)
                    .map(|j| [0.0f32, 0.25, -0.5, 1.0][(j * 7 + i) % 4] * ((j % 3) as f32))
                    .collect()
            })
            .collect();
        check_thresholds(&vec![0.0; n], &few, FloatDtype::BF16, "few distinct");
        // NaN and inf.
        let mut g = Lcg(Rng(9));
        let specials: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                b.iter()
                    .enumerate()
                    .map(|(j, &v)| match (j * 31 + i) % 5 {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => f32::NEG_INFINITY,
                        _ => v + g.f32(),
                    })
                    .collect()
            })
            .collect();
        check_thresholds(&b, &specials, FloatDtype::F32, "nan/inf");
    }

    #[test]
    fn sampled_thresholds_fallback_when_the_sample_misleads() {
        // The sampled runs see tiny task vectors, the rest large ones: every band misses.
        let n = SAMPLED_MIN_N + 4093 * 3;
        let b = vec![1.0f32; n];
        let mut g = Lcg(Rng(21));
        let xs: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                (0..n)
                    .map(|j| {
                        let scale = if j % SAMPLE_STRIDE < SAMPLE_RUN {
                            1e-3
                        } else {
                            1.0
                        };
                        1.0 + scale * g.f32()
                    })
                    .collect()
            })
            .collect();
        let fb = check_thresholds(&b, &xs, FloatDtype::F32, "adversarial");
        assert!(fb > 0, "the fallback should have been taken");
    }

    #[test]
    fn tiny_thresholds_match_sort() {
        for n in [1usize, 2, 5, 1000, 70_000] {
            let (b, xs) = random_models(n, 2, n as u64);
            let bb = bytes(&b);
            let xb: Vec<Vec<u8>> = xs.iter().map(|x| bytes(x)).collect();
            let xt: Vec<Tensor> = xb
                .iter()
                .map(|d| Tensor {
                    data: d,
                    dtype: FloatDtype::F32,
                })
                .collect();
            let base = Tensor {
                data: &bb,
                dtype: FloatDtype::F32,
            };
            let ranks = vec![vec![0, n - 1], vec![n / 2]];
            let modes = [KeyMode::Magnitude, KeyMode::Outliers];
            let got = thresholds(&xt, base, &ranks, &modes, 2).unwrap();
            for i in 0..2 {
                let sorted = sorted_keys(&xb[i], &bb, FloatDtype::F32, modes[i].cap());
                let want: Vec<u32> = ranks[i].iter().map(|&r| sorted[r]).collect();
                assert_eq!(got[i], want);
            }
        }
    }

    /// `cargo test --release bench_thresholds -- --ignored --nocapture`: the two-pass radix
    /// select against the sampled path on 3 x 50M bf16 elements.
    #[test]
    #[ignore]
    fn bench_thresholds() {
        let n = 50_000_000;
        let (b, xs) = random_models(n, 3, 1);
        let bb = encode(&b, FloatDtype::BF16);
        let xb: Vec<Vec<u8>> = xs.iter().map(|x| encode(x, FloatDtype::BF16)).collect();
        let xt: Vec<Tensor> = xb
            .iter()
            .map(|d| Tensor {
                data: d,
                dtype: FloatDtype::BF16,
            })
            .collect();
        let base = Tensor {
            data: &bb,
            dtype: FloatDtype::BF16,
        };
        let ranks = vec![vec![n / 2]; 3];
        let active: Vec<(usize, u32)> = (0..3).map(|i| (i, NAN_KEY)).collect();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let r = radix_select(&xt, base, &active, &ranks, n, 0);
            let t_old = t.elapsed();
            let t = std::time::Instant::now();
            let (s, fb) = sampled_select(&xt, base, &active, &ranks, n, 0, SAMPLE_SIGMAS);
            let t_new = t.elapsed();
            assert_eq!(r, s);
            eprintln!(
                "radix {t_old:?} sampled {t_new:?} ratio {:.2} fallbacks {fb}",
                t_old.as_secs_f64() / t_new.as_secs_f64()
            );
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let b = bytes(&[1.0, 2.0]);
        let x = bytes(&[1.0]);
        let t = |d: &'static [u8]| Tensor {
            data: d,
            dtype: FloatDtype::F32,
        };
        let (b, x): (&'static [u8], &'static [u8]) = (b.leak(), x.leak());
        assert!(thresholds(&[t(x)], t(b), &[vec![0]], &[KeyMode::Magnitude], 1).is_err());
        assert!(thresholds(&[t(b)], t(b), &[vec![2]], &[KeyMode::Magnitude], 1).is_err());
        let mut out = vec![0u8; 8];
        let spec = Gta {
            xs: &[t(b)],
            scales: &[],
            base: t(b),
            sparsify: &[Sparsify::Della {
                density: 0.5,
                epsilon: 0.6,
                stream: Stream::new(1, "k"),
                inverse: true,
            }],
            weights: &[1.0],
            consensus: false,
            normalize: false,
            lambda: 1.0,
        };
        assert!(combine(&spec, 2, &mut out, FloatDtype::F32, 1).is_err());
    }
}
