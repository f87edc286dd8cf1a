//! Plans: which compression each linear module gets. A plan is an ordered list of rules; each rule selects modules
//! by a glob (`*.mlp.*`) or a regex (`re:^model\.layers\.[0-3]\.`) on the module name and sets some fields; later
//! rules override earlier ones field by field, so "everything w4g128, but down_proj w8" is two rules.
//! Plans are TOML (the files in `presets/`) or JSON. Resolving a plan against a model checks every rule and job
//! before any work starts and computes the average bits/weight and the size the compressed model will have.

use crate::compress::{validate, LayerJob, Method, QuantSpec, Sparsity};
use crate::error::{Result, WhittleError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One rule of a plan. Unset fields leave what earlier rules said.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Glob on module names (`*` matches anything, dots included), or `re:` + a regex.
    pub modules: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// Columns per group; -1 means one group per output row (per-channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sym: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_order: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_groups: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mse: Option<bool>,
    /// Unstructured sparsity fraction in [0, 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f32>,
    /// Structured N:M sparsity, e.g. "2:4" (N zeros in every M).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nm: Option<String>,
    /// Leave the module uncompressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_dense: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damp: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Error feedback across layers for GPTQ/SparseGPT/OBC (default on; see `compress::error_feedback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_feedback: Option<bool>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A module's resolved setting: a job, or dense.
#[derive(Clone, Debug, PartialEq)]
pub struct ModulePlan {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub job: Option<LayerJob>,
    /// Stored bits per weight this setting gives.
    pub bits_per_weight: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedPlan {
    pub modules: Vec<ModulePlan>,
    /// Parameter-weighted average stored bits/weight over the linear modules.
    pub avg_bits: f64,
    /// Bytes of the whole model after compression (linears as planned, everything else at `dense_bits`).
    pub size_bytes: u64,
    /// Bytes of the linear modules alone.
    pub linear_bytes: u64,
    /// Compress Hessian-based layers toward the dense model's outputs (see `compress::error_feedback`).
    pub error_feedback: bool,
}

/// Parses "N:M".
pub fn parse_nm(s: &str) -> std::result::Result<(usize, usize), String> {
    let (n, m) = s.split_once(':').ok_or_else(|| format!("`{s}` is not N:M (e.g. \"2:4\")"))?;
    let n = n.trim().parse().map_err(|_| format!("`{s}`: N is not a number"))?;
    let m = m.trim().parse().map_err(|_| format!("`{s}`: M is not a number"))?;
    Ok((n, m))
}

/// Matches module names against a rule's pattern.
pub enum Matcher {
    Glob(globset::GlobMatcher),
    Regex(regex::Regex),
}

impl Matcher {
    pub fn new(pattern: &str) -> std::result::Result<Self, String> {
        if let Some(re) = pattern.strip_prefix("re:") {
            regex::Regex::new(re).map(Matcher::Regex).map_err(|e| format!("bad regex `{re}`: {e}"))
        } else {
            globset::GlobBuilder::new(pattern)
                .literal_separator(false)
                .build()
                .map(|g| Matcher::Glob(g.compile_matcher()))
                .map_err(|e| format!("bad glob `{pattern}`: {e}"))
        }
    }
    pub fn is_match(&self, name: &str) -> bool {
        match self {
            Matcher::Glob(g) => g.is_match(name),
            Matcher::Regex(r) => r.is_match(name),
        }
    }
}

/// The fields a module has accumulated from the rules that match it.
#[derive(Default)]
struct Acc {
    method: Option<Method>,
    bits: Option<u8>,
    group: Option<i64>,
    sym: Option<bool>,
    act_order: Option<bool>,
    static_groups: Option<bool>,
    mse: Option<bool>,
    sparsity: Option<f32>,
    nm: Option<String>,
    keep_dense: Option<bool>,
    damp: Option<f64>,
}

impl Acc {
    fn apply(&mut self, r: &Rule) {
        macro_rules! take {
            ($($f:ident),*) => { $( if r.$f.is_some() { self.$f = r.$f.clone(); } )* };
        }
        take!(method, bits, group, sym, act_order, static_groups, mse, sparsity, nm, keep_dense, damp);
    }
}

/// Bits per weight a job stores for a `rows × cols` layer, with `dense_bits` for float values
/// (quantized: codes + an f16 scale and a `bits`-wide zero per group; N:M: the kept values plus a 1-bit mask;
/// unstructured sparsity is stored dense with zeros, as the exports do).
pub fn job_bits(job: Option<&LayerJob>, rows: usize, cols: usize, dense_bits: f64) -> f64 {
    let Some(job) = job else { return dense_bits };
    let (value_bits, per_group) = match &job.quant {
        Some(q) => {
            let g = q.group_size(cols);
            let groups = rows * cols.div_ceil(g);
            (q.bits as f64, groups as f64 * (16.0 + q.bits as f64) / (rows * cols) as f64)
        }
        None => (dense_bits, 0.0),
    };
    match job.sparsity {
        Some(Sparsity::NM { n, m }) => value_bits * (m - n) as f64 / m as f64 + 1.0 + per_group,
        _ => value_bits + per_group,
    }
}

impl Plan {
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| WhittleError::file(origin, format!("invalid plan: {e}")))
    }

    /// Reads a plan from a `.toml` or `.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| WhittleError::io(path, e))?;
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| WhittleError::file(path, format!("invalid plan: {e}")))
        } else {
            Self::from_toml_str(&text, path)
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("plans serialize to TOML")
    }

    /// Writes the plan as TOML to `path` through a temporary file, so a reader (or a crash) never sees half a plan.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::export::atomic::write_atomic_file(path, self.to_toml().as_bytes())
    }

    /// One rule for every module.
    pub fn uniform(rule: Rule) -> Self {
        Plan { rules: vec![Rule { modules: "*".into(), ..rule }], ..Default::default() }
    }

    /// Resolves the plan for a model's linears `(name, rows, cols)`; `other_params` are the parameters outside
    /// those linears (embeddings, norms, head), counted at `dense_bits`. Every error names the rule or module.
    pub fn resolve(&self, linears: &[(String, usize, usize)], other_params: u64, dense_bits: f64) -> Result<ResolvedPlan> {
        let bad = |msg: String| WhittleError::Invalid(format!("plan{}: {msg}", self.name.as_deref().map(|n| format!(" `{n}`")).unwrap_or_default()));
        if self.rules.is_empty() {
            return Err(bad("has no rules, so it names no module".into()));
        }
        let mut matchers = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let m = Matcher::new(&r.modules).map_err(|e| bad(format!("rule {} : {e}", i + 1)))?;
            if !linears.iter().any(|(n, _, _)| m.is_match(n)) {
                return Err(bad(format!("rule {} (modules = \"{}\") matches no linear module of this model", i + 1, r.modules)));
            }
            if let Some(b) = r.bits {
                if !(2..=8).contains(&b) {
                    return Err(bad(format!("rule {} (modules = \"{}\"): bits must be 2..8, found {b}", i + 1, r.modules)));
                }
            }
            if let Some(g) = r.group {
                if g == 0 || g < -1 {
                    return Err(bad(format!("rule {} (modules = \"{}\"): group must be ≥ 1 or -1 (per-channel), found {g}", i + 1, r.modules)));
                }
            }
            if let Some(s) = r.sparsity {
                if !(s.is_finite() && (0.0..1.0).contains(&s)) {
                    return Err(bad(format!("rule {} (modules = \"{}\"): sparsity must be in [0, 1), found {s}", i + 1, r.modules)));
                }
            }
            if let Some(nm) = &r.nm {
                let (n, m) = parse_nm(nm).map_err(|e| bad(format!("rule {}: nm {e}", i + 1)))?;
                if n == 0 || n >= m {
                    return Err(bad(format!("rule {} (modules = \"{}\"): nm = \"{nm}\" needs 0 < N < M", i + 1, r.modules)));
                }
            }
            matchers.push(m);
        }
        let mut modules = Vec::with_capacity(linears.len());
        for (name, rows, cols) in linears {
            let mut acc = Acc::default();
            for (r, m) in self.rules.iter().zip(&matchers) {
                if m.is_match(name) {
                    acc.apply(r);
                }
            }
            let job = build_job(acc).map_err(|e| bad(format!("module {name}: {e}")))?;
            if let Some(j) = &job {
                validate(j).map_err(|e| bad(format!("module {name}: {e}")))?;
            }
            let bpw = job_bits(job.as_ref(), *rows, *cols, dense_bits);
            modules.push(ModulePlan { name: name.clone(), rows: *rows, cols: *cols, job, bits_per_weight: bpw });
        }
        let params: f64 = modules.iter().map(|m| (m.rows * m.cols) as f64).sum();
        let bits: f64 = modules.iter().map(|m| m.bits_per_weight * (m.rows * m.cols) as f64).sum();
        let linear_bytes = (bits / 8.0).ceil() as u64;
        Ok(ResolvedPlan {
            modules,
            avg_bits: if params > 0.0 { bits / params } else { dense_bits },
            size_bytes: linear_bytes + (other_params as f64 * dense_bits / 8.0) as u64,
            linear_bytes,
            error_feedback: self.error_feedback.unwrap_or(true),
        })
    }
}

fn build_job(acc: Acc) -> std::result::Result<Option<LayerJob>, String> {
    if acc.keep_dense == Some(true) {
        return Ok(None);
    }
    let quant = acc.bits.map(|bits| QuantSpec {
        bits,
        group: match acc.group {
            None | Some(-1) => None,
            Some(g) => Some(g as usize),
        },
        sym: acc.sym.unwrap_or(true),
        act_order: acc.act_order.unwrap_or(false),
        static_groups: acc.static_groups.unwrap_or(false),
        mse: acc.mse.unwrap_or(false),
    });
    let sparsity = match (&acc.nm, acc.sparsity) {
        (Some(_), Some(_)) => return Err("set either `nm` or `sparsity`, not both".into()),
        (Some(nm), None) => {
            let (n, m) = parse_nm(nm)?;
            Some(Sparsity::NM { n, m })
        }
        (None, Some(s)) if s > 0.0 => Some(Sparsity::Unstructured(s)),
        _ => None,
    };
    if quant.is_none() && sparsity.is_none() {
        return if acc.method.is_some() {
            Err("a method is set but neither bits nor sparsity".into())
        } else {
            Ok(None)
        };
    }
    let method = acc.method.unwrap_or(if sparsity.is_some() { Method::SparseGpt } else { Method::Gptq });
    let mut job = LayerJob::new(method, quant, sparsity);
    if let Some(d) = acc.damp {
        job.damp = d;
    }
    Ok(Some(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linears() -> Vec<(String, usize, usize)> {
        let mut v = Vec::new();
        for l in 0..2 {
            for (k, r, c) in [("self_attn.q_proj", 64, 64), ("mlp.down_proj", 64, 172)] {
                v.push((format!("model.layers.{l}.{k}"), r, c));
            }
        }
        v
    }

    fn plan(toml: &str) -> Result<ResolvedPlan> {
        Plan::from_toml_str(toml, Path::new("test.toml"))?.resolve(&linears(), 0, 16.0)
    }

    #[test]
    fn later_rules_override_field_by_field() {
        let p = plan("[[rules]]\nmodules = \"*\"\nbits = 4\ngroup = 32\n[[rules]]\nmodules = \"*.down_proj\"\nbits = 8\n").unwrap();
        let down = p.modules.iter().find(|m| m.name.ends_with("0.mlp.down_proj")).unwrap();
        let q = down.job.as_ref().unwrap().quant.as_ref().unwrap();
        assert_eq!((q.bits, q.group), (8, Some(32)));
        assert_eq!(down.job.as_ref().unwrap().method, Method::Gptq);
    }

    #[test]
    fn avg_bits_counts_scales_and_zeros() {
        let p = plan("[[rules]]\nmodules = \"*\"\nbits = 4\ngroup = 32\n").unwrap();
        // q_proj 64x64: 2 groups per row; down 64x172: 6 groups per row (ragged last).
        let expect = (2.0 * (64.0 * 64.0 * 4.0 + 64.0 * 2.0 * 20.0) + 2.0 * (64.0 * 172.0 * 4.0 + 64.0 * 6.0 * 20.0))
            / (2.0 * (64.0 * 64.0 + 64.0 * 172.0));
        assert!((p.avg_bits - expect).abs() < 1e-12, "{} vs {expect}", p.avg_bits);
    }

    #[test]
    fn regex_and_keep_dense() {
        let p = plan("[[rules]]\nmodules = \"*\"\nbits = 3\n[[rules]]\nmodules = 're:layers\\.1\\.'\nkeep_dense = true\n").unwrap();
        assert!(p.modules.iter().filter(|m| m.name.contains("layers.1.")).all(|m| m.job.is_none()));
        assert!(p.modules.iter().filter(|m| m.name.contains("layers.0.")).all(|m| m.job.is_some()));
    }

    #[test]
    fn bad_plans_are_rejected_with_the_rule() {
        let cases = [
            ("[[rules]]\nmodules = \"nothing.*\"\nbits = 4\n", "matches no linear module"),
            ("[[rules]]\nmodules = \"*\"\nbits = 1\n", "bits must be 2..8"),
            ("[[rules]]\nmodules = \"*\"\nbits = 9\n", "bits must be 2..8"),
            ("[[rules]]\nmodules = \"*\"\nbits = 4\ngroup = 0\n", "group must be"),
            ("[[rules]]\nmodules = \"*\"\nsparsity = 1.0\n", "sparsity must be in [0, 1)"),
            ("[[rules]]\nmodules = \"*\"\nnm = \"4:2\"\n", "needs 0 < N < M"),
            ("rules = []\n", "names no module"),
            ("[[rules]]\nmodules = \"*\"\nbitz = 4\n", "unknown field"),
        ];
        for (text, want) in cases {
            let err = plan(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn presets_parse_and_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let plan = Plan::from_file(&p).unwrap();
            let r = plan.resolve(&linears(), 0, 16.0).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(r.avg_bits <= 16.0, "{}", p.display());
            assert!(r.modules.iter().all(|m| m.job.is_some()), "{}: every preset compresses every linear", p.display());
            n += 1;
        }
        assert!(n >= 7);
    }

    #[test]
    fn toml_round_trip() {
        let p = Plan::from_toml_str("name = \"x\"\n[[rules]]\nmodules = \"*\"\nbits = 4\nnm = \"2:4\"\n", Path::new("t")).unwrap();
        assert_eq!(Plan::from_toml_str(&p.to_toml(), Path::new("t")).unwrap(), p);
    }
}
