"""Ablations: the only package that imports optuna. `spec` reads experiments/ablations/*.toml (and
the shared CPU demo schedule, experiments/cpu_demo.toml), `storage` opens the Optuna storage URL
and masks its password, `study` runs an ablation as an Optuna study of (arm, fold, seed) trials, and
`report` gathers the finished runs into Table 3 and the run-level verdict."""
