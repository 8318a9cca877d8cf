"""Planning: a family and a budget become resolved run configurations (families, the budget solver, run specs,
resource estimates, the memory-ablation arm, experiment files)."""
