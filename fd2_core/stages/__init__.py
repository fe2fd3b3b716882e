"""The stages of a job, one module each: pretrain → distill → relabel → evaluate → package."""
