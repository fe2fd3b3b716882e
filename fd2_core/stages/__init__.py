"""The four stages of decoupled distillation: pretrain → distill → relabel → evaluate."""
