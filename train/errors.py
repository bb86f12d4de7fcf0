"""The error for bad input found before any work starts."""


class InputError(ValueError):
    """A flag's value cannot be used (bad data file, workdir, ...).

    Raised before training starts and before the workdir is created; the
    message names the flag and the value received. `train.main` prints it as
    one line and exits with status 2, like a bad flag value.
    """
