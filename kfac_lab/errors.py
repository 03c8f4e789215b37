"""Errors raised by kfac_lab. Every message names the problem and the fix."""


class KFACError(RuntimeError):
    """Base class of kfac_lab's own errors."""


class UnsupportedLayerError(KFACError, ValueError):
    """The model has parameterised modules that K-FAC cannot precondition."""


class UnsupportedApproximationError(KFACError, ValueError):
    """An approximation the model's layers do not admit (e.g. block-tridiagonal across a convolution)."""


class NonFiniteError(KFACError, FloatingPointError):
    """A loss, activation, gradient, factor or update is NaN or infinite."""


class MemoryLimitError(KFACError, MemoryError):
    """A computation would need more memory than its ``max_bytes`` limit (refused before allocating)."""


class FisherTooLargeError(MemoryLimitError):
    """A dense curvature matrix would exceed the configured memory limit."""


class DecompositionError(KFACError):
    """An eigendecomposition or Cholesky factorisation failed even after the retries."""
