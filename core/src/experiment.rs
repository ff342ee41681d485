//! Experiments: deterministic arm assignment (variants and holdout) and the
//! statistics that say whether an arm beats the holdout.

use serde::Deserialize;

/// FNV-1a, 64 bits: a fixed, documented hash, so that a user keeps their arm
/// across runs, builds and machines (std's hashers promise none of that).
pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0x1f; // a separator byte, so ("ab","c") and ("a","bc") differ
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// MurmurHash3's 64-bit finalizer: FNV alone leaves similar keys ("user1",
/// "user2") with correlated high bits; this spreads every input bit over all
/// output bits.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A point in [0, 1) for this user in this experiment, for this purpose.
pub fn unit(experiment: &str, user: &str, purpose: &str) -> f64 {
    // the top 53 bits make an exactly representable fraction
    (mix(fnv1a(&[experiment, user, purpose])) >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    pub template: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    pub name: String,
    pub template: String,
    pub weight: f64,
}

pub const HOLDOUT: &str = "holdout";

/// Which arm a user gets: the holdout (a share of users who go through every
/// rule but are not sent anything), else a variant by weight, else None
/// (the trigger's own template).
pub fn assign<'a>(experiment: &str, user: &str, holdout: f64, arms: &'a [Arm]) -> Assignment<'a> {
    if holdout > 0.0 && unit(experiment, user, HOLDOUT) < holdout {
        return Assignment::Holdout;
    }
    if arms.is_empty() {
        return Assignment::Default;
    }
    let total: f64 = arms.iter().map(|a| a.weight).sum();
    let mut x = unit(experiment, user, "variant") * total;
    for a in arms {
        if x < a.weight {
            return Assignment::Variant(a);
        }
        x -= a.weight;
    }
    Assignment::Variant(arms.last().expect("not empty"))
}

#[derive(Debug, PartialEq)]
pub enum Assignment<'a> {
    Holdout,
    Variant(&'a Arm),
    Default,
}

/// Two-proportion comparison of an arm (x1 of n1 converted) against the
/// holdout (x0 of n0): the difference of rates with a 95% Wald interval and
/// the two-sided p-value of the pooled z-test.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplift {
    pub diff: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub p_value: f64,
}

pub fn uplift(x1: u64, n1: u64, x0: u64, n0: u64) -> Option<Uplift> {
    if n1 == 0 || n0 == 0 {
        return None;
    }
    let (p1, p0) = (x1 as f64 / n1 as f64, x0 as f64 / n0 as f64);
    let diff = p1 - p0;
    let se = (p1 * (1.0 - p1) / n1 as f64 + p0 * (1.0 - p0) / n0 as f64).sqrt();
    let z95 = 1.959_963_984_540_054;
    let pooled = (x1 + x0) as f64 / (n1 + n0) as f64;
    let se0 = (pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n0 as f64)).sqrt();
    let p_value = if se0 == 0.0 {
        1.0
    } else {
        erfc((diff / se0).abs() / std::f64::consts::SQRT_2)
    };
    Some(Uplift {
        diff,
        ci_low: diff - z95 * se,
        ci_high: diff + z95 * se,
        p_value,
    })
}

/// The complementary error function, to about 1.2e-7 everywhere (the
/// Chebyshev fit of Numerical Recipes, `erfcc`).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// `"optimize": {"metric": "converted", "min_per_arm": 500}`: once every
/// variant has `min_per_arm` messages and one is better than each other
/// variant at p < `alpha`, new entries go to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizeSpec {
    pub metric: String,
    pub min_per_arm: u64,
    #[serde(default = "alpha")]
    pub alpha: f64,
}

fn alpha() -> f64 {
    0.05
}

pub const METRICS: [&str; 3] = ["converted", "opened", "clicked"];

/// An arm's evidence: messages sent and how many of them did the metric.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmStats {
    pub name: String,
    pub sent: u64,
    pub hits: u64,
}

/// The variant that beats every other one, once each has enough messages.
pub fn winner<'a>(arms: &'a [ArmStats], min_per_arm: u64, alpha: f64) -> Option<&'a ArmStats> {
    if arms.len() < 2 || arms.iter().any(|a| a.sent < min_per_arm.max(1)) {
        return None;
    }
    let rate = |a: &ArmStats| a.hits as f64 / a.sent as f64;
    let best = arms.iter().max_by(|a, b| rate(a).total_cmp(&rate(b)))?;
    let beats_all = arms.iter().filter(|a| a.name != best.name).all(|o| {
        uplift(best.hits, best.sent, o.hits, o.sent)
            .is_some_and(|u| u.diff > 0.0 && u.p_value < alpha)
    });
    beats_all.then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fixed() {
        // FNV-1a test vectors
        assert_eq!(fnv1a(&[""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&["a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&["foobar"]), 0x8594_4171_f739_67e8);
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
    }

    fn arms() -> Vec<Arm> {
        vec![
            Arm {
                name: "A".into(),
                template: "a".into(),
                weight: 1.0,
            },
            Arm {
                name: "B".into(),
                template: "b".into(),
                weight: 3.0,
            },
        ]
    }

    #[test]
    fn assignment_is_stable_and_follows_the_weights() {
        let arms = arms();
        assert_eq!(
            assign("exp", "u1", 0.1, &arms),
            assign("exp", "u1", 0.1, &arms)
        );
        // 10,000 users: each share within 4 binomial standard deviations of its
        // expectation (a false alarm about once in 16,000 runs; the hash is
        // fixed, so this run's outcome is the same every time).
        let n = 10_000.0;
        let (mut held, mut a, mut b) = (0.0, 0.0, 0.0);
        for i in 0..10_000 {
            match assign("exp", &format!("user{i}"), 0.1, &arms) {
                Assignment::Holdout => held += 1.0,
                Assignment::Variant(v) if v.name == "A" => a += 1.0,
                Assignment::Variant(_) => b += 1.0,
                Assignment::Default => unreachable!(),
            }
        }
        let within = |count: f64, p: f64| (count - n * p).abs() <= 4.0 * (n * p * (1.0 - p)).sqrt();
        assert!(within(held, 0.1), "holdout {held}");
        assert!(within(a, 0.9 * 0.25), "A {a}");
        assert!(within(b, 0.9 * 0.75), "B {b}");
    }

    #[test]
    fn another_experiment_shuffles_users() {
        let arms = arms();
        let moved = (0..1000)
            .filter(|i| {
                let u = format!("user{i}");
                assign("exp1", &u, 0.0, &arms) != assign("exp2", &u, 0.0, &arms)
            })
            .count();
        assert!(moved > 200, "{moved}");
    }

    #[test]
    fn uplift_matches_a_hand_computed_example() {
        // arm: 120 of 1000 converted; holdout: 80 of 1000.
        // diff = 0.04; se = sqrt(.12*.88/1000 + .08*.92/1000) = 0.0133866
        // CI = 0.04 ± 1.96*0.0133866 = [0.013763, 0.066237]
        // pooled p = 0.1; se0 = sqrt(.1*.9*(2/1000)) = 0.0134164; z = 2.98142
        // two-sided p = erfc(2.98142/sqrt 2) = 0.0028693
        let u = uplift(120, 1000, 80, 1000).unwrap();
        assert!((u.diff - 0.04).abs() < 1e-12);
        assert!((u.ci_low - 0.013763).abs() < 1e-5, "{}", u.ci_low);
        assert!((u.ci_high - 0.066237).abs() < 1e-5, "{}", u.ci_high);
        assert!((u.p_value - 0.0028693).abs() < 1e-5, "{}", u.p_value);
        assert!(uplift(1, 0, 1, 10).is_none());
    }

    #[test]
    fn a_winner_needs_enough_data_and_significance() {
        let arm = |name: &str, sent, hits| ArmStats {
            name: name.into(),
            sent,
            hits,
        };
        // clearly better, enough data
        let arms = [arm("A", 1000, 120), arm("B", 1000, 80)];
        assert_eq!(winner(&arms, 500, 0.05).map(|a| a.name.as_str()), Some("A"));
        // not enough messages yet
        assert_eq!(winner(&arms, 1500, 0.05), None);
        // better, but not significantly
        assert_eq!(
            winner(&[arm("A", 1000, 90), arm("B", 1000, 80)], 500, 0.05),
            None
        );
        // must beat every other arm
        assert_eq!(
            winner(
                &[arm("A", 1000, 120), arm("B", 1000, 80), arm("C", 1000, 115)],
                500,
                0.05
            ),
            None
        );
    }

    #[test]
    fn erfc_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        assert!((erfc(1.0) - 0.157_299_207).abs() < 2e-7);
        assert!((erfc(-1.0) - 1.842_700_793).abs() < 2e-7);
        assert!((erfc(2.0) - 0.004_677_735).abs() < 2e-7);
    }
}
