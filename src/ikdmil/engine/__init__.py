"""Training: stage 1 (MIL teacher), stage 2 (iterative fusion-knowledge distillation), evaluation."""
