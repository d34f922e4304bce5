"""The exceptions prep raises for a user's mistake; the CLI prints each as one line.

Per-image problems are never exceptions that reach the user: they become rows in
`rejected.csv` (see `imaging.Rejected`).
"""


class PrepError(Exception):
    """A configuration or input problem: the message names the value and what was expected."""


class StageInputMissing(PrepError):
    """A stage's input file does not exist (usually: an earlier stage has not run)."""


class VerificationFailed(PrepError):
    """A packaged file, or a trained model, did not pass its check."""
