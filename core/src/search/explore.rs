//! TEMPORARY exploration (removed before hand-off).
#![cfg(test)]

use super::*;
use crate::calib::{calibration_windows, CalibSettings};
use crate::eval::{evaluate, windows};
use crate::model::load_model;
use crate::model::source::DEFAULT_CALIBRATION_TEXT;
use std::path::Path;

#[test]
#[ignore]
fn explore_db_vs_sequential() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let m = load_model(&root.join("assets/stories260k")).unwrap();
    let ladder = Ladder::parse("gptq:2,3,4,5,6", &GridArgs { group: Some(32), sym: true }).unwrap();
    let hw = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &CalibSettings::default(), "c").unwrap();
    let store = cache::LevelsStore::new(
        Path::new("/tmp/wcache"),
        cache::CacheKey::levels(cache::model_identity(&m.dir).unwrap(), &hw, &ladder, serde_json::json!({"sequential": "w3", "error_feedback": true})),
    );
    let db = database::levels_database(&m.model, &hw, &ladder, Some(&vec![1; 35]), Some(&store), &|_, _| {}, &|| false).unwrap();
    let space = SearchSpace::new(
        &m.model,
        ladder.clone(),
        Granularity::Linear,
        &Budget::AvgBits { bits: 3.0, accounting: Accounting::Code },
        None,
    )
    .unwrap();
    let text = std::fs::read_to_string(root.join("../shared/data/tinystories_val.txt")).unwrap();
    let toks = m.tokenizer.encode(&text).unwrap();
    let wins = windows(&toks, 256, Some(20480));
    let plans: Vec<String> = std::env::var("EXPLORE_PLANS").unwrap_or_default().split(',').map(String::from).collect();
    for p in plans.iter().filter(|p| !p.is_empty()) {
        let plan = crate::plan::Plan::from_file(Path::new(p)).unwrap();
        let a = space.assignment_of(&plan).unwrap();
        let f = fitness::KlFitness { dense: &m.model, db: &db, units: &space.units, reference: &fitness::Reference::new(&m.model, vec![], &|| false).unwrap() };
        let cand = f.candidate(&a);
        let r = evaluate(&cand, Some(&m.model), &wins, &|_, _| {}, &|| false).unwrap();
        let mut seq = m.model.clone();
        let resolved = space.resolve(&plan).unwrap();
        crate::compress_model::compress_model(&mut seq, &resolved, &hw, &mut |_| {}, &|| false).unwrap();
        let s = evaluate(&seq, Some(&m.model), &wins, &|_, _| {}, &|| false).unwrap();
        println!("{p}: db ppl {:.4} kl {:.4} | seq ppl {:.4} kl {:.4}", r.ppl, r.kl.unwrap(), s.ppl, s.kl.unwrap());
    }
}

#[test]
#[ignore]
fn explore_sensitivity() {
    use crate::search::evolve::Fitness;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let m = load_model(&root.join("assets/stories260k")).unwrap();
    let ladder = Ladder::parse("gptq:2,3,4,5,6", &GridArgs { group: Some(32), sym: true }).unwrap();
    let hw = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &CalibSettings::default(), "c").unwrap();
    let cal: usize = std::env::var("CAL").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let store = cache::LevelsStore::new(
        Path::new("/tmp/wcache"),
        cache::CacheKey::levels(cache::model_identity(&m.dir).unwrap(), &hw, &ladder, serde_json::json!({"sequential": ladder.levels[cal].label, "error_feedback": true})),
    );
    let db = database::levels_database(&m.model, &hw, &ladder, Some(&vec![cal; 35]), Some(&store), &|_, _| {}, &|| false).unwrap();
    let fw = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &CalibSettings { samples: 64, ctx: 256 }, "c").unwrap();
    let reference = fitness::Reference::new(&m.model, fw, &|| false).unwrap();
    let space = SearchSpace::new(&m.model, ladder.clone(), Granularity::Linear, &Budget::AvgBits { bits: 3.0, accounting: Accounting::Code }, None).unwrap();
    let f = fitness::KlFitness { dense: &m.model, db: &db, units: &space.units, reference: &reference };
    let all: Vec<usize> = (0..64).collect();
    let base = vec![1usize; 35];
    let b = f.evaluate(&[&base], &all, &|| false).unwrap()[0];
    println!("base {b:.5}");
    let mut cands = Vec::new();
    for u in 0..35 {
        for l in [0usize, 2] {
            let mut a = base.clone();
            a[u] = l;
            cands.push(a);
        }
    }
    let refs: Vec<&[usize]> = cands.iter().map(|c| c.as_slice()).collect();
    let fits = f.evaluate(&refs, &all, &|| false).unwrap();
    for u in 0..35 {
        println!("{:<36} down {:+.5} up {:+.5}", space.units[u].name, fits[2 * u] - b, fits[2 * u + 1] - b);
    }
}

#[test]
#[ignore]
fn explore_proxy_fidelity() {
    use crate::search::evolve::Fitness;
    use rand::SeedableRng;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let m = load_model(&root.join("assets/stories260k")).unwrap();
    let ladder = Ladder::parse("gptq:2,3,4,5,6", &GridArgs { group: Some(32), sym: true }).unwrap();
    let hw = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &CalibSettings::default(), "c").unwrap();
    let target: f64 = std::env::var("TARGET").ok().and_then(|v| v.parse().ok()).unwrap_or(3.0);
    let space = SearchSpace::new(&m.model, ladder.clone(), Granularity::Linear, &Budget::AvgBits { bits: target, accounting: Accounting::Code }, None).unwrap();
    let cal = space.start.clone();
    let seq_store = cache::LevelsStore::new(
        Path::new("/tmp/wcache"),
        cache::CacheKey::levels(cache::model_identity(&m.dir).unwrap(), &hw, &ladder, serde_json::json!({"x": cal.clone()})),
    );
    let seq = database::levels_database(&m.model, &hw, &ladder, Some(&space.linear_levels(&cal)), Some(&seq_store), &|_, _| {}, &|| false).unwrap();
    let dense_store = cache::LevelsStore::new(
        Path::new("/tmp/wcache"),
        cache::CacheKey::levels(cache::model_identity(&m.dir).unwrap(), &hw, &ladder, serde_json::json!("dense")),
    );
    let dense = database::levels_database(&m.model, &hw, &ladder, None, Some(&dense_store), &|_, _| {}, &|| false).unwrap();
    let text = std::fs::read_to_string(root.join("../shared/data/tinystories_val.txt")).unwrap();
    let toks = m.tokenizer.encode(&text).unwrap();
    let vw: Vec<Vec<u32>> = windows(&toks, 256, Some(20480)).into_iter().map(|w| w.to_vec()).collect();
    let reference = fitness::Reference::new(&m.model, vw, &|| false).unwrap();
    let all: Vec<usize> = (0..reference.len()).collect();
    let fs = fitness::KlFitness { dense: &m.model, db: &seq, units: &space.units, reference: &reference };
    let fd = fitness::KlFitness { dense: &m.model, db: &dense, units: &space.units, reference: &reference };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut a = space.start.clone();
    println!("{:>6} {:>9} {:>9} {:>9}", "swaps", "seqDB", "denseDB", "real");
    for step in 0..10 {
        if step > 0 {
            for _ in 0..step.min(3) {
                mutation::level_swap(&mut a, &space.costs, &mut rng);
            }
        }
        let ks = fs.evaluate(&[&a], &all, &|| false).unwrap()[0];
        let kd = fd.evaluate(&[&a], &all, &|| false).unwrap()[0];
        let plan = space.plan(&a, "x", "x");
        let resolved = space.resolve(&plan).unwrap();
        let mut real = m.model.clone();
        crate::compress_model::compress_model(&mut real, &resolved, &hw, &mut |_| {}, &|| false).unwrap();
        let r = evaluate(&real, Some(&m.model), &windows(&toks, 256, Some(20480)), &|_, _| {}, &|| false).unwrap();
        println!("{step:>6} {ks:>9.5} {kd:>9.5} {:>9.5}  ppl {:.4}", r.kl.unwrap(), r.ppl);
    }
}

#[test]
#[ignore]
fn explore_swap_in_db_along_start() {
    use crate::search::evolve::Fitness;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let m = load_model(&root.join("assets/stories260k")).unwrap();
    let ladder = Ladder::parse("gptq:2,3,4,5,6", &GridArgs { group: Some(32), sym: true }).unwrap();
    let hw = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &CalibSettings::default(), "c").unwrap();
    let space = SearchSpace::new(&m.model, ladder.clone(), Granularity::Linear, &Budget::AvgBits { bits: 2.5, accounting: Accounting::Code }, None).unwrap();
    let along = space.linear_levels(&space.start);
    let calibration = serde_json::json!({
        "sequential_along": along.iter().map(|&l| ladder.levels[l].label.as_str()).collect::<Vec<_>>(),
        "error_feedback": true,
    });
    let store = cache::LevelsStore::new(Path::new("/tmp/wcache"), cache::CacheKey::levels(cache::model_identity(&m.dir).unwrap(), &hw, &ladder, calibration));
    let db = database::levels_database(&m.model, &hw, &ladder, Some(&along), Some(&store), &|_, _| {}, &|| false).unwrap();
    println!("cached {}", db.cached);
    let fw = calibration_windows(&m.tokenizer, DEFAULT_CALIBRATION_TEXT, &CalibSettings { samples: 16, ctx: 256 }, "c").unwrap();
    let reference = fitness::Reference::new(&m.model, fw, &|| false).unwrap();
    let f = fitness::KlFitness { dense: &m.model, db: &db, units: &space.units, reference: &reference };
    let all: Vec<usize> = (0..16).collect();
    let s = space.start.clone();
    let mut sw = s.clone();
    sw[1] = 0; // layer 0 k
    sw[8] = 1; // layer 1 k
    println!("start {:?}", s);
    let r = f.evaluate(&[&s, &sw], &all, &|| false).unwrap();
    println!("start {:.5} swapped {:.5}", r[0], r[1]);
    // Every single one-for-one swap from the start: how many improve?
    let mut better = 0;
    let mut total = 0;
    let mut cands = Vec::new();
    for a in 0..35 { for b in 0..35 {
        if a == b || s[a] == 0 || s[b] == 4 || space.units[a].params != space.units[b].params { continue; }
        let mut c = s.clone(); c[a] -= 1; c[b] += 1; cands.push(c);
    }}
    let refs: Vec<&[usize]> = cands.iter().map(|c| c.as_slice()).collect();
    let fits = f.evaluate(&refs, &all, &|| false).unwrap();
    for (c, fit) in cands.iter().zip(&fits) { total += 1; if *fit < r[0] { better += 1; println!("better {:.5} {:?}", fit, (0..35).filter(|&u| c[u] != s[u]).collect::<Vec<_>>()); } }
    println!("{better} of {total} one-for-one swaps improve");
}
