"""brats-lab: reproduce and take apart a top-10 BraTS 2020 solution.

Importing the package stays light: torch, mlflow, optuna and streamlit are imported only by the
commands that need them.
"""

__version__ = "0.1.0"


class DataError(Exception):
    """Bad input data. The message names the case and the file, and says what was expected."""
