"""Training: losses (`losses`), Ranger, schedules and weight averaging (`optim`), one optimisation
step (`step`), the checkpoint format and the training state it holds (`checkpoint`), per-epoch
validation and final scoring (`scoring`), process groups (`distributed`) and the loop that uses
them all, `trainer.train_fold`.

Submodules import torch; import them where needed (`from brats_lab.training.losses import ...`),
so that `import brats_lab.training` itself stays light.
"""
