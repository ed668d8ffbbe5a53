"""Training: losses (`losses`), Ranger, schedules and weight averaging (`optim`); the training loop
and checkpoints build on them.

Submodules import torch; import them where needed (`from brats_lab.training.losses import ...`),
so that `import brats_lab.training` itself stays light.
"""
