"""The error class for bad input from a user: a wrong option value, an unknown dataset, a bad path or file.

What lives here: :class:`BadInput`, the base of every error the command line reports as ``error: ...`` with
exit status 2 and the app shows as a message (the library's own kinds derive from it:
:class:`~jem_core.checkpoint.CheckpointError`, :class:`~jem_core.likelihood.LikelihoodError`,
:class:`~jem_core.images.ImageDecodeError`). What does not: errors of the program itself -- a plain
``ValueError`` from a wrong call inside the library is a bug and reaches the user as a traceback; missing data
files (:class:`~jem_core.data.DataUnavailableError`) and a diverged training run
(:class:`~jem_core.training.TrainingDiverged`) keep their own classes.
"""

from __future__ import annotations

__all__ = ["BadInput"]


class BadInput(ValueError):
    """Input a user gave (an option, a dataset spec, a path, a file's contents) is unusable; the message says
    what is wrong and what to do instead.

    A ``ValueError``, so code that catches ``ValueError`` still catches it.
    """
