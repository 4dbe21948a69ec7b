"""Exceptions that the CLI turns into clear messages and exit code 2."""


class CvigInputError(ValueError):
    """Bad user input: a file, row or argument that cannot be used.

    The message names the file, the row and what was wrong. The CLI prints it without a
    traceback and exits with code 2.
    """


class CvigMissingDependency(RuntimeError):
    """An optional dependency (CuPy, TensorRT, onnxruntime-gpu, ...) is not installed.

    The message says what to install.
    """
