//! Safetensors dtype codes and sizes, and the scalar float conversions the kernels build on.
//!
//! The conversions are written branch-free (selects, integer math) so that loops over them
//! auto-vectorize; they are checked against the `half` crate in the tests below.

use crate::error::{Error, Result};

/// Every dtype the safetensors format defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    C64,
    F4,
    F6E2M3,
    F6E3M2,
}

/// The dtypes the CPU kernels read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
}

const ALL: [Dtype; 20] = [
    Dtype::Bool,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8E5M2,
    Dtype::F8E4M3,
    Dtype::F8E8M0,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
    Dtype::C64,
    Dtype::F4,
    Dtype::F6E2M3,
    Dtype::F6E3M2,
];

impl Dtype {
    /// The code used in safetensors headers, e.g. "BF16".
    pub fn code(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::C64 => "C64",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
        }
    }

    /// Parse a header code; `None` for anything unknown.
    pub fn from_code(code: &str) -> Option<Dtype> {
        ALL.iter().copied().find(|d| d.code() == code)
    }

    /// Parse a code coming from a caller (not a file): unknown codes are an error naming the code.
    pub fn parse(code: &str) -> Result<Dtype> {
        Dtype::from_code(code).ok_or_else(|| Error::UnknownDtype(code.to_owned()))
    }

    /// Size of one element in bits (sub-byte float formats are 4 or 6 bits).
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 8,
            Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 64,
        }
    }

    /// Bytes needed for a tensor of this shape: ceil(numel * bits / 8). `None` on overflow.
    pub fn byte_len(self, shape: &[u64]) -> Option<u64> {
        let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        Some(numel.checked_mul(self.bits())?.div_ceil(8))
    }

    /// The kernel view of this dtype, if the kernels support it.
    pub fn as_float(self) -> Result<FloatDtype> {
        match self {
            Dtype::F32 => Ok(FloatDtype::F32),
            Dtype::F16 => Ok(FloatDtype::F16),
            Dtype::BF16 => Ok(FloatDtype::BF16),
            other => Err(Error::UnsupportedKernelDtype(other.code())),
        }
    }
}

impl FloatDtype {
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            FloatDtype::F32 => "F32",
            FloatDtype::F16 => "F16",
            FloatDtype::BF16 => "BF16",
        }
    }

    /// Parse a caller-provided code, rejecting dtypes the kernels do not handle.
    pub fn parse(code: &str) -> Result<FloatDtype> {
        Dtype::parse(code)?.as_float()
    }
}

/// bf16 -> f32 is exact: the bf16 bits are the top half of the f32.
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 -> bf16 with round-to-nearest-even; NaN stays NaN (quiet bit forced so the payload
/// cannot round down to infinity).
#[inline(always)]
pub fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    let is_nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let quiet = (x >> 16) | 0x0040;
    (if is_nan { quiet } else { rounded }) as u16
}

/// f16 -> f32 (exact).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let exp = em & 0x7c00;
    let shifted = em << 13;
    // Normal numbers only need the exponent rebiased from 15 to 127.
    let normal = shifted + ((127 - 15) << 23);
    let inf_nan = shifted | 0x7f80_0000;
    // Subnormals are mantissa * 2^-24; that product is exact in f32.
    let sub = (em as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let bits = if exp == 0x7c00 {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// f32 -> f16 with round-to-nearest-even; overflow goes to infinity, NaN stays NaN.
#[inline(always)]
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7fff_ffff;
    let nan_payload = if a > 0x7f80_0000 {
        0x0200 | ((a >> 13) & 0x3ff)
    } else {
        0
    };
    let inf_nan = 0x7c00 | nan_payload;
    // Below the smallest normal f16 (2^-14): adding 0.5 makes the FPU round the value onto the
    // 2^-24 grid (RNE), and the low mantissa bits of the sum are the f16 subnormal bits.
    let sub = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3f00_0000);
    // Normal: rebias exponent (127 -> 15) and round the 13 dropped bits to nearest even.
    let normal = a
        .wrapping_sub((127 - 15) << 23)
        .wrapping_add(0x0fff + ((a >> 13) & 1))
        >> 13;
    let r = if a >= 0x7f80_0000 {
        inf_nan
    } else if a >= 0x477f_f000 {
        // >= 65520 rounds past the largest finite f16 (65504).
        0x7c00
    } else if a < 0x3880_0000 {
        sub
    } else {
        normal
    };
    (r | sign) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn codes_round_trip() {
        for d in ALL {
            assert_eq!(Dtype::from_code(d.code()), Some(d));
        }
        assert_eq!(Dtype::from_code("bf16"), None);
        let e = Dtype::parse("Q4").unwrap_err();
        assert!(e.to_string().contains("\"Q4\""));
    }

    #[test]
    fn byte_lengths() {
        assert_eq!(Dtype::BF16.byte_len(&[3, 5]), Some(30));
        assert_eq!(Dtype::F32.byte_len(&[]), Some(4)); // scalar
        assert_eq!(Dtype::F32.byte_len(&[0, 7]), Some(0));
        assert_eq!(Dtype::F4.byte_len(&[3]), Some(2)); // 12 bits -> 2 bytes
        assert_eq!(Dtype::F6E2M3.byte_len(&[4]), Some(3));
        assert_eq!(Dtype::C64.byte_len(&[2]), Some(16));
        assert_eq!(Dtype::U8.byte_len(&[u64::MAX, 2]), None);
        assert_eq!(Dtype::F64.byte_len(&[u64::MAX / 4]), None);
    }

    #[test]
    fn kernel_dtypes() {
        assert_eq!(FloatDtype::parse("BF16").ok(), Some(FloatDtype::BF16));
        assert!(matches!(
            FloatDtype::parse("I8"),
            Err(Error::UnsupportedKernelDtype("I8"))
        ));
        assert!(matches!(
            FloatDtype::parse("x"),
            Err(Error::UnknownDtype(_))
        ));
    }

    #[test]
    fn bf16_round_to_nearest_even() {
        // 1.0 + half an ulp of bf16 ties to even (1.0); 1.0 + 1.5 ulp ties up to 1.0 + 2 ulp.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // rounds past max finite
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        // A NaN whose payload sits only in the low bits must not become infinity.
        assert!(bf16_to_f32(f32_to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
        // Subnormals keep their bits.
        assert_eq!(f32_to_bf16(f32::from_bits(0x0001_0000)), 0x0001);
        assert_eq!(bf16_to_f32(0x0001), f32::from_bits(0x0001_0000));
    }

    #[test]
    fn bf16_matches_half_crate() {
        for h in 0..=u16::MAX {
            let ours = bf16_to_f32(h);
            let theirs = bf16::from_bits(h).to_f32();
            assert!(ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()));
        }
        let mut x: u32 = 0;
        loop {
            let f = f32::from_bits(x);
            let ours = f32_to_bf16(f);
            let theirs = bf16::from_f32(f).to_bits();
            if f.is_nan() {
                assert!(bf16::from_bits(ours).is_nan(), "{x:#x}");
            } else {
                assert_eq!(ours, theirs, "{x:#x}");
            }
            match x.checked_add(65_521) {
                Some(n) => x = n,
                None => break,
            }
        }
    }

    #[test]
    fn f16_to_f32_exhaustive() {
        for h in 0..=u16::MAX {
            let ours = f16_to_f32(h);
            let theirs = f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{h:#x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#x}");
            }
        }
    }

    fn check_f16(x: u32) {
        let f = f32::from_bits(x);
        let ours = f32_to_f16(f);
        if f.is_nan() {
            assert!(f16::from_bits(ours).is_nan(), "{x:#x}");
        } else {
            assert_eq!(ours, f16::from_f32(f).to_bits(), "{x:#x} {f}");
        }
    }

    #[test]
    fn f32_to_f16_matches_half_crate() {
        // Every f32 near the interesting boundaries, plus a stride over all bit patterns.
        let edges: [u32; 8] = [
            0,
            0x3380_0000,
            0x3880_0000,
            0x477f_e000,
            0x477f_f000,
            0x4780_0000,
            0x7f80_0000,
            0x3f80_0000,
        ];
        for e in edges {
            for d in 0..5000u32 {
                check_f16(e.wrapping_add(d));
                check_f16(e.wrapping_sub(d));
                check_f16(e.wrapping_add(d) | 0x8000_0000);
            }
        }
        let mut x: u32 = 0;
        loop {
            check_f16(x);
            match x.checked_add(4_099) {
                Some(n) => x = n,
                None => break,
            }
        }
    }

    #[test]
    fn f16_ties_and_specials() {
        // 1 + 2^-11 is halfway between 1 and the next f16: ties to even (1.0).
        assert_eq!(f32_to_f16(1.0 + f32::powi(2.0, -11)), 0x3c00);
        // 1 + 3 * 2^-11 ties up to 1 + 2^-9.
        assert_eq!(f32_to_f16(1.0 + 3.0 * f32::powi(2.0, -11)), 0x3c02);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(-1e9), 0xfc00);
        // Smallest subnormal, and half of it (ties to even -> 0), and 1.5x (ties up to 2).
        let tiny = f32::powi(2.0, -24);
        assert_eq!(f32_to_f16(tiny), 0x0001);
        assert_eq!(f32_to_f16(tiny * 0.5), 0x0000);
        assert_eq!(f32_to_f16(tiny * 1.5), 0x0002);
        assert_eq!(f16_to_f32(0x0001), tiny);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        assert!(f16_to_f32(f32_to_f16(f32::from_bits(0x7f80_0001))).is_nan());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }
}
