"""brats-lab: reproduce and take apart a top-10 BraTS 2020 solution.

Importing the package stays light: torch, mlflow, optuna and streamlit are imported only by the
commands that need them.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix: bad data, a bad configuration or option, a training that
    diverged with these settings. Its message says what was wrong and what was expected; the CLI
    catches this one type and prints the message (one error per line), exit status 1. Subclasses:
    `DataError` (here), `brats_lab.config.ConfigError`, `brats_lab.training.trainer.TrainingDiverged`."""


class DataError(UserError):
    """Bad input data. The message names the case and the file, and says what was expected."""
