//! Parse and validate a safetensors header.
//!
//! Layout: 8-byte little-endian header length N, N bytes of JSON, then the data section.
//! Everything here is untrusted input: every size is checked before it is used.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Headers above this are refused (the reference implementation uses the same bound).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor entry. Offsets are relative to the start of the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn byte_len(&self) -> u64 {
        self.end - self.start
    }
}

/// A validated header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
    /// The `__metadata__` entry, in file order.
    pub metadata: Option<Vec<(String, String)>>,
    /// Tensors sorted by start offset.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
}

/// Parse `file` (the whole file's bytes); `path` is only used in error messages.
pub fn parse(path: &Path, file: &[u8]) -> Result<Header> {
    let p = || path.to_path_buf();
    let file_len = file.len() as u64;
    let len_bytes: [u8; 8] = match file.get(..8).and_then(|b| b.try_into().ok()) {
        Some(b) => b,
        None => {
            return Err(Error::FileTooSmall {
                path: p(),
                len: file_len,
            })
        }
    };
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::HeaderTooLarge {
            path: p(),
            header_len,
            limit: MAX_HEADER_BYTES,
        });
    }
    // header_len <= 100 MB, so the addition cannot overflow.
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(Error::HeaderBeyondFile {
            path: p(),
            header_len,
            file_len,
        });
    }
    let data_len = file_len - data_start;
    let json = std::str::from_utf8(&file[8..data_start as usize])
        .map_err(|_| Error::HeaderNotUtf8 { path: p() })?;
    let entries = match serde_json::from_str::<Entries>(json) {
        Ok(Entries(entries)) => entries,
        // tell "not JSON" from "JSON, but not an object"
        Err(e) => {
            return Err(match serde_json::from_str::<Value>(json) {
                Ok(_) => Error::HeaderNotObject { path: p() },
                Err(_) => Error::HeaderNotJson {
                    path: p(),
                    message: e.to_string(),
                },
            })
        }
    };

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for (name, entry) in entries {
        if !seen.insert(name.clone()) {
            return Err(Error::DuplicateName { path: p(), name });
        }
        if name == "__metadata__" {
            metadata = Some(parse_metadata(path, entry)?);
        } else {
            tensors.push(parse_entry(path, name, entry, data_len)?);
        }
    }

    tensors.sort_by_key(|t| (t.start, t.end));
    // Sorted by start, any overlap shows up between neighbours. Zero-length tensors occupy no
    // bytes and never overlap anything.
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.end > t.start) {
        if let Some(q) = prev {
            if t.start < q.end {
                return Err(Error::Overlap {
                    path: p(),
                    first: q.name.clone(),
                    second: t.name.clone(),
                });
            }
        }
        prev = Some(t);
    }

    let by_name = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    Ok(Header {
        data_start,
        metadata,
        tensors,
        by_name,
    })
}

/// The header's top-level entries in file order, duplicates included (a JSON map would keep
/// only the last of two entries with the same name, silently).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

fn parse_metadata(path: &Path, entry: Value) -> Result<Vec<(String, String)>> {
    let bad = |detail: String| Error::InvalidMetadata {
        path: path.to_path_buf(),
        detail,
    };
    let Value::Object(map) = entry else {
        return Err(bad("not an object".into()));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(bad(format!("value of {k:?} is not a string"))),
        })
        .collect()
}

fn parse_entry(path: &Path, name: String, entry: Value, data_len: u64) -> Result<TensorInfo> {
    let Value::Object(mut obj) = entry else {
        return Err(Error::EntryNotObject {
            path: path.to_path_buf(),
            tensor: name,
        });
    };
    let missing = |field, name: &str| Error::MissingField {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        field,
    };
    let wrong = |field, expected, name: &str| Error::WrongFieldType {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        field,
        expected,
    };

    let dtype_code = match obj.remove("dtype") {
        None => return Err(missing("dtype", &name)),
        Some(Value::String(s)) => s,
        Some(_) => return Err(wrong("dtype", "a string", &name)),
    };
    let shape = match obj.remove("shape") {
        None => return Err(missing("shape", &name)),
        Some(v) => {
            u64_list(&v).ok_or_else(|| wrong("shape", "a list of non-negative integers", &name))?
        }
    };
    let offsets = match obj.remove("data_offsets") {
        None => return Err(missing("data_offsets", &name)),
        Some(v) => u64_list(&v)
            .filter(|o| o.len() == 2)
            .ok_or_else(|| wrong("data_offsets", "a list of two non-negative integers", &name))?,
    };
    let (start, end) = (offsets[0], offsets[1]);

    let Some(dtype) = Dtype::from_code(&dtype_code) else {
        return Err(Error::UnknownDtypeInFile {
            path: path.to_path_buf(),
            tensor: name,
            code: dtype_code,
        });
    };
    if end < start {
        return Err(Error::OffsetsReversed {
            path: path.to_path_buf(),
            tensor: name,
            start,
            end,
        });
    }
    if end > data_len {
        return Err(Error::OffsetsOutOfBounds {
            path: path.to_path_buf(),
            tensor: name,
            end,
            data_len,
        });
    }
    let Some(expected) = dtype.byte_len(&shape) else {
        return Err(Error::ShapeOverflow {
            path: path.to_path_buf(),
            tensor: name,
            shape,
        });
    };
    if expected != end - start {
        return Err(Error::SizeMismatch {
            path: path.to_path_buf(),
            tensor: name,
            shape,
            expected,
            actual: end - start,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

fn u64_list(v: &Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(Value::as_u64).collect()
}

/// Build a safetensors file in memory. Test helper shared by other modules' tests.
#[cfg(test)]
pub(crate) fn build_file(header_json: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header_json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header_json.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("/models/x.safetensors")
    }

    fn valid() -> Vec<u8> {
        build_file(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F16","shape":[0],"data_offsets":[16,16]}}"#,
            &[0u8; 16],
        )
    }

    fn err(header: &str, data_len: usize) -> Error {
        match parse(path(), &build_file(header, &vec![0u8; data_len])) {
            Ok(_) => panic!("header should be rejected: {header}"),
            Err(e) => e,
        }
    }

    fn assert_names(e: &Error, tensor: &str) {
        let s = e.to_string();
        assert!(s.contains("/models/x.safetensors"), "{s}");
        assert!(s.contains(&format!("{tensor:?}")), "{s}");
    }

    #[test]
    fn parses_valid_file() {
        let h = parse(path(), &valid()).unwrap();
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "e"]);
        assert_eq!(h.metadata, Some(vec![("format".into(), "pt".into())]));
        let b = h.get("b").unwrap();
        assert_eq!(
            (b.dtype, b.shape.clone(), b.start, b.end),
            (Dtype::BF16, vec![2, 2], 8, 16)
        );
        assert_eq!(h.data_start, 8 + valid().len() as u64 - 8 - 16);
        assert!(h.get("zz").is_none());
    }

    #[test]
    fn empty_header_and_gaps_are_fine() {
        assert!(parse(path(), &build_file("{}", &[]))
            .unwrap()
            .tensors
            .is_empty());
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
        assert!(parse(path(), &build_file(h, &[0; 10])).is_ok());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
        let e = parse(path(), &build_file(h, &[0; 4])).unwrap_err();
        assert!(matches!(e, Error::DuplicateName { ref name, .. } if name == "a"));
        assert!(e.is_malformed_file() && e.to_string().contains("\"a\" twice"));
        let e = parse(path(), &build_file("[1, 2]", &[])).unwrap_err();
        assert!(matches!(e, Error::HeaderNotObject { .. }));
        let e = parse(path(), &build_file("{nope", &[])).unwrap_err();
        assert!(matches!(e, Error::HeaderNotJson { .. }));
    }

    #[test]
    fn too_short() {
        let e = parse(path(), &[1, 2, 3]).unwrap_err();
        assert!(matches!(e, Error::FileTooSmall { len: 3, .. }));
        assert!(e.to_string().contains("/models/x.safetensors"));
    }

    #[test]
    fn header_too_large_or_beyond_file() {
        let mut f = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(matches!(
            parse(path(), &f),
            Err(Error::HeaderTooLarge { .. })
        ));
        let mut f = 100u64.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(matches!(
            parse(path(), &f),
            Err(Error::HeaderBeyondFile { .. })
        ));
        let f = u64::MAX.to_le_bytes().to_vec();
        assert!(matches!(
            parse(path(), &f),
            Err(Error::HeaderTooLarge { .. })
        ));
    }

    #[test]
    fn not_utf8_json_or_object() {
        let mut f = 2u64.to_le_bytes().to_vec();
        f.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(
            parse(path(), &f),
            Err(Error::HeaderNotUtf8 { .. })
        ));
        assert!(matches!(err("{\"a\":", 0), Error::HeaderNotJson { .. }));
        assert!(matches!(err("[1,2]", 0), Error::HeaderNotObject { .. }));
    }

    #[test]
    fn bad_metadata() {
        assert!(matches!(
            err(r#"{"__metadata__":{"k":1}}"#, 0),
            Error::InvalidMetadata { .. }
        ));
        assert!(matches!(
            err(r#"{"__metadata__":[]}"#, 0),
            Error::InvalidMetadata { .. }
        ));
    }

    #[test]
    fn entry_shape_problems() {
        let e = err(r#"{"w":3}"#, 0);
        assert!(matches!(e, Error::EntryNotObject { .. }));
        assert_names(&e, "w");
        let e = err(r#"{"w":{"shape":[1],"data_offsets":[0,1]}}"#, 1);
        assert!(matches!(e, Error::MissingField { field: "dtype", .. }));
        assert_names(&e, "w");
        let e = err(r#"{"w":{"dtype":"U8","data_offsets":[0,1]}}"#, 1);
        assert!(matches!(e, Error::MissingField { field: "shape", .. }));
        let e = err(r#"{"w":{"dtype":"U8","shape":[1]}}"#, 1);
        assert!(matches!(
            e,
            Error::MissingField {
                field: "data_offsets",
                ..
            }
        ));
        let e = err(r#"{"w":{"dtype":5,"shape":[1],"data_offsets":[0,1]}}"#, 1);
        assert!(matches!(e, Error::WrongFieldType { field: "dtype", .. }));
        let e = err(
            r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(matches!(e, Error::WrongFieldType { field: "shape", .. }));
        let e = err(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#, 1);
        assert!(matches!(
            e,
            Error::WrongFieldType {
                field: "data_offsets",
                ..
            }
        ));
        let e = err(
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1.5]}}"#,
            1,
        );
        assert!(matches!(
            e,
            Error::WrongFieldType {
                field: "data_offsets",
                ..
            }
        ));
    }

    #[test]
    fn unknown_dtype() {
        let e = err(
            r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(matches!(e, Error::UnknownDtypeInFile { .. }));
        assert_names(&e, "w");
        assert!(e.to_string().contains("Q4"));
    }

    #[test]
    fn size_problems() {
        let e = err(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(matches!(
            e,
            Error::SizeMismatch {
                expected: 12,
                actual: 8,
                ..
            }
        ));
        assert_names(&e, "w");
        let e = err(
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(matches!(e, Error::ShapeOverflow { .. }));
        let e = err(
            r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[6,4]}}"#,
            8,
        );
        assert!(matches!(e, Error::OffsetsReversed { .. }));
        let e = err(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#,
            8,
        );
        assert!(matches!(
            e,
            Error::OffsetsOutOfBounds {
                end: 10,
                data_len: 8,
                ..
            }
        ));
        assert_names(&e, "w");
    }

    #[test]
    fn overlap() {
        let e = err(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[3,7]}}"#,
            8,
        );
        assert!(matches!(e, Error::Overlap { .. }));
        let s = e.to_string();
        assert!(s.contains("\"a\"") && s.contains("\"b\""), "{s}");
        // Overlap hidden behind a larger tensor: [0,8) contains [2,4).
        let e = err(
            r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[1],"data_offsets":[5,6]},"c":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
            8,
        );
        assert!(matches!(e, Error::Overlap { .. }));
        // Zero-length tensors inside another tensor's range are harmless.
        let ok = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"z":{"dtype":"U8","shape":[0],"data_offsets":[3,3]}}"#;
        assert!(parse(path(), &build_file(ok, &[0; 8])).is_ok());
    }

    /// Tiny LCG: deterministic, no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn mutations_never_panic() {
        let base = valid();
        let mut rng = Lcg(12345);
        let mut accepted = 0;
        for _ in 0..4000 {
            let mut f = base.clone();
            match rng.next() % 4 {
                0 => f.truncate(rng.next() as usize % (base.len() + 1)),
                1 => {
                    for _ in 0..1 + rng.next() % 4 {
                        let i = rng.next() as usize % f.len();
                        f[i] = rng.next() as u8;
                    }
                }
                2 => {
                    // Digits are the interesting bytes: offsets, shapes, lengths.
                    let i = 8 + rng.next() as usize % (f.len() - 8);
                    f[i] = b'0' + (rng.next() % 10) as u8;
                }
                _ => {
                    let i = rng.next() as usize % 8;
                    f[i] = rng.next() as u8;
                }
            }
            if let Ok(h) = parse(path(), &f) {
                accepted += 1;
                // Whatever was accepted must be in bounds and non-overlapping.
                let data_len = f.len() as u64 - h.data_start;
                for t in &h.tensors {
                    assert!(t.start <= t.end && t.end <= data_len);
                }
            }
        }
        assert!(accepted > 0);
    }
}
