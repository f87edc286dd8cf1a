//! Seeded random-init Llama folders of real shapes (`tiny` = the default's, `1b` = TinyLlama-1.1B, `7b` =
//! Llama-2-7B), reusing the default model's tokenizer, so speed, memory and scale can be measured without
//! downloads. Tensors are generated and written one chunk at a time, so a 13.5 GB model never sits in memory.

use crate::error::{Result, WhittleError};
use crate::model::source::default_model_dir;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthShape {
    Tiny,
    OneB,
    SevenB,
}

impl std::str::FromStr for SynthShape {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "1b" => Ok(Self::OneB),
            "7b" => Ok(Self::SevenB),
            o => Err(format!("unknown shape `{o}` (tiny, 1b, 7b)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthDType {
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for SynthDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            o => Err(format!("unknown dtype `{o}` (f32, f16, bf16)")),
        }
    }
}

impl SynthDType {
    fn name(self) -> (&'static str, &'static str, usize) {
        match self {
            Self::F32 => ("F32", "float32", 4),
            Self::F16 => ("F16", "float16", 2),
            Self::BF16 => ("BF16", "bfloat16", 2),
        }
    }
}

/// (hidden, intermediate, layers, heads, kv_heads, vocab, max_positions)
fn dims(shape: SynthShape) -> (usize, usize, usize, usize, usize, usize, usize) {
    match shape {
        SynthShape::Tiny => (64, 172, 5, 8, 4, 512, 512),
        SynthShape::OneB => (2048, 5632, 22, 32, 4, 32000, 2048),
        SynthShape::SevenB => (4096, 11008, 32, 32, 32, 32000, 4096),
    }
}

/// Names and shapes of every tensor, in file order; `true` marks a norm weight (initialized to 1).
fn tensor_list(shape: SynthShape) -> Vec<(String, Vec<usize>, bool)> {
    let (d, im, layers, heads, kv, vocab, _) = dims(shape);
    let hd = d / heads;
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![vocab, d], false)];
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![d], true));
        t.push((p("self_attn.q_proj.weight"), vec![heads * hd, d], false));
        t.push((p("self_attn.k_proj.weight"), vec![kv * hd, d], false));
        t.push((p("self_attn.v_proj.weight"), vec![kv * hd, d], false));
        t.push((p("self_attn.o_proj.weight"), vec![d, heads * hd], false));
        t.push((p("post_attention_layernorm.weight"), vec![d], true));
        t.push((p("mlp.gate_proj.weight"), vec![im, d], false));
        t.push((p("mlp.up_proj.weight"), vec![im, d], false));
        t.push((p("mlp.down_proj.weight"), vec![d, im], false));
    }
    t.push(("model.norm.weight".into(), vec![d], true));
    t.push(("lm_head.weight".into(), vec![vocab, d], false));
    t
}

fn encode(values: &[f32], dtype: SynthDType, out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        SynthDType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        SynthDType::F16 => out.extend(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes())),
        SynthDType::BF16 => out.extend(values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())),
    }
}

/// Writes the folder; `progress(done_bytes, total_bytes)`. Refuses an existing `out` unless `force`.
pub fn synth(shape: SynthShape, seed: u64, dtype: SynthDType, out: &Path, force: bool, progress: &dyn Fn(u64, u64)) -> Result<()> {
    if out.exists() && !force {
        return Err(WhittleError::file(out, "already exists (pass --force to replace it)"));
    }
    let (d, im, layers, heads, kv, vocab, max_pos) = dims(shape);
    let (st_name, torch_name, size) = dtype.name();
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("synth"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| WhittleError::io(&tmp, e))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": d, "intermediate_size": im, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d / heads,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": torch_name, "whittle_synth": {"shape": format!("{shape:?}"), "seed": seed}
    });
    let write = |name: &str, bytes: &[u8]| std::fs::write(tmp.join(name), bytes).map_err(|e| WhittleError::io(tmp.join(name), e));
    write("config.json", serde_json::to_string_pretty(&config).expect("json").as_bytes())?;
    let src = default_model_dir()?;
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json"] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), tmp.join(f)).map_err(|e| WhittleError::io(src.join(f), e))?;
        }
    }
    // Header first (offsets are known from the shapes), then tensors streamed in order.
    let list = tensor_list(shape);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shp, _) in &list {
        let bytes = shp.iter().product::<usize>() * size;
        header.insert(name.clone(), serde_json::json!({"dtype": st_name, "shape": shp, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    while !(8 + hbytes.len()).is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let path = tmp.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| WhittleError::io(&path, e))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = |e| WhittleError::io(&path, e);
    w.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&hbytes).map_err(io)?;
    let total = offset as u64;
    let mut done = 0u64;
    const CHUNK: usize = 1 << 20;
    let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
    let mut buf = Vec::new();
    for (ti, (_, shp, is_norm)) in list.iter().enumerate() {
        let n: usize = shp.iter().product();
        // Chunks are generated in parallel, each from its own seed, so the result does not depend on thread count.
        let starts: Vec<usize> = (0..n).step_by(CHUNK).collect();
        for group in starts.chunks(16) {
            let parts: Vec<Vec<f32>> = group
                .par_iter()
                .map(|&s| {
                    let len = CHUNK.min(n - s);
                    if *is_norm {
                        return vec![1.0; len];
                    }
                    let mut rng = StdRng::seed_from_u64(seed ^ ((ti as u64) << 32) ^ (s / CHUNK) as u64);
                    (0..len).map(|_| normal.sample(&mut rng)).collect()
                })
                .collect();
            for p in parts {
                encode(&p, dtype, &mut buf);
                w.write_all(&buf).map_err(io)?;
                done += buf.len() as u64;
                progress(done, total);
            }
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| WhittleError::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| WhittleError::io(out, e))?;
    Ok(())
}
