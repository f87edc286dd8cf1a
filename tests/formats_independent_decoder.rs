//! An independent decoder for the exported checkpoints: it shares no code with the exporter. It reads the
//! safetensors files with its own minimal parser (8-byte header length, JSON header, every offset checked against
//! the file), reads `config.json`, and decodes GPTQ and compressed-tensors tensors by following docs/formats.md
//! literally (bit by bit, in the formats' own signed/`zero − 1` conventions). The decoded weights must equal
//! `QuantizedLinear::dequantize()` of the exported layers exactly, for bits 2/3/4/8, sym/asym, act-order, ragged
//! in_features, zero point 0 and 2:4 masks. whittle_core's export API is used only to *produce* the files; if the
//! exporter and this decoder disagree about a layout, the config, or the tensors, these tests fail: that is the
//! "format skew" that loads as gibberish in vLLM (formats.md §5).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use whittle_core::compress::types::{Matrix, QuantizedLinear};
use whittle_core::export::{
    check_exportable, compressed_tensors_quantization_config, gptq_quantization_config, pack_compressed_tensors,
    pack_gptq, pack_sparse24_bitmask, write_atomic_dir, write_safetensors_sharded, ExportFormat, FloatDtype,
    GptqConfigOptions, LayerRef, RawTensor,
};

// ------------------------------------------------------------------------------------------------------------
// Minimal safetensors reader (formats.md §0)

#[derive(Debug)]
struct Tensor {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_safetensors(&bytes)
}

fn parse_safetensors(bytes: &[u8]) -> Result<HashMap<String, Tensor>, String> {
    if bytes.len() < 8 {
        return Err("shorter than the 8-byte header length".into());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let data_start =
        8u64.checked_add(n).filter(|&s| s <= bytes.len() as u64).ok_or("header length beyond end of file")?;
    let data_start = data_start as usize;
    if !data_start.is_multiple_of(8) {
        return Err(format!("data starts at byte {data_start}, not 8-byte aligned"));
    }
    let header: Value =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| format!("header is not JSON: {e}"))?;
    let header = header.as_object().ok_or("header is not an object")?;
    let data_len = bytes.len() - data_start;
    let mut out = HashMap::new();
    let mut spans = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            if info["format"] != "pt" {
                return Err("__metadata__.format is not \"pt\"".into());
            }
            continue;
        }
        let dtype = info["dtype"].as_str().ok_or(format!("{name}: no dtype"))?.to_string();
        let size = match dtype.as_str() {
            "F32" | "I32" => 4,
            "F16" | "BF16" => 2,
            "I64" => 8,
            "U8" => 1,
            d => return Err(format!("{name}: unexpected dtype {d}")),
        };
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or(format!("{name}: no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or(format!("{name}: bad shape")))
            .collect::<Result<_, _>>()?;
        let offs = info["data_offsets"].as_array().ok_or(format!("{name}: no data_offsets"))?;
        let (begin, end) = match offs.as_slice() {
            [b, e] => (b.as_u64().ok_or("bad offset")? as usize, e.as_u64().ok_or("bad offset")? as usize),
            _ => return Err(format!("{name}: data_offsets is not [begin, end]")),
        };
        if begin > end || end > data_len {
            return Err(format!("{name}: offsets [{begin}, {end}] outside the {data_len} data bytes"));
        }
        if end - begin != shape.iter().product::<usize>() * size {
            return Err(format!("{name}: {} bytes for shape {shape:?} of {dtype}", end - begin));
        }
        spans.push((begin, end));
        out.insert(name.clone(), Tensor { dtype, shape, data: bytes[data_start + begin..data_start + end].to_vec() });
    }
    spans.sort();
    let mut at = 0;
    for (b, e) in spans {
        if b != at {
            return Err(format!("tensor data not contiguous at byte {at}"));
        }
        at = e;
    }
    if at != data_len {
        return Err(format!("{} trailing bytes after the last tensor", data_len - at));
    }
    Ok(out)
}

/// All tensors of an export folder, through the index when sharded.
fn read_checkpoint(dir: &Path) -> HashMap<String, Tensor> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return read_safetensors(&dir.join("model.safetensors")).unwrap();
    }
    let index: Value = serde_json::from_str(&std::fs::read_to_string(index).unwrap()).unwrap();
    let mut files: Vec<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    let mut all = HashMap::new();
    let mut total = 0;
    for f in files {
        for (name, t) in read_safetensors(&dir.join(f)).unwrap() {
            assert_eq!(index["weight_map"][&name], f, "{name} is in {f}, the index says otherwise");
            total += t.data.len();
            all.insert(name, t);
        }
    }
    assert_eq!(index["metadata"]["total_size"], json!(total));
    assert_eq!(all.len(), index["weight_map"].as_object().unwrap().len());
    all
}

fn f16_to_f32(h: u16) -> f32 {
    let (sign, exp, frac) = (h >> 15, ((h >> 10) & 0x1f) as i32, (h & 0x3ff) as f32);
    let mag = match exp {
        0 => frac * 2f32.powi(-24),
        31 => f32::NAN,
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    };
    if sign == 1 {
        -mag
    } else {
        mag
    }
}

impl Tensor {
    fn i32s(&self) -> Vec<i32> {
        assert_eq!(self.dtype, "I32");
        self.data.chunks(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect()
    }
    fn i64s(&self) -> Vec<i64> {
        assert_eq!(self.dtype, "I64");
        self.data.chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }
    fn f16s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, "F16");
        self.data.chunks(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect()
    }
}

/// Reads `b` bits starting at stream bit `pos` of little-endian 32-bit words, one bit at a time.
fn stream_bits(words: &[u32], pos: usize, b: usize) -> u32 {
    (0..b).map(|j| ((words[(pos + j) / 32] >> ((pos + j) % 32)) & 1) << j).sum()
}

/// `^a\.b$` as our exporter writes exact module names (Python-regex escaped) → `a.b`.
fn unanchor(pattern: &str) -> String {
    pattern.trim_start_matches('^').trim_end_matches('$').replace('\\', "")
}

// ------------------------------------------------------------------------------------------------------------
// GPTQ decoder (formats.md §1)

fn gptq_decode(qc: &Value, tensors: &HashMap<String, Tensor>, name: &str) -> Option<Matrix> {
    // Settings: top-level, overridden by a "+:" dynamic entry naming this module; "-:" = dense.
    let mut bits = qc["bits"].as_u64().unwrap() as usize;
    let mut group = qc["group_size"].as_i64().unwrap();
    for (key, v) in qc["dynamic"].as_object().into_iter().flatten() {
        let (sign, pat) = key.split_at(2);
        if unanchor(pat) == name {
            if sign == "-:" {
                return None;
            }
            bits = v["bits"].as_u64().map_or(bits, |b| b as usize);
            group = v["group_size"].as_i64().unwrap_or(group);
        }
    }
    let qweight = &tensors[&format!("{name}.qweight")];
    let qzeros = &tensors[&format!("{name}.qzeros")];
    let scales = &tensors[&format!("{name}.scales")];
    let g_idx = tensors[&format!("{name}.g_idx")].i32s();
    let (c, r) = (g_idx.len(), qweight.shape[1]);
    let g = if group == -1 { c } else { group as usize };
    let n_groups = c.div_ceil(g);
    // qweight [c·b/32 (padded to whole words), r]
    assert!(qweight.shape[0] * 32 >= c * bits, "{name}: qweight {:?} too short", qweight.shape);
    assert!(qweight.shape[0] * 32 < (c + 32) * bits, "{name}: qweight {:?} over-padded", qweight.shape);
    assert_eq!(scales.shape, vec![n_groups, r], "{name}: scales [G, r]");
    assert_eq!(qzeros.shape[0], n_groups, "{name}: qzeros [G, ·]");
    assert!(qzeros.shape[1] * 32 >= r * bits);
    let qw: Vec<u32> = qweight.i32s().into_iter().map(|v| v as u32).collect();
    let qz: Vec<u32> = qzeros.i32s().into_iter().map(|v| v as u32).collect();
    let sc = scales.f16s();
    let mut w = Matrix::zeros(r, c);
    for o in 0..r {
        // the column of output o is one bit stream over the inputs
        let column: Vec<u32> = (0..qweight.shape[0]).map(|k| qw[k * r + o]).collect();
        for (i, &gi) in g_idx.iter().enumerate() {
            let gi = gi as usize;
            let q = stream_bits(&column, i * bits, bits);
            let zrow = &qz[gi * qzeros.shape[1]..(gi + 1) * qzeros.shape[1]];
            let zero = stream_bits(zrow, o * bits, bits) + 1; // v1 stores zero − 1
            w.data[o * c + i] = sc[gi * r + o] * (q as f32 - zero as f32);
        }
    }
    Some(w)
}

// ------------------------------------------------------------------------------------------------------------
// compressed-tensors decoder (formats.md §2)

struct CtScheme {
    bits: usize,
    sym: bool,
    group: Option<usize>,
}

fn ct_scheme(qc: &Value, name: &str) -> Option<CtScheme> {
    if qc["ignore"].as_array().into_iter().flatten().any(|v| v == name) {
        return None;
    }
    for group in qc["config_groups"].as_object().into_iter().flatten().map(|(_, g)| g) {
        let hit = group["targets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| unanchor(t.as_str().unwrap().trim_start_matches("re:")) == name);
        if hit {
            assert_eq!(group["format"], "pack-quantized");
            let w = &group["weights"];
            assert_eq!(w["type"], "int");
            let group = match w["strategy"].as_str().unwrap() {
                "group" => Some(w["group_size"].as_u64().unwrap() as usize),
                "channel" => None,
                s => panic!("strategy {s}"),
            };
            return Some(CtScheme {
                bits: w["num_bits"].as_u64().unwrap() as usize,
                sym: w["symmetric"].as_bool().unwrap(),
                group,
            });
        }
    }
    None
}

fn ct_decode(qc: &Value, tensors: &HashMap<String, Tensor>, name: &str) -> Option<Matrix> {
    let s = ct_scheme(qc, name)?;
    let shape = tensors[&format!("{name}.weight_shape")].i64s();
    let (r, c) = (shape[0] as usize, shape[1] as usize);
    let per_word = 32 / s.bits;
    let offset = 1i64 << (s.bits - 1);
    let mask = (1u32 << s.bits) - 1;
    let packed = &tensors[&format!("{name}.weight_packed")];
    assert_eq!(packed.shape, vec![r, c.div_ceil(per_word)], "{name}: weight_packed [r, ceil(c / (32 // b))]");
    let pw: Vec<u32> = packed.i32s().into_iter().map(|v| v as u32).collect();
    let scale = &tensors[&format!("{name}.weight_scale")];
    let n_groups = scale.shape[1];
    assert_eq!(scale.shape[0], r);
    let g = s.group.unwrap_or(c);
    assert_eq!(n_groups, c / g, "{name}: weight_scale [r, G]");
    let sc = scale.f16s();
    let g_idx: Vec<usize> = match tensors.get(&format!("{name}.weight_g_idx")) {
        Some(t) => t.i32s().into_iter().map(|v| v as usize).collect(),
        None => (0..c).map(|i| i / g).collect(),
    };
    // signed zero points: stored +2^(b−1), packed along the output dim; symmetric = 0
    let zp: Vec<i64> = if s.sym {
        assert!(!tensors.contains_key(&format!("{name}.weight_zero_point")), "{name}: sym stores no zero point");
        vec![0; r * n_groups]
    } else {
        let t = &tensors[&format!("{name}.weight_zero_point")];
        assert_eq!(t.shape, vec![r.div_ceil(per_word), n_groups], "{name}: weight_zero_point [ceil(r / (32 // b)), G]");
        let words = t.i32s();
        let mut zp = vec![0; r * n_groups];
        for o in 0..r {
            for gi in 0..n_groups {
                let word = words[(o / per_word) * n_groups + gi] as u32;
                zp[o * n_groups + gi] = ((word >> ((o % per_word) * s.bits)) & mask) as i64 - offset;
            }
        }
        zp
    };
    let mut w = Matrix::zeros(r, c);
    for o in 0..r {
        for i in 0..c {
            let word = pw[o * packed.shape[1] + i / per_word];
            let q = ((word >> ((i % per_word) * s.bits)) & mask) as i64 - offset;
            let gi = g_idx[i];
            w.data[o * c + i] = sc[o * n_groups + gi] * (q as f32 - zp[o * n_groups + gi] as f32);
        }
    }
    Some(w)
}

fn sparse24_decode(tensors: &HashMap<String, Tensor>, name: &str) -> Matrix {
    let shape = &tensors[&format!("{name}.shape")];
    assert_eq!(shape.shape, vec![2, 1]);
    let shape = shape.i64s();
    let (r, c) = (shape[0] as usize, shape[1] as usize);
    let bitmask = &tensors[&format!("{name}.bitmask")];
    assert_eq!((bitmask.dtype.as_str(), bitmask.shape.clone()), ("U8", vec![r, c.div_ceil(8)]));
    let compressed = &tensors[&format!("{name}.compressed")];
    assert_eq!(compressed.shape, vec![r, c / 2]);
    let mut values = compressed.f16s().into_iter();
    let mut w = Matrix::zeros(r, c);
    for o in 0..r {
        for i in 0..c {
            if bitmask.data[o * c.div_ceil(8) + i / 8] >> (i % 8) & 1 == 1 {
                w.data[o * c + i] = values.next().unwrap();
            }
        }
    }
    assert!(values.next().is_none());
    w
}

// ------------------------------------------------------------------------------------------------------------
// Layers to export

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Spec {
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    sym: bool,
    act_order: bool,
    masked: bool,
}

fn make_layer(rng: &mut Rng, s: &Spec) -> QuantizedLinear {
    let maxq = (1u64 << s.bits) - 1;
    let ng = s.cols.div_ceil(s.group);
    let g_idx: Option<Vec<u32>> = s.act_order.then(|| (0..s.cols).map(|_| rng.below(ng as u64) as u32).collect());
    let group_of = |i: usize| g_idx.as_ref().map_or(i / s.group, |g| g[i] as usize);
    let zeros: Vec<u8> = (0..s.rows * ng)
        .map(|k| {
            if s.sym {
                1 << (s.bits - 1)
            } else if k % 7 == 3 {
                0
            } else {
                rng.below(maxq + 1) as u8
            }
        })
        .collect();
    let mut codes = vec![0u8; s.rows * s.cols];
    for o in 0..s.rows {
        for i in 0..s.cols {
            // groups with zero point 0 avoid the top code, so GPTQ v1 can shift them (see pack_gptq)
            let top = if zeros[o * ng + group_of(i)] == 0 { maxq } else { maxq + 1 };
            codes[o * s.cols + i] = rng.below(top) as u8;
        }
    }
    let scales = (0..s.rows * ng)
        .map(|_| (1.0 + rng.below(1024) as f32 / 1024.0) * 2f32.powi(-(4 + rng.below(6) as i32)))
        .collect();
    let mask = s.masked.then(|| (0..s.rows * s.cols).map(|k| (k % 4) < 2).collect());
    QuantizedLinear {
        rows: s.rows,
        cols: s.cols,
        bits: s.bits,
        group_size: s.group,
        sym: s.sym,
        codes,
        scales,
        zeros,
        g_idx,
        mask,
    }
}

fn assert_same(name: &str, got: &Matrix, want: &Matrix) {
    assert_eq!((got.rows, got.cols), (want.rows, want.cols), "{name}: shape");
    for (k, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(a == b, "{name}: W[{}, {}] decodes to {a}, dequantize() gives {b}", k / got.cols, k % got.cols);
    }
}

fn export(
    dir: &Path,
    format: ExportFormat,
    layers: &[(String, LayerRef<'_>)],
    qc: Value,
    tensors: Vec<(String, RawTensor)>,
) -> PathBuf {
    check_exportable(format, layers).unwrap();
    let target = dir.join("export");
    let (path, files) = write_atomic_dir(&target, false, |d| {
        // Small shards so the decoder has to follow the index.
        let files = write_safetensors_sharded(d, tensors, 2048, &BTreeMap::new())?;
        let config = json!({"architectures": ["LlamaForCausalLM"], "quantization_config": qc});
        std::fs::write(d.join("config.json"), config.to_string()).unwrap();
        Ok(files)
    })
    .unwrap();
    assert!(files.len() > 2, "expected a sharded export, got {files:?}");
    path
}

fn read_qc(dir: &Path) -> Value {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["quantization_config"].clone()
}

#[test]
fn gptq_export_decodes_to_dequantize_for_every_bit_width() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut specs = Vec::new();
    for bits in [2u8, 3, 4, 8] {
        for sym in [true, false] {
            for act_order in [false, true] {
                // ragged in_features (not a whole number of words, e.g. 172 at 4 bits) and non-dividing groups
                let cols = [64, 172, 40, 96][(bits as usize + sym as usize) % 4];
                let group = [32, 24, 16, cols][(bits as usize + act_order as usize) % 4];
                specs.push(Spec {
                    rows: [16, 33, 40][bits as usize % 3],
                    cols,
                    bits,
                    group,
                    sym,
                    act_order,
                    masked: false,
                });
            }
        }
    }
    specs.push(Spec { rows: 12, cols: 64, bits: 4, group: 32, sym: false, act_order: false, masked: true });
    let layers: Vec<(String, QuantizedLinear)> = specs
        .iter()
        .enumerate()
        .map(|(k, s)| (format!("model.layers.{k}.mlp.down_proj"), make_layer(&mut rng, s)))
        .collect();
    let dense = Matrix::zeros(8, 8);
    let mut refs: Vec<(String, LayerRef<'_>)> =
        layers.iter().map(|(n, q)| (n.clone(), LayerRef::Quantized(q))).collect();
    refs.push(("model.layers.0.self_attn.o_proj".into(), LayerRef::Dense(&dense)));
    let qc = gptq_quantization_config(&refs, &GptqConfigOptions::default()).unwrap();
    let tensors = layers.iter().flat_map(|(n, q)| pack_gptq(n, q).unwrap().into_tensors(n)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = export(tmp.path(), ExportFormat::Gptq, &refs, qc, tensors);

    let qc = read_qc(&dir);
    assert_eq!((qc["quant_method"].as_str(), qc["checkpoint_format"].as_str()), (Some("gptq"), Some("gptq")));
    let tensors = read_checkpoint(&dir);
    assert!(gptq_decode(&qc, &tensors, "model.layers.0.self_attn.o_proj").is_none(), "dense layer must be \"-:\"");
    for (name, q) in &layers {
        let got = gptq_decode(&qc, &tensors, name).unwrap_or_else(|| panic!("{name} decoded as dense"));
        assert_same(name, &got, &q.dequantize());
    }
}

#[test]
fn compressed_tensors_export_decodes_to_dequantize_for_every_bit_width() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut specs = Vec::new();
    for bits in [2u8, 3, 4, 5, 8] {
        for sym in [true, false] {
            for act_order in [false, true] {
                // groups must divide in_features here; 3 bits with 50 columns leaves a part-filled last word
                let cols = [64, 96, 50][(bits as usize + act_order as usize) % 3];
                let group = if sym { cols / 2 } else { cols };
                specs.push(Spec {
                    rows: [16, 33, 9][bits as usize % 3],
                    cols,
                    bits,
                    group,
                    sym,
                    act_order,
                    masked: false,
                });
            }
        }
    }
    // 2:4 + int4: pack-quantized with the pruned weights at the zero point
    specs.push(Spec { rows: 12, cols: 64, bits: 4, group: 32, sym: true, act_order: false, masked: true });
    let layers: Vec<(String, QuantizedLinear)> = specs
        .iter()
        .enumerate()
        .map(|(k, s)| (format!("model.layers.{k}.self_attn.q_proj"), make_layer(&mut rng, s)))
        .collect();
    let dense = Matrix::zeros(8, 8);
    let mut refs: Vec<(String, LayerRef<'_>)> =
        layers.iter().map(|(n, q)| (n.clone(), LayerRef::Quantized(q))).collect();
    refs.push(("model.layers.0.mlp.gate_proj".into(), LayerRef::Dense(&dense)));
    let qc = compressed_tensors_quantization_config(&refs).unwrap();
    let tensors = layers
        .iter()
        .flat_map(|(n, q)| pack_compressed_tensors(n, q, FloatDtype::F16).unwrap().into_tensors(n))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = export(tmp.path(), ExportFormat::CompressedTensors { dtype: FloatDtype::F16 }, &refs, qc, tensors);

    let qc = read_qc(&dir);
    assert_eq!(
        (qc["quant_method"].as_str(), qc["format"].as_str()),
        (Some("compressed-tensors"), Some("pack-quantized"))
    );
    assert!(qc["ignore"].as_array().unwrap().contains(&json!("lm_head")));
    let tensors = read_checkpoint(&dir);
    assert!(ct_decode(&qc, &tensors, "model.layers.0.mlp.gate_proj").is_none(), "dense layer must be ignored");
    for (name, q) in &layers {
        let got = ct_decode(&qc, &tensors, name).unwrap_or_else(|| panic!("{name} decoded as dense"));
        assert_same(name, &got, &q.dequantize());
    }
    let last = &layers.last().unwrap().0;
    assert_eq!(qc["sparsity_config"]["format"], "dense");
    assert_eq!(qc["sparsity_config"]["targets"], json!([format!("re:^{}$", last.replace('.', "\\."))]));
}

#[test]
fn sparse24_bitmask_export_decodes_to_the_dense_weights() {
    let mut rng = Rng(7);
    let (r, c) = (24, 40);
    let mut w = Matrix::zeros(r, c);
    for g in w.data.chunks_exact_mut(4) {
        let a = rng.below(4) as usize;
        let b = (a + 1 + rng.below(3) as usize) % 4;
        g[a] = (1 + rng.below(500)) as f32 / 128.0;
        g[b] = -((1 + rng.below(500)) as f32) / 256.0;
    }
    let refs = vec![("model.layers.0.mlp.up_proj".to_string(), LayerRef::Sparse24(&w))];
    let qc = compressed_tensors_quantization_config(&refs).unwrap();
    let tensors = pack_sparse24_bitmask(&refs[0].0, &w, FloatDtype::F16).unwrap().into_tensors(&refs[0].0);
    let tmp = tempfile::tempdir().unwrap();
    check_exportable(ExportFormat::CompressedTensors { dtype: FloatDtype::F16 }, &refs).unwrap();
    let (dir, _) = write_atomic_dir(&tmp.path().join("sparse"), false, |d| {
        std::fs::write(d.join("config.json"), json!({"quantization_config": qc}).to_string()).unwrap();
        write_safetensors_sharded(d, tensors, 1 << 20, &BTreeMap::new())
    })
    .unwrap();
    let qc = read_qc(&dir);
    assert_eq!(qc["format"], "dense");
    assert_eq!(qc["sparsity_config"]["format"], "sparse-24-bitmask");
    let tensors = read_checkpoint(&dir);
    assert_same("up_proj", &sparse24_decode(&tensors, "model.layers.0.mlp.up_proj"), &w);
}

#[test]
fn reader_rejects_lying_headers() {
    let mut header = br#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,9]}}"#.to_vec();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&[0; 4]);
    assert!(parse_safetensors(&file).unwrap_err().contains("outside"));
    let mut file = 1000u64.to_le_bytes().to_vec();
    file.extend_from_slice(b"{}");
    assert!(parse_safetensors(&file).is_err());
}
