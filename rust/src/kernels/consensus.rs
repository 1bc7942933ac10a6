//! Sign consensus and the merged delta, fused with the final `base + lambda * M` and the cast
//! to the output dtype (docs/kernels.md, "Sign consensus and merged delta").
//!
//! Per element, with `v_i = w_i * d_i` (f32):
//! - `S = v_0 + v_1 + ...` (f32, index order);
//! - without consensus `M = S`, divided by `sum w` when normalizing (unless `|sum w| < 1e-8`);
//! - with consensus `sigma = S >= 0 ? +1 : -1`, model i counts where `v_i` is non-zero with the
//!   sign of sigma, `M = sum of the counted v_i`, and when normalizing `M /= D` where
//!   `D = sum of the counted w_i` is non-zero.
//!
//! The task vectors are float32 buffers read as little-endian bytes (any alignment); `base`
//! and `out` may be F32, F16 or BF16. One pass over memory, split into chunks across threads;
//! every element's arithmetic is independent of the split.

use crate::dtype::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, FloatDtype};
use crate::error::{Error, Result};
use crate::kernels::with_avx2;
use crate::threads;

const BLOCK: usize = 1024;

/// How the task vectors are combined.
#[derive(Clone, Copy, Debug)]
pub struct Combine<'a> {
    /// Task vectors: float32 little-endian bytes, all the same length.
    pub deltas: &'a [&'a [u8]],
    /// One weight per task vector.
    pub weights: &'a [f64],
    pub consensus: bool,
    pub normalize: bool,
}

impl Combine<'_> {
    fn element_count(&self) -> Result<usize> {
        if self.deltas.len() != self.weights.len() {
            return Err(Error::ArgumentCount {
                inputs: self.deltas.len(),
                dtypes: self.deltas.len(),
                weights: self.weights.len(),
            });
        }
        let Some(first) = self.deltas.first() else {
            return Err(Error::InvalidArgument(
                "combine needs at least one task vector".into(),
            ));
        };
        if !first.len().is_multiple_of(4) {
            return Err(Error::RaggedOutput {
                len: first.len(),
                dtype: "F32",
            });
        }
        for (i, d) in self.deltas.iter().enumerate() {
            if d.len() != first.len() {
                return Err(Error::BufferLength {
                    what: format!("deltas[{i}] (F32)"),
                    expected: first.len(),
                    actual: d.len(),
                });
            }
        }
        Ok(first.len() / 4)
    }

    /// The divisor for a normalized plain sum: `sum w` (the float32 weights summed in float32,
    /// in order), or none when `|sum w| < 1e-8`.
    fn plain_divisor(&self) -> Option<f32> {
        let s = self.weights.iter().fold(0f32, |acc, &w| acc + w as f32);
        (self.normalize && (s as f64).abs() >= 1e-8).then_some(s)
    }
}

/// `out = base + lambda * M` (or `lambda * M` without a base), written as `out_dtype`.
#[allow(clippy::too_many_arguments)]
pub fn combine_into(
    spec: &Combine,
    lambda: f32,
    base: Option<(&[u8], FloatDtype)>,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<()> {
    let n = spec.element_count()?;
    let expected = n * out_dtype.size();
    if out.len() != expected {
        return Err(Error::BufferLength {
            what: format!("out ({})", out_dtype.code()),
            expected,
            actual: out.len(),
        });
    }
    if let Some((b, bd)) = base {
        if b.len() != n * bd.size() {
            return Err(Error::BufferLength {
                what: format!("base ({})", bd.code()),
                expected: n * bd.size(),
                actual: b.len(),
            });
        }
    }
    let div = spec.plain_divisor();
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), BLOCK);
    let osz = out_dtype.size();
    let mut tasks = Vec::with_capacity(ranges.len());
    let mut rest = out;
    for r in ranges {
        let (head, tail) = rest.split_at_mut(r.len() * osz);
        tasks.push((r, head));
        rest = tail;
    }
    threads::run_all(tasks, |(r, out)| {
        with_avx2(
            #[inline(always)]
            || combine_range(spec, div, lambda, base, r.start, out, out_dtype),
        )
    });
    Ok(())
}

/// `out = M` as float32 (little-endian bytes).
pub fn combine_delta(spec: &Combine, out: &mut [u8], threads: usize) -> Result<()> {
    combine_into(spec, 1.0, None, out, FloatDtype::F32, threads)
}

#[inline(always)]
fn load_f32(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

#[inline(always)]
pub(crate) fn load(dtype: FloatDtype, src: &[u8], dst: &mut [f32]) {
    match dtype {
        FloatDtype::F32 => load_f32(src, dst),
        FloatDtype::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        FloatDtype::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
    }
}

#[inline(always)]
pub(crate) fn store(dtype: FloatDtype, src: &[f32], out: &mut [u8]) {
    match dtype {
        FloatDtype::F32 => {
            for (&v, c) in src.iter().zip(out.chunks_exact_mut(4)) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        FloatDtype::BF16 => {
            for (&v, c) in src.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        FloatDtype::F16 => {
            for (&v, c) in src.iter().zip(out.chunks_exact_mut(2)) {
                c.copy_from_slice(&f32_to_f16(v).to_le_bytes());
            }
        }
    }
}

/// The merged delta M of one block (docs/kernels.md "Sign consensus"), from the weighted
/// values of every model (model i at `vals[i * stride..]`, `s.len()` each) and their sum `s`.
/// Shared by `combine_range` and the fused GTA kernel so both stay bit-identical.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn merge_block(
    vals: &[f32],
    stride: usize,
    w32: &[f32],
    s: &[f32],
    m: &mut [f32],
    d: &mut [f32],
    consensus: bool,
    normalize: bool,
    div: Option<f32>,
) {
    let len = s.len();
    if consensus {
        m.fill(0.0);
        d.fill(0.0);
        for (i, &w) in w32.iter().enumerate() {
            let v = &vals[i * stride..i * stride + len];
            for j in 0..len {
                let (x, pos) = (v[j], s[j] >= 0.0);
                let counts = if pos { x > 0.0 } else { x < 0.0 };
                m[j] += if counts { x } else { 0.0 };
                d[j] += if counts { w } else { 0.0 };
            }
        }
        if normalize {
            m.iter_mut()
                .zip(d.iter())
                // x / 1 == x: one unconditional vector division (m is an arithmetic result,
                // never a signaling NaN, so dividing by 1 leaves every bit as it is).
                .for_each(|(x, &dd)| *x /= if dd != 0.0 { dd } else { 1.0 });
        }
    } else {
        m.copy_from_slice(s);
        if let Some(div) = div {
            m.iter_mut().for_each(|x| *x /= div);
        }
    }
}

#[inline(always)]
fn combine_range(
    spec: &Combine,
    div: Option<f32>,
    lambda: f32,
    base: Option<(&[u8], FloatDtype)>,
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
) {
    let k = spec.deltas.len();
    let osz = out_dtype.size();
    let n = out.len() / osz;
    let w32: Vec<f32> = spec.weights.iter().map(|&w| w as f32).collect();
    // v_i for every model of the current block (consensus needs S before it can select).
    let mut vals = vec![0f32; if spec.consensus { k * BLOCK } else { BLOCK }];
    let mut s = [0f32; BLOCK];
    let mut m = [0f32; BLOCK];
    let mut d = [0f32; BLOCK];
    let mut b = 0;
    while b < n {
        let len = BLOCK.min(n - b);
        let lo = (start + b) * 4;
        let s = &mut s[..len];
        for (i, (delta, &w)) in spec.deltas.iter().zip(&w32).enumerate() {
            let v = if spec.consensus {
                &mut vals[i * BLOCK..i * BLOCK + len]
            } else {
                &mut vals[..len]
            };
            load_f32(&delta[lo..lo + len * 4], v);
            v.iter_mut().for_each(|x| *x *= w);
            if i == 0 {
                s.copy_from_slice(v);
            } else {
                s.iter_mut().zip(v.iter()).for_each(|(a, &x)| *a += x);
            }
        }
        let m = &mut m[..len];
        merge_block(
            &vals,
            BLOCK,
            &w32,
            s,
            m,
            &mut d[..len],
            spec.consensus,
            spec.normalize,
            div,
        );
        // out = base + lambda * M
        match base {
            Some((bytes, bd)) => {
                let bv = &mut s[..len];
                load(
                    bd,
                    &bytes[(start + b) * bd.size()..(start + b + len) * bd.size()],
                    bv,
                );
                m.iter_mut()
                    .zip(bv.iter())
                    .for_each(|(x, &bb)| *x = bb + lambda * *x);
            }
            None => {
                if lambda != 1.0 {
                    m.iter_mut().for_each(|x| *x *= lambda);
                }
            }
        }
        store(out_dtype, m, &mut out[b * osz..(b + len) * osz]);
        b += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The definition, element by element.
    fn naive(ds: &[Vec<f32>], ws: &[f64], consensus: bool, normalize: bool) -> Vec<f32> {
        let n = ds[0].len();
        let w32: Vec<f32> = ws.iter().map(|&w| w as f32).collect();
        (0..n)
            .map(|j| {
                let v: Vec<f32> = ds.iter().zip(&w32).map(|(d, &w)| w * d[j]).collect();
                let s = v[1..].iter().fold(v[0], |a, &x| a + x);
                if !consensus {
                    let sw = w32.iter().fold(0f32, |a, &w| a + w);
                    return if normalize && sw.abs() >= 1e-8 {
                        s / sw
                    } else {
                        s
                    };
                }
                let sigma = if s >= 0.0 { 1.0f32 } else { -1.0 };
                let (mut m, mut d) = (0f32, 0f32);
                for (&x, &w) in v.iter().zip(&w32) {
                    if x != 0.0 && x.signum() == sigma {
                        m += x;
                        d += w;
                    }
                }
                if normalize && d != 0.0 {
                    m / d
                } else {
                    m
                }
            })
            .collect()
    }

    use crate::test_rng::Lcg as Rng;

    struct Lcg(Rng);
    impl Lcg {
        fn f32(&mut self) -> f32 {
            let v = self.0.unit();
            // A fifth of the entries are exact zeros, as in sparsified task vectors.
            if (self.0 .0 >> 20).is_multiple_of(5) {
                0.0
            } else {
                v
            }
        }
    }

    #[test]
    fn matches_definition() {
        let mut r = Lcg(Rng(1));
        for &n in &[0usize, 1, 7, 1025, 100_003] {
            for k in 1..=4 {
                let ds: Vec<Vec<f32>> = (0..k).map(|_| (0..n).map(|_| r.f32()).collect()).collect();
                let dbytes: Vec<Vec<u8>> = ds.iter().map(|d| bytes(d)).collect();
                let drefs: Vec<&[u8]> = dbytes.iter().map(|d| d.as_slice()).collect();
                let ws: Vec<f64> = (0..k)
                    .map(|i| 0.3 + 0.5 * i as f64 - if i == 2 { 1.5 } else { 0.0 })
                    .collect();
                for consensus in [false, true] {
                    for normalize in [false, true] {
                        let spec = Combine {
                            deltas: &drefs,
                            weights: &ws,
                            consensus,
                            normalize,
                        };
                        let want = naive(&ds, &ws, consensus, normalize);
                        let mut out = vec![0u8; n * 4];
                        combine_delta(&spec, &mut out, 2).unwrap();
                        let got = floats(&out);
                        for j in 0..n {
                            assert_eq!(
                                got[j], want[j],
                                "n={n} k={k} c={consensus} norm={normalize} j={j}"
                            );
                        }
                        // Fused with a bf16 base and lambda, written as bf16.
                        let base: Vec<u8> = (0..n)
                            .flat_map(|j| f32_to_bf16(j as f32 * 0.01).to_le_bytes())
                            .collect();
                        let mut out16 = vec![0u8; n * 2];
                        combine_into(
                            &spec,
                            0.7,
                            Some((&base, FloatDtype::BF16)),
                            &mut out16,
                            FloatDtype::BF16,
                            1,
                        )
                        .unwrap();
                        for j in 0..n {
                            let b = bf16_to_f32(f32_to_bf16(j as f32 * 0.01));
                            let e = f32_to_bf16(b + 0.7 * want[j]);
                            assert_eq!(u16::from_le_bytes([out16[2 * j], out16[2 * j + 1]]), e);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn consensus_example() {
        // S = 1 - 2 + 3 = 2 >= 0: models 0 and 2 agree.
        let ds = [bytes(&[1.0]), bytes(&[-2.0]), bytes(&[3.0])];
        let refs: Vec<&[u8]> = ds.iter().map(|d| d.as_slice()).collect();
        let ws = [1.0, 1.0, 1.0];
        let spec = Combine {
            deltas: &refs,
            weights: &ws,
            consensus: true,
            normalize: true,
        };
        let mut out = [0u8; 4];
        combine_delta(&spec, &mut out, 1).unwrap();
        assert_eq!(floats(&out), [2.0]);
        // All-zero column: D = 0, M stays 0.
        let zs = [bytes(&[0.0]), bytes(&[0.0])];
        let refs: Vec<&[u8]> = zs.iter().map(|d| d.as_slice()).collect();
        let spec = Combine {
            deltas: &refs,
            weights: &ws[..2],
            consensus: true,
            normalize: true,
        };
        combine_delta(&spec, &mut out, 1).unwrap();
        assert_eq!(floats(&out), [0.0]);
        // Counted weights that cancel: D = 0.5 + -0.5 = 0, M = 1 + 2 is not divided.
        let cs = [bytes(&[2.0, 1e-40, 3.0]), bytes(&[-4.0, -1e-40, -5.0])];
        let refs: Vec<&[u8]> = cs.iter().map(|d| d.as_slice()).collect();
        let spec = Combine {
            deltas: &refs,
            weights: &[0.5, -0.5],
            consensus: true,
            normalize: true,
        };
        let mut out3 = [0u8; 12];
        combine_delta(&spec, &mut out3, 1).unwrap();
        let want = [3.0f32, 0.5 * 1e-40 + -0.5 * -1e-40, 4.0];
        let got: Vec<u32> = floats(&out3).iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want.map(f32::to_bits));
    }

    #[test]
    fn threads_give_identical_bytes() {
        let mut r = Lcg(Rng(9));
        let n = 300_001;
        let ds: Vec<Vec<u8>> = (0..3)
            .map(|_| bytes(&(0..n).map(|_| r.f32()).collect::<Vec<_>>()))
            .collect();
        let refs: Vec<&[u8]> = ds.iter().map(|d| d.as_slice()).collect();
        let ws = [0.5, -0.25, 1.0];
        let spec = Combine {
            deltas: &refs,
            weights: &ws,
            consensus: true,
            normalize: true,
        };
        let base = vec![0x3fu8; n * 2];
        let mut a = vec![0u8; n * 2];
        let mut b = vec![0u8; n * 2];
        combine_into(
            &spec,
            1.3,
            Some((&base, FloatDtype::F16)),
            &mut a,
            FloatDtype::BF16,
            1,
        )
        .unwrap();
        combine_into(
            &spec,
            1.3,
            Some((&base, FloatDtype::F16)),
            &mut b,
            FloatDtype::BF16,
            3,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn size_errors() {
        let a = bytes(&[1.0, 2.0]);
        let b = bytes(&[1.0]);
        let refs: Vec<&[u8]> = vec![&a, &b];
        let spec = Combine {
            deltas: &refs,
            weights: &[1.0, 1.0],
            consensus: false,
            normalize: false,
        };
        let mut out = [0u8; 8];
        assert!(combine_delta(&spec, &mut out, 1)
            .unwrap_err()
            .to_string()
            .contains("deltas[1]"));
        let refs: Vec<&[u8]> = vec![&a];
        let spec = Combine {
            deltas: &refs,
            weights: &[1.0, 1.0],
            consensus: false,
            normalize: false,
        };
        assert!(combine_delta(&spec, &mut out, 1).is_err());
        let spec = Combine {
            deltas: &refs,
            weights: &[1.0],
            consensus: false,
            normalize: false,
        };
        assert!(combine_delta(&spec, &mut [0u8; 4], 1).is_err());
        let short = [0u8; 2];
        assert!(combine_into(
            &spec,
            1.0,
            Some((&short, FloatDtype::BF16)),
            &mut out,
            FloatDtype::F32,
            1
        )
        .is_err());
        let spec = Combine {
            deltas: &[],
            weights: &[],
            consensus: false,
            normalize: false,
        };
        assert!(combine_delta(&spec, &mut out, 1).is_err());
    }
}
