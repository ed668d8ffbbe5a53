"""Ablations: the only package that imports optuna. `spec` reads experiments/ablations/*.toml,
`study` runs one as an Optuna study of (arm, fold) trials and reports the verdict."""
