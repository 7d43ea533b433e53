from tests.strategies.conftest import task_identity  # noqa: F401  (autouse fixture)
