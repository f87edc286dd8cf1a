//! The (1+λ) evolutionary search of EvoPress (algorithms.md §7). The parent is the best assignment so far; each
//! generation makes λ children by level-swap mutations (1..=max_swaps each, budget kept exactly), then narrows
//! them down by multi-stage selection: all children are scored on a few windows, the best few on more windows, …,
//! until one remains, which replaces the parent only if it is strictly better on the final stage's windows
//! (elitist). Early stages sample fresh windows from the pool every generation; a final stage covering the whole
//! pool uses the same windows every time, so the parent's score is kept instead of recomputed.
//!
//! Everything random comes from one seeded RNG consumed in a fixed order, and fitness values do not depend on
//! thread timing, so the same seed gives the same search, step by step.

use super::budget::CostTable;
use super::events::{GenerationReport, SearchControl, SearchEvent};
use super::mutation::mutate;
use crate::error::{Result, WhittleError};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Scores assignments; lower is better. Implemented by the KL fitness on a model, and by cheap stand-ins in tests.
pub trait Fitness: Sync {
    /// Number of windows to sample stages from.
    fn pool(&self) -> usize;
    /// Tokens in these windows (for throughput figures).
    fn tokens(&self, windows: &[usize]) -> usize;
    /// Mean fitness of every candidate (level per unit) on the windows `windows` of the pool.
    fn evaluate(&self, candidates: &[&[usize]], windows: &[usize], cancelled: &(dyn Fn() -> bool + Sync))
        -> Result<Vec<f64>>;
}

/// One selection stage: score the remaining candidates on `windows` windows and keep the best `survivors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub windows: usize,
    pub survivors: usize,
}

/// Settings of the evolutionary loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvoSettings {
    pub generations: usize,
    /// λ: children per generation.
    pub offspring: usize,
    /// Each child gets 1..=max_swaps level swaps (biased toward few, see `mutation::mutate`).
    pub max_swaps: usize,
    pub seed: u64,
    /// Growing windows, shrinking survivors, ending with one survivor.
    pub stages: Vec<Stage>,
}

impl Default for EvoSettings {
    fn default() -> Self {
        Self {
            generations: 100,
            offspring: 16,
            max_swaps: 3,
            seed: 0,
            stages: vec![
                Stage { windows: 2, survivors: 4 },
                Stage { windows: 8, survivors: 1 },
                Stage { windows: 32, survivors: 1 },
            ],
        }
    }
}

impl EvoSettings {
    /// Checks the settings against a pool of `pool` windows, with messages naming the flag.
    pub fn validate(&self, pool: usize) -> Result<()> {
        let bad = |m: String| Err(WhittleError::Invalid(m));
        if self.offspring == 0 {
            return bad("--offspring must be at least 1".into());
        }
        if self.max_swaps == 0 {
            return bad("--max-swaps must be at least 1".into());
        }
        let Some(last) = self.stages.last() else { return bad("--selection needs at least one stage".into()) };
        if last.survivors != 1 {
            return bad(format!("--selection: the last stage must keep 1 survivor, found {}", last.survivors));
        }
        let mut prev = Stage { windows: 0, survivors: self.offspring };
        for (i, s) in self.stages.iter().enumerate() {
            if s.windows == 0 || s.windows > pool {
                return bad(format!(
                    "--selection stage {}: {} windows, but the fitness pool has {pool} (--fitness-windows)",
                    i + 1,
                    s.windows
                ));
            }
            if s.survivors == 0 || s.survivors > prev.survivors {
                return bad(format!(
                    "--selection stage {}: keeps {} of {} candidates; survivors must shrink and stay ≥ 1",
                    i + 1,
                    s.survivors,
                    prev.survivors
                ));
            }
            if s.windows < prev.windows {
                return bad(format!("--selection stage {}: windows must not shrink ({} after {})", i + 1, s.windows, prev.windows));
            }
            prev = *s;
        }
        Ok(())
    }
}

/// How the loop ended.
#[derive(Clone, Debug, PartialEq)]
pub struct EvoOutcome {
    pub best: Vec<usize>,
    pub fitness: f64,
    /// Generations completed.
    pub generations: usize,
    pub evaluations: u64,
    pub tokens: u64,
    /// Search time, paused time excluded.
    pub seconds: f64,
    pub cancelled: bool,
}

/// Waits while paused; returns true if cancelled meanwhile. Paused time is added to `paused`.
fn hold(control: &SearchControl, on_event: &mut dyn FnMut(SearchEvent), paused: &mut Duration) -> bool {
    if control.is_paused() && !control.is_cancelled() {
        let t = Instant::now();
        on_event(SearchEvent::Paused);
        while control.is_paused() && !control.is_cancelled() {
            std::thread::sleep(Duration::from_millis(20));
        }
        *paused += t.elapsed();
        on_event(SearchEvent::Resumed);
    }
    control.is_cancelled()
}

/// `k` distinct windows of the pool (all of them, in order, when `k` covers it), sorted.
fn sample_windows(rng: &mut StdRng, pool: usize, k: usize) -> Vec<usize> {
    if k >= pool {
        return (0..pool).collect();
    }
    let mut v = rand::seq::index::sample(rng, pool, k).into_vec();
    v.sort_unstable();
    v
}

/// λ children of `parent`, each different from the parent and (when the space allows) from each other.
fn offspring(parent: &[usize], costs: &CostTable, s: &EvoSettings, rng: &mut StdRng) -> Result<Vec<Vec<usize>>> {
    let mut kids: Vec<Vec<usize>> = Vec::with_capacity(s.offspring);
    for _ in 0..s.offspring {
        let mut tries = 0;
        loop {
            let child = mutate(parent, costs, s.max_swaps, rng)
                .ok_or_else(|| WhittleError::Invalid("no level swap keeps the budget from this assignment".into()))?;
            tries += 1;
            if (child.as_slice() != parent && !kids.contains(&child)) || tries >= 32 {
                kids.push(child);
                break;
            }
        }
    }
    Ok(kids)
}

/// Runs the search from `start`. Cancellation returns the best assignment so far with `cancelled: true`.
pub fn evolve(
    costs: &CostTable,
    start: Vec<usize>,
    fitness: &dyn Fitness,
    s: &EvoSettings,
    control: &SearchControl,
    on_event: &mut dyn FnMut(SearchEvent),
) -> Result<EvoOutcome> {
    s.validate(fitness.pool())?;
    let cancelled = || control.is_cancelled();
    let t0 = Instant::now();
    let mut paused = Duration::ZERO;
    let mut rng = StdRng::seed_from_u64(s.seed);
    let last = *s.stages.last().expect("validated");
    let fixed_final = last.windows >= fitness.pool();
    let final_windows: Vec<usize> = (0..fitness.pool().min(last.windows)).collect();
    let (mut evaluations, mut tokens) = (0u64, 0u64);
    let mut parent = start;
    let mut parent_fit = fitness.evaluate(&[&parent], &final_windows, &cancelled)?[0];
    let mut done = 0;
    let outcome = |best: Vec<usize>, fit: f64, done, evaluations, tokens, paused: Duration, cancelled| EvoOutcome {
        best,
        fitness: fit,
        generations: done,
        evaluations,
        tokens,
        seconds: (t0.elapsed() - paused).as_secs_f64(),
        cancelled,
    };
    for g in 0..s.generations {
        if hold(control, on_event, &mut paused) {
            return Ok(outcome(parent, parent_fit, done, evaluations, tokens, paused, true));
        }
        let mut cands = offspring(&parent, costs, s, &mut rng)?;
        let mut fits = Vec::new();
        let mut parent_now = parent_fit;
        for (i, stage) in s.stages.iter().enumerate() {
            if i > 0 && hold(control, on_event, &mut paused) {
                return Ok(outcome(parent, parent_fit, done, evaluations, tokens, paused, true));
            }
            let windows = sample_windows(&mut rng, fitness.pool(), stage.windows);
            let is_last = i + 1 == s.stages.len();
            // A sampled final stage scores the parent on the same windows as its challenger.
            let with_parent = is_last && !fixed_final;
            let mut refs: Vec<&[usize]> = cands.iter().map(Vec::as_slice).collect();
            if with_parent {
                refs.push(&parent);
            }
            let scored = match fitness.evaluate(&refs, &windows, &cancelled) {
                Ok(f) => f,
                Err(WhittleError::Cancelled) => {
                    return Ok(outcome(parent, parent_fit, done, evaluations, tokens, paused, true))
                }
                Err(e) => return Err(e),
            };
            evaluations += refs.len() as u64;
            tokens += (refs.len() * fitness.tokens(&windows)) as u64;
            let mut f = scored;
            if with_parent {
                parent_now = f.pop().expect("parent scored");
            }
            let mut order: Vec<usize> = (0..cands.len()).collect();
            order.sort_by(|&a, &b| f[a].total_cmp(&f[b]).then(a.cmp(&b)));
            order.truncate(stage.survivors);
            cands = order.iter().map(|&j| std::mem::take(&mut cands[j])).collect();
            fits = order.iter().map(|&j| f[j]).collect();
        }
        let improved = fits[0] < parent_now;
        if improved {
            parent = cands.swap_remove(0);
            parent_fit = fits[0];
        } else {
            parent_fit = parent_now;
        }
        done = g + 1;
        let secs = (t0.elapsed() - paused).as_secs_f64().max(1e-9);
        on_event(SearchEvent::Generation(GenerationReport {
            generation: done,
            generations: s.generations,
            best_fitness: parent_fit,
            improved,
            levels: parent.clone(),
            evaluations,
            tokens,
            evaluations_per_second: evaluations as f64 / secs,
            tokens_per_second: tokens as f64 / secs,
            seconds: secs,
        }));
    }
    Ok(outcome(parent, parent_fit, done, evaluations, tokens, paused, false))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::budget::tests::table;
    use super::super::budget::{Accounting, Budget};
    use super::*;
    use std::sync::Mutex;

    /// A stand-in fitness: a weighted distance to a hidden optimum plus a per-window offset, which records every
    /// candidate it sees.
    pub struct Toy {
        pub seen: Mutex<Vec<Vec<usize>>>,
        pub weights: Vec<f64>,
    }

    impl Toy {
        pub fn new(units: usize) -> Self {
            Toy { seen: Mutex::new(Vec::new()), weights: (0..units).map(|u| 1.0 + (u * 37 % 11) as f64).collect() }
        }
    }

    impl Fitness for Toy {
        fn pool(&self) -> usize {
            8
        }
        fn tokens(&self, windows: &[usize]) -> usize {
            windows.len() * 10
        }
        fn evaluate(&self, c: &[&[usize]], w: &[usize], cancelled: &(dyn Fn() -> bool + Sync)) -> Result<Vec<f64>> {
            if cancelled() {
                return Err(WhittleError::Cancelled);
            }
            self.seen.lock().unwrap().extend(c.iter().map(|a| a.to_vec()));
            let noise = w.iter().map(|&i| i as f64 * 1e-3).sum::<f64>() / w.len() as f64;
            Ok(c.iter()
                .map(|a| a.iter().zip(&self.weights).map(|(&l, wt)| wt * (-(l as f64)).exp()).sum::<f64>() + noise)
                .collect())
        }
    }

    fn settings(seed: u64) -> EvoSettings {
        EvoSettings {
            generations: 60,
            offspring: 12,
            max_swaps: 3,
            seed,
            stages: vec![Stage { windows: 2, survivors: 3 }, Stage { windows: 8, survivors: 1 }],
        }
    }

    #[test]
    fn every_evaluated_candidate_keeps_the_budget() {
        for (spec, budget) in [
            ("gptq:2,3,4,5,6", Budget::AvgBits { bits: 2.5, accounting: Accounting::Code }),
            ("gptq:2,3,4,5,6", Budget::AvgBits { bits: 3.0, accounting: Accounting::Stored }),
        ] {
            let t = table(spec, budget).unwrap();
            let toy = Toy::new(t.units());
            let start = t.near_uniform();
            let cost = t.cost(&start);
            evolve(&t, start, &toy, &settings(1), &SearchControl::default(), &mut |_| {}).unwrap();
            let seen = toy.seen.lock().unwrap();
            assert!(seen.len() > 60 * 12, "{}", seen.len());
            for a in seen.iter() {
                assert_eq!(t.cost(a), cost);
                assert!((t.measure_of(a) - t.budget.target()).abs() <= t.granularity());
            }
        }
    }

    #[test]
    fn same_seed_same_search_and_other_seeds_differ() {
        let t = table("gptq:2,3,4,5,6", Budget::AvgBits { bits: 3.0, accounting: Accounting::Code }).unwrap();
        let run = |seed| {
            let mut trace = Vec::new();
            let out = evolve(&t, t.near_uniform(), &Toy::new(35), &settings(seed), &SearchControl::default(), &mut |e| {
                if let SearchEvent::Generation(g) = e {
                    trace.push((g.best_fitness, g.levels));
                }
            })
            .unwrap();
            (out.best, out.fitness, trace)
        };
        let a = run(5);
        assert_eq!(a, run(5));
        assert_ne!(a.0, run(6).0);
        // The toy optimum favours heavy units: the search must move away from uniform and lower the fitness.
        let start_fit = Toy::new(35).evaluate(&[&t.near_uniform()], &(0..8).collect::<Vec<_>>(), &|| false).unwrap()[0];
        assert!(a.1 < start_fit, "{} vs {start_fit}", a.1);
        assert!(a.2.windows(2).all(|w| w[1].0 <= w[0].0), "elitist: the best fitness never rises");
    }

    #[test]
    fn pause_holds_and_cancel_returns_the_best_so_far() {
        let t = table("gptq:2,3,4,5,6", Budget::AvgBits { bits: 3.0, accounting: Accounting::Code }).unwrap();
        let control = SearchControl::default();
        let mut s = settings(2);
        s.generations = 1000;
        let mut events = Vec::new();
        let c2 = control.clone();
        let out = evolve(&t, t.near_uniform(), &Toy::new(35), &s, &control, &mut |e| {
            match &e {
                SearchEvent::Generation(g) if g.generation == 3 => c2.pause(),
                SearchEvent::Paused => {
                    // Resume from another thread after a while, then cancel a few generations later.
                    let c3 = c2.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(60));
                        c3.resume();
                    });
                }
                SearchEvent::Generation(g) if g.generation == 6 => c2.cancel(),
                _ => {}
            }
            events.push(e);
        })
        .unwrap();
        assert!(out.cancelled);
        assert_eq!(out.generations, 6);
        let names: Vec<String> = events
            .iter()
            .map(|e| match e {
                SearchEvent::Generation(g) => format!("g{}", g.generation),
                SearchEvent::Paused => "paused".into(),
                SearchEvent::Resumed => "resumed".into(),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(names, ["g1", "g2", "g3", "paused", "resumed", "g4", "g5", "g6"]);
        assert_eq!(t.cost(&out.best), t.cost(&t.near_uniform()));
    }

    #[test]
    fn bad_selection_settings_are_rejected() {
        let mut s = settings(0);
        s.stages = vec![Stage { windows: 2, survivors: 2 }];
        assert!(s.validate(8).unwrap_err().to_string().contains("keep 1 survivor"));
        s.stages = vec![Stage { windows: 9, survivors: 1 }];
        assert!(s.validate(8).unwrap_err().to_string().contains("pool has 8"));
        s.stages = vec![Stage { windows: 4, survivors: 13 }, Stage { windows: 8, survivors: 1 }];
        assert!(s.validate(8).unwrap_err().to_string().contains("must shrink"));
        s.stages = vec![Stage { windows: 4, survivors: 2 }, Stage { windows: 2, survivors: 1 }];
        assert!(s.validate(8).unwrap_err().to_string().contains("must not shrink"));
        s.stages = vec![];
        assert!(s.validate(8).is_err());
        assert!(settings(0).validate(8).is_ok());
    }
}
