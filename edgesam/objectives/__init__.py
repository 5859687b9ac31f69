"""What each trainer minimises: the losses, the prompt sampler of prompt-in-the-loop
distillation, the per-step distillation objectives and the synthetic teacher's SAM recipe."""
