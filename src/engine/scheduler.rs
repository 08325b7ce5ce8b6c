//! Which sequences run in the next engine step: plain logic over counts, tested without a model.
//!
//! - First come, first served: a waiting sequence is admitted only when every one before it has
//!   been, at most `max_seqs` run at once, and a sequence is admitted only when the cache rows
//!   it may need (`prompt + max_tokens`) fit what the budget has left, so a running sequence
//!   can always grow to its end: the cache never runs out mid-sequence.
//! - Each step runs every running decode first (one token each), then prefill chunks in
//!   admission order while the step's token budget (`max_batch_tokens`) lasts. A prompt is cut
//!   into chunks of `chunk` tokens at fixed offsets (0, chunk, 2 chunk, ...), whatever else the
//!   step holds: a prompt is then computed the same way alone or beside others, so a request's
//!   tokens do not depend on the load. A long prompt thus takes several steps, interleaved with
//!   the decodes of the running streams.

use std::collections::VecDeque;

/// A sequence's id, unique within an engine.
pub type SeqId = u64;

/// The scheduler's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Most tokens one step computes (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Prefill chunk: prompts are cut at multiples of it (at most `max_batch_tokens`).
    pub chunk: usize,
    /// Cache rows the memory budget holds, all sequences together.
    pub cache_rows: usize,
}

/// What the scheduler knows of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqCounts {
    /// Prompt tokens to run.
    pub prompt: usize,
    /// Prompt tokens already in the cache.
    pub prefilled: usize,
    /// Cache rows reserved for the sequence: prompt plus the most tokens it may generate.
    pub rows: usize,
    /// Rows it holds already while it waits (a reused prefix, counted in `prefilled` too).
    pub held: usize,
}

impl SeqCounts {
    fn prefill_done(&self) -> bool {
        self.prefilled >= self.prompt
    }
}

/// One step's work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sequences that decode one token.
    pub decode: Vec<SeqId>,
    /// Sequences that run a prefill chunk: `(id, first prompt token, tokens)`.
    pub prefill: Vec<(SeqId, usize, usize)>,
}

impl Plan {
    /// Whether the step has no work.
    pub fn is_empty(&self) -> bool {
        self.decode.is_empty() && self.prefill.is_empty()
    }

    /// Tokens the step computes.
    pub fn tokens(&self) -> usize {
        self.decode.len() + self.prefill.iter().map(|p| p.2).sum::<usize>()
    }
}

/// The waiting queue and the running set.
#[derive(Debug)]
pub struct Scheduler {
    limits: Limits,
    waiting: VecDeque<(SeqId, SeqCounts)>,
    running: Vec<(SeqId, SeqCounts)>,
    rows_used: usize,
    /// Rows held by waiting sequences.
    rows_held: usize,
    /// Rows held by caches kept for their prefixes (evictable).
    rows_kept: usize,
}

impl Scheduler {
    /// An empty scheduler; `limits.chunk` is clamped to `1..=max_batch_tokens`.
    pub fn new(mut limits: Limits) -> Scheduler {
        limits.max_seqs = limits.max_seqs.max(1);
        limits.max_batch_tokens = limits.max_batch_tokens.max(1);
        limits.chunk = limits.chunk.clamp(1, limits.max_batch_tokens);
        Scheduler { limits, waiting: VecDeque::new(), running: Vec::new(), rows_used: 0, rows_held: 0, rows_kept: 0 }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a sequence of `rows` cache rows can ever run (it fits the whole budget).
    pub fn fits(&self, rows: usize) -> bool {
        rows <= self.limits.cache_rows
    }

    /// Queues a sequence (last).
    pub fn push(&mut self, id: SeqId, counts: SeqCounts) {
        self.rows_held += counts.held;
        self.waiting.push_back((id, counts));
    }

    /// Tells the scheduler how many rows the kept prefix caches hold: admission leaves them be
    /// while the rest fits, and [`Scheduler::blocked_by_kept`] says when they are in the way.
    pub fn set_kept_rows(&mut self, rows: usize) {
        self.rows_kept = rows;
    }

    /// Whether the first waiting sequence would be admitted but for the kept prefix caches.
    pub fn blocked_by_kept(&self) -> bool {
        let Some(&(_, c)) = self.waiting.front() else { return false };
        let without = self.rows_used + self.rows_held - c.held + c.rows;
        self.running.len() < self.limits.max_seqs
            && without <= self.limits.cache_rows
            && without + self.rows_kept > self.limits.cache_rows
    }

    /// Sequences waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Cache rows reserved by the running sequences.
    pub fn rows_used(&self) -> usize {
        self.rows_used
    }

    /// Whether `id` is waiting or running.
    pub fn contains(&self, id: SeqId) -> bool {
        self.waiting.iter().chain(&self.running).any(|&(s, _)| s == id)
    }

    /// Removes `id` (finished or cancelled), releasing its rows. Whether it was there.
    pub fn remove(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.running.iter().position(|&(s, _)| s == id) {
            self.rows_used -= self.running[i].1.rows;
            self.running.remove(i);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|&(s, _)| s == id) {
            self.rows_held -= self.waiting[i].1.held;
            self.waiting.remove(i);
            return true;
        }
        false
    }

    /// Records that `id` ran `tokens` more of its prompt.
    pub fn prefilled(&mut self, id: SeqId, tokens: usize) {
        if let Some((_, c)) = self.running.iter_mut().find(|(s, _)| *s == id) {
            c.prefilled = (c.prefilled + tokens).min(c.prompt);
        }
    }

    /// Admits waiting sequences in order while they fit, then plans the step.
    pub fn plan(&mut self) -> Plan {
        while let Some(&(id, counts)) = self.waiting.front() {
            let others = self.rows_used + self.rows_held - counts.held + self.rows_kept;
            let fits = others + counts.rows <= self.limits.cache_rows;
            if self.running.len() >= self.limits.max_seqs || !fits {
                break;
            }
            self.waiting.pop_front();
            self.rows_held -= counts.held;
            self.rows_used += counts.rows;
            self.running.push((id, counts));
        }
        let mut plan = Plan::default();
        let mut budget = self.limits.max_batch_tokens;
        for &(id, c) in &self.running {
            if c.prefill_done() && budget > 0 {
                plan.decode.push(id);
                budget -= 1;
            }
        }
        for &(id, c) in &self.running {
            if c.prefill_done() {
                continue;
            }
            // The next chunk ends at the next multiple of `chunk` (or the prompt's end).
            let end = ((c.prefilled / self.limits.chunk + 1) * self.limits.chunk).min(c.prompt);
            let n = end - c.prefilled;
            if n > budget {
                break; // first come, first served: no later prompt overtakes this one
            }
            plan.prefill.push((id, c.prefilled, n));
            budget -= n;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_seqs: 3, max_batch_tokens: 16, chunk: 8, cache_rows: 100 }
    }

    fn seq(prompt: usize, rows: usize) -> SeqCounts {
        SeqCounts { prompt, prefilled: 0, rows, held: 0 }
    }

    /// Runs plans as the engine would: prefill chunks are recorded done.
    fn run(s: &mut Scheduler) -> Plan {
        let plan = s.plan();
        for &(id, _, n) in &plan.prefill {
            s.prefilled(id, n);
        }
        plan
    }

    #[test]
    fn decodes_come_first_and_prompts_are_cut_at_fixed_offsets() {
        let mut s = Scheduler::new(limits());
        s.push(1, seq(3, 10));
        assert_eq!(run(&mut s), Plan { decode: vec![], prefill: vec![(1, 0, 3)] });
        s.push(2, seq(20, 30));
        // 1 decodes; 2's prompt runs in chunks of 8 at offsets 0, 8, 16, within the budget.
        assert_eq!(run(&mut s), Plan { decode: vec![1], prefill: vec![(2, 0, 8)] });
        assert_eq!(run(&mut s), Plan { decode: vec![1], prefill: vec![(2, 8, 8)] });
        assert_eq!(run(&mut s), Plan { decode: vec![1], prefill: vec![(2, 16, 4)] });
        assert_eq!(run(&mut s), Plan { decode: vec![1, 2], prefill: vec![] });
    }

    #[test]
    fn the_token_budget_bounds_a_step_and_no_prompt_overtakes_an_earlier_one() {
        let mut s = Scheduler::new(Limits { max_batch_tokens: 10, ..limits() });
        s.push(1, seq(8, 10));
        s.push(2, seq(8, 10));
        s.push(3, seq(1, 10));
        let plan = run(&mut s);
        assert_eq!(plan.prefill, vec![(1, 0, 8)], "2's chunk does not fit what is left; 3 waits behind it");
        assert!(plan.tokens() <= 10);
        let plan = run(&mut s);
        assert_eq!(plan, Plan { decode: vec![1], prefill: vec![(2, 0, 8), (3, 0, 1)] });
    }

    #[test]
    fn admission_is_bounded_by_max_seqs_and_by_the_cache_rows() {
        let mut s = Scheduler::new(limits());
        for id in 1..=5 {
            s.push(id, seq(1, 30));
        }
        run(&mut s);
        assert_eq!((s.running(), s.waiting()), (3, 2), "max_seqs");
        assert_eq!(s.rows_used(), 90);
        s.remove(1);
        run(&mut s);
        assert_eq!((s.running(), s.waiting()), (3, 1), "a freed slot admits the next");
        // A large sequence at the head waits for rows; the small one behind it waits too.
        let mut s = Scheduler::new(limits());
        s.push(1, seq(1, 60));
        s.push(2, seq(1, 50));
        s.push(3, seq(1, 10));
        run(&mut s);
        assert_eq!((s.running(), s.waiting()), (1, 2), "60 + 50 rows do not fit 100");
        assert!(!s.fits(101) && s.fits(100));
        s.remove(1);
        run(&mut s);
        assert_eq!((s.running(), s.waiting(), s.rows_used()), (2, 0, 60));
    }

    #[test]
    fn kept_prefix_rows_give_way_to_waiting_sequences_and_held_rows_are_not_counted_twice() {
        let mut s = Scheduler::new(limits());
        s.set_kept_rows(50);
        s.push(1, seq(1, 60));
        assert!(s.blocked_by_kept(), "60 rows fit 100, but not beside 50 kept");
        run(&mut s);
        assert_eq!(s.running(), 0);
        s.set_kept_rows(40); // the engine evicted some
        assert!(!s.blocked_by_kept());
        run(&mut s);
        assert_eq!(s.running(), 1);
        // A sequence that reused 64 rows of a prefix starts its prompt after them, and its
        // held rows count once: 100 rows in all fit exactly.
        let mut s = Scheduler::new(limits());
        s.push(1, SeqCounts { prompt: 70, prefilled: 64, rows: 100, held: 64 });
        let plan = run(&mut s);
        assert_eq!(plan.prefill, vec![(1, 64, 6)], "the prompt runs on after its 64 reused rows");
        assert_eq!(s.rows_used(), 100);
    }

    #[test]
    fn removing_a_sequence_frees_its_rows_wherever_it_is() {
        let mut s = Scheduler::new(limits());
        s.push(1, seq(4, 40));
        s.push(2, seq(4, 40));
        s.push(3, seq(4, 40));
        run(&mut s);
        assert_eq!(s.rows_used(), 80);
        assert!(s.remove(3), "a waiting sequence is removed");
        assert!(s.remove(1));
        assert_eq!(s.rows_used(), 40);
        assert!(!s.remove(1) && !s.contains(1));
        assert!(s.remove(2));
        assert_eq!((s.running(), s.waiting(), s.rows_used()), (0, 0, 0));
        assert!(s.plan().is_empty());
    }
}
