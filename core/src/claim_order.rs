//! The order in which messages are claimed: higher priority first, then the
//! one available longest, then the older id. On a Citus node the outbox is in
//! several shard groups; a claim takes the best messages of all of them, not
//! the first group's first (docs/citus.md, "Delivery").

use std::cmp::Reverse;

/// A claimable message's place in the claim order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub priority: i32,
    /// microseconds
    pub available_at: i64,
    pub id: i64,
}

impl Place {
    fn key(&self) -> (Reverse<i32>, i64, i64) {
        (Reverse(self.priority), self.available_at, self.id)
    }
}

/// How many of the `n` best places overall come from each group, given each
/// group's best places.
pub fn shares(groups: &[Vec<Place>], n: usize) -> Vec<usize> {
    let mut all: Vec<(Place, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, places)| places.iter().map(move |p| (*p, g)))
        .collect();
    all.sort_by_key(|(p, _)| p.key());
    let mut out = vec![0; groups.len()];
    for (_, g) in all.into_iter().take(n) {
        out[g] += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(priority: i32, available_at: i64, id: i64) -> Place {
        Place {
            priority,
            available_at,
            id,
        }
    }

    #[test]
    fn the_best_messages_of_all_groups_are_taken() {
        // group 0 is full of low-priority mail; group 1 has one urgent message
        let g0: Vec<Place> = (0..5).map(|i| p(0, i, i)).collect();
        let g1 = vec![p(100, 50, 9), p(0, 40, 10)];
        assert_eq!(shares(&[g0.clone(), g1.clone()], 3), vec![2, 1]);
        // among equals, the one available longest, then the older id
        assert_eq!(shares(&[vec![p(0, 5, 1)], vec![p(0, 4, 2)]], 1), vec![0, 1]);
        assert_eq!(shares(&[vec![p(0, 4, 3)], vec![p(0, 4, 2)]], 1), vec![0, 1]);
        // fewer messages than asked for: all of them
        assert_eq!(shares(&[g0, g1], 100), vec![5, 2]);
        assert_eq!(shares(&[], 3), Vec::<usize>::new());
    }
}
