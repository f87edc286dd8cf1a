//! A folder of finished decoder layers for streaming, resumable compression (`whittle compress --out`).
//!
//! Layout: `checkpoint.json` holds the job's key (model identity, plan, calibration windows); each finished layer
//! is one `layer-NNNNN.safetensors` holding its compressed linears (`{kind}.codes|scales|zeros|g_idx|mask` for
//! quantized ones, `{kind}.weight` for float ones) and, in the header metadata, its per-linear results. Each file is
//! written to a temporary name and renamed, so a file that exists is complete: a job killed at any point restarts
//! from the last layer it finished, and a folder made for another model, plan or calibration is refused rather than
//! mixed in. `states.safetensors` holds the calibration states after the last finished layer, so the restart does
//! not run the finished layers forward again.

use crate::compress::QuantizedLinear;
use crate::compress_model::{Checkpoint, CompressedWeight, FinishedLayer, LayerResult};
use crate::error::{Result, WhittleError};
use crate::export::atomic::write_atomic_file;
use crate::export::import::kernel_weight;
use crate::export::QuantizedSource;
use crate::model::{Model, LINEAR_KINDS};
use crate::plan::ResolvedPlan;
use whittle_kernels::{DenseWeight, Weight};
use safetensors::tensor::{Dtype, TensorView};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "checkpoint.json";
/// The calibration states after the last finished layer (`crate::saved_states`).
const STATES_FILE: &str = "states.safetensors";

/// Gives back the memory of the weights whose names start with the prefix (see `Checkpoint::release`).
pub type Release = Box<dyn Fn(&str)>;

pub struct CheckpointDir {
    dir: PathBuf,
    /// Frees a finished layer's original weights (the model's memory map); `None` in tests.
    release: Option<Release>,
}

impl CheckpointDir {
    /// Opens `dir` for the job described by `key`, creating it if needed. A folder holding another job's layers is an
    /// error naming the folder: its layers would not fit this job.
    pub fn open(dir: &Path, key: &serde_json::Value, release: Option<Release>) -> Result<Self> {
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            let text = std::fs::read_to_string(&key_path).map_err(|e| WhittleError::io(&key_path, e))?;
            let stored: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| WhittleError::file(&key_path, format!("not valid JSON: {e}")))?;
            if &stored != key {
                return Err(WhittleError::file(
                    dir,
                    "holds layers of a compression with another model, plan or calibration; delete the folder (or \
                     pass --restart) to start over",
                ));
            }
        } else {
            std::fs::create_dir_all(dir).map_err(|e| WhittleError::io(dir, e))?;
            write_atomic_file(&key_path, serde_json::to_string_pretty(key).expect("JSON value").as_bytes())?;
        }
        Ok(Self { dir: dir.to_path_buf(), release })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn layer_path(&self, layer: usize) -> PathBuf {
        layer_file(&self.dir, layer)
    }

    /// How many leading layers are finished.
    pub fn finished_layers(&self, num_layers: usize) -> usize {
        (0..num_layers).take_while(|l| self.layer_path(*l).exists()).count()
    }

}

/// A finished checkpoint read one decoder layer at a time: an export takes its integer forms layer by layer
/// ([`QuantizedSource`]), so writing a 7B model's export holds one layer's codes, not all of them.
pub struct CheckpointForms {
    dir: PathBuf,
    shapes: Vec<(String, usize, usize)>,
}

impl CheckpointForms {
    /// Opens the finished checkpoint in `dir` (every one of `num_layers` layers must be there), learning the
    /// quantized linears' shapes from the layer files' headers.
    pub fn open(dir: &Path, num_layers: usize) -> Result<Self> {
        let forms = Self { dir: dir.to_path_buf(), shapes: Vec::new() };
        let mut shapes = Vec::new();
        for l in 0..num_layers {
            let path = forms.layer_path(l);
            for (name, shape) in layer_tensors(&path)? {
                let Some(k) = name.strip_suffix(".codes").and_then(|kind| (0..LINEAR_KINDS.len()).find(|&k| kind_name(k) == kind)) else {
                    continue;
                };
                let [rows, cols] = shape[..] else {
                    return Err(WhittleError::field(&path, &name, format!("shape {shape:?} is not 2-D")));
                };
                shapes.push((Model::module_name(l, LINEAR_KINDS[k]), rows, cols));
            }
        }
        shapes.sort();
        Ok(Self { shapes, ..forms })
    }

    fn layer_path(&self, l: usize) -> PathBuf {
        layer_file(&self.dir, l)
    }

    fn layer(&self, l: usize) -> Result<FinishedLayer> {
        let path = self.layer_path(l);
        read_layer(&path, l)?.ok_or_else(|| missing_layer(&path))
    }

    /// Puts the compressed linears into `model` (a fresh load of the original): float ones as f32 and, with
    /// `pack_quantized`, quantized ones in the packed form the kernels run (a 7B model would not fit dequantized).
    /// Without it the quantized linears keep the original weights, for an export that reads their integer forms here,
    /// and a layer without float linears is not read at all.
    pub fn apply_to(&self, model: &mut Model, pack_quantized: bool) -> Result<()> {
        for l in 0..model.blocks.len() {
            if !pack_quantized && !layer_tensors(&self.layer_path(l))?.iter().any(|(name, _)| name.ends_with(".weight")) {
                continue;
            }
            for (k, w) in self.layer(l)?.weights {
                let lin = &mut model.blocks[l].linears[k];
                match w {
                    CompressedWeight::Quantized(q) if pack_quantized => lin.weight = kernel_weight(&q),
                    CompressedWeight::Quantized(_) => {}
                    CompressedWeight::Dense(v) => {
                        lin.weight = Weight::Dense(DenseWeight::from_f32(lin.weight.rows(), lin.weight.cols(), v));
                    }
                }
            }
        }
        Ok(())
    }
}

impl QuantizedSource for CheckpointForms {
    fn shapes(&self) -> Result<Vec<(String, usize, usize)>> {
        Ok(self.shapes.clone())
    }

    fn forms(&self, layer: Option<usize>) -> Result<BTreeMap<String, QuantizedLinear>> {
        let Some(l) = layer else { return Ok(BTreeMap::new()) };
        Ok(self
            .layer(l)?
            .weights
            .into_iter()
            .filter_map(|(k, w)| match w {
                CompressedWeight::Quantized(q) => Some((Model::module_name(l, LINEAR_KINDS[k]), q)),
                CompressedWeight::Dense(_) => None,
            })
            .collect())
    }
}

/// The key of a compression job: which model files, which plan, which calibration tokens. A checkpoint folder is
/// reused only for the same key.
pub fn job_key(model_dir: &Path, plan: &ResolvedPlan, windows: &[Vec<u32>]) -> Result<serde_json::Value> {
    let tokens: Vec<u8> = windows.iter().flat_map(|w| w.iter().flat_map(|t| t.to_le_bytes())).collect();
    let modules: Vec<String> = plan.modules.iter().map(|m| format!("{} {:?}", m.name, m.job)).collect();
    Ok(serde_json::json!({
        "format": 1,
        "whittle": env!("CARGO_PKG_VERSION"),
        "model": crate::search::cache::model_identity(model_dir)?,
        "plan": modules,
        "error_feedback": plan.error_feedback,
        "windows": windows.len(),
        "tokens_fnv1a": format!("{:016x}", crate::search::cache::fnv1a(&tokens)),
    }))
}

impl Checkpoint for CheckpointDir {
    fn spill_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn restore(&mut self, layer: usize) -> Result<Option<FinishedLayer>> {
        read_layer(&self.layer_path(layer), layer)
    }

    fn save(&mut self, layer: &FinishedLayer) -> Result<()> {
        let path = self.layer_path(layer.layer);
        write_atomic_file(&path, &encode(layer))
    }

    fn release(&mut self, prefix: &str) {
        if let Some(r) = &self.release {
            r(prefix);
        }
    }

    fn save_states(&mut self, after_layer: usize, paths: &[&[Vec<f32>]], hidden: usize) -> Result<()> {
        crate::saved_states::save(&self.dir.join(STATES_FILE), after_layer, paths, hidden)
    }

    fn restore_states(&mut self, paths: &mut [&mut Vec<Vec<f32>>]) -> Result<Option<usize>> {
        crate::saved_states::restore(&self.dir.join(STATES_FILE), paths)
    }
}

fn kind_name(k: usize) -> &'static str {
    LINEAR_KINDS[k].rsplit('.').next().expect("kind has a name")
}

/// The layer as safetensors bytes (values little-endian, shapes as stored).
fn encode(layer: &FinishedLayer) -> Vec<u8> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut quant_meta = BTreeMap::new();
    for (k, w) in &layer.weights {
        let kind = kind_name(*k);
        match w {
            CompressedWeight::Quantized(q) => {
                let ng = q.n_groups();
                buffers.push((format!("{kind}.codes"), Dtype::U8, vec![q.rows, q.cols], q.codes.clone()));
                let scales = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                buffers.push((format!("{kind}.scales"), Dtype::F32, vec![q.rows, ng], scales));
                buffers.push((format!("{kind}.zeros"), Dtype::U8, vec![q.rows, ng], q.zeros.clone()));
                if let Some(g) = &q.g_idx {
                    buffers.push((format!("{kind}.g_idx"), Dtype::U32, vec![q.cols], g.iter().flat_map(|v| v.to_le_bytes()).collect()));
                }
                if let Some(m) = &q.mask {
                    buffers.push((format!("{kind}.mask"), Dtype::U8, vec![q.rows, q.cols], m.iter().map(|b| *b as u8).collect()));
                }
                quant_meta.insert(kind.to_string(), serde_json::json!({ "bits": q.bits, "group_size": q.group_size, "sym": q.sym }));
            }
            CompressedWeight::Dense(v) => {
                let n = v.len();
                let rows = layer.results.iter().find(|r| r.kind == LINEAR_KINDS[*k]).map_or(1, |r| r.rows);
                buffers.push((format!("{kind}.weight"), Dtype::F32, vec![rows, n / rows.max(1)], v.iter().flat_map(|x| x.to_le_bytes()).collect()));
            }
        }
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("shape matches bytes")))
        .collect();
    let metadata = HashMap::from([
        ("results".to_string(), serde_json::to_string(&layer.results).expect("results serialize")),
        ("quant".to_string(), serde_json::Value::Object(quant_meta.into_iter().collect()).to_string()),
    ]);
    safetensors::serialize(views, Some(metadata)).expect("in-memory serialization")
}

/// The file of finished layer `layer` in a checkpoint folder.
fn layer_file(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("layer-{layer:05}.safetensors"))
}

fn missing_layer(path: &Path) -> WhittleError {
    WhittleError::file(path, "missing: the compression did not finish")
}

/// Maps one layer file; `None` when it does not exist. Mapped rather than read: a 7B layer is 0.2 GB, and a caller
/// that needs only the header (which tensors, which shapes) then touches one page.
fn map_layer(path: &Path) -> Result<Option<Mmap>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WhittleError::io(path, e)),
    };
    // SAFETY: read-only map of a file this job wrote under a temporary name and renamed; nothing changes it in place.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WhittleError::io(path, e))?;
    Ok(Some(map))
}

/// The names and shapes of a finished layer file's tensors, from its header alone.
fn layer_tensors(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let map = map_layer(path)?.ok_or_else(|| missing_layer(path))?;
    let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| WhittleError::file(path, format!("damaged checkpoint layer: {e}")))?;
    Ok(meta.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect())
}

/// Reads one layer file; `None` when it does not exist. A damaged file is an error naming it and the field.
fn read_layer(path: &Path, layer: usize) -> Result<Option<FinishedLayer>> {
    let Some(bytes) = map_layer(path)? else { return Ok(None) };
    let bad = |field: &str, why: String| WhittleError::field(path, field, why);
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| WhittleError::file(path, format!("damaged checkpoint layer: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| WhittleError::file(path, format!("damaged checkpoint layer: {e}")))?;
    let md = meta.metadata().clone().unwrap_or_default();
    let results: Vec<LayerResult> = serde_json::from_str(md.get("results").map_or("", String::as_str))
        .map_err(|e| bad("__metadata__.results", e.to_string()))?;
    let quant: serde_json::Map<String, serde_json::Value> = serde_json::from_str(md.get("quant").map_or("{}", String::as_str))
        .map_err(|e| bad("__metadata__.quant", e.to_string()))?;
    let tensor = |name: &str| -> Option<(Vec<usize>, &[u8])> { st.tensor(name).ok().map(|t| (t.shape().to_vec(), t.data())) };
    let mut weights = Vec::new();
    for k in 0..LINEAR_KINDS.len() {
        let kind = kind_name(k);
        if let Some(q) = quant.get(kind) {
            let field = |f: &str| q.get(f).and_then(|v| v.as_u64()).ok_or_else(|| bad(&format!("quant.{kind}.{f}"), "missing".into()));
            let (bits, group_size) = (field("bits")? as u8, field("group_size")? as usize);
            let sym = q.get("sym").and_then(|v| v.as_bool()).unwrap_or(true);
            let (shape, codes) = tensor(&format!("{kind}.codes")).ok_or_else(|| bad(&format!("{kind}.codes"), "missing".into()))?;
            let [rows, cols] = shape[..] else { return Err(bad(&format!("{kind}.codes"), format!("shape {shape:?} is not 2-D"))) };
            let ng = cols.div_ceil(group_size.max(1));
            let scales = tensor(&format!("{kind}.scales"))
                .filter(|(s, _)| s[..] == [rows, ng])
                .ok_or_else(|| bad(&format!("{kind}.scales"), format!("missing or not {rows}×{ng}")))?
                .1
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            let zeros = tensor(&format!("{kind}.zeros"))
                .filter(|(s, _)| s[..] == [rows, ng])
                .ok_or_else(|| bad(&format!("{kind}.zeros"), format!("missing or not {rows}×{ng}")))?
                .1
                .to_vec();
            let g_idx = tensor(&format!("{kind}.g_idx"))
                .map(|(_, b)| b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect());
            let mask = tensor(&format!("{kind}.mask")).map(|(_, b)| b.iter().map(|v| *v != 0).collect());
            let q = QuantizedLinear { rows, cols, bits, group_size, sym, codes: codes.to_vec(), scales, zeros, g_idx, mask };
            weights.push((k, CompressedWeight::Quantized(q)));
        } else if let Some((_, b)) = tensor(&format!("{kind}.weight")) {
            let v = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
            weights.push((k, CompressedWeight::Dense(v)));
        }
    }
    if results.len() != LINEAR_KINDS.len() || results.iter().any(|r| r.layer != layer) {
        return Err(bad("__metadata__.results", format!("expected the {} linears of layer {layer}", LINEAR_KINDS.len())));
    }
    Ok(Some(FinishedLayer { layer, results, weights }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(layer: usize, k: usize, rows: usize, cols: usize) -> LayerResult {
        LayerResult {
            name: crate::model::Model::module_name(layer, LINEAR_KINDS[k]),
            layer,
            kind: LINEAR_KINDS[k].into(),
            method: "gptq".into(),
            bits: Some(3),
            group: Some(4),
            sparsity: 0.0,
            rel_error: 0.01,
            bits_per_weight: 3.5,
            damp: Some(0.01),
            seconds: 0.1,
            rows,
            cols,
        }
    }

    #[test]
    fn a_saved_layer_restores_exactly_and_another_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        let key = serde_json::json!({"model": "m", "plan": "p"});
        let mut ck = CheckpointDir::open(&dir, &key, None).unwrap();
        let q = QuantizedLinear {
            rows: 3,
            cols: 10,
            bits: 3,
            group_size: 4,
            sym: false,
            codes: (0..30).map(|i| (i % 8) as u8).collect(),
            scales: vec![0.5, 0.25, 0.125, 1.0, 2.0, 4.0, 0.5, 0.5, 0.5],
            zeros: vec![1, 2, 3, 4, 5, 6, 7, 0, 1],
            g_idx: Some((0..10).map(|i| (i % 3) as u32).collect()),
            mask: Some((0..30).map(|i| i % 3 != 0).collect()),
        };
        let layer = FinishedLayer {
            layer: 2,
            results: (0..7).map(|k| result(2, k, 3, 10)).collect(),
            weights: vec![(0, CompressedWeight::Quantized(q.clone())), (6, CompressedWeight::Dense(vec![0.5; 30]))],
        };
        assert!(ck.restore(2).unwrap().is_none());
        ck.save(&layer).unwrap();
        let back = CheckpointDir::open(&dir, &key, None).unwrap().restore(2).unwrap().unwrap();
        assert_eq!(back.weights, layer.weights);
        assert_eq!(back.results.len(), 7);
        assert_eq!(back.results[6].name, layer.results[6].name);
        let other = CheckpointDir::open(&dir, &serde_json::json!({"model": "m", "plan": "other"}), None);
        assert!(other.err().unwrap().to_string().contains("another model, plan or calibration"));
    }

    #[test]
    fn a_truncated_layer_file_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ck = CheckpointDir::open(tmp.path(), &serde_json::json!(1), None).unwrap();
        let layer = FinishedLayer { layer: 0, results: (0..7).map(|k| result(0, k, 2, 2)).collect(), weights: vec![(1, CompressedWeight::Dense(vec![1.0; 4]))] };
        ck.save(&layer).unwrap();
        let path = tmp.path().join("layer-00000.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = ck.restore(0).unwrap_err().to_string();
        assert!(err.contains("layer-00000.safetensors"), "{err}");
    }
}
