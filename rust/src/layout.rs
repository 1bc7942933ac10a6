//! Plan an output checkpoint before any tensor is computed: which shard each tensor goes to,
//! its byte offsets, and each shard's finished header. Knowing every offset up front lets the
//! writer place tensors with positioned writes, in any order.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// What the caller asks for: one output tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

/// Where a tensor ends up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub shard: usize,
    /// Absolute byte offset in the shard file.
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub file_name: String,
    /// Indices into `Layout::specs`, in file order.
    pub tensors: Vec<usize>,
    /// The 8-byte length prefix plus the padded JSON header.
    pub header: Vec<u8>,
    pub data_len: u64,
}

impl ShardPlan {
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len
    }
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub specs: Vec<TensorSpec>,
    pub placements: Vec<Placement>,
    pub shards: Vec<ShardPlan>,
    pub total_bytes: u64,
    by_name: HashMap<String, usize>,
}

pub const SINGLE_FILE_NAME: &str = "model.safetensors";
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

/// "model-00002-of-00005.safetensors", as transformers names shards.
pub fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_FILE_NAME.to_owned()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

impl Layout {
    /// Greedy packing in the given order. A new shard starts when the next tensor would push
    /// the current (non-empty) shard past `max_shard_bytes`; `max_shard_bytes <= 0` means one
    /// shard. Budgets count tensor data only, like transformers' `max_shard_size`.
    pub fn plan(
        specs: Vec<TensorSpec>,
        max_shard_bytes: i64,
        metadata: &[(String, String)],
    ) -> Result<Layout> {
        let mut seen = HashSet::with_capacity(specs.len());
        let mut sizes = Vec::with_capacity(specs.len());
        for s in &specs {
            if !seen.insert(s.name.as_str()) {
                return Err(Error::DuplicateTensor(s.name.clone()));
            }
            let len = s
                .dtype
                .byte_len(&s.shape)
                .ok_or_else(|| Error::LayoutOverflow {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                })?;
            sizes.push(len);
        }
        let budget = u64::try_from(max_shard_bytes).ok().filter(|&b| b > 0);

        // Group tensor indices into shards.
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut current: u64 = 0;
        for (i, &len) in sizes.iter().enumerate() {
            let last = groups.len() - 1;
            if let Some(b) = budget {
                if !groups[last].is_empty() && current.saturating_add(len) > b {
                    groups.push(Vec::new());
                    current = 0;
                }
            }
            current = current.saturating_add(len);
            let last = groups.len() - 1;
            groups[last].push(i);
        }

        let count = groups.len();
        let mut placements = vec![
            Placement {
                shard: 0,
                offset: 0,
                len: 0
            };
            specs.len()
        ];
        let mut shards = Vec::with_capacity(count);
        let mut total_bytes: u64 = 0;
        for (shard, group) in groups.into_iter().enumerate() {
            let mut entries = Map::new();
            let mut meta = Map::new();
            meta.insert("format".into(), Value::String("pt".into()));
            for (k, v) in metadata {
                meta.insert(k.clone(), Value::String(v.clone()));
            }
            entries.insert("__metadata__".into(), Value::Object(meta));
            let mut rel: u64 = 0;
            let mut rel_offsets = Vec::with_capacity(group.len());
            for &i in &group {
                let end = rel
                    .checked_add(sizes[i])
                    .ok_or_else(|| Error::LayoutOverflow {
                        name: specs[i].name.clone(),
                        shape: specs[i].shape.clone(),
                    })?;
                entries.insert(
                    specs[i].name.clone(),
                    json!({
                        "dtype": specs[i].dtype.code(),
                        "shape": specs[i].shape,
                        "data_offsets": [rel, end],
                    }),
                );
                rel_offsets.push(rel);
                rel = end;
            }
            // Serializing a map of strings and integers cannot fail; fall back to an empty
            // object rather than panic.
            let mut json = serde_json::to_vec(&Value::Object(entries)).unwrap_or_default();
            // Pad so the data section starts 8-byte aligned.
            while !json.len().is_multiple_of(8) {
                json.push(b' ');
            }
            let mut header = (json.len() as u64).to_le_bytes().to_vec();
            header.extend_from_slice(&json);
            let data_start = header.len() as u64;
            for (&i, rel) in group.iter().zip(rel_offsets) {
                placements[i] = Placement {
                    shard,
                    offset: data_start + rel,
                    len: sizes[i],
                };
            }
            total_bytes = total_bytes.saturating_add(rel);
            shards.push(ShardPlan {
                file_name: shard_file_name(shard, count),
                tensors: group,
                header,
                data_len: rel,
            });
        }

        let by_name = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Ok(Layout {
            specs,
            placements,
            shards,
            total_bytes,
            by_name,
        })
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn shard_file_of(&self, name: &str) -> Option<&str> {
        let i = self.index_of(name)?;
        Some(&self.shards[self.placements[i].shard].file_name)
    }

    /// The `model.safetensors.index.json` text (transformers' format), keys in planned order.
    pub fn index_json(&self, index_metadata: &[(String, String)]) -> String {
        let mut meta = Map::new();
        meta.insert("total_size".into(), json!(self.total_bytes));
        for (k, v) in index_metadata {
            if k != "total_size" {
                meta.insert(k.clone(), Value::String(v.clone()));
            }
        }
        let mut weight_map = Map::new();
        for (spec, p) in self.specs.iter().zip(&self.placements) {
            weight_map.insert(
                spec.name.clone(),
                Value::String(self.shards[p.shard].file_name.clone()),
            );
        }
        let doc = json!({"metadata": meta, "weight_map": weight_map});
        let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header;
    use std::path::Path;

    fn spec(name: &str, dtype: Dtype, shape: &[u64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn names(l: &Layout, shard: usize) -> Vec<&str> {
        l.shards[shard]
            .tensors
            .iter()
            .map(|&i| l.specs[i].name.as_str())
            .collect()
    }

    #[test]
    fn single_shard() {
        let l = Layout::plan(
            vec![spec("b", Dtype::BF16, &[3]), spec("a", Dtype::F32, &[2, 2])],
            0,
            &[("k".into(), "v".into())],
        )
        .unwrap();
        assert_eq!(l.shards.len(), 1);
        assert_eq!(l.shards[0].file_name, "model.safetensors");
        assert_eq!(l.total_bytes, 6 + 16);
        assert_eq!(l.shards[0].header.len() % 8, 0);
        // The header parses back with our own validator and keeps order and offsets.
        let mut file = l.shards[0].header.clone();
        file.resize(l.shards[0].file_len() as usize, 0);
        let h = header::parse(Path::new("x"), &file).unwrap();
        assert_eq!(h.get("b").unwrap().start, 0);
        assert_eq!(h.get("a").unwrap().start, 6);
        assert_eq!(
            h.metadata.unwrap(),
            vec![("format".into(), "pt".into()), ("k".into(), "v".into())]
        );
        let json = std::str::from_utf8(&l.shards[0].header[8..]).unwrap();
        assert!(json.find("\"b\"").unwrap() < json.find("\"a\"").unwrap());
        assert_eq!(l.placements[1].offset, l.shards[0].header.len() as u64 + 6);
    }

    #[test]
    fn greedy_packing() {
        let specs = vec![
            spec("a", Dtype::U8, &[40]),
            spec("b", Dtype::U8, &[60]),
            spec("c", Dtype::U8, &[1]),
            spec("big", Dtype::U8, &[500]),
            spec("d", Dtype::U8, &[10]),
        ];
        let l = Layout::plan(specs, 100, &[]).unwrap();
        assert_eq!(l.shards.len(), 4);
        assert_eq!(names(&l, 0), ["a", "b"]);
        assert_eq!(names(&l, 1), ["c"]);
        assert_eq!(names(&l, 2), ["big"]);
        assert_eq!(names(&l, 3), ["d"]);
        assert_eq!(l.shards[2].file_name, "model-00003-of-00004.safetensors");
        assert_eq!(
            l.shard_file_of("d"),
            Some("model-00004-of-00004.safetensors")
        );
        assert_eq!(l.shard_file_of("zz"), None);
        assert_eq!(l.total_bytes, 611);
        let idx: Value = serde_json::from_str(&l.index_json(&[("x".into(), "y".into())])).unwrap();
        assert_eq!(idx["metadata"]["total_size"], 611);
        assert_eq!(idx["metadata"]["x"], "y");
        assert_eq!(idx["weight_map"]["big"], "model-00003-of-00004.safetensors");
        let keys: Vec<_> = idx["weight_map"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["a", "b", "c", "big", "d"]);
    }

    #[test]
    fn first_tensor_over_budget_gets_own_shard() {
        let l = Layout::plan(
            vec![spec("big", Dtype::U8, &[500]), spec("s", Dtype::U8, &[1])],
            100,
            &[],
        )
        .unwrap();
        assert_eq!(l.shards.len(), 2);
        assert_eq!(names(&l, 0), ["big"]);
    }

    #[test]
    fn empty_and_errors() {
        let l = Layout::plan(vec![], 10, &[]).unwrap();
        assert_eq!(l.shards.len(), 1);
        assert_eq!(l.total_bytes, 0);
        let dup = Layout::plan(
            vec![spec("a", Dtype::U8, &[1]), spec("a", Dtype::U8, &[2])],
            0,
            &[],
        );
        assert!(matches!(dup, Err(Error::DuplicateTensor(n)) if n == "a"));
        let huge = Layout::plan(vec![spec("h", Dtype::F64, &[u64::MAX])], 0, &[]);
        assert!(matches!(huge, Err(Error::LayoutOverflow { .. })));
    }

    #[test]
    fn file_names() {
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(0, 2), "model-00001-of-00002.safetensors");
        assert_eq!(
            shard_file_name(99_999, 100_000),
            "model-100000-of-100000.safetensors"
        );
    }
}
