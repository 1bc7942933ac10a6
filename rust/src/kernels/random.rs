//! The counter-based generator of docs/kernels.md: every draw is a pure function of
//! `(seed, key, i)`, so masks do not depend on thread count, chunking or device, and the torch
//! implementation in `python/mergekitty/ops/random.py` produces the same bits.
//!
//! ```text
//! stream(seed, key) = FNV-1a 64 of the UTF-8 bytes of "{seed}:{key}"
//! k0 = stream & M ; k1 = stream >> 32
//! bits(i)    = fmix32( fmix32((i & M) ^ k0) ^ mul32(((i >> 32) ^ k1) & M, 0x27D4EB2F) )
//! uniform(i) = (bits(i) >> 8) * 2^-24
//! ```
//! `mul32` in the doc is `a*c mod 2^32` written for int64 torch arithmetic; here it is a
//! wrapping u32 multiply.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const HI_MUL: u32 = 0x27D4_EB2F;
/// 2^-24: `(bits >> 8) * 2^-24` is exact in f32.
const INV_2_24: f32 = 1.0 / 16_777_216.0;

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(FNV_OFFSET, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

/// MurmurHash3's 32-bit finalizer.
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    h
}

/// One random stream, named by `(seed, key)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream {
    k0: u32,
    k1: u32,
}

impl Stream {
    pub fn new(seed: u64, key: &str) -> Stream {
        Stream::from_hash(fnv1a64(format!("{seed}:{key}").as_bytes()))
    }

    pub fn from_hash(stream: u64) -> Stream {
        Stream {
            k0: stream as u32,
            k1: (stream >> 32) as u32,
        }
    }

    /// The term that depends only on the high 32 bits of the index.
    #[inline(always)]
    fn high_mix(&self, hi: u32) -> u32 {
        (hi ^ self.k1).wrapping_mul(HI_MUL)
    }

    #[inline(always)]
    pub fn bits(&self, i: u64) -> u32 {
        fmix32(fmix32((i as u32) ^ self.k0) ^ self.high_mix((i >> 32) as u32))
    }

    #[inline(always)]
    pub fn uniform(&self, i: u64) -> f32 {
        bits_to_uniform(self.bits(i))
    }

    /// `out[j] = uniform(start + j)`. The loop over one 2^32-aligned segment keeps the high
    /// half of the index fixed, so it vectorizes (wrapping of `start + j` past 2^64 follows the
    /// index arithmetic of the doc: indices are below 2^64 by definition).
    #[inline(always)]
    pub fn fill_uniform(&self, start: u64, out: &mut [f32]) {
        let mut done = 0usize;
        while done < out.len() {
            let i = start.wrapping_add(done as u64);
            let lo = i as u32;
            // Elements left before the low half wraps to 0.
            let room = (u32::MAX - lo) as u64 + 1;
            let len = ((out.len() - done) as u64).min(room) as usize;
            let hm = self.high_mix((i >> 32) as u32);
            let k0 = self.k0;
            for (j, o) in out[done..done + len].iter_mut().enumerate() {
                let l = lo.wrapping_add(j as u32);
                *o = bits_to_uniform(fmix32(fmix32(l ^ k0) ^ hm));
            }
            done += len;
        }
    }
}

#[inline(always)]
pub fn bits_to_uniform(b: u32) -> f32 {
    (b >> 8) as f32 * INV_2_24
}

/// `fill_uniform` with a runtime AVX2 dispatch (8-lane u32 multiplies), for callers outside
/// an AVX2-compiled kernel.
pub fn fill_uniform(stream: &Stream, start: u64, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { fill_uniform_avx2(stream, start, out) };
            return;
        }
    }
    stream.fill_uniform(start, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_uniform_avx2(stream: &Stream, start: u64, out: &mut [f32]) {
    stream.fill_uniform(start, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden values computed by an independent plain-Python implementation written straight
    // from docs/kernels.md (Python ints, no numpy/torch):
    //   M = 0xFFFFFFFF
    //   def mul32(a, c): return ((a & 0xFFFF) * c + ((((a >> 16) * c) & 0xFFFF) << 16)) & M
    //   def fmix32(h): h ^= h >> 16; h = mul32(h, 0x85EBCA6B); h ^= h >> 13;
    //                  h = mul32(h, 0xC2B2AE35); h ^= h >> 16; return h
    //   def stream(seed, key):
    //       h = 0xcbf29ce484222325
    //       for b in f"{seed}:{key}".encode(): h ^= b; h = (h * 0x100000001b3) % 2**64
    //       return h
    //   def bits(seed, key, i):
    //       s = stream(seed, key); k0 = s & M; k1 = s >> 32
    //       return fmix32(fmix32((i & M) ^ k0) ^ mul32(((i >> 32) ^ k1) & M, 0x27D4EB2F))
    //   def uniform(seed, key, i): return (bits(seed, key, i) >> 8) * 2.0**-24
    const KEY: &str = "model.layers.3.mlp.up_proj.weight#1";

    #[test]
    fn stream_hash_golden() {
        assert_eq!(fnv1a64(b"0:"), 0x07fc_0e07_b4bd_112f);
        assert_eq!(
            fnv1a64(format!("42:{KEY}").as_bytes()),
            0xa238_adfd_d892_a279
        );
        assert_eq!(fnv1a64("7:é#0".as_bytes()), 0xea2b_f809_ce92_d96f);
    }

    #[test]
    fn fmix32_golden() {
        assert_eq!(fmix32(0), 0);
        assert_eq!(fmix32(1), 0x514e_28b7);
        assert_eq!(fmix32(0xdead_beef), 0x0de5_c6a9);
        assert_eq!(0xFFFF_FFFFu32.wrapping_mul(0x85EB_CA6B), 0x7a14_3595);
    }

    #[test]
    fn bits_and_uniform_golden() {
        let cases: [(u64, &str, u64, u32, f64); 8] = [
            (0, "", 0, 0x05c5_8b08, 0.02254551649093628),
            (42, KEY, 0, 0xa6ee_84c8, 0.6520769596099854),
            (42, KEY, 1, 0xddb3_7dee, 0.8660200238227844),
            (42, KEY, 123_456_789, 0x3890_8a07, 0.220955491065979),
            (42, KEY, 1 << 32, 0xb320_e2a7, 0.6997205018997192),
            (42, KEY, (1 << 32) + 5, 0x4234_59f8, 0.258611261844635),
            (42, KEY, u64::MAX, 0xd5ad_68e4, 0.8346772193908691),
            (7, "é#0", 99, 0x55d1_229a, 0.33522236347198486),
        ];
        for (seed, key, i, bits, u) in cases {
            let s = Stream::new(seed, key);
            assert_eq!(s.bits(i), bits, "{seed} {key} {i}");
            assert_eq!(s.uniform(i) as f64, u, "{seed} {key} {i}");
        }
    }

    #[test]
    fn fill_matches_pointwise_across_the_2_32_boundary() {
        let s = Stream::new(42, KEY);
        for start in [0u64, (1 << 32) - 5, 7 << 32, u64::MAX - 3] {
            let mut out = vec![0f32; 4000];
            fill_uniform(&s, start, &mut out);
            let mut generic = vec![0f32; 4000];
            s.fill_uniform(start, &mut generic);
            for (j, (&o, &g)) in out.iter().zip(&generic).enumerate() {
                let want = s.uniform(start.wrapping_add(j as u64));
                assert_eq!(o.to_bits(), want.to_bits(), "start={start} j={j}");
                assert_eq!(g.to_bits(), want.to_bits());
                assert!((0.0..1.0).contains(&o));
            }
        }
    }

    #[test]
    fn roughly_uniform() {
        let s = Stream::new(1, "t");
        let mut out = vec![0f32; 1 << 20];
        fill_uniform(&s, 0, &mut out);
        let mean = out.iter().map(|&u| u as f64).sum::<f64>() / out.len() as f64;
        // sd of the mean: sqrt(1/12 / 2^20) ~ 2.8e-4.
        assert!((mean - 0.5).abs() < 2e-3, "{mean}");
        let below = out.iter().filter(|&&u| u < 0.25).count() as f64 / out.len() as f64;
        assert!((below - 0.25).abs() < 3e-3, "{below}");
    }
}
