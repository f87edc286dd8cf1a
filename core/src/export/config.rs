//! `quantization_config` JSON: build it for an export, and parse one from a checkpoint's `config.json` into the
//! scheme of each module.
//!
//! Building: one entry per distinct scheme, targets naming modules exactly (`^name$` regexes, dots escaped), so a
//! mixed-precision export cannot be mis-resolved by a loader whatever order it tries the rules in.
//! * GPTQ: the most common scheme is top-level; other quantized modules get a GPTQModel `dynamic` override
//!   `"+:^name$": {bits, group_size, sym, desc_act}` (all fields, not just the differing ones), dense modules
//!   `"-:^name$": {}`. vLLM honours `dynamic` for `gptq` / `gptq_marlin`.
//! * compressed-tensors: one `config_groups` entry per (bits, group, sym, act-order), `ignore` = dense modules +
//!   `lm_head`, and a `sparsity_config` for 2:4 (see [`super::compressed_tensors`] for why 2:4 + int is `"dense"`).
//!
//! Parsing follows the loaders: GPTQModel/vLLM try `dynamic` keys **in document order** with Python `re.match`
//! (anchored at the start only), first match wins; compressed-tensors/vLLM match config-group targets by exact
//! name or `re:` regex first, then by class name (`"Linear"` = every linear module), and `ignore` the same way.
//! serde_json's map sorts keys, so document order is recovered by a second, order-keeping pass over the text.

use std::collections::BTreeMap;

use regex::Regex;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{json, Map, Value};

use super::error::{ExportError, Result};
use super::gptq::GPTQ_BITS;
use super::LayerRef;
use crate::compress::types::QuantizedLinear;

/// The weight-quantization settings of one module, as configs express them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantParams {
    pub bits: u8,
    /// `None` = one group per output row (GPTQ `group_size: -1`, compressed-tensors strategy `channel`/`tensor`).
    pub group_size: Option<usize>,
    pub sym: bool,
    /// Act-order with a stored, non-trivial g_idx (GPTQ `desc_act`, compressed-tensors `actorder: "group"`).
    pub act_order: bool,
}

impl QuantParams {
    /// The settings a config must announce for `q`.
    pub fn of(q: &QuantizedLinear) -> Self {
        Self {
            bits: q.bits,
            group_size: (q.group_size < q.cols).then_some(q.group_size),
            sym: q.sym,
            act_order: q.g_idx.is_some(),
        }
    }
}

/// How a checkpoint stores one linear module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleScheme {
    /// A plain `weight` tensor in the model dtype.
    Dense,
    /// GPTQ v1 `qweight`/`qzeros`/`scales`/`g_idx`.
    Gptq(QuantParams),
    /// compressed-tensors `weight_packed`/`weight_scale`/… .
    PackQuantized(QuantParams),
    /// compressed-tensors `compressed`/`bitmask`/`shape`.
    Sparse24Bitmask,
}

// ---------------------------------------------------------------------------------------------------------------
// Building

/// GPTQ settings that describe how the export was produced rather than how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqConfigOptions {
    pub damp_percent: f64,
    pub true_sequential: bool,
    pub static_groups: bool,
}

impl Default for GptqConfigOptions {
    fn default() -> Self {
        Self { damp_percent: 0.01, true_sequential: true, static_groups: false }
    }
}

/// `^name$` with regex metacharacters escaped: matches exactly this module in Python `re` and Rust `regex`.
pub fn exact_name_regex(name: &str) -> String {
    format!("^{}$", regex::escape(name))
}

fn gptq_group(g: Option<usize>) -> Value {
    match g {
        Some(g) => json!(g),
        None => json!(-1),
    }
}

/// What the config builders need of one exported layer, without its values, so a streaming export can describe
/// every layer after seeing each one once.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerDigest {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub kind: DigestKind,
    /// Weights stored as zero (pruned).
    pub zeros: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DigestKind {
    Quantized { params: QuantParams, mask_2_4: bool },
    Dense,
    Sparse24,
}

impl LayerDigest {
    pub fn of(name: &str, layer: &LayerRef<'_>) -> Self {
        let (rows, cols) = layer.shape();
        let zero_values = |m: &super::Matrix| m.data.iter().filter(|&&v| v == 0.0).count();
        let (kind, zeros) = match layer {
            LayerRef::Quantized(q) => (
                DigestKind::Quantized { params: QuantParams::of(q), mask_2_4: mask_is_2_4(q) },
                q.mask.as_ref().map_or(0, |m| m.iter().filter(|&&k| !k).count()),
            ),
            LayerRef::Dense(m) => (DigestKind::Dense, zero_values(m)),
            LayerRef::Sparse24(m) => (DigestKind::Sparse24, zero_values(m)),
        };
        Self { name: name.to_string(), rows, cols, kind, zeros }
    }

    pub fn quant_params(&self) -> Option<QuantParams> {
        match self.kind {
            DigestKind::Quantized { params, .. } => Some(params),
            _ => None,
        }
    }
}

fn digests(layers: &[(String, LayerRef<'_>)]) -> Vec<LayerDigest> {
    layers.iter().map(|(n, l)| LayerDigest::of(n, l)).collect()
}

/// The GPTQ `quantization_config` for these layers (run [`super::check_exportable`] first).
pub fn gptq_quantization_config(layers: &[(String, LayerRef<'_>)], opts: &GptqConfigOptions) -> Result<Value> {
    gptq_quantization_config_of(&digests(layers), opts)
}

/// [`gptq_quantization_config`] from layer digests.
pub fn gptq_quantization_config_of(layers: &[LayerDigest], opts: &GptqConfigOptions) -> Result<Value> {
    let schemes: Vec<(&str, Option<QuantParams>)> = layers.iter().map(|l| (l.name.as_str(), l.quant_params())).collect();
    // The most common scheme goes top-level so the dynamic overrides stay few; ties go to the first seen.
    let mut counts: Vec<(QuantParams, usize)> = Vec::new();
    for p in schemes.iter().filter_map(|(_, p)| *p) {
        match counts.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => counts.push((p, 1)),
        }
    }
    let base = counts
        .iter()
        .fold(None::<(QuantParams, usize)>, |best, &(p, n)| match best {
            Some((_, m)) if m >= n => best,
            _ => Some((p, n)),
        })
        .map(|(p, _)| p)
        .ok_or_else(|| ExportError::layer("(model)", "no quantized layer: a GPTQ checkpoint needs at least one"))?;

    let mut dynamic = Map::new();
    for (name, p) in &schemes {
        match p {
            None => {
                dynamic.insert(format!("-:{}", exact_name_regex(name)), json!({}));
            }
            Some(p) if *p != base => {
                dynamic.insert(
                    format!("+:{}", exact_name_regex(name)),
                    json!({"bits": p.bits, "group_size": gptq_group(p.group_size), "sym": p.sym, "desc_act": p.act_order}),
                );
            }
            Some(_) => {}
        }
    }
    let mut cfg = json!({
        "quant_method": "gptq",
        "bits": base.bits,
        "group_size": gptq_group(base.group_size),
        "desc_act": base.act_order,
        "sym": base.sym,
        "checkpoint_format": "gptq",
        "damp_percent": opts.damp_percent,
        "true_sequential": opts.true_sequential,
        "static_groups": opts.static_groups,
    });
    if !dynamic.is_empty() {
        cfg["dynamic"] = Value::Object(dynamic);
    }
    Ok(cfg)
}

/// GPTQModel's `quantize_config.json`: the same keys plus `meta` naming the quantizer.
pub fn gptq_quantize_config_file(quantization_config: &Value) -> Value {
    let mut v = quantization_config.clone();
    v["meta"] = json!({"quantizer": [format!("whittle:{}", env!("CARGO_PKG_VERSION"))]});
    v
}

fn ct_weights(p: &QuantParams) -> Value {
    json!({
        "num_bits": p.bits,
        "type": "int",
        "symmetric": p.sym,
        "strategy": if p.group_size.is_some() { "group" } else { "channel" },
        "group_size": p.group_size,
        "block_structure": null,
        "dynamic": false,
        "actorder": if p.act_order { json!("group") } else { Value::Null },
        "observer": "minmax",
        "observer_kwargs": {},
    })
}

/// True when at most 2 of every 4 consecutive weights of each row are kept.
fn mask_is_2_4(q: &QuantizedLinear) -> bool {
    match &q.mask {
        Some(m) if q.cols.is_multiple_of(4) => m.chunks_exact(4).all(|g| g.iter().filter(|&&k| k).count() <= 2),
        _ => false,
    }
}

/// The compressed-tensors `quantization_config` for these layers (run [`super::check_exportable`] first).
pub fn compressed_tensors_quantization_config(layers: &[(String, LayerRef<'_>)]) -> Result<Value> {
    compressed_tensors_quantization_config_of(&digests(layers))
}

/// [`compressed_tensors_quantization_config`] from layer digests.
pub fn compressed_tensors_quantization_config_of(layers: &[LayerDigest]) -> Result<Value> {
    let mut groups: Vec<(QuantParams, Vec<String>)> = Vec::new();
    let mut ignore: Vec<String> = Vec::new();
    let mut bitmask_targets = Vec::new();
    let mut dense_24_targets = Vec::new();
    let (mut zeros, mut total) = (0usize, 0usize);
    for layer in layers {
        let name = &layer.name;
        match layer.kind {
            DigestKind::Quantized { params: p, mask_2_4 } => {
                let target = format!("re:{}", exact_name_regex(name));
                match groups.iter_mut().find(|(g, _)| *g == p) {
                    Some((_, t)) => t.push(target),
                    None => groups.push((p, vec![target])),
                }
                if mask_2_4 {
                    dense_24_targets.push(format!("re:{}", exact_name_regex(name)));
                }
            }
            DigestKind::Dense => ignore.push(name.clone()),
            DigestKind::Sparse24 => {
                ignore.push(name.clone());
                bitmask_targets.push(format!("re:{}", exact_name_regex(name)));
            }
        }
        zeros += layer.zeros;
        total += layer.rows * layer.cols;
    }
    if !ignore.iter().any(|n| n == "lm_head") {
        ignore.push("lm_head".into());
    }
    let sparsity = |format: &str, targets: Vec<String>| {
        json!({
            "format": format,
            "sparsity_structure": "2:4",
            "global_sparsity": if total == 0 { 0.0 } else { zeros as f64 / total as f64 },
            "targets": targets,
            "ignore": ["lm_head"],
        })
    };
    if groups.is_empty() {
        if bitmask_targets.is_empty() {
            return Err(ExportError::layer(
                "(model)",
                "no quantized or 2:4 layer: nothing for compressed-tensors to compress",
            ));
        }
        return Ok(json!({
            "quant_method": "compressed-tensors",
            "format": "dense",
            "sparsity_config": sparsity("sparse-24-bitmask", bitmask_targets),
        }));
    }
    let config_groups: Map<String, Value> = groups
        .iter()
        .enumerate()
        .map(|(i, (p, targets))| {
            (
                format!("group_{i}"),
                json!({
                    "targets": targets,
                    "weights": ct_weights(p),
                    "input_activations": null,
                    "output_activations": null,
                    "format": "pack-quantized",
                }),
            )
        })
        .collect();
    let mut cfg = json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
    });
    // Bitmask layers next to quantized ones are refused by check_exportable; here 2:4 + int is metadata only.
    if !dense_24_targets.is_empty() {
        cfg["sparsity_config"] = sparsity("dense", dense_24_targets);
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------------------------
// Parsing

/// A parsed `quantization_config`: resolves each module name to the way it is stored.
#[derive(Debug)]
pub struct QuantConfig {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Gptq { base: QuantParams, lm_head: bool, dynamic: Vec<DynamicRule> },
    Ct { groups: Vec<CtGroup>, ignore: Vec<Target>, sparsity: Option<CtSparsity> },
}

#[derive(Debug)]
struct DynamicRule {
    exclude: bool,
    re: Regex,
    params: QuantParams,
}

#[derive(Debug)]
struct CtGroup {
    targets: Vec<Target>,
    params: QuantParams,
}

#[derive(Debug)]
struct CtSparsity {
    bitmask: bool,
    targets: Vec<Target>,
    ignore: Vec<Target>,
}

/// A compressed-tensors target: `re:` regex, or a name that is a module name or a class name.
#[derive(Debug)]
enum Target {
    Regex(Regex),
    Name(String),
}

impl Target {
    fn parse(field: &str, s: &str) -> Result<Self> {
        match s.strip_prefix("re:") {
            Some(p) => Ok(Target::Regex(python_match_regex(field, p)?)),
            None => Ok(Target::Name(s.to_string())),
        }
    }
    /// Exact module name or regex.
    fn matches_name(&self, module: &str) -> bool {
        match self {
            Target::Regex(re) => re.is_match(module),
            Target::Name(n) => n == module,
        }
    }
    /// Class name: every module we resolve is a linear layer.
    fn matches_class(&self) -> bool {
        matches!(self, Target::Name(n) if n == "Linear")
    }
    fn matches(&self, module: &str) -> bool {
        self.matches_name(module) || self.matches_class()
    }
}

/// Python `re.match(p, s)` anchors at the start only.
fn python_match_regex(field: &str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})"))
        .map_err(|e| ExportError::config(field, format!("regex {pattern:?} is not supported: {e}")))
}

impl QuantConfig {
    /// `"gptq"` or `"compressed-tensors"`.
    pub fn quant_method(&self) -> &'static str {
        match self.inner {
            Inner::Gptq { .. } => "gptq",
            Inner::Ct { .. } => "compressed-tensors",
        }
    }

    /// How the linear module `module` (full name, e.g. `model.layers.0.mlp.down_proj`) is stored.
    pub fn scheme_for(&self, module: &str) -> ModuleScheme {
        match &self.inner {
            Inner::Gptq { base, lm_head, dynamic } => {
                if module == "lm_head" && !lm_head {
                    return ModuleScheme::Dense;
                }
                for rule in dynamic {
                    if rule.re.is_match(module) {
                        return if rule.exclude { ModuleScheme::Dense } else { ModuleScheme::Gptq(rule.params) };
                    }
                }
                ModuleScheme::Gptq(*base)
            }
            Inner::Ct { groups, ignore, sparsity } => {
                let bitmask = sparsity.as_ref().is_some_and(|s| {
                    s.bitmask
                        && s.targets.iter().any(|t| t.matches(module))
                        && !s.ignore.iter().any(|t| t.matches(module))
                });
                if !ignore.iter().any(|t| t.matches(module)) {
                    let group = groups
                        .iter()
                        .find(|g| g.targets.iter().any(|t| t.matches_name(module)))
                        .or_else(|| groups.iter().find(|g| g.targets.iter().any(|t| t.matches_class())));
                    // A quantized layer has no `weight` for the sparsity compressor to act on: pack-quantized wins.
                    if let Some(g) = group {
                        return ModuleScheme::PackQuantized(g.params);
                    }
                }
                if bitmask {
                    ModuleScheme::Sparse24Bitmask
                } else {
                    ModuleScheme::Dense
                }
            }
        }
    }
}

/// Parses a `config.json` (or a bare `quantization_config` / `quantize_config.json` object, recognised by its
/// `quant_method`). Returns `None` when the model is not quantized (no `quantization_config`).
pub fn parse_quantization_config(json_text: &str) -> Result<Option<QuantConfig>> {
    let root: Value = serde_json::from_str(json_text)
        .map_err(|e| ExportError::config("(config.json)", format!("not valid JSON: {e}")))?;
    let Some(obj) = root.as_object() else {
        return Err(ExportError::config("(config.json)", "expected a JSON object"));
    };
    let (qc, prefix, order) = match obj.get("quantization_config") {
        Some(qc) => (
            qc,
            "quantization_config.",
            serde_json::from_str::<WrappedOrder>(json_text).map(|w| w.quantization_config.unwrap_or_default()),
        ),
        None if obj.contains_key("quant_method") => (&root, "", serde_json::from_str::<KeyOrders>(json_text)),
        None => return Ok(None),
    };
    // A failed order pass means a malformed field, which the main pass below reports precisely.
    let order = order.unwrap_or_default();
    let f = Fields { obj: as_object(qc, prefix.trim_end_matches('.'))?, prefix: prefix.to_string() };
    let method = f.req_str("quant_method")?;
    let inner = match method.to_ascii_lowercase().as_str() {
        "gptq" => parse_gptq(&f, &order)?,
        "compressed-tensors" => parse_ct(&f, &order)?,
        other => {
            return Err(ExportError::config(
                f.name("quant_method"),
                format!("{other:?} is not supported; whittle imports \"gptq\" and \"compressed-tensors\""),
            ))
        }
    };
    Ok(Some(QuantConfig { inner }))
}

fn as_object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| ExportError::config(field, format!("expected an object, found {}", kind(v))))
}

fn kind(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

/// Typed field access with errors naming the full field path.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
    fn sub(&self, key: &str, v: &'a Value) -> Result<Fields<'a>> {
        Ok(Fields { obj: as_object(v, &self.name(key))?, prefix: format!("{}{key}.", self.prefix) })
    }
    /// The value, treating JSON null as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn req(&self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| ExportError::config(self.name(key), "missing"))
    }
    fn req_str(&self, key: &str) -> Result<&'a str> {
        let v = self.req(key)?;
        v.as_str().ok_or_else(|| ExportError::config(self.name(key), format!("expected a string, found {}", kind(v))))
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map(|_| self.req_str(key)).transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    ExportError::config(self.name(key), format!("expected true or false, found {}", kind(v)))
                })
            })
            .transpose()
    }
    fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    ExportError::config(self.name(key), format!("expected an integer, found {}", kind(v)))
                })
            })
            .transpose()
    }
    fn req_int(&self, key: &str) -> Result<i64> {
        self.opt_int(key)?.ok_or_else(|| ExportError::config(self.name(key), "missing"))
    }
    fn str_list(&self, key: &str) -> Result<Vec<(String, &'a str)>> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        let arr = v.as_array().ok_or_else(|| {
            ExportError::config(self.name(key), format!("expected a list of strings, found {}", kind(v)))
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("{}[{i}]", self.name(key));
                match s.as_str() {
                    Some(s) => Ok((field, s)),
                    None => Err(ExportError::config(field, format!("expected a string, found {}", kind(s)))),
                }
            })
            .collect()
    }
    fn targets(&self, key: &str) -> Result<Vec<Target>> {
        self.str_list(key)?.into_iter().map(|(field, s)| Target::parse(&field, s)).collect()
    }
}

fn gptq_bits(f: &Fields<'_>, key: &str, v: i64) -> Result<u8> {
    match u8::try_from(v) {
        Ok(b) if GPTQ_BITS.contains(&b) => Ok(b),
        _ => Err(ExportError::config(f.name(key), format!("{v} is not a GPTQ bit width (2, 3, 4 or 8)"))),
    }
}

fn gptq_group_size(f: &Fields<'_>, key: &str, v: i64) -> Result<Option<usize>> {
    match v {
        -1 => Ok(None),
        g if g >= 1 => Ok(Some(g as usize)),
        g => Err(ExportError::config(
            f.name(key),
            format!("{g} is not a group size (a positive integer, or -1 for per-channel)"),
        )),
    }
}

fn parse_gptq(f: &Fields<'_>, order: &KeyOrders) -> Result<Inner> {
    let format = match f.opt_str("checkpoint_format")? {
        Some(s) => Some(("checkpoint_format", s)),
        None => f.opt_str("format")?.map(|s| ("format", s)),
    };
    if let Some((key, fmt)) = format {
        if fmt != "gptq" {
            return Err(ExportError::config(
                f.name(key),
                format!("{fmt:?} is not supported; whittle reads GPTQ v1 checkpoints (\"gptq\")"),
            ));
        }
    }
    let base = QuantParams {
        bits: gptq_bits(f, "bits", f.req_int("bits")?)?,
        group_size: gptq_group_size(f, "group_size", f.req_int("group_size")?)?,
        sym: f.opt_bool("sym")?.unwrap_or(true),
        act_order: f.opt_bool("desc_act")?.unwrap_or(false),
    };
    let lm_head = f.opt_bool("lm_head")?.unwrap_or(false);
    let mut dynamic = Vec::new();
    if let Some(v) = f.get("dynamic") {
        let map = as_object(v, &f.name("dynamic"))?;
        for key in ordered_keys(map, order.dynamic()) {
            let field = format!("{}[{key:?}]", f.name("dynamic"));
            let (exclude, pattern) = match (key.strip_prefix("-:"), key.strip_prefix("+:")) {
                (Some(p), _) => (true, p),
                (None, Some(p)) => (false, p),
                (None, None) => (false, key.as_str()),
            };
            let re = python_match_regex(&field, pattern)?;
            let o = Fields { obj: as_object(&map[key.as_str()], &field)?, prefix: format!("{field}.") };
            let params = QuantParams {
                bits: match o.opt_int("bits")? {
                    Some(b) => gptq_bits(&o, "bits", b)?,
                    None => base.bits,
                },
                group_size: match o.opt_int("group_size")? {
                    Some(g) => gptq_group_size(&o, "group_size", g)?,
                    None => base.group_size,
                },
                sym: o.opt_bool("sym")?.unwrap_or(base.sym),
                act_order: o.opt_bool("desc_act")?.unwrap_or(base.act_order),
            };
            dynamic.push(DynamicRule { exclude, re, params });
        }
    }
    Ok(Inner::Gptq { base, lm_head, dynamic })
}

fn parse_ct(f: &Fields<'_>, order: &KeyOrders) -> Result<Inner> {
    let top_format = f.opt_str("format")?;
    let mut groups = Vec::new();
    if let Some(v) = f.get("config_groups") {
        let map = as_object(v, &f.name("config_groups"))?;
        let gf = f.sub("config_groups", v)?;
        for key in ordered_keys(map, order.config_groups()) {
            let g = gf.sub(&key, &map[key.as_str()])?;
            let format = match g.opt_str("format")? {
                Some(s) => s,
                None => top_format
                    .ok_or_else(|| ExportError::config(g.name("format"), "missing, and no top-level format"))?,
            };
            if format != "pack-quantized" {
                return Err(ExportError::config(
                    g.name("format"),
                    format!("{format:?} is not supported; whittle reads integer weights stored \"pack-quantized\""),
                ));
            }
            if g.get("input_activations").is_some() {
                return Err(ExportError::config(
                    g.name("input_activations"),
                    "activation quantization is not supported; whittle imports weight-only checkpoints",
                ));
            }
            let targets = g.targets("targets")?;
            if targets.is_empty() {
                return Err(ExportError::config(g.name("targets"), "missing or empty"));
            }
            let w = g.sub("weights", g.req("weights")?)?;
            groups.push(CtGroup { targets, params: parse_ct_weights(&w)? });
        }
    }
    let sparsity = match f.get("sparsity_config") {
        None => None,
        Some(v) => {
            let s = f.sub("sparsity_config", v)?;
            let bitmask = match s.req_str("format")? {
                "dense" => false,
                "sparse-24-bitmask" => {
                    if let Some(st) = s.opt_str("sparsity_structure")? {
                        if st != "2:4" {
                            return Err(ExportError::config(
                                s.name("sparsity_structure"),
                                format!("{st:?}: sparse-24-bitmask is 2:4 only"),
                            ));
                        }
                    }
                    true
                }
                other => {
                    return Err(ExportError::config(
                        s.name("format"),
                        format!("{other:?} is not supported; whittle reads \"dense\" and \"sparse-24-bitmask\""),
                    ))
                }
            };
            Some(CtSparsity { bitmask, targets: s.targets("targets")?, ignore: s.targets("ignore")? })
        }
    };
    if groups.is_empty() && !sparsity.as_ref().is_some_and(|s| s.bitmask) {
        return Err(ExportError::config(
            f.name("config_groups"),
            "missing or empty, and no sparse-24-bitmask sparsity_config",
        ));
    }
    Ok(Inner::Ct { groups, ignore: f.targets("ignore")?, sparsity })
}

fn parse_ct_weights(w: &Fields<'_>) -> Result<QuantParams> {
    let bits = w.req_int("num_bits")?;
    let bits = match u8::try_from(bits) {
        Ok(b) if (2..=8).contains(&b) => b,
        _ => {
            return Err(ExportError::config(
                w.name("num_bits"),
                format!("{bits}: whittle imports 2..=8 bit integer weights"),
            ))
        }
    };
    if let Some(t) = w.opt_str("type")? {
        if t != "int" {
            return Err(ExportError::config(
                w.name("type"),
                format!("{t:?}: whittle imports integer (\"int\") weights"),
            ));
        }
    }
    if w.opt_bool("dynamic")?.unwrap_or(false) {
        return Err(ExportError::config(
            w.name("dynamic"),
            "dynamic weight quantization has no stored scales to import",
        ));
    }
    let group = w.opt_int("group_size")?;
    let strategy = match w.opt_str("strategy")? {
        Some(s) => s,
        None if group.is_some() => "group",
        None => {
            return Err(ExportError::config(w.name("strategy"), "missing (and no group_size to infer \"group\" from)"))
        }
    };
    let group_size = match strategy {
        "channel" | "tensor" => None,
        "group" => match group {
            Some(g) if g >= 1 => Some(g as usize),
            Some(g) => {
                return Err(ExportError::config(
                    w.name("group_size"),
                    format!("{g}: strategy \"group\" needs a positive group size"),
                ))
            }
            None => return Err(ExportError::config(w.name("group_size"), "missing; strategy \"group\" needs it")),
        },
        other => {
            return Err(ExportError::config(
                w.name("strategy"),
                format!("{other:?} is not supported; whittle reads \"group\", \"channel\" and \"tensor\""),
            ))
        }
    };
    let act_order = match w.get("actorder") {
        None => false,
        Some(Value::Bool(b)) => *b,
        // "weight"/"static" reorder during quantization but keep groups contiguous: no g_idx is stored.
        Some(Value::String(s)) if matches!(s.as_str(), "group" | "dynamic") => true,
        Some(Value::String(s)) if matches!(s.as_str(), "weight" | "static") => false,
        Some(v) => {
            return Err(ExportError::config(
                w.name("actorder"),
                format!("expected null, \"group\", \"weight\" or \"static\", found {}", kind(v)),
            ))
        }
    };
    Ok(QuantParams { bits, group_size, sym: w.opt_bool("symmetric")?.unwrap_or(true), act_order })
}

/// `map`'s keys in document order when the order pass saw them, else the map's (sorted) order.
fn ordered_keys(map: &Map<String, Value>, doc_order: &[String]) -> Vec<String> {
    if doc_order.len() == map.len() && doc_order.iter().all(|k| map.contains_key(k)) {
        doc_order.to_vec()
    } else {
        map.keys().cloned().collect()
    }
}

/// The document order of the keys whose order matters, from a second serde pass that keeps it.
#[derive(Default, serde::Deserialize)]
struct KeyOrders {
    #[serde(default)]
    dynamic: Option<KeyOrder>,
    #[serde(default)]
    config_groups: Option<KeyOrder>,
}

#[derive(serde::Deserialize)]
struct WrappedOrder {
    #[serde(default)]
    quantization_config: Option<KeyOrders>,
}

/// Keys of a JSON object in the order they appear.
#[derive(Default)]
struct KeyOrder(Vec<String>);

impl KeyOrders {
    fn dynamic(&self) -> &[String] {
        self.dynamic.as_ref().map_or(&[], |k| &k.0)
    }
    fn config_groups(&self) -> &[String] {
        self.config_groups.as_ref().map_or(&[], |k| &k.0)
    }
}

impl<'de> Deserialize<'de> for KeyOrder {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<KeyOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(KeyOrder(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// Module name → scheme for every module of `modules`, e.g. for a model-card table.
pub fn resolve_all(config: &QuantConfig, modules: &[&str]) -> BTreeMap<String, ModuleScheme> {
    modules.iter().map(|m| (m.to_string(), config.scheme_for(m))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::types::Matrix;
    use crate::export::testutil::simple_layer;

    fn wrap(qc: &Value) -> String {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "quantization_config": qc}).to_string()
    }

    fn parse(text: &str) -> QuantConfig {
        parse_quantization_config(text).unwrap().unwrap()
    }

    fn err(text: &str) -> String {
        parse_quantization_config(text).unwrap_err().to_string()
    }

    /// A mixed model: most layers 4-bit g32, one 8-bit g64, one act-order, one per-channel (c = group), one dense.
    struct Model {
        q4: QuantizedLinear,
        q8: QuantizedLinear,
        qa: QuantizedLinear,
        qc: QuantizedLinear,
        dense: Matrix,
    }

    fn model() -> Model {
        let mut qa = simple_layer(64, 128, 4, 32, true);
        qa.g_idx = Some((0..128).map(|i| (i % 4) as u32).collect());
        Model {
            q4: simple_layer(64, 128, 4, 32, true),
            q8: simple_layer(64, 128, 8, 64, false),
            qa,
            qc: simple_layer(64, 172, 4, 172, true),
            dense: Matrix::zeros(64, 64),
        }
    }

    fn layers(m: &Model) -> Vec<(String, LayerRef<'_>)> {
        vec![
            ("model.layers.0.self_attn.q_proj".into(), LayerRef::Quantized(&m.q4)),
            ("model.layers.0.self_attn.k_proj".into(), LayerRef::Quantized(&m.q4)),
            ("model.layers.0.self_attn.v_proj".into(), LayerRef::Quantized(&m.q4)),
            ("model.layers.0.mlp.up_proj".into(), LayerRef::Quantized(&m.q8)),
            ("model.layers.0.mlp.gate_proj".into(), LayerRef::Quantized(&m.qa)),
            ("model.layers.0.mlp.down_proj".into(), LayerRef::Quantized(&m.qc)),
            ("model.layers.1.self_attn.o_proj".into(), LayerRef::Dense(&m.dense)),
            // a module whose name is a prefix of another: exact anchors must keep them apart
            ("model.layers.1.self_attn.q_proj".into(), LayerRef::Quantized(&m.q8)),
            ("model.layers.1.self_attn.q_proj2".into(), LayerRef::Quantized(&m.q4)),
        ]
    }

    fn expected(l: &LayerRef<'_>, wrap: fn(QuantParams) -> ModuleScheme) -> ModuleScheme {
        match l {
            LayerRef::Quantized(q) => wrap(QuantParams::of(q)),
            LayerRef::Dense(_) => ModuleScheme::Dense,
            LayerRef::Sparse24(_) => ModuleScheme::Sparse24Bitmask,
        }
    }

    #[test]
    fn gptq_config_round_trips_through_the_parser() {
        let m = model();
        let ls = layers(&m);
        let qc = gptq_quantization_config(&ls, &GptqConfigOptions::default()).unwrap();
        assert_eq!(qc["quant_method"], "gptq");
        assert_eq!(qc["bits"], 4);
        assert_eq!(qc["group_size"], 32);
        assert_eq!(qc["sym"], true);
        assert_eq!(qc["desc_act"], false);
        assert_eq!(qc["checkpoint_format"], "gptq");
        assert_eq!(qc["static_groups"], false);
        assert_eq!(qc["true_sequential"], true);
        assert_eq!(qc["damp_percent"], 0.01);
        let dynamic = qc["dynamic"].as_object().unwrap();
        assert_eq!(dynamic["-:^model\\.layers\\.1\\.self_attn\\.o_proj$"], json!({}));
        assert_eq!(
            dynamic["+:^model\\.layers\\.0\\.mlp\\.up_proj$"],
            json!({"bits": 8, "group_size": 64, "sym": false, "desc_act": false})
        );
        assert_eq!(dynamic["+:^model\\.layers\\.0\\.mlp\\.down_proj$"]["group_size"], -1);
        assert_eq!(dynamic["+:^model\\.layers\\.0\\.mlp\\.gate_proj$"]["desc_act"], true);
        assert_eq!(dynamic.len(), 5, "{dynamic:#?}");

        let parsed = parse(&wrap(&qc));
        assert_eq!(parsed.quant_method(), "gptq");
        for (name, l) in &ls {
            assert_eq!(parsed.scheme_for(name), expected(l, ModuleScheme::Gptq), "{name}");
        }
        assert_eq!(parsed.scheme_for("lm_head"), ModuleScheme::Dense);
        // quantize_config.json (bare object with quant_method) parses the same way.
        let file = gptq_quantize_config_file(&qc);
        assert!(file["meta"]["quantizer"][0].as_str().unwrap().starts_with("whittle:"));
        let bare = parse(&file.to_string());
        assert_eq!(bare.scheme_for("model.layers.0.mlp.up_proj"), expected(&ls[3].1, ModuleScheme::Gptq));
    }

    #[test]
    fn compressed_tensors_config_round_trips_through_the_parser() {
        let m = model();
        let ls = layers(&m);
        let qc = compressed_tensors_quantization_config(&ls).unwrap();
        assert_eq!(qc["quant_method"], "compressed-tensors");
        assert_eq!(qc["format"], "pack-quantized");
        assert_eq!(qc["quantization_status"], "compressed");
        let groups = qc["config_groups"].as_object().unwrap();
        // (4, g32, sym), (8, g64, asym), (4, g32, sym, act-order), (4, channel, sym)
        assert_eq!(groups.len(), 4);
        assert_eq!(
            groups["group_0"]["targets"],
            json!([
                "re:^model\\.layers\\.0\\.self_attn\\.q_proj$",
                "re:^model\\.layers\\.0\\.self_attn\\.k_proj$",
                "re:^model\\.layers\\.0\\.self_attn\\.v_proj$",
                "re:^model\\.layers\\.1\\.self_attn\\.q_proj2$"
            ])
        );
        assert_eq!(groups["group_0"]["weights"]["strategy"], "group");
        assert_eq!(groups["group_0"]["weights"]["group_size"], 32);
        assert_eq!(groups["group_2"]["weights"]["actorder"], "group");
        assert_eq!(groups["group_3"]["weights"]["strategy"], "channel");
        assert_eq!(groups["group_3"]["weights"]["group_size"], Value::Null);
        assert_eq!(groups["group_1"]["weights"]["symmetric"], false);
        assert_eq!(qc["ignore"], json!(["model.layers.1.self_attn.o_proj", "lm_head"]));
        assert!(qc.get("sparsity_config").is_none());

        let parsed = parse(&wrap(&qc));
        assert_eq!(parsed.quant_method(), "compressed-tensors");
        for (name, l) in &ls {
            assert_eq!(parsed.scheme_for(name), expected(l, ModuleScheme::PackQuantized), "{name}");
        }
        assert_eq!(parsed.scheme_for("lm_head"), ModuleScheme::Dense);
    }

    #[test]
    fn sparse_configs_say_what_compressed_tensors_loads() {
        let mut q = simple_layer(8, 8, 4, 8, true);
        q.mask = Some((0..64).map(|k| k % 4 < 2).collect());
        let w = Matrix::from_vec(1, 4, vec![1., 0., 2., 0.]);
        // 2:4 + int: pack-quantized, with a "dense" sparsity_config as metadata.
        let qc = compressed_tensors_quantization_config(&[("a".into(), LayerRef::Quantized(&q))]).unwrap();
        assert_eq!(qc["sparsity_config"]["format"], "dense");
        assert_eq!(qc["sparsity_config"]["sparsity_structure"], "2:4");
        assert_eq!(qc["sparsity_config"]["targets"], json!(["re:^a$"]));
        assert_eq!(qc["sparsity_config"]["global_sparsity"], 0.5);
        assert!(matches!(parse(&wrap(&qc)).scheme_for("a"), ModuleScheme::PackQuantized(_)));
        // Sparse-only: format dense + sparse-24-bitmask sparsity_config.
        let qc = compressed_tensors_quantization_config(&[("b".into(), LayerRef::Sparse24(&w))]).unwrap();
        assert_eq!(qc["format"], "dense");
        assert_eq!(qc["sparsity_config"]["format"], "sparse-24-bitmask");
        let parsed = parse(&wrap(&qc));
        assert_eq!(parsed.scheme_for("b"), ModuleScheme::Sparse24Bitmask);
        assert_eq!(parsed.scheme_for("c"), ModuleScheme::Dense);
    }

    #[test]
    fn gptq_dynamic_rules_apply_in_document_order_with_python_match_semantics() {
        // "-:" for layer 3 comes first in the document, so it wins over the broader "+:" after it, although
        // sorted keys would put "+:" first. Plain keys (no prefix) are overrides; re.match anchors only at the start.
        let text = r#"{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true,
            "sym": true, "lm_head": true,
            "dynamic": {
                "-:.*layers\\.3\\.": {},
                "+:.*layers\\.[0-9]+\\.mlp\\.": {"bits": 8},
                "self_attn": {"group_size": -1, "sym": false},
                ".*o_proj": {"group_size": 64}
            }}}"#;
        let c = parse(text);
        let base = QuantParams { bits: 4, group_size: Some(128), sym: true, act_order: true };
        assert_eq!(c.scheme_for("model.layers.3.mlp.up_proj"), ModuleScheme::Dense);
        assert_eq!(c.scheme_for("model.layers.2.mlp.up_proj"), ModuleScheme::Gptq(QuantParams { bits: 8, ..base }));
        // "self_attn" must match at the start, so it does not match "model.layers…".
        assert_eq!(
            c.scheme_for("self_attn.q_proj"),
            ModuleScheme::Gptq(QuantParams { group_size: None, sym: false, ..base })
        );
        assert_eq!(c.scheme_for("model.layers.2.self_attn.q_proj"), ModuleScheme::Gptq(base));
        assert_eq!(
            c.scheme_for("model.layers.2.self_attn.o_proj"),
            ModuleScheme::Gptq(QuantParams { group_size: Some(64), ..base })
        );
        assert_eq!(c.scheme_for("lm_head"), ModuleScheme::Gptq(base));
    }

    #[test]
    fn ct_targets_match_names_regexes_then_class_and_honour_ignore() {
        let text = r#"{"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {
                "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": true,
                            "strategy": "group", "group_size": 128}},
                "group_1": {"targets": ["re:.*down_proj", "model.layers.0.self_attn.o_proj"],
                            "weights": {"num_bits": 8, "symmetric": false, "strategy": "channel", "actorder": null}}
            },
            "ignore": ["lm_head", "re:.*layers\\.5\\..*"]}}"#;
        let c = parse(text);
        let g4 = QuantParams { bits: 4, group_size: Some(128), sym: true, act_order: false };
        let c8 = QuantParams { bits: 8, group_size: None, sym: false, act_order: false };
        assert_eq!(c.scheme_for("model.layers.0.mlp.up_proj"), ModuleScheme::PackQuantized(g4));
        // name/regex targets beat the class target even though group_0 comes first
        assert_eq!(c.scheme_for("model.layers.0.mlp.down_proj"), ModuleScheme::PackQuantized(c8));
        assert_eq!(c.scheme_for("model.layers.0.self_attn.o_proj"), ModuleScheme::PackQuantized(c8));
        assert_eq!(c.scheme_for("model.layers.5.mlp.down_proj"), ModuleScheme::Dense);
        assert_eq!(c.scheme_for("lm_head"), ModuleScheme::Dense);
    }

    #[test]
    fn malformed_configs_name_the_field() {
        assert!(err("{not json").starts_with("quantization_config field `(config.json)`: not valid JSON"));
        assert!(parse_quantization_config(r#"{"hidden_size": 8}"#).unwrap().is_none());
        assert_eq!(
            err(r#"{"quantization_config": {"quant_method": "awq", "bits": 4}}"#),
            "quantization_config field `quantization_config.quant_method`: \"awq\" is not supported; whittle imports \"gptq\" and \"compressed-tensors\""
        );
        assert_eq!(
            err(r#"{"quantization_config": {"quant_method": "gptq", "group_size": 128}}"#),
            "quantization_config field `quantization_config.bits`: missing"
        );
        assert!(err(r#"{"quantization_config": {"quant_method": "gptq", "bits": "4", "group_size": 128}}"#)
            .contains("`quantization_config.bits`: expected an integer, found the string \"4\""));
        assert!(err(r#"{"quantization_config": {"quant_method": "gptq", "bits": 5, "group_size": 128}}"#)
            .contains("5 is not a GPTQ bit width"));
        assert!(err(r#"{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 0}}"#)
            .contains("`quantization_config.group_size`: 0 is not a group size"));
        assert!(err(r#"{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}}"#)
            .contains("`quantization_config.checkpoint_format`"));
        assert!(err(r#"{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"+:(?=x)": {}}}}"#)
            .contains("`quantization_config.dynamic[\"+:(?=x)\"]`: regex"));
        assert!(err(r#"{"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"+:x": {"bits": 6}}}}"#)
            .contains("`quantization_config.dynamic[\"+:x\"].bits`: 6 is not a GPTQ bit width"));
        let ct = |groups: &str| {
            format!(
                r#"{{"quantization_config": {{"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {groups}}}}}"#
            )
        };
        assert!(err(&ct(r#"{"group_0": {"targets": ["Linear"]}}"#))
            .contains("`quantization_config.config_groups.group_0.weights`: missing"));
        assert!(err(&ct(r#"{"group_0": {"targets": ["Linear"], "weights": {"type": "int"}}}"#))
            .contains("`quantization_config.config_groups.group_0.weights.num_bits`: missing"));
        assert!(err(&ct(r#"{"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group"}}}"#))
            .contains("weights.group_size`: missing; strategy \"group\" needs it"));
        assert!(err(&ct(r#"{"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}"#))
            .contains("weights.type`"));
        assert!(err(&ct(r#"{"group_0": {"targets": ["Linear"], "format": "marlin-24", "weights": {"num_bits": 4, "strategy": "channel"}}}"#))
            .contains("group_0.format`: \"marlin-24\" is not supported"));
        assert!(err(&ct(r#"{"group_0": {"targets": [], "weights": {"num_bits": 4, "strategy": "channel"}}}"#))
            .contains("group_0.targets`: missing or empty"));
        assert!(err(&ct(r#"{"group_0": {"targets": ["Linear"], "input_activations": {"num_bits": 8}, "weights": {"num_bits": 8, "strategy": "channel"}}}"#))
            .contains("input_activations`: activation quantization is not supported"));
    }
}
