//! CUDA backend: int4 and f16 GEMV compiled at run time with NVRTC (cudarc, dynamic loading), so the crate builds
//! and runs on machines with no CUDA at all.
//!
//! cudarc with `dynamic-loading` panics on the first driver call when `libcuda` is missing, so `cuda_available`
//! probes for both shared libraries before anything else and returns the reason as a string when CUDA cannot be
//! used; callers fall back to the CPU and show that reason.
//!
//! The int4 kernel runs the CPU packed layout unchanged (`packed.rs`): its 16-lane × u32 words make a warp's loads
//! 512 contiguous bytes, so no second layout has to be kept in sync. Activations are permuted/padded on the host
//! (the same `prepare` the CPU uses) and uploaded per call.
//!
//! [`CudaLinear`] is what the decode runtime holds per linear layer (`core::runtime::offload_cuda`): the weight in
//! device memory plus reusable device buffers for its inputs and outputs. Every kernel takes a small batch of
//! tokens as grid rows (`blockIdx.y`), so a prompt is one launch per linear; each token re-reads the weight (from L2
//! for small batches): these are GEMVs side by side, not a Marlin-style tiled GEMM.

pub mod bench;

use crate::dense::{DType, DenseWeight};
use crate::packed::{ColumnLayout, PackedWeight};
use crate::sparse24::Sparse24Weight;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use crate::Weight;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// CUDA C source of every kernel here (compiled with NVRTC on first use).
pub const KERNELS_CU: &str = include_str!("kernels.cu");

/// Warps (rows) per block of 128 threads.
const ROWS_PER_BLOCK: u32 = 4;

/// Tokens per launch of a batched call (grid.y is at most 65,535; chunks keep the staging buffers modest).
const MAX_TOKENS_PER_LAUNCH: usize = 1024;

/// A ready CUDA device: context, stream and the compiled kernels.
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    int4: CudaFunction,
    f16: CudaFunction,
    sparse24: CudaFunction,
    stream_read: CudaFunction,
    name: String,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.name)
    }
}

fn err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| format!("CUDA {what}: {e:?}")
}

/// Opens GPU 0 and compiles the kernels, or says why CUDA cannot be used ("CUDA not available: libcuda not found").
pub fn cuda_available() -> Result<CudaDevice, String> {
    // SAFETY: both probes only try to dlopen the library by name; they call nothing inside it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("CUDA not available: libcuda not found".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("CUDA not available: libnvrtc not found (the kernels are compiled at run time)".into());
    }
    let n = CudaContext::device_count().map_err(err("device count"))?;
    if n < 1 {
        return Err("CUDA not available: no CUDA device".into());
    }
    let ctx = CudaContext::new(0).map_err(err("context"))?;
    let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
    let ptx = cudarc::nvrtc::compile_ptx(KERNELS_CU).map_err(|e| format!("NVRTC failed to compile kernels: {e:?}"))?;
    let module = ctx.load_module(ptx).map_err(err("load module"))?;
    let int4 = module.load_function("gemv_int4").map_err(err("load gemv_int4"))?;
    let f16 = module.load_function("gemv_f16").map_err(err("load gemv_f16"))?;
    let sparse24 = module.load_function("gemv_sparse24_q4").map_err(err("load gemv_sparse24_q4"))?;
    let stream_read = module.load_function("stream_read").map_err(err("load stream_read"))?;
    let stream = ctx.default_stream();
    Ok(CudaDevice { stream, int4, f16, sparse24, stream_read, name })
}

/// A 4-bit packed weight in device memory.
pub struct CudaInt4Weight {
    rows: usize,
    cols: usize,
    nw: usize,
    ng: usize,
    /// The column layout (permutation, padding, groups) the activations are prepared with; shared with the host
    /// weight, not a copy of its codes.
    layout: Arc<ColumnLayout>,
    words: CudaSlice<u32>,
    scales: CudaSlice<f32>,
    zeros: CudaSlice<f32>,
    word_group: CudaSlice<u32>,
    flush: CudaSlice<u32>,
    /// Bytes the kernel streams per GEMV (words, f32 scales and zeros).
    pub streamed_bytes: usize,
}

/// A dense f16 weight in device memory.
pub struct CudaF16Weight {
    rows: usize,
    cols: usize,
    w: CudaSlice<u16>,
}

/// A 2:4 sparse weight with 4-bit values in device memory (the CPU record layout, scales widened to f32).
pub struct CudaSparse24Weight {
    rows: usize,
    cols: usize,
    blocks: usize,
    groups: usize,
    data: CudaSlice<u32>,
    scales: CudaSlice<f32>,
    zeros: CudaSlice<f32>,
    win_group: CudaSlice<u32>,
}

impl CudaDevice {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Uploads a 4-bit packed weight (other widths are rejected with a reason).
    pub fn upload_int4(&self, w: &PackedWeight) -> Result<CudaInt4Weight, String> {
        if w.bits != 4 {
            return Err(format!("CUDA GEMV handles 4-bit weights, this one has {} bits", w.bits));
        }
        let l = &*w.layout;
        let ng = l.group_slices.len();
        let scales: Vec<f32> = (0..w.rows * ng).map(|i| w.scales.get(i)).collect();
        let zeros: Vec<f32> = w.zeros.iter().map(|&z| z as f32).collect();
        let s = &self.stream;
        let up = err("upload");
        Ok(CudaInt4Weight {
            rows: w.rows,
            cols: w.cols,
            nw: l.words,
            ng,
            words: s.clone_htod(&w.words).map_err(&up)?,
            scales: s.clone_htod(&scales).map_err(&up)?,
            zeros: s.clone_htod(&zeros).map_err(&up)?,
            word_group: s.clone_htod(&l.word_group).map_err(&up)?,
            flush: s.clone_htod(&l.flush_masks).map_err(&up)?,
            streamed_bytes: w.words.len() * 4 + scales.len() * 8,
            layout: w.layout.clone(),
        })
    }

    /// Uploads a dense f16 weight.
    pub fn upload_f16(&self, w: &DenseWeight) -> Result<CudaF16Weight, String> {
        if w.dtype != DType::F16 {
            return Err(format!("CUDA f16 GEMV needs an f16 weight, got {:?}", w.dtype));
        }
        let halves: Vec<u16> = w.bytes().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        Ok(CudaF16Weight { rows: w.rows, cols: w.cols, w: self.stream.clone_htod(&halves).map_err(err("upload"))? })
    }

    /// Uploads a 2:4 sparse weight with quantized values (f16/f32 values are rejected with a reason).
    pub fn upload_sparse24(&self, w: &Sparse24Weight) -> Result<CudaSparse24Weight, String> {
        let scales = match &w.scales {
            Some(sc) if w.rec == 48 => sc,
            _ => return Err("CUDA 2:4 GEMV handles quantized values; this weight keeps f16/f32 values".into()),
        };
        let padded_rows = w.zeros.len() / w.groups.max(1);
        let scales: Vec<f32> = (0..padded_rows * w.groups).map(|i| scales.get(i)).collect();
        let zeros: Vec<f32> = w.zeros.iter().map(|&z| z as f32).collect();
        let win_group: Vec<u32> = (0..w.blocks * 16).map(|win| w.win_group_of(win) as u32).collect();
        let up = err("upload");
        let s = &self.stream;
        Ok(CudaSparse24Weight {
            rows: w.rows,
            cols: w.cols,
            blocks: w.blocks,
            groups: w.groups,
            data: s.clone_htod(&w.data).map_err(&up)?,
            scales: s.clone_htod(&scales).map_err(&up)?,
            zeros: s.clone_htod(&zeros).map_err(&up)?,
            win_group: s.clone_htod(&win_group).map_err(&up)?,
        })
    }

    /// One warp per row (2:4: per row pair) of `warps`, grid.y = `tokens` (≤ [`MAX_TOKENS_PER_LAUNCH`]).
    fn config(warps: usize, tokens: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((warps as u32).div_ceil(ROWS_PER_BLOCK), tokens as u32, 1),
            block_dim: (32 * ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn launch_int4(
        &self,
        w: &CudaInt4Weight,
        xp: &CudaSlice<f32>,
        sx: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        tokens: usize,
    ) -> Result<(), String> {
        assert!(xp.len() >= tokens * w.nw * 128 && sx.len() >= tokens * w.ng && y.len() >= tokens * w.rows);
        let (rows, nw, ng) = (w.rows as i32, w.nw as i32, w.ng as i32);
        let mut b = self.stream.launch_builder(&self.int4);
        b.arg(&w.words).arg(&w.scales).arg(&w.zeros).arg(&w.word_group).arg(&w.flush);
        b.arg(xp).arg(sx).arg(y).arg(&rows).arg(&nw).arg(&ng);
        // SAFETY: the argument list matches `gemv_int4`'s signature; buffers hold rows·nw·16 words, rows·ng scales
        // and zeros, nw entries of word_group/flush, and per token (asserted) nw·128 activations, ng sums and rows
        // outputs, which is all the kernel indexes.
        unsafe { b.launch(Self::config(w.rows, tokens)) }.map_err(err("launch gemv_int4"))?;
        Ok(())
    }

    fn launch_f16(&self, w: &CudaF16Weight, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, tokens: usize) -> Result<(), String> {
        assert!(x.len() >= tokens * w.cols && y.len() >= tokens * w.rows);
        let (rows, cols) = (w.rows as i32, w.cols as i32);
        let mut b = self.stream.launch_builder(&self.f16);
        b.arg(&w.w).arg(x).arg(y).arg(&rows).arg(&cols);
        // SAFETY: matches `gemv_f16`'s signature; w holds rows·cols halves, and per token (asserted) x cols floats
        // and y rows floats.
        unsafe { b.launch(Self::config(w.rows, tokens)) }.map_err(err("launch gemv_f16"))?;
        Ok(())
    }

    fn launch_sparse24(&self, w: &CudaSparse24Weight, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, tokens: usize) -> Result<(), String> {
        assert!(x.len() >= tokens * w.blocks * 256 && y.len() >= tokens * w.rows);
        let (rows, blocks, groups) = (w.rows as i32, w.blocks as i32, w.groups as i32);
        let mut b = self.stream.launch_builder(&self.sparse24);
        b.arg(&w.data).arg(&w.scales).arg(&w.zeros).arg(&w.win_group).arg(x).arg(y);
        b.arg(&rows).arg(&blocks).arg(&groups);
        // SAFETY: matches `gemv_sparse24_q4`'s signature; data holds pairs·blocks·48 words, scales and zeros padded
        // rows·groups, win_group blocks·16, and per token (asserted) x blocks·256 floats and y rows floats.
        unsafe { b.launch(Self::config(w.rows.div_ceil(2), tokens)) }.map_err(err("launch gemv_sparse24_q4"))?;
        Ok(())
    }

    /// Device-memory read bandwidth in GB/s: `stream_read` over `bytes` bytes, 10 launches queued back to back after
    /// one warm-up (so launch latency is amortized as it is for the GEMVs timed against it); the best of 3 such runs.
    pub fn stream_read_gbps(&self, bytes: usize) -> Result<f64, String> {
        let n4 = (bytes / 16).max(1024);
        let buf = self.stream.alloc_zeros::<f32>(n4 * 4).map_err(err("alloc"))?;
        let mut out = self.stream.alloc_zeros::<f32>(1).map_err(err("alloc"))?;
        let n4_arg = n4 as u64;
        let cfg = LaunchConfig { grid_dim: (4096, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut launch = || -> Result<(), String> {
            let mut b = self.stream.launch_builder(&self.stream_read);
            b.arg(&buf).arg(&n4_arg).arg(&mut out);
            // SAFETY: matches `stream_read`'s signature; buf holds n4 float4s, out one float.
            unsafe { b.launch(cfg) }.map_err(err("launch stream_read"))?;
            Ok(())
        };
        launch()?;
        self.stream.synchronize().map_err(err("sync"))?;
        let mut best = 0.0f64;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..10 {
                launch()?;
            }
            self.stream.synchronize().map_err(err("sync"))?;
            best = best.max((10 * n4 * 16) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    }
}

/// A linear layer's weight in device memory with its input/output buffers, for the decode runtime. The host weight
/// stays where it is (the runtime falls back to it if a launch fails, and export reads it).
pub struct CudaLinear {
    dev: Arc<CudaDevice>,
    weight: DeviceWeight,
    /// Device input/output buffers and host staging, reused by every call and grown for batches.
    io: Mutex<Io>,
    /// Set by the first failed call: later calls fail at once, so the caller's CPU fallback takes over for good.
    failed: AtomicBool,
}

enum DeviceWeight {
    Int4(Box<CudaInt4Weight>),
    F16(CudaF16Weight),
    Sparse24(Box<CudaSparse24Weight>),
}

/// Buffers for up to `tokens` tokens.
struct Io {
    tokens: usize,
    /// Prepared activations (int4: `padded` floats per token; 2:4: `blocks·256`, zero-padded; f16: `cols`).
    x: CudaSlice<f32>,
    /// Per-group activation sums (int4 only; one element otherwise).
    sx: CudaSlice<f32>,
    y: CudaSlice<f32>,
    host_x: Vec<f32>,
    host_sx: Vec<f32>,
}

impl std::fmt::Debug for CudaLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.weight {
            DeviceWeight::Int4(_) => "int4",
            DeviceWeight::F16(_) => "f16",
            DeviceWeight::Sparse24(_) => "2:4 int4",
        };
        write!(f, "CudaLinear({kind}, {} bytes on {})", self.device_bytes(), self.dev.name())
    }
}

impl CudaLinear {
    /// Uploads `w` when a kernel here runs its layout (4-bit packed, 2:4 with quantized values, f16 dense);
    /// otherwise says why it stays on the CPU.
    pub fn upload(dev: &Arc<CudaDevice>, w: &Weight) -> Result<CudaLinear, String> {
        let weight = match w {
            Weight::Packed(p) => DeviceWeight::Int4(Box::new(dev.upload_int4(p)?)),
            Weight::Dense(d) if d.dtype == DType::F16 => DeviceWeight::F16(dev.upload_f16(d)?),
            Weight::Dense(d) => return Err(format!("{:?} dense weights have no CUDA kernel (f16 only)", d.dtype)),
            Weight::Sparse24(sp) => DeviceWeight::Sparse24(Box::new(dev.upload_sparse24(sp)?)),
        };
        let mut io = Io::empty(dev)?;
        io.grow(dev, sizes(&weight), 1)?;
        Ok(CudaLinear { dev: dev.clone(), weight, io: Mutex::new(io), failed: AtomicBool::new(false) })
    }

    /// Bytes the weight occupies in device memory.
    pub fn device_bytes(&self) -> usize {
        match &self.weight {
            DeviceWeight::Int4(w) => self.streamed_bytes() + w.nw * 8,
            DeviceWeight::F16(_) => self.streamed_bytes(),
            DeviceWeight::Sparse24(w) => self.streamed_bytes() + w.win_group.len() * 4,
        }
    }

    /// Bytes a call reads from device memory (codes or values, scales, zeros; not the small per-layout tables).
    pub fn streamed_bytes(&self) -> usize {
        match &self.weight {
            DeviceWeight::Int4(w) => w.streamed_bytes,
            DeviceWeight::F16(w) => w.rows * w.cols * 2,
            DeviceWeight::Sparse24(w) => w.data.len() * 4 + (w.scales.len() + w.zeros.len()) * 4,
        }
    }

    /// Marks this linear as failed; true the first time (so the caller reports it once).
    pub fn note_failure(&self) -> bool {
        !self.failed.swap(true, Ordering::Relaxed)
    }

    /// y = x Wᵀ for `n` tokens (`x` is `n × cols`, `y` is `n × rows`): one launch per chunk of up to
    /// [`MAX_TOKENS_PER_LAUNCH`] tokens, each token a grid row. Fails at once after [`Self::note_failure`].
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), String> {
        if self.failed.load(Ordering::Relaxed) {
            return Err("an earlier call on this linear failed".into());
        }
        let (rows, cols, xlen, sxlen) = sizes(&self.weight);
        assert!(x.len() == n * cols && y.len() == n * rows, "x must be n × cols and y n × rows");
        let mut guard = self.io.lock().map_err(|_| "CUDA buffers poisoned by an earlier panic".to_string())?;
        let io = &mut *guard;
        let s = &self.dev.stream;
        let (up, down) = (err("upload"), err("download"));
        let mut t0 = 0;
        while t0 < n {
            let k = (n - t0).min(MAX_TOKENS_PER_LAUNCH);
            io.grow(&self.dev, (rows, cols, xlen, sxlen), k)?;
            for t in 0..k {
                let xt = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
                let (hx, hsx) = (&mut io.host_x[t * xlen..(t + 1) * xlen], &mut io.host_sx[t * sxlen..(t + 1) * sxlen]);
                match &self.weight {
                    DeviceWeight::Int4(w) => w.layout.prepare(xt, 1, cols, hx, hsx),
                    // Columns past `cols` stay zero (set when the buffer was made), so padded lanes add nothing.
                    DeviceWeight::F16(_) | DeviceWeight::Sparse24(_) => hx[..cols].copy_from_slice(xt),
                }
            }
            s.memcpy_htod(&io.host_x[..k * xlen], &mut io.x).map_err(&up)?;
            s.memcpy_htod(&io.host_sx[..k * sxlen], &mut io.sx).map_err(&up)?;
            self.launch(io, k)?;
            // A copy into a plain host slice synchronizes the stream before returning (cudarc's SyncOnDrop).
            s.memcpy_dtoh(&io.y.slice(..k * rows), &mut y[t0 * rows..(t0 + k) * rows]).map_err(&down)?;
            t0 += k;
        }
        Ok(())
    }
}

/// (rows, cols, activation floats per token, group sums per token) of a device weight.
fn sizes(w: &DeviceWeight) -> (usize, usize, usize, usize) {
    match w {
        DeviceWeight::Int4(w) => (w.rows, w.cols, w.nw * 128, w.ng),
        DeviceWeight::F16(w) => (w.rows, w.cols, w.cols, 1),
        DeviceWeight::Sparse24(w) => (w.rows, w.cols, w.blocks * 256, 1),
    }
}

impl CudaLinear {
    /// Launches the kernel on the `k` tokens staged in `io`.
    fn launch(&self, io: &mut Io, k: usize) -> Result<(), String> {
        match &self.weight {
            DeviceWeight::Int4(w) => self.dev.launch_int4(w, &io.x, &io.sx, &mut io.y, k),
            DeviceWeight::F16(w) => self.dev.launch_f16(w, &io.x, &mut io.y, k),
            DeviceWeight::Sparse24(w) => self.dev.launch_sparse24(w, &io.x, &mut io.y, k),
        }
    }

    /// Seconds per single-token call with the input already on the device (kernel time only), averaged over
    /// `iters` launches cycling through `lins` (copies of one weight on one device, so the working set can exceed
    /// the GPU's L2 as a model's layers do).
    pub fn time_resident(lins: &[CudaLinear], x: &[f32], iters: usize) -> Result<f64, String> {
        let first = lins.first().ok_or("no weights to time")?;
        let (rows, ..) = sizes(&first.weight);
        let mut y = vec![0.0; rows];
        for l in lins {
            l.matmul(x, 1, &mut y)?; // stages x in each copy's buffer, and warms up
        }
        let poisoned = |_| "CUDA buffers poisoned".to_string();
        let t = std::time::Instant::now();
        for i in 0..iters {
            let l = &lins[i % lins.len()];
            let mut io = l.io.lock().map_err(poisoned)?;
            l.launch(&mut io, 1)?;
        }
        first.dev.stream.synchronize().map_err(err("sync"))?;
        Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
    }
}

impl Io {
    fn empty(dev: &CudaDevice) -> Result<Io, String> {
        let alloc = err("alloc");
        let s = &dev.stream;
        Ok(Io {
            tokens: 0,
            x: s.alloc_zeros::<f32>(1).map_err(&alloc)?,
            sx: s.alloc_zeros::<f32>(1).map_err(&alloc)?,
            y: s.alloc_zeros::<f32>(1).map_err(&alloc)?,
            host_x: Vec::new(),
            host_sx: Vec::new(),
        })
    }

    /// Makes room for `tokens` tokens (buffers only grow; the host staging is zeroed when made, which the padded
    /// layouts rely on).
    fn grow(&mut self, dev: &CudaDevice, (rows, _, xlen, sxlen): (usize, usize, usize, usize), tokens: usize) -> Result<(), String> {
        if tokens <= self.tokens {
            return Ok(());
        }
        let alloc = err("alloc");
        let s = &dev.stream;
        self.x = s.alloc_zeros::<f32>(tokens * xlen).map_err(&alloc)?;
        self.sx = s.alloc_zeros::<f32>(tokens * sxlen).map_err(&alloc)?;
        self.y = s.alloc_zeros::<f32>(tokens * rows).map_err(&alloc)?;
        self.host_x = vec![0.0; tokens * xlen];
        self.host_sx = vec![0.0; tokens * sxlen];
        self.tokens = tokens;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::QuantParts;

    /// Compiles the CUDA source with NVRTC when libnvrtc can be loaded (e.g. `pip install nvidia-cuda-nvrtc-cu12`
    /// with its lib folder on LD_LIBRARY_PATH); needs no GPU and no driver.
    #[test]
    fn cuda_source_compiles_with_nvrtc_when_available() {
        // SAFETY: only probes for the library with dlopen.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: NVRTC not available: libnvrtc not found");
            return;
        }
        match cudarc::nvrtc::compile_ptx(KERNELS_CU) {
            Ok(ptx) => {
                let src = ptx.to_src();
                for k in ["gemv_int4", "gemv_f16", "gemv_sparse24_q4"] {
                    assert!(src.contains(k), "PTX lacks {k}");
                }
            }
            Err(e) => panic!("NVRTC rejected kernels.cu: {e:?}"),
        }
    }

    /// GPU GEMVs against the CPU kernels, or a clear skip line when CUDA is absent.
    #[test]
    fn cuda_gemv_matches_cpu_or_skips() {
        let dev = match cuda_available() {
            Ok(d) => d,
            Err(why) => {
                eprintln!("skipped: {why}");
                assert!(why.starts_with("CUDA not available") || why.starts_with("NVRTC"), "{why}");
                return;
            }
        };
        let (rows, cols, g) = (37usize, 1000usize, 128usize);
        let ng = cols.div_ceil(g);
        let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 16) as u8).collect();
        let scales: Vec<f32> = (0..rows * ng).map(|i| 0.01 + (i % 13) as f32 * 0.001).collect();
        let zeros: Vec<u8> = (0..rows * ng).map(|i| (i % 16) as u8).collect();
        let parts = QuantParts { rows, cols, bits: 4, group_size: g, codes: &codes, scales: &scales, zeros: &zeros, g_idx: None };
        let w = PackedWeight::new(parts).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0).collect();
        let mut want = vec![0.0; rows];
        w.matmul(&x, 1, &mut want);
        let dev = Arc::new(dev);
        let gemv = |w: Weight| {
            let mut y = vec![f32::NAN; rows];
            CudaLinear::upload(&dev, &w).unwrap().matmul(&x, 1, &mut y).unwrap();
            y
        };
        let got = gemv(Weight::Packed(w));
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "int4 GPU {a} vs CPU {b}");
        }
        let halves: Vec<u8> = (0..rows * cols).flat_map(|i| half::f16::from_f32((i % 17) as f32 * 0.01).to_le_bytes()).collect();
        let d = DenseWeight::from_bytes(rows, cols, DType::F16, crate::SharedBytes::from_vec(halves));
        let mut want = vec![0.0; rows];
        d.matmul(&x, 1, &mut want);
        let got = gemv(Weight::Dense(d));
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "f16 GPU {a} vs CPU {b}");
        }
    }
    /// The runtime's per-linear path: `CudaLinear` on one token and on a batch of three, for a packed int4 weight
    /// and a 2:4 weight with 4-bit values (ragged shapes), against the CPU kernels; or a skip line.
    #[test]
    fn cuda_linear_matches_cpu_or_skips() {
        let dev = match cuda_available() {
            Ok(d) => Arc::new(d),
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let (rows, cols, g) = (19usize, 300usize, 64usize);
        let ng = cols.div_ceil(g);
        let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 5 % 16) as u8).collect();
        let scales: Vec<f32> = (0..rows * ng).map(|i| 0.02 + (i % 7) as f32 * 0.001).collect();
        let zeros: Vec<u8> = (0..rows * ng).map(|i| (i * 3 % 16) as u8).collect();
        let parts = QuantParts { rows, cols, bits: 4, group_size: g, codes: &codes, scales: &scales, zeros: &zeros, g_idx: None };
        let mask: Vec<bool> = (0..rows * cols).map(|i| matches!((i % cols) % 4, 1 | 2) ^ (i / cols % 3 == 0)).collect();
        let weights = [
            ("int4", Weight::Packed(PackedWeight::new(parts).unwrap())),
            ("2:4 int4", Weight::Sparse24(Sparse24Weight::from_quantized(parts, &mask).unwrap())),
        ];
        for (what, w) in &weights {
            let lin = CudaLinear::upload(&dev, w).unwrap();
            for n in [1usize, 3] {
                let x: Vec<f32> = (0..n * cols).map(|i| ((i * 11 % 23) as f32 - 11.0) / 11.0).collect();
                // The CPU reference in f32 activations (its single-token default rounds them to int16 on VNNI CPUs).
                let mut want = vec![0.0; n * rows];
                match w {
                    Weight::Packed(p) => p.matmul_isa(crate::Isa::Scalar, &x, n, &mut want),
                    Weight::Sparse24(sp) => sp.matmul_isa(crate::Isa::Scalar, &x, n, &mut want),
                    Weight::Dense(_) => unreachable!(),
                }
                let mut got = vec![f32::NAN; n * rows];
                lin.matmul(&x, n, &mut got).unwrap();
                for (a, b) in got.iter().zip(&want) {
                    // Both sum 300 f32 products in different orders: a few ulps of the row's magnitude.
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{what} n={n}: CudaLinear {a} vs CPU {b}");
                }
            }
        }
        let dense_f32 = DenseWeight::from_f32(rows, cols, vec![0.5; rows * cols]);
        assert!(CudaLinear::upload(&dev, &Weight::Dense(dense_f32)).unwrap_err().contains("no CUDA kernel"));
    }
}
