//! `whittle bench`: speed figures measured in one run next to their bound, for benches/RESULTS.md.
//! - `decode`: tokens/s of greedy decoding (optionally of a compressed, packed model) and resident bytes.
//! - `prefill`: tokens/s of a full-window forward.
//! - `layer`: one 7b-shaped decoder layer at decode, time per token vs the bytes-over-bandwidth bound.
//! - `gemv`: one packed GEMV vs the stream-read bandwidth measured in the same run (`--device cuda`: on the GPU, vs
//!   its device-memory read bandwidth and the f16 GEMV).

use super::plan_args::{resolve, run_compression, CalibArgs, PlanArgs};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::time::Instant;
use whittle_core::model::{KvCache, Scratch};
use whittle_core::runtime::{is_data_free, pack_data_free, pack_model, weight_bytes};
use whittle_kernels::bench::{bench_weight, q8_kernel_for};
use whittle_kernels::{bench_gemv_q8, measure_stream_read_gbps, GemvShape};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Greedy decode tokens/s from BOS (no early stop), model as loaded or compressed and packed with --plan.
    Decode(DecodeArgs),
    /// Prefill tokens/s of windows of --ctx tokens.
    Prefill(DecodeArgs),
    /// One 7b-shaped decoder layer (f16) at decode: seconds per token vs the memory-bandwidth bound.
    Layer(LayerArgs),
    /// A packed GEMV vs the stream-read bandwidth measured in the same run.
    Gemv(GemvArgs),
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Rayon threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Tokens to decode per run (prefill: window length).
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Timed repetitions; the best is reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// cpu or cuda (the linears a CUDA kernel runs go to the GPU; without a usable GPU: the CPU, saying why).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LayerArgs {
    #[arg(long)]
    pub threads: Option<usize>,
    /// 16 for the f16 layer, or 2/3/4/8 for the same layer packed with groups of 128 (random codes).
    #[arg(long, default_value_t = 16)]
    pub bits: u8,
    /// With --bits < 16: int8 activations with VNNI (`matmul_q8`, llama.cpp-style).
    #[arg(long)]
    pub q8: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GemvArgs {
    /// ROWSxCOLS (out × in), e.g. 4096x11008.
    #[arg(long, default_value = "4096x11008")]
    pub shape: String,
    /// 2, 3, 4, 8, or 16 for dense f16.
    #[arg(long, default_value_t = 4)]
    pub bits: u8,
    #[arg(long, default_value_t = 128)]
    pub group: usize,
    #[arg(long)]
    pub sparse24: bool,
    /// int8 activations with VNNI (llama.cpp-style `matmul_q8`; approximate, not the runtime default).
    #[arg(long)]
    pub q8: bool,
    #[arg(long)]
    pub threads: Option<usize>,
    /// cpu, or cuda: the CUDA kernel against the GPU's measured memory bandwidth and the f16 GEMV of the same shape.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub json: bool,
}

fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    Ok(rayon::ThreadPoolBuilder::new().num_threads(n).build()?)
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Decode(d) => decode(d, false),
        BenchWhat::Prefill(d) => decode(d, true),
        BenchWhat::Layer(l) => layer(l),
        BenchWhat::Gemv(g) => gemv(g),
    }
}

fn decode(a: DecodeArgs, prefill: bool) -> Result<()> {
    let mut m = super::load(a.model.as_deref())?;
    let mut packed = None;
    if a.plan.given() {
        let resolved = resolve(&a.plan.to_plan()?, &m)?;
        if is_data_free(&resolved) {
            // RTN/magnitude need no calibration: quantize and pack linear by linear, giving back the source pages.
            let store = m.store.clone();
            packed = Some(pack_data_free(&mut m.model, &resolved, &|prefix| store.release(prefix))?);
        } else {
            let out = run_compression(&mut m, &resolved, &a.calib, true)?;
            packed = Some(pack_model(&mut m.model, &out.quantized));
        }
    }
    let placement = super::device::place_model(&a.device, &mut m.model)?;
    if !a.json {
        println!("{}", placement.line);
    }
    let pool = pool(a.threads)?;
    let model = &m.model;
    let n = a.tokens.min(model.config.max_position_embeddings - 1).max(1);
    let mut best = 0.0f64;
    let mut cache_bytes = 0;
    pool.install(|| {
        for _ in 0..a.repeat.max(1) {
            let mut cache = KvCache::new(model.config.num_layers, model.config.kv_dim());
            let mut s = Scratch::default();
            let t = Instant::now();
            if prefill {
                let ids: Vec<u32> = (0..n).map(|i| (i % model.config.vocab_size) as u32).collect();
                std::hint::black_box(model.forward(&ids, &mut cache, &mut s, n));
            } else {
                let mut tok = m.bos_id().unwrap_or(1);
                for _ in 0..n {
                    let logits = model.forward(&[tok], &mut cache, &mut s, 1);
                    tok = whittle_core::model::generate::argmax(&logits);
                }
            }
            best = best.max(n as f64 / t.elapsed().as_secs_f64());
            cache_bytes = cache.resident_bytes();
        }
    });
    let resident = weight_bytes(model) + cache_bytes;
    let threads = pool.current_num_threads();
    // Decode reads every weight but the embedding (one row of it) once per token, plus on average half the final
    // KV cache: at the stream-read bandwidth that is the most tokens/s this machine can give.
    // The bound is the CPU's: with linears on the GPU it does not apply.
    let bound = (!prefill && placement.offload.is_none()).then(|| {
        let per_token = weight_bytes(model) - model.embed.bytes().len() + cache_bytes / 2;
        let stream = pool.install(|| measure_stream_read_gbps(256 << 20, threads));
        (stream, stream * 1e9 / per_token as f64, per_token)
    });
    let peak_rss = peak_rss_bytes();
    if a.json {
        let mut v = serde_json::json!({"tokens_per_second": best, "resident_bytes": resident, "threads": threads, "tokens": n});
        if let Some((stream, bound_tps, per_token)) = bound {
            v["bytes_per_token"] = per_token.into();
            v["stream_gbps"] = stream.into();
            v["bound_tokens_per_second"] = bound_tps.into();
            v["fraction_of_bound"] = (best / bound_tps).into();
        }
        if let Some(rss) = peak_rss {
            v["peak_rss_bytes"] = rss.into();
        }
        v["device"] = if placement.offload.is_some() { "cuda" } else { "cpu" }.into();
        v["placement"] = placement.line.clone().into();
        if let Some(o) = &placement.offload {
            v["gpu_linears"] = o.on_gpu.into();
            v["device_bytes"] = o.device_bytes.into();
        }
        if let Some(p) = &packed {
            v["packed_linears"] = p.packed.into();
            v["sparse24_linears"] = p.sparse24.into();
            v["dense_linears"] = p.dense.len().into();
        }
        println!("{v}");
    } else {
        println!("{} {:.*} tokens/s ({threads} threads, {n} tokens), resident {:.2} MB", if prefill { "prefill" } else { "decode" }, if best < 100.0 { 2 } else { 0 }, best, resident as f64 / 1e6);
        if let Some((stream, bound_tps, per_token)) = bound {
            println!(
                "bound {bound_tps:.1} tokens/s ({:.1} MB read per token at {stream:.1} GB/s stream): {:.0}% of the bound",
                per_token as f64 / 1e6,
                100.0 * best / bound_tps
            );
        }
        if let Some(rss) = peak_rss {
            println!("peak RSS {:.2} GiB", rss as f64 / (1u64 << 30) as f64);
        }
        if let Some(p) = &packed {
            println!("packed {} linears, 2:4 {}, dense {}", p.packed, p.sparse24, p.dense.len());
            for (name, why) in &p.dense {
                println!("  {name} stays dense: {why}");
            }
        }
    }
    Ok(())
}

fn layer(a: LayerArgs) -> Result<()> {
    let pool = pool(a.threads)?;
    let (d, im) = (4096usize, 11008usize);
    let shapes = [(d, d), (d, d), (d, d), (d, d), (im, d), (im, d), (d, im)];
    // The GEMV bench's random weights: f16, or codes packed with groups of 128.
    let weights: Vec<whittle_kernels::Weight> = shapes
        .iter()
        .map(|&(rows, cols)| bench_weight(GemvShape { rows, cols }, a.bits.min(16), 128, false))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let label = if a.bits >= 16 {
        "f16".to_string()
    } else {
        let act = if a.q8 { " q8" } else if q8_kernel_for(&weights[0]) { " q16" } else { "" };
        format!("int{} g128{act}", a.bits)
    };
    let bytes: usize = weights.iter().map(|w| w.resident_bytes()).sum();
    let threads = pool.current_num_threads();
    let (stream, per_token) = pool.install(|| {
        let stream = measure_stream_read_gbps(256 << 20, threads);
        let x = vec![0.01f32; im];
        let mut y = vec![0.0f32; im];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for w in &weights {
                if a.q8 {
                    w.matmul_q8(&x[..w.cols()], 1, &mut y[..w.rows()]);
                } else {
                    w.matmul(&x[..w.cols()], 1, &mut y[..w.rows()]);
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        (stream, best)
    });
    let bound = bytes as f64 / (stream * 1e9);
    if a.json {
        println!("{}", serde_json::json!({"weights": label, "seconds_per_token": per_token, "bytes": bytes, "stream_gbps": stream, "bound_seconds": bound, "fraction_of_bound": bound / per_token, "threads": threads}));
    } else {
        println!("7b layer ({label}, {:.0} MB): {:.2} ms/token, bound {:.2} ms at {:.1} GB/s stream: {:.0}% of the bound ({threads} threads)", bytes as f64 / 1e6, per_token * 1e3, bound * 1e3, stream, 100.0 * bound / per_token);
    }
    Ok(())
}

fn gemv(a: GemvArgs) -> Result<()> {
    let (r, c) = a.shape.split_once('x').ok_or_else(|| anyhow::anyhow!("--shape must be ROWSxCOLS, e.g. 4096x11008"))?;
    let shape = GemvShape { rows: r.parse()?, cols: c.parse()? };
    match a.device.as_str() {
        "cpu" => {}
        "cuda" => return gemv_cuda(&a, shape),
        other => anyhow::bail!("--device {other}: expected cpu or cuda"),
    }
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let rep = bench_gemv_q8(shape, a.bits, a.group, a.sparse24, threads, a.q8)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "seconds": rep.seconds, "bytes_read": rep.bytes_read, "gbps": rep.gbps, "stream_gbps": rep.stream_gbps,
                "fraction_of_bandwidth": rep.fraction_of_bandwidth, "bits_per_weight": rep.bits_per_weight,
                "threads": rep.threads, "isa": format!("{:?}", rep.isa), "label": rep.label,
            })
        );
    } else {
        println!(
            "{}: {:.1} µs, {:.1} GB/s of {:.1} GB/s stream = {:.0}% ({:.2} bits/weight, {} threads)",
            rep.label,
            rep.seconds * 1e6,
            rep.gbps,
            rep.stream_gbps,
            rep.fraction_of_bandwidth * 100.0,
            rep.bits_per_weight,
            rep.threads
        );
    }
    Ok(())
}

fn gemv_cuda(a: &GemvArgs, shape: GemvShape) -> Result<()> {
    let dev = std::sync::Arc::new(whittle_kernels::cuda::cuda_available().map_err(|why| anyhow::anyhow!("--device cuda: {why}"))?);
    let rep = whittle_kernels::cuda::bench::bench_gemv_cuda(&dev, shape, a.bits, a.group, a.sparse24).map_err(anyhow::Error::msg)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "seconds": rep.seconds, "bytes_read": rep.bytes_read, "gbps": rep.gbps, "stream_gbps": rep.stream_gbps,
                "fraction_of_bandwidth": rep.fraction_of_bandwidth, "f16_seconds": rep.f16_seconds,
                "speedup_over_f16": rep.speedup_over_f16, "device": rep.device, "label": rep.label,
            })
        );
    } else {
        println!(
            "{} on {}: {:.1} µs, {:.0} GB/s of {:.0} GB/s device read = {:.0}%; f16 {:.1} µs, {:.2}× faster",
            rep.label,
            rep.device,
            rep.seconds * 1e6,
            rep.gbps,
            rep.stream_gbps,
            rep.fraction_of_bandwidth * 100.0,
            rep.f16_seconds * 1e6,
            rep.speedup_over_f16
        );
    }
    Ok(())
}

/// The process's peak resident set (`VmHWM`, Linux); `None` elsewhere.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
