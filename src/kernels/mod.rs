//! Hot loops written by hand, each next to a plain reference twin and a test that they agree.

pub mod matvec;
