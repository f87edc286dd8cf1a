//! The calibration states between decoder layers, saved beside a checkpoint's finished layers
//! (`states.safetensors`), so a restarted compression continues from the last finished layer's outputs instead of
//! running every finished layer forward again (on a 7b-shaped model with 128×512 calibration tokens that replay costs
//! about 2.5 minutes per finished layer and path pair; the file is 2 × 1 GiB).
//!
//! One file, replaced after each layer: tensors `q.{window}` (the compressed path) and `d.{window}` (the dense path
//! of error feedback), each `[tokens, hidden]` f32, and `after_layer` in the header metadata: how many leading layers
//! the states have passed through. It is written to a temporary name and renamed, so a file that exists is complete.
//! Written and read a tensor at a time through the file (not built in memory or mapped whole), so saving and
//! restoring add nothing to the job's resident memory beyond the states themselves.

use crate::error::{Result, WhittleError};
use crate::export::atomic::write_atomic_with;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const PATH_PREFIXES: [&str; 2] = ["q", "d"];
const AFTER_LAYER: &str = "after_layer";

/// Writes `paths` (the compressed path's states, then the dense path's when error feedback runs) as the states after
/// `after_layer` layers, replacing the file at `path` atomically.
pub fn save(path: &Path, after_layer: usize, paths: &[&[Vec<f32>]], hidden: usize) -> Result<()> {
    let mut views = Vec::new();
    for (prefix, states) in PATH_PREFIXES.iter().zip(paths) {
        for (i, x) in states.iter().enumerate() {
            let view = TensorView::new(Dtype::F32, vec![x.len() / hidden.max(1), hidden], bytemuck::cast_slice(x))
                .map_err(|e| WhittleError::file(path, format!("calibration state {prefix}.{i}: {e}")))?;
            views.push((format!("{prefix}.{i}"), view));
        }
    }
    let metadata = HashMap::from([(AFTER_LAYER.to_string(), after_layer.to_string())]);
    write_atomic_with(path, |tmp| safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(std::io::Error::other))
}

/// Reads the states at `path` into `paths` (sized as the job's own states, which the file must match exactly) and
/// returns how many layers they have passed through; `None` when there is no file. A file that does not fit this
/// job is an error naming it and the field: it was written by the same job key, so a mismatch means damage.
pub fn restore(path: &Path, paths: &mut [&mut Vec<Vec<f32>>]) -> Result<Option<usize>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WhittleError::io(path, e)),
    };
    let damaged = |why: String| WhittleError::file(path, format!("damaged calibration states (delete the file to recompute them): {why}"));
    // The header alone is parsed from a map (one page touched); the data is then read tensor by tensor.
    // SAFETY: read-only map of a file this job wrote under a temporary name and renamed; nothing changes it in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| WhittleError::io(path, e))?;
    let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| damaged(e.to_string()))?;
    let after_layer: usize = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(AFTER_LAYER))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| WhittleError::field(path, format!("__metadata__.{AFTER_LAYER}"), "missing or not a layer count"))?;
    let tensors: HashMap<String, _> = meta.tensors().into_iter().collect();
    let expected: usize = paths.iter().map(|p| p.len()).sum();
    if tensors.len() != expected {
        return Err(damaged(format!("{} tensors, this job has {expected} window states", tensors.len())));
    }
    drop(map);
    let data_start = 8 + header as u64;
    for (prefix, states) in PATH_PREFIXES.iter().zip(paths.iter_mut()) {
        for (i, x) in states.iter_mut().enumerate() {
            let name = format!("{prefix}.{i}");
            let info = tensors.get(&name).ok_or_else(|| WhittleError::field(path, &name, "missing"))?;
            let (start, end) = info.data_offsets;
            if info.dtype != Dtype::F32 || end - start != x.len() * 4 {
                return Err(WhittleError::field(path, &name, format!("expected {} f32 values, found {:?} of {} bytes", x.len(), info.dtype, end - start)));
            }
            file.seek(SeekFrom::Start(data_start + start as u64)).map_err(|e| WhittleError::io(path, e))?;
            file.read_exact(bytemuck::cast_slice_mut(x)).map_err(|e| WhittleError::io(path, e))?;
        }
    }
    Ok(Some(after_layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(seed: f32, windows: usize, tokens: usize, hidden: usize) -> Vec<Vec<f32>> {
        (0..windows).map(|w| (0..tokens * hidden).map(|i| seed + (w * 1000 + i) as f32 * 0.5).collect()).collect()
    }

    #[test]
    fn states_round_trip_bit_exactly_and_replace_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("states.safetensors");
        let (q, d) = (states(1.0, 3, 5, 4), states(-7.0, 3, 5, 4));
        save(&path, 2, &[&states(0.0, 3, 5, 4), &states(0.0, 3, 5, 4)], 4).unwrap();
        save(&path, 3, &[&q, &d], 4).unwrap();
        let (mut q2, mut d2) = (vec![vec![0.0; 20]; 3], vec![vec![0.0; 20]; 3]);
        assert_eq!(restore(&path, &mut [&mut q2, &mut d2]).unwrap(), Some(3));
        assert_eq!((q2, d2), (q, d));
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["states.safetensors"], "no temporary file is left behind");
    }

    #[test]
    fn missing_file_is_none_and_a_mismatched_or_truncated_one_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("states.safetensors");
        let mut q = vec![vec![0.0; 8]; 2];
        assert_eq!(restore(&path, &mut [&mut q]).unwrap(), None);
        save(&path, 1, &[&states(0.0, 2, 2, 4)], 4).unwrap();
        let mut longer = vec![vec![0.0; 12]; 2];
        let e = restore(&path, &mut [&mut longer]).unwrap_err().to_string();
        assert!(e.contains("states.safetensors") && e.contains("q.0"), "{e}");
        let mut more = vec![vec![0.0; 8]; 3];
        assert!(restore(&path, &mut [&mut more]).unwrap_err().to_string().contains("damaged"));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = restore(&path, &mut [&mut q]).unwrap_err().to_string();
        assert!(e.contains("states.safetensors") && e.contains("damaged"), "{e}");
    }
}
