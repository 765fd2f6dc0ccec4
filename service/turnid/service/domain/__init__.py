"""The domain: what a turn is, the rules for allocating one, and nothing of gRPC."""

from turnid.service.domain.errors import ErrorCategory, FieldViolation, TurnIdError
from turnid.service.domain.model import Allocation, Turn, TurnKind
from turnid.service.domain.turns import TurnService

__all__ = [
    "Allocation",
    "ErrorCategory",
    "FieldViolation",
    "Turn",
    "TurnIdError",
    "TurnKind",
    "TurnService",
]
