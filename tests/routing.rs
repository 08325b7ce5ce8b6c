//! The router in every DeepSeek mode, on hand-checked examples.

use latent::config::{ScoringFunc, TopkMethod};
use latent::model::moe::{route_token, RouterSpec};

fn spec(scoring_func: ScoringFunc, topk_method: TopkMethod, k: usize) -> RouterSpec {
    RouterSpec {
        scoring_func,
        topk_method,
        n_routed_experts: 8,
        k,
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
        scale_after_norm: false,
    }
}

fn experts(routed: &[latent::model::moe::Routed]) -> Vec<usize> {
    routed.iter().map(|r| r.expert).collect()
}

// Groups of two: {0,1} {2,3} {4,5} {6,7}.
const LOGITS: [f32; 8] = [3.0, -5.0, 2.9, 2.8, 0.0, 0.1, 2.7, 2.7];

#[test]
fn greedy_takes_the_best_experts_anywhere() {
    let r = route_token(&LOGITS, &spec(ScoringFunc::Softmax, TopkMethod::Greedy, 3), None);
    assert_eq!(experts(&r), [0, 2, 3]);
    let total: f32 = LOGITS.iter().map(|l| l.exp()).sum();
    assert!((r[0].weight - 3f32.exp() / total).abs() < 1e-6);
}

#[test]
fn group_limited_greedy_ranks_groups_by_their_best_expert() {
    // Group maxima: 3.0, 2.9, 0.1, 2.7 -> groups {0,1} and {2,3}; top-3 inside them: 0, 2, 3.
    let r = route_token(&LOGITS, &spec(ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy, 3), None);
    assert_eq!(experts(&r), [0, 2, 3]);
    // With k = 4 the fourth expert must come from the allowed groups (1), not the better 6 or 7.
    let r = route_token(&LOGITS, &spec(ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy, 4), None);
    assert_eq!(experts(&r), [0, 2, 3, 1]);
    let r = route_token(&LOGITS, &spec(ScoringFunc::Softmax, TopkMethod::Greedy, 4), None);
    assert_eq!(experts(&r), [0, 2, 3, 6]);
}

#[test]
fn noaux_tc_ranks_groups_by_their_two_best_and_the_bias_chooses_but_never_weighs() {
    // Sigmoid scores; group top-2 sums: {0,1} low because of -5, {2,3} and {6,7} best.
    let s = spec(ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 3);
    let r = route_token(&LOGITS, &s, None);
    assert_eq!(experts(&r), [2, 3, 6]);
    // A bias on expert 4 lifts group {4,5} above {6,7} and picks 4 — but its weight stays sigmoid(0).
    let mut bias = [0f32; 8];
    bias[4] = 1.0;
    let r = route_token(&LOGITS, &s, Some(&bias));
    assert_eq!(experts(&r), [4, 2, 3]);
    assert!((r[0].weight - 0.5).abs() < 1e-6);
}

#[test]
fn v3_normalises_the_chosen_weights_then_scales_them() {
    let s = RouterSpec {
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
        scale_after_norm: true,
        ..spec(ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 3)
    };
    let total: f32 = route_token(&LOGITS, &s, None).iter().map(|r| r.weight).sum();
    assert!((total - 2.5).abs() < 1e-5, "{total}");
}

#[test]
fn v2_with_norm_topk_prob_normalises_instead_of_scaling_as_deepseeks_code_does() {
    // DeepSeek-V2's modeling code: `if norm_topk_prob: w /= sum(w) else: w *= routed_scaling_factor`.
    // transformers 5.23's deepseek_v2 ignores norm_topk_prob and always scales: the two differ here,
    // and latent follows DeepSeek. With norm_topk_prob false (every published V2) they agree.
    let normed = RouterSpec {
        norm_topk_prob: true,
        routed_scaling_factor: 16.0,
        ..spec(ScoringFunc::Softmax, TopkMethod::Greedy, 3)
    };
    let total: f32 = route_token(&LOGITS, &normed, None).iter().map(|r| r.weight).sum();
    assert!((total - 1.0).abs() < 1e-6, "{total}");
    let scaled = RouterSpec { norm_topk_prob: false, ..normed };
    let r = route_token(&LOGITS, &scaled, None);
    let unscaled = route_token(&LOGITS, &RouterSpec { routed_scaling_factor: 1.0, ..scaled.clone() }, None);
    for (a, b) in r.iter().zip(&unscaled) {
        assert!((a.weight - 16.0 * b.weight).abs() < 1e-5);
    }
}
