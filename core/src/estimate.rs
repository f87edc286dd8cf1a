//! What a compression will cost before it starts: peak memory, disk and a rough time, from the model's shapes,
//! the plan and the calibration size, so a job that cannot fit is refused with a clear message instead of being
//! killed by the OOM killer an hour in.
//!
//! The memory model follows the compression as it runs ([`Mode`]): the calibration states of every window on both
//! paths, the restart cache where it is in memory, one chunk of per-window forward scratch, and the largest
//! linear's Hessian, cross term and GPTQ working set; then, streaming (`compress_model_with` + `checkpoint`), one
//! layer's weights and the embedding, or, in memory (the window), the whole compressed copy. The time is an order
//! of magnitude: calibration FLOPs and GPTQ FLOPs over an assumed sustained rate per core.

use crate::calib::ResumeCache;
use crate::model::ModelConfig;
use crate::plan::ResolvedPlan;
use serde::Serialize;


/// Sustained FLOP/s per core assumed for the time estimate, as the formula below counts them: calibrated on the
/// development VM (2 cores), where a 7b-shaped GPTQ w4g128 layer with error feedback and 128×512 calibration
/// tokens takes about 12.7 minutes with the restart cache on disk, about 40 GFLOP/s per core by this count. An
/// estimate, not a promise.
const FLOPS_PER_CORE: f64 = 40e9;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Estimate {
    /// Peak resident bytes while compressing.
    pub compress_peak_bytes: u64,
    /// Peak resident bytes while writing the export (all integer forms and the packed tensors at once).
    pub export_peak_bytes: u64,
    /// Bytes written: finished layers and calibration states in the checkpoint folder, then the export.
    pub disk_bytes: u64,
    /// Order of magnitude of the wall time on `cores` cores.
    pub seconds: f64,
    /// How the job holds the model (what the advice of [`check_fits`] says to change).
    pub mode: Mode,
}

impl Estimate {
    pub fn peak_bytes(&self) -> u64 {
        self.compress_peak_bytes.max(self.export_peak_bytes)
    }
}

/// How a compression holds the model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `compress_model_with` and a checkpoint folder (the CLI's `--out`): one layer's weights at a time, finished
    /// layers on disk, the restart cache on disk where it does not fit in memory.
    Streaming,
    /// `compress_model` (the window): the model is already loaded, and the compressed copy (f32 linears and their
    /// integer forms) stays in memory as a new variant; nothing is written.
    InMemory,
}

/// The estimate for compressing a model of `cfg` (stored with `dtype_bytes` per weight) under `plan`, calibrated on
/// `windows` windows of `ctx` tokens, on `cores` cores, held as `mode` says.
pub fn estimate(cfg: &ModelConfig, plan: &ResolvedPlan, dtype_bytes: u64, windows: usize, ctx: usize, cores: usize, mode: Mode) -> Estimate {
    let streaming = mode == Mode::Streaming;
    let (d, qd, kvd, im) = (cfg.hidden_size as u64, cfg.q_dim() as u64, cfg.kv_dim() as u64, cfg.intermediate_size as u64);
    // The restart cache is in memory where it fits; a streaming job puts it on disk (beside the checkpoint) where
    // it does not, and then holds only the restart points of the windows being computed.
    let (cache_memory, cache_disk) = ResumeCache::footprint(cfg, windows, ctx, streaming);
    let (tokens, ctx) = ((windows * ctx) as u64, ctx as u64);
    let paths = if plan.error_feedback { 2 } else { 1 };
    let states = paths * tokens * d * 4;
    let resume_cache = paths * cache_memory as u64;
    let cache_disk = paths * cache_disk as u64;
    // Per window being computed (one per core; the paths run one after the other): norms, q/k/v, KV cache,
    // attention, projections, gate/up, scores; per window of the chunk and path: the captured site input, until the
    // chunk is folded into the Hessian.
    let cores_u = cores.max(1) as u64;
    let chunk = crate::calib::chunk_windows(d.max(im) as usize, ctx as usize, cores) as u64;
    let loaded_points = if cache_disk > 0 { paths * cores_u * ctx * (d + im) * 4 } else { 0 };
    let scratch = cores_u * ctx * (4 * d + 2 * qd + 4 * kvd + 3 * im + ctx) * 4 + paths * chunk * ctx * d.max(im) * 4 + loaded_points;
    let layer_params = 2 * d * qd + 2 * d * kvd + 3 * d * im;
    let max_cols = d.max(qd).max(im);
    let max_linear = plan.modules.iter().map(|m| (m.rows * m.cols) as u64).max().unwrap_or(0);
    // The largest linear's solve: H (f64) while accumulating, with the cross term D beside it under error feedback
    // (then W·D in f64 before D is freed and the shift solved against one factor); GPTQ's f64 factor of H, narrowed
    // in place to f32 before its f32 inverse is made; W, its target and the result in f32.
    let c2 = max_cols * max_cols * 8;
    let shift = if paths == 2 { 2 * c2 + max_linear * 8 } else { 0 };
    let gptq = 2 * c2;
    let solver = shift.max(gptq) + 3 * max_linear * 4;
    let linear_params: u64 = plan.modules.iter().map(|m| (m.rows * m.cols) as u64).sum();
    // Integer forms hold one byte per code plus scales and zero points.
    let integer_forms = linear_params + plan.linear_bytes / 2;
    let resident_weights = if streaming {
        // One layer's weights on both paths, and the embedding until the windows are embedded.
        layer_params * dtype_bytes * 2 + cfg.vocab_size as u64 * d * dtype_bytes
    } else {
        // The loaded model is there already; the compressed copy's linears become f32, beside their integer forms.
        linear_params * 4 + integer_forms
    };
    let compress_peak_bytes = states + resume_cache + scratch + solver + resident_weights;

    // The export streams one decoder layer at a time (its integer forms and packed tensors) plus one copied
    // tensor, the embedding the largest. The checkpoint also keeps the calibration states after the last finished
    // layer (`saved_states`), and the restart cache when it is on disk. An in-memory job writes nothing.
    let layers_u = cfg.num_layers.max(1) as u64;
    let embedding = cfg.vocab_size as u64 * d * dtype_bytes;
    let (export_peak_bytes, disk_bytes) = if streaming {
        ((integer_forms + plan.linear_bytes) / layers_u + embedding + resident_weights, integer_forms + plan.size_bytes + states + cache_disk)
    } else {
        (0, 0)
    };

    let layers = cfg.num_layers as f64;
    let attention = 2.0 * (ctx as f64) * (qd as f64) * 2.0; // per token: scores and weighted sum, half the window on average
    let forward = tokens as f64 * (2.0 * layer_params as f64 + attention) * layers;
    // Per layer and path: one forward pass, as the stages restart from the cache (in memory or on disk).
    let calibration = forward * paths as f64;
    let solve: f64 = plan.modules.iter().filter(|m| m.job.is_some()).map(|m| 2.0 * m.rows as f64 * (m.cols as f64).powi(2)).sum();
    let hessians: f64 = tokens as f64 * plan.modules.iter().map(|m| (m.cols as f64).powi(2)).sum::<f64>() / 3.0;
    let seconds = (calibration + solve + hessians) / (FLOPS_PER_CORE * cores.max(1) as f64);
    Estimate { compress_peak_bytes, export_peak_bytes, disk_bytes, seconds, mode }
}

/// Bytes of memory available to a new job (Linux `MemAvailable`); `None` where unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Free bytes on the file system holding `path` (or its nearest existing parent); `None` where unknown.
pub fn available_disk(path: &std::path::Path) -> Option<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `s` a statvfs we own.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return None;
        }
        Some(s.f_bavail as u64 * s.f_frsize as u64)
    }
    #[cfg(not(unix))]
    None
}

/// Bytes of the files directly in `dir` (0 when it does not exist): what a resumed job's checkpoint holds already,
/// which the estimate's disk figure counts but which needs no new space.
pub fn bytes_in(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
}

/// Refuses a job that cannot fit: an error naming what is short and by how much, or `Ok` (also when the machine
/// does not say what it has).
pub fn check_fits(e: &Estimate, out: Option<&std::path::Path>) -> Result<(), String> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if let Some(avail) = available_memory() {
        if e.peak_bytes() > avail {
            let advice = match e.mode {
                Mode::Streaming => "use fewer calibration windows (--calib-samples) or shorter ones (--calib-ctx), or free memory",
                Mode::InMemory => {
                    "use fewer or shorter calibration windows, or compress from the command line with \
                     `whittle compress --out <folder>`, which holds one layer at a time"
                }
            };
            return Err(format!(
                "this compression needs about {:.1} GiB of memory at its peak but {:.1} GiB are available; {advice}",
                gib(e.peak_bytes()),
                gib(avail)
            ));
        }
    }
    if let (Some(out), true) = (out, e.disk_bytes > 0) {
        if let Some(free) = available_disk(out) {
            if e.disk_bytes > free {
                return Err(format!(
                    "writing {} needs about {:.1} GiB of disk but {:.1} GiB are free there",
                    out.display(),
                    gib(e.disk_bytes),
                    gib(free)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;

    fn seven_b() -> ModelConfig {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000
        });
        ModelConfig::from_json(v, std::path::Path::new("config.json")).unwrap()
    }

    fn plan_for(cfg: &ModelConfig, toml: &str) -> ResolvedPlan {
        let linears: Vec<(String, usize, usize)> = (0..cfg.num_layers)
            .flat_map(|l| {
                let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
                [("q", d, d), ("k", d, d), ("v", d, d), ("o", d, d), ("gate", i, d), ("up", i, d), ("down", d, i)]
                    .map(|(k, r, c)| (format!("model.layers.{l}.{k}_proj"), r, c))
            })
            .collect();
        Plan::from_toml_str(toml, std::path::Path::new("p.toml")).unwrap().resolve(&linears, 2 * 32000 * 4096, 16.0).unwrap()
    }

    #[test]
    fn seven_b_w4g128_with_128x512_calibration_counts_states_and_solver() {
        let cfg = seven_b();
        let plan = plan_for(&cfg, "[[rules]]\nmodules = \"*\"\nmethod = \"gptq\"\nbits = 4\ngroup = 128\n");
        let e = estimate(&cfg, &plan, 2, 128, 512, 2, Mode::Streaming);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        // At least the two 1 GiB state sets (compressed and dense path) and the down_proj Hessian and cross term
        // (2 × 11008² f64 = 1.8 GiB).
        assert!((4.0..9.0).contains(&gib(e.compress_peak_bytes)), "{:.2} GiB", gib(e.compress_peak_bytes));
        // The export streams layer by layer: one layer's codes and tensors, the embedding, the mapped weights.
        assert!(gib(e.export_peak_bytes) < 2.5, "{:.2} GiB", gib(e.export_peak_bytes));
        assert!(e.seconds > 3600.0, "a 7B calibration of 65k tokens on 2 cores takes hours: {}", e.seconds);
        // Its restart cache (4 GB per path) goes on disk, not into memory: 2 × 128 × 512 × (4096 + 11008) floats.
        assert!(gib(e.disk_bytes) > 2.0 * 3.68, "{:.2} GiB", gib(e.disk_bytes));
    }

    /// The window compresses in memory, keeping the compressed copy (f32 linears, 4 × 6.5 G parameters for a
    /// 7B) as a variant, so its estimate must be far above the streaming job's, and it writes nothing.
    #[test]
    fn in_memory_compression_counts_the_whole_compressed_copy() {
        let cfg = seven_b();
        let plan = plan_for(&cfg, "[[rules]]\nmodules = \"*\"\nmethod = \"gptq\"\nbits = 4\ngroup = 128\n");
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let in_memory = estimate(&cfg, &plan, 2, 128, 512, 2, Mode::InMemory);
        let streaming = estimate(&cfg, &plan, 2, 128, 512, 2, Mode::Streaming);
        assert!(gib(in_memory.compress_peak_bytes) > 24.0, "{:.2} GiB", gib(in_memory.compress_peak_bytes));
        assert!(in_memory.compress_peak_bytes > 3 * streaming.compress_peak_bytes);
        assert_eq!((in_memory.disk_bytes, in_memory.export_peak_bytes), (0, 0));
    }

    #[test]
    fn more_calibration_costs_more_memory_and_time() {
        let cfg = seven_b();
        let plan = plan_for(&cfg, "[[rules]]\nmodules = \"*\"\nmethod = \"gptq\"\nbits = 4\ngroup = 128\n");
        let (a, b) = (estimate(&cfg, &plan, 2, 16, 512, 2, Mode::Streaming), estimate(&cfg, &plan, 2, 128, 512, 2, Mode::Streaming));
        assert!(a.compress_peak_bytes < b.compress_peak_bytes && a.seconds < b.seconds);
    }

    #[test]
    fn a_checkpoint_folder_counts_its_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(bytes_in(&dir.path().join("missing")), 0);
        std::fs::write(dir.path().join("a"), [0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("b"), [0u8; 24]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(bytes_in(dir.path()), 1024);
    }

    #[test]
    fn an_impossible_job_is_refused_with_the_numbers() {
        let e = Estimate { compress_peak_bytes: u64::MAX / 4, export_peak_bytes: 0, disk_bytes: 0, seconds: 1.0, mode: Mode::Streaming };
        if available_memory().is_some() {
            let err = check_fits(&e, None).unwrap_err();
            assert!(err.contains("GiB of memory") && err.contains("--calib-samples"), "{err}");
            let err = check_fits(&Estimate { mode: Mode::InMemory, ..e }, None).unwrap_err();
            assert!(err.contains("whittle compress --out"), "the window's refusal points to the streaming CLI: {err}");
        }
    }
}
