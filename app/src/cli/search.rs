//! `whittle search`: pick a compression level per linear (or block) under a budget with the EvoPress search, and
//! write the best allocation as a plan that `whittle eval/compress/export --plan` accept. The plan file is
//! rewritten after every improvement, so it always holds the best allocation found so far.

use super::plan_args::CalibArgs;
use super::progress;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use whittle_core::eval::read_text;
use whittle_core::model::source::DEFAULT_CALIBRATION_TEXT;
use whittle_core::plan::Plan;
use whittle_core::search::cache::default_cache_root;
use whittle_core::search::{
    run_search, Accounting, Budget, EvoSettings, Granularity, GridArgs, Ladder, LevelsCalibration, Scored, SearchControl, SearchEvent,
    SearchOutcome, SearchSettings, SearchSpace, Stage,
};

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Model folder or Hub id (default: the embedded stories260k).
    #[arg(long)]
    pub model: Option<String>,
    /// Ladder: gptq:2,3,4,5,6 | rtn:… (bits), sparsegpt:0,10,…,70 | magnitude:… (percent), sparsegpt:0,25,50@4
    /// (sparsity with the kept weights quantized to 4 bits).
    #[arg(long)]
    pub levels: String,
    /// Group size of quantized levels; -1 = per output channel.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub group: i64,
    /// Asymmetric grid (zero point per group) instead of symmetric.
    #[arg(long)]
    pub asym: bool,
    /// GPTQ act-order (quantize the most important inputs first).
    #[arg(long)]
    pub act_order: bool,
    /// MSE-clipped grids.
    #[arg(long)]
    pub mse: bool,
    /// Dampening as a fraction of mean diag(H) (default 0.01).
    #[arg(long)]
    pub damp: Option<f64>,
    /// Budget: average bits per weight over the linears.
    #[arg(long, conflicts_with_all = ["target_bytes", "target_sparsity"])]
    pub target_bits: Option<f64>,
    /// Budget: size of the whole model, e.g. 450000, 450KB, 1.2MB, 2GiB.
    #[arg(long, conflicts_with = "target_sparsity")]
    pub target_bytes: Option<String>,
    /// Budget: average fraction of zero weights, e.g. 0.5.
    #[arg(long)]
    pub target_sparsity: Option<f64>,
    /// How --target-bits counts: `code` (level bits only, as papers state "3 bits") or `stored` (plus scales and
    /// zero points, the avg_bits that plans report).
    #[arg(long, default_value = "code")]
    pub accounting: Accounting,
    /// What gets one level: `linear` or `block`.
    #[arg(long, default_value = "linear")]
    pub unit: Granularity,
    #[arg(long, default_value_t = 100)]
    pub generations: usize,
    /// Children per generation (λ).
    #[arg(long, default_value_t = 16)]
    pub offspring: usize,
    /// Level swaps per child: 1..=N, uniformly.
    #[arg(long, default_value_t = 3)]
    pub max_swaps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Selection stages WINDOWS:SURVIVORS, growing windows and shrinking survivors, ending with 1 survivor. A last
    /// stage covering the whole pool keeps the parent's score instead of recomputing it.
    #[arg(long, default_value = "2:4,8:1,32:1")]
    pub selection: String,
    /// Windows in the fitness pool (taken from the calibration text).
    #[arg(long, default_value_t = 32)]
    pub fitness_windows: usize,
    /// Tokens per fitness window (attention dominates the forward pass of small models: shorter is faster).
    #[arg(long, default_value_t = 128)]
    pub fitness_ctx: usize,
    /// Levels database: `dense` (every linear on the dense model's inputs) or `sequential` (rounds calibrated like
    /// `compress --plan` along the start, then along the best allocation so far).
    #[arg(long, default_value = "dense")]
    pub levels_calib: LevelsCalibration,
    /// Database calibrations of a sequential search: the levels are recalibrated along the best allocation
    /// between rounds, and the generations split over them.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Start from this plan (every linear on a ladder level) instead of the near-uniform allocation.
    #[arg(long)]
    pub start: Option<PathBuf>,
    /// Root folder of the levels-database cache (default: ~/.cache/whittle/levels).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Keep the levels database in memory only.
    #[arg(long, conflicts_with = "cache")]
    pub no_cache: bool,
    /// Where to write the searched plan (TOML).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the uniform baseline's plan here.
    #[arg(long)]
    pub uniform_out: Option<PathBuf>,
    /// Also write the DP baseline's plan here.
    #[arg(long)]
    pub dp_out: Option<PathBuf>,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Print a JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// "2:4,16:1" → stages.
pub(crate) fn parse_selection(s: &str) -> Result<Vec<Stage>> {
    s.split(',')
        .map(|part| {
            let (w, k) = part
                .trim()
                .split_once(':')
                .ok_or_else(|| anyhow!("--selection `{part}`: expected WINDOWS:SURVIVORS, e.g. 2:4"))?;
            let windows = w.trim().parse().map_err(|_| anyhow!("--selection `{part}`: `{w}` is not a number"))?;
            let survivors = k.trim().parse().map_err(|_| anyhow!("--selection `{part}`: `{k}` is not a number"))?;
            Ok(Stage { windows, survivors })
        })
        .collect()
}

/// "450000", "450KB", "1.2MB", "2GiB" → bytes.
fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("--target-bytes {s}: unknown unit `{unit}` (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let v: f64 = num.trim().parse().map_err(|_| anyhow!("--target-bytes {s}: `{num}` is not a number"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("--target-bytes {s}: must be a positive size");
    }
    Ok((v * mult).round() as u64)
}

impl SearchArgs {
    fn budget(&self) -> Result<Budget> {
        match (self.target_bits, &self.target_bytes, self.target_sparsity) {
            (Some(bits), None, None) => Ok(Budget::AvgBits { bits, accounting: self.accounting }),
            (None, Some(b), None) => Ok(Budget::TotalBytes { bytes: parse_bytes(b)? }),
            (None, None, Some(sparsity)) => Ok(Budget::AvgSparsity { sparsity }),
            _ => bail!("give one budget: --target-bits, --target-bytes or --target-sparsity"),
        }
    }

    fn settings(&self) -> Result<SearchSettings> {
        let group = match self.group {
            -1 => None,
            g if g >= 1 => Some(g as usize),
            g => bail!("--group {g}: must be ≥ 1, or -1 for per-channel"),
        };
        let grid = GridArgs { group, sym: !self.asym, act_order: self.act_order, mse: self.mse, damp: self.damp };
        let ladder = Ladder::parse(&self.levels, &grid).map_err(|e| anyhow!("--{e}"))?;
        let start = self.start.as_deref().map(Plan::from_file).transpose()?;
        Ok(SearchSettings {
            ladder,
            granularity: self.unit,
            budget: self.budget()?,
            calib: whittle_core::calib::CalibSettings { samples: self.calib.calib_samples, ctx: self.calib.calib_ctx },
            levels_calibration: self.levels_calib,
            rounds: self.rounds,
            fitness_windows: self.fitness_windows,
            fitness_ctx: self.fitness_ctx,
            evo: EvoSettings {
                generations: self.generations,
                offspring: self.offspring,
                max_swaps: self.max_swaps,
                seed: self.seed,
                stages: parse_selection(&self.selection)?,
            },
            cache_dir: if self.no_cache { None } else { Some(self.cache.clone().unwrap_or_else(default_cache_root)) },
            start,
        })
    }
}

fn scored_json(space: &SearchSpace, s: &Scored, plan: &Plan) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "avg_bits": space.code_bits(&s.levels),
        "stored_bits": space.resolve(plan)?.avg_bits,
        "sparsity": space.sparsity(&s.levels),
        "measure": s.measure,
        "fitness": s.fitness,
        "layer_error": s.layer_error,
        "levels": space.labels(&s.levels).into_iter().map(|(_, l)| l).collect::<Vec<_>>(),
    }))
}

fn print_allocation(space: &SearchSpace, s: &Scored) {
    let labels = space.labels(&s.levels);
    let mut line = String::new();
    let mut block = None;
    for (name, label) in labels {
        let (prefix, kind) = match name.match_indices('.').nth(2) {
            Some((i, _)) => (name[..i].to_string(), name[i + 1..].rsplit('.').next().unwrap_or("").to_string()),
            None => (name.clone(), String::new()),
        };
        if block.as_ref() != Some(&prefix) {
            if !line.is_empty() {
                println!("{line}");
            }
            line = format!("  {prefix:<18}");
            block = Some(prefix);
        }
        let kind = kind.trim_end_matches("_proj");
        line.push_str(&if kind.is_empty() { format!(" {label}") } else { format!(" {kind}:{label}") });
    }
    if !line.is_empty() {
        println!("{line}");
    }
}

fn report(a: &SearchArgs, out: &SearchOutcome) -> Result<()> {
    let space = &out.space;
    let plans = [("uniform", &out.uniform, out.uniform_plan()), ("dp", &out.dp, out.dp_plan()), ("evopress", &out.best, out.plan())];
    let gps = out.generations as f64 / out.search_seconds.max(1e-9);
    if a.json {
        let mut v = scored_json(space, &out.best, &plans[2].2)?;
        let extra = serde_json::json!({
            "generations": out.generations,
            "seconds": out.search_seconds,
            "total_seconds": out.total_seconds,
            "generations_per_second": gps,
            "evaluations": out.evaluations,
            "evaluations_per_second": out.evaluations as f64 / out.search_seconds.max(1e-9),
            "budget": space.costs.budget,
            "granularity": space.costs.granularity(),
            "levels_cached": out.levels_cached,
            "cancelled": out.cancelled,
            "plan": plans[2].2,
            "out": a.out.display().to_string(),
            "uniform": scored_json(space, &out.uniform, &plans[0].2)?,
            "dp": scored_json(space, &out.dp, &plans[1].2)?,
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        println!("{v}");
        return Ok(());
    }
    println!("{:<10} {:>9} {:>11} {:>9} {:>12} {:>13}", "", "avg bits", "stored bits", "sparsity", "KL (nats)", "Σ layer err");
    for (name, s, plan) in &plans {
        println!(
            "{name:<10} {:>9.4} {:>11.4} {:>9.4} {:>12.6} {:>13.4}",
            space.code_bits(&s.levels),
            space.resolve(plan)?.avg_bits,
            space.sparsity(&s.levels),
            s.fitness,
            s.layer_error
        );
    }
    println!("allocation:");
    print_allocation(space, &out.best);
    println!(
        "{} generations in {:.2} s ({gps:.2} generations/s, {:.1} evaluations/s){}; plan written to {}",
        out.generations,
        out.search_seconds,
        out.evaluations as f64 / out.search_seconds.max(1e-9),
        if out.cancelled { ", cancelled" } else { "" },
        a.out.display()
    );
    Ok(())
}

pub fn run(a: SearchArgs) -> Result<()> {
    let settings = a.settings()?;
    let m = super::load(a.model.as_deref())?;
    let (text, origin) = match &a.calib.calib {
        Some(p) => (read_text(p)?, p.display().to_string()),
        None => (DEFAULT_CALIBRATION_TEXT.to_string(), "assets/tinystories_train_calib.txt".to_string()),
    };
    let levels_bar = progress::bar(0, "levels");
    let gen_bar = progress::bar(settings.evo.generations as u64, "search");
    gen_bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    if a.json {
        levels_bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut space = None;
    let mut write_err = None;
    let out = run_search(&m, &text, &origin, &settings, &SearchControl::default(), &mut |e| match e {
        SearchEvent::Started(s) => {
            if !a.json {
                let c = &s.costs;
                eprintln!(
                    "search: {} units, ladder {}, target {} {}{}, start at {:.4} (granularity {:.4}); levels \
                     calibrated {}",
                    s.units.len(),
                    s.ladder.labels().join(","),
                    c.budget.target(),
                    c.budget.unit(),
                    match c.budget {
                        Budget::AvgBits { accounting: Accounting::Code, .. } => " (code bits: scales not counted)",
                        Budget::AvgBits { accounting: Accounting::Stored, .. } => " (stored bits incl. scales)",
                        _ => "",
                    },
                    c.measure_of(&s.start),
                    c.granularity(),
                    match settings.levels_calibration {
                        LevelsCalibration::Sequential => {
                            format!("along the start, then along the best ({} rounds)", settings.rounds)
                        }
                        LevelsCalibration::Dense => "on dense inputs".to_string(),
                    }
                );
            }
            space = Some(s);
        }
        SearchEvent::Levels { round, done, total } => {
            if done <= 1 && round > 1 && !a.json {
                levels_bar.reset();
                levels_bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            levels_bar.set_length(total as u64);
            levels_bar.set_position(done as u64);
        }
        SearchEvent::LevelsReady { round, cached, dir, seconds } => {
            levels_bar.finish_and_clear();
            if !a.json {
                gen_bar.suspend(|| {
                    let where_ = dir.map(|d| format!(" ({})", d.display())).unwrap_or_default();
                    let what = if cached { "loaded" } else { "built" };
                    eprintln!("round {round}: levels database {what} in {seconds:.2} s{where_}");
                });
            }
        }
        SearchEvent::Reference { windows, tokens, seconds } => {
            if !a.json {
                eprintln!("dense reference: {windows} windows, {tokens} tokens, {seconds:.2} s");
            }
        }
        SearchEvent::Baseline { name, scored } => {
            if !a.json {
                eprintln!("{name:<8} KL {:.6} at {:.4}", scored.fitness, scored.measure);
            }
            if name == "uniform" && !a.json {
                gen_bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
        }
        SearchEvent::Generation(g) => {
            gen_bar.set_position(g.generation as u64);
            gen_bar.set_message(format!("KL {:.6} · {:.1} eval/s", g.best_fitness, g.evaluations_per_second));
            if g.improved {
                if let Some(s) = &space {
                    let plan = s.plan(&g.levels, "evopress", &format!(
                        "EvoPress search in progress: generation {} of {}, KL {:.6}",
                        g.generation, g.generations, g.best_fitness
                    ));
                    if let Err(e) = plan.save(&a.out) {
                        write_err.get_or_insert(e);
                    }
                }
            }
        }
        SearchEvent::Paused | SearchEvent::Resumed => {}
    })
    .context("search failed")?;
    gen_bar.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e.into());
    }
    out.plan().save(&a.out)?;
    if let Some(p) = &a.uniform_out {
        out.uniform_plan().save(p)?;
    }
    if let Some(p) = &a.dp_out {
        out.dp_plan().save(p)?;
    }
    report(&a, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_stages_parse() {
        assert_eq!(parse_bytes("450000").unwrap(), 450_000);
        assert_eq!(parse_bytes("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_bytes("2KiB").unwrap(), 2048);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("-3").is_err());
        assert_eq!(parse_selection("2:4, 16:1").unwrap(), vec![Stage { windows: 2, survivors: 4 }, Stage { windows: 16, survivors: 1 }]);
        assert!(parse_selection("2-4").is_err());
    }
}
