//! The EvoPress search end to end on the real default model, with small settings so each run takes seconds:
//! the CLI writes a plan that `compress` and `eval` accept and that has the bits it claims; the same seed gives the
//! same plan; an impossible budget fails before any work with the reachable range; a second search loads the
//! levels from the cache; and the background job streams events in order, pauses, resumes and cancels.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use whittle_core::model::load_model;
use whittle_core::model::source::DEFAULT_CALIBRATION_TEXT;
use whittle_core::plan::Plan;
use whittle_core::search::{
    spawn_search, Accounting, Budget, EvoSettings, GridArgs, Ladder, SearchEvent, SearchSettings, Stage,
};

/// Small, fast settings shared by the CLI runs.
const SMALL: [&str; 16] = [
    "--generations", "4",
    "--offspring", "4",
    "--selection", "1:2,2:1",
    "--fitness-windows", "2",
    "--fitness-ctx", "64",
    "--calib-samples", "8",
    "--calib-ctx", "64",
    "--group", "32",
];

fn search(out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["search", "--levels", "gptq:2,3,4", "--out", path_str(out), "--json"];
    args.extend_from_slice(&SMALL);
    args.extend_from_slice(extra);
    whittle_json(&args)
}

/// Average code bits of a resolved plan (every module's quant bits, weighted by its parameters).
fn code_bits(plan: &whittle_core::plan::ResolvedPlan) -> f64 {
    let (mut bits, mut params) = (0.0, 0.0);
    for m in &plan.modules {
        let p = (m.rows * m.cols) as f64;
        bits += p * m.job.as_ref().and_then(|j| j.quant.as_ref()).map_or(32.0, |q| q.bits as f64);
        params += p;
    }
    bits / params
}

#[test]
fn written_plan_is_accepted_by_compress_and_eval_and_has_the_claimed_bits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("searched.toml");
    let dp = dir.path().join("dp.toml");
    let v = search(&out, &["--target-bits", "2.5", "--no-cache", "--dp-out", path_str(&dp)]);
    for field in ["avg_bits", "fitness", "generations", "seconds", "plan"] {
        assert!(v.get(field).is_some(), "JSON lacks `{field}`: {v}");
    }
    assert_eq!(v["generations"], 4);
    let avg = v["avg_bits"].as_f64().unwrap();
    assert!((avg - 2.5).abs() <= v["granularity"].as_f64().unwrap() && avg <= 2.5 + 1e-12, "avg_bits {avg}");
    assert!(v["fitness"].as_f64().unwrap() > 0.0);

    let m = load_model(&default_model()).unwrap();
    let shapes = m.model.linear_shapes();
    let linear: usize = shapes.iter().map(|(_, r, c)| r * c).sum();
    let other = (m.model.config.parameter_count() - linear) as u64;
    for (path, json) in [(&out, &v), (&dp, &v["dp"])] {
        let plan = Plan::from_file(path).unwrap();
        let resolved = plan.resolve(&shapes, other, 32.0).unwrap();
        assert!((code_bits(&resolved) - json["avg_bits"].as_f64().unwrap()).abs() < 1e-12, "{}", path.display());
        assert!((resolved.avg_bits - json["stored_bits"].as_f64().unwrap()).abs() < 1e-12, "{}", path.display());
    }
    let plan_json: Plan = serde_json::from_value(v["plan"].clone()).unwrap();
    assert_eq!(plan_json, Plan::from_file(&out).unwrap(), "the JSON plan is the file's plan");

    let c = whittle_json(&["compress", "--plan", path_str(&out), "--calib-samples", "8", "--calib-ctx", "64", "--json"]);
    assert!((c["avg_bits"].as_f64().unwrap() - v["stored_bits"].as_f64().unwrap()).abs() < 1e-12);
    let e = whittle_json(&[
        "eval", "--plan", path_str(&out), "--data", path_str(&val_text()), "--max-tokens", "1024", "--ctx", "64",
        "--calib-samples", "8", "--calib-ctx", "64", "--json",
    ]);
    assert!(e["ppl"].as_f64().unwrap().is_finite());
}

#[test]
fn same_seed_gives_the_same_plan() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let v = search(&out, &["--target-bits", "3.0", "--seed", seed, "--cache", path_str(&cache)]);
        (std::fs::read_to_string(&out).unwrap(), v["fitness"].as_f64().unwrap())
    };
    let a = run("a.toml", "11");
    let b = run("b.toml", "11");
    assert_eq!(a, b, "same seed, same plan and fitness");
}

#[test]
fn impossible_budgets_fail_before_any_work_with_the_reachable_range() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.toml");
    for target in ["1.5", "4.5"] {
        let t = Instant::now();
        let mut args = vec!["search", "--levels", "gptq:2,3,4", "--target-bits", target, "--out", path_str(&out)];
        args.extend_from_slice(&SMALL);
        let r = whittle(&args);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains("2.0000 … 4.0000"), "{}", r.stderr);
        assert!(!r.stderr.contains("levels database"), "no work before the budget check: {}", r.stderr);
        assert!(t.elapsed() < Duration::from_secs(20));
    }
    assert!(!out.exists());
    let r = whittle(&["search", "--levels", "sparsegpt:0,10,20", "--target-bits", "3", "--out", path_str(&out)]);
    assert!(r.stderr.contains("cost the same"), "{}", r.stderr);
    let r = whittle(&["search", "--levels", "gptq:2,9", "--target-bits", "3", "--out", path_str(&out)]);
    assert!(r.stderr.contains("bits must be 2..8"), "{}", r.stderr);
}

#[test]
fn second_search_loads_the_levels_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("p.toml");
    let first = search(&out, &["--target-bits", "3.0", "--cache", path_str(&cache)]);
    assert_eq!(first["levels_cached"], false);
    let second = search(&out, &["--target-bits", "3.0", "--cache", path_str(&cache), "--seed", "4"]);
    assert_eq!(second["levels_cached"], true);
}

#[test]
fn background_job_streams_events_pauses_resumes_and_cancels() {
    let m = load_model(&default_model()).unwrap();
    let settings = SearchSettings {
        ladder: Ladder::parse("gptq:2,3,4", &GridArgs { group: Some(32), ..Default::default() }).unwrap(),
        granularity: Default::default(),
        budget: Budget::AvgBits { bits: 3.0, accounting: Accounting::Code },
        calib: whittle_core::calib::CalibSettings { samples: 8, ctx: 64 },
        levels_calibration: Default::default(),
        rounds: 2,
        fitness_windows: 2,
        fitness_ctx: 64,
        evo: EvoSettings {
            generations: 100_000,
            offspring: 4,
            max_swaps: 3,
            seed: 1,
            stages: vec![Stage { windows: 1, survivors: 2 }, Stage { windows: 2, survivors: 1 }],
        },
        cache_dir: None,
        start: None,
    };
    let job = spawn_search(m, DEFAULT_CALIBRATION_TEXT.to_string(), "calib".into(), settings, Box::new(|| {}));
    let mut seen = Vec::new();
    let next = |seen: &mut Vec<String>| -> SearchEvent {
        let e = job.events.recv_timeout(Duration::from_secs(120)).expect("an event");
        seen.push(match &e {
            SearchEvent::Started(_) => "started".to_string(),
            SearchEvent::Levels { .. } => "levels".into(),
            SearchEvent::LevelsReady { .. } => "ready".into(),
            SearchEvent::Reference { .. } => "reference".into(),
            SearchEvent::Baseline { name, .. } => name.to_string(),
            SearchEvent::Generation(_) => "generation".into(),
            SearchEvent::Paused => "paused".into(),
            SearchEvent::Resumed => "resumed".into(),
        });
        e
    };
    // Run until two generations have passed, then pause.
    let mut gens = 0;
    while gens < 2 {
        if let SearchEvent::Generation(g) = next(&mut seen) {
            gens += 1;
            assert_eq!(g.generation, gens);
            assert!(g.evaluations_per_second > 0.0);
        }
    }
    job.control.pause();
    while !matches!(next(&mut seen), SearchEvent::Paused) {}
    let at_pause = seen.len();
    std::thread::sleep(Duration::from_millis(500));
    assert!(job.events.try_recv().is_err(), "nothing happens while paused");
    job.control.resume();
    while !matches!(next(&mut seen), SearchEvent::Generation(_)) {}
    assert_eq!(seen[at_pause], "resumed");
    job.control.cancel();
    while job.events.recv_timeout(Duration::from_secs(60)).is_ok() {}
    let out = job.join().unwrap();
    assert!(out.cancelled);
    assert!(out.generations >= 3 && out.generations < 100_000);
    let c = &out.space.costs;
    assert_eq!(c.cost(&out.best.levels), c.cost(&out.space.start), "budget kept exactly");
    let head: Vec<&str> = seen.iter().map(String::as_str).filter(|s| *s != "levels").take(5).collect();
    assert_eq!(head, ["started", "ready", "reference", "uniform", "dp"]);
    assert!(seen[1] == "levels", "database progress follows the start: {seen:?}");
}
