//! Parse and validate a safetensors header.
//!
//! Layout: 8-byte little-endian header length N, N bytes of JSON, then the data section.
//! Everything here is untrusted input: every size is checked before it is used.

use std::borrow::Cow;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Headers above this are refused. It is the bound of the reference implementation
/// (safetensors' `MAX_HEADER_SIZE`), so every file it reads we read too; real headers are far
/// below it (about 100 bytes per tensor: a 100k-tensor shard needs 10 MB). What makes a header
/// near the bound affordable is the parse: one streaming pass, memory proportional to it.
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
    /// Indices into `tensors`, ordered by name.
    by_name: Vec<u32>,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        let i = self
            .by_name
            .binary_search_by(|&i| self.tensors[i as usize].name.as_str().cmp(name))
            .ok()?;
        Some(&self.tensors[self.by_name[i] as usize])
    }
}

/// Parse `file` (the whole file's bytes); `path` is only used in error messages.
///
/// The JSON is read in one streaming pass that validates each entry as it is read and keeps
/// only the result (no JSON tree of the whole header), so memory stays a small multiple of the
/// header and every problem is reported as the typed error of the entry it is in.
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
    if !json
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        // Validated without building anything: a 100 MB array must not become a JSON tree.
        return Err(match serde_json::from_str::<IgnoredAny>(json) {
            Ok(_) => Error::HeaderNotObject { path: p() },
            Err(e) => Error::HeaderNotJson {
                path: p(),
                message: e.to_string(),
            },
        });
    }

    let mut failure = None;
    let mut de = serde_json::Deserializer::from_str(json);
    let parsed = EntriesSeed {
        path,
        data_len,
        failure: &mut failure,
    }
    .deserialize(&mut de)
    .and_then(|entries| de.end().map(|()| entries));
    let (metadata, mut tensors) = match (parsed, failure) {
        (_, Some(e)) => return Err(e),
        (Ok(entries), None) => entries,
        (Err(e), None) => {
            return Err(Error::HeaderNotJson {
                path: p(),
                message: e.to_string(),
            })
        }
    };

    tensors.sort_by_key(|t| (t.start, t.end));
    // Names sorted once serve both the duplicate check and the lookups (no second copy of
    // every name in a hash map). A 100 MB header holds far fewer than 2^32 entries.
    let mut by_name: Vec<u32> = (0..tensors.len() as u32).collect();
    by_name.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
    if let Some(w) = by_name
        .windows(2)
        .find(|w| tensors[w[0] as usize].name == tensors[w[1] as usize].name)
    {
        return Err(Error::DuplicateName {
            path: p(),
            name: shown(&tensors[w[0] as usize].name),
        });
    }

    // Sorted by start, any overlap shows up between neighbours. Zero-length tensors occupy no
    // bytes and never overlap anything.
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors.iter().filter(|t| t.end > t.start) {
        if let Some(q) = prev {
            if t.start < q.end {
                return Err(Error::Overlap {
                    path: p(),
                    first: shown(&q.name),
                    second: shown(&t.name),
                });
            }
        }
        prev = Some(t);
    }

    Ok(Header {
        data_start,
        metadata,
        tensors,
        by_name,
    })
}

/// Names quoted in error messages are cut short: a message stays one readable line even for
/// a hostile header whose names are megabytes long.
fn shown(name: &str) -> String {
    const MAX: usize = 200;
    if name.len() <= MAX {
        return name.to_owned();
    }
    let cut = (0..=MAX)
        .rev()
        .find(|&i| name.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}...", &name[..cut])
}

type Metadata = Option<Vec<(String, String)>>;

/// Reads the top-level object, validating each entry as soon as it is read. A problem with an
/// entry is left in `failure` (the typed error) and stops the parse.
struct EntriesSeed<'a> {
    path: &'a Path,
    data_len: u64,
    failure: &'a mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = (Metadata, Vec<TensorInfo>);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = (Metadata, Vec<TensorInfo>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut metadata = None;
        let mut tensors = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            let checked = if name == "__metadata__" {
                let value = map.next_value_seed(Shallow(Level::Metadata))?;
                if metadata.is_some() {
                    Err(Error::DuplicateName {
                        path: self.path.to_path_buf(),
                        name,
                    })
                } else {
                    parse_metadata(self.path, value).map(|m| metadata = Some(m))
                }
            } else {
                let value = map.next_value_seed(Shallow(Level::Entry))?;
                parse_entry(self.path, name, value, self.data_len).map(|t| tensors.push(t))
            };
            if let Err(e) = checked {
                *self.failure = Some(e);
                return Err(serde::de::Error::custom("invalid header entry"));
            }
        }
        tensors.shrink_to_fit();
        Ok((metadata, tensors))
    }
}

/// Where a JSON value sits in the header, which decides how much of it is kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// A tensor entry: an object whose three known fields are kept.
    Entry,
    /// The `__metadata__` entry: an object whose string values are kept.
    Metadata,
    /// A field of an entry or a metadata value: a string, or a list of non-negative integers.
    Field,
    /// An element of such a list: only a non-negative integer is of interest.
    Element,
}

/// A JSON value reduced to what the header needs; anything else is read and dropped, so a
/// hostile value costs time proportional to its size and no memory.
enum Json {
    Fields(Box<Fields>),
    Pairs(Vec<(String, Json)>),
    Text(String),
    Int(u64),
    Ints(Vec<u64>),
    Other,
}

#[derive(Default)]
struct Fields {
    dtype: Option<Json>,
    shape: Option<Json>,
    data_offsets: Option<Json>,
    /// A field given twice (a JSON object with repeated keys is ambiguous).
    repeated: Option<&'static str>,
}

struct Shallow(Level);

impl<'de> DeserializeSeed<'de> for Shallow {
    type Value = Json;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Json, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Shallow {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<Json, E> {
        Ok(Json::Other)
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<Json, E> {
        Ok(u64::try_from(v).map_or(Json::Other, Json::Int))
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<Json, E> {
        Ok(Json::Int(v))
    }

    fn visit_f64<E>(self, _: f64) -> std::result::Result<Json, E> {
        Ok(Json::Other)
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<Json, E> {
        Ok(match self.0 {
            Level::Field => Json::Text(v.to_owned()),
            _ => Json::Other,
        })
    }

    fn visit_unit<E>(self) -> std::result::Result<Json, E> {
        Ok(Json::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Json, A::Error> {
        if self.0 != Level::Field {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Json::Other);
        }
        let mut ints = Some(Vec::new());
        while let Some(element) = seq.next_element_seed(Shallow(Level::Element))? {
            match (element, &mut ints) {
                (Json::Int(v), Some(list)) => list.push(v),
                _ => ints = None, // keep reading to the end of the list, keep nothing
            }
        }
        Ok(ints.map_or(Json::Other, Json::Ints))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Json, A::Error> {
        match self.0 {
            Level::Entry => {
                let mut fields = Fields::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let (slot, name) = match &*key {
                        "dtype" => (&mut fields.dtype, "dtype"),
                        "shape" => (&mut fields.shape, "shape"),
                        "data_offsets" => (&mut fields.data_offsets, "data_offsets"),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    let value = map.next_value_seed(Shallow(Level::Field))?;
                    if slot.replace(value).is_some() {
                        fields.repeated.get_or_insert(name);
                    }
                }
                Ok(Json::Fields(Box::new(fields)))
            }
            Level::Metadata => {
                let mut pairs = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value_seed(Shallow(Level::Field))?;
                    pairs.push((key, value));
                }
                Ok(Json::Pairs(pairs))
            }
            Level::Field | Level::Element => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Json::Other)
            }
        }
    }
}

fn parse_metadata(path: &Path, entry: Json) -> Result<Vec<(String, String)>> {
    let bad = |detail: String| Error::InvalidMetadata {
        path: path.to_path_buf(),
        detail,
    };
    let Json::Pairs(pairs) = entry else {
        return Err(bad("not an object".into()));
    };
    let mut seen = std::collections::HashSet::with_capacity(pairs.len());
    pairs
        .into_iter()
        .map(|(k, v)| match v {
            _ if !seen.insert(k.clone()) => Err(bad(format!("{:?} appears twice", shown(&k)))),
            Json::Text(s) => Ok((k, s)),
            _ => Err(bad(format!("value of {:?} is not a string", shown(&k)))),
        })
        .collect()
}

fn parse_entry(path: &Path, name: String, entry: Json, data_len: u64) -> Result<TensorInfo> {
    let Json::Fields(fields) = entry else {
        return Err(Error::EntryNotObject {
            path: path.to_path_buf(),
            tensor: shown(&name),
        });
    };
    let missing = |field, name: &str| Error::MissingField {
        path: path.to_path_buf(),
        tensor: shown(name),
        field,
    };
    let wrong = |field, expected, name: &str| Error::WrongFieldType {
        path: path.to_path_buf(),
        tensor: shown(name),
        field,
        expected,
    };
    let fields = *fields;
    if let Some(field) = fields.repeated {
        return Err(Error::DuplicateField {
            path: path.to_path_buf(),
            tensor: shown(&name),
            field,
        });
    }

    let dtype_code = match fields.dtype {
        None => return Err(missing("dtype", &name)),
        Some(Json::Text(s)) => s,
        Some(_) => return Err(wrong("dtype", "a string", &name)),
    };
    let shape = match fields.shape {
        None => return Err(missing("shape", &name)),
        Some(Json::Ints(v)) => v,
        Some(_) => return Err(wrong("shape", "a list of non-negative integers", &name)),
    };
    let (start, end) = match fields.data_offsets {
        None => return Err(missing("data_offsets", &name)),
        Some(Json::Ints(v)) if v.len() == 2 => (v[0], v[1]),
        Some(_) => {
            return Err(wrong(
                "data_offsets",
                "a list of two non-negative integers",
                &name,
            ))
        }
    };

    let Some(dtype) = Dtype::from_code(&dtype_code) else {
        return Err(Error::UnknownDtypeInFile {
            path: path.to_path_buf(),
            tensor: shown(&name),
            code: shown(&dtype_code),
        });
    };
    if end < start {
        return Err(Error::OffsetsReversed {
            path: path.to_path_buf(),
            tensor: shown(&name),
            start,
            end,
        });
    }
    if end > data_len {
        return Err(Error::OffsetsOutOfBounds {
            path: path.to_path_buf(),
            tensor: shown(&name),
            end,
            data_len,
        });
    }
    let expected = dtype
        .byte_len(&shape)
        .filter(|_| element_count_fits(&shape));
    let Some(expected) = expected else {
        return Err(Error::ShapeOverflow {
            path: path.to_path_buf(),
            tensor: shown(&name),
            shape,
        });
    };
    if expected != end - start {
        return Err(Error::SizeMismatch {
            path: path.to_path_buf(),
            tensor: shown(&name),
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

/// Whether the shape's element count, counting every dimension (a zero dimension makes the
/// tensor empty but does not make `[0, 2^64 - 1]` a sensible shape), fits the signed 64-bit
/// sizes that torch and numpy index with.
fn element_count_fits(shape: &[u64]) -> bool {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |n, &d| {
            n.checked_mul(d).filter(|&n| n <= i64::MAX as u64)
        })
        .is_some()
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
    fn shapes_whose_element_count_overflows() {
        for shape in [
            "[0,18446744073709551615]",
            "[18446744073709551615,0]",
            "[0,9223372036854775808]",
            "[4611686018427387904,2,0]",
            "[4294967296,4294967296]",
        ] {
            let h = format!(r#"{{"w":{{"dtype":"U8","shape":{shape},"data_offsets":[0,0]}}}}"#);
            let e = err(&h, 0);
            assert!(matches!(e, Error::ShapeOverflow { .. }), "{shape}: {e}");
            assert_names(&e, "w");
        }
        // Empty tensors with sensible shapes stay fine, as does the largest count.
        let ok = r#"{"a":{"dtype":"U8","shape":[0,4096],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[9223372036854775807,0],"data_offsets":[0,0]}}"#;
        assert!(parse(path(), &build_file(ok, &[])).is_ok());
    }

    #[test]
    fn repeated_keys_are_refused() {
        let e = err(
            r#"{"w":{"dtype":"U8","shape":[1],"dtype":"F32","data_offsets":[0,1]}}"#,
            1,
        );
        assert!(
            matches!(e, Error::DuplicateField { field: "dtype", .. }),
            "{e}"
        );
        assert_names(&e, "w");
        let e = err(r#"{"__metadata__":{},"__metadata__":{}}"#, 0);
        assert!(matches!(e, Error::DuplicateName { .. }), "{e}");
        let e = err(r#"{"__metadata__":{"k":"a","k":"b"}}"#, 0);
        assert!(matches!(e, Error::InvalidMetadata { .. }), "{e}");
    }

    #[test]
    fn hostile_values_are_bounded_and_typed() {
        // Deep nesting is skipped without recursion, or stops at serde_json's recursion limit,
        // never at the end of the stack.
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        let e = err(&format!(r#"{{"w":{open}{close}}}"#), 0);
        assert!(matches!(e, Error::EntryNotObject { .. }), "{e}");
        let e = err(&format!(r#"{{"w":{{"shape":{open}{close}}}}}"#), 0);
        assert!(e.is_malformed_file(), "{e}");
        let e = err(&format!(r#"{{"__metadata__":{{"k":{open}{close}}}}}"#), 0);
        assert!(e.is_malformed_file(), "{e}");
        assert!(matches!(
            err(&format!("{open}{close}"), 0),
            Error::HeaderNotObject { .. }
        ));
        assert!(matches!(err(&open, 0), Error::HeaderNotJson { .. }));
        // Unknown fields and values of the wrong kind are read past, whatever they hold.
        let h = r#"{"w":{"extra":[[1,{"a":[2]}],"x",null],"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(parse(path(), &build_file(h, &[0])).is_ok());
        let e = err(
            r#"{"w":{"dtype":"U8","shape":[1,[2]],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(matches!(e, Error::WrongFieldType { field: "shape", .. }));
        let e = err(
            r#"{"w":{"dtype":["U8"],"shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(matches!(e, Error::WrongFieldType { field: "dtype", .. }));
        for top in ["[]", "3", "\"x\"", "null", " \n[{}]"] {
            assert!(
                matches!(err(top, 0), Error::HeaderNotObject { .. }),
                "{top}"
            );
        }
        // A megabyte-long name is cut short in the message.
        let name = "n".repeat(1 << 20);
        let e = err(&format!(r#"{{"{name}":3}}"#), 0);
        assert!(matches!(e, Error::EntryNotObject { .. }));
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    }

    #[test]
    fn lookups_by_name_after_sorting_by_offset() {
        let h = r#"{"c":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let h = parse(path(), &build_file(h, &[0; 3])).unwrap();
        for (name, start) in [("a", 2), ("b", 1), ("c", 0)] {
            assert_eq!(h.get(name).unwrap().start, start);
        }
        assert!(h.get("d").is_none() && h.get("").is_none());
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
