//! Reasoning models (DeepSeek-R1 style) write their chain of thought between `<think>` and
//! `</think>`; DeepSeek's API returns it as `reasoning_content`, apart from `content`. The text
//! arrives in pieces, so a tag may be cut between two: the end of a piece that could begin a
//! tag is held back until the next piece settles it.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Splits a stream of text into reasoning and content.
#[derive(Debug, Clone, Default)]
pub struct ThinkSplitter {
    /// Inside `<think>…</think>`.
    thinking: bool,
    /// Whether a tag may still open reasoning (only before any content).
    may_open: bool,
    /// Just after `</think>`: the newlines that follow belong to neither part.
    after_close: bool,
    held: String,
}

/// A piece of the split: what goes to `reasoning_content` and what to `content`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl ThinkSplitter {
    /// A splitter for a reply whose prompt ended `in_thought` (the template opened `<think>`
    /// itself, as DeepSeek-R1's does), or that may open one with its first words.
    pub fn new(in_thought: bool) -> ThinkSplitter {
        ThinkSplitter { thinking: in_thought, may_open: !in_thought, after_close: false, held: String::new() }
    }

    /// Adds a piece of generated text.
    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            if self.thinking {
                if let Some(at) = self.held.find(CLOSE) {
                    out.reasoning.push_str(&self.held[..at]);
                    self.held.drain(..at + CLOSE.len());
                    self.thinking = false;
                    self.may_open = false;
                    self.after_close = true;
                    continue;
                }
                let keep = partial_suffix(&self.held, CLOSE);
                out.reasoning.push_str(&self.held[..self.held.len() - keep]);
                self.held.drain(..self.held.len() - keep);
                return out;
            }
            if self.may_open {
                let start = self.held.trim_start();
                if let Some(rest) = start.strip_prefix(OPEN) {
                    self.held = rest.trim_start_matches('\n').to_string();
                    self.thinking = true;
                    self.may_open = false;
                    continue;
                }
                if OPEN.starts_with(start) {
                    return out; // could still become `<think>`
                }
                self.may_open = false;
            }
            if self.after_close {
                let trimmed = self.held.trim_start_matches('\n').len();
                self.held.drain(..self.held.len() - trimmed);
                self.after_close = self.held.is_empty();
            }
            out.content.push_str(&self.held);
            self.held.clear();
            return out;
        }
    }

    /// Whatever is held back at the end.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.held);
        if self.thinking {
            Split { reasoning: rest, content: String::new() }
        } else {
            Split { reasoning: String::new(), content: rest }
        }
    }
}

/// Bytes at the end of `text` that begin `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// Whether a rendered prompt leaves the model inside `<think>` (the template opened it).
pub fn opens_thought(prompt: &str) -> bool {
    let t = prompt.trim_end();
    t.ends_with(OPEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(in_thought: bool, pieces: &[&str]) -> (String, String) {
        let mut s = ThinkSplitter::new(in_thought);
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let out = s.push(p);
            r += &out.reasoning;
            c += &out.content;
        }
        let out = s.finish();
        (r + &out.reasoning, c + &out.content)
    }

    #[test]
    fn tags_cut_between_pieces_still_split_reasoning_from_content() {
        let want = ("2 + 2 is 4.".to_string(), "Four.".to_string());
        assert_eq!(run(false, &["<think>\n2 + 2 is 4.</think>\n\nFour."]), want);
        assert_eq!(run(false, &["<th", "ink>2 + 2", " is 4.</th", "ink>", "\nFour", "."]), want);
        assert_eq!(run(true, &["2 + 2 is 4.<", "/think>Four."]), want);
        assert_eq!(run(false, &["Four."]), (String::new(), "Four.".to_string()));
        // A tag after content has begun is content.
        assert_eq!(run(false, &["Hi <think>x</think>"]), (String::new(), "Hi <think>x</think>".to_string()));
        // A reply cut short inside its thought keeps the thought as reasoning.
        assert_eq!(run(true, &["still thinking </thi"]), ("still thinking </thi".to_string(), String::new()));
        assert!(opens_thought("<｜Assistant｜><think>\n") && !opens_thought("<｜Assistant｜>"));
    }
}
