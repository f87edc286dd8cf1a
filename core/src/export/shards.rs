//! Writing tensors as safetensors (formats.md §0): one `model.safetensors`, or `model-0000i-of-0000K.safetensors`
//! shards plus `model.safetensors.index.json` when the tensors exceed one shard.
//!
//! The writer is our own rather than the `safetensors` crate's serializer (which takes every tensor at once) so it
//! can write the header from the tensors' metas first and then stream each tensor straight to the file in the order
//! given, built only when it is due (the packers' order keeps a layer's tensors together in one shard), and pad the
//! header with spaces so the data starts 8-byte aligned, which memory-mapping readers rely on. Tests read every
//! file back with the `safetensors` crate, which validates offsets independently.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::error::{ExportError, Result};
use super::tensor::{Dtype, RawTensor};

/// The file name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A tensor to be written: name, dtype, shape and byte length, known before its bytes exist, so a file's header
/// can be written first and the data streamed after it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

impl TensorMeta {
    pub fn of(name: &str, t: &RawTensor) -> Self {
        Self { name: name.to_string(), dtype: t.dtype, shape: t.shape.clone(), bytes: t.data.len() }
    }
}

/// The header (length prefix excluded) of a file holding `tensors` back to back in the given order, padded with
/// spaces to make `8 + header.len()` a multiple of 8.
fn header(tensors: &[TensorMeta], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut map = Map::new();
    let mut meta = metadata.clone();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    map.insert("__metadata__".into(), json!(meta));
    let mut offset = 0usize;
    for t in tensors {
        let end = offset + t.bytes;
        map.insert(t.name.clone(), json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(map))
        .map_err(|e| ExportError::tensor("(safetensors header)", format!("cannot serialize: {e}")))?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

fn check_tensors(tensors: &[TensorMeta]) -> Result<()> {
    let mut seen = HashSet::new();
    for t in tensors {
        let name = &t.name;
        if name.is_empty() || name == "__metadata__" {
            return Err(ExportError::tensor(name, "is not a valid tensor name"));
        }
        if !seen.insert(name.as_str()) {
            return Err(ExportError::tensor(name, "appears twice"));
        }
        let numel: usize = t.shape.iter().product();
        if t.bytes != numel * t.dtype.size() {
            return Err(ExportError::tensor(
                name,
                format!("{} bytes do not match dtype {} and shape {:?}", t.bytes, t.dtype, t.shape),
            ));
        }
    }
    Ok(())
}

/// Where a streamed write gets each tensor's bytes, in the order of the metas it was given.
pub type TensorFeed<'a> = dyn FnMut(&TensorMeta) -> Result<RawTensor> + 'a;

/// Writes one safetensors file holding `tensors` in order, taking each one's bytes from `feed` as it goes (so only
/// one tensor needs to be in memory), and flushes it to disk. A fed tensor that disagrees with its meta is an error.
fn write_file_streamed(
    path: &Path,
    tensors: &[TensorMeta],
    metadata: &BTreeMap<String, String>,
    feed: &mut TensorFeed<'_>,
) -> Result<()> {
    let head = header(tensors, metadata)?;
    let io = |e| ExportError::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::new(file);
    w.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&head).map_err(io)?;
    for meta in tensors {
        let t = feed(meta)?;
        if TensorMeta::of(&meta.name, &t) != *meta {
            return Err(ExportError::tensor(
                &meta.name,
                format!("was planned as {} {:?} ({} bytes) but built as {} {:?} ({} bytes)", meta.dtype, meta.shape, meta.bytes, t.dtype, t.shape, t.data.len()),
            ));
        }
        w.write_all(&t.data).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| ExportError::io(path, e.into_error()))?;
    file.sync_all().map_err(io)
}

/// Writes `tensors` into `dir` as `model.safetensors`, or, when they exceed `max_shard_bytes`, as
/// `model-0000i-of-0000K.safetensors` shards plus `model.safetensors.index.json` (`total_size` = bytes of tensor
/// data, `weight_map` = tensor → shard). Tensors keep their order and fill shards greedily; a tensor larger than
/// the limit gets a shard of its own. Returns the files written, index last.
pub fn write_safetensors_sharded(
    dir: &Path,
    tensors: Vec<(String, RawTensor)>,
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<PathBuf>> {
    let metas: Vec<TensorMeta> = tensors.iter().map(|(n, t)| TensorMeta::of(n, t)).collect();
    let mut queue = tensors.into_iter();
    write_safetensors_streamed(dir, metas, max_shard_bytes, metadata, &mut |_| {
        Ok(queue.next().expect("one tensor per meta").1)
    })
}

/// [`write_safetensors_sharded`] from metas known up front, with each tensor's bytes taken from `feed` in order
/// while the files are written: memory holds one tensor (plus whatever `feed` keeps), whatever the model's size.
pub fn write_safetensors_streamed(
    dir: &Path,
    tensors: Vec<TensorMeta>,
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
    feed: &mut TensorFeed<'_>,
) -> Result<Vec<PathBuf>> {
    check_tensors(&tensors)?;
    let total_size: u64 = tensors.iter().map(|t| t.bytes as u64).sum();
    let mut shards: Vec<Vec<TensorMeta>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let size = t.bytes as u64;
        let last = shards.len() - 1;
        if !shards[last].is_empty() && current + size > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        let last = shards.len() - 1;
        shards[last].push(t);
    }

    if shards.len() == 1 {
        let path = dir.join(SINGLE_FILE);
        write_file_streamed(&path, &shards[0], metadata, feed)?;
        return Ok(vec![path]);
    }
    let k = shards.len();
    let mut paths = Vec::with_capacity(k + 1);
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{k:05}.safetensors", i + 1);
        let path = dir.join(&file_name);
        write_file_streamed(&path, shard, metadata, feed)?;
        for t in shard {
            weight_map.insert(t.name.clone(), file_name.clone());
        }
        paths.push(path);
    }
    let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| ExportError::tensor("(safetensors index)", format!("cannot serialize: {e}")))?;
    std::fs::write(&path, text).map_err(|e| ExportError::io(&path, e))?;
    paths.push(path);
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tensor::{Dtype, FloatDtype};

    fn t(n: usize) -> RawTensor {
        RawTensor::from_u8(vec![n], (0..n).map(|i| i as u8).collect())
    }

    fn read(path: &Path) -> (Vec<u8>, Vec<(String, RawTensor)>) {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, RawTensor)> =
            st.tensors().into_iter().map(|(n, v)| (n.clone(), RawTensor::from_view(&n, &v).unwrap())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        (bytes, out)
    }

    #[test]
    fn single_file_is_aligned_and_reads_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("b.qweight".to_string(), RawTensor::from_i32(vec![2, 3], &[1, -2, 3, -4, 5, -6])),
            ("a.scales".to_string(), RawTensor::from_f32_rounded(FloatDtype::F16, vec![3], &[0.5, 1.0, 2.0])),
            ("c.odd".to_string(), t(3)),
        ];
        let meta = BTreeMap::from([("producer".to_string(), "whittle".to_string())]);
        let files = write_safetensors_sharded(dir.path(), tensors.clone(), 1 << 20, &meta).unwrap();
        assert_eq!(files, vec![dir.path().join("model.safetensors")]);
        assert!(!dir.path().join(INDEX_FILE).exists());
        let (bytes, back) = read(&files[0]);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data must start 8-byte aligned");
        let head: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(head["__metadata__"], json!({"format": "pt", "producer": "whittle"}));
        // Data in the given order: the i32 tensor first.
        assert_eq!(head["b.qweight"]["data_offsets"], json!([0, 24]));
        assert_eq!(head["a.scales"]["data_offsets"], json!([24, 30]));
        let mut want = tensors;
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(back, want);
        assert_eq!(back[1].1.dtype, Dtype::I32);
    }

    #[test]
    fn shards_split_greedily_with_correct_index() {
        let dir = tempfile::tempdir().unwrap();
        // 40 + 40 fit a 100-byte shard, the next 40 does not; 150 exceeds the limit alone and gets its own shard.
        let tensors = vec![
            ("l0.a".to_string(), t(40)),
            ("l0.b".to_string(), t(40)),
            ("l1.a".to_string(), t(40)),
            ("big".to_string(), t(150)),
            ("l2.a".to_string(), t(10)),
        ];
        let files = write_safetensors_sharded(dir.path(), tensors, 100, &BTreeMap::new()).unwrap();
        let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            vec![
                "model-00001-of-00004.safetensors",
                "model-00002-of-00004.safetensors",
                "model-00003-of-00004.safetensors",
                "model-00004-of-00004.safetensors",
                "model.safetensors.index.json"
            ]
        );
        let index: Value = serde_json::from_str(&std::fs::read_to_string(&files[4]).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], json!(280));
        assert_eq!(
            index["weight_map"],
            json!({
                "l0.a": "model-00001-of-00004.safetensors",
                "l0.b": "model-00001-of-00004.safetensors",
                "l1.a": "model-00002-of-00004.safetensors",
                "big": "model-00003-of-00004.safetensors",
                "l2.a": "model-00004-of-00004.safetensors"
            })
        );
        // Every tensor is in the shard the index names, with its bytes intact.
        for (name, file) in index["weight_map"].as_object().unwrap() {
            let (_, back) = read(&dir.path().join(file.as_str().unwrap()));
            let got = back.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!(got.1.data, t(got.1.numel()).data, "{name}");
        }
    }

    #[test]
    fn refuses_duplicate_names_and_inconsistent_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let dup = vec![("a".to_string(), t(1)), ("a".to_string(), t(2))];
        assert!(write_safetensors_sharded(dir.path(), dup, 10, &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        let bad = RawTensor { dtype: Dtype::I32, shape: vec![2], data: vec![0; 5] };
        let err = write_safetensors_sharded(dir.path(), vec![("x".into(), bad)], 10, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().starts_with("tensor `x`: 5 bytes"), "{err}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "nothing written on refusal");
    }
}
