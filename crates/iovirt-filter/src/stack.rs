//! Declarative filter stacks (being written).
