//! The EvoPress level-swap mutation, kept exact: one unit moves one level, and other units move one level the other
//! way so that their steps add up to exactly the same cost. Costs are the integers of the cost table, so a child's
//! total equals its parent's to the bit, whatever the accounting.
//!
//! In the common case the partner is a single unit of the same parameter count (q/o, k/v, gate/up/down on Llama
//! shapes under code bits), which is EvoPress's swap. Partners may also be several smaller units whose steps sum
//! to the lead unit's step (an o_proj going down one bit pays for a k_proj *and* a v_proj going up one bit):
//! EvoPress reaches such trades only by overshooting and repairing the budget; here they are exact moves, and on
//! small models, where one layer at the lowest level costs more than any single layer one level up can win back,
//! they are often the only improving moves.

use super::budget::CostTable;
use rand::seq::SliceRandom;
use rand::Rng;

/// Random tries at finding partners before a swap gives up.
const ATTEMPTS: usize = 32;

/// Applies one exact level swap to `assign` in place. Returns false (and leaves `assign` unchanged) when none of
/// the tries found partners whose steps add up to the lead unit's step.
pub fn level_swap(assign: &mut [usize], costs: &CostTable, rng: &mut impl Rng) -> bool {
    let n = assign.len();
    let top = costs.levels() - 1;
    let c = &costs.costs;
    // Cost of moving unit u one level up (down = false) or down (down = true).
    let step = |a: &[usize], u: usize, down: bool| {
        if down {
            c[u][a[u]] - c[u][a[u] - 1]
        } else {
            c[u][a[u] + 1] - c[u][a[u]]
        }
    };
    let can = |a: &[usize], u: usize, down: bool| if down { a[u] > 0 } else { a[u] < top };
    let mut others = Vec::with_capacity(n);
    let mut chosen = Vec::new();
    for _ in 0..ATTEMPTS {
        let down = rng.random_bool(0.5);
        let leads = (0..n).filter(|&u| can(assign, u, down)).count();
        if leads == 0 {
            continue;
        }
        let lead = (0..n).filter(|&u| can(assign, u, down)).nth(rng.random_range(0..leads)).expect("counted");
        let mut need = step(assign, lead, down);
        others.clear();
        others.extend((0..n).filter(|&u| u != lead && can(assign, u, !down)));
        others.shuffle(rng);
        chosen.clear();
        for &b in &others {
            let s = step(assign, b, !down);
            if s <= need {
                chosen.push(b);
                need -= s;
                if need == 0 {
                    break;
                }
            }
        }
        if need == 0 && !chosen.is_empty() {
            let (lead_to, partner_to) = if down { (-1isize, 1isize) } else { (1, -1) };
            assign[lead] = (assign[lead] as isize + lead_to) as usize;
            for &b in &chosen {
                assign[b] = (assign[b] as isize + partner_to) as usize;
            }
            return true;
        }
    }
    false
}

/// A child of `parent`: between 1 and `max_swaps` level swaps, biased toward few (the smaller of two uniform
/// draws, as the reference implementation does: small steps are the ones that usually survive selection).
/// `None` when no swap is possible.
pub fn mutate(parent: &[usize], costs: &CostTable, max_swaps: usize, rng: &mut impl Rng) -> Option<Vec<usize>> {
    let mut child = parent.to_vec();
    let n = max_swaps.max(1);
    let swaps = rng.random_range(1..=n).min(rng.random_range(1..=n));
    for _ in 0..swaps {
        if !level_swap(&mut child, costs, rng) {
            return None;
        }
    }
    Some(child)
}

/// Whether some level swap keeps the budget from `assign` (checked before a search starts): a one-for-one swap,
/// or failing that a seeded batch of random tries.
pub fn can_move(assign: &[usize], costs: &CostTable) -> bool {
    let top = costs.levels() - 1;
    let c = &costs.costs;
    let one_for_one = (0..assign.len()).filter(|&a| assign[a] > 0).any(|a| {
        let freed = c[a][assign[a]] - c[a][assign[a] - 1];
        (0..assign.len()).any(|b| b != a && assign[b] < top && c[b][assign[b] + 1] - c[b][assign[b]] == freed)
    });
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    one_for_one || (0..8).any(|_| level_swap(&mut assign.to_vec(), costs, &mut rng))
}

#[cfg(test)]
mod tests {
    use super::super::budget::tests::table;
    use super::super::budget::{Accounting, Budget};
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn check_thousands(spec: &str, budget: Budget) {
        let t = table(spec, budget).unwrap();
        let start = t.near_uniform();
        let cost = t.cost(&start);
        let mut rng = StdRng::seed_from_u64(7);
        let mut cur = start.clone();
        let mut moved = 0;
        for _ in 0..5000 {
            let child = mutate(&cur, &t, 3, &mut rng).expect("a swap is possible");
            assert_eq!(t.cost(&child), cost, "{spec}: budget drifted");
            assert!(child.iter().all(|&l| l < t.levels()));
            moved += usize::from(child != cur);
            cur = child; // random walk: visits far-from-uniform assignments too
        }
        assert!(moved > 4000, "{spec}: mutations rarely change anything ({moved})");
        assert!((t.measure(cost) - t.budget.target()).abs() <= t.granularity());
    }

    #[test]
    fn swaps_keep_the_budget_exactly_over_thousands_of_mutations() {
        check_thousands("gptq:2,3,4,5,6", Budget::AvgBits { bits: 3.0, accounting: Accounting::Code });
        check_thousands("gptq:2,3,4,5,6", Budget::AvgBits { bits: 2.5, accounting: Accounting::Code });
        check_thousands("gptq:2,3,4,5,6,8", Budget::AvgBits { bits: 4.0, accounting: Accounting::Stored });
        check_thousands("sparsegpt:0,10,20,30,40,50,60,70", Budget::AvgSparsity { sparsity: 0.6 });
    }

    #[test]
    fn swaps_move_one_unit_against_partners_of_exactly_its_step() {
        let t = table("gptq:2,3,4,5,6", Budget::AvgBits { bits: 4.0, accounting: Accounting::Code }).unwrap();
        let start = t.near_uniform();
        let mut rng = StdRng::seed_from_u64(1);
        // Units 0/3 (q, o) have 4096 weights, 1/2 (k, v) 2048, 4/5/6 (gate, up, down) 11008.
        let params = |u: usize| match u % 7 {
            0 | 3 => 4096i64,
            1 | 2 => 2048,
            _ => 11008,
        };
        let (mut one_for_one, mut cross) = (0, 0);
        for _ in 0..3000 {
            let mut a = start.clone();
            assert!(level_swap(&mut a, &t, &mut rng));
            let moved: Vec<(usize, i64)> =
                (0..a.len()).filter(|&u| a[u] != start[u]).map(|u| (u, a[u] as i64 - start[u] as i64)).collect();
            assert!(moved.iter().all(|&(_, d)| d.abs() == 1), "{moved:?}");
            let ups: Vec<usize> = moved.iter().filter(|m| m.1 > 0).map(|m| m.0).collect();
            let downs: Vec<usize> = moved.iter().filter(|m| m.1 < 0).map(|m| m.0).collect();
            assert!(ups.len() == 1 || downs.len() == 1, "one lead unit: {moved:?}");
            let sum = |v: &[usize]| v.iter().map(|&u| params(u)).sum::<i64>();
            assert_eq!(sum(&ups), sum(&downs), "{moved:?}");
            if moved.len() == 2 {
                one_for_one += 1;
            } else {
                cross += 1;
                // 11008 is no sum of 4096s and 2048s: MLP units only ever trade among themselves.
                assert!(moved.iter().all(|&(u, _)| params(u) != 11008), "{moved:?}");
            }
        }
        assert!(one_for_one > 1500 && cross > 100, "{one_for_one} one-for-one, {cross} with several partners");
    }

    #[test]
    fn no_move_at_the_top_of_the_ladder() {
        let t = table("gptq:2,3", Budget::AvgBits { bits: 3.0, accounting: Accounting::Code }).unwrap();
        let top = t.near_uniform();
        assert!(!can_move(&top, &t));
        let mut a = top.clone();
        assert!(!level_swap(&mut a, &t, &mut StdRng::seed_from_u64(0)));
        assert_eq!(a, top);
        let half = table("gptq:2,3", Budget::AvgBits { bits: 2.5, accounting: Accounting::Code }).unwrap();
        assert!(can_move(&half.near_uniform(), &half));
    }
}
