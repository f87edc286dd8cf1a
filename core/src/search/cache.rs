//! The on-disk levels database: one folder per (model, calibration data, ladder), named by a hash of a key that
//! spells all of them out, under `~/.cache/whittle/levels/` (or `$XDG_CACHE_HOME/whittle/levels/`).
//!
//! Layout: `meta.json` (the full key, the linear shapes, level labels and per-level relative errors) and one raw
//! native-endian f32 file per (linear, level), `l0007_v02.f32`. Files are memory-mapped on load, so a 7B ladder
//! lives in the page cache rather than in the process, and a second search starts at once. A folder is built under
//! a temporary name and renamed when complete, so an interrupted build never looks valid; a key mismatch (the
//! model file changed, other calibration text, other ladder) just builds a new folder.

use crate::error::{Result, WhittleError};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use whittle_kernels::{DType, DenseWeight, SharedBytes, Weight};

/// Bumped when the layout or the meaning of stored levels changes.
const FORMAT: u32 = 1;

/// `$XDG_CACHE_HOME/whittle/levels`, else `~/.cache/whittle/levels`, else the temp folder.
pub fn default_cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("whittle")
        .join("levels")
}

/// 64-bit FNV-1a: stable across Rust versions (unlike `DefaultHasher`), plenty for naming cache folders; the
/// full key is stored and compared on load, so a collision cannot serve wrong data.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// What a model folder is, for cache keys: its canonical path and the size and modification time of every
/// safetensors file in it (rewriting the weights changes the key without hashing gigabytes).
pub fn model_identity(dir: &Path) -> Result<serde_json::Value> {
    let canonical = dir.canonicalize().map_err(|e| WhittleError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&canonical).map_err(|e| WhittleError::io(&canonical, e))? {
        let entry = entry.map_err(|e| WhittleError::io(&canonical, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let meta = entry.metadata().map_err(|e| WhittleError::io(entry.path(), e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        files.push(serde_json::json!({ "name": name, "bytes": meta.len(), "mtime_ns": mtime.to_string() }));
    }
    files.sort_by_key(|f| f["name"].as_str().unwrap_or_default().to_string());
    Ok(serde_json::json!({ "path": canonical.display().to_string(), "files": files }))
}

/// A full cache key and the folder name derived from it.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheKey {
    pub json: String,
    pub hash: String,
}

impl CacheKey {
    /// Key of a levels database: model identity, the calibration token ids (so text, tokenizer, sample count and
    /// window length are all in it), the ladder, how levels are calibrated (`calibration`: mode and level), and
    /// the crate version (compressor fixes invalidate old levels).
    pub fn levels(
        model: serde_json::Value,
        windows: &[Vec<u32>],
        ladder: &super::ladder::Ladder,
        calibration: serde_json::Value,
    ) -> Self {
        let tokens: Vec<u8> = windows.iter().flat_map(|w| w.iter().flat_map(|t| t.to_le_bytes())).collect();
        let key = serde_json::json!({
            "format": FORMAT,
            "whittle_core": env!("CARGO_PKG_VERSION"),
            "endian": if cfg!(target_endian = "little") { "little" } else { "big" },
            "model": model,
            "calibration": {
                "windows": windows.len(),
                "ctx": windows.first().map_or(0, Vec::len),
                "tokens_fnv1a": format!("{:016x}", fnv1a(&tokens)),
            },
            "ladder": ladder,
            "levels_calibration": calibration,
        });
        let json = key.to_string();
        let hash = format!("{:016x}", fnv1a(json.as_bytes()));
        CacheKey { json, hash }
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    key: String,
    linears: Vec<(String, usize, usize)>,
    levels: Vec<String>,
    rel_errors: Vec<Vec<f64>>,
}

/// The folder of one levels database.
#[derive(Clone, Debug)]
pub struct LevelsStore {
    pub dir: PathBuf,
    pub key: CacheKey,
}

/// What a stored database holds: weights `[linear][level]` (memory-mapped) and relative errors.
pub struct Stored {
    pub weights: Vec<Vec<Weight>>,
    pub rel_errors: Vec<Vec<f64>>,
}

fn file_name(linear: usize, level: usize) -> String {
    format!("l{linear:04}_v{level:02}.f32")
}

/// Maps a stored weight file as a dense f32 weight, checking its length.
fn map_weight(path: &Path, rows: usize, cols: usize) -> Result<Weight> {
    let file = std::fs::File::open(path).map_err(|e| WhittleError::io(path, e))?;
    // SAFETY: the file lives in our own cache folder and is never written after the folder is complete; the usual
    // mmap caveat (another process truncating it) is the same as for the model's safetensors.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WhittleError::io(path, e))?;
    let want = rows * cols * 4;
    if map.len() != want {
        return Err(WhittleError::file(path, format!("holds {} bytes, expected {want} ({rows}×{cols} f32)", map.len())));
    }
    let bytes = SharedBytes::new(Arc::new(map), 0, want);
    Ok(Weight::Dense(DenseWeight::from_bytes(rows, cols, DType::F32, bytes)))
}

impl LevelsStore {
    pub fn new(root: &Path, key: CacheKey) -> Self {
        LevelsStore { dir: root.join(&key.hash), key }
    }

    /// The stored database if this folder holds exactly this key, shapes and ladder; `None` when absent or stale.
    pub fn load(&self, shapes: &[(String, usize, usize)], labels: &[String]) -> Option<Stored> {
        let text = std::fs::read_to_string(self.dir.join("meta.json")).ok()?;
        let meta: Meta = serde_json::from_str(&text).ok()?;
        if meta.format != FORMAT || meta.key != self.key.json || meta.linears != shapes || meta.levels != labels {
            return None;
        }
        if meta.rel_errors.len() != shapes.len() || meta.rel_errors.iter().any(|r| r.len() != labels.len()) {
            return None;
        }
        let mut weights = Vec::with_capacity(shapes.len());
        for (i, (_, rows, cols)) in shapes.iter().enumerate() {
            let row: Option<Vec<Weight>> =
                (0..labels.len()).map(|l| map_weight(&self.dir.join(file_name(i, l)), *rows, *cols).ok()).collect();
            weights.push(row?);
        }
        Some(Stored { weights, rel_errors: meta.rel_errors })
    }

    /// Starts a build: a fresh temporary folder beside the final one.
    pub fn begin(&self) -> Result<Building> {
        let tmp = self.dir.with_extension(format!("tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| WhittleError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| WhittleError::io(&tmp, e))?;
        Ok(Building { tmp, store: self.clone() })
    }
}

/// A database being written.
pub struct Building {
    tmp: PathBuf,
    store: LevelsStore,
}

impl Building {
    /// Writes one level's weights and returns them memory-mapped (the caller's copy can be dropped).
    pub fn write(&self, linear: usize, level: usize, rows: usize, cols: usize, data: &[f32]) -> Result<Weight> {
        let path = self.tmp.join(file_name(linear, level));
        std::fs::write(&path, bytemuck::cast_slice::<f32, u8>(data)).map_err(|e| WhittleError::io(&path, e))?;
        map_weight(&path, rows, cols)
    }

    /// Writes `meta.json` and moves the folder into place. Mapped weights stay valid across the rename.
    pub fn commit(self, shapes: &[(String, usize, usize)], labels: &[String], rel_errors: &[Vec<f64>]) -> Result<PathBuf> {
        let meta = Meta {
            format: FORMAT,
            key: self.store.key.json.clone(),
            linears: shapes.to_vec(),
            levels: labels.to_vec(),
            rel_errors: rel_errors.to_vec(),
        };
        let path = self.tmp.join("meta.json");
        let text = serde_json::to_string(&meta).map_err(|e| WhittleError::file(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| WhittleError::io(&path, e))?;
        let dir = &self.store.dir;
        if dir.exists() {
            // A stale or half-written folder of the same key: replace it.
            std::fs::remove_dir_all(dir).map_err(|e| WhittleError::io(dir, e))?;
        }
        std::fs::rename(&self.tmp, dir).map_err(|e| WhittleError::io(dir, e))?;
        Ok(dir.clone())
    }

    /// Removes the temporary folder of an abandoned build.
    pub fn abandon(self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::ladder::{GridArgs, Ladder};

    fn ladder() -> Ladder {
        Ladder::parse("gptq:2,3", &GridArgs::default()).unwrap()
    }

    fn key(tokens: u32) -> CacheKey {
        let ladder = ladder();
        CacheKey::levels(serde_json::json!({"path": "m"}), &[vec![1, 2, tokens]], &ladder, serde_json::json!("dense"))
    }

    #[test]
    fn keys_change_with_calibration_tokens_and_ladder() {
        assert_eq!(key(3), key(3));
        assert_ne!(key(3).hash, key(4).hash);
        let other = Ladder::parse("gptq:2,4", &GridArgs::default()).unwrap();
        let m = || serde_json::json!({"path": "m"});
        assert_ne!(CacheKey::levels(m(), &[vec![1, 2, 3]], &other, serde_json::json!("dense")).hash, key(3).hash);
        let seq = serde_json::json!({"sequential": "w3"});
        assert_ne!(CacheKey::levels(m(), &[vec![1, 2, 3]], &ladder(), seq).hash, key(3).hash);
    }

    #[test]
    fn stored_levels_round_trip_and_stale_keys_miss() {
        let root = tempfile::tempdir().unwrap();
        let shapes = vec![("a".to_string(), 2, 3)];
        let labels = vec!["w2".to_string(), "w3".to_string()];
        let store = LevelsStore::new(root.path(), key(3));
        assert!(store.load(&shapes, &labels).is_none());
        let b = store.begin().unwrap();
        let w0 = b.write(0, 0, 2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        b.write(0, 1, 2, 3, &[0.5; 6]).unwrap();
        b.commit(&shapes, &labels, &[vec![0.2, 0.1]]).unwrap();
        let got = store.load(&shapes, &labels).expect("cached");
        assert_eq!(got.rel_errors, vec![vec![0.2, 0.1]]);
        let Weight::Dense(d) = &got.weights[0][0] else { panic!("dense") };
        assert_eq!(d.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let Weight::Dense(d0) = &w0 else { panic!("dense") };
        assert_eq!(d0.to_f32_vec()[5], 6.0, "weights mapped during the build survive the rename");
        // Same folder name, different key inside: stale.
        let other = LevelsStore { dir: store.dir.clone(), key: key(4) };
        assert!(other.load(&shapes, &labels).is_none());
        assert!(store.load(&[("a".to_string(), 3, 2)], &labels).is_none());
        std::fs::write(store.dir.join(file_name(0, 1)), [0u8; 4]).unwrap();
        assert!(store.load(&shapes, &labels).is_none(), "a truncated level file is not served");
    }

    #[test]
    fn model_identity_sees_weight_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), [0u8; 8]).unwrap();
        let a = model_identity(dir.path()).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), [0u8; 9]).unwrap();
        assert_ne!(a, model_identity(dir.path()).unwrap());
    }
}
