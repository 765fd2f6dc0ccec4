"""turnid for your tests: an in-process service and pytest fixtures (`turnid.testing.plugin`)."""

from turnid.testing.plugin import TurnIdTestServer

__all__ = ["TurnIdTestServer"]
