//! A whole GTA merge of one tensor as the caller describes it (one [`Sparsity`] per model,
//! weights, consensus, lambda) and its translation into the fused kernels of [`super::gta`]:
//! which order statistics to compute, and the band, mask or row rule each model gets.
//!
//! The decisions are those of the torch references (`python/mergekitty/ops/sparsify.py`):
//! density >= 1 keeps everything, density <= 0 nothing; magnitude keeps the keys from rank
//! `n - k` up, `k = max(1, floor(density * n))`; Breadcrumbs keeps the band between ranks
//! `n_bot` and `n_bot + target` (no upper bound when `n_top` is 0).

use crate::dtype::FloatDtype;
use crate::error::{Error, Result};
use crate::kernels::gta::{self, Gta, KeyMode, Sparsify, Tensor};
use crate::kernels::health::Health;
use crate::kernels::random::Stream;

/// A key above every magnitude key: "no upper bound", or with `lo` too "keep nothing".
const NO_UPPER: u32 = u32::MAX;

/// The sparsifiers a GTA merge applies to each task vector (docs/kernels.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparsityKind {
    None,
    /// TIES: the largest magnitudes.
    Magnitude,
    /// Breadcrumbs: a band of magnitudes below the largest.
    Outliers,
    /// DARE: a seeded Bernoulli mask.
    Random,
    /// DELLA: per-row keep probabilities from the magnitude rank.
    Della,
}

impl SparsityKind {
    pub const ALL: [SparsityKind; 5] = [
        SparsityKind::None,
        SparsityKind::Magnitude,
        SparsityKind::Outliers,
        SparsityKind::Random,
        SparsityKind::Della,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SparsityKind::None => "none",
            SparsityKind::Magnitude => "magnitude",
            SparsityKind::Outliers => "outliers",
            SparsityKind::Random => "random",
            SparsityKind::Della => "della",
        }
    }

    pub fn parse(s: &str) -> Result<SparsityKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                "sparsity kind must be one of none, magnitude, outliers, random, della; got {s:?}"
            ))
            })
    }
}

/// One model's sparsifier.
#[derive(Clone, Debug, PartialEq)]
pub struct Sparsity {
    pub kind: SparsityKind,
    pub density: f64,
    /// Breadcrumbs: the fraction of largest magnitudes dropped.
    pub gamma: f64,
    /// DELLA: half the spread of the keep probabilities.
    pub epsilon: f64,
    /// The random stream's key (random, DELLA).
    pub key: String,
    /// Divide the kept values by their keep probability (random, DELLA).
    pub inverse: bool,
}

impl Sparsity {
    /// Check and build one model's sparsifier. `rescale`: "none", or "inverse" for random and
    /// DELLA; the L1 rescale needs whole-tensor sums and is only in the torch reference.
    pub fn new(
        kind: &str,
        density: f64,
        gamma: f64,
        epsilon: f64,
        key: &str,
        rescale: &str,
    ) -> Result<Sparsity> {
        let kind = SparsityKind::parse(kind)?;
        let inverse = match rescale {
            "none" => false,
            "inverse" if matches!(kind, SparsityKind::Random | SparsityKind::Della) => true,
            "inverse" => {
                return Err(Error::InvalidArgument(format!(
                    "rescale \"inverse\" applies to random and della sparsity, not {:?}",
                    kind.name()
                )))
            }
            "l1" => {
                return Err(Error::InvalidArgument(
                    "rescale \"l1\" needs whole-tensor sums, which the fused kernel does not \
                     compute; use the torch reference (ops.sparsify)"
                        .into(),
                ))
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "rescale must be \"none\", \"inverse\" or \"l1\", got {other:?}"
                )))
            }
        };
        for (name, v) in [("density", density), ("gamma", gamma), ("epsilon", epsilon)] {
            if !v.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "sparsity {name} must be a finite number, got {v}"
                )));
            }
        }
        Ok(Sparsity {
            kind,
            density,
            gamma,
            epsilon,
            key: key.to_owned(),
            inverse,
        })
    }

    /// No sparsification.
    pub fn none() -> Sparsity {
        Sparsity {
            kind: SparsityKind::None,
            density: 1.0,
            gamma: 0.0,
            epsilon: 0.0,
            key: String::new(),
            inverse: false,
        }
    }
}

/// One model's sparsifier for a tensor of `n > 0` elements: ready for [`gta::combine`], or
/// waiting for order statistics of its magnitudes.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Ready(Sparsify),
    /// Keep the keys from the one at this rank up.
    Magnitude {
        rank: usize,
    },
    /// Keep the keys from rank `n_bot` (from 0 when `n_bot` is 0) below rank `n_bot + target`
    /// (no upper bound when `n_top` is 0).
    Outliers {
        n_bot: usize,
        target: usize,
        n_top: usize,
    },
}

impl Step {
    /// The ascending ranks this step needs and how they are ranked.
    fn ranks(&self) -> (Vec<usize>, KeyMode) {
        match *self {
            Step::Ready(_) => (Vec::new(), KeyMode::Magnitude),
            Step::Magnitude { rank } => (vec![rank], KeyMode::Magnitude),
            Step::Outliers {
                n_bot,
                target,
                n_top,
            } => {
                let mut r = Vec::with_capacity(2);
                if n_bot > 0 {
                    r.push(n_bot);
                }
                if n_top > 0 {
                    r.push(n_bot + target);
                }
                (r, KeyMode::Outliers)
            }
        }
    }

    /// The sparsifier, given the keys at `self.ranks()`.
    fn finish(self, keys: &[u32]) -> Sparsify {
        match self {
            Step::Ready(s) => s,
            Step::Magnitude { .. } => Sparsify::Band {
                lo: keys[0],
                hi: NO_UPPER,
                mode: KeyMode::Magnitude,
            },
            Step::Outliers { n_bot, n_top, .. } => {
                let mut keys = keys.iter().copied();
                let lo = if n_bot > 0 { keys.next() } else { None };
                let hi = if n_top > 0 { keys.next() } else { None };
                Sparsify::Band {
                    lo: lo.unwrap_or(0),
                    hi: hi.unwrap_or(NO_UPPER),
                    mode: KeyMode::Outliers,
                }
            }
        }
    }
}

/// `floor(x * n)` as a count (negative: 0, beyond `usize`: saturated).
fn floor_count(x: f64, n: usize) -> usize {
    (x * n as f64).floor().max(0.0) as usize
}

/// What model `i`'s sparsifier does on a tensor of `n > 0` elements.
fn plan(s: &Sparsity, i: usize, n: usize, seed: u64) -> Result<Step> {
    use SparsityKind as K;
    let density = s.density;
    let keep_all = match s.kind {
        K::None => true,
        K::Magnitude | K::Random | K::Della => density >= 1.0,
        K::Outliers => density >= 1.0 && s.gamma <= 0.0,
    };
    if keep_all {
        return Ok(Step::Ready(Sparsify::None));
    }
    if density <= 0.0 {
        return Ok(Step::Ready(Sparsify::Band {
            lo: NO_UPPER,
            hi: NO_UPPER,
            mode: KeyMode::Magnitude,
        }));
    }
    Ok(match s.kind {
        K::None => Step::Ready(Sparsify::None),
        K::Magnitude => {
            let k = floor_count(density, n).clamp(1, n);
            Step::Magnitude { rank: n - k }
        }
        K::Outliers => {
            let target = floor_count(density, n).clamp(1, n);
            // n_bot = n - target - n_top, any shortfall taken from n_top
            let n_top = floor_count(s.gamma, n).min(n - target);
            Step::Outliers {
                n_bot: n - target - n_top,
                target,
                n_top,
            }
        }
        K::Random => Step::Ready(Sparsify::Random {
            p: density as f32,
            stream: Stream::new(seed, &s.key),
            inverse: s.inverse,
        }),
        K::Della => {
            let eps = s.epsilon;
            if !(density - eps > 0.0 && density + eps <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "model {i}: DELLA needs density - epsilon > 0 and density + epsilon <= 1 \
                     (keep probabilities inside (0, 1]); got density {density}, epsilon {eps}"
                )));
            }
            Step::Ready(Sparsify::Della {
                density,
                epsilon: eps,
                stream: Stream::new(seed, &s.key),
                inverse: s.inverse,
            })
        }
    })
}

/// A whole GTA merge of one tensor of `shape`:
/// `out = base + lambda * combine(sparsify_i(f32(x_i) - f32(base)), weights)`.
#[derive(Clone, Copy, Debug)]
pub struct GtaMerge<'a> {
    pub xs: &'a [Tensor<'a>],
    pub base: Tensor<'a>,
    pub shape: &'a [usize],
    /// One per input.
    pub sparsity: &'a [Sparsity],
    /// One per input.
    pub weights: &'a [f64],
    /// One per input (the L1 rescale of each model's kept values), or empty for none.
    pub scales: &'a [f64],
    /// TIES sign election.
    pub consensus: bool,
    /// Divide by the (elected) weights' sum (by 1 where it is zero).
    pub normalize: bool,
    pub lambda: f64,
    /// The random streams' seed (random, DELLA).
    pub seed: u64,
}

/// Compute `m` into `out` (`out_dtype`, the shape's element count): the order statistics
/// every magnitude and Breadcrumbs model needs in one [`gta::thresholds`] call, then one
/// [`gta::combine`] pass. Bit-identical to sparsifying materialized task vectors. Returns the
/// figures of `xs`, then `base`, and the output ([`Health`]).
pub fn merge(
    m: &GtaMerge,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<Health> {
    let k = m.xs.len();
    if k == 0 || m.sparsity.len() != k || m.weights.len() != k {
        return Err(Error::InvalidArgument(format!(
            "gta_merge: {k} inputs, {} sparsity specs, {} weights (at least one input)",
            m.sparsity.len(),
            m.weights.len()
        )));
    }
    let n = m
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::InvalidArgument(format!("gta_merge: shape {:?} overflows", m.shape))
        })?;
    check_len("base", m.base.data.len(), m.base.dtype, n)?;
    for (i, x) in m.xs.iter().enumerate() {
        check_len(&format!("xs[{i}]"), x.data.len(), x.dtype, n)?;
    }
    check_len("out", out.len(), out_dtype, n)?;
    if n == 0 {
        return Ok(Health::new(k + 1));
    }
    let steps = m
        .sparsity
        .iter()
        .enumerate()
        .map(|(i, s)| plan(s, i, n, m.seed))
        .collect::<Result<Vec<_>>>()?;
    let (ranks, modes): (Vec<Vec<usize>>, Vec<KeyMode>) = steps.iter().map(Step::ranks).unzip();
    let keys = if ranks.iter().any(|r| !r.is_empty()) {
        gta::thresholds(m.xs, m.base, &ranks, &modes, threads)?
    } else {
        vec![Vec::new(); k]
    };
    let sparsify: Vec<Sparsify> = steps
        .into_iter()
        .zip(&keys)
        .map(|(s, keys)| s.finish(keys))
        .collect();
    let spec = Gta {
        xs: m.xs,
        base: m.base,
        sparsify: &sparsify,
        weights: m.weights,
        scales: m.scales,
        consensus: m.consensus,
        normalize: m.normalize,
        lambda: m.lambda as f32,
    };
    let row_len = m.shape.last().copied().unwrap_or(1);
    gta::combine(&spec, row_len, out, out_dtype, threads)
}

fn check_len(what: &str, len: usize, dtype: FloatDtype, n: usize) -> Result<()> {
    let expected = n.checked_mul(dtype.size());
    if expected != Some(len) {
        return Err(Error::BufferLength {
            what: format!("{what} ({})", dtype.code()),
            expected: expected.unwrap_or(usize::MAX),
            actual: len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::consensus::{self, Combine};
    use crate::kernels::sparsify::{self, Rescale};

    fn sp(kind: &str, density: f64, gamma: f64, epsilon: f64, rescale: &str) -> Sparsity {
        Sparsity::new(kind, density, gamma, epsilon, "k", rescale).unwrap()
    }

    #[test]
    fn the_decisions_of_the_references() {
        let n = 10;
        let ranks = |s: &Sparsity| plan(s, 0, n, 1).unwrap().ranks().0;
        assert_eq!(ranks(&sp("magnitude", 0.35, 0.0, 0.0, "none")), [7]);
        assert_eq!(ranks(&sp("magnitude", 1e-9, 0.0, 0.0, "none")), [9]); // k = 1
                                                                          // outliers: target 5, n_top 1, n_bot 4
        assert_eq!(ranks(&sp("outliers", 0.5, 0.1, 0.0, "none")), [4, 9]);
        assert_eq!(ranks(&sp("outliers", 0.5, 0.0, 0.0, "none")), [5]);
        // n_top 9 is cut to n - target = 5, n_bot 0: only the upper bound
        let s = plan(&sp("outliers", 0.5, 0.9, 0.0, "none"), 0, n, 1).unwrap();
        assert_eq!(s.ranks().0, [5]);
        assert_eq!(
            s.finish(&[42]),
            Sparsify::Band {
                lo: 0,
                hi: 42,
                mode: KeyMode::Outliers
            }
        );
        // density 1 with gamma: target n, nothing left to drop at either end
        assert!(ranks(&sp("outliers", 1.0, 0.2, 0.0, "none")).is_empty());
        for kind in ["magnitude", "random", "della"] {
            let all = plan(&sp(kind, 1.0, 0.0, 0.0, "none"), 0, n, 1).unwrap();
            assert_eq!(all, Step::Ready(Sparsify::None), "{kind}");
            let nothing = plan(&sp(kind, 0.0, 0.0, 0.0, "none"), 0, n, 1).unwrap();
            assert_eq!(
                nothing,
                Step::Ready(Sparsify::Band {
                    lo: NO_UPPER,
                    hi: NO_UPPER,
                    mode: KeyMode::Magnitude
                })
            );
        }
        match plan(&sp("random", 0.3, 0.0, 0.0, "inverse"), 0, n, 1).unwrap() {
            Step::Ready(Sparsify::Random { p, inverse, .. }) => assert!(p == 0.3f32 && inverse),
            other => panic!("{other:?}"),
        }
        let e = plan(&sp("della", 0.5, 0.0, 0.6, "none"), 3, n, 1).unwrap_err();
        assert!(e.to_string().starts_with("model 3: DELLA needs"), "{e}");
    }

    #[test]
    fn bad_specs_are_errors() {
        let bad = [
            ("bogus", 0.5, "none"),
            ("magnitude", 0.5, "l1"),
            ("magnitude", 0.5, "inverse"),
            ("random", 0.5, "sideways"),
            ("random", f64::NAN, "none"),
        ];
        for (kind, density, rescale) in bad {
            assert!(Sparsity::new(kind, density, 0.0, 0.0, "", rescale).is_err());
        }
        let e = Sparsity::new("random", 0.5, 0.0, 0.0, "", "l1").unwrap_err();
        assert!(e.to_string().contains("l1"));
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Sparsify materialized task vectors with sparsify.rs, then combine: the reference.
    fn unfused(
        xs: &[Vec<f32>],
        b: &[f32],
        sps: &[Sparsity],
        shape: [usize; 2],
        seed: u64,
    ) -> Vec<u8> {
        let ds: Vec<Vec<u8>> = xs
            .iter()
            .zip(sps)
            .map(|(x, s)| {
                let mut d: Vec<f32> = x.iter().zip(b).map(|(&x, &b)| x - b).collect();
                let st = Stream::new(seed, &s.key);
                let r = if s.inverse {
                    Rescale::Inverse
                } else {
                    Rescale::None
                };
                match s.kind {
                    SparsityKind::None => Ok(()),
                    SparsityKind::Magnitude => sparsify::magnitude(&mut d, s.density, false, 1),
                    SparsityKind::Outliers => {
                        sparsify::magnitude_outliers(&mut d, s.density, s.gamma, false, 1)
                    }
                    SparsityKind::Random => sparsify::random_mask(&mut d, s.density, &st, r, 1),
                    SparsityKind::Della => {
                        let [rows, m] = shape;
                        sparsify::della(&mut d, rows, m, s.density, s.epsilon, &st, r, 1)
                    }
                }
                .unwrap();
                bytes(&d)
            })
            .collect();
        let refs: Vec<&[u8]> = ds.iter().map(|d| d.as_slice()).collect();
        let spec = Combine {
            deltas: &refs,
            weights: &[0.5, -0.3, 0.9],
            consensus: true,
            normalize: true,
        };
        let bb = bytes(b);
        let mut out = vec![0u8; b.len() * 4];
        consensus::combine_into(
            &spec,
            0.7,
            Some((&bb, FloatDtype::F32)),
            &mut out,
            FloatDtype::F32,
            1,
        )
        .unwrap();
        out
    }

    #[test]
    fn merge_matches_the_unfused_path() {
        let shape = [13usize, 257];
        let n = shape[0] * shape[1];
        let mut rng = crate::test_rng::Lcg(5);
        let mut next = move || rng.unit();
        let b: Vec<f32> = (0..n).map(|_| next()).collect();
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                b.iter()
                    .enumerate()
                    // exact zeros and ties among the task-vector entries
                    .map(|(j, &v)| {
                        if j % (5 + i) == 0 {
                            v
                        } else if j % 7 == 1 {
                            v + 0.03125
                        } else {
                            v + 0.05 * next()
                        }
                    })
                    .collect()
            })
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
        let cases = [
            ("magnitude", 0.3, 0.0, 0.0, "none"),
            ("magnitude", 1e-9, 0.0, 0.0, "none"),
            ("outliers", 0.5, 0.05, 0.0, "none"),
            ("outliers", 0.9, 0.2, 0.0, "none"),
            ("outliers", 0.5, 0.0, 0.0, "none"),
            ("random", 0.4, 0.0, 0.0, "inverse"),
            ("della", 0.4, 0.0, 0.1, "inverse"),
            ("della", 0.4, 0.0, 0.1, "none"),
            ("none", 0.0, 0.0, 0.0, "none"),
            ("magnitude", 0.0, 0.0, 0.0, "none"),
        ];
        for (kind, density, gamma, epsilon, rescale) in cases {
            // every model of one kind here, a mixed merge below
            let sps: Vec<Sparsity> = (0..3)
                .map(|i| {
                    Sparsity::new(kind, density, gamma, epsilon, &format!("t#{i}"), rescale)
                        .unwrap()
                })
                .collect();
            let want = unfused(&xs, &b, &sps, shape, 9);
            for threads in [1, 2] {
                let m = GtaMerge {
                    xs: &xt,
                    scales: &[],
                    base,
                    shape: &shape,
                    sparsity: &sps,
                    weights: &[0.5, -0.3, 0.9],
                    consensus: true,
                    normalize: true,
                    lambda: 0.7,
                    seed: 9,
                };
                let mut out = vec![0u8; n * 4];
                merge(&m, &mut out, FloatDtype::F32, threads).unwrap();
                assert!(out == want, "{kind} {density} threads={threads}");
            }
        }
        let mixed = [
            sp("magnitude", 0.3, 0.0, 0.0, "none"),
            sp("outliers", 0.5, 0.05, 0.0, "none"),
            sp("della", 0.4, 0.0, 0.1, "inverse"),
        ];
        let m = GtaMerge {
            xs: &xt,
            scales: &[],
            base,
            shape: &shape,
            sparsity: &mixed,
            weights: &[0.5, -0.3, 0.9],
            consensus: true,
            normalize: true,
            lambda: 0.7,
            seed: 9,
        };
        let mut out = vec![0u8; n * 4];
        merge(&m, &mut out, FloatDtype::F32, 2).unwrap();
        assert!(out == unfused(&xs, &b, &mixed, shape, 9));
    }

    #[test]
    fn health_of_inputs_base_and_output() {
        use crate::kernels::health::tests::{close, encode, reference};
        let (rows, row_len) = (31, 1001);
        let n = rows * row_len;
        let shape = [rows, row_len];
        let mut rng = crate::test_rng::Lcg(7);
        let mut next = move || rng.unit();
        let b: Vec<f32> = (0..n).map(|_| next()).collect();
        let mut xs: Vec<Vec<f32>> = (0..3)
            .map(|_| b.iter().map(|&v| v + 0.01 * next()).collect())
            .collect();
        // model 1: a NaN whose tiny task vector TIES drops (NaN ranks above everything in
        // magnitude, so it is the NaN's neighbour that is tiny: a NaN is kept); model 2: an Inf.
        xs[1][10] = f32::NAN;
        xs[2][20_000] = f32::INFINITY;
        let dtype = FloatDtype::BF16;
        let bb = encode(&b, dtype);
        let xb: Vec<Vec<u8>> = xs.iter().map(|x| encode(x, dtype)).collect();
        let xt: Vec<Tensor> = xb.iter().map(|d| Tensor { data: d, dtype }).collect();
        let base = Tensor { data: &bb, dtype };
        for kind in ["magnitude", "della", "none"] {
            let sps: Vec<Sparsity> = (0..3)
                .map(|i| Sparsity::new(kind, 0.5, 0.0, 0.1, &format!("t#{i}"), "none").unwrap())
                .collect();
            for threads in [1, 2] {
                let m = GtaMerge {
                    xs: &xt,
                    scales: &[],
                    base,
                    shape: &shape,
                    sparsity: &sps,
                    weights: &[0.5, 0.3, 0.2],
                    consensus: true,
                    normalize: true,
                    lambda: 1.0,
                    seed: 1,
                };
                let mut out = vec![0u8; n * 2];
                let h = merge(&m, &mut out, dtype, threads).unwrap();
                assert_eq!(h.inputs.len(), 4);
                for (i, x) in xb.iter().enumerate() {
                    assert!(close(h.inputs[i], reference(x, dtype)), "{kind} x{i}");
                }
                assert!(close(h.inputs[3], reference(&bb, dtype)), "{kind} base");
                assert_eq!(
                    (
                        h.inputs[0].nonfinite,
                        h.inputs[1].nonfinite,
                        h.inputs[2].nonfinite
                    ),
                    (0, 1, 1)
                );
                // the unrounded results' squares (within 2^-8 of the written values')
                let want = reference(&out, dtype);
                let rel = (h.output.sumsq - want.sumsq).abs() / want.sumsq;
                assert!(
                    h.output.nonfinite == want.nonfinite && rel < 1e-3,
                    "{kind}: {:?} {want:?}",
                    h.output
                );
            }
        }
    }

    #[test]
    fn sizes_and_counts_are_checked() {
        let b = bytes(&[1.0, 2.0]);
        let t = Tensor {
            data: &b,
            dtype: FloatDtype::F32,
        };
        let xs = [t];
        let one = [Sparsity::none()];
        let m = GtaMerge {
            xs: &xs,
            scales: &[],
            base: t,
            shape: &[2],
            sparsity: &one,
            weights: &[1.0],
            consensus: false,
            normalize: false,
            lambda: 1.0,
            seed: 0,
        };
        let mut out = vec![0u8; 8];
        merge(&m, &mut out, FloatDtype::F32, 1).unwrap();
        assert_eq!(out, bytes(&[1.0, 2.0]));
        assert!(merge(&GtaMerge { shape: &[3], ..m }, &mut out, FloatDtype::F32, 1).is_err());
        assert!(merge(
            &GtaMerge { weights: &[], ..m },
            &mut out,
            FloatDtype::F32,
            1
        )
        .is_err());
        assert!(merge(&m, &mut out[..4], FloatDtype::F32, 1).is_err());
        let e = merge(&m, &mut out, FloatDtype::BF16, 1).unwrap_err();
        assert!(e.to_string().contains("out (BF16)"), "{e}");
        // an empty tensor: nothing to compute, whatever the sparsifier
        let della = [sp("della", 0.5, 0.0, 0.1, "inverse")];
        let empty = GtaMerge {
            scales: &[],
            xs: &[Tensor {
                data: &[],
                dtype: FloatDtype::F32,
            }],
            base: Tensor {
                data: &[],
                dtype: FloatDtype::F32,
            },
            shape: &[0],
            sparsity: &della,
            ..m
        };
        merge(&empty, &mut [], FloatDtype::BF16, 1).unwrap();
    }
}
