//! Sparsification of task vectors, in place on a float32 buffer the caller owns: magnitude
//! top-k (TIES), magnitude outliers (Breadcrumbs), seeded Bernoulli masks (DARE) and
//! rank-dependent masks (DELLA). The definitions are in docs/kernels.md; the torch
//! references are in `python/mergekitty/ops/sparsify.py`.
//!
//! Results never depend on the thread count: masks are functions of element values, ranks
//! and flat indices only, and the L1 sums are accumulated in f64 per fixed block (or per row)
//! and combined in index order.
//!
//! Order statistics of `|x|` use a two-pass radix select on the magnitude bit patterns (a
//! 15-bit then a 16-bit histogram): exact, O(n), parallel, and without the n-element copy a
//! `select_nth_unstable` would need (that is the test oracle instead).

use crate::error::{Error, Result};
use crate::kernels::random::Stream;
use crate::kernels::with_avx2;
use crate::threads;

/// How kept values are rescaled after random dropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescale {
    /// Divide by the keep probability (the DARE and DELLA papers).
    Inverse,
    /// Multiply by `sum|x| / sum|kept|` (mergekit 0.1.5's choice).
    L1,
    None,
}

impl Rescale {
    pub fn parse(s: &str) -> Result<Rescale> {
        match s {
            "inverse" => Ok(Rescale::Inverse),
            "l1" => Ok(Rescale::L1),
            "none" => Ok(Rescale::None),
            other => Err(Error::InvalidArgument(format!(
                "rescale must be \"inverse\", \"l1\" or \"none\", got {other:?}"
            ))),
        }
    }
}

/// `|x|` as an integer that orders like the float, with every NaN mapped to one key above
/// +inf ("NaN counts as largest").
pub(crate) const NAN_KEY: u32 = 0x7f80_0001;
/// Breadcrumbs' key mode: the torch reference ranks `nan_to_num(|x|, nan=inf)`, which also
/// maps +inf to the largest finite float; so NaN gets the key of +inf and +inf that of f32::MAX.
pub(crate) const INF_KEY: u32 = 0x7f80_0000;

#[inline(always)]
fn mag_key(x: f32) -> u32 {
    capped_key(x, NAN_KEY)
}

/// `|x|`'s bits, with NaN and inf mapped as `cap` says: NAN_KEY (every NaN one key above
/// +inf) or INF_KEY (Breadcrumbs: NaN -> +inf's key, +inf -> f32::MAX's key).
#[inline(always)]
pub(crate) fn capped_key(x: f32, cap: u32) -> u32 {
    let c = (x.to_bits() & 0x7fff_ffff).min(NAN_KEY);
    if cap == NAN_KEY {
        c
    } else {
        // Branch-free (vectorizes): inf (INF_KEY) -> f32::MAX's key, NaN (NAN_KEY) -> INF_KEY.
        c - (c >= INF_KEY) as u32
    }
}

/// Elements per L1 partial sum: fixed, so the sums do not depend on how work is split.
const L1_BLOCK: usize = 1 << 16;
/// Elements per inner block (random numbers are generated a block at a time).
const BLOCK: usize = 2048;
/// Both sums must reach this before the L1 rescale applies.
const L1_MIN: f64 = 1e-8;

/// Split `x` into chunks of whole `align`-element units (one per thread), run `f(start, chunk,
/// partials)` on each, where `partials` has one `(sum|x|, sum|kept|)` slot per `unit` elements
/// of the chunk, and return the partials in order.
fn par_chunks<F>(x: &mut [f32], threads: usize, align: usize, unit: usize, f: F) -> Vec<(f64, f64)>
where
    F: Fn(usize, &mut [f32], &mut [(f64, f64)]) + Sync,
{
    let n = x.len();
    let unit = unit.max(1);
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), align);
    let units = ranges.iter().map(|r| r.len().div_ceil(unit)).sum();
    let mut partials = vec![(0f64, 0f64); units];
    let mut tasks = Vec::with_capacity(ranges.len());
    let (mut rest, mut prest) = (x, partials.as_mut_slice());
    for r in ranges {
        let (head, tail) = rest.split_at_mut(r.len());
        let (phead, ptail) = prest.split_at_mut(r.len().div_ceil(unit));
        tasks.push((r.start, head, phead));
        rest = tail;
        prest = ptail;
    }
    threads::run_all(tasks, |(start, chunk, parts)| {
        with_avx2(
            #[inline(always)]
            || f(start, chunk, parts),
        )
    });
    partials
}

/// Sum partials in order; `None` when the L1 rescale does not apply.
fn l1_scale(partials: &[(f64, f64)]) -> Option<f32> {
    let (all, kept) = partials
        .iter()
        .fold((0f64, 0f64), |(a, k), &(pa, pk)| (a + pa, k + pk));
    (all >= L1_MIN && kept >= L1_MIN).then(|| (all / kept) as f32)
}

/// Multiply every element by `scale` (the zeros stay zero; the kept values are rescaled).
fn scale_all(x: &mut [f32], scale: f32, threads: usize) {
    par_chunks(x, threads, BLOCK, usize::MAX, |_, chunk, _| {
        chunk.iter_mut().for_each(|v| *v *= scale)
    });
}

/// Apply the L1 rescale given the partial sums of `|x|` and `|kept|`.
pub fn apply_l1_rescale(x: &mut [f32], partials: &[(f64, f64)], threads: usize) {
    if let Some(s) = l1_scale(partials) {
        scale_all(x, s, threads);
    }
}

/// `sum|a|` and `sum|b|` of two equal-length slices with 8 fixed lanes (vectorizes, and the
/// order is fixed by the slice alone).
#[inline(always)]
fn abs_sums(before: &[f32], after: &[f32]) -> (f64, f64) {
    let mut la = [0f64; 8];
    let mut lb = [0f64; 8];
    let mut ca = before.chunks_exact(8);
    let mut cb = after.chunks_exact(8);
    for (a, b) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            la[l] += a[l].abs() as f64;
            lb[l] += b[l].abs() as f64;
        }
    }
    let mut sa: f64 = la.iter().sum();
    let mut sb: f64 = lb.iter().sum();
    for (a, b) in ca.remainder().iter().zip(cb.remainder()) {
        sa += a.abs() as f64;
        sb += b.abs() as f64;
    }
    (sa, sb)
}

/// Keep the elements whose magnitude key satisfies `keep`, zero the rest, and with `l1`
/// accumulate the partial sums per `L1_BLOCK`.
fn mask_by_key(
    x: &mut [f32],
    threads: usize,
    l1: bool,
    cap: u32,
    keep: impl Fn(u32) -> bool + Sync,
) -> Vec<(f64, f64)> {
    par_chunks(x, threads, L1_BLOCK, L1_BLOCK, |_, chunk, parts| {
        let mut tmp = [0f32; BLOCK];
        for (blk, part) in chunk.chunks_mut(L1_BLOCK).zip(parts.iter_mut()) {
            for sub in blk.chunks_mut(BLOCK) {
                let before = &mut tmp[..sub.len()];
                if l1 {
                    before.copy_from_slice(sub);
                }
                for v in sub.iter_mut() {
                    *v = if keep(capped_key(*v, cap)) { *v } else { 0.0 };
                }
                if l1 {
                    let (a, k) = abs_sums(before, sub);
                    part.0 += a;
                    part.1 += k;
                }
            }
        }
    })
}

pub(crate) fn check_density(density: f64, what: &str) -> Result<()> {
    if density.is_nan() {
        return Err(Error::InvalidArgument(format!("{what} is NaN")));
    }
    Ok(())
}

/// `max(1, floor(density * n))`, capped at n.
pub(crate) fn keep_count(density: f64, n: usize) -> usize {
    ((density * n as f64).floor() as usize).clamp(1, n.max(1))
}

// ---------------------------------------------------------------------------------------
// Order statistics of |x|
// ---------------------------------------------------------------------------------------

pub(crate) const HI_BUCKETS: usize = (NAN_KEY >> 16) as usize + 1;
pub(crate) const LO_BUCKETS: usize = 1 << 16;

/// Elements per block of a histogram pass: their keys are computed together (vectorized), then
/// counted.
const HIST_BLOCK: usize = 1024;
/// Per-thread u32 counts are added into the u64 totals at least this often (elements).
const HIST_FLUSH: usize = 1 << 31;

/// Histograms over the keys of the elements of `x`, one per thread, summed. `bucket` maps a
/// key to a bucket index below `nb`, or to anything else to skip it; `sparse`: most elements
/// are skipped (tested with a branch rather than counted in a spare bucket).
fn histogram<K, B>(
    x: &[f32],
    threads: usize,
    key: &K,
    nb: usize,
    sparse: bool,
    bucket: B,
) -> Vec<u64>
where
    K: Fn(f32) -> u32 + Sync,
    B: Fn(u32) -> u32 + Sync,
{
    let ranges = threads::chunk_ranges(x.len(), threads::resolve(threads), 1);
    let mut hists: Vec<Vec<u64>> = vec![Vec::new(); ranges.len()];
    let tasks: Vec<_> = ranges.into_iter().zip(hists.iter_mut()).collect();
    threads::run_all(tasks, |(r, total)| {
        with_avx2(
            #[inline(always)]
            || {
                *total = vec![0u64; nb];
                // Two count arrays (even and odd elements) so that runs of equal keys do not
                // serialize on one counter; bucket nb of each takes the skipped elements.
                let mut counts = vec![0u32; 2 * (nb + 1)];
                let mut keys = [0u32; HIST_BLOCK];
                let mut since_flush = 0usize;
                let blocks = x[r].chunks(HIST_BLOCK);
                let last = blocks.len();
                for (i, blk) in blocks.enumerate() {
                    let keys = &mut keys[..blk.len()];
                    for (k, &v) in keys.iter_mut().zip(blk) {
                        *k = bucket(key(v)).min(nb as u32);
                    }
                    let (c0, c1) = counts.split_at_mut(nb + 1);
                    if sparse {
                        for &k in keys.iter() {
                            if (k as usize) < nb {
                                if let Some(c) = c0.get_mut(k as usize) {
                                    *c += 1;
                                }
                            }
                        }
                    } else {
                        let mut pairs = keys.chunks_exact(2);
                        for p in &mut pairs {
                            if let (Some(a), Some(b)) =
                                (c0.get_mut(p[0] as usize), c1.get_mut(p[1] as usize))
                            {
                                *a += 1;
                                *b += 1;
                            }
                        }
                        for &k in pairs.remainder() {
                            if let Some(c) = c0.get_mut(k as usize) {
                                *c += 1;
                            }
                        }
                    }
                    since_flush += blk.len();
                    if since_flush >= HIST_FLUSH || i + 1 == last {
                        let (c0, c1) = counts.split_at_mut(nb + 1);
                        for ((t, a), b) in total.iter_mut().zip(c0.iter_mut()).zip(c1.iter_mut()) {
                            *t += *a as u64 + *b as u64;
                            *a = 0;
                            *b = 0;
                        }
                        since_flush = 0;
                    }
                }
            },
        )
    });
    let mut total = vec![0u64; nb];
    for h in hists {
        for (t, c) in total.iter_mut().zip(h) {
            *t += c;
        }
    }
    total
}

/// The bucket holding ascending rank `rank`, and the rank within that bucket.
pub(crate) fn locate(hist: &[u64], rank: u64) -> (usize, u64) {
    let mut before = 0u64;
    for (b, &c) in hist.iter().enumerate() {
        if rank < before + c {
            return (b, rank - before);
        }
        before += c;
    }
    // Unreachable for rank < total; return the last bucket rather than panic.
    (hist.len() - 1, 0)
}

/// Magnitude keys (NaN mapped to `cap`) at the given ascending ranks (each `< x.len()`).
pub(crate) fn keys_at_ranks(x: &[f32], ranks: &[usize], threads: usize, cap: u32) -> Vec<u32> {
    let key = move |v: f32| capped_key(v, cap);
    ranked(x, ranks, threads, HI_BUCKETS, &key)
        .iter()
        .map(|r| r.key)
        .collect()
}

/// A u32 that orders like the float: -inf < ... < -0 == +0 < ... < +inf < NaN, every NaN one
/// key (torch.kthvalue ranks NaN above everything; -0 and +0 compare equal). The high 16 bits
/// span all 2^16 buckets ([`ranked`] with `hi_buckets = ORDER_HI_BUCKETS`).
#[inline(always)]
pub(crate) fn order_key(v: f32) -> u32 {
    let b = (v + 0.0).to_bits(); // -0 + 0 = +0
    let k = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    if v.is_nan() {
        u32::MAX
    } else {
        k
    }
}

/// The float of an [`order_key`] (NaN for the NaN key, +0 for the zeros').
pub(crate) fn order_key_value(k: u32) -> f32 {
    if k == u32::MAX {
        f32::NAN
    } else if k >> 31 == 1 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

pub(crate) const ORDER_HI_BUCKETS: usize = 1 << 16;

/// An order statistic of a slice under a key: the key at an ascending rank, how many elements
/// have a smaller key and how many have this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ranked {
    pub key: u32,
    pub below: u64,
    pub equal: u64,
}

/// Ranks resolved per low-histogram pass: each needs at most one high bucket.
const RANKS_PER_PASS: usize = 3;

/// The order statistics of `x` at the ascending ranks `ranks` (each `< x.len()`) under `key`,
/// an order-preserving map of the values whose high 16 bits are below `hi_buckets`: the exact
/// two-pass radix select (a histogram of the high 16 key bits, then one of the low 16 bits
/// inside the buckets that hold the ranks, up to three ranks a pass).
pub(crate) fn ranked<K>(
    x: &[f32],
    ranks: &[usize],
    threads: usize,
    hi_buckets: usize,
    key: &K,
) -> Vec<Ranked>
where
    K: Fn(f32) -> u32 + Sync,
{
    if ranks.is_empty() {
        return Vec::new();
    }
    let hi = histogram(x, threads, key, hi_buckets, false, |k| k >> 16);
    let mut out = Vec::with_capacity(ranks.len());
    for group in ranks.chunks(RANKS_PER_PASS) {
        let located: Vec<(usize, u64)> = group.iter().map(|&r| locate(&hi, r as u64)).collect();
        let mut buckets: Vec<usize> = located.iter().map(|l| l.0).collect();
        buckets.sort_unstable();
        buckets.dedup();
        // Slots 0..3; unused slots hold a bucket no key reaches.
        let mut slot_bucket = [usize::MAX; RANKS_PER_PASS];
        slot_bucket[..buckets.len()].copy_from_slice(&buckets);
        let lo = histogram(
            x,
            threads,
            key,
            LO_BUCKETS * buckets.len(),
            true,
            move |k| {
                let h = (k >> 16) as usize;
                let low = k & 0xffff;
                if h == slot_bucket[0] {
                    low
                } else if h == slot_bucket[1] {
                    LO_BUCKETS as u32 + low
                } else if h == slot_bucket[2] {
                    2 * LO_BUCKETS as u32 + low
                } else {
                    u32::MAX
                }
            },
        );
        for &(b, within) in &located {
            let slot = buckets.iter().position(|&x| x == b).unwrap_or(0);
            let h = &lo[slot * LO_BUCKETS..(slot + 1) * LO_BUCKETS];
            let (low, _) = locate(h, within);
            let below = hi[..b].iter().sum::<u64>() + h[..low].iter().sum::<u64>();
            out.push(Ranked {
                key: ((b as u32) << 16) | low as u32,
                below,
                equal: h[low],
            });
        }
    }
    out
}

/// Below this many elements [`ranked_sampled`] is the radix select.
const SAMPLED_MIN: usize = 1 << 20;
/// The sample: runs of `SAMPLE_RUN` elements every `SAMPLE_STRIDE` (a prime, so the sample does
/// not alias with row lengths), about 1/128 of the elements.
const SAMPLE_RUN: usize = 32;
const SAMPLE_STRIDE: usize = 4093;
/// Half-width of a key band, in standard deviations of the sample quantile.
const SAMPLE_SIGMAS: f64 = 7.0;

/// [`ranked`] for a large slice by sampling: a strided sample of the keys gives each rank a
/// band of keys that holds its order statistic with overwhelming probability; one pass over
/// the slice counts the keys below each band and collects those inside it (a few percent), and
/// the statistic is selected from those. A rank whose band misses goes through [`ranked`].
/// About a third of the radix select's time: one pass of compares instead of two of
/// histogram increments.
pub(crate) fn ranked_sampled<K>(
    x: &[f32],
    ranks: &[usize],
    threads: usize,
    hi_buckets: usize,
    key: &K,
) -> Vec<Ranked>
where
    K: Fn(f32) -> u32 + Sync,
{
    ranked_sampled_with(x, ranks, threads, hi_buckets, key, SAMPLE_SIGMAS)
}

/// [`ranked_sampled`] with bands of `sigmas` standard deviations.
fn ranked_sampled_with<K>(
    x: &[f32],
    ranks: &[usize],
    threads: usize,
    hi_buckets: usize,
    key: &K,
    sigmas: f64,
) -> Vec<Ranked>
where
    K: Fn(f32) -> u32 + Sync,
{
    let n = x.len();
    if n < SAMPLED_MIN || ranks.is_empty() {
        return ranked(x, ranks, threads, hi_buckets, key);
    }
    let bands = sample_bands(x, ranks, key, sigmas);
    let found = band_pass(x, &bands, threads, key);
    let mut out = Vec::with_capacity(ranks.len());
    for (&r, f) in ranks.iter().zip(found) {
        out.push(match f.and_then(|mut f| f.select(r as u64)) {
            Some(got) => got,
            None => ranked(x, &[r], threads, hi_buckets, key)[0],
        });
    }
    out
}

/// Per rank, the inclusive key band `[lo, hi]` from the sample's quantiles around it.
fn sample_bands<K: Fn(f32) -> u32>(
    x: &[f32],
    ranks: &[usize],
    key: &K,
    sigmas: f64,
) -> Vec<(u32, u32)> {
    let n = x.len();
    let mut sample: Vec<u32> = Vec::with_capacity(n / SAMPLE_STRIDE * SAMPLE_RUN + SAMPLE_RUN);
    for start in (0..n).step_by(SAMPLE_STRIDE) {
        sample.extend(
            x[start..(start + SAMPLE_RUN).min(n)]
                .iter()
                .map(|&v| key(v)),
        );
    }
    let m = sample.len();
    ranks
        .iter()
        .map(|&r| {
            let q = (r as f64 + 0.5) / n as f64;
            let delta = sigmas * (q * (1.0 - q) / m as f64).sqrt() + 8.0 / m as f64;
            let lo_at = (q - delta) * m as f64;
            let hi_at = (q + delta) * m as f64;
            let lo = if lo_at < 0.0 {
                0
            } else {
                *sample.select_nth_unstable((lo_at as usize).min(m - 1)).1
            };
            let hi = if hi_at >= (m - 1) as f64 {
                u32::MAX
            } else {
                *sample
                    .select_nth_unstable((hi_at.ceil() as usize).min(m - 1))
                    .1
            };
            (lo, hi.max(lo))
        })
        .collect()
}

/// What one pass found for a band: the keys below it and the keys in it.
struct BandHits {
    below: u64,
    inside: Vec<u32>,
}

impl BandHits {
    /// The statistic at ascending rank `r`, when the band holds it.
    fn select(&mut self, r: u64) -> Option<Ranked> {
        let t = r.checked_sub(self.below)?;
        if t >= self.inside.len() as u64 {
            return None;
        }
        let (lt, &mut k, gt) = self.inside.select_nth_unstable(t as usize);
        let below_in = lt.iter().filter(|&&v| v < k).count() as u64;
        let equal = lt.len() as u64 - below_in + 1 + gt.iter().filter(|&&v| v == k).count() as u64;
        Some(Ranked {
            key: k,
            below: self.below + below_in,
            equal,
        })
    }
}

/// Keys collected per band beyond which the band is abandoned (the sample misled).
fn band_cap(n: usize) -> usize {
    n / 16 + 4096
}

/// One pass: per band, the count of keys below it and the keys inside it (`None`: too many).
fn band_pass<K>(x: &[f32], bands: &[(u32, u32)], threads: usize, key: &K) -> Vec<Option<BandHits>>
where
    K: Fn(f32) -> u32 + Sync,
{
    let ranges = threads::chunk_ranges(x.len(), threads::resolve(threads), 1);
    let cap = band_cap(x.len()) / ranges.len() + 4096;
    let mut parts: Vec<Vec<Option<BandHits>>> = ranges.iter().map(|_| Vec::new()).collect();
    let tasks: Vec<_> = ranges.into_iter().zip(parts.iter_mut()).collect();
    threads::run_all(tasks, |(r, out)| {
        with_avx2(
            #[inline(always)]
            || {
                let mut hits: Vec<Option<BandHits>> = bands
                    .iter()
                    .map(|_| {
                        Some(BandHits {
                            below: 0,
                            inside: Vec::new(),
                        })
                    })
                    .collect();
                let mut keys = [0u32; HIST_BLOCK];
                for blk in x[r].chunks(HIST_BLOCK) {
                    let keys = &mut keys[..blk.len()];
                    for (k, &v) in keys.iter_mut().zip(blk) {
                        *k = key(v);
                    }
                    for (&(lo, hi), h) in bands.iter().zip(hits.iter_mut()) {
                        let Some(bh) = h else { continue };
                        bh.below += keys.iter().map(|&k| (k < lo) as u32).sum::<u32>() as u64;
                        // lo <= k <= hi  <=>  k - lo <= hi - lo (wrapping); few are: test 16 at
                        // a time, collect from the groups that have any
                        let w = hi - lo;
                        for c in keys.chunks(16) {
                            if c.iter().fold(false, |a, &k| a | (k.wrapping_sub(lo) <= w)) {
                                bh.inside
                                    .extend(c.iter().filter(|&&k| k.wrapping_sub(lo) <= w));
                            }
                        }
                        if bh.inside.len() > cap {
                            *h = None;
                        }
                    }
                }
                *out = hits;
            },
        )
    });
    let mut total: Vec<Option<BandHits>> = bands
        .iter()
        .map(|_| {
            Some(BandHits {
                below: 0,
                inside: Vec::new(),
            })
        })
        .collect();
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            match (t.as_mut(), p) {
                (Some(t), Some(p)) => {
                    t.below += p.below;
                    t.inside.extend_from_slice(&p.inside);
                }
                _ => *t = None,
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------
// The kernels
// ---------------------------------------------------------------------------------------

/// TIES: keep the elements whose `|x|` is at least the k-th largest, `k = max(1,
/// floor(density*n))` (ties kept, NaN counts as largest); optional L1 rescale.
pub fn magnitude(x: &mut [f32], density: f64, rescale_l1: bool, threads: usize) -> Result<()> {
    check_density(density, "density")?;
    let n = x.len();
    if density >= 1.0 || n == 0 {
        return Ok(());
    }
    if density <= 0.0 {
        x.fill(0.0);
        return Ok(());
    }
    let k = keep_count(density, n);
    let t = keys_at_ranks(x, &[n - k], threads, NAN_KEY)[0];
    let parts = mask_by_key(x, threads, rescale_l1, NAN_KEY, move |key| key >= t);
    if rescale_l1 {
        apply_l1_rescale(x, &parts, threads);
    }
    Ok(())
}

/// Breadcrumbs: drop the `n_top` largest and the `n_bot` smallest magnitudes, keeping a band of
/// about `density*n` (see docs/kernels.md); optional L1 rescale.
pub fn magnitude_outliers(
    x: &mut [f32],
    density: f64,
    gamma: f64,
    rescale_l1: bool,
    threads: usize,
) -> Result<()> {
    check_density(density, "density")?;
    check_density(gamma, "gamma")?;
    let n = x.len();
    if (density >= 1.0 && gamma <= 0.0) || n == 0 {
        return Ok(());
    }
    if density <= 0.0 {
        x.fill(0.0);
        return Ok(());
    }
    let target = ((density * n as f64).floor() as usize).clamp(1, n);
    let mut n_top = (gamma.max(0.0) * n as f64).floor() as i128;
    let mut n_bot = n as i128 - target as i128 - n_top;
    if n_bot < 0 {
        n_top += n_bot;
        n_bot = 0;
    }
    // n_bot <= n - target <= n - 1, and when n_top > 0, n_bot + target = n - n_top < n.
    let n_bot = n_bot as usize;
    let mut ranks = vec![n_bot];
    if n_top > 0 {
        ranks.push(n_bot + target);
    }
    // NaN magnitudes count as +inf here, and +inf as f32::MAX (see INF_KEY).
    let keys = keys_at_ranks(x, &ranks, threads, INF_KEY);
    let lo = if n_bot > 0 { keys[0] } else { 0 };
    // Every key is <= INF_KEY < u32::MAX, so u32::MAX means "no upper bound".
    let hi = keys.get(1).copied().unwrap_or(u32::MAX);
    let parts = mask_by_key(x, threads, rescale_l1, INF_KEY, move |key| {
        key >= lo && key < hi
    });
    if rescale_l1 {
        apply_l1_rescale(x, &parts, threads);
    }
    Ok(())
}

/// DARE: keep element i when `uniform(i) < density`, then rescale.
pub fn random_mask(
    x: &mut [f32],
    density: f64,
    stream: &Stream,
    rescale: Rescale,
    threads: usize,
) -> Result<()> {
    check_density(density, "density")?;
    if density >= 1.0 || x.is_empty() {
        return Ok(());
    }
    if density <= 0.0 {
        x.fill(0.0);
        return Ok(());
    }
    let p = density as f32;
    let l1 = rescale == Rescale::L1;
    let inverse = rescale == Rescale::Inverse;
    let parts = par_chunks(x, threads, L1_BLOCK, L1_BLOCK, |start, chunk, parts| {
        let mut u = [0f32; BLOCK];
        let mut before = [0f32; BLOCK];
        for (bi, (blk, part)) in chunk.chunks_mut(L1_BLOCK).zip(parts.iter_mut()).enumerate() {
            let blk_start = start + bi * L1_BLOCK;
            for (si, sub) in blk.chunks_mut(BLOCK).enumerate() {
                let len = sub.len();
                let u = &mut u[..len];
                stream.fill_uniform((blk_start + si * BLOCK) as u64, u);
                if l1 {
                    before[..len].copy_from_slice(sub);
                }
                if inverse {
                    for (v, &r) in sub.iter_mut().zip(u.iter()) {
                        *v = if r < p { *v / p } else { 0.0 };
                    }
                } else {
                    for (v, &r) in sub.iter_mut().zip(u.iter()) {
                        *v = if r < p { *v } else { 0.0 };
                    }
                }
                if l1 {
                    let (a, k) = abs_sums(&before[..len], sub);
                    part.0 += a;
                    part.1 += k;
                }
            }
        }
    });
    if l1 {
        apply_l1_rescale(x, &parts, threads);
    }
    Ok(())
}

/// Per-thread scratch for DELLA's per-row stable sort.
#[derive(Default)]
pub(crate) struct RowScratch {
    /// `key << 32 | index`, in ascending order once sorted.
    items: Vec<u64>,
    /// The bucket of every element of the row.
    bucket: Vec<u32>,
    /// Per-bucket counts, then the next free slot of each bucket.
    counts: Vec<u32>,
    /// The large buckets: (first slot, length).
    big: Vec<(u32, u32)>,
    /// The uniforms of the row.
    u: Vec<f32>,
    /// The keep probability of every element of the row.
    probs: Vec<f32>,
}

/// Rows up to this long are sorted directly (`sort_unstable` on the unique items).
const SMALL_ROW: usize = 64;
/// The buckets cover at most this many binary orders of magnitude below the row's largest key;
/// smaller keys share bucket 0.
const BUCKET_OCTAVES: u32 = 6;
/// A bucket with more items than this is sorted with `sort_unstable` (unless already in order)
/// rather than by insertion.
const BIG_BUCKET: u32 = 48;

/// `key << 32 | index` for the elements of `row`, sorted by `(|x|, index)` (the stable
/// ascending order of the magnitude keys). The index is the low 32 bits of each item.
///
/// A bucket pass over the row's key range (magnitude keys order like the floats and are roughly
/// logarithmic in them, so the buckets are finest where the values are dense) scatters the items
/// in index order, so equal keys stay in index order; then the few items out of order within a
/// bucket are put right by one insertion-sort pass over the whole row, after the large buckets
/// have been sorted outright unless already in order (in bf16 task vectors a large bucket is
/// usually one key repeated; otherwise many distinct tiny keys in bucket 0 or a lopsided row).
/// The items are unique (they include the index), so every sort of them gives the one stable
/// order.
#[inline(always)]
pub(crate) fn stable_order<'s>(row: &[f32], s: &'s mut RowScratch) -> &'s [u64] {
    sort_row(row, &mut s.items, &mut s.bucket, &mut s.counts, &mut s.big);
    &s.items
}

/// [`sort_row_impl`] as a function of its own (inlined into the callers' loops it runs
/// markedly slower), built with AVX2 when the CPU has it.
#[inline(never)]
fn sort_row(
    row: &[f32],
    items: &mut Vec<u64>,
    bucket: &mut Vec<u32>,
    counts: &mut Vec<u32>,
    big: &mut Vec<(u32, u32)>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn go(
            row: &[f32],
            items: &mut Vec<u64>,
            bucket: &mut Vec<u32>,
            counts: &mut Vec<u32>,
            big: &mut Vec<(u32, u32)>,
        ) {
            sort_row_impl(row, items, bucket, counts, big)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { go(row, items, bucket, counts, big) };
        }
    }
    sort_row_impl(row, items, bucket, counts, big)
}

#[inline(always)]
fn sort_row_impl(
    row: &[f32],
    items: &mut Vec<u64>,
    bucket: &mut Vec<u32>,
    counts: &mut Vec<u32>,
    big: &mut Vec<(u32, u32)>,
) {
    let m = row.len();
    items.clear();
    if m <= SMALL_ROW {
        items.extend(
            row.iter()
                .enumerate()
                .map(|(j, &v)| ((mag_key(v) as u64) << 32) | j as u64),
        );
        items.sort_unstable();
        return;
    }
    // Key range: buckets span [lo, hi], at most BUCKET_OCTAVES octaves below the largest key.
    bucket.clear();
    bucket.extend(row.iter().map(|&v| mag_key(v)));
    let (mut kmin, mut kmax) = (u32::MAX, 0u32);
    for &k in bucket.iter() {
        kmin = kmin.min(k);
        kmax = kmax.max(k);
    }
    let lo = kmin.max(kmax.saturating_sub(BUCKET_OCTAVES << 23));
    let nb = (m.next_power_of_two()).min(1 << 20);
    let nb_bits = nb.trailing_zeros();
    let span_bits = 32 - (kmax - lo).leading_zeros();
    let shift = span_bits.saturating_sub(nb_bits);
    items.resize(m, 0);
    counts.clear();
    counts.resize(nb, 0);
    // Keys become bucket indices in place (the keys are recomputed for the items).
    for b in bucket.iter_mut() {
        *b = (*b).max(lo).wrapping_sub(lo) >> shift;
    }
    for &b in bucket.iter() {
        if let Some(c) = counts.get_mut(b as usize) {
            *c += 1;
        }
    }
    // Exclusive prefix sums: counts[b] becomes the first slot of bucket b. Large buckets are
    // noted as (first slot, length).
    let mut acc = 0u32;
    big.clear();
    for c in counts.iter_mut() {
        let n = *c;
        if n > BIG_BUCKET {
            big.push((acc, n));
        }
        *c = acc;
        acc += n;
    }
    for (j, (&b, &v)) in bucket.iter().zip(row).enumerate() {
        if let Some(c) = counts.get_mut(b as usize) {
            let pos = *c as usize;
            *c += 1;
            if let Some(slot) = items.get_mut(pos) {
                *slot = ((mag_key(v) as u64) << 32) | j as u64;
            }
        }
    }
    // A large bucket is usually one run of equal keys, already in order.
    for &(start, len) in big.iter() {
        if let Some(run) = items.get_mut(start as usize..(start + len) as usize) {
            if !run.is_sorted() {
                run.sort_unstable();
            }
        }
    }
    insertion_sort(items);
}

/// Insertion sort, cheap on a row whose items are each close to their place.
#[inline(always)]
fn insertion_sort(v: &mut [u64]) {
    for i in 1..v.len() {
        let x = v[i];
        if x >= v[i - 1] {
            continue;
        }
        let mut j = i;
        while j > 0 && v[j - 1] > x {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
}

/// DELLA on one row starting at flat index `start`: keep element j when `uniform(start + j) <
/// ptab[rank of j]`, divided by that probability when `inverse`. The probabilities are scattered
/// back to element order, so the mask is one branch-free pass over the row.
#[inline(always)]
pub(crate) fn della_row(
    row: &mut [f32],
    start: u64,
    stream: &Stream,
    ptab: &[f32],
    inverse: bool,
    s: &mut RowScratch,
) {
    let m = row.len();
    sort_row(row, &mut s.items, &mut s.bucket, &mut s.counts, &mut s.big);
    s.u.resize(m, 0.0);
    s.probs.resize(m, 0.0);
    let u = &mut s.u[..m];
    stream.fill_uniform(start, u);
    let probs = &mut s.probs[..m];
    for (&it, &p) in s.items.iter().zip(ptab) {
        if let Some(q) = probs.get_mut(it as u32 as usize) {
            *q = p;
        }
    }
    if inverse {
        for ((v, &r), &p) in row.iter_mut().zip(u.iter()).zip(probs.iter()) {
            let kept = *v / p;
            *v = if r < p { kept } else { 0.0 };
        }
    } else {
        for ((v, &r), &p) in row.iter_mut().zip(u.iter()).zip(probs.iter()) {
            *v = if r < p { *v } else { 0.0 };
        }
    }
}

/// Keep probability per ascending rank for rows of length `m`, all in float32 as the torch
/// reference computes it: `p = (f32(density) - f32(epsilon)) + (2 * f32(epsilon)) * (r / (m-1))`,
/// `r/(m-1) = 0.5` when m == 1.
pub(crate) fn della_probabilities(m: usize, density: f64, epsilon: f64) -> Vec<f32> {
    let lo = density as f32 - epsilon as f32;
    let slope = 2.0 * epsilon as f32;
    if m == 1 {
        return vec![lo + slope * 0.5];
    }
    let denom = (m - 1) as f32;
    (0..m).map(|r| lo + slope * (r as f32 / denom)).collect()
}

/// DELLA: per row, keep probability grows linearly with the stable rank of `|x|`, from
/// `density - epsilon` to `density + epsilon`; element i (flat index) is kept when
/// `uniform(i) < p_i`, then rescaled by `1/p_i` or L1.
#[allow(clippy::too_many_arguments)]
pub fn della(
    x: &mut [f32],
    rows: usize,
    row_len: usize,
    density: f64,
    epsilon: f64,
    stream: &Stream,
    rescale: Rescale,
    threads: usize,
) -> Result<()> {
    let n = x.len();
    if rows.checked_mul(row_len) != Some(n) {
        return Err(Error::InvalidArgument(format!(
            "della: {rows} rows of {row_len} elements do not make {n} elements"
        )));
    }
    check_density(density, "density")?;
    check_density(epsilon, "epsilon")?;
    if density >= 1.0 || n == 0 {
        return Ok(());
    }
    if density <= 0.0 {
        x.fill(0.0);
        return Ok(());
    }
    if !(density - epsilon > 0.0 && density + epsilon <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "della needs 0 < density - epsilon and density + epsilon <= 1 \
             (density={density}, epsilon={epsilon})"
        )));
    }
    if row_len > u32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "della: rows of {row_len} elements are too long (at most 2^32 - 1)"
        )));
    }
    let ptab = della_probabilities(row_len, density, epsilon);
    let l1 = rescale == Rescale::L1;
    let inverse = rescale == Rescale::Inverse;
    let parts = par_chunks(
        x,
        threads,
        row_len,
        row_len,
        #[inline(always)]
        |start, chunk, parts| {
            let mut s = RowScratch::default();
            for (ri, (row, part)) in chunk.chunks_mut(row_len).zip(parts.iter_mut()).enumerate() {
                let row_start = (start + ri * row_len) as u64;
                if !l1 {
                    della_row(row, row_start, stream, &ptab, inverse, &mut s);
                    continue;
                }
                // L1: the sums run in rank order.
                let m = row.len();
                let mut u = std::mem::take(&mut s.u);
                u.resize(m, 0.0);
                stream.fill_uniform(row_start, &mut u);
                let order = stable_order(row, &mut s);
                let (mut sa, mut sk) = (0f64, 0f64);
                for (&it, &p) in order.iter().zip(ptab.iter()) {
                    let j = it as u32 as usize;
                    let (Some(v), Some(&r)) = (row.get_mut(j), u.get(j)) else {
                        continue;
                    };
                    sa += v.abs() as f64;
                    let kept = if inverse { *v / p } else { *v };
                    *v = if r < p { kept } else { 0.0 };
                    sk += v.abs() as f64;
                }
                *part = (sa, sk);
                s.u = u;
            }
        },
    );
    if l1 {
        apply_l1_rescale(x, &parts, threads);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::health::tests::same_bits;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn f32(&mut self) -> f32 {
            (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        }
        /// Values with many exact ties (a few distinct magnitudes).
        fn tied(&mut self) -> f32 {
            ((self.next() % 9) as f32 - 4.0) * 0.25
        }
    }

    fn data(n: usize, seed: u64, tied: bool) -> Vec<f32> {
        let mut r = Lcg(seed);
        (0..n)
            .map(|_| if tied { r.tied() } else { r.f32() })
            .collect()
    }

    /// Oracle: the k-th largest magnitude by `select_nth_unstable_by`.
    fn oracle_key_at_rank(x: &[f32], rank: usize) -> u32 {
        let mut keys: Vec<u32> = x.iter().map(|&v| mag_key(v)).collect();
        *keys.select_nth_unstable_by(rank, |a, b| a.cmp(b)).1
    }

    #[test]
    fn radix_select_matches_select_nth() {
        for &(n, tied) in &[
            (1usize, false),
            (7, true),
            (1000, false),
            (100_003, true),
            (200_001, false),
        ] {
            let mut x = data(n, n as u64, tied);
            if n > 10 {
                x[3] = f32::NAN;
                x[5] = f32::INFINITY;
                x[7] = -0.0;
                x[9] = f32::from_bits(1); // subnormal
            }
            for rank in [0, n / 3, n / 2, n - 1] {
                for threads in [1, 2, 3] {
                    let got = keys_at_ranks(&x, &[rank, n - 1 - rank], threads, NAN_KEY);
                    assert_eq!(got[0], oracle_key_at_rank(&x, rank), "n={n} rank={rank}");
                    assert_eq!(got[1], oracle_key_at_rank(&x, n - 1 - rank));
                }
            }
        }
    }

    /// The sampled select against the radix select (and a sort) on slices that stress it:
    /// ties, a constant slice, NaN and signed values, and a band forced to miss.
    #[test]
    fn sampled_select_matches_the_radix_select() {
        let n = (1 << 20) + 12_345;
        let mut g = Lcg(21);
        let mut cases: Vec<Vec<f32>> = vec![
            (0..n).map(|_| g.f32()).collect(),
            (0..n).map(|_| g.tied()).collect(),
            vec![0.5; n],
            (0..n)
                .map(|i| if i % 3 == 0 { f32::NAN } else { g.f32() * 1e-3 })
                .collect(),
            // a lopsided slice: the sample sees almost only the bulk
            (0..n)
                .map(|i| if i < n / 2 + 10 { 0.0 } else { g.f32().abs() })
                .collect(),
        ];
        cases[1][7] = -0.0;
        let ranks = |n: usize| {
            vec![
                0,
                (0.25 * (n - 1) as f64) as usize,
                (n - 1) / 2,
                n / 2 + 9,
                n - 1,
            ]
        };
        for (c, x) in cases.iter().enumerate() {
            let r = ranks(x.len());
            for threads in [1, 3] {
                let want = ranked(x, &r, threads, ORDER_HI_BUCKETS, &order_key);
                let got = ranked_sampled(x, &r, threads, ORDER_HI_BUCKETS, &order_key);
                assert_eq!(got, want, "case {c} threads {threads}");
            }
            let mut keys: Vec<u32> = x.iter().map(|&v| order_key(v)).collect();
            keys.sort_unstable();
            for (&rank, got) in r.iter().zip(ranked(x, &r, 2, ORDER_HI_BUCKETS, &order_key)) {
                assert_eq!(got.key, keys[rank]);
                assert_eq!(got.below, keys.partition_point(|&k| k < got.key) as u64);
                assert_eq!(
                    got.equal,
                    keys.iter().filter(|&&k| k == got.key).count() as u64
                );
            }
        }
        // bands of a single key (negative sigmas) miss most ranks: those fall back to the radix
        // select
        for (c, x) in cases.iter().enumerate() {
            let r = ranks(x.len());
            let bands = sample_bands(x, &r, &order_key, -1.0);
            let found = band_pass(x, &bands, 2, &order_key);
            let misses = r
                .iter()
                .zip(found)
                .filter(|(&rank, f)| {
                    f.as_ref().is_none_or(|f| {
                        let t = rank as u64;
                        t < f.below || t >= f.below + f.inside.len() as u64
                    })
                })
                .count();
            if c == 0 {
                assert!(misses >= 3, "{misses}");
            }
            let want = ranked(x, &r, 2, ORDER_HI_BUCKETS, &order_key);
            let got = ranked_sampled_with(x, &r, 2, ORDER_HI_BUCKETS, &order_key, -1.0);
            assert_eq!(got, want, "case {c}");
        }
        // order keys: floats in order, -0 == +0, NaN last
        let vals = [
            f32::NEG_INFINITY,
            -2.0,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            3.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]), "{w:?}");
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
        assert_eq!(order_key(f32::NAN), u32::MAX);
        assert!(order_key(-f32::NAN) > order_key(f32::INFINITY));
        for v in vals {
            assert_eq!(
                order_key_value(order_key(v)),
                if v == 0.0 { 0.0 } else { v }
            );
        }
        assert!(order_key_value(u32::MAX).is_nan());
    }

    fn naive_magnitude(x: &[f32], density: f64) -> Vec<f32> {
        let n = x.len();
        if density >= 1.0 || n == 0 {
            return x.to_vec();
        }
        if density <= 0.0 {
            return vec![0.0; n];
        }
        let k = ((density * n as f64).floor() as usize).max(1);
        let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a)); // descending, NaN first
        let t = mags[k - 1];
        x.iter()
            .map(|&v| if v.abs() >= t || v.is_nan() { v } else { 0.0 })
            .collect()
    }

    #[test]
    fn magnitude_matches_sort_reference() {
        for &n in &[0usize, 1, 2, 7, 1000, 100_003] {
            for tied in [false, true] {
                let x = data(n, 11 + n as u64, tied);
                for density in [0.0, 1e-9, 0.1, 0.5, 0.9, 1.0] {
                    let want = naive_magnitude(&x, density);
                    for threads in [1, 2] {
                        let mut got = x.clone();
                        magnitude(&mut got, density, false, threads).unwrap();
                        assert!(same_bits(&got, &want), "n={n} d={density} tied={tied}");
                    }
                }
            }
        }
    }

    #[test]
    fn magnitude_nan_is_largest() {
        let mut x = vec![1.0, f32::NAN, -3.0, 2.0];
        magnitude(&mut x, 0.5, false, 1).unwrap();
        assert!(x[1].is_nan());
        assert_eq!([x[0], x[2], x[3]], [0.0, -3.0, 0.0]);
    }

    #[test]
    fn magnitude_l1_rescale() {
        let mut x = vec![1.0f32, -2.0, 3.0, -4.0];
        magnitude(&mut x, 0.5, true, 1).unwrap();
        // sum|x| = 10, kept 7.
        let s = (10.0f64 / 7.0) as f32;
        assert_eq!(x, vec![0.0, 0.0, 3.0 * s, -4.0 * s]);
        // Nothing to rescale when everything is (nearly) zero.
        let mut z = vec![1e-12f32, 0.0, 0.0, 0.0];
        magnitude(&mut z, 0.25, true, 1).unwrap();
        assert_eq!(z, vec![1e-12, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn l1_sums_do_not_depend_on_threads() {
        let x = data(1_000_003, 3, false);
        let mut a = x.clone();
        let mut b = x.clone();
        magnitude(&mut a, 0.3, true, 1).unwrap();
        magnitude(&mut b, 0.3, true, 2).unwrap();
        assert!(same_bits(&a, &b));
        let s = Stream::new(1, "k");
        let (mut a, mut b) = (x.clone(), x.clone());
        random_mask(&mut a, 0.3, &s, Rescale::L1, 1).unwrap();
        random_mask(&mut b, 0.3, &s, Rescale::L1, 2).unwrap();
        assert!(same_bits(&a, &b));
    }

    #[test]
    fn outliers_band() {
        // 100 distinct magnitudes 1..=100: density 0.5, gamma 0.1 keeps ranks [40, 90).
        let x: Vec<f32> = (1..=100)
            .map(|i| if i % 2 == 0 { i as f32 } else { -(i as f32) })
            .collect();
        let mut y = x.clone();
        magnitude_outliers(&mut y, 0.5, 0.1, false, 1).unwrap();
        for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
            let keep = (40..90).contains(&i);
            assert_eq!(b, if keep { a } else { 0.0 }, "{i}");
        }
        // Small tensors with gamma*n < 1 drop nothing from the top.
        let x: Vec<f32> = (1..=50).map(|i| i as f32).collect();
        let mut y = x.clone();
        magnitude_outliers(&mut y, 0.9, 0.01, false, 1).unwrap();
        assert_eq!(y.iter().filter(|&&v| v != 0.0).count(), 45);
        assert_eq!(y[49], 50.0);
        // density 1, gamma 0: unchanged; density 0: zeros.
        let mut y = x.clone();
        magnitude_outliers(&mut y, 1.0, 0.0, false, 2).unwrap();
        assert_eq!(y, x);
        magnitude_outliers(&mut y, 0.0, 0.1, false, 2).unwrap();
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn outliers_match_sort_reference_and_threads() {
        for &n in &[1usize, 2, 7, 1000, 100_003, 200_003] {
            for tied in [false, true] {
                let mut x = data(n, 5 + n as u64, tied);
                if n > 10 {
                    x[3] = f32::NAN;
                    x[5] = f32::NEG_INFINITY;
                }
                // Breadcrumbs ranks nan_to_num(|x|, nan=inf): NaN -> inf, inf -> f32::MAX.
                let mag = |v: f32| {
                    if v.is_nan() {
                        f32::INFINITY
                    } else {
                        v.abs().min(f32::MAX)
                    }
                };
                for (density, gamma) in [(0.5, 0.01), (0.1, 0.0), (0.9, 0.2), (1.0, 0.05)] {
                    let mut mags: Vec<f32> = x.iter().map(|&v| mag(v)).collect();
                    mags.sort_by(|a, b| a.total_cmp(b));
                    let target = ((density * n as f64).floor() as i64).max(1);
                    let mut n_top = (gamma * n as f64).floor() as i64;
                    let mut n_bot = n as i64 - target - n_top;
                    if n_bot < 0 {
                        n_top += n_bot;
                        n_bot = 0;
                    }
                    let lo = mags[n_bot as usize];
                    let hi = (n_top > 0).then(|| mags[(n_bot + target) as usize]);
                    let want: Vec<f32> = x
                        .iter()
                        .map(|&v| {
                            if lo <= mag(v) && hi.is_none_or(|h| mag(v) < h) {
                                v
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    for threads in [1, 2] {
                        let mut got = x.clone();
                        magnitude_outliers(&mut got, density, gamma, false, threads).unwrap();
                        assert!(same_bits(&got, &want), "n={n} d={density} g={gamma}");
                    }
                }
            }
        }
    }

    #[test]
    fn random_mask_matches_pointwise_definition() {
        let s = Stream::new(42, "w#0");
        for &n in &[0usize, 1, 7, 4097, 200_003] {
            let x = data(n, n as u64, false);
            for density in [0.0, 0.3, 0.9, 1.0] {
                let mut got = x.clone();
                random_mask(&mut got, density, &s, Rescale::Inverse, 2).unwrap();
                for (i, (&a, &b)) in x.iter().zip(&got).enumerate() {
                    let want = if density >= 1.0 {
                        a
                    } else if density > 0.0 && s.uniform(i as u64) < density as f32 {
                        a / density as f32
                    } else {
                        0.0
                    };
                    assert_eq!(b.to_bits(), want.to_bits(), "n={n} i={i} d={density}");
                }
                let mut plain = x.clone();
                random_mask(&mut plain, density, &s, Rescale::None, 1).unwrap();
                for (&a, &b) in got.iter().zip(&plain) {
                    assert_eq!(a == 0.0, b == 0.0);
                }
            }
        }
    }

    #[test]
    fn stable_order_is_stable() {
        let row = [2.0f32, -1.0, 1.0, f32::NAN, 0.0, -2.0, 1.0, -0.0];
        let mut s = RowScratch::default();
        let idx = |s: &[u64]| s.iter().map(|&it| it as u32).collect::<Vec<u32>>();
        assert_eq!(idx(stable_order(&row, &mut s)), [4, 7, 1, 2, 6, 0, 5, 3]);
        for &m in &[1usize, 2, 3, 300, 2048] {
            let row = data(m, m as u64, m % 2 == 0);
            let mut want: Vec<u32> = (0..m as u32).collect();
            want.sort_by(|&a, &b| {
                mag_key(row[a as usize])
                    .cmp(&mag_key(row[b as usize]))
                    .then(a.cmp(&b))
            });
            assert_eq!(idx(stable_order(&row, &mut s)), want);
        }
    }

    /// The bucketed sort against a comparison sort on rows that stress it: ties, zeros, a
    /// lopsided range (one huge value), many octaves, NaN and inf, subnormals.
    #[test]
    fn stable_order_matches_sort_on_hard_rows() {
        let mut g = Lcg(77);
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for &m in &[65usize, 100, 1000, 2048, 5632] {
            rows.push(data(m, m as u64, false));
            rows.push(data(m, m as u64 + 1, true));
            rows.push(vec![0.0; m]);
            rows.push(vec![-1.5; m]);
            // bf16-like: differences of coarsely quantized values, many exact ties.
            rows.push((0..m).map(|_| (g.f32() * 64.0).round() / 4096.0).collect());
            // One huge value: the bulk falls into bucket 0.
            let mut r = data(m, 3, false);
            r[m / 2] = 1e30;
            rows.push(r);
            // Many octaves.
            rows.push(
                (0..m)
                    .map(|_| g.f32() * 2f32.powi((g.next() % 120) as i32 - 60))
                    .collect(),
            );
            // NaN, inf, subnormals.
            let mut r = data(m, 5, false);
            r[1] = f32::NAN;
            r[m - 1] = f32::NEG_INFINITY;
            r[m / 3] = f32::from_bits(3);
            r[m / 4] = -0.0;
            rows.push(r);
            // Two clusters far apart.
            rows.push(
                (0..m)
                    .map(|j| if j % 3 == 0 { g.f32() * 1e-20 } else { g.f32() })
                    .collect(),
            );
        }
        let mut s = RowScratch::default();
        for (i, row) in rows.iter().enumerate() {
            let m = row.len();
            let mut want: Vec<u64> = (0..m)
                .map(|j| ((mag_key(row[j]) as u64) << 32) | j as u64)
                .collect();
            want.sort_by(|a, b| {
                (a >> 32)
                    .cmp(&(b >> 32))
                    .then((*a as u32).cmp(&(*b as u32)))
            });
            assert_eq!(stable_order(row, &mut s), &want[..], "row {i} (m={m})");
        }
    }

    #[test]
    fn della_matches_pointwise_definition() {
        let s = Stream::new(3, "d#2");
        for &(rows, m) in &[
            (1usize, 1usize),
            (3, 7),
            (5, 1000),
            (70, 2048),
            (1, 100_003),
        ] {
            let x = data(rows * m, (rows * m) as u64, true);
            let ptab = della_probabilities(m, 0.5, 0.2);
            let mut got = x.clone();
            della(&mut got, rows, m, 0.5, 0.2, &s, Rescale::Inverse, 2).unwrap();
            let mut single = x.clone();
            della(&mut single, rows, m, 0.5, 0.2, &s, Rescale::Inverse, 1).unwrap();
            assert!(same_bits(&got, &single));
            for r in 0..rows {
                let row = &x[r * m..(r + 1) * m];
                let mut order: Vec<usize> = (0..m).collect();
                order.sort_by(|&a, &b| mag_key(row[a]).cmp(&mag_key(row[b])).then(a.cmp(&b)));
                for (rank, &j) in order.iter().enumerate() {
                    let i = r * m + j;
                    let p = ptab[rank];
                    let want = if s.uniform(i as u64) < p {
                        x[i] / p
                    } else {
                        0.0
                    };
                    assert_eq!(got[i].to_bits(), want.to_bits(), "rows={rows} m={m} i={i}");
                }
            }
        }
        assert!((della_probabilities(1, 0.5, 0.2)[0] - 0.5).abs() < 1e-7);
        let e = della(&mut [0.0; 4], 2, 2, 0.1, 0.2, &s, Rescale::None, 1).unwrap_err();
        assert!(e.to_string().contains("density - epsilon"), "{e}");
        assert!(della(&mut [0.0; 4], 3, 2, 0.5, 0.1, &s, Rescale::None, 1).is_err());
    }

    #[test]
    fn rescale_parse() {
        assert_eq!(Rescale::parse("l1").unwrap(), Rescale::L1);
        assert!(Rescale::parse("L1").is_err());
    }
}
