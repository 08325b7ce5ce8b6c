//! Which sequences run in the next engine step: plain logic over counts, tested without a model.
//!
//! - First come, first served: a waiting sequence is admitted only when every one before it has
//!   been, at most `max_seqs` run at once, and only when the pages its prompt needs fit what is
//!   free beside what the running prompts still need.
//! - Sequences grow page by page as they decode. When a step's decodes need more pages than are
//!   free, the sequence admitted last is preempted: it goes back to the head of the queue, its
//!   pages are let go, and its rows are computed again when it resumes (from whatever of them
//!   the prefix cache still holds). No sequence fails for lack of room, and none is admitted in
//!   a step that preempts.
//! - Each step runs every running decode first (one token each), then prefill chunks in
//!   admission order while the step's token budget (`max_batch_tokens`) and the free pages
//!   last. A prompt is cut into chunks of `chunk` tokens at fixed offsets (0, chunk, 2 chunk,
//!   ...), whatever else the step holds: a prompt is then computed the same way alone or beside
//!   others, so a request's tokens do not depend on the load. A long prompt thus takes several
//!   steps, interleaved with the decodes of the running streams.

use std::collections::VecDeque;

use crate::cache::PAGE_ROWS;

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
    /// Pages of the cache pool, all sequences together.
    pub pages: usize,
}

/// What the scheduler knows of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqCounts {
    /// Tokens to prefill: the prompt, or for a preempted sequence every token it had cached.
    pub prompt: usize,
    /// Of those, the ones in the cache.
    pub prefilled: usize,
    /// Rows the sequence's cache holds.
    pub len: usize,
}

impl SeqCounts {
    /// A new sequence with a prompt of `prompt` tokens.
    pub fn new(prompt: usize) -> SeqCounts {
        SeqCounts { prompt, prefilled: 0, len: 0 }
    }

    fn prefill_done(&self) -> bool {
        self.prefilled >= self.prompt
    }
}

/// Pages that hold `rows` rows.
pub fn pages_for(rows: usize) -> usize {
    rows.div_ceil(PAGE_ROWS)
}

/// Pages a sequence of `len` rows takes to grow by `n`.
fn growth(len: usize, n: usize) -> usize {
    pages_for(len + n) - pages_for(len)
}

/// What the scheduler asks of the page pool (the engine's pool and prefix cache; a count in
/// tests).
pub trait Pages {
    /// Pages that can be had now: free ones, and ones only the prefix cache holds.
    fn free(&self) -> usize;
    /// Called for a waiting sequence about to be admitted: the rows of its prompt it holds
    /// already (a prefix found in the prefix cache, or rows it kept); called again if it waits on.
    fn reuse(&mut self, id: SeqId) -> usize;
}

/// One step's work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sequences that decode one token.
    pub decode: Vec<SeqId>,
    /// Sequences that run a prefill chunk: `(id, first prompt token, tokens)`.
    pub prefill: Vec<(SeqId, usize, usize)>,
    /// Sequences preempted: back at the head of the queue, their pages to be let go.
    pub preempted: Vec<SeqId>,
    /// Pages the step's work takes.
    pub pages: usize,
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

/// The waiting queue and the running set (in admission order).
#[derive(Debug)]
pub struct Scheduler {
    limits: Limits,
    waiting: VecDeque<(SeqId, SeqCounts)>,
    running: Vec<(SeqId, SeqCounts)>,
    preemptions: u64,
}

impl Scheduler {
    /// An empty scheduler; `limits.chunk` is clamped to `1..=max_batch_tokens`.
    pub fn new(mut limits: Limits) -> Scheduler {
        limits.max_seqs = limits.max_seqs.max(1);
        limits.max_batch_tokens = limits.max_batch_tokens.max(1);
        limits.chunk = limits.chunk.clamp(1, limits.max_batch_tokens);
        Scheduler { limits, waiting: VecDeque::new(), running: Vec::new(), preemptions: 0 }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a sequence of `rows` cache rows can ever run (it fits the whole pool).
    pub fn fits(&self, rows: usize) -> bool {
        pages_for(rows) <= self.limits.pages
    }

    /// Queues a sequence (last).
    pub fn push(&mut self, id: SeqId, counts: SeqCounts) {
        self.waiting.push_back((id, counts));
    }

    /// Queues a sequence first (one whose work comes before everything waiting).
    pub fn push_front(&mut self, id: SeqId, counts: SeqCounts) {
        self.waiting.push_front((id, counts));
    }

    /// Sequences waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Whether `id` is waiting or running.
    pub fn contains(&self, id: SeqId) -> bool {
        self.waiting.iter().chain(&self.running).any(|&(s, _)| s == id)
    }

    /// What the scheduler knows of `id`.
    pub fn counts(&self, id: SeqId) -> Option<SeqCounts> {
        self.waiting.iter().chain(&self.running).find(|&&(s, _)| s == id).map(|&(_, c)| c)
    }

    /// Whether `id` is running.
    pub fn is_running(&self, id: SeqId) -> bool {
        self.running.iter().any(|&(s, _)| s == id)
    }

    /// Removes `id` (finished or cancelled). Whether it was there.
    pub fn remove(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.running.iter().position(|&(s, _)| s == id) {
            self.running.remove(i);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|&(s, _)| s == id) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    /// Records that `id` ran `tokens` more of its prompt.
    pub fn prefilled(&mut self, id: SeqId, tokens: usize) {
        if let Some((_, c)) = self.running.iter_mut().find(|(s, _)| *s == id) {
            c.prefilled = (c.prefilled + tokens).min(c.prompt);
            c.len += tokens;
        }
    }

    /// Records that `id` decoded a token (its cache grew by a row).
    pub fn decoded(&mut self, id: SeqId) {
        self.decoded_n(id, 1);
    }

    /// `id` decoded `n` tokens in one step (its next token and accepted drafts).
    pub fn decoded_n(&mut self, id: SeqId, n: usize) {
        if let Some((_, c)) = self.running.iter_mut().find(|(s, _)| *s == id) {
            c.len += n;
        }
    }

    /// Moves running `id` back to the head of the queue: it lets its pages go and computes its
    /// rows again when it resumes. Whether it was running.
    pub fn preempt(&mut self, id: SeqId) -> bool {
        let Some(i) = self.running.iter().position(|&(s, _)| s == id) else { return false };
        let (_, c) = self.running.remove(i);
        self.preemptions += 1;
        self.waiting.push_front((id, SeqCounts { prompt: c.prompt.max(c.len), prefilled: 0, len: 0 }));
        true
    }

    /// Preempts when the decodes cannot grow, admits waiting sequences in order while they fit,
    /// then plans the step within the token budget and the pages `pages` can give.
    pub fn plan(&mut self, pages: &mut dyn Pages) -> Plan {
        let mut plan = Plan::default();
        let mut free = pages.free();
        // Decodes first: each may need a page; the sequence admitted last makes way for the
        // others (its pages come back), down to one.
        let decode_pages = |running: &[(SeqId, SeqCounts)]| -> usize {
            running.iter().filter(|(_, c)| c.prefill_done()).map(|(_, c)| growth(c.len, 1)).sum()
        };
        while decode_pages(&self.running) > free && self.running.len() > 1 {
            let Some(&(id, c)) = self.running.last() else { break };
            self.preempt(id);
            free += pages_for(c.len);
            plan.preempted.push(id);
        }
        let decode_need = decode_pages(&self.running).min(free);
        free -= decode_need;
        plan.pages += decode_need;
        // Admission, unless this step had to preempt: pages for the whole prompt, beside what
        // the running prompts still need.
        if plan.preempted.is_empty() {
            let mut owed: usize = self
                .running
                .iter()
                .filter(|(_, c)| !c.prefill_done())
                .map(|(_, c)| pages_for(c.prompt) - pages_for(c.len))
                .sum();
            while let Some(&(id, mut counts)) = self.waiting.front() {
                if self.running.len() >= self.limits.max_seqs {
                    break;
                }
                let held = pages.reuse(id).min(counts.prompt);
                counts.prefilled = counts.prefilled.max(held);
                counts.len = counts.len.max(held);
                if let Some(front) = self.waiting.front_mut() {
                    front.1 = counts;
                }
                let need = pages_for(counts.prompt) - pages_for(counts.len);
                // `free` may have grown since: `reuse` pins pages the prefix cache held.
                let free_now = pages.free().saturating_sub(plan.pages);
                if owed + need > free_now {
                    break;
                }
                owed += need;
                self.waiting.pop_front();
                self.running.push((id, counts));
            }
            free = pages.free().saturating_sub(plan.pages);
        }
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
            let need = growth(c.len, n);
            if n > budget || need > free {
                break; // first come, first served: no later prompt overtakes this one
            }
            plan.prefill.push((id, c.prefilled, n));
            budget -= n;
            free -= need;
            plan.pages += need;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A pool of `total` pages: the pages each sequence holds, and the rows each finds reused
    /// (pinned) at admission.
    #[derive(Default)]
    struct Pool {
        total: usize,
        held: HashMap<SeqId, usize>,
        reused: HashMap<SeqId, usize>,
    }

    impl Pages for Pool {
        fn free(&self) -> usize {
            self.total - self.held.values().sum::<usize>()
        }
        fn reuse(&mut self, id: SeqId) -> usize {
            let rows = self.reused.get(&id).copied().unwrap_or(0);
            self.held.insert(id, pages_for(rows));
            rows
        }
    }

    fn limits() -> Limits {
        Limits { max_seqs: 3, max_batch_tokens: 16, chunk: 8, pages: 100 }
    }

    fn pool(total: usize) -> Pool {
        Pool { total, ..Pool::default() }
    }

    /// Runs plans as the engine would: preempted sequences let their pages go, prefill chunks
    /// and decodes are recorded and hold the pages their rows need.
    fn run(s: &mut Scheduler, pool: &mut Pool) -> Plan {
        let plan = s.plan(pool);
        for id in &plan.preempted {
            pool.held.remove(id);
        }
        let free = pool.free();
        for &(id, _, n) in &plan.prefill {
            s.prefilled(id, n);
        }
        for &id in &plan.decode {
            s.decoded(id);
        }
        for id in plan.decode.iter().chain(plan.prefill.iter().map(|p| &p.0)) {
            let len = s.counts(*id).map_or(0, |c| c.len);
            pool.held.insert(*id, pages_for(len));
        }
        assert_eq!(free - pool.free(), plan.pages, "the plan counts the pages its work takes");
        plan
    }

    fn end(s: &mut Scheduler, pool: &mut Pool, id: SeqId) {
        assert!(s.remove(id));
        pool.held.remove(&id);
    }

    fn plan(decode: Vec<SeqId>, prefill: Vec<(SeqId, usize, usize)>) -> (Vec<SeqId>, Vec<(SeqId, usize, usize)>) {
        (decode, prefill)
    }

    fn work(p: &Plan) -> (Vec<SeqId>, Vec<(SeqId, usize, usize)>) {
        (p.decode.clone(), p.prefill.clone())
    }

    #[test]
    fn decodes_come_first_and_prompts_are_cut_at_fixed_offsets() {
        let (mut s, mut p) = (Scheduler::new(limits()), pool(100));
        s.push(1, SeqCounts::new(3));
        assert_eq!(work(&run(&mut s, &mut p)), plan(vec![], vec![(1, 0, 3)]));
        s.push(2, SeqCounts::new(20));
        // 1 decodes; 2's prompt runs in chunks of 8 at offsets 0, 8, 16, within the budget.
        assert_eq!(work(&run(&mut s, &mut p)), plan(vec![1], vec![(2, 0, 8)]));
        assert_eq!(work(&run(&mut s, &mut p)), plan(vec![1], vec![(2, 8, 8)]));
        assert_eq!(work(&run(&mut s, &mut p)), plan(vec![1], vec![(2, 16, 4)]));
        assert_eq!(work(&run(&mut s, &mut p)), plan(vec![1, 2], vec![]));
        assert_eq!(p.free(), 98, "a page each so far");
    }

    #[test]
    fn the_token_budget_bounds_a_step_and_no_prompt_overtakes_an_earlier_one() {
        let (mut s, mut p) = (Scheduler::new(Limits { max_batch_tokens: 10, ..limits() }), pool(100));
        s.push(1, SeqCounts::new(8));
        s.push(2, SeqCounts::new(8));
        s.push(3, SeqCounts::new(1));
        let first = run(&mut s, &mut p);
        assert_eq!(first.prefill, vec![(1, 0, 8)], "2's chunk does not fit what is left; 3 waits behind it");
        assert!(first.tokens() <= 10);
        assert_eq!(work(&run(&mut s, &mut p)), plan(vec![1], vec![(2, 0, 8), (3, 0, 1)]));
    }

    #[test]
    fn admission_is_bounded_by_max_seqs_and_by_the_pages_of_the_prompts() {
        let (mut s, mut p) = (Scheduler::new(limits()), pool(100));
        for id in 1..=5 {
            s.push(id, SeqCounts::new(1));
        }
        run(&mut s, &mut p);
        assert_eq!((s.running(), s.waiting()), (3, 2), "max_seqs");
        end(&mut s, &mut p, 1);
        run(&mut s, &mut p);
        assert_eq!((s.running(), s.waiting()), (3, 1), "a freed slot admits the next");
        // A prompt of 3 pages beside one of 2: 4 free pages admit only the first; the small one
        // behind it waits too (first come, first served).
        let (mut s, mut p) = (Scheduler::new(Limits { max_batch_tokens: 512, chunk: 512, ..limits() }), pool(4));
        s.push(1, SeqCounts::new(150));
        s.push(2, SeqCounts::new(100));
        s.push(3, SeqCounts::new(1));
        let first = run(&mut s, &mut p);
        assert_eq!((s.running(), s.waiting(), first.pages), (1, 2, 3));
        assert!(!s.fits(100 * PAGE_ROWS + 1) && s.fits(100 * PAGE_ROWS));
        end(&mut s, &mut p, 1);
        run(&mut s, &mut p);
        assert_eq!((s.running(), s.waiting()), (2, 0));
    }

    #[test]
    fn a_reused_prefix_is_not_computed_again_nor_counted_twice() {
        let (mut s, mut p) = (Scheduler::new(limits()), pool(3));
        p.reused.insert(1, 128);
        s.push(1, SeqCounts::new(150));
        // 128 rows held already: the prompt needs one more page, and runs on from row 128.
        let first = run(&mut s, &mut p);
        assert_eq!(first.prefill, vec![(1, 128, 8)]);
        assert_eq!((first.pages, p.free()), (1, 0));
    }

    #[test]
    fn decodes_that_cannot_grow_preempt_the_sequence_admitted_last() {
        let (mut s, mut p) = (Scheduler::new(Limits { max_batch_tokens: 512, chunk: 512, ..limits() }), pool(4));
        for id in 1..=3 {
            s.push(id, SeqCounts::new(64));
        }
        run(&mut s, &mut p); // three prompts of one page each
        assert_eq!((s.running(), p.free()), (3, 1));
        // Each decode now needs a page of its own: only one is free. The last admitted (3) goes
        // back to the head of the queue, its page coming back; 1 and 2 decode.
        let step = run(&mut s, &mut p);
        assert_eq!(step.preempted, vec![3]);
        assert_eq!(work(&step), plan(vec![1, 2], vec![]));
        assert_eq!((s.running(), s.waiting(), p.free()), (2, 1, 0));
        // Nothing is admitted while the running ones need the room; when 1 ends, 3 resumes
        // from the start of what it held (its prompt), before anything queued later.
        s.push(4, SeqCounts::new(1));
        assert_eq!(work(&run(&mut s, &mut p)), plan(vec![1, 2], vec![]));
        end(&mut s, &mut p, 1);
        let resumed = run(&mut s, &mut p);
        assert_eq!(resumed.prefill[0], (3, 0, 64));
        assert_eq!(s.preemptions(), 1);
        // A lone sequence is never preempted for itself.
        let (mut s, mut p) = (Scheduler::new(limits()), pool(1));
        s.push(1, SeqCounts::new(64));
        run(&mut s, &mut p);
        assert!(run(&mut s, &mut p).preempted.is_empty());
    }

    #[test]
    fn a_preempted_decode_recomputes_every_row_it_held() {
        let (mut s, mut p) = (Scheduler::new(limits()), pool(10));
        s.push(1, SeqCounts::new(5));
        run(&mut s, &mut p);
        for _ in 0..3 {
            run(&mut s, &mut p);
        }
        assert!(s.preempt(1));
        p.held.remove(&1);
        let resumed = run(&mut s, &mut p);
        assert_eq!(resumed.prefill, vec![(1, 0, 8)], "5 prompt rows and 3 decoded ones");
    }

    #[test]
    fn removing_a_sequence_works_wherever_it_is() {
        let (mut s, mut p) = (Scheduler::new(limits()), pool(100));
        s.push(1, SeqCounts::new(4));
        s.push(2, SeqCounts::new(4));
        s.push(3, SeqCounts::new(4));
        s.push(4, SeqCounts::new(4));
        run(&mut s, &mut p);
        assert!(s.remove(4), "a waiting sequence is removed");
        assert!(s.remove(1));
        assert!(!s.remove(1) && !s.contains(1));
        assert!(s.remove(2) && s.remove(3));
        assert_eq!((s.running(), s.waiting()), (0, 0));
        assert!(s.plan(&mut p).is_empty());
    }
}
