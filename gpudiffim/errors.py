"""Exceptions raised by gpudiffim."""

__all__ = ["GpuDiffimError", "InputError", "BackendError"]


class GpuDiffimError(Exception):
    """Base class of every error gpudiffim raises on purpose."""


class InputError(GpuDiffimError):
    """Bad input data. The message names the file (when there is one) and the problem."""

    def __init__(self, path, problem):
        self.path = None if path is None else str(path)
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}")


class BackendError(GpuDiffimError):
    """A requested backend is not available on this machine."""
