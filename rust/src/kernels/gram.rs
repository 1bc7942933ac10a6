//! Gram matrices of vectors cut out of tensors: the first pass of the geometric merge methods
//! (slerp, multislerp, karcher, model_stock).
//!
//! Those methods combine their inputs linearly, with coefficients that depend only on the inner
//! products of the inputs (or of their differences from the base). So a merge is two passes:
//! this one computes `G[g][i][j] = v_i . v_j` for every vector group `g`, Python turns the small
//! matrices into coefficients, and [`crate::kernels::reduce::weighted_sum_grouped`] writes
//! `sum_i c[g][i] x_i`. Neither pass holds more than a few blocks of the tensor.
//!
//! Products are taken in f64 from the f32 values (exact) and summed in f64: the methods read
//! small differences off these sums (karcher's tangent norm near convergence), which an f32 sum
//! of 10^7 products would drown. Sums run over fixed chunks in a fixed order, so the result does
//! not depend on the thread count.

use crate::dtype::FloatDtype;
use crate::error::{Error, Result};
use crate::kernels::reduce::decode;
use crate::threads;

/// Elements decoded at a time per input (f32 scratch that stays in L1/L2).
const BLOCK: usize = 1024;
/// Elements per partial sum of a whole-tensor Gram matrix (fixed, so thread count never changes
/// the summation order).
const CHUNK: usize = 64 * 1024;
/// Outer rows per partial sum of a column-wise Gram matrix.
const COLUMN_CHUNK_ROWS: usize = 64;

/// Which elements form one vector. A tensor of `numel` elements is cut into `count` groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Groups {
    /// The whole tensor is one vector.
    Whole,
    /// Each run of `len` consecutive elements (a row: the last axis) is a vector.
    Rows { len: usize },
    /// Element `e` belongs to vector `e % inner` (the vectors along the first axis of a tensor
    /// whose other axes hold `inner` elements).
    Columns { inner: usize },
}

impl Groups {
    /// Parse the Python-side description: "whole", "rows" with the row length, "columns" with
    /// the number of elements per index of the first axis.
    pub fn parse(kind: &str, len: usize) -> Result<Groups> {
        match kind {
            "whole" => Ok(Groups::Whole),
            "rows" if len > 0 => Ok(Groups::Rows { len }),
            "columns" if len > 0 => Ok(Groups::Columns { inner: len }),
            _ => Err(Error::InvalidArgument(format!(
                "vector groups must be 'whole', or 'rows'/'columns' with a positive length, got '{kind}' with {len}"
            ))),
        }
    }

    /// The number of vectors in a tensor of `numel` elements (an error when it does not divide).
    pub fn count(self, numel: usize) -> Result<usize> {
        let (len, count) = match self {
            Groups::Whole => return Ok(1),
            Groups::Rows { len } => (len, numel / len),
            Groups::Columns { inner } => (inner, inner),
        };
        if !numel.is_multiple_of(len) {
            return Err(Error::InvalidArgument(format!(
                "{numel} elements do not split into vectors of {len}"
            )));
        }
        Ok(count)
    }
}

/// One input of a Gram computation: raw little-endian bytes and their dtype.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub data: &'a [u8],
    pub dtype: FloatDtype,
}

/// Element count shared by every input (and the center), or an error naming the odd one.
pub(crate) fn common_len(inputs: &[Input], center: Option<Input>) -> Result<usize> {
    let first = center.or(inputs.first().copied());
    let Some(first) = first else {
        return Err(Error::InvalidArgument("no inputs".into()));
    };
    if !first.data.len().is_multiple_of(first.dtype.size()) {
        return Err(Error::InvalidArgument(format!(
            "{} bytes is not a whole number of {} elements",
            first.data.len(),
            first.dtype.code()
        )));
    }
    let n = first.data.len() / first.dtype.size();
    for (i, inp) in inputs.iter().enumerate() {
        let expected = n * inp.dtype.size();
        if inp.data.len() != expected {
            return Err(Error::BufferLength {
                what: format!("input {i} ({})", inp.dtype.code()),
                expected,
                actual: inp.data.len(),
            });
        }
    }
    Ok(n)
}

/// `out[g*k*k + i*k + j] = v_i . v_j` over the vectors of group `g`, where `v_i` is input `i`
/// minus `center` (when given) in f32, and `k = inputs.len()`. `out` holds `count * k * k` f64.
pub fn gram(
    inputs: &[Input],
    center: Option<Input>,
    groups: Groups,
    out: &mut [f64],
    threads: usize,
) -> Result<()> {
    let n = common_len(inputs, center)?;
    let k = inputs.len();
    let count = groups.count(n)?;
    if out.len() != count * k * k {
        return Err(Error::BufferLength {
            what: "gram out (f64)".into(),
            expected: count * k * k,
            actual: out.len(),
        });
    }
    out.fill(0.0);
    if k == 0 || n == 0 {
        return Ok(());
    }
    let threads = threads::resolve(threads);
    match groups {
        Groups::Whole => {
            let chunks = n.div_ceil(CHUNK);
            let mut partial = vec![0f64; chunks * k * k];
            spread(&mut partial, k * k, threads, |c, acc| {
                let range = c * CHUNK..((c + 1) * CHUNK).min(n);
                accumulate_run(inputs, center, range, acc);
            });
            for part in partial.chunks_exact(k * k) {
                for (o, p) in out.iter_mut().zip(part) {
                    *o += p;
                }
            }
        }
        Groups::Rows { len } => spread(out, k * k, threads, |r, acc| {
            accumulate_run(inputs, center, r * len..(r + 1) * len, acc);
        }),
        Groups::Columns { inner } => {
            let outer = n / inner;
            let chunks = outer.div_ceil(COLUMN_CHUNK_ROWS);
            let mut partial = vec![0f64; chunks * count * k * k];
            spread(&mut partial, count * k * k, threads, |c, acc| {
                let rows = c * COLUMN_CHUNK_ROWS..((c + 1) * COLUMN_CHUNK_ROWS).min(outer);
                accumulate_columns(inputs, center, rows, inner, acc);
            });
            for part in partial.chunks_exact(count * k * k) {
                for (o, p) in out.iter_mut().zip(part) {
                    *o += p;
                }
            }
        }
    }
    // the loops fill the upper triangle; mirror it
    for g in out.chunks_exact_mut(k * k) {
        for i in 0..k {
            for j in 0..i {
                g[i * k + j] = g[j * k + i];
            }
        }
    }
    Ok(())
}

/// Run `f(index, slot)` for every `size`-long slot of `out`, the slots dealt to `threads`
/// threads in contiguous runs.
fn spread(out: &mut [f64], size: usize, threads: usize, f: impl Fn(usize, &mut [f64]) + Sync) {
    let slots = out.len() / size;
    let per = slots.div_ceil(threads.clamp(1, slots.max(1)));
    let tasks: Vec<(usize, &mut [f64])> = out
        .chunks_mut(per * size)
        .enumerate()
        .map(|(t, part)| (t * per, part))
        .collect();
    threads::run_all(tasks, |(first, part)| {
        for (i, slot) in part.chunks_exact_mut(size).enumerate() {
            f(first + i, slot);
        }
    });
}

/// Decode elements `range` of every input (minus the center) block by block into `vals`
/// (`k` rows of `BLOCK`), calling `f(vals, len)` on each block.
fn blocks(
    inputs: &[Input],
    center: Option<Input>,
    range: std::ops::Range<usize>,
    mut f: impl FnMut(&[f32], usize),
) {
    let k = inputs.len();
    let mut vals = vec![0f32; k * BLOCK];
    let mut base = [0f32; BLOCK];
    let mut b = range.start;
    while b < range.end {
        let len = BLOCK.min(range.end - b);
        if let Some(c) = center {
            let sz = c.dtype.size();
            decode(c.dtype, &c.data[b * sz..(b + len) * sz], &mut base[..len]);
        }
        for (i, inp) in inputs.iter().enumerate() {
            let sz = inp.dtype.size();
            let v = &mut vals[i * BLOCK..i * BLOCK + len];
            decode(inp.dtype, &inp.data[b * sz..(b + len) * sz], v);
            if center.is_some() {
                for (x, c) in v.iter_mut().zip(&base[..len]) {
                    *x -= c;
                }
            }
        }
        f(&vals, len);
        b += len;
    }
}

/// Add the products of elements `range` (one group) to the upper triangle of `acc` (k x k).
fn accumulate_run(
    inputs: &[Input],
    center: Option<Input>,
    range: std::ops::Range<usize>,
    acc: &mut [f64],
) {
    let k = inputs.len();
    blocks(inputs, center, range, |vals, len| {
        for i in 0..k {
            let vi = &vals[i * BLOCK..i * BLOCK + len];
            for j in i..k {
                acc[i * k + j] += dot(vi, &vals[j * BLOCK..j * BLOCK + len]);
            }
        }
    });
}

/// Column groups: add the products of outer rows `rows` to each column's k x k block of `acc`.
fn accumulate_columns(
    inputs: &[Input],
    center: Option<Input>,
    rows: std::ops::Range<usize>,
    inner: usize,
    acc: &mut [f64],
) {
    let k = inputs.len();
    let mut col = 0;
    blocks(
        inputs,
        center,
        rows.start * inner..rows.end * inner,
        |vals, len| {
            for e in 0..len {
                let g = &mut acc[col * k * k..(col + 1) * k * k];
                for i in 0..k {
                    let x = vals[i * BLOCK + e] as f64;
                    for j in i..k {
                        g[i * k + j] += x * vals[j * BLOCK + e] as f64;
                    }
                }
                col += 1;
                if col == inner {
                    col = 0;
                }
            }
        },
    );
}

/// `sum a[e] * b[e]` with exact f64 products, in four interleaved f64 sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut s = [0f64; 4];
    let (ah, at) = a.split_at(a.len() / 4 * 4);
    let (bh, bt) = b.split_at(ah.len());
    for (x, y) in ah.chunks_exact(4).zip(bh.chunks_exact(4)) {
        for l in 0..4 {
            s[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let mut tail = 0f64;
    for (x, y) in at.iter().zip(bt) {
        tail += *x as f64 * *y as f64;
    }
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::health::tests::encode;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The definition, element by element in f64.
    fn reference(
        xs: &[Vec<f32>],
        c: Option<&[f32]>,
        group: impl Fn(usize) -> usize,
        count: usize,
    ) -> Vec<f64> {
        let k = xs.len();
        let mut g = vec![0f64; count * k * k];
        for e in 0..xs[0].len() {
            let v: Vec<f32> = xs.iter().map(|x| x[e] - c.map_or(0.0, |c| c[e])).collect();
            for i in 0..k {
                for j in 0..k {
                    g[group(e) * k * k + i * k + j] += v[i] as f64 * v[j] as f64;
                }
            }
        }
        g
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-9 * (1.0 + y.abs()))
    }

    #[test]
    fn matches_the_definition_for_every_grouping_and_dtype() {
        let (outer, inner) = (37, 1013);
        let n = outer * inner;
        let xs: Vec<Vec<f32>> = (0..3).map(|i| values(n, i)).collect();
        let c = values(n, 9);
        for d in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
            // what the kernel sees after rounding to the dtype
            let enc: Vec<Vec<u8>> = xs.iter().map(|x| encode(x, d)).collect();
            let dec: Vec<Vec<f32>> = enc
                .iter()
                .map(|b| {
                    let mut v = vec![0f32; n];
                    decode(d, b, &mut v);
                    v
                })
                .collect();
            let cenc = encode(&c, d);
            let mut cdec = vec![0f32; n];
            decode(d, &cenc, &mut cdec);
            let inputs: Vec<Input> = enc.iter().map(|b| Input { data: b, dtype: d }).collect();
            let center = Input {
                data: &cenc,
                dtype: d,
            };
            for (groups, count, group) in [
                (
                    Groups::Whole,
                    1,
                    Box::new(|_: usize| 0usize) as Box<dyn Fn(usize) -> usize>,
                ),
                (
                    Groups::Rows { len: inner },
                    outer,
                    Box::new(move |e| e / inner),
                ),
                (
                    Groups::Columns { inner },
                    inner,
                    Box::new(move |e| e % inner),
                ),
            ] {
                for (centered, threads) in [(false, 1), (true, 3)] {
                    let mut out = vec![0f64; count * 9];
                    let cen = centered.then_some(center);
                    gram(&inputs, cen, groups, &mut out, threads).unwrap();
                    let want = reference(&dec, centered.then_some(&cdec[..]), &group, count);
                    assert!(close(&out, &want), "{d:?} {groups:?} centered={centered}");
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_a_bit() {
        let n = 5 * CHUNK + 17;
        let xs: Vec<Vec<u8>> = (0..2)
            .map(|i| encode(&values(n, i), FloatDtype::F32))
            .collect();
        let inputs: Vec<Input> = xs
            .iter()
            .map(|b| Input {
                data: b,
                dtype: FloatDtype::F32,
            })
            .collect();
        let mut one = vec![0f64; 4];
        let mut many = vec![0f64; 4];
        gram(&inputs, None, Groups::Whole, &mut one, 1).unwrap();
        gram(&inputs, None, Groups::Whole, &mut many, 4).unwrap();
        assert_eq!(one, many);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let a = encode(&[1.0, 2.0, 3.0, 4.0], FloatDtype::F32);
        let b = encode(&[1.0, 2.0], FloatDtype::F32);
        let ok = Input {
            data: &a,
            dtype: FloatDtype::F32,
        };
        let short = Input {
            data: &b,
            dtype: FloatDtype::F32,
        };
        let mut out = vec![0f64; 4];
        assert!(gram(&[ok, short], None, Groups::Whole, &mut out, 1).is_err());
        assert!(gram(&[ok], None, Groups::Rows { len: 3 }, &mut out[..1], 1).is_err());
        assert!(gram(&[ok], None, Groups::Whole, &mut out, 1).is_err()); // out too long
        assert!(Groups::parse("rows", 0).is_err());
        assert!(Groups::parse("diagonal", 4).is_err());
        let mut rows = vec![0f64; 2];
        gram(&[ok], None, Groups::Rows { len: 2 }, &mut rows, 1).unwrap();
        assert_eq!(rows, [5.0, 25.0]);
    }
}
