"""Analysis: fits with intervals (U-curve, power law, trend, power), plots, the ablation summary, sweep
summaries, the W&B summary run and the dry-run view."""
