//! Tensor storage of a model folder: one or several memory-mapped safetensors files (a sharded folder has
//! `model.safetensors.index.json`). Headers are validated by the `safetensors` crate against the file length before
//! any tensor is touched, so a lying header is an error, never an out-of-bounds read. Weights stay in the map and are
//! read in their stored dtype; nothing is copied unless a tensor is misaligned or the caller asks for f32.

use crate::error::{Result, WhittleError};
use memmap2::Mmap;
use safetensors::{tensor::Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use whittle_kernels::{DType, DenseWeight, SharedBytes};

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

pub struct WeightStore {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: BTreeMap<String, TensorEntry>,
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file too short for a safetensors header (needs at least 8 bytes)".into(),
        E::HeaderTooLarge | E::InvalidHeaderLength => {
            "header length (first 8 bytes) is larger than the file: truncated or not a safetensors file".into()
        }
        E::InvalidHeaderDeserialization(e) => format!("header JSON invalid (field `dtype`, `shape` or `data_offsets`): {e}"),
        E::MetadataIncompleteBuffer => "file length disagrees with the header's data_offsets: truncated or padded file".into(),
        E::InvalidOffset(name) => format!("tensor `{name}`: data_offsets are not contiguous"),
        E::TensorInvalidInfo => "a tensor's data_offsets disagree with its dtype and shape".into(),
        other => format!("invalid safetensors file: {other}"),
    }
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`, in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| WhittleError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WhittleError::file(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| WhittleError::field(&index, "weight_map", "missing or not an object"))?;
            let mut shard_names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let f = file.as_str().ok_or_else(|| {
                    WhittleError::field(&index, format!("weight_map.{tensor}"), "expected a file name")
                })?;
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(WhittleError::field(&index, format!("weight_map.{tensor}"), format!("suspicious shard name `{f}`")));
                }
                if !shard_names.iter().any(|s| s == f) {
                    shard_names.push(f.to_string());
                }
            }
            shard_names.sort();
            let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
            let store = Self::open_files(&paths)?;
            for tensor in map.keys() {
                if !store.tensors.contains_key(tensor) {
                    return Err(WhittleError::field(&index, format!("weight_map.{tensor}"), "tensor not found in its shard"));
                }
            }
            Ok(store)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(WhittleError::file(dir, "no model.safetensors or model.safetensors.index.json in this folder"))
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| WhittleError::io(path, e))?;
            // SAFETY: the map is read-only; a concurrent truncation by another process could fault, which is the
            // accepted trade-off of memory-mapping model files (every peer loader does the same).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| WhittleError::io(path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| WhittleError::file(path, describe(&e)))?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name.clone(),
                    TensorEntry { file: fi, dtype: info.dtype, shape: info.shape.clone(), start: data_start + s, end: data_start + e },
                );
            }
            files.push((path.clone(), Arc::new(mmap)));
        }
        Ok(Self { files, tensors })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    /// The file a tensor lives in (for error messages), or the first file.
    pub fn path_of(&self, name: &str) -> &Path {
        let fi = self.tensors.get(name).map(|e| e.file).unwrap_or(0);
        &self.files[fi].0
    }
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|(_, m)| m.len() as u64).sum()
    }
    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(p, _)| p.clone()).collect()
    }

    fn entry_checked(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| WhittleError::field(self.path_of(name), name, "tensor missing"))?;
        if e.shape != shape {
            return Err(WhittleError::field(
                &self.files[e.file].0,
                name,
                format!("shape {:?} disagrees with config.json, which implies {:?}", e.shape, shape),
            ));
        }
        Ok(e)
    }

    pub fn bytes(&self, name: &str) -> Option<SharedBytes> {
        let e = self.tensors.get(name)?;
        let owner: Arc<dyn std::ops::Deref<Target = [u8]> + Send + Sync> = self.files[e.file].1.clone();
        Some(SharedBytes::new(owner, e.start, e.end - e.start))
    }

    fn float_dtype(&self, name: &str, e: &TensorEntry) -> Result<DType> {
        match e.dtype {
            Dtype::F32 => Ok(DType::F32),
            Dtype::F16 => Ok(DType::F16),
            Dtype::BF16 => Ok(DType::BF16),
            other => Err(WhittleError::field(
                &self.files[e.file].0,
                name,
                format!("dtype {other:?} not supported for float weights (F32, F16, BF16)"),
            )),
        }
    }

    /// A 2-D float tensor as a kernel weight, kept in its stored dtype (no copy when aligned).
    pub fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<DenseWeight> {
        let e = self.entry_checked(name, &[rows, cols])?;
        let dtype = self.float_dtype(name, e)?;
        Ok(DenseWeight::from_bytes(rows, cols, dtype, self.bytes(name).expect("entry exists")))
    }

    /// A float tensor of the given shape widened to f32 (norm weights, biases).
    pub fn f32_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry_checked(name, shape)?;
        let dtype = self.float_dtype(name, e)?;
        let n: usize = shape.iter().product();
        Ok(DenseWeight::from_bytes(1, n, dtype, self.bytes(name).expect("entry exists")).to_f32_vec())
    }

    /// Raw little-endian values of an integer tensor (for packed formats), with its shape and dtype.
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, SharedBytes)> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| WhittleError::field(self.path_of(name), name, "tensor missing"))?;
        Ok((e.dtype, e.shape.clone(), self.bytes(name).expect("entry exists")))
    }

    /// Drops the resident pages of every tensor whose name starts with `prefix` from this process (they are read
    /// again from the file if touched). Streaming compression calls it for each finished decoder layer, so memory
    /// holds one layer of weights, not every layer read so far. Errors are ignored: releasing is an optimisation.
    pub fn release(&self, prefix: &str) {
        for e in self.tensors.range(prefix.to_string()..).take_while(|(n, _)| n.starts_with(prefix)).map(|(_, e)| e) {
            #[cfg(unix)]
            // SAFETY: the map is a read-only shared file mapping; MADV_DONTNEED on it only discards page-table entries,
            // and later reads fault the same bytes back in from the file, so no reference observes a change.
            unsafe {
                let _ = self.files[e.file].1.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, e.start, e.end - e.start);
            }
            #[cfg(not(unix))]
            let _ = e;
        }
    }

    /// Tensor names grouped by file (used by exports that copy untouched tensors).
    pub fn by_file(&self) -> HashMap<usize, Vec<String>> {
        let mut m: HashMap<usize, Vec<String>> = HashMap::new();
        for (n, e) in &self.tensors {
            m.entry(e.file).or_default().push(n.clone());
        }
        m
    }
}
