//! CUDA backend: int4 and f16 GEMV compiled at run time with NVRTC (cudarc, dynamic loading), so the crate builds
//! and runs on machines with no CUDA at all.
//!
//! cudarc with `dynamic-loading` panics on the first driver call when `libcuda` is missing, so `cuda_available`
//! probes for both shared libraries before anything else and returns the reason as a string when CUDA cannot be
//! used; callers fall back to the CPU and show that reason.
//!
//! The int4 kernel runs the CPU packed layout unchanged (`packed.rs`): its 16-lane × u32 words make a warp's loads
//! 512 contiguous bytes, so no second layout has to be kept in sync. Activations are permuted/padded on the host
//! (the same `prepare` the CPU uses) and uploaded per call; this backend serves batch-1 decoding and the
//! bandwidth comparison, not prefill.
//!
//! [`CudaLinear`] is what the decode runtime holds per linear layer (`core::runtime::offload_cuda`): the weight in
//! device memory plus reusable device buffers for one token's input and output. A prompt of `n` tokens runs `n`
//! GEMVs; there is no batched kernel yet.

use crate::dense::{DType, DenseWeight};
use crate::packed::PackedWeight;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use crate::Weight;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// CUDA C source of every kernel here (compiled with NVRTC on first use).
pub const KERNELS_CU: &str = include_str!("kernels.cu");

/// Warps (rows) per block of 128 threads.
const ROWS_PER_BLOCK: u32 = 4;

/// A ready CUDA device: context, stream and the compiled kernels.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    int4: CudaFunction,
    f16: CudaFunction,
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
    let stream = ctx.default_stream();
    Ok(CudaDevice { ctx, stream, int4, f16, name })
}

/// A 4-bit packed weight in device memory.
pub struct CudaInt4Weight {
    rows: usize,
    cols: usize,
    nw: usize,
    ng: usize,
    host: PackedWeight,
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
            host: w.clone(),
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

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(ROWS_PER_BLOCK), 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Device buffers of prepared activations for an int4 GEMV.
    fn int4_inputs(&self, w: &CudaInt4Weight, x: &[f32]) -> Result<(CudaSlice<f32>, CudaSlice<f32>), String> {
        let l = &*w.host.layout;
        let mut xp = vec![0.0; l.padded];
        let mut sx = vec![0.0; w.ng];
        l.prepare(x, 1, w.cols, &mut xp, &mut sx);
        let up = err("upload");
        Ok((self.stream.clone_htod(&xp).map_err(&up)?, self.stream.clone_htod(&sx).map_err(&up)?))
    }

    fn launch_int4(
        &self,
        w: &CudaInt4Weight,
        xp: &CudaSlice<f32>,
        sx: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), String> {
        let (rows, nw, ng) = (w.rows as i32, w.nw as i32, w.ng as i32);
        let mut b = self.stream.launch_builder(&self.int4);
        b.arg(&w.words).arg(&w.scales).arg(&w.zeros).arg(&w.word_group).arg(&w.flush);
        b.arg(xp).arg(sx).arg(y).arg(&rows).arg(&nw).arg(&ng);
        // SAFETY: the argument list matches `gemv_int4`'s signature; buffers hold rows·nw·16 words, rows·ng scales
        // and zeros, nw entries of word_group/flush, nw·128 activations, ng sums and rows outputs, which is all the
        // kernel indexes.
        unsafe { b.launch(Self::config(w.rows)) }.map_err(err("launch gemv_int4"))?;
        Ok(())
    }

    fn launch_f16(&self, w: &CudaF16Weight, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<(), String> {
        let (rows, cols) = (w.rows as i32, w.cols as i32);
        let mut b = self.stream.launch_builder(&self.f16);
        b.arg(&w.w).arg(x).arg(y).arg(&rows).arg(&cols);
        // SAFETY: matches `gemv_f16`'s signature; w holds rows·cols halves, x cols floats, y rows floats.
        unsafe { b.launch(Self::config(w.rows)) }.map_err(err("launch gemv_f16"))?;
        Ok(())
    }

    /// y = W x for one token.
    pub fn gemv_int4(&self, w: &CudaInt4Weight, x: &[f32]) -> Result<Vec<f32>, String> {
        assert_eq!(x.len(), w.cols, "x must have cols entries");
        let (xp, sx) = self.int4_inputs(w, x)?;
        let mut y = self.stream.alloc_zeros::<f32>(w.rows).map_err(err("alloc"))?;
        self.launch_int4(w, &xp, &sx, &mut y)?;
        self.stream.clone_dtoh(&y).map_err(err("download"))
    }

    /// y = W x for one token.
    pub fn gemv_f16(&self, w: &CudaF16Weight, x: &[f32]) -> Result<Vec<f32>, String> {
        assert_eq!(x.len(), w.cols, "x must have cols entries");
        let xd = self.stream.clone_htod(x).map_err(err("upload"))?;
        let mut y = self.stream.alloc_zeros::<f32>(w.rows).map_err(err("alloc"))?;
        self.launch_f16(w, &xd, &mut y)?;
        self.stream.clone_dtoh(&y).map_err(err("download"))
    }

    /// Seconds per int4 GEMV, kernel only (inputs resident), averaged over `iters` back-to-back launches.
    pub fn time_int4(&self, w: &CudaInt4Weight, x: &[f32], iters: usize) -> Result<f64, String> {
        let (xp, sx) = self.int4_inputs(w, x)?;
        let mut y = self.stream.alloc_zeros::<f32>(w.rows).map_err(err("alloc"))?;
        self.launch_int4(w, &xp, &sx, &mut y)?;
        self.stream.synchronize().map_err(err("sync"))?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            self.launch_int4(w, &xp, &sx, &mut y)?;
        }
        self.stream.synchronize().map_err(err("sync"))?;
        Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
    }

    /// Seconds per f16 GEMV, kernel only, averaged over `iters` launches.
    pub fn time_f16(&self, w: &CudaF16Weight, x: &[f32], iters: usize) -> Result<f64, String> {
        let xd = self.stream.clone_htod(x).map_err(err("upload"))?;
        let mut y = self.stream.alloc_zeros::<f32>(w.rows).map_err(err("alloc"))?;
        self.launch_f16(w, &xd, &mut y)?;
        self.stream.synchronize().map_err(err("sync"))?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            self.launch_f16(w, &xd, &mut y)?;
        }
        self.stream.synchronize().map_err(err("sync"))?;
        Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
    }

    /// The context, for callers that manage their own buffers.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// A linear layer's weight in device memory with its per-token buffers, for the decode runtime. The host weight
/// stays where it is (the runtime falls back to it if a launch fails, and export reads it).
pub struct CudaLinear {
    dev: Arc<CudaDevice>,
    weight: DeviceWeight,
    /// Device input/output buffers and host staging, reused by every call (one token at a time).
    io: Mutex<Io>,
    /// Set by the first failed call: later calls fail at once, so the caller's CPU fallback takes over for good.
    failed: AtomicBool,
}

enum DeviceWeight {
    Int4(Box<CudaInt4Weight>),
    F16(CudaF16Weight),
}

struct Io {
    /// Prepared activations (int4: `padded` floats; f16: `cols`).
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
        };
        write!(f, "CudaLinear({kind}, {} bytes on {})", self.device_bytes(), self.dev.name())
    }
}

impl CudaLinear {
    /// Uploads `w` when a kernel here runs its layout (4-bit packed, f16 dense); otherwise says why it stays on the
    /// CPU.
    pub fn upload(dev: &Arc<CudaDevice>, w: &Weight) -> Result<CudaLinear, String> {
        let alloc = err("alloc");
        let (weight, xlen, sxlen, rows) = match w {
            Weight::Packed(p) => {
                let d = dev.upload_int4(p)?;
                let (padded, ng) = (p.layout.padded, d.ng);
                (DeviceWeight::Int4(Box::new(d)), padded, ng, p.rows)
            }
            Weight::Dense(d) if d.dtype == DType::F16 => (DeviceWeight::F16(dev.upload_f16(d)?), d.cols, 1, d.rows),
            Weight::Dense(d) => return Err(format!("{:?} dense weights have no CUDA kernel (f16 only)", d.dtype)),
            Weight::Sparse24(_) => return Err("2:4 sparse weights have no CUDA kernel yet".into()),
        };
        let s = &dev.stream;
        let io = Io {
            x: s.alloc_zeros::<f32>(xlen).map_err(&alloc)?,
            sx: s.alloc_zeros::<f32>(sxlen).map_err(&alloc)?,
            y: s.alloc_zeros::<f32>(rows).map_err(&alloc)?,
            host_x: vec![0.0; xlen],
            host_sx: vec![0.0; sxlen],
        };
        Ok(CudaLinear { dev: dev.clone(), weight, io: Mutex::new(io), failed: AtomicBool::new(false) })
    }

    /// Bytes the weight occupies in device memory.
    pub fn device_bytes(&self) -> usize {
        match &self.weight {
            DeviceWeight::Int4(w) => w.streamed_bytes + w.nw * 8,
            DeviceWeight::F16(w) => w.rows * w.cols * 2,
        }
    }

    /// Marks this linear as failed; true the first time (so the caller reports it once).
    pub fn note_failure(&self) -> bool {
        !self.failed.swap(true, Ordering::Relaxed)
    }

    /// y = x Wᵀ for `n` tokens (`x` is `n × cols`, `y` is `n × rows`), one GEMV per token. Fails at once after
    /// [`Self::note_failure`].
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), String> {
        if self.failed.load(Ordering::Relaxed) {
            return Err("an earlier call on this linear failed".into());
        }
        let (rows, cols) = match &self.weight {
            DeviceWeight::Int4(w) => (w.rows, w.cols),
            DeviceWeight::F16(w) => (w.rows, w.cols),
        };
        assert!(x.len() == n * cols && y.len() == n * rows, "x must be n × cols and y n × rows");
        let mut guard = self.io.lock().map_err(|_| "CUDA buffers poisoned by an earlier panic".to_string())?;
        let io = &mut *guard;
        let s = &self.dev.stream;
        let (up, down) = (err("upload"), err("download"));
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            match &self.weight {
                DeviceWeight::Int4(w) => {
                    w.host.layout.prepare(xt, 1, cols, &mut io.host_x, &mut io.host_sx);
                    s.memcpy_htod(&io.host_x, &mut io.x).map_err(&up)?;
                    s.memcpy_htod(&io.host_sx, &mut io.sx).map_err(&up)?;
                    self.dev.launch_int4(w, &io.x, &io.sx, &mut io.y)?;
                }
                DeviceWeight::F16(w) => {
                    s.memcpy_htod(xt, &mut io.x).map_err(&up)?;
                    self.dev.launch_f16(w, &io.x, &mut io.y)?;
                }
            }
            // A copy into a plain host slice synchronizes the stream before returning (cudarc's SyncOnDrop).
            s.memcpy_dtoh(&io.y, &mut y[t * rows..(t + 1) * rows]).map_err(&down)?;
        }
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
                assert!(src.contains("gemv_int4") && src.contains("gemv_f16"), "PTX lacks the kernels");
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
        let got = dev.gemv_int4(&dev.upload_int4(&w).unwrap(), &x).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "int4 GPU {a} vs CPU {b}");
        }
        let halves: Vec<u8> = (0..rows * cols).flat_map(|i| half::f16::from_f32((i % 17) as f32 * 0.01).to_le_bytes()).collect();
        let d = DenseWeight::from_bytes(rows, cols, DType::F16, crate::SharedBytes::from_vec(halves));
        let mut want = vec![0.0; rows];
        d.matmul(&x, 1, &mut want);
        let got = dev.gemv_f16(&dev.upload_f16(&d).unwrap(), &x).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "f16 GPU {a} vs CPU {b}");
        }
    }
    /// The runtime's per-linear path: `CudaLinear` over two tokens against the CPU kernels, or a skip line.
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
        let w = Weight::Packed(PackedWeight::new(parts).unwrap());
        let x: Vec<f32> = (0..2 * cols).map(|i| ((i * 11 % 23) as f32 - 11.0) / 11.0).collect();
        let mut want = vec![0.0; 2 * rows];
        w.matmul(&x, 2, &mut want);
        let lin = CudaLinear::upload(&dev, &w).unwrap();
        let mut got = vec![f32::NAN; 2 * rows];
        lin.matmul(&x, 2, &mut got).unwrap();
        for (a, b) in got.iter().zip(&want) {
            // The CPU's single-token default rounds activations to int16 (2⁻¹⁶ of a block's max); the GPU is f32.
            assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0), "CudaLinear {a} vs CPU {b}");
        }
        let dense_f32 = DenseWeight::from_f32(rows, cols, vec![0.5; rows * cols]);
        assert!(CudaLinear::upload(&dev, &Weight::Dense(dense_f32)).unwrap_err().contains("no CUDA kernel"));
    }
}
